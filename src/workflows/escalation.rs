//! The escalation workflow: an alert row commits; the people of the policy's
//! first step are called; the message is read aloud; whoever presses 1 first
//! acknowledges. No acknowledgement within the step's timeout, or every call of
//! the step definitively failed (busy, no answer, failed, voicemail, hung up
//! without a key) or someone pressed 2: the next step is called. After the
//! policy has run `repeat` times the alert is marked `unacknowledged`.
//!
//! Steps of the state machine:
//! - `start`: looks up the message's values, renders it, opens the alert and
//!   places the first step's calls (as `call` does);
//! - `call`: records one intent per person (committed), then places the calls
//!   outside any transaction, then waits for `call_update` signals until the
//!   step's deadline;
//! - `await`: re-reads the alert and the step's attempts (the source of truth;
//!   signals only wake) and acknowledges, keeps waiting, or escalates.
//!
//! Re-call rule (ARCHITECTURE.md): an intent recorded under an older fencing
//! token whose call was never confirmed (no CallSid recorded, no callback
//! naming it) has an unknown outcome; for a critical alert a second call is
//! better than none, so it is marked `unknown` and a new attempt is placed.

use super::{StepContext, StepError, Transition};
use crate::audit::{self, Entity};
use crate::config::{redact_phone, EscalationWorkflow, Policy};
use crate::runtime::store::lock_fenced;
use crate::template::Template;
use crate::twilio::client::CreateCallRequest;
use crate::twilio::twiml;
use anyhow::anyhow;
use serde_json::{json, Value};
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use uuid::Uuid;

/// Signal name the webhooks send to an escalation run on every call event.
pub const CALL_UPDATE_SIGNAL: &str = "call_update";

/// Extra time (ms) a step waits past its deadline while a human is on the
/// line (answered, no key yet): hearing the message and pressing 1 takes time.
pub const HUMAN_ON_LINE_GRACE_MS: i64 = 45_000;

/// Provider statuses after which a call can no longer be acknowledged.
pub const TERMINAL_CALL_STATUSES: &[&str] = &["completed", "busy", "no-answer", "failed", "canceled", "unknown"];

/// Runs the current step of an escalation run.
pub async fn run_step(ctx: &mut StepContext<'_>, settings: &EscalationWorkflow) -> Result<Transition, StepError> {
    let policy = ctx
        .engine
        .config
        .policy(&settings.policy)
        .cloned()
        .ok_or_else(|| StepError::Permanent(anyhow!("policy '{}' is not in the config", settings.policy)))?;
    match ctx.run.step.as_str() {
        "start" => {
            if ctx.state.get("message").is_none() {
                let message = render_message(ctx, settings).await?;
                *ctx.state = json!({"message": message, "cycle": 0, "step_index": 0});
            }
            place_calls(ctx, settings, &policy).await
        }
        "call" => place_calls(ctx, settings, &policy).await,
        "await" => evaluate(ctx, settings, &policy).await,
        other => Err(StepError::Permanent(anyhow!("unknown escalation step '{other}'"))),
    }
}

