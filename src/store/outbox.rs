//! SQL of `wardcall.outbox` from the emitting side: an event written by the
//! API, the CLI or an `emit` step, through the SQL function `wardcall.emit`
//! (migration 0001), exactly as a team's trigger or `SELECT wardcall.emit(…)`
//! writes one; and the dispatcher's side: claiming a batch of rows
//! ([`claim_batch`]), reading the rows a direct dispatch will claim
//! ([`peek_unprocessed`]) and marking the ones no workflow listens to.

use serde_json::Value;
use sqlx::PgConnection;

/// Writes `event` with `payload` (a JSON object) to the outbox; a repeated
/// `dedup_key` writes nothing. Returns the outbox id, or `None` for a
/// duplicate. Runs on `conn`, so inside the caller's transaction when it has
/// one (an `emit` step: its step's commit).
///
/// Errors: a database error (e.g. a NUL character in the payload).
pub async fn emit(conn: &mut PgConnection, event: &str, payload: &Value, dedup_key: Option<&str>) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT wardcall.emit($1, $2, $3)").bind(event).bind(payload).bind(dedup_key).fetch_one(conn).await
}

/// Claims up to `limit` unprocessed outbox rows for the dispatcher, events
/// of `critical_events` first, then by id, skipping rows another dispatcher
/// holds (`FOR UPDATE SKIP LOCKED`), and marks them processed by
/// `engine_id`, in the caller's transaction. Returns (id, event, payload,
/// source) per row.
pub async fn claim_batch(
    conn: &mut PgConnection,
    limit: i64,
    engine_id: &str,
    critical_events: &[String],
) -> Result<Vec<(i64, String, Value, String)>, sqlx::Error> {
    sqlx::query_as(
        "WITH crit AS (
             SELECT id FROM wardcall.outbox WHERE processed_at IS NULL AND event = ANY($3)
              ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED),
         rest AS (
             SELECT id FROM wardcall.outbox WHERE processed_at IS NULL AND id NOT IN (SELECT id FROM crit)
              ORDER BY id LIMIT greatest($1 - (SELECT count(*) FROM crit), 0) FOR UPDATE SKIP LOCKED),
         batch AS (SELECT id FROM crit UNION ALL SELECT id FROM rest)
         UPDATE wardcall.outbox o SET processed_at = clock_timestamp(), processed_by = $2
           FROM batch WHERE o.id = batch.id
         RETURNING o.id, o.event, o.payload, o.source",
    )
    .bind(limit)
    .bind(engine_id)
    .bind(critical_events)
    .fetch_all(conn)
    .await
}

/// A row of [`peek_unprocessed`]'s statement: a row of the events peeked
/// (none when there is none), and whether other events wait.
type PeekedRow = (Option<i64>, Option<String>, Option<Value>, bool);

/// The oldest unprocessed outbox rows of `events` (at most `limit`, by id),
/// read without a lock and without marking them: what a direct dispatch
/// ([`crate::store::runs::claim_into_runs`]) will try to claim, read first so
/// that their runs' keys are rendered and their first steps' reads start
/// before the claim. Also whether any unprocessed row of another event is
/// waiting (for the dispatcher's general batch). Returns
/// `(rows as (id, event, payload), others_waiting)`. One autocommit
/// statement (index `outbox_unprocessed`).
///
/// Errors: a database error.
pub async fn peek_unprocessed(conn: &mut PgConnection, events: &[String], limit: i64) -> Result<(Vec<(i64, String, Value)>, bool), sqlx::Error> {
    let rows: Vec<PeekedRow> = sqlx::query_as(
        "WITH direct AS (
             SELECT id, event, payload FROM wardcall.outbox
              WHERE processed_at IS NULL AND event = ANY($1) ORDER BY id LIMIT $2),
         others AS (
             SELECT EXISTS (SELECT 1 FROM wardcall.outbox WHERE processed_at IS NULL AND NOT (event = ANY($1))) AS waiting)
         SELECT direct.id, direct.event, direct.payload, others.waiting FROM others LEFT JOIN direct ON true ORDER BY direct.id",
    )
    .bind(events)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    let others = rows.first().is_some_and(|r| r.3);
    Ok((rows.into_iter().filter_map(|(id, event, payload, _)| Some((id?, event?, payload?))).collect(), others))
}

/// Marks outbox rows whose event no workflow listened to when dispatched
/// (`unrouted_at`): kept and counted, never deleted.
pub async fn mark_unrouted(conn: &mut PgConnection, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE wardcall.outbox SET unrouted_at = clock_timestamp() WHERE id = ANY($1)").bind(ids).execute(conn).await?;
    Ok(())
}
