//! SQL of outgoing HTTP's own tables (migration 0009): request intents and
//! outcomes (`wardcall.http_requests`), each endpoint's breaker
//! (`wardcall.http_endpoints`) and counts (`wardcall.http_endpoint_counts`,
//! read through the view `wardcall.http_endpoint_stats`). One function per
//! operation; every breaker transition is audited in its transaction.

use crate::store::audit::{self, Entity};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

/// Count slots per endpoint: a writer picks one at random, readers sum them.
pub const COUNT_SLOTS: i16 = 8;

/// A request about to be sent: the intent row's fields.
#[derive(Debug, Clone)]
pub struct Intent<'a> {
    /// The `wardcall.http_requests` id (also the probe's id while it probes).
    pub id: Uuid,
    pub run_id: Option<Uuid>,
    pub step: &'a str,
    pub attempt: i32,
    pub endpoint: &'a str,
    pub method: &'a str,
    pub idempotency_key: &'a str,
    pub engine: &'a str,
}

fn slot() -> i16 {
    rand::random_range(0..COUNT_SLOTS)
}

/// Records the intent (and counts an attempt) only if the endpoint's breaker
/// is closed or has never failed, in one statement that takes no lock on the
/// breaker's row. Returns false when the breaker is open or half-open
/// (nothing was written): see [`claim_probe`].
pub async fn record_intent_if_closed(pool: &PgPool, i: &Intent<'_>) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "WITH ins AS (
             INSERT INTO wardcall.http_requests (id, run_id, step, attempt, endpoint, method, idempotency_key, engine)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8
              WHERE coalesce((SELECT state FROM wardcall.http_endpoints WHERE name = $5), 'closed') = 'closed'
             RETURNING endpoint),
         cnt AS (
             INSERT INTO wardcall.http_endpoint_counts AS c (endpoint, slot, attempts) SELECT endpoint, $9, 1 FROM ins
             ON CONFLICT (endpoint, slot) DO UPDATE SET attempts = c.attempts + 1)
         SELECT EXISTS (SELECT 1 FROM ins)",
    )
    .bind(i.id)
    .bind(i.run_id)
    .bind(i.step)
    .bind(i.attempt)
    .bind(i.endpoint)
    .bind(i.method)
    .bind(i.idempotency_key)
    .bind(i.engine)
    .bind(slot())
    .fetch_one(pool)
    .await
}

/// What [`claim_probe`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The breaker is closed after all (it closed meanwhile): record the
    /// intent the ordinary way.
    Closed,
    /// This request is the probe: its intent is recorded (`probe = true`) and
    /// the breaker is `half_open` with this request as its probe.
    Probe,
    /// Open (cool-down running) or another probe in flight: send nothing,
    /// ask again in this many milliseconds.
    Refused { retry_in_ms: i64 },
}