async fn render_message(ctx: &StepContext<'_>, settings: &EscalationWorkflow) -> Result<String, StepError> {
    let template = Template::parse(&settings.message).map_err(|e| StepError::Permanent(anyhow!(e)))?;
    let mut values = HashMap::new();
    for (name, sql) in &settings.lookups {
        // A failing lookup never stops a call: the value renders empty and the
        // failure is logged (without the row's data).
        match sqlx::query(sql).bind(&ctx.run.input).fetch_optional(&ctx.engine.db.pool).await {
            Ok(Some(row)) => match row.try_get::<Option<String>, _>(0) {
                Ok(Some(v)) => {
                    values.insert(name.clone(), v);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(lookup = %name, error = %crate::capture::db_message(&e), "lookup must return one text column"),
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(lookup = %name, error = %crate::capture::db_message(&e), "lookup failed; its value renders empty"),
        }
    }
    Ok(template.render(&ctx.run.input, &values))
}

fn position(state: &Value) -> (i32, i32) {
    (
        state.get("cycle").and_then(Value::as_i64).unwrap_or(0) as i32,
        state.get("step_index").and_then(Value::as_i64).unwrap_or(0) as i32,
    )
}

/// Records the outcome of one create-call request. Returns `Some(reason)` when
/// the step must be retried: a transient or authentication failure leaves the
/// intent in place (the re-call rule places it again), because a provider
/// outage must never be mistaken for a nurse who did not answer. Only a
/// request Twilio definitively refused for this call (an invalid number, a
/// geographic permission) marks the attempt failed, so the policy escalates.
#[allow(clippy::too_many_arguments)]
async fn record_call_result(
    engine: &std::sync::Arc<crate::runtime::Engine>,
    ctx: &StepContext<'_>,
    settings: &EscalationWorkflow,
    actor: &str,
    attempt_id: Uuid,
    person_id: &str,
    phone: &str,
    result: Result<crate::twilio::client::CreatedCall, crate::twilio::client::TwilioError>,
) -> Result<Option<String>, sqlx::Error> {
    use crate::twilio::client::TwilioError;
    let mut tx = engine.db.pool.begin().await?;
    let transient = match result {
        Ok(call) => {
            tracing::info!(attempt = %attempt_id, person = %person_id, to = %redact_phone(phone), call_sid = %call.sid, "call requested");
            sqlx::query(
                "UPDATE wardcall.notification_attempts
                    SET provider_id = coalesce(provider_id, $2), requested_at = coalesce(requested_at, clock_timestamp()),
                        status = CASE WHEN status = 'intent' THEN 'requested' ELSE status END,
                        updated_at = clock_timestamp()
                  WHERE id = $1",
            )
            .bind(attempt_id)
            .bind(&call.sid)
            .execute(&mut *tx)
            .await?;
            audit::record(&mut tx, Entity::NotificationAttempt, &attempt_id.to_string(), "attempt.requested", Some("intent"), Some("requested"), actor, json!({"call_sid": call.sid}))
                .await?;
            write_back(&mut tx, settings.write_back.on_call_placed.as_deref(), "on_call_placed", &ctx.run.input, WriteBackSubject::Attempt(attempt_id), actor).await?;
            None
        }
        Err(e) if e.is_retryable() || matches!(e, TwilioError::Api { http_status: 401 | 403, .. }) => {
            tracing::error!(attempt = %attempt_id, person = %person_id, error = %e, "call could not be placed (provider unavailable or refusing our credentials); retrying the step");
            audit::record(&mut tx, Entity::NotificationAttempt, &attempt_id.to_string(), "attempt.provider_error", Some("intent"), Some("intent"), actor, json!({"error": e.to_string(), "retry": true}))
                .await?;
            Some(format!("Twilio create-call failed: {e}"))
        }
        Err(e) => {
            tracing::error!(attempt = %attempt_id, person = %person_id, error = %e, "Twilio refused this call; escalating past it");
            sqlx::query(
                "UPDATE wardcall.notification_attempts SET status = 'failed', error = $2, ended_at = clock_timestamp(),
                        updated_at = clock_timestamp() WHERE id = $1 AND status = 'intent'",
            )
            .bind(attempt_id)
            .bind(e.to_string())
            .execute(&mut *tx)
            .await?;
            audit::record(&mut tx, Entity::NotificationAttempt, &attempt_id.to_string(), "attempt.failed", Some("intent"), Some("failed"), actor, json!({"error": e.to_string()}))
                .await?;
            None
        }
    };
    tx.commit().await?;
    Ok(transient)
}

/// One attempt as the workflow needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Attempt {
    id: Uuid,
    person_id: String,
    status: String,
    provider_id: Option<String>,
    answered_by: Option<String>,
    acknowledged_at_set: bool,
    declined_at_set: bool,
    fencing_token: i64,
    generation: i32,
}

const ATTEMPT_COLUMNS: &str = "id, person_id, status, provider_id, answered_by,
     acknowledged_at IS NOT NULL AS acknowledged_at_set, declined_at IS NOT NULL AS declined_at_set,
     fencing_token, generation";

/// Each person's latest attempt (highest generation) at one escalation position.
async fn latest_attempts(conn: &mut PgConnection, run: Uuid, cycle: i32, step_index: i32) -> Result<Vec<Attempt>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT DISTINCT ON (person_id) {ATTEMPT_COLUMNS} FROM wardcall.notification_attempts
          WHERE run_id = $1 AND cycle = $2 AND step_index = $3 ORDER BY person_id, generation DESC"
    ))
    .bind(run)
    .bind(cycle)
    .bind(step_index)
    .fetch_all(conn)
    .await
}

