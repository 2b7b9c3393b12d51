//! Executes a workflow written as a list of steps ([`super::model`]).
//!
//! A run's position is a [`StepAddress`] in `runs.step`; its variables are
//! `state.vars` (`{name: value}`); when it is ending through a hook,
//! `state.ending` says how it ends (`{"status": "failed", "error": …}` or
//! `{"status": "cancelled"}`), set by the runtime's store when it moved the
//! run into `on_failure` or `on_cancel`.
//!
//! Exactly-once effects: a `sql` step's statement and an `emit` step's event
//! are handed to the runtime as [`CommitWork`], executed in the transaction
//! that commits the step (fenced by the lease's token); a step that crashes
//! before that commit runs again and its statement has not taken effect.

use super::model::{InstantSpec, OnTimeout, Phase, StepAddress, StepKind};
use super::{EmitWork, StepContext, StepError, TeamSqlWork, Transition};
use crate::template::Template;
use anyhow::anyhow;
use serde_json::{json, Value};
use std::collections::HashMap;

pub use crate::runtime::step::event_signal;

fn vars(state: &Value) -> Value {
    super::variables(state)
}

fn keep(state: &mut Value, name: &str, value: Value) {
    if !state.is_object() {
        *state = json!({});
    }
    if !state.get("vars").is_some_and(Value::is_object) {
        state["vars"] = json!({});
    }
    state["vars"][name] = value;
}

/// Whether an instant (ms since the Unix epoch) can be slept until: from
/// 1970 to the end of 9999 (`infinity` and the like are refused).
fn in_range(epoch_ms: i64) -> bool {
    (0..253_402_300_800_000).contains(&epoch_ms)
}

/// Where a run goes when `phase` has no more steps.
fn end_of_phase(ctx: &StepContext<'_>, phase: Phase) -> Transition {
    match phase {
        Phase::Main if !ctx.workflow.on_complete.is_empty() => Transition::Next { step: StepAddress::first(Phase::OnComplete).render() },
        Phase::Main | Phase::OnComplete => Transition::Complete,
        Phase::OnFailure => {
            let error = ctx.state.pointer("/ending/error").and_then(Value::as_str).unwrap_or("failed").to_string();
            Transition::Fail { error }
        }
        Phase::OnCancel => Transition::Cancelled,
    }
}

/// Where a run goes once the step at `addr` is done: the next step of its
/// phase, or, when that step was the phase's last, the end of the phase
/// ([`end_of_phase`]) in the same transition. Ending in the last step's own
/// transition saves each run a row version, an audit row and a commit: after
/// a `Next` to a step that does not exist, the worker ran once more only to
/// find that nothing was left and commit the ending on its own.
fn after(ctx: &StepContext<'_>, addr: &StepAddress) -> Transition {
    if ctx.workflow.phase_steps(addr.phase).get(addr.index + 1).is_some() {
        Transition::Next { step: addr.next().render() }
    } else {
        end_of_phase(ctx, addr.phase)
    }
}

/// Whether the run's current step needs no I/O and parks or ends the run
/// ([`super::runs_in_claim`]): a `sleep`, a `sleep_until` with a template
/// instant, an `emit` that ends the run (its event is written with the
/// claim), or the end of a phase that ends the run. A `wait`, a `sql`
/// step (a team's statement), a `sleep_until` computed by SQL and every step
/// that reaches a provider or an endpoint run on a worker.
pub fn runs_in_claim(w: &crate::config::Workflow, run: &crate::store::runs::ClaimedRun) -> bool {
    let Some(addr) = StepAddress::parse(&run.step) else { return false };
    // Where the phase's end leads: a `Next` (into `on_complete`) runs on a worker.
    let phase_ends_the_run = addr.phase != Phase::Main || w.on_complete.is_empty();
    let Some(step) = w.phase_steps(addr.phase).get(addr.index) else { return phase_ends_the_run };
    let last = w.phase_steps(addr.phase).get(addr.index + 1).is_none();
    match step.kind() {
        Ok(StepKind::Sleep(_) | StepKind::SleepUntil(InstantSpec::Template(_))) => true,
        // An emit goes on to the next step unless it ends the run.
        Ok(StepKind::Emit(_)) => last && phase_ends_the_run,
        _ => false,
    }
}

