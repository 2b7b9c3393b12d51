//! SQL of `wardcall.outbox` from the emitting side: an event written by the
//! API, the CLI or an `emit` step, through the SQL function `wardcall.emit`
//! (migration 0001), exactly as a team's trigger or `SELECT wardcall.emit(…)`
//! writes one. The dispatcher's side (claiming rows into runs) is in
//! [`super::runs`] and the runtime.

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
