//! Workflows: durable state machines executed by the runtime.
//!
//! A step reads the run's input, its state (JSON) and, after a wait, the wait's
//! outcome; it may perform side effects; it returns a [`Transition`]. The
//! runtime commits the new state and the transition atomically, fenced by the
//! lease's token, so a completed step never runs again. A step that crashes or
//! loses its lease before committing runs again from its start: steps whose
//! side effects reach the outside world record an intent first (see
//! `escalation.rs` and ARCHITECTURE.md, "Re-call rule").

pub mod call_events;
pub mod call_sweeper;
pub mod escalation;
pub mod flow;
pub mod model;
pub mod script;
pub mod team_sql;
pub mod validate;

use crate::config::{Workflow, WorkflowKind};
use crate::runtime::store::ClaimedRun;
use crate::runtime::Engine;
use model::{Phase, StepAddress};
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
    /// The run is finished in the `cancelled` state (after its `on_cancel` hook).
    Cancelled,
    /// Run the same step again after `delay_ms` milliseconds without counting
    /// an attempt (e.g. a circuit breaker is open: nothing was tried).
    Defer { delay_ms: i64 },
}

/// Work a step hands to the runtime to execute inside the transaction that
/// commits the step (fenced by the lease's token), so that it takes effect
/// exactly once with the step's completion.
#[derive(Debug, Clone)]
pub enum CommitWork {
    /// A `sql` step's statement over the team's tables ([`team_sql`]); with
    /// `keep`, its first returned row becomes variable `keep`.
    TeamSql { sql: String, keep: Option<String> },
    /// An `emit` step's event, written to the outbox with `wardcall.emit`
    /// (`dedup_key` makes a repeated commit impossible to double).
    Emit { event: String, payload: Value, dedup_key: String },
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
    /// Work to execute in the commit transaction of this step.
    pub in_commit: Vec<CommitWork>,
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
    match ctx.workflow.kind {
        WorkflowKind::Script => script::run_step(ctx).await,
        WorkflowKind::Steps | WorkflowKind::Escalation => flow::run_step(ctx).await,
    }
}

/// Whether runs of `w` are critical: claimed before any other due work and
/// dispatched first (DESIGN.md invariant 10): every workflow that escalates
/// (it pages people), and any marked `critical = true`.
pub fn is_critical(w: &Workflow) -> bool {
    w.critical || w.escalation().is_some()
}

/// Longest delay (ms) between retries of an escalation step: an alert keeps
/// being retried, at least this often, until someone can be called.
pub const ESCALATION_RETRY_CAP_MS: i64 = 15_000;

/// How a failing step is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryRule {
    /// Attempts before the step fails for good (`u32::MAX`: never).
    pub max_attempts: u32,
    /// Upper bound of the delay between attempts, in milliseconds, below the
    /// workflow's `retry_max_ms` (an escalation: [`ESCALATION_RETRY_CAP_MS`]).
    pub cap_ms: Option<i64>,
}

/// The retry rule of `step` (a `runs.step` value) of `w`: an `escalate` step
/// is never given up on (an alert is never dead-lettered; the config or the
/// provider may be fixed meanwhile) and retries at least every 15 s; any
/// other step gets the workflow's `max_attempts`.
pub fn retry_rule(w: &Workflow, step: &str) -> RetryRule {
    let escalating = StepAddress::parse(step).and_then(|a| w.phase_steps(a.phase).get(a.index).map(|s| s.escalate.is_some())).unwrap_or(false);
    if escalating {
        RetryRule { max_attempts: u32::MAX, cap_ms: Some(ESCALATION_RETRY_CAP_MS) }
    } else {
        RetryRule { max_attempts: w.max_attempts, cap_ms: None }
    }
}

/// Where a run goes when `step` has failed for good: the first step of the
/// workflow's `on_failure` hook, unless the run is already in a hook of
/// failure or cancellation (a hook that fails ends the run).
pub fn failure_hook(w: &Workflow, step: &str) -> Option<String> {
    if w.kind == WorkflowKind::Script || w.on_failure.is_empty() {
        return None;
    }
    let addr = StepAddress::parse(step)?;
    matches!(addr.phase, Phase::Main | Phase::OnComplete).then(|| StepAddress::first(Phase::OnFailure).render())
}