/// Runs the current step of a run of a workflow of kind `steps`.
pub async fn run_step(ctx: &mut StepContext<'_>) -> Result<Transition, StepError> {
    let addr = StepAddress::parse(&ctx.run.step).ok_or_else(|| StepError::Permanent(anyhow!("'{}' is not a step of a list of steps", ctx.run.step)))?;
    let Some(step) = ctx.workflow.phase_steps(addr.phase).get(addr.index).cloned() else {
        return Ok(end_of_phase(ctx, addr.phase));
    };
    let kind = step.kind().map_err(|p| StepError::Permanent(anyhow!(p)))?;
    let next = addr.next().render();
    let payload = ctx.run.input.clone();
    match kind {
        StepKind::Sql(sql) => {
            ctx.in_commit.push(Box::new(TeamSqlWork { sql: sql.to_string(), keep: step.keep.clone() }));
            Ok(after(ctx, &addr))
        }
        StepKind::Sleep(d) => {
            let delay_ms = super::model::parse_duration_ms(d).map_err(|p| StepError::Permanent(anyhow!(p)))?;
            Ok(Transition::Sleep { step: next, delay_ms })
        }
        StepKind::SleepUntil(InstantSpec::Template(t)) => {
            let template = Template::parse(t).map_err(|p| StepError::Permanent(anyhow!(p)))?;
            let rendered = template.render_with(&payload, &HashMap::new(), &vars(ctx.state));
            // The value is not put in the error: it comes from the team's row.
            let at: jiff::Timestamp = rendered
                .trim()
                .parse()
                .map_err(|_| StepError::Permanent(anyhow!("sleep_until: the template does not render an RFC 3339 instant with an offset")))?;
            if !in_range(at.as_millisecond()) {
                return Err(StepError::Permanent(anyhow!("sleep_until: the instant is out of range (before 1970 or after 9999)")));
            }
            Ok(Transition::SleepUntil { step: next, epoch_ms: at.as_millisecond() })
        }
        StepKind::SleepUntil(InstantSpec::Sql { sql }) => match super::team_sql::query_instant(&ctx.services.pool, sql, &payload, &vars(ctx.state)).await {
            Ok(Some(epoch_ms)) if in_range(epoch_ms) => Ok(Transition::SleepUntil { step: next, epoch_ms }),
            Ok(Some(_)) => Err(StepError::Permanent(anyhow!("sleep_until: the query returned an instant out of range (before 1970 or after 9999)"))),
            Ok(None) => Err(StepError::Permanent(anyhow!("sleep_until: the query returned no instant (no row, or NULL)"))),
            Err(e) if super::team_sql::is_permanent(&e) => Err(StepError::Permanent(anyhow!("sleep_until: {}", crate::capture::db_message(&e)))),
            Err(e) => Err(StepError::Retryable(anyhow!("sleep_until: {}", crate::capture::db_message(&e)))),
        },
        StepKind::Wait(wait) => {
            let signal = match (&wait.signal, &wait.event) {
                (Some(s), _) => s.clone(),
                (None, Some(e)) => event_signal(e),
                (None, None) => return Err(StepError::Permanent(anyhow!("wait needs a signal or an event"))),
            };
            if addr.sub != "resume" {
                let timeout_ms = super::model::parse_duration_ms(&wait.timeout).map_err(|p| StepError::Permanent(anyhow!(p)))?;
                return Ok(Transition::Wait { step: addr.with_sub("resume").render(), signal, timeout_ms });
            }
            let outcome = ctx.wait_outcome().cloned().unwrap_or(Value::Null);
            let timed_out = outcome.get("timeout").and_then(Value::as_bool).unwrap_or(false);
            if timed_out {
                if let Some(k) = &step.keep {
                    keep(ctx.state, k, Value::Null);
                }
                return match wait.on_timeout {
                    OnTimeout::Continue => Ok(after(ctx, &addr)),
                    OnTimeout::Fail => Err(StepError::Permanent(anyhow!("wait for {signal} timed out"))),
                    OnTimeout::Complete => Ok(end_of_phase(ctx, Phase::Main)),
                };
            }
            if let Some(k) = &step.keep {
                keep(ctx.state, k, outcome.get("payload").cloned().unwrap_or(Value::Null));
            }
            Ok(after(ctx, &addr))
        }
        StepKind::Emit(emit) => {
            let vars = vars(ctx.state);
            let render = |text: &str| -> Value {
                let Ok(t) = Template::parse(text) else { return Value::String(text.to_string()) };
                match t.single_field() {
                    Some(f) => crate::template::lookup_path(&payload, &vars, f).cloned().unwrap_or(Value::Null),
                    None => Value::String(t.render_with(&payload, &HashMap::new(), &vars)),
                }
            };
            let body: serde_json::Map<String, Value> = emit.payload.iter().map(|(k, v)| (k.clone(), super::model::render_json_template(v, &render))).collect();
            ctx.in_commit.push(Box::new(EmitWork {
                event: emit.event.clone(),
                payload: Value::Object(body),
                dedup_key: format!("run:{}:{}", ctx.run.id, addr.render()),
            }));
            Ok(after(ctx, &addr))
        }
        StepKind::Http(h) => {
            let engine = ctx.services;
            let endpoint = engine
                .providers
                .endpoints
                .get(&h.endpoint)
                .cloned()
                .ok_or_else(|| StepError::Permanent(anyhow!("endpoint '{}' is not configured", h.endpoint)))?;
            let vars = vars(ctx.state);
            // Placeholders in the path are encoded as one path segment each.
            let path_template = Template::parse(&h.path).map_err(|p| StepError::Permanent(anyhow!(p)))?;
            let encoded: HashMap<String, String> = path_template
                .fields()
                .map(|f| {
                    let raw = match crate::template::lookup_path(&payload, &vars, f) {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Null) | None => String::new(),
                        Some(other) => other.to_string(),
                    };
                    (f.to_string(), crate::outbound::path_segment(&raw))
                })
                .collect();
            let path = path_template.render_with(&payload, &encoded, &vars);
            let render = |text: &str| -> Value {
                let Ok(t) = Template::parse(text) else { return Value::String(text.to_string()) };
                match t.single_field() {
                    Some(f) => crate::template::lookup_path(&payload, &vars, f).cloned().unwrap_or(Value::Null),
                    None => Value::String(t.render_with(&payload, &HashMap::new(), &vars)),
                }
            };
            let body = h.body.as_ref().map(|b| super::model::render_json_value(&Value::Object(b.clone()), &render));
            let request = crate::outbound::Request::new(&endpoint, h, &path, body).map_err(|p| StepError::Permanent(anyhow!(p)))?;
            let step_key = addr.render();
            let idempotency_key = crate::outbound::idempotency_key(ctx.run.id, &step_key);
            let attempt = ctx.run.step_attempt + 1;
            let key = crate::outbound::RequestKey { run_id: Some(ctx.run.id), step: &step_key, attempt, idempotency_key: &idempotency_key };
            ctx.check_lease()?;
            // The run may have been cancelled (its token bumped) since it was
            // claimed: nothing may reach the endpoint then.
            if !engine.bounded(crate::store::runs::holds(&engine.pool, ctx.run.id, ctx.run.fencing_token)).await? {
                return Err(StepError::LeaseLost);
            }
            // A success already recorded for this step (then a crash before
            // its commit) is not sent again.
            let done = engine.bounded(crate::store::outbound::succeeded_status(&engine.pool, ctx.run.id, &step_key)).await?;
            if let Some(status) = done {
                if let Some(k) = &step.keep {
                    keep(ctx.state, k, json!({"status": status, "body": null}));
                }
                return Ok(after(ctx, &addr));
            }
            let outcome =
                crate::outbound::perform(&engine.pool, engine.config.engine.database_deadline(), &endpoint, &request, &key, &engine.engine_id).await?;
            match crate::outbound::decide(outcome, &h.retry, attempt) {
                crate::outbound::Decision::Done { status, body } => {
                    if let Some(k) = &step.keep {
                        keep(ctx.state, k, json!({"status": status, "body": body}));
                    }
                    Ok(after(ctx, &addr))
                }
                crate::outbound::Decision::Retry { delay_ms, error } => Err(StepError::RetryIn { error, delay_ms }),
                crate::outbound::Decision::WaitForBreaker { delay_ms } => Ok(Transition::Defer { delay_ms }),
                crate::outbound::Decision::Fail { error } => Err(StepError::Permanent(anyhow!(error))),
            }
        }
        StepKind::Notify(n) => {
            let engine = ctx.services;
            let vars = vars(ctx.state);
            let position = addr.render();
            // The recipients are resolved once and recorded with the run's
            // state, so that a retry or a takeover reaches the same people.
            let recipients = match crate::notify::recipients::recorded(ctx.state, &position) {
                Some(list) => list,
                None => {
                    // A failing query still reaches the step's static people.
                    let resolved = match crate::notify::recipients::resolve(&engine.pool, &engine.config, &n.who(), &payload, &vars).await {
                        Ok(r) => r,
                        Err(e) if ctx.run.step_attempt + 1 < ctx.workflow.max_attempts as i32 || n.people.is_empty() => {
                            return Err(StepError::Retryable(anyhow!("resolving the recipients of a notify step: {e}")));
                        }
                        Err(e) => {
                            tracing::error!(run = %ctx.run.id, step = %position, error = %e, "a notify step's recipients query failed; texting its static people only");
                            crate::notify::recipients::static_people(&engine.config, &n.who())
                        }
                    };
                    let list = resolved.recipients.clone();
                    crate::notify::recipients::record(ctx.state, &position, &list);
                    list
                }
            };
            if recipients.is_empty() {
                tracing::error!(run = %ctx.run.id, step = %position, "a notify step found nobody to send to");
            }
            let message = Template::parse(&n.message).map_err(|p| StepError::Permanent(anyhow!(p)))?.render_with(&payload, &HashMap::new(), &vars);
            crate::notify::sms::send_one_way(engine, ctx.run, ctx.slot, &position, &recipients, &message).await?;
            Ok(after(ctx, &addr))
        }
        StepKind::Escalate(settings) => {
            let settings = settings.clone();
            let mut inner_run = ctx.run.clone();
            inner_run.step = if addr.sub.is_empty() { "start".into() } else { addr.sub.clone() };
            let recorded = ctx.recorded.take();
            let (transition, recorded) = {
                let mut inner = StepContext {
                    services: ctx.services,
                    run: &inner_run,
                    workflow: ctx.workflow,
                    state: ctx.state,
                    lease_lost: ctx.lease_lost,
                    in_commit: Vec::new(),
                    slot: ctx.slot,
                    prefetched: ctx.prefetched.take(),
                    first_tier_opened: ctx.first_tier_opened.take(),
                    recorded,
                    state_saved: ctx.state_saved,
                };
                (super::escalation::run_step(&mut inner, &settings).await, inner.recorded.take())
            };
            ctx.recorded = recorded;
            let transition = transition?;
            Ok(match transition {
                Transition::Next { step } => Transition::Next { step: addr.with_sub(&step).render() },
                Transition::Sleep { step, delay_ms } => Transition::Sleep { step: addr.with_sub(&step).render(), delay_ms },
                Transition::SleepUntil { step, epoch_ms } => Transition::SleepUntil { step: addr.with_sub(&step).render(), epoch_ms },
                Transition::Wait { step, signal, timeout_ms } => Transition::Wait { step: addr.with_sub(&step).render(), signal, timeout_ms },
                Transition::Defer { delay_ms } => Transition::Defer { delay_ms },
                // The alert is closed (acknowledged, unacknowledged, cancelled): the workflow goes on.
                Transition::Complete => after(ctx, &addr),
                other @ (Transition::Fail { .. } | Transition::Cancelled) => other,
            })
        }
    }
}
