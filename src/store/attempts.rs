//! SQL of `wardcall.notification_attempts` as the sending side uses it (every
//! channel alike): intents, the recording of a send's result, adoption of a
//! send found at the provider, the re-send rule's `unknown` mark, and the
//! per-position reads of the escalation and the `notify` step. The webhook
//! side (statuses, keypresses, replies) is in `crate::notify::acknowledgement`.
//!
//! Every state change is audited in the same transaction, only if it happened.

use crate::store::audit::{self, Entity};
use serde_json::{json, Value};
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
    let mut detail =
        json!({"person_id": intent.person_id, "channel": intent.channel, "cycle": p.cycle, "step_index": p.step_index, "generation": intent.generation});
    if !p.step_key.is_empty() {
        detail["step_key"] = json!(p.step_key);
    }
    // One round trip: the intent and its audit row.
    sqlx::query_scalar(
        "WITH ins AS (
             INSERT INTO wardcall.notification_attempts
                 (alert_id, run_id, step_key, cycle, step_index, person_id, person_name, generation, channel, destination, provider, status,
                  fencing_token, reconcile_after)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'intent', $12, clock_timestamp() + $13 * interval '1 millisecond')
             RETURNING id),
         aud AS (
             INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT 'notification_attempt', ins.id::text, 'attempt.intent', NULL, 'intent', $14, $15 FROM ins)
         SELECT id FROM ins",
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
    .bind(actor)
    .bind(detail)
    .fetch_one(&mut *tx)
    .await
}

/// The provider accepted the send: keeps its id (the first one recorded
/// wins) and moves an `intent` (or an `unknown` whose late answer arrived)
/// to `status`, under the attempt's row lock. Audited `attempt.requested`
/// from an intent, else `attempt.create_confirmed`: from `unknown` to
/// `status` when it moved an `unknown`, without states when callbacks came
/// first (a confirmation, not a transition). One round trip. Returns the
/// attempt's previous status and its alert's status (`None` for a `notify`
/// step's).
pub async fn record_sent(conn: &mut PgConnection, id: Uuid, provider_id: &str, status: &str, actor: &str) -> Result<(String, Option<String>), sqlx::Error> {
    sqlx::query_as(
        "WITH prev AS (
             SELECT n.id, n.status, a.status AS alert_status FROM wardcall.notification_attempts n
               LEFT JOIN wardcall.alerts a ON a.id = n.alert_id
              WHERE n.id = $1 FOR UPDATE OF n),
         upd AS (
             UPDATE wardcall.notification_attempts n
                SET provider_id = coalesce(n.provider_id, $2), requested_at = coalesce(n.requested_at, clock_timestamp()),
                    status = CASE WHEN n.status IN ('intent','unknown') THEN $3 ELSE n.status END, updated_at = clock_timestamp()
               FROM prev WHERE n.id = prev.id
             RETURNING prev.status AS previous, prev.alert_status),
         aud AS (
             INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT 'notification_attempt', $1::text,
                    CASE WHEN previous = 'intent' THEN 'attempt.requested' ELSE 'attempt.create_confirmed' END,
                    CASE WHEN previous IN ('intent','unknown') THEN previous END, CASE WHEN previous IN ('intent','unknown') THEN $3 END, $4,
                    CASE WHEN previous = 'intent' THEN jsonb_build_object('provider_id', $2::text)
                         ELSE jsonb_build_object('provider_id', $2::text, 'status', previous) END
               FROM upd)
         SELECT previous, alert_status FROM upd",
    )
    .bind(id)
    .bind(provider_id)
    .bind(status)
    .bind(actor)
    .fetch_one(conn)
    .await
}

