//! SQL of `wardcall.notification_attempts` as the sending side uses it (every
//! channel alike): intents, the recording of a send's result, adoption of a
//! send found at the provider, the re-send rule's `unknown` mark, and the
//! per-position reads of the escalation and the `notify` step. The webhook
//! side (statuses, keypresses, replies) is in `crate::notify::acknowledgement`.
//!
//! Every state change is audited in the same transaction, only if it happened.

use crate::store::audit::{self, Entity};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

/// One attempt, as the escalation and the `notify` step read it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub id: Uuid,
    pub person_id: String,
    /// `intent`, `requested`, the provider's statuses, `unknown`.
    pub status: String,
    /// The provider's id of the send (CallSid, MessageSid), once known.
    pub provider_id: Option<String>,
    /// The answering-machine verdict of a call.
    pub answered_by: Option<String>,
    pub acknowledged: bool,
    pub declined: bool,
    /// The run's fencing token when the intent was recorded.
    pub fencing_token: i64,
    /// 0, or more after a re-send of an unknown outcome.
    pub generation: i32,
    /// The address sent to (personal data: never logged unredacted).
    pub destination: String,
    /// `created_at`, milliseconds since the Unix epoch (UTC).
    pub created_ms: f64,
}

impl AttemptRow {
    /// An intent of an earlier execution (an older fencing token than
    /// `fencing_token`) whose send was never confirmed: the request may or
    /// may not have gone out.
    pub fn ambiguous(&self, fencing_token: i64) -> bool {
        self.status == "intent" && self.provider_id.is_none() && self.fencing_token < fencing_token
    }
}

/// Where attempts sit: an escalation position (`step_key` empty, `cycle`,
/// `step_index`) or a `notify` step (`step_key` its address, 0, 0).
#[derive(Debug, Clone, Copy)]
pub struct Position<'a> {
    pub run: Uuid,
    pub step_key: &'a str,
    pub cycle: i32,
    pub step_index: i32,
}

/// Each person's latest attempt (highest generation) on `channel` at `pos`.
pub async fn latest_per_person(conn: &mut PgConnection, pos: Position<'_>, channel: &str) -> Result<Vec<AttemptRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT DISTINCT ON (person_id) id, person_id, status, provider_id, answered_by,
                acknowledged_at IS NOT NULL AS acknowledged, declined_at IS NOT NULL AS declined,
                fencing_token, generation, destination, (extract(epoch FROM created_at) * 1000)::float8 AS created_ms
           FROM wardcall.notification_attempts
          WHERE run_id = $1 AND step_key = $2 AND cycle = $3 AND step_index = $4 AND channel = $5
          ORDER BY person_id, generation DESC",
    )
    .bind(pos.run)
    .bind(pos.step_key)
    .bind(pos.cycle)
    .bind(pos.step_index)
    .bind(channel)
    .fetch_all(conn)
    .await
}

/// A new intent (DESIGN.md invariant 2: committed before its send).
#[derive(Debug, Clone)]
pub struct NewIntent<'a> {
    /// The alert, for an escalation's attempts; `None` for a `notify` step.
    pub alert_id: Option<Uuid>,
    pub pos: Position<'a>,
    pub person_id: &'a str,
    /// The recipient's display name (for write-backs; never logged).
    pub person_name: Option<&'a str>,
    pub generation: i32,
    /// `voice`, `sms`.
    pub channel: &'a str,
    pub destination: &'a str,
    /// The provider's name (`twilio`).
    pub provider: &'a str,
    /// The run's fencing token of this execution.
    pub fencing_token: i64,
    /// When the call sweeper first asks the provider about it if no final
    /// status arrived, in milliseconds from now.
    pub reconcile_after_ms: i64,
}

/// Records an intent and audits it (`attempt.intent`: person id, channel and
/// position; never the address). Returns the attempt's id.
///
/// Errors: a database error (e.g. a unique violation: the same person,
/// position, channel and generation twice).
pub async fn insert_intent(tx: &mut PgConnection, intent: &NewIntent<'_>, actor: &str) -> Result<Uuid, sqlx::Error> {
    let p = intent.pos;
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.notification_attempts
             (alert_id, run_id, step_key, cycle, step_index, person_id, person_name, generation, channel, destination, provider, status,
              fencing_token, reconcile_after)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'intent', $12, clock_timestamp() + $13 * interval '1 millisecond')
         RETURNING id",
    )
    .bind(intent.alert_id)
    .bind(p.run)
    .bind(p.step_key)
    .bind(p.cycle)
    .bind(p.step_index)
    .bind(intent.person_id)
    .bind(intent.person_name)
    .bind(intent.generation)
    .bind(intent.channel)
    .bind(intent.destination)
    .bind(intent.provider)
    .bind(intent.fencing_token)
    .bind(intent.reconcile_after_ms)
    .fetch_one(&mut *tx)
    .await?;
    let mut detail =
        json!({"person_id": intent.person_id, "channel": intent.channel, "cycle": p.cycle, "step_index": p.step_index, "generation": intent.generation});
    if !p.step_key.is_empty() {
        detail["step_key"] = json!(p.step_key);
    }
    audit::record(tx, Entity::NotificationAttempt, &id.to_string(), "attempt.intent", None, Some("intent"), actor, detail).await?;
    Ok(id)
}

