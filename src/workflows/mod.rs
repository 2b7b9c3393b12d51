//! Workflows: durable state machines executed by the runtime.
//!
//! A step reads the run's input, its state (JSON) and, after a wait, the wait's
//! outcome; it may perform side effects; it returns a [`Transition`]. The
//! runtime commits the new state and the transition atomically, fenced by the
//! lease's token, so a completed step never runs again. A step that crashes or
//! loses its lease before committing runs again from its start: steps whose
//! side effects reach the outside world record an intent first (see
//! `escalation.rs` and ARCHITECTURE.md, "Re-call rule").

/// The acknowledgement rules moved to [`crate::notify::acknowledgement`]
/// (every channel); this name is kept for existing paths.
pub use crate::notify::acknowledgement as call_events;
pub mod call_sweeper;
pub mod escalation;
pub mod script;

use crate::config::{Workflow, WorkflowKind};
use crate::runtime::store::ClaimedRun;
use crate::runtime::Engine;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a step asks the runtime to do next.
#[derive(Debug, Clone)]
pub enum Transition {
    /// Commit and go on with `step` at once, keeping the lease.
    Next { step: String },
    /// Sleep `delay_ms` milliseconds (a row with a due time), then run `step`.
    Sleep { step: String, delay_ms: i64 },
    /// Sleep until `epoch_ms` (milliseconds since the Unix epoch, UTC), then run `step`.
    SleepUntil { step: String, epoch_ms: i64 },
    /// Wait for signal `signal` at most `timeout_ms` milliseconds, then run
    /// `step` with the outcome in [`StepContext::wait_outcome`].
    Wait { step: String, signal: String, timeout_ms: i64 },
    /// The run is finished.
    Complete,
    /// The run is finished in the `failed` state with this error (no retry).
    Fail { error: String },
}

/// Why a step did not produce a transition.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Worth retrying with backoff (database hiccup, provider 5xx, timeout).
    #[error("{0:#}")]
    Retryable(anyhow::Error),
    /// Retrying cannot help; the run fails at once, keeping the error.
    #[error("{0:#}")]
    Permanent(anyhow::Error),
    /// This engine no longer holds the run; nothing more may be written.
    #[error("lease lost")]
    LeaseLost,
}

impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> Self {
        StepError::Retryable(e.into())
    }
}

/// Everything a step may use.
pub struct StepContext<'a> {
    pub engine: &'a Arc<Engine>,
    pub run: &'a ClaimedRun,
    pub workflow: &'a Workflow,
    /// The run's state; committed with the step's transition.
    pub state: &'a mut Value,
    pub lease_lost: &'a Arc<AtomicBool>,
}

impl StepContext<'_> {
    /// The outcome of the wait that preceded this step, if any:
    /// `{"signal": name, "payload": …}` or `{"timeout": true, "signal": name}`.
    pub fn wait_outcome(&self) -> Option<&Value> {
        self.run.wait_outcome.as_ref()
    }

    /// Fails fast when the lease renewal found the run taken over.
    pub fn check_lease(&self) -> Result<(), StepError> {
        if self.lease_lost.load(Ordering::SeqCst) {
            Err(StepError::LeaseLost)
        } else {
            Ok(())
        }
    }
}

/// Runs the current step of the context's run.
pub async fn run_step(ctx: &mut StepContext<'_>) -> Result<Transition, StepError> {
    match &ctx.workflow.kind {
        WorkflowKind::Script => script::run_step(ctx).await,
        WorkflowKind::Escalation(settings) => {
            let settings = settings.clone();
            escalation::run_step(ctx, &settings).await
        }
    }
}

/// Cancels a live run (API, CLI, tests): the run and its open alert become
/// `cancelled`, the workflow's `on_cancelled` write-back runs in the same
/// transaction, and the engines' call sweeper then ends the alert's ringing
/// and connected calls through the provider. Logged (run id and actor only).
///
/// Returns false when the run was not live (finished, or no such run).
/// Errors: a database error (nothing was changed).
pub async fn cancel_run(pool: &sqlx::PgPool, config: &crate::config::Config, run: uuid::Uuid, actor: &str, reason: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some(cancelled) = crate::runtime::store::cancel_run_in(&mut tx, run, actor, reason).await? else {
        return Ok(false);
    };
    if let (Some(alert), Some(WorkflowKind::Escalation(settings))) = (cancelled.alert, config.workflow(&cancelled.workflow).map(|w| &w.kind)) {
        escalation::write_back(
            &mut tx,
            settings.write_back.on_cancelled.as_deref(),
            "on_cancelled",
            &cancelled.input,
            escalation::WriteBackSubject::Alert(alert),
            actor,
        )
        .await?;
    }
    tx.commit().await?;
    tracing::info!(run = %run, actor, alert = ?cancelled.alert, "run cancelled");
    Ok(true)
}
