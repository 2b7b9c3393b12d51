//! SQL of `wardcall.alerts` as the escalation uses it: opening an alert once
//! per run, its status under the row lock, the "nobody to call" alarm
//! (`nobody_since`), and the end of a policy. The webhook side
//! (acknowledgement) is in `crate::notify::acknowledgement`.
//!
//! Every state change is audited in the same transaction, only if it happened.

use crate::store::audit::{self, Entity};
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// An alert as the escalation reads it under its row lock.
#[derive(Debug, Clone)]
pub struct LockedAlert {
    pub id: Uuid,
    /// `open`, `acknowledged`, `unacknowledged`, `cancelled`.
    pub status: String,
    /// Whether the "nobody to call" alarm is raised.
    pub nobody_alarm: bool,
    /// Whether this transaction opened it (then no attempt of the run can
    /// exist yet: they are recorded with their alert's id, after it).
    pub opened_now: bool,
}

/// Fences the run and opens its alert, in one statement: locks the run row
/// if this execution still holds it with fencing `token` (as
/// [`crate::store::runs::lock_fenced`]), then opens the alert of `run` (once:
/// a later tier or a takeover finds it) with `message` (the rendered text;
/// patient data, never logged), audited `alert.opened`, or locks the
/// existing one (`FOR UPDATE`). Returns `None`, having changed nothing, when
/// the lease was lost.
///
/// One round trip for what took three (fence, insert, lock): the first
/// tier's call waits for it.
///
/// Errors: a database error.
pub async fn fence_and_open(
    conn: &mut PgConnection,
    run: Uuid,
    token: i64,
    workflow: &str,
    policy: &str,
    message: &str,
    actor: &str,
) -> Result<Option<LockedAlert>, sqlx::Error> {
    // `fence` is referenced twice, so it is evaluated once, first; `old`
    // reads the statement's snapshot, so it finds an alert committed by an
    // earlier execution, never the one `ins` adds.
    let row: (bool, Option<Uuid>, Option<Uuid>, Option<String>, Option<bool>) = sqlx::query_as(
        "WITH fence AS (
             SELECT id FROM wardcall.runs WHERE id = $1 AND fencing_token = $6 AND status = 'running' FOR UPDATE),
         ins AS (
             INSERT INTO wardcall.alerts (run_id, workflow, policy, message, status)
             SELECT $1, $2, $3, $4, 'open' FROM fence
             ON CONFLICT (run_id) DO NOTHING RETURNING id),
         aud AS (
             INSERT INTO wardcall.audit_log (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT 'alert', ins.id::text, 'alert.opened', NULL, 'open', $5, jsonb_build_object('run_id', $1::uuid, 'policy', $3::text) FROM ins),
         old AS (
             SELECT a.id, a.status, a.nobody_since IS NOT NULL AS nobody_alarm FROM wardcall.alerts a
              WHERE a.run_id = $1 AND EXISTS (SELECT 1 FROM fence) FOR UPDATE)
         SELECT EXISTS (SELECT 1 FROM fence), (SELECT id FROM ins), old.id, old.status, old.nobody_alarm
           FROM (SELECT) one LEFT JOIN old ON true",
    )
    .bind(run)
    .bind(workflow)
    .bind(policy)
    .bind(message)
    .bind(actor)
    .bind(token)
    .fetch_one(&mut *conn)
    .await?;
    Ok(match row {
        (false, ..) => None,
        (true, Some(id), ..) => Some(LockedAlert { id, status: "open".into(), nobody_alarm: false, opened_now: true }),
        (true, None, Some(id), Some(status), nobody_alarm) => Some(LockedAlert { id, status, nobody_alarm: nobody_alarm.unwrap_or(false), opened_now: false }),
        // Fenced, nothing inserted and nothing found: the alert was deleted
        // by hand between the two; refuse rather than guess.
        (true, None, ..) => return Err(sqlx::Error::RowNotFound),
    })
}

/// Locks an alert and returns its status.
pub async fn lock_status(conn: &mut PgConnection, alert: Uuid) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM wardcall.alerts WHERE id = $1 FOR UPDATE").bind(alert).fetch_one(conn).await
}

/// The alert's rendered message (patient data: never logged).
pub async fn message(pool: &PgPool, alert: Uuid) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT message FROM wardcall.alerts WHERE id = $1").bind(alert).fetch_one(pool).await
}

/// Raises the "nobody to call" alarm (`nobody_since`, listed by `wardcall
/// status`) of a locked alert, audited `alert.nobody_to_call` with `detail`.
/// Returns whether it was raised now (false: already raised).
pub async fn raise_nobody_alarm(conn: &mut PgConnection, alert: Uuid, detail: Value, actor: &str) -> Result<bool, sqlx::Error> {
    let first = sqlx::query("UPDATE wardcall.alerts SET nobody_since = clock_timestamp() WHERE id = $1 AND nobody_since IS NULL")
        .bind(alert)
        .execute(&mut *conn)
        .await?
        .rows_affected()
        > 0;
    if first {
        audit::record(conn, Entity::Alert, &alert.to_string(), "alert.nobody_to_call", Some("open"), Some("open"), actor, detail).await?;
    }
    Ok(first)
}

