//! SQL of `wardcall.pending_write_backs` (migration 0015): write-backs left
//! out of a batch of send records, kept in the database until they are
//! written, so that an engine that stops (or loses the database) before it
//! runs them leaves them to another (DESIGN.md invariants 2 and 4). A row
//! holds the team's statement, the event payload it gets as `$1` (patient
//! data, as the run's `input` holds it; never logged) and the audit actor.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// How long (seconds) a kept write-back is left to the engine that kept it
/// before the call sweepers may take it too ([`due`]): that engine starts
/// running its batch's kept write-backs, one by one, as soon as the batch
/// commits.
pub const FIRST_SWEEP_AFTER_S: f64 = 5.0;
/// The longest wait (seconds) between two tries of a kept write-back whose
/// tries failed around the team's statement (the database unreachable): 1,
/// 2, 4, … seconds, then this.
pub const RETRY_MAX_S: f64 = 60.0;

/// A write-back of an attempt: the attempt whose details it gets as `$2`,
/// its hook's name (`on_call_placed`, …; for the log and the audit), the
/// team's statement and the event payload (`$1`). A batch of send records
/// runs them (`workflows::team_sql::write_back_attempts`) and keeps those
/// it left out ([`keep`]).
#[derive(Debug, Clone, Copy)]
pub struct AttemptWriteBack<'a> {
    pub attempt: Uuid,
    pub hook: &'a str,
    pub statement: &'a str,
    pub payload: &'a Value,
}

/// Keeps `items` in the caller's transaction (the batch that left them out),
/// in one statement; they are due for the call sweepers after
/// [`FIRST_SWEEP_AFTER_S`]. One already kept for the same attempt and hook
/// is left as it is.
///
/// Errors: a database error (the caller's transaction rolls back with it).
pub async fn keep(tx: &mut PgConnection, items: &[AttemptWriteBack<'_>], actor: &str) -> Result<(), sqlx::Error> {
    if items.is_empty() {
        return Ok(());
    }
    let attempts: Vec<Uuid> = items.iter().map(|i| i.attempt).collect();
    let hooks: Vec<&str> = items.iter().map(|i| i.hook).collect();
    let statements: Vec<&str> = items.iter().map(|i| i.statement).collect();
    let payloads: Vec<&Value> = items.iter().map(|i| i.payload).collect();
    sqlx::query(
        "INSERT INTO wardcall.pending_write_backs (attempt_id, hook, statement, payload, actor, next_try_at)
         SELECT a, h, s, p, $5, clock_timestamp() + make_interval(secs => $6)
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[]) AS t(a, h, s, p)
         ON CONFLICT (attempt_id, hook) DO NOTHING",
    )
    .bind(&attempts)
    .bind(&hooks)
    .bind(&statements)
    .bind(&payloads)
    .bind(actor)
    .bind(FIRST_SWEEP_AFTER_S)
    .execute(tx)
    .await?;
    Ok(())
}

/// A kept write-back taken to run ([`take`]).
#[derive(Debug, Clone)]
pub struct TakenWriteBack {
    pub statement: String,
    pub payload: Value,
    pub actor: String,
}

/// Takes the kept write-back of `attempt` and `hook` in the caller's
/// transaction: deletes its row and returns it. The deletion commits with
/// whatever the caller does with it (the write-back, or its audit row), so
/// it runs once; a rollback keeps it. `None`: another transaction holds it
/// (`SKIP LOCKED`: it is being run), or it is gone (run already).
///
/// Errors: a database error.
pub async fn take(tx: &mut PgConnection, attempt: Uuid, hook: &str) -> Result<Option<TakenWriteBack>, sqlx::Error> {
    let row: Option<(String, Value, String)> = sqlx::query_as(
        "DELETE FROM wardcall.pending_write_backs p
          WHERE (p.attempt_id, p.hook) = (SELECT attempt_id, hook FROM wardcall.pending_write_backs
                                           WHERE attempt_id = $1 AND hook = $2 FOR UPDATE SKIP LOCKED)
         RETURNING p.statement, p.payload, p.actor",
    )
    .bind(attempt)
    .bind(hook)
    .fetch_optional(tx)
    .await?;
    Ok(row.map(|(statement, payload, actor)| TakenWriteBack { statement, payload, actor }))
}

