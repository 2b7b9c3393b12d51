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
/// attempts). The query's text, with the id as a literal (see
/// [`crate::store::attempts::details_query`]).
pub fn details_query(alert: Uuid) -> String {
    format!("SELECT wardcall.alert_details('{alert}'::uuid)")
}