impl Attempt {
    fn machine(&self) -> bool {
        self.answered_by.as_deref().is_some_and(|a| a.starts_with("machine") || a == "fax")
    }
    /// This call can no longer produce an acknowledgement.
    fn definitively_failed(&self) -> bool {
        !self.acknowledged_at_set && (TERMINAL_CALL_STATUSES.contains(&self.status.as_str()) || self.machine() || self.declined_at_set)
    }
}

async fn open_alert(conn: &mut PgConnection, ctx: &StepContext<'_>, settings: &EscalationWorkflow, message: &str) -> Result<(Uuid, String), StepError> {
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO wardcall.alerts (run_id, workflow, policy, message, status) VALUES ($1, $2, $3, $4, 'open')
         ON CONFLICT (run_id) DO NOTHING RETURNING id",
    )
    .bind(ctx.run.id)
    .bind(&ctx.workflow.name)
    .bind(&settings.policy)
    .bind(message)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = inserted {
        audit::record(conn, Entity::Alert, &id.to_string(), "alert.opened", None, Some("open"), &ctx.engine.actor(), json!({"run_id": ctx.run.id, "policy": settings.policy}))
            .await?;
    }
    let (id, status): (Uuid, String) = sqlx::query_as("SELECT id, status FROM wardcall.alerts WHERE run_id = $1 FOR UPDATE")
        .bind(ctx.run.id)
        .fetch_one(&mut *conn)
        .await?;
    Ok((id, status))
}