/// Clears the alarm (someone can be called again), audited
/// `alert.recipients_found`. Returns whether it was raised.
pub async fn clear_nobody_alarm(conn: &mut PgConnection, alert: Uuid, actor: &str) -> Result<bool, sqlx::Error> {
    let cleared =
        sqlx::query("UPDATE wardcall.alerts SET nobody_since = NULL WHERE id = $1 AND nobody_since IS NOT NULL").bind(alert).execute(&mut *conn).await?;
    if cleared.rows_affected() > 0 {
        audit::record(conn, Entity::Alert, &alert.to_string(), "alert.recipients_found", None, None, actor, json!({})).await?;
    }
    Ok(cleared.rows_affected() > 0)
}

/// The policy ran out without an acknowledgement: `open` →
/// `unacknowledged`, audited with `detail` (reason, cycles).
pub async fn mark_unacknowledged(conn: &mut PgConnection, alert: Uuid, detail: Value, actor: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE wardcall.alerts SET status = 'unacknowledged', updated_at = clock_timestamp() WHERE id = $1").bind(alert).execute(&mut *conn).await?;
    audit::record(conn, Entity::Alert, &alert.to_string(), "alert.unacknowledged", Some("open"), Some("unacknowledged"), actor, detail).await
}

/// Audits a step of an open alert's escalation that changes no column
/// (`alert.escalated`, `alert.step_ended`, `alert.tier_empty`,
/// `alert.recipients_resolved`) with `detail` (positions, counts, ids; never
/// names or numbers).
pub async fn audit_open(conn: &mut PgConnection, alert: Uuid, action: &str, detail: Value, actor: &str) -> Result<(), sqlx::Error> {
    audit::record(conn, Entity::Alert, &alert.to_string(), action, Some("open"), Some("open"), actor, detail).await
}

/// Open alerts whose policy yielded nobody to call, per policy: (policy id,
/// alerts, seconds since the oldest was found with nobody). For `wardcall status`.
pub async fn with_nobody_to_call(pool: &PgPool) -> Result<Vec<(String, i64, f64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT policy, count(*), extract(epoch FROM clock_timestamp() - min(nobody_since))::float8
           FROM wardcall.alerts WHERE status = 'open' AND nobody_since IS NOT NULL GROUP BY policy ORDER BY policy",
    )
    .fetch_all(pool)
    .await
}

/// Locks an alert and returns its status and message (patient data: never logged).
pub async fn lock_status_and_message(conn: &mut PgConnection, alert: Uuid) -> Result<(String, String), sqlx::Error> {
    sqlx::query_as("SELECT status, message FROM wardcall.alerts WHERE id = $1 FOR UPDATE").bind(alert).fetch_one(conn).await
}

/// The alert's message, if the alert exists.
pub async fn message_if_any(pool: &PgPool, alert: Option<Uuid>) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT message FROM wardcall.alerts WHERE id = $1").bind(alert).fetch_optional(pool).await
}

/// Acknowledges a locked alert by `person_id` through `channel` (`voice`,
/// `sms`), audited `alert.acknowledged` from `previous` by `person:<id>`
/// with `detail`.
pub async fn acknowledge(conn: &mut PgConnection, alert: Uuid, previous: &str, person_id: &str, channel: &str, detail: Value) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE wardcall.alerts SET status = 'acknowledged', acknowledged_at = clock_timestamp(), acknowledged_by = $2, acknowledged_via = $3,
                updated_at = clock_timestamp() WHERE id = $1",
    )
    .bind(alert)
    .bind(person_id)
    .bind(channel)
    .execute(&mut *conn)
    .await?;
    audit::record(conn, Entity::Alert, &alert.to_string(), "alert.acknowledged", Some(previous), Some("acknowledged"), &format!("person:{person_id}"), detail)
        .await
}

/// What a write-back statement gets as `$2` for an alert: the SQL function
/// `wardcall.alert_details` (status, times, who acknowledged and how,
/// attempts). An SQL expression, with the id as a literal (see
/// [`crate::store::attempts::details_expression`]).
pub fn details_expression(alert: Uuid) -> String {
    format!("wardcall.alert_details('{alert}'::uuid)")
}

/// One recipient of a fresh alert's first intents (see [`open_with_intents`]).
#[derive(Debug, Clone, Copy)]
pub struct FirstIntent<'a> {
    pub person_id: &'a str,
    /// The recipient's display name (for write-backs; never logged).
    pub person_name: &'a str,
    /// The address called (E.164 for voice; never logged).
    pub destination: &'a str,
}

/// A row of [`open_with_intents`]'s statement: fenced, the alert opened,
/// one recipient's person id and intent (absent when none was recorded).
type OpenedRow = (bool, Option<Uuid>, Option<String>, Option<Uuid>);