/// While the breaker is not closed: claims the probe when the cool-down has
/// ended (`open` → `half_open`) or the previous probe's claim expired (a
/// crashed prober), atomically (the breaker's row is locked), so exactly one
/// caller of all engines probes. The claim lasts `probe_lease_ms`. The claim,
/// its audit row (`breaker.half_opened` or `breaker.probe_reclaimed`) and the
/// probe's intent commit together.
pub async fn claim_probe(pool: &PgPool, i: &Intent<'_>, probe_lease_ms: i64, actor: &str) -> Result<Admission, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, i64, i64)> = sqlx::query_as(
        "SELECT state,
                coalesce(ceil(extract(epoch FROM opened_until - clock_timestamp()) * 1000), 0)::bigint,
                coalesce(ceil(extract(epoch FROM probe_expires_at - clock_timestamp()) * 1000), 0)::bigint
           FROM wardcall.http_endpoints WHERE name = $1 FOR UPDATE",
    )
    .bind(i.endpoint)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((state, open_left, probe_left)) = row else { return Ok(Admission::Closed) };
    match state.as_str() {
        "open" if open_left > 0 => return Ok(Admission::Refused { retry_in_ms: open_left }),
        // A probe is in flight: look again soon (it may close the breaker).
        "half_open" if probe_left > 0 => return Ok(Admission::Refused { retry_in_ms: probe_left.min(1000) }),
        "open" | "half_open" => {}
        _ => return Ok(Admission::Closed),
    }
    sqlx::query(
        "UPDATE wardcall.http_endpoints SET state = 'half_open', probe_owner = $2, probe_request = $3,
                probe_expires_at = clock_timestamp() + $4 * interval '1 millisecond', updated_at = clock_timestamp()
          WHERE name = $1",
    )
    .bind(i.endpoint)
    .bind(i.engine)
    .bind(i.id)
    .bind(probe_lease_ms)
    .execute(&mut *tx)
    .await?;
    let action = if state == "open" { "breaker.half_opened" } else { "breaker.probe_reclaimed" };
    audit::record(
        &mut tx,
        Entity::HttpEndpoint,
        i.endpoint,
        action,
        Some(&state),
        Some("half_open"),
        actor,
        json!({"probe_request": i.id, "run_id": i.run_id, "step": i.step, "probe_lease_ms": probe_lease_ms}),
    )
    .await?;
    sqlx::query(
        "WITH ins AS (
             INSERT INTO wardcall.http_requests (id, run_id, step, attempt, endpoint, method, idempotency_key, engine, probe)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, true) RETURNING endpoint)
         INSERT INTO wardcall.http_endpoint_counts AS c (endpoint, slot, attempts) SELECT endpoint, $9, 1 FROM ins
         ON CONFLICT (endpoint, slot) DO UPDATE SET attempts = c.attempts + 1",
    )
    .bind(i.id)
    .bind(i.run_id)
    .bind(i.step)
    .bind(i.attempt)
    .bind(i.endpoint)
    .bind(i.method)
    .bind(i.idempotency_key)
    .bind(i.engine)
    .bind(slot())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Admission::Probe)
}

/// The outcome of a sent request, as recorded.
#[derive(Debug, Clone)]
pub struct Finished<'a> {
    pub id: Uuid,
    pub endpoint: &'a str,
    /// Whether this request was the breaker's probe.
    pub probe: bool,
    pub success: bool,
    /// Worth retrying (transport error, timeout, 5xx, 429); only for failures.
    pub retryable: bool,
    /// Counts towards opening the breaker (transport error, timeout, 5xx, 429).
    pub breaker_failure: bool,
    pub status: Option<u16>,
    pub latency_ms: i32,
    /// The error (never a body, a URL or a header).
    pub error: Option<&'a str>,
    /// Failures in a row that open the breaker.
    pub failure_threshold: u32,
    pub cooldown_ms: i64,
}

/// A breaker transition caused by an outcome (already committed and audited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerChange {
    /// `closed` → `open` after this many consecutive failures.
    Opened { consecutive_failures: i32 },
    /// `half_open` → `open`: the probe failed.
    Reopened,
    /// `half_open` → `closed`: the probe got an answer.
    Closed,
}