async fn place_calls(ctx: &mut StepContext<'_>, settings: &EscalationWorkflow, policy: &Policy) -> Result<Transition, StepError> {
    let engine = ctx.engine.clone();
    let twilio = engine.providers.twilio.as_ref().ok_or_else(|| StepError::Permanent(anyhow!("no Twilio provider configured")))?;
    let message = ctx.state.get("message").and_then(Value::as_str).unwrap_or_default().to_string();
    let (cycle, step_index) = position(ctx.state);
    let actor = engine.actor();
    let Some(step) = policy.steps.get(step_index as usize) else {
        // The policy lost steps in a config change while this run was on them:
        // nobody is left to call at this position.
        tracing::error!(run = %ctx.run.id, step_index, "the policy has no such step (config changed?); escalating past it");
        return evaluate_position(ctx, settings, policy, Some(true)).await;
    };

    // 1. Record the intents (and the alert), fenced, in one transaction.
    let mut tx = engine.db.pool.begin().await?;
    if !lock_fenced(&mut tx, ctx.run.id, ctx.run.fencing_token).await? {
        return Err(StepError::LeaseLost);
    }
    let (alert_id, alert_status) = open_alert(&mut tx, ctx, settings, &message).await?;
    ctx.state["alert_id"] = json!(alert_id);
    if alert_status != "open" {
        tx.commit().await?;
        return Ok(Transition::Complete);
    }
    let existing = latest_attempts(&mut tx, ctx.run.id, cycle, step_index).await?;
    if existing.is_empty() && (cycle, step_index) != (0, 0) {
        audit::record(&mut tx, Entity::Alert, &alert_id.to_string(), "alert.escalated", Some("open"), Some("open"), &actor, json!({"cycle": cycle, "step_index": step_index}))
            .await?;
        write_back(&mut tx, settings.write_back.on_escalated.as_deref(), "on_escalated", &ctx.run.input, WriteBackSubject::Alert(alert_id), &actor).await?;
    }
    let mut to_place: Vec<(Uuid, String, String)> = Vec::new(); // attempt, person, phone
    for person_id in &step.notify {
        let person = engine.config.person(person_id).ok_or_else(|| StepError::Permanent(anyhow!("unknown person '{person_id}'")))?;
        let latest = existing.iter().find(|a| &a.person_id == person_id);
        let generation = match latest {
            None => 0,
            Some(a) if a.status == "intent" && a.provider_id.is_none() && a.fencing_token < ctx.run.fencing_token => {
                // Unknown outcome of a previous execution: the re-call rule.
                sqlx::query("UPDATE wardcall.notification_attempts SET status = 'unknown', updated_at = clock_timestamp(),
                                    error = 'engine stopped between recording the intent and confirming the call' WHERE id = $1")
                    .bind(a.id)
                    .execute(&mut *tx)
                    .await?;
                audit::record(&mut tx, Entity::NotificationAttempt, &a.id.to_string(), "attempt.outcome_unknown", Some("intent"), Some("unknown"), &actor, json!({"rule": "re-call"}))
                    .await?;
                a.generation + 1
            }
            Some(_) => continue, // placed (or being reported on by callbacks): never call twice
        };
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO wardcall.notification_attempts
                 (alert_id, run_id, cycle, step_index, person_id, generation, channel, destination, provider, status, fencing_token)
             VALUES ($1, $2, $3, $4, $5, $6, 'voice', $7, 'twilio', 'intent', $8) RETURNING id",
        )
        .bind(alert_id)
        .bind(ctx.run.id)
        .bind(cycle)
        .bind(step_index)
        .bind(person_id)
        .bind(generation)
        .bind(&person.phone)
        .bind(ctx.run.fencing_token)
        .fetch_one(&mut *tx)
        .await?;
        audit::record(&mut tx, Entity::NotificationAttempt, &id.to_string(), "attempt.intent", None, Some("intent"), &actor, json!({"person_id": person_id, "cycle": cycle, "step_index": step_index, "generation": generation}))
            .await?;
        to_place.push((id, person_id.clone(), person.phone.clone()));
    }
    tx.commit().await?;

    // 2. Place the calls, outside any transaction, in parallel.
    let ack_timeout_ms = (step.ack_timeout_seconds * 1000.0) as i64;
    // Twilio's Timeout is whole seconds; let the phone ring for most of the step's
    // budget, leaving time to hear the message and press 1 (min 5 s, max 600 s).
    let ring_timeout_seconds = ((step.ack_timeout_seconds * 0.6).floor() as u32).clamp(5, 600);
    let calls = to_place.iter().map(|(attempt_id, person_id, phone)| {
        let engine = engine.clone();
        let message = message.clone();
        async move {
            let base = &engine.public_url;
            let req = CreateCallRequest {
                to: phone.clone(),
                from: twilio.config.from.clone(),
                twiml: twiml::say_and_gather(&message, &format!("{base}/webhooks/twilio/gather?attempt={attempt_id}"), twilio.config.gather_timeout_seconds),
                status_callback: format!("{base}/webhooks/twilio/status?attempt={attempt_id}"),
                ring_timeout_seconds,
                machine_detection: twilio.config.machine_detection,
                async_amd_status_callback: twilio.config.machine_detection.then(|| format!("{base}/webhooks/twilio/amd?attempt={attempt_id}")),
            };
            // No retry here: an ambiguous failure (timeout, 5xx) may have placed
            // the call. The step is retried under a new fencing token and the
            // re-call rule decides (ARCHITECTURE.md).
            let result = twilio.client.create_call(&req).await;
            (*attempt_id, person_id.clone(), phone.clone(), result)
        }
    });
    let results = futures_util::future::join_all(calls).await;
    // Record every result before returning any error, so no placed call loses its CallSid.
    let mut retry_step: Option<String> = None;
    for (attempt_id, person_id, phone, result) in results {
        match record_call_result(&engine, ctx, settings, &actor, attempt_id, &person_id, &phone, result).await {
            Ok(None) => {}
            Ok(Some(transient)) => retry_step = Some(transient),
            Err(e) => {
                tracing::error!(attempt = %attempt_id, error = %crate::capture::db_message(&e), "recording a call result failed");
                retry_step.get_or_insert_with(|| format!("recording a call result failed: {}", crate::capture::db_message(&e)));
            }
        }
    }
    if let Some(why) = retry_step {
        return Err(StepError::Retryable(anyhow!("{why}")));
    }
    let deadline = jiff::Timestamp::now().as_millisecond() + ack_timeout_ms;
    if ctx.state.get("step_deadline_ms").is_none() || to_place.len() == step.notify.len() {
        ctx.state["step_deadline_ms"] = json!(deadline);
    }
    ctx.check_lease()?;
    // Decide at once whether anything can still be acknowledged.
    evaluate_position(ctx, settings, policy, None).await
}

async fn evaluate(ctx: &mut StepContext<'_>, settings: &EscalationWorkflow, policy: &Policy) -> Result<Transition, StepError> {
    let timed_out = ctx.wait_outcome().and_then(|o| o.get("timeout")).and_then(Value::as_bool).unwrap_or(false);
    evaluate_position(ctx, settings, policy, Some(timed_out)).await
}

