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

pub mod escalation;
pub mod flow;
pub mod model;
pub mod script;
pub mod team_sql;
pub mod validate;

use crate::config::{Workflow, WorkflowKind};
pub use crate::runtime::step::{CommitWork, RetryRule, StepContext, StepError, Transition};
use futures_util::future::BoxFuture;
use model::{Phase, StepAddress};
use serde_json::Value;

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

/// Whether `run`'s current step needs no I/O, parks or ends the run, and so
/// may run inside the claim that wakes it
/// ([`crate::runtime::step::WorkflowHost::runs_in_claim`]): in a script, a
/// `sleep` or `sleep_until` element, the last element when it is a `step`,
/// or the end of the script; in a list of steps, a `sleep`, a `sleep_until`
/// with a template instant (one computed by SQL runs a team's query), an
/// `emit` that ends the run, or the end of a phase that ends the run. Never a step of a critical workflow (it is claimed
/// with a lease, first) nor a run resolving a wait.
pub fn runs_in_claim(w: &Workflow, run: &crate::store::runs::ClaimedRun) -> bool {
    if is_critical(w) || run.wait_signal.is_some() {
        return false;
    }
    match w.kind {
        WorkflowKind::Script => script::runs_in_claim(run),
        WorkflowKind::Steps | WorkflowKind::Escalation => flow::runs_in_claim(w, run),
    }
}

/// Longest delay (ms) between retries of an escalation step: an alert keeps
/// being retried, at least this often, until someone can be called.
pub const ESCALATION_RETRY_CAP_MS: i64 = 15_000;

/// The retry rule of `step` (a `runs.step` value) of `w`: an `escalate` step
/// is never given up on (an alert is never dead-lettered; the config or the
/// provider may be fixed meanwhile) and retries at least every 15 s; an
/// `http` step gets its own `retry.max_attempts`; any other step gets the
/// workflow's `max_attempts`.
pub fn retry_rule(w: &Workflow, step: &str) -> RetryRule {
    let config = StepAddress::parse(step).and_then(|a| w.phase_steps(a.phase).get(a.index));
    match config {
        Some(s) if s.escalate.is_some() => RetryRule { max_attempts: u32::MAX, cap_ms: Some(ESCALATION_RETRY_CAP_MS) },
        // An http step's own retry policy (its delays come with the error).
        Some(s) if s.http.is_some() => RetryRule { max_attempts: s.http.as_ref().map_or(w.max_attempts, |h| h.retry.max_attempts), cap_ms: None },
        _ => RetryRule { max_attempts: w.max_attempts, cap_ms: None },
    }
}

/// Where a run goes when `step` has failed for good: the first step of the
/// workflow's `on_failure` hook, unless the run is already in a hook of
/// failure or cancellation (a hook that fails ends the run).
///
/// In a workflow that escalates, a step before the `escalate` step that
/// fails for good (a write-back with a bad cast, an endpoint that is down)
/// does not stop the alert: the run goes on at the `escalate` step
/// (invariant 10; audited `run.failing` with the step it jumps to).
pub fn failure_hook(w: &Workflow, step: &str) -> Option<String> {
    if w.kind == WorkflowKind::Script {
        return None;
    }
    let addr = StepAddress::parse(step)?;
    if addr.phase == Phase::Main {
        if let Some(e) = w.steps.iter().position(|s| s.escalate.is_some()) {
            if addr.index < e {
                return Some(StepAddress { phase: Phase::Main, index: e, sub: String::new() }.render());
            }
        }
    }
    if w.on_failure.is_empty() {
        return None;
    }
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

/// A `sql` step's statement over the team's tables ([`team_sql`]), run in
/// the step's commit transaction; with `keep`, its first returned row becomes
/// variable `keep` (`state.vars[keep]`).
#[derive(Debug, Clone)]
pub struct TeamSqlWork {
    pub sql: String,
    pub keep: Option<String>,
}

/// An `emit` step's event, written to the outbox with `wardcall.emit` in the
/// step's commit transaction (`dedup_key` makes a repeated commit impossible
/// to double).
#[derive(Debug, Clone)]
pub struct EmitWork {
    pub event: String,
    pub payload: Value,
    pub dedup_key: String,
}

fn statement_error(e: sqlx::Error) -> StepError {
    let msg = crate::capture::db_message(&e);
    if team_sql::is_permanent(&e) {
        StepError::Permanent(anyhow::anyhow!("{msg}"))
    } else {
        StepError::Retryable(anyhow::anyhow!("{msg}"))
    }
}

impl CommitWork for TeamSqlWork {
    /// Errors: permanent for a syntax, schema, data or integrity error
    /// ([`team_sql::is_permanent`]), else retryable.
    fn apply<'a>(&'a self, conn: &'a mut sqlx::PgConnection, input: &'a Value, state: &'a mut Value) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            let vars = variables(state);
            let row = team_sql::run_step_statement(conn, &self.sql, self.keep.is_some(), input, &vars).await.map_err(statement_error)?;
            if let Some(k) = &self.keep {
                if !state.is_object() {
                    *state = serde_json::json!({});
                }
                if !state.get("vars").is_some_and(Value::is_object) {
                    state["vars"] = serde_json::json!({});
                }
                state["vars"][k] = row;
            }
            Ok(())
        })
    }
}