/// Tries after which a kept write-back that keeps failing around the team's
/// statement (e.g. a team's deferred trigger failing at the commit) is given
/// up ([`give_up`]): about an hour and a half of tries.
pub const TRIES_MAX: i32 = 100;

/// The oldest kept write-back due (`next_try_at` passed, not held by
/// another transaction), pushed on before it is returned (one autocommit
/// statement): its next try comes 2^tries seconds later, at most
/// [`RETRY_MAX_S`], so that one whose tries fail is not tried back to back.
/// Returns `(attempt, hook, tries)` (tries counted with this one) for
/// [`take`]; one at a time, so that a row waits for no other's try.
///
/// Errors: a database error.
pub async fn due(pool: &sqlx::PgPool) -> Result<Option<(Uuid, String, i32)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE wardcall.pending_write_backs p
            SET tries = p.tries + 1,
                next_try_at = clock_timestamp() + make_interval(secs => least(power(2, least(p.tries, 10)), $1))
           FROM (SELECT attempt_id, hook FROM wardcall.pending_write_backs
                  WHERE next_try_at <= clock_timestamp() ORDER BY next_try_at LIMIT 1 FOR UPDATE SKIP LOCKED) d
          WHERE p.attempt_id = d.attempt_id AND p.hook = d.hook
         RETURNING p.attempt_id, p.hook, p.tries",
    )
    .bind(RETRY_MAX_S)
    .fetch_optional(pool)
    .await
}

/// Gives up the kept write-back of `attempt` and `hook` after [`TRIES_MAX`]
/// failed tries: deletes it and audits `write_back.failed` on the attempt
/// with `{"hook", "error", "tries"}` (`error`: the last error, with no
/// value from the statement), in one statement. Returns whether it was
/// there (not held by another transaction).
///
/// Errors: a database error.
pub async fn give_up(pool: &sqlx::PgPool, attempt: Uuid, hook: &str, error: &str, actor: &str) -> Result<bool, sqlx::Error> {
    let gone: Option<i32> = sqlx::query_scalar(
        "WITH gone AS (
             DELETE FROM wardcall.pending_write_backs p
              WHERE (p.attempt_id, p.hook) = (SELECT attempt_id, hook FROM wardcall.pending_write_backs
                                               WHERE attempt_id = $1 AND hook = $2 FOR UPDATE SKIP LOCKED)
             RETURNING p.tries),
         audited AS (
             INSERT INTO wardcall.audit_records (entity, entity_id, action, actor, detail)
             SELECT 'notification_attempt', $1::text, 'write_back.failed', $4, jsonb_build_object('hook', $2::text, 'error', $3::text, 'tries', gone.tries)
               FROM gone)
         SELECT tries FROM gone",
    )
    .bind(attempt)
    .bind(hook)
    .bind(error)
    .bind(actor)
    .fetch_optional(pool)
    .await?;
    Ok(gone.is_some())
}

/// The write-backs kept longer than `older_than_s` seconds: how many, and
/// the age of the oldest (seconds), for `wardcall status` (a kept write-back
/// is normally written within seconds).
///
/// Errors: a database error.
pub async fn overdue(pool: &sqlx::PgPool, older_than_s: f64) -> Result<(i64, Option<f64>), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), extract(epoch FROM clock_timestamp() - min(deferred_at))::float8 FROM wardcall.pending_write_backs
          WHERE deferred_at < clock_timestamp() - make_interval(secs => $1)",
    )
    .bind(older_than_s)
    .fetch_one(pool)
    .await
}