/// Records a request's outcome: the request row, the endpoint's counts
/// (successes or failures) and the breaker, in one transaction:
/// - a breaker failure of the probe re-opens the breaker for `cooldown_ms`;
/// - any other answer to the probe closes it;
/// - a breaker failure while closed counts a consecutive failure and opens
///   the breaker at `failure_threshold`;
/// - a success while closed resets the consecutive failures;
/// - a non-retryable failure (4xx other than 429) leaves the breaker alone.
///
/// Openings are counted (`breaker_openings`) and every transition audited
/// (`breaker.opened`, `breaker.reopened`, `breaker.closed`, entity
/// `http_endpoint`) with `actor`. Returns the transition, if any.
pub async fn record_outcome(pool: &PgPool, f: &Finished<'_>, actor: &str) -> Result<Option<BreakerChange>, sqlx::Error> {
    if !f.probe && !f.breaker_failure {
        // The common case, one statement: the request row, the counts, and a
        // reset of the consecutive failures (which locks the breaker's row
        // only when there is something to reset).
        sqlx::query(
            "WITH upd AS (
                 UPDATE wardcall.http_requests SET outcome = $2, retryable = $3, status = $4, latency_ms = $5, error = $6,
                        finished_at = clock_timestamp()
                  WHERE id = $1 RETURNING endpoint),
             cnt AS (
                 INSERT INTO wardcall.http_endpoint_counts AS c (endpoint, slot, successes, failures)
                 SELECT endpoint, $7, CASE WHEN $8 THEN 1 ELSE 0 END, CASE WHEN $8 THEN 0 ELSE 1 END FROM upd
                 ON CONFLICT (endpoint, slot) DO UPDATE SET successes = c.successes + excluded.successes, failures = c.failures + excluded.failures)
             UPDATE wardcall.http_endpoints SET consecutive_failures = 0, updated_at = clock_timestamp()
              WHERE $8 AND name = $9 AND state = 'closed' AND consecutive_failures > 0",
        )
        .bind(f.id)
        .bind(if f.success { "success" } else { "failed" })
        .bind(if f.success { None } else { Some(f.retryable) })
        .bind(f.status.map(i32::from))
        .bind(f.latency_ms)
        .bind(f.error)
        .bind(slot())
        .bind(f.success)
        .bind(f.endpoint)
        .execute(pool)
        .await?;
        return Ok(None);
    }
    let mut tx = pool.begin().await?;
    sqlx::query(
        "WITH upd AS (
             UPDATE wardcall.http_requests SET outcome = $2, retryable = $3, status = $4, latency_ms = $5, error = $6,
                    finished_at = clock_timestamp()
              WHERE id = $1 RETURNING endpoint)
         INSERT INTO wardcall.http_endpoint_counts AS c (endpoint, slot, successes, failures)
         SELECT endpoint, $7, CASE WHEN $8 THEN 1 ELSE 0 END, CASE WHEN $8 THEN 0 ELSE 1 END FROM upd
         ON CONFLICT (endpoint, slot) DO UPDATE SET successes = c.successes + excluded.successes, failures = c.failures + excluded.failures",
    )
    .bind(f.id)
    .bind(if f.success { "success" } else { "failed" })
    .bind(if f.success { None } else { Some(f.retryable) })
    .bind(f.status.map(i32::from))
    .bind(f.latency_ms)
    .bind(f.error)
    .bind(slot())
    .bind(f.success)
    .execute(&mut *tx)
    .await?;
    let change = if !f.breaker_failure {
        // The probe was answered (a success, or a status that is no breaker failure).
        let closed = sqlx::query(
            "UPDATE wardcall.http_endpoints SET state = 'closed', consecutive_failures = 0, opened_until = NULL,
                    probe_owner = NULL, probe_request = NULL, probe_expires_at = NULL, updated_at = clock_timestamp()
              WHERE name = $1 AND state = 'half_open' AND probe_request = $2",
        )
        .bind(f.endpoint)
        .bind(f.id)
        .execute(&mut *tx)
        .await?;
        (closed.rows_affected() == 1).then_some(BreakerChange::Closed)
    } else {
        sqlx::query("INSERT INTO wardcall.http_endpoints (name) VALUES ($1) ON CONFLICT (name) DO NOTHING").bind(f.endpoint).execute(&mut *tx).await?;
        let (state, failures, probe_request): (String, i32, Option<Uuid>) =
            sqlx::query_as("SELECT state, consecutive_failures, probe_request FROM wardcall.http_endpoints WHERE name = $1 FOR UPDATE")
                .bind(f.endpoint)
                .fetch_one(&mut *tx)
                .await?;
        let failures = failures.saturating_add(1);
        let change = if f.probe && state == "half_open" && probe_request == Some(f.id) {
            Some(BreakerChange::Reopened)
        } else if state == "closed" && failures as i64 >= f.failure_threshold as i64 {
            Some(BreakerChange::Opened { consecutive_failures: failures })
        } else {
            None
        };
        if change.is_some() {
            sqlx::query(
                "UPDATE wardcall.http_endpoints SET state = 'open', consecutive_failures = $2,
                        opened_until = clock_timestamp() + $3 * interval '1 millisecond',
                        probe_owner = NULL, probe_request = NULL, probe_expires_at = NULL, updated_at = clock_timestamp()
                  WHERE name = $1",
            )
            .bind(f.endpoint)
            .bind(failures)
            .bind(f.cooldown_ms)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO wardcall.http_endpoint_counts AS c (endpoint, slot, breaker_openings) VALUES ($1, $2, 1)
                 ON CONFLICT (endpoint, slot) DO UPDATE SET breaker_openings = c.breaker_openings + 1",
            )
            .bind(f.endpoint)
            .bind(slot())
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query("UPDATE wardcall.http_endpoints SET consecutive_failures = $2, updated_at = clock_timestamp() WHERE name = $1")
                .bind(f.endpoint)
                .bind(failures)
                .execute(&mut *tx)
                .await?;
        }
        change
    };
    if let Some(c) = change {
        let (action, from, to) = match c {
            BreakerChange::Opened { .. } => ("breaker.opened", "closed", "open"),
            BreakerChange::Reopened => ("breaker.reopened", "half_open", "open"),
            BreakerChange::Closed => ("breaker.closed", "half_open", "closed"),
        };
        let detail = json!({
            "request": f.id,
            "status": f.status,
            "error": f.error,
            "consecutive_failures": match c { BreakerChange::Opened { consecutive_failures } => Some(consecutive_failures), _ => None },
            "cooldown_ms": if to == "open" { Some(f.cooldown_ms) } else { None },
        });
        audit::record(&mut tx, Entity::HttpEndpoint, f.endpoint, action, Some(from), Some(to), actor, detail).await?;
    }
    tx.commit().await?;
    Ok(change)
}