/// Locks an attempt for recording its send's result. Returns its status and
/// its alert's status (`None` for an attempt of a `notify` step).
pub async fn lock_for_result(tx: &mut PgConnection, id: Uuid) -> Result<(String, Option<String>), sqlx::Error> {
    sqlx::query_as(
        "SELECT n.status, a.status FROM wardcall.notification_attempts n LEFT JOIN wardcall.alerts a ON a.id = n.alert_id
          WHERE n.id = $1 FOR UPDATE OF n",
    )
    .bind(id)
    .fetch_one(tx)
    .await
}

/// The provider accepted the send: keeps its id (the first one recorded
/// wins), and moves an `intent` (or an `unknown` whose late answer arrived)
/// to `status`. Audited `attempt.requested` from an intent, else
/// `attempt.create_confirmed` (callbacks came first: a confirmation, not a transition).
pub async fn record_sent(tx: &mut PgConnection, id: Uuid, previous: &str, provider_id: &str, status: &str, actor: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE wardcall.notification_attempts
            SET provider_id = coalesce(provider_id, $2), requested_at = coalesce(requested_at, clock_timestamp()),
                status = CASE WHEN status IN ('intent','unknown') THEN $3 ELSE status END, updated_at = clock_timestamp()
          WHERE id = $1",
    )
    .bind(id)
    .bind(provider_id)
    .bind(status)
    .execute(&mut *tx)
    .await?;
    let id_text = id.to_string();
    if previous == "intent" {
        audit::record(tx, Entity::NotificationAttempt, &id_text, "attempt.requested", Some("intent"), Some(status), actor, json!({"provider_id": provider_id}))
            .await
    } else {
        let detail = json!({"provider_id": provider_id, "status": previous});
        audit::record(tx, Entity::NotificationAttempt, &id_text, "attempt.create_confirmed", None, None, actor, detail).await
    }
}

/// The provider refused the send for good: an `intent` becomes `failed` with
/// the refusal (no patient data in it). Returns whether it changed.
pub async fn record_refused(tx: &mut PgConnection, id: Uuid, error: &str, actor: &str) -> Result<bool, sqlx::Error> {
    let failed = sqlx::query(
        "UPDATE wardcall.notification_attempts SET status = 'failed', error = $2, ended_at = clock_timestamp(), updated_at = clock_timestamp()
          WHERE id = $1 AND status = 'intent'",
    )
    .bind(id)
    .bind(error)
    .execute(&mut *tx)
    .await?;
    if failed.rows_affected() == 1 {
        audit::record(tx, Entity::NotificationAttempt, &id.to_string(), "attempt.failed", Some("intent"), Some("failed"), actor, json!({"error": error}))
            .await?;
    }
    Ok(failed.rows_affected() == 1)
}

/// Adopts a send the provider has for an ambiguous intent (found in its
/// list): keeps `provider_id`, status `status`. Audited `attempt.reconciled`.
/// Returns false when another writer confirmed it first (nothing changed).
pub async fn adopt(tx: &mut PgConnection, id: Uuid, provider_id: &str, status: &str, actor: &str) -> Result<bool, sqlx::Error> {
    let adopted = sqlx::query(
        "UPDATE wardcall.notification_attempts SET provider_id = $2, status = $3, requested_at = coalesce(requested_at, clock_timestamp()),
                updated_at = clock_timestamp()
          WHERE id = $1 AND provider_id IS NULL AND status = 'intent'",
    )
    .bind(id)
    .bind(provider_id)
    .bind(status)
    .execute(&mut *tx)
    .await?;
    if adopted.rows_affected() == 1 {
        audit::record(
            tx,
            Entity::NotificationAttempt,
            &id.to_string(),
            "attempt.reconciled",
            Some("intent"),
            Some(status),
            actor,
            json!({"provider_id": provider_id, "rule": "found in the provider's list"}),
        )
        .await?;
    }
    Ok(adopted.rows_affected() == 1)
}