/// Decides from the database what happens next: done (acknowledged), keep
/// waiting, or escalate. `timed_out`: `None` right after placing calls.
async fn evaluate_position(
    ctx: &mut StepContext<'_>,
    settings: &EscalationWorkflow,
    policy: &Policy,
    timed_out: Option<bool>,
) -> Result<Transition, StepError> {
    let engine = ctx.engine.clone();
    let actor = engine.actor();
    let (cycle, step_index) = position(ctx.state);
    let alert_id: Uuid = ctx
        .state
        .get("alert_id")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StepError::Permanent(anyhow!("escalation state has no alert_id")))?;
    let mut tx = engine.db.pool.begin().await?;
    if !lock_fenced(&mut tx, ctx.run.id, ctx.run.fencing_token).await? {
        return Err(StepError::LeaseLost);
    }
    let alert_status: String = sqlx::query_scalar("SELECT status FROM wardcall.alerts WHERE id = $1 FOR UPDATE")
        .bind(alert_id)
        .fetch_one(&mut *tx)
        .await?;
    if alert_status != "open" {
        tx.commit().await?;
        if alert_status == "acknowledged" {
            end_ringing_calls(ctx, alert_id).await;
        }
        return Ok(Transition::Complete);
    }
    let attempts = latest_attempts(&mut tx, ctx.run.id, cycle, step_index).await?;
    let all_failed = !attempts.is_empty() && attempts.iter().all(Attempt::definitively_failed);
    let declined = attempts.iter().any(|a| a.declined_at_set);
    let now = jiff::Timestamp::now().as_millisecond();
    let deadline = ctx.state.get("step_deadline_ms").and_then(Value::as_i64).unwrap_or(now);
    // A human on the line (answered, not a machine, no key yet) gets time to
    // hear the message and press a key: the step does not expire under them.
    let human_on_line = attempts
        .iter()
        .any(|a| a.status == "in-progress" && !a.machine() && !a.declined_at_set && !a.acknowledged_at_set);
    let grace_deadline = deadline + HUMAN_ON_LINE_GRACE_MS;
    let expired = (timed_out == Some(true) || deadline <= now) && !(human_on_line && now < grace_deadline);
    // Voicemail calls still connected: hang them up (never an acknowledgement).
    let machines: Vec<String> = attempts
        .iter()
        .filter(|a| a.machine() && !TERMINAL_CALL_STATUSES.contains(&a.status.as_str()))
        .filter_map(|a| a.provider_id.clone())
        .collect();
    if !(all_failed || declined || expired) {
        tx.commit().await?;
        end_calls(ctx, &machines).await;
        let until = if deadline <= now { grace_deadline } else { deadline };
        return Ok(Transition::Wait { step: "await".into(), signal: CALL_UPDATE_SIGNAL.into(), timeout_ms: (until - now).max(1) });
    }
    let reason = if declined { "declined" } else if all_failed { "all_calls_failed" } else { "ack_timeout" };
    // Escalate: next step, next cycle, or give up.
    let mut next = (cycle, step_index + 1);
    if next.1 as usize >= policy.steps.len() {
        next = (cycle + 1, 0);
    }
    if next.0 as u32 >= policy.repeat {
        sqlx::query("UPDATE wardcall.alerts SET status = 'unacknowledged', updated_at = clock_timestamp() WHERE id = $1")
            .bind(alert_id)
            .execute(&mut *tx)
            .await?;
        audit::record(&mut tx, Entity::Alert, &alert_id.to_string(), "alert.unacknowledged", Some("open"), Some("unacknowledged"), &actor, json!({"reason": reason, "cycles": policy.repeat}))
            .await?;
        write_back(&mut tx, settings.write_back.on_unacknowledged.as_deref(), "on_unacknowledged", &ctx.run.input, WriteBackSubject::Alert(alert_id), &actor).await?;
        tx.commit().await?;
        end_calls(ctx, &machines).await;
        tracing::warn!(alert = %alert_id, "alert unacknowledged after the whole policy");
        return Ok(Transition::Complete);
    }
    audit::record(&mut tx, Entity::Alert, &alert_id.to_string(), "alert.step_ended", Some("open"), Some("open"), &actor, json!({"reason": reason, "cycle": cycle, "step_index": step_index}))
        .await?;
    tx.commit().await?;
    end_calls(ctx, &machines).await;
    ctx.state["cycle"] = json!(next.0);
    ctx.state["step_index"] = json!(next.1);
    if let Some(o) = ctx.state.as_object_mut() {
        o.remove("step_deadline_ms");
    }
    Ok(Transition::Next { step: "call".into() })
}