/// One endpoint's breaker and counts (`wardcall.http_endpoint_stats`).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct EndpointStats {
    pub endpoint: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    pub consecutive_failures: i32,
    /// Requests recorded (intents), probes included.
    pub attempts: i64,
    pub successes: i64,
    /// Failed requests of every kind (transport, timeout, any non-success status).
    pub failures: i64,
    /// Times the breaker opened (from closed, or again after a failed probe).
    pub breaker_openings: i64,
    /// Milliseconds until an open breaker lets a probe through (0 when due; `None` unless open).
    pub open_for_ms: Option<i64>,
}

/// Every endpoint that has counts or a breaker row, by name.
pub async fn endpoint_stats(pool: &PgPool) -> Result<Vec<EndpointStats>, sqlx::Error> {
    sqlx::query_as(
        "SELECT endpoint, state, consecutive_failures, attempts, successes, failures, breaker_openings,
                CASE WHEN state = 'open' THEN greatest(0, ceil(extract(epoch FROM opened_until - clock_timestamp()) * 1000))::bigint END AS open_for_ms
           FROM wardcall.http_endpoint_stats ORDER BY endpoint",
    )
    .fetch_all(pool)
    .await
}

/// The HTTP status of a success already recorded for `step` of `run` (a
/// crash between the request and the step's commit): the request is not
/// sent again. `None`: no success recorded.
pub async fn succeeded_status(pool: &PgPool, run: Uuid, step: &str) -> Result<Option<i32>, sqlx::Error> {
    let status: Option<Option<i32>> = sqlx::query_scalar(
        "SELECT status FROM wardcall.http_requests WHERE run_id = $1 AND step = $2 AND outcome = 'success' ORDER BY created_at DESC LIMIT 1",
    )
    .bind(run)
    .bind(step)
    .fetch_optional(pool)
    .await?;
    Ok(status.flatten())
}