/// [`record_sent`] for many sends in one statement: `sends` are
/// `(attempt id, provider id, status)`; the attempts are locked in id order
/// (two batches, or a batch and a callback, never wait for each other in a
/// cycle). Returns, for each attempt found, its id, previous status and its
/// alert's status (`None` for a `notify` step's); an id without an attempt
/// is absent.
///
/// Errors: a database error (a unique violation when a provider id is
/// already another attempt's; nothing is written then).
pub async fn record_sent_many(conn: &mut PgConnection, sends: &[(Uuid, &str, &str)], actor: &str) -> Result<Vec<(Uuid, String, Option<String>)>, sqlx::Error> {
    let ids: Vec<Uuid> = sends.iter().map(|s| s.0).collect();
    let provider_ids: Vec<&str> = sends.iter().map(|s| s.1).collect();
    let statuses: Vec<&str> = sends.iter().map(|s| s.2).collect();
    sqlx::query_as(
        "WITH input AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[]) AS t(id, provider_id, status)),
         prev AS (
             SELECT n.id, n.status, a.status AS alert_status, i.provider_id AS sent_id, i.status AS sent_status
               FROM wardcall.notification_attempts n
               JOIN input i ON i.id = n.id
               LEFT JOIN wardcall.alerts a ON a.id = n.alert_id
              ORDER BY n.id
                FOR UPDATE OF n),
         upd AS (
             UPDATE wardcall.notification_attempts n
                SET provider_id = coalesce(n.provider_id, prev.sent_id), requested_at = coalesce(n.requested_at, clock_timestamp()),
                    status = CASE WHEN n.status IN ('intent','unknown') THEN prev.sent_status ELSE n.status END, updated_at = clock_timestamp()
               FROM prev WHERE n.id = prev.id
             RETURNING n.id, prev.status AS previous, prev.alert_status, prev.sent_id, prev.sent_status),
         aud AS (
             INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT 'notification_attempt', id::text,
                    CASE WHEN previous = 'intent' THEN 'attempt.requested' ELSE 'attempt.create_confirmed' END,
                    CASE WHEN previous IN ('intent','unknown') THEN previous END, CASE WHEN previous IN ('intent','unknown') THEN sent_status END, $4,
                    CASE WHEN previous = 'intent' THEN jsonb_build_object('provider_id', sent_id)
                         ELSE jsonb_build_object('provider_id', sent_id, 'status', previous) END
               FROM upd ORDER BY id)
         SELECT id, previous, alert_status FROM upd",
    )
    .bind(&ids)
    .bind(&provider_ids)
    .bind(&statuses)
    .bind(actor)
    .fetch_all(conn)
    .await
}

/// The provider refused the send for good: an `intent` becomes `failed` with
/// the refusal (no patient data in it), audited `attempt.failed`. One round
/// trip. Returns whether it changed.
pub async fn record_refused(conn: &mut PgConnection, id: Uuid, error: &str, actor: &str) -> Result<bool, sqlx::Error> {
    let changed: i64 = sqlx::query_scalar(
        "WITH upd AS (
             UPDATE wardcall.notification_attempts SET status = 'failed', error = $2, ended_at = clock_timestamp(), updated_at = clock_timestamp()
              WHERE id = $1 AND status = 'intent' RETURNING id),
         aud AS (
             INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT 'notification_attempt', $1::text, 'attempt.failed', 'intent', 'failed', $3, jsonb_build_object('error', $2::text) FROM upd)
         SELECT count(*) FROM upd",
    )
    .bind(id)
    .bind(error)
    .bind(actor)
    .fetch_one(conn)
    .await?;
    Ok(changed == 1)
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
/// provider, so none is adopted. `same_run_only`: only those of `except`'s
/// run count (texts: the provider's record carries the body, which tells
/// another alert's text apart; the same run's carry the same body).
pub async fn unconfirmed_rivals(pool: &sqlx::PgPool, destination: &str, except: Uuid, channel: &str, same_run_only: bool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM wardcall.notification_attempts
          WHERE destination = $1 AND id <> $2 AND channel = $3 AND status IN ('intent','unknown') AND provider_id IS NULL
            AND created_at > clock_timestamp() - interval '1 hour'
            AND (NOT $4 OR run_id = (SELECT run_id FROM wardcall.notification_attempts WHERE id = $2))",
    )
    .bind(destination)
    .bind(except)
    .bind(channel)
    .bind(same_run_only)
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

/// An attempt as a provider's event finds it (locked).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventAttempt {
    pub run_id: Uuid,
    /// The run's workflow and input (the event payload, a write-back's `$1`),
    /// read with the run's lock.
    #[sqlx(skip)]
    pub run_workflow: String,
    #[sqlx(skip)]
    pub run_input: serde_json::Value,
    /// `None` for a one-way message of a `notify` step.
    pub alert_id: Option<Uuid>,
    pub person_id: String,
    pub status: String,
    pub provider_id: Option<String>,
    pub answered_by: Option<String>,
    pub acknowledged: bool,
}