/// What [`open_with_intents`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenedWithIntents {
    /// The lease was lost: nothing was written.
    LeaseLost,
    /// The run already has its alert (a takeover or a retry): nothing was
    /// written; the caller takes the general path ([`fence_and_open`]).
    AlertExists,
    /// The alert is open with one intent per recipient: `(person_id,
    /// attempt id)`, every one of them.
    Opened { alert: Uuid, intents: Vec<(String, Uuid)> },
}

/// A run's first escalation step, in one autocommit statement: fences the
/// run (fencing `token`, as [`crate::store::runs::lock_fenced`]), opens its
/// alert with `message` (audited `alert.opened`) and records an intent at
/// generation 0 for each of `recipients` at position (`cycle`,
/// `step_index`) on `channel` through `provider`, to be reconciled
/// `reconcile_after_ms` milliseconds from now (audited `attempt.intent`,
/// person id, channel and position, never the address), with the audit rows
/// in that order. Nothing is written unless the run is fenced and has no
/// alert yet. The intents are committed when it returns (DESIGN.md
/// invariant 2: before their sends).
///
/// One round trip and one commit where the general path takes four round
/// trips (begin, fence and alert, intents, commit): the first call of every
/// alert waits for it.
///
/// Errors: a database error (e.g. a unique violation: the same person twice
/// in `recipients`).
#[allow(clippy::too_many_arguments)]
pub async fn open_with_intents(
    pool: &PgPool,
    run: Uuid,
    token: i64,
    workflow: &str,
    policy: &str,
    message: &str,
    (cycle, step_index): (i32, i32),
    channel: &str,
    provider: &str,
    reconcile_after_ms: i64,
    recipients: &[FirstIntent<'_>],
    actor: &str,
) -> Result<OpenedWithIntents, sqlx::Error> {
    let person_ids: Vec<&str> = recipients.iter().map(|r| r.person_id).collect();
    let names: Vec<&str> = recipients.iter().map(|r| r.person_name).collect();
    let destinations: Vec<&str> = recipients.iter().map(|r| r.destination).collect();
    // The audit rows go in one INSERT (alert first, then the intents in
    // recipient order), so that their ids keep the order of the events.
    let rows: Vec<OpenedRow> = sqlx::query_as(
        "WITH fence AS (
             SELECT id FROM wardcall.runs WHERE id = $1 AND fencing_token = $2 AND status = 'running' FOR UPDATE),
         alert AS (
             INSERT INTO wardcall.alerts (run_id, workflow, policy, message, status)
             SELECT $1, $3, $4, $5, 'open' FROM fence
             ON CONFLICT (run_id) DO NOTHING RETURNING id),
         intents AS (
             INSERT INTO wardcall.notification_attempts
                 (alert_id, run_id, step_key, cycle, step_index, person_id, person_name, generation, channel, destination, provider, status,
                  fencing_token, reconcile_after)
             SELECT alert.id, $1, '', $7, $8, p.person_id, p.person_name, 0, $9, p.destination, $10, 'intent', $2,
                    clock_timestamp() + $11 * interval '1 millisecond'
               FROM alert, unnest($12::text[], $13::text[], $14::text[]) WITH ORDINALITY AS p(person_id, person_name, destination, ord)
              ORDER BY p.ord
             RETURNING id, person_id),
         audited AS (
             INSERT INTO wardcall.audit_log (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT 'alert', alert.id::text, 'alert.opened', NULL, 'open', $6, jsonb_build_object('run_id', $1::uuid, 'policy', $4::text) FROM alert
             UNION ALL
             SELECT 'notification_attempt', intents.id::text, 'attempt.intent', NULL, 'intent', $6,
                    jsonb_build_object('person_id', intents.person_id, 'channel', $9::text, 'cycle', $7::int, 'step_index', $8::int, 'generation', 0)
               FROM intents)
         SELECT f.fenced, (SELECT id FROM alert), i.person_id, i.id
           FROM (SELECT EXISTS (SELECT 1 FROM fence) AS fenced) f LEFT JOIN intents i ON true",
    )
    .bind(run)
    .bind(token)
    .bind(workflow)
    .bind(policy)
    .bind(message)
    .bind(actor)
    .bind(cycle)
    .bind(step_index)
    .bind(channel)
    .bind(provider)
    .bind(reconcile_after_ms)
    .bind(&person_ids)
    .bind(&names)
    .bind(&destinations)
    .fetch_all(pool)
    .await?;
    let Some((fenced, alert, ..)) = rows.first().cloned() else { return Err(sqlx::Error::RowNotFound) };
    Ok(match (fenced, alert) {
        (false, _) => OpenedWithIntents::LeaseLost,
        (true, None) => OpenedWithIntents::AlertExists,
        (true, Some(alert)) => OpenedWithIntents::Opened { alert, intents: rows.into_iter().filter_map(|(_, _, person, id)| Some((person?, id?))).collect() },
    })
}