/// The re-send rule: an ambiguous intent the provider has no send for
/// becomes `unknown` (audited `attempt.outcome_unknown`), so a new
/// generation may be sent. Returns false when a late answer confirmed it
/// meanwhile (then nothing may be sent again).
pub async fn mark_unknown(tx: &mut PgConnection, id: Uuid, actor: &str) -> Result<bool, sqlx::Error> {
    let marked = sqlx::query(
        "UPDATE wardcall.notification_attempts SET status = 'unknown', updated_at = clock_timestamp(),
                error = 'send outcome unknown and no such send at the provider'
          WHERE id = $1 AND status = 'intent' AND provider_id IS NULL",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    if marked.rows_affected() == 1 {
        audit::record(
            tx,
            Entity::NotificationAttempt,
            &id.to_string(),
            "attempt.outcome_unknown",
            Some("intent"),
            Some("unknown"),
            actor,
            json!({"rule": "re-send", "provider_has_it": false}),
        )
        .await?;
    }
    Ok(marked.rows_affected() == 1)
}

/// Audits a provider failure that leaves the intent in place for the retry
/// (`attempt.provider_error`).
pub async fn audit_provider_error(tx: &mut PgConnection, id: Uuid, error: &str, actor: &str) -> Result<(), sqlx::Error> {
    audit::record(tx, Entity::NotificationAttempt, &id.to_string(), "attempt.provider_error", None, None, actor, json!({"error": error, "retry": true})).await
}

/// Audits that the provider refused the alert's text for its content and the
/// channel's short fallback text went instead (`attempt.content_refused`).
pub async fn audit_content_refused(tx: &mut PgConnection, id: Uuid, error: &str, actor: &str) -> Result<(), sqlx::Error> {
    audit::record(tx, Entity::NotificationAttempt, &id.to_string(), "attempt.content_refused", None, None, actor, json!({"error": error, "fallback": true}))
        .await
}

/// Which of `provider_ids` (of `provider`) an attempt already holds.
pub async fn known_provider_ids(pool: &sqlx::PgPool, provider: &str, provider_ids: &[String]) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT provider_id FROM wardcall.notification_attempts WHERE provider = $1 AND provider_id = ANY($2)")
        .bind(provider)
        .bind(provider_ids)
        .fetch_all(pool)
        .await
}

/// Other unconfirmed intents (or unknowns) on `channel` to the same address
/// within the last hour: any of them could own an unclaimed send at the
/// provider, so none is adopted.
pub async fn unconfirmed_rivals(pool: &sqlx::PgPool, destination: &str, except: Uuid, channel: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM wardcall.notification_attempts
          WHERE destination = $1 AND id <> $2 AND channel = $3 AND status IN ('intent','unknown') AND provider_id IS NULL
            AND created_at > clock_timestamp() - interval '1 hour'",
    )
    .bind(destination)
    .bind(except)
    .bind(channel)
    .fetch_one(pool)
    .await
}

/// The latest status of each person's text message at an escalation
/// position that is not acknowledged (the SMS fallback's state).
pub async fn unacknowledged_text_statuses(conn: &mut PgConnection, pos: Position<'_>) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT ON (person_id) status FROM wardcall.notification_attempts
          WHERE run_id = $1 AND step_key = $2 AND cycle = $3 AND step_index = $4 AND channel = 'sms' AND acknowledged_at IS NULL
          ORDER BY person_id, generation DESC",
    )
    .bind(pos.run)
    .bind(pos.step_key)
    .bind(pos.cycle)
    .bind(pos.step_index)
    .fetch_all(conn)
    .await
}

/// Provider ids of an alert's calls still ringing or connected and not the
/// one that acknowledged (to hang up after an acknowledgement).
pub async fn live_calls_of_alert(pool: &sqlx::PgPool, alert_id: Uuid) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT provider_id FROM wardcall.notification_attempts
          WHERE alert_id = $1 AND provider_id IS NOT NULL AND acknowledged_at IS NULL AND channel = 'voice'
            AND status IN ('requested','initiated','ringing','in-progress')",
    )
    .bind(alert_id)
    .fetch_all(pool)
    .await
}

/// Claims up to `limit` text messages sent within the last day whose final
/// status has not arrived by their `reconcile_after`, pushing it
/// `interval_ms` on (`FOR UPDATE SKIP LOCKED`: engines share the work).
/// Returns (attempt id, MessageSid).
pub async fn claim_texts_to_reconcile(pool: &sqlx::PgPool, limit: i64, interval_ms: i64) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    sqlx::query_as(
        "WITH due AS (
             SELECT id FROM wardcall.notification_attempts
              WHERE channel = 'sms' AND provider_id IS NOT NULL
                AND status IN ('requested','accepted','scheduled','queued','sending','sent')
                AND reconcile_after <= clock_timestamp() AND created_at > clock_timestamp() - interval '1 day'
              ORDER BY reconcile_after LIMIT $2 FOR UPDATE SKIP LOCKED)
         UPDATE wardcall.notification_attempts n SET reconcile_after = clock_timestamp() + $1 * interval '1 millisecond'
           FROM due WHERE n.id = due.id RETURNING n.id, n.provider_id",
    )
    .bind(interval_ms)
    .bind(limit)
    .fetch_all(pool)
    .await
}