impl CommitWork for EmitWork {
    fn apply<'a>(&'a self, conn: &'a mut sqlx::PgConnection, _input: &'a Value, _state: &'a mut Value) -> BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move {
            crate::store::outbox::emit(conn, &self.event, &self.payload, Some(&self.dedup_key)).await.map_err(statement_error)?;
            Ok(())
        })
    }
}

/// The workflows as the runtime sees them ([`crate::runtime::step::WorkflowHost`]).
pub struct Host;

impl crate::runtime::step::WorkflowHost for Host {
    fn run_step<'a, 'c: 'a>(&'a self, ctx: &'a mut StepContext<'c>) -> BoxFuture<'a, Result<Transition, StepError>> {
        Box::pin(run_step(ctx))
    }
    fn is_critical(&self, w: &Workflow) -> bool {
        is_critical(w)
    }
    fn runs_in_claim(&self, w: &Workflow, run: &crate::store::runs::ClaimedRun) -> bool {
        runs_in_claim(w, run)
    }
    fn retry_rule(&self, w: &Workflow, step: &str) -> RetryRule {
        retry_rule(w, step)
    }
    fn failure_hook(&self, w: &Workflow, step: &str) -> Option<String> {
        failure_hook(w, step)
    }
    fn cancel_run_in<'a>(
        &'a self,
        conn: &'a mut sqlx::PgConnection,
        config: &'a crate::config::Config,
        run: uuid::Uuid,
        actor: &'a str,
        reason: &'a str,
        replaced: bool,
    ) -> BoxFuture<'a, Result<bool, sqlx::Error>> {
        Box::pin(cancel_run_in(conn, config, run, actor, reason, replaced))
    }
    fn keyed_routes(&self, w: &Workflow, event: &str) -> Vec<(String, crate::runtime::step::KeyedRoute)> {
        use crate::runtime::step::KeyedRoute;
        let mut routes: Vec<(String, KeyedRoute)> =
            w.cancel_on.iter().filter(|c| c.event == event).filter_map(|c| c.key.clone().or_else(|| w.key.clone())).map(|k| (k, KeyedRoute::Cancel)).collect();
        for (_, _, s) in w.all_steps() {
            if let Some(wait) = s.wait.as_ref().filter(|wait| wait.event.as_deref() == Some(event)) {
                if let Some(k) = wait.key.clone().or_else(|| w.key.clone()) {
                    routes.push((k, KeyedRoute::Signal));
                }
            }
        }
        routes.dedup();
        routes
    }
    fn background_tasks(&self, services: crate::runtime::Services) -> Vec<BoxFuture<'static, ()>> {
        vec![Box::pin(crate::notify::call_sweeper::run(services))]
    }
    fn prefetch_first_step(
        &self,
        services: &crate::runtime::Services,
        w: &Workflow,
        input: &Value,
    ) -> Option<BoxFuture<'static, Box<dyn std::any::Any + Send>>> {
        escalation::prefetch_lookups(services, w, input)
    }
    fn first_tier_at_dispatch(&self, services: &crate::runtime::Services, w: &Workflow) -> Option<crate::store::alerts::TierIntents> {
        escalation::tier_at_dispatch(services, w)
    }
    fn records_state_changes(&self, w: &Workflow, _run: &crate::store::runs::ClaimedRun) -> bool {
        w.kind == WorkflowKind::Script
    }
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
    let Some(cancelled) = crate::store::runs::cancel_run_in(tx, run, actor, reason, replaced, &hook_for).await? else {
        return Ok(false);
    };
    if let (Some(alert), Some(settings)) = (cancelled.alert, config.workflow(&cancelled.workflow).and_then(|w| w.escalation())) {
        team_sql::write_back(
            tx,
            settings.write_back.on_cancelled.as_deref(),
            "on_cancelled",
            &cancelled.input,
            team_sql::WriteBackSubject::Alert(alert),
            actor,
        )
        .await?;
    }
    tracing::info!(run = %run, actor, replaced, alert = ?cancelled.alert, "run cancelled");
    Ok(true)
}