/// Opens an event's work on an attempt in the caller's transaction: locks the
/// run row first, then the attempt (the workers' lock order). Records
/// `provider_id` if the attempt had none (a send whose answer was lost: the
/// callback names it), unless another attempt of `provider` holds it (the
/// unique index would refuse the whole event, and a nurse's keypress with it).
/// `None`: no such attempt (a forged or stale callback URL).
pub async fn lock_for_event(tx: &mut PgConnection, attempt: Uuid, provider: &str, provider_id: Option<&str>) -> Result<Option<EventAttempt>, sqlx::Error> {
    let run_id: Option<Uuid> =
        sqlx::query_scalar("SELECT run_id FROM wardcall.notification_attempts WHERE id = $1").bind(attempt).fetch_optional(&mut *tx).await?;
    let Some(run_id) = run_id else { return Ok(None) };
    let (run_workflow, run_input) = crate::store::runs::lock_row_reading(tx, run_id).await?;
    let mut row: EventAttempt = sqlx::query_as(
        "SELECT run_id, alert_id, person_id, status, provider_id, answered_by, acknowledged_at IS NOT NULL AS acknowledged
           FROM wardcall.notification_attempts WHERE id = $1 FOR UPDATE",
    )
    .bind(attempt)
    .fetch_one(&mut *tx)
    .await?;
    (row.run_workflow, row.run_input) = (run_workflow, run_input);
    if let (None, Some(id)) = (&row.provider_id, provider_id) {
        sqlx::query(
            "UPDATE wardcall.notification_attempts SET provider_id = $2 WHERE id = $1 AND provider_id IS NULL
                AND NOT EXISTS (SELECT 1 FROM wardcall.notification_attempts o WHERE o.provider = $3 AND o.provider_id = $2)",
        )
        .bind(attempt)
        .bind(id)
        .bind(provider)
        .execute(&mut *tx)
        .await?;
    }
    Ok(Some(row))
}

/// Records an answering-machine verdict (the first one wins), audited
/// `attempt.answered_by`. One round trip.
pub async fn record_answered_by(tx: &mut PgConnection, attempt: Uuid, verdict: &str, actor: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH upd AS (
             UPDATE wardcall.notification_attempts SET answered_by = $2, updated_at = clock_timestamp() WHERE id = $1 AND answered_by IS NULL RETURNING id)
         INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
         SELECT 'notification_attempt', $1::text, 'attempt.answered_by', NULL, NULL, $3, jsonb_build_object('answered_by', $2::text) FROM upd",
    )
    .bind(attempt)
    .bind(verdict)
    .bind(actor)
    .execute(tx)
    .await?;
    Ok(())
}

/// Moves an attempt to the provider's `status` (the caller checked it is a
/// step forward), stamping `time_column` once (`initiated_at`, `ringing_at`,
/// `answered_at`, `ended_at`, or `None`) and keeping `error` if given;
/// audited `attempt.status` from `previous` with `detail`. One round trip.
#[allow(clippy::too_many_arguments)]
pub async fn advance_status(
    tx: &mut PgConnection,
    attempt: Uuid,
    previous: &str,
    status: &str,
    time_column: Option<&str>,
    error: Option<&str>,
    detail: serde_json::Value,
    actor: &str,
) -> Result<(), sqlx::Error> {
    let stamp = match time_column {
        Some(c @ ("initiated_at" | "ringing_at" | "answered_at" | "ended_at")) => format!(", {c} = coalesce({c}, clock_timestamp())"),
        _ => String::new(),
    };
    sqlx::query(&format!(
        "WITH upd AS (
             UPDATE wardcall.notification_attempts SET status = $2, error = coalesce($3, error){stamp}, updated_at = clock_timestamp()
              WHERE id = $1 RETURNING id)
         INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
         SELECT 'notification_attempt', $1::text, 'attempt.status', $4, $2, $5, $6 FROM upd"
    ))
    .bind(attempt)
    .bind(status)
    .bind(error)
    .bind(previous)
    .bind(actor)
    .bind(detail)
    .execute(tx)
    .await?;
    Ok(())
}