/// After an acknowledgement: ends every call of the alert still ringing or
/// connected (other than the one that acknowledged), through the provider's API.
async fn end_ringing_calls(ctx: &StepContext<'_>, alert_id: Uuid) {
    let sids: Vec<String> = sqlx::query_scalar(
        "SELECT provider_id FROM wardcall.notification_attempts
          WHERE alert_id = $1 AND provider_id IS NOT NULL AND acknowledged_at IS NULL
            AND status IN ('requested','initiated','ringing','in-progress')",
    )
    .bind(alert_id)
    .fetch_all(&ctx.engine.db.pool)
    .await
    .unwrap_or_default();
    end_calls(ctx, &sids).await;
}

async fn end_calls(ctx: &StepContext<'_>, sids: &[String]) {
    let Some(twilio) = ctx.engine.providers.twilio.as_ref() else { return };
    for sid in sids {
        match twilio.client.end_call(sid).await {
            Ok(()) => tracing::info!(call_sid = %sid, "ended call"),
            Err(e) => tracing::warn!(call_sid = %sid, error = %e, "ending call failed"),
        }
    }
}

/// Whose details a write-back statement receives as `$2`.
#[derive(Debug, Clone, Copy)]
pub enum WriteBackSubject {
    /// `wardcall.attempt_details(id)`.
    Attempt(Uuid),
    /// `wardcall.alert_details(id)`.
    Alert(Uuid),
}

/// Runs one write-back statement in a savepoint: `$1` = the event payload,
/// `$2` = the subject's details. A failing statement is rolled back to the
/// savepoint, logged and audited; it never undoes the state change around it.
pub async fn write_back(
    conn: &mut PgConnection,
    sql: Option<&str>,
    hook: &str,
    payload: &Value,
    subject: WriteBackSubject,
    actor: &str,
) -> Result<(), sqlx::Error> {
    let Some(sql) = sql else { return Ok(()) };
    let details: Value = match subject {
        WriteBackSubject::Attempt(id) => sqlx::query_scalar("SELECT wardcall.attempt_details($1)").bind(id).fetch_one(&mut *conn).await?,
        WriteBackSubject::Alert(id) => sqlx::query_scalar("SELECT wardcall.alert_details($1)").bind(id).fetch_one(&mut *conn).await?,
    };
    sqlx::query("SAVEPOINT wardcall_write_back").execute(&mut *conn).await?;
    // The capture triggers skip rows written while `wardcall.write_back` is on,
    // so a write-back never re-triggers a page; the timeouts keep a team's
    // long-held row lock from stalling webhooks and workers.
    sqlx::query(
        "SELECT set_config('wardcall.write_back', 'on', true), set_config('lock_timeout', '2s', true),
                set_config('statement_timeout', '5s', true)",
    )
    .execute(&mut *conn)
    .await?;
    let outcome = sqlx::query(sql).bind(payload).bind(&details).execute(&mut *conn).await;
    let reset = "SELECT set_config('wardcall.write_back', 'off', true),
                        set_config('lock_timeout', (SELECT reset_val FROM pg_settings WHERE name = 'lock_timeout'), true),
                        set_config('statement_timeout', (SELECT reset_val FROM pg_settings WHERE name = 'statement_timeout'), true)";
    match outcome {
        Ok(_) => {
            sqlx::query("RELEASE SAVEPOINT wardcall_write_back").execute(&mut *conn).await?;
            sqlx::query(reset).execute(&mut *conn).await?;
        }
        Err(e) => {
            let msg = crate::capture::db_message(&e);
            sqlx::query("ROLLBACK TO SAVEPOINT wardcall_write_back").execute(&mut *conn).await?;
            sqlx::query(reset).execute(&mut *conn).await?;
            tracing::error!(hook, error = %msg, "write-back statement failed; the state change is kept");
            let (entity, id) = match subject {
                WriteBackSubject::Attempt(id) => (Entity::NotificationAttempt, id),
                WriteBackSubject::Alert(id) => (Entity::Alert, id),
            };
            audit::record(conn, entity, &id.to_string(), "write_back.failed", None, None, actor, json!({"hook": hook, "error": msg})).await?;
        }
    }
    Ok(())
}