/// Where a cancelled run goes: the first step of its `on_cancel` hook, if it
/// has one and is not in a hook already.
pub fn cancel_hook(w: &Workflow, step: &str) -> Option<String> {
    if w.kind == WorkflowKind::Script || w.on_cancel.is_empty() {
        return None;
    }
    let addr = StepAddress::parse(step)?;
    matches!(addr.phase, Phase::Main | Phase::OnComplete).then(|| StepAddress::first(Phase::OnCancel).render())
}

/// A run's variables as steps see them (`$2`, `{name.…}`): the values
/// kept by its steps (`state.vars`), and in a hook of failure or
/// cancellation `ending` (`{"status": "failed", "error": …, "step": …}` or
/// `{"status": "cancelled"}`).
pub fn variables(state: &Value) -> Value {
    let mut vars = match state.get("vars") {
        Some(Value::Object(m)) => m.clone(),
        _ => serde_json::Map::new(),
    };
    if let Some(ending) = state.get("ending") {
        vars.insert("ending".into(), ending.clone());
    }
    Value::Object(vars)
}

/// Executes `work` inside the step's commit transaction, updating `state`
/// (a kept row becomes `state.vars[keep]`).
///
/// Errors: the statement's, as a [`StepError`]: permanent for a syntax,
/// schema, data or integrity error ([`team_sql::is_permanent`]), else
/// retryable. The caller rolls the transaction back.
pub async fn apply_commit_work(conn: &mut sqlx::PgConnection, input: &Value, state: &mut Value, work: &[CommitWork]) -> Result<(), StepError> {
    for w in work {
        let outcome = match w {
            CommitWork::TeamSql { sql, keep } => {
                let vars = variables(state);
                match team_sql::run_step_statement(conn, sql, keep.is_some(), input, &vars).await {
                    Ok(row) => {
                        if let Some(k) = keep {
                            if !state.is_object() {
                                *state = serde_json::json!({});
                            }
                            if !state.get("vars").is_some_and(Value::is_object) {
                                state["vars"] = serde_json::json!({});
                            }
                            state["vars"][k] = row;
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            CommitWork::Emit { event, payload, dedup_key } => {
                sqlx::query("SELECT wardcall.emit($1, $2, $3)").bind(event).bind(payload).bind(dedup_key).execute(&mut *conn).await.map(|_| ())
            }
        };
        if let Err(e) = outcome {
            let msg = crate::capture::db_message(&e);
            return Err(if team_sql::is_permanent(&e) {
                StepError::Permanent(anyhow::anyhow!("{msg}"))
            } else {
                StepError::Retryable(anyhow::anyhow!("{msg}"))
            });
        }
    }
    Ok(())
}

/// Cancels a live run (API, CLI, tests): see [`cancel_run_in`].
///
/// Returns false when the run was not live (finished, or no such run).
/// Errors: a database error (nothing was changed).
pub async fn cancel_run(pool: &sqlx::PgPool, config: &crate::config::Config, run: uuid::Uuid, actor: &str, reason: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let cancelled = cancel_run_in(&mut tx, config, run, actor, reason, false).await?;
    tx.commit().await?;
    Ok(cancelled)
}

/// Cancels a live run inside the caller's transaction (API, CLI,
/// `cancel_on`, `on_duplicate = "replace"`): the run and its open alert
/// become `cancelled`; a workflow with an `on_cancel` hook runs it first
/// (not when `replaced`); an escalation's `on_cancelled` write-back runs in
/// this transaction; the engines' call sweeper then ends the alert's ringing
/// and connected calls through the provider. Logged (run id and actor only).
///
/// Returns false when the run was not live. Errors: a database error.
pub async fn cancel_run_in(
    tx: &mut sqlx::PgConnection,
    config: &crate::config::Config,
    run: uuid::Uuid,
    actor: &str,
    reason: &str,
    replaced: bool,
) -> Result<bool, sqlx::Error> {
    let hook_for = |workflow: &str, step: &str| if replaced { None } else { config.workflow(workflow).and_then(|w| cancel_hook(w, step)) };
    let Some(cancelled) = crate::runtime::store::cancel_run_in(tx, run, actor, reason, replaced, &hook_for).await? else {
        return Ok(false);
    };
    if let (Some(alert), Some(settings)) = (cancelled.alert, config.workflow(&cancelled.workflow).and_then(|w| w.escalation())) {
        escalation::write_back(
            tx,
            settings.write_back.on_cancelled.as_deref(),
            "on_cancelled",
            &cancelled.input,
            escalation::WriteBackSubject::Alert(alert),
            actor,
        )
        .await?;
    }
    tracing::info!(run = %run, actor, replaced, alert = ?cancelled.alert, "run cancelled");
    Ok(true)
}