/// A call's progress status to record in one statement
/// ([`advance_progress`]), as `crate::notify::acknowledgement::apply_status`
/// decided it may be.
#[derive(Debug, Clone, Copy)]
pub struct ProgressUpdate<'a> {
    pub attempt: Uuid,
    /// The webhook's provider (`twilio`): the receipt's, and whose ids the
    /// attempt's `provider_id` must not duplicate.
    pub provider: &'a str,
    /// The delivery's idempotency token, when it has one: a receipt is
    /// recorded with an empty response, and a replay changes nothing.
    pub idempotency_token: Option<&'a str>,
    /// The provider's id of the call (Twilio's `CallSid`): the attempt must
    /// hold it, or none yet (then it is recorded, unless another attempt of
    /// `provider` holds it).
    pub provider_id: &'a str,
    /// The new status (`initiated`, `ringing`, `in-progress`).
    pub status: &'a str,
    /// The column stamped once: `initiated_at`, `ringing_at` or `answered_at`.
    pub time_column: &'a str,
    /// The statuses `status` moves forward from (those ranked below it, as
    /// the caller ranks them): any other status is left as it is.
    pub from_statuses: &'a [&'a str],
    /// Workflows whose runs' attempts must not take this path (those with an
    /// `on_call_status` write-back).
    pub excluded_workflows: &'a [&'a str],
    /// The audit actor (`webhook:twilio`, `reconciler:<engine>`).
    pub actor: &'a str,
}

/// What [`advance_progress`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressOutcome {
    /// Nothing was read into a decision and nothing was written: no such
    /// attempt, or it holds another provider id, or it holds none and the
    /// status would not move it, or its run's workflow is excluded. The
    /// caller takes the full path.
    NotApplicable,
    /// Recorded: the receipt (if a token was given and it was not a replay)
    /// and, when `changed`, the status, its time stamp, the provider id if it
    /// was missing, and the `attempt.status` audit row. `alert_open`: the
    /// attempt's alert was open when the statement read it (`true` for an
    /// attempt without an alert, a `notify` step's): a call that changed
    /// while its alert was closed may need ending (the call sweeper).
    Recorded { changed: bool, alert_open: bool },
}

/// Records a call's progress status in one statement, in autocommit (one
/// round trip): locks the attempt's row (and only it), claims the delivery's
/// receipt (`ON CONFLICT DO NOTHING`: a replay changes nothing), moves the
/// status forward if it is one of `from_statuses` (stamping `time_column`
/// once and recording `provider_id` if the attempt had none and no other
/// attempt of `provider` holds it), and audits `attempt.status` from the
/// previous status with `{"provider_id": …}`, all only if the attempt is
/// eligible (see [`ProgressOutcome::NotApplicable`]): a statement that does
/// not apply writes nothing, so the full path can follow it.
///
/// Locks: the attempt's row (`FOR UPDATE`, before anything is written), then
/// the receipt's key. The workers' lock order is run, then alert, then
/// attempts; this statement holds no run or alert lock, takes the attempt's
/// lock first and no row lock after it (the receipt is a new key whose only
/// rival is another delivery of the same webhook, which must hold this same
/// attempt's lock first; the run's row is read without a lock, for its
/// workflow; the attempt's run and alert keys do not change, so no foreign
/// key check locks them). A transaction that waits for it holds at most locks
/// that come before the attempt, and it waits for none of them: it cannot
/// close a cycle, so it cannot deadlock. (Recording a missing provider id may
/// wait on the unique index for a transaction giving the same id to another
/// attempt; that one holds only its own attempt, never this one.) Errors: a database error (e.g. a unique violation when
/// another attempt records the same provider id at the same moment; the
/// provider retries).
pub async fn advance_progress(pool: &sqlx::PgPool, p: &ProgressUpdate<'_>) -> Result<ProgressOutcome, sqlx::Error> {
    let stamp = match p.time_column {
        c @ ("initiated_at" | "ringing_at" | "answered_at" | "ended_at") => c,
        _ => return Ok(ProgressOutcome::NotApplicable),
    };
    let (eligible, changed, alert_open): (bool, bool, bool) = sqlx::query_as(&format!(
        "WITH att AS (
             SELECT n.id, n.status, n.alert_id FROM wardcall.notification_attempts n
              WHERE n.id = $1
                AND (n.provider_id = $3 OR (n.provider_id IS NULL AND n.status = ANY($6)))
                AND NOT EXISTS (SELECT 1 FROM wardcall.runs r WHERE r.id = n.run_id AND r.workflow = ANY($7))
                FOR UPDATE OF n),
         rec AS (
             INSERT INTO wardcall.webhook_receipts (provider, idempotency_token, attempt_id, response)
             SELECT $2, $4, att.id, '' FROM att WHERE $4::text IS NOT NULL
             ON CONFLICT DO NOTHING RETURNING 1),
         upd AS (
             UPDATE wardcall.notification_attempts n
                SET status = $5,
                    provider_id = CASE WHEN n.provider_id IS NOT NULL THEN n.provider_id
                                       WHEN EXISTS (SELECT 1 FROM wardcall.notification_attempts o WHERE o.provider = $2 AND o.provider_id = $3) THEN NULL
                                       ELSE $3 END,
                    {stamp} = coalesce(n.{stamp}, clock_timestamp()), updated_at = clock_timestamp()
               FROM att
              WHERE n.id = att.id AND n.status = ANY($6) AND ($4::text IS NULL OR EXISTS (SELECT 1 FROM rec))
             RETURNING att.status AS previous),
         aud AS (
             INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT 'notification_attempt', $1::text, 'attempt.status', previous, $5, $8, jsonb_build_object('provider_id', $3::text) FROM upd)
         SELECT EXISTS (SELECT 1 FROM att), EXISTS (SELECT 1 FROM upd),
                coalesce((SELECT a.status = 'open' FROM att JOIN wardcall.alerts a ON a.id = att.alert_id), true)"
    ))
    .bind(p.attempt)
    .bind(p.provider)
    .bind(p.provider_id)
    .bind(p.idempotency_token)
    .bind(p.status)
    .bind(p.from_statuses)
    .bind(p.excluded_workflows)
    .bind(p.actor)
    .fetch_one(pool)
    .await?;
    Ok(if eligible { ProgressOutcome::Recorded { changed, alert_open } } else { ProgressOutcome::NotApplicable })
}

