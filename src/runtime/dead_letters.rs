//! Dead letters: runs that failed (retries exhausted, or a failure retrying
//! cannot help), listed by the view `wardcall.dead_letters` and by
//! `wardcall status`, and put back by `wardcall retry <run-id>` and
//! `POST /api/runs/{id}/retry`, which share [`retry`].

use crate::store::runs::{self as store, RetryResult};
use sqlx::PgPool;
use uuid::Uuid;

/// Retries a dead letter: the run goes back to `pending` at the step it
/// failed at, with `step_attempt` 0, due at once, audited `run.retried` with
/// `actor` (`cli`, `api`), in one transaction ([`store::retry_failed_run_in`]);
/// the engines are woken. Logged with the run id, the step and the actor.
///
/// Returns what happened: retried, not failed (its status), or no such run.
/// Errors: a database error (nothing was changed).
pub async fn retry(pool: &PgPool, run: Uuid, actor: &str) -> Result<RetryResult, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let result = store::retry_failed_run_in(&mut tx, run, actor).await?;
    tx.commit().await?;
    if let RetryResult::Retried { step, previous_attempts } = &result {
        tracing::info!(run = %run, step = %step, previous_attempts, actor, "dead letter retried");
    }
    Ok(result)
}