/// Appends keypad `digits` to the attempt's record of keys pressed.
pub async fn append_digits(tx: &mut PgConnection, attempt: Uuid, digits: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE wardcall.notification_attempts SET digits = coalesce(digits, '') || $2, updated_at = clock_timestamp() WHERE id = $1")
        .bind(attempt)
        .bind(digits)
        .execute(tx)
        .await?;
    Ok(())
}

/// The person declined (pressed 2): audited `attempt.declined` by them.
pub async fn record_declined(tx: &mut PgConnection, attempt: Uuid, digits: &str, actor: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE wardcall.notification_attempts SET declined_at = coalesce(declined_at, clock_timestamp()), updated_at = clock_timestamp() WHERE id = $1",
    )
    .bind(attempt)
    .execute(&mut *tx)
    .await?;
    audit::record(tx, Entity::NotificationAttempt, &attempt.to_string(), "attempt.declined", None, None, actor, json!({"digits": digits})).await
}

/// Stamps the attempt through which an alert was acknowledged: its
/// acknowledgement time and, on `channel` `voice`, its answer time, else its
/// reply time.
pub async fn record_acknowledged(tx: &mut PgConnection, attempt: Uuid, channel: &str) -> Result<(), sqlx::Error> {
    let answered =
        if channel == "voice" { ", answered_at = coalesce(answered_at, clock_timestamp())" } else { ", replied_at = coalesce(replied_at, clock_timestamp())" };
    sqlx::query(&format!(
        "UPDATE wardcall.notification_attempts SET acknowledged_at = clock_timestamp(){answered}, updated_at = clock_timestamp() WHERE id = $1"
    ))
    .bind(attempt)
    .execute(tx)
    .await?;
    Ok(())
}

/// The newest attempt (any channel) to `destination`: (attempt, run, alert).
pub async fn newest_to(pool: &sqlx::PgPool, destination: &str) -> Result<Option<(Uuid, Uuid, Option<Uuid>)>, sqlx::Error> {
    sqlx::query_as("SELECT id, run_id, alert_id FROM wardcall.notification_attempts WHERE destination = $1 ORDER BY created_at DESC LIMIT 1")
        .bind(destination)
        .fetch_optional(pool)
        .await
}

/// The alert still open that was most recently texted to `destination`
/// (its newest `sms` attempt to that number whose status is not one of
/// `unanswerable`, the statuses of a text that did not arrive): (run,
/// alert). An alert that only called the number, or whose text failed, is
/// not one: a text reply answers a text the nurse received (a newer
/// alert's call or failed text must not take the reply meant for the text
/// of an older one).
pub async fn newest_open_alert_texted_to(pool: &sqlx::PgPool, destination: &str, unanswerable: &[&str]) -> Result<Option<(Uuid, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT n.run_id, n.alert_id FROM wardcall.notification_attempts n JOIN wardcall.alerts a ON a.id = n.alert_id
          WHERE n.destination = $1 AND n.channel = 'sms' AND n.status <> ALL($2) AND a.status = 'open' ORDER BY n.created_at DESC LIMIT 1",
    )
    .bind(destination)
    .bind(unanswerable)
    .fetch_optional(pool)
    .await
}

/// The person's newest text attempt of `alert` to `destination` whose
/// status is not one of `unanswerable`, locked: (attempt, person id).
pub async fn lock_text_attempt_of_alert_to(
    tx: &mut PgConnection,
    alert: Uuid,
    destination: &str,
    unanswerable: &[&str],
) -> Result<Option<(Uuid, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, person_id FROM wardcall.notification_attempts WHERE alert_id = $1 AND destination = $2 AND channel = 'sms' AND status <> ALL($3)
          ORDER BY created_at DESC LIMIT 1 FOR UPDATE",
    )
    .bind(alert)
    .bind(destination)
    .bind(unanswerable)
    .fetch_optional(tx)
    .await
}

/// Claims up to `limit` calls still live (or `unknown` with a call) whose
/// alert was acknowledged or cancelled, not asked to end within
/// `retry_ms`: stamps `hangup_requested_at`, audits
/// `attempt.hangup_requested`. Returns (attempt, provider id, alert status).
pub async fn claim_calls_to_end(pool: &sqlx::PgPool, limit: i64, retry_ms: i64, actor: &str) -> Result<Vec<(Uuid, String, String)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let to_end: Vec<(Uuid, String, String)> = sqlx::query_as(
        "WITH due AS (
             SELECT n.id, a.status AS alert_status FROM wardcall.notification_attempts n
               JOIN wardcall.alerts a ON a.id = n.alert_id
              WHERE (n.status IN ('intent','requested','initiated','ringing','in-progress')
                     OR (n.status = 'unknown' AND n.ended_at IS NULL))
                AND n.provider_id IS NOT NULL AND n.acknowledged_at IS NULL AND n.channel = 'voice'
                AND a.status IN ('acknowledged','cancelled')
                AND (n.hangup_requested_at IS NULL
                     OR n.hangup_requested_at < clock_timestamp() - $1 * interval '1 millisecond')
              ORDER BY n.created_at LIMIT $2
                FOR UPDATE OF n SKIP LOCKED)
         UPDATE wardcall.notification_attempts n SET hangup_requested_at = clock_timestamp()
           FROM due WHERE n.id = due.id
         RETURNING n.id, n.provider_id, due.alert_status",
    )
    .bind(retry_ms)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    for (id, _, alert_status) in &to_end {
        audit::record(
            &mut tx,
            Entity::NotificationAttempt,
            &id.to_string(),
            "attempt.hangup_requested",
            None,
            None,
            actor,
            json!({"alert_status": alert_status}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(to_end)
}

/// Claims up to `limit` calls past their `reconcile_after` without a final
/// status, pushing it `margin_ms` on (`FOR UPDATE SKIP LOCKED`). Returns
/// (attempt, provider id).
pub async fn claim_calls_to_reconcile(pool: &sqlx::PgPool, limit: i64, margin_ms: i64) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    sqlx::query_as(
        "WITH due AS (
             SELECT id FROM wardcall.notification_attempts
              WHERE (status IN ('requested','initiated','ringing','in-progress') OR (status = 'unknown' AND ended_at IS NULL))
                AND provider_id IS NOT NULL AND channel = 'voice'
                AND reconcile_after <= clock_timestamp()
              ORDER BY reconcile_after LIMIT $2 FOR UPDATE SKIP LOCKED)
         UPDATE wardcall.notification_attempts n
            SET reconcile_after = clock_timestamp() + $1 * interval '1 millisecond'
           FROM due WHERE n.id = due.id RETURNING n.id, n.provider_id",
    )
    .bind(margin_ms)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Marks `unknown` up to `limit` intents never confirmed whose run has
/// finished (nothing will send or reconcile them any more), audited
/// `attempt.outcome_unknown` (rule "run ended"). Returns how many.
pub async fn abandon_unconfirmed_intents(pool: &sqlx::PgPool, limit: i64, actor: &str) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let abandoned: Vec<Uuid> = sqlx::query_scalar(
        "WITH due AS (
             SELECT n.id FROM wardcall.notification_attempts n JOIN wardcall.runs r ON r.id = n.run_id
              WHERE n.status = 'intent' AND n.provider_id IS NULL AND n.reconcile_after <= clock_timestamp()
                AND r.status IN ('completed','failed','cancelled')
              LIMIT $1 FOR UPDATE OF n SKIP LOCKED)
         UPDATE wardcall.notification_attempts n
            SET status = 'unknown', error = 'never confirmed by the provider; the run has ended',
                ended_at = clock_timestamp(), updated_at = clock_timestamp()
           FROM due WHERE n.id = due.id RETURNING n.id",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    for id in &abandoned {
        audit::record(
            &mut tx,
            Entity::NotificationAttempt,
            &id.to_string(),
            "attempt.outcome_unknown",
            Some("intent"),
            Some("unknown"),
            actor,
            json!({"rule": "run ended"}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(abandoned.len())
}

/// Locks attempt `id` (`FOR UPDATE`) if nothing has settled it yet: not
/// acknowledged, declined or ended, and its alert (if it has one) still
/// open (the alert is read, not locked: the attempt is the last lock a
/// worker takes). Returns whether it was locked: a write-back left out of
/// its batch runs only then, so that it never lands after the call's or the
/// alert's later write-backs (callbacks lock the attempt first, and wait for
/// it meanwhile).
///
/// Errors: a database error.
pub async fn lock_if_unsettled(conn: &mut PgConnection, id: Uuid) -> Result<bool, sqlx::Error> {
    let locked: Option<bool> = sqlx::query_scalar(
        "SELECT true FROM wardcall.notification_attempts
          WHERE id = $1 AND acknowledged_at IS NULL AND declined_at IS NULL AND ended_at IS NULL
            AND NOT EXISTS (SELECT 1 FROM wardcall.alerts a WHERE a.id = notification_attempts.alert_id AND a.status <> 'open')
            FOR UPDATE OF notification_attempts",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(locked.is_some())
}

/// The details of each attempt of `ids` (as [`details_expression`] gives
/// one), in one statement, saving the connection's `statement_timeout` and
/// `lock_timeout` in `wardcall.saved_statement_timeout` and
/// `wardcall.saved_lock_timeout` (transaction-local) for a batch of
/// write-backs to put back. An id without an attempt is absent.
///
/// Errors: a database error.
pub async fn details_many(conn: &mut PgConnection, ids: &[Uuid]) -> Result<std::collections::HashMap<Uuid, Value>, sqlx::Error> {
    let rows: Vec<(Uuid, Value)> = sqlx::query_as(
        "WITH saved AS MATERIALIZED (
             SELECT set_config('wardcall.saved_statement_timeout', current_setting('statement_timeout'), true),
                    set_config('wardcall.saved_lock_timeout', current_setting('lock_timeout'), true))
         SELECT d.id, wardcall.attempt_details(d.id) || wardcall.attempt_recipient(d.id)
           FROM saved, unnest($1::uuid[]) AS d(id)
          WHERE EXISTS (SELECT 1 FROM wardcall.notification_attempts n WHERE n.id = d.id)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// What a write-back statement gets as `$2` for an attempt: the SQL
/// functions `wardcall.attempt_details` (alert, attempt, channel, statuses,
/// times, `acknowledged_via`) and `wardcall.attempt_recipient` (`person_id`,
/// `person_name`), merged into one JSON object. An SQL expression, with the
/// id as a literal (a UUID: nothing to escape), so that it can go in the
/// simple query that opens the write-back's savepoint (one round trip).
pub fn details_expression(attempt: Uuid) -> String {
    format!("wardcall.attempt_details('{attempt}'::uuid) || wardcall.attempt_recipient('{attempt}'::uuid)")
}
