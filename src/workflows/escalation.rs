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
//! - `call`: resolves the step's recipients (its `notify` people and its
//!   `recipients` query over the team's tables, once per position: the list is
//!   recorded in the run's state with the intents, and reused by a retry or a
//!   takeover), records one intent per person with a voice number (committed),
//!   then places the calls outside any transaction, then waits for
//!   `call_update` signals until the step's deadline. A step with nobody to
//!   call goes on to the next at once; a cycle with nobody at all is an alarm
//!   (`alerts.nobody_since`, `wardcall status`) retried every
//!   [`NOBODY_RETRY_MS`];
//! - `await`: re-reads the alert and the step's attempts (the source of truth;
//!   signals only wake) and acknowledges, keeps waiting, or escalates.
//!
//! Re-call rule (ARCHITECTURE.md): an intent recorded under an older fencing
//! token whose call was never confirmed (no CallSid recorded, no callback
//! naming it) has an unknown outcome; for a critical alert a second call is
//! better than none, so it is marked `unknown` and a new attempt is placed.

use super::{StepContext, StepError, Transition};
use crate::config::{redact_phone, EscalationWorkflow, Policy, PolicyStep};
use crate::notify::recipients;
use crate::notify::{Channel, Recipient};
use crate::providers::twilio::client::{CreateCallRequest, MAX_INLINE_TWIML_CHARS};
use crate::providers::twilio::twiml;
use crate::store::audit::{self, Entity};
use crate::store::runs::lock_fenced;
use crate::template::Template;
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
        .services
        .config
        .policy(&settings.policy)
        .cloned()
        .ok_or_else(|| StepError::Permanent(anyhow!("policy '{}' is not in the config", settings.policy)))?;
    match ctx.run.step.as_str() {
        "start" => {
            if ctx.state.get("message").is_none() {
                let message = render_message(ctx, settings).await?;
                // Other keys of the state (a workflow's variables) are kept.
                if !ctx.state.is_object() {
                    *ctx.state = json!({});
                }
                ctx.state["message"] = json!(message);
                ctx.state["cycle"] = json!(0);
                ctx.state["step_index"] = json!(0);
            }
            place_calls(ctx, settings, &policy).await
        }
        "call" => place_calls(ctx, settings, &policy).await,
        "await" => evaluate(ctx, settings, &policy).await,
        other => Err(StepError::Permanent(anyhow!("unknown escalation step '{other}'"))),
    }
}

/// Longest a lookup may run (ms) before it renders without its value
/// (`statement_timeout`, PostgreSQL manual 20.11.1).
pub const LOOKUP_STATEMENT_TIMEOUT_MS: u64 = 2_000;
/// Longest a lookup may wait for a lock (ms), e.g. behind a team's
/// `ALTER TABLE` (`lock_timeout`).
pub const LOOKUP_LOCK_TIMEOUT_MS: u64 = 1_000;

/// Renders the alert's message. Each lookup runs in its own read-only
/// transaction with [`LOOKUP_STATEMENT_TIMEOUT_MS`] and
/// [`LOOKUP_LOCK_TIMEOUT_MS`]; a lookup that fails, times out, or returns
/// more than one row renders without its value, and is logged and audited
/// (`lookup.failed`, `lookup.ambiguous`) by name and SQLSTATE, never with
/// the row's data. A lookup never stops a call.
async fn render_message(ctx: &StepContext<'_>, settings: &EscalationWorkflow) -> Result<String, StepError> {
    let template = Template::parse(&settings.message).map_err(|e| StepError::Permanent(anyhow!(e)))?;
    let mut values = HashMap::new();
    for (name, sql) in &settings.lookups {
        match run_lookup(&ctx.services.pool, sql, &ctx.run.input).await {
            Ok(LookupOutcome::Value(v)) => {
                values.insert(name.clone(), v);
            }
            Ok(LookupOutcome::Empty) => {}
            Ok(LookupOutcome::Ambiguous) => {
                tracing::error!(run = %ctx.run.id, lookup = %name, "lookup returned more than one row (config fault); its value renders empty");
                audit_lookup_fault(ctx, name, "lookup.ambiguous", json!({"lookup": name, "rows": "more than one"})).await;
            }
            Ok(LookupOutcome::NotText) => {
                tracing::error!(run = %ctx.run.id, lookup = %name, "lookup must return one text column (config fault); its value renders empty");
                audit_lookup_fault(ctx, name, "lookup.failed", json!({"lookup": name, "problem": "not one text column"})).await;
            }
            Err(e) => {
                let sqlstate = e.as_database_error().and_then(|d| d.code()).map(|c| c.to_string());
                tracing::warn!(run = %ctx.run.id, lookup = %name, sqlstate = ?sqlstate, "lookup failed or timed out; its value renders empty");
                audit_lookup_fault(ctx, name, "lookup.failed", json!({"lookup": name, "sqlstate": sqlstate})).await;
            }
        }
    }
    let vars = ctx.state.get("vars").cloned().unwrap_or(Value::Null);
    Ok(template.render_with(&ctx.run.input, &values, &vars))
}

enum LookupOutcome {
    Value(String),
    Empty,
    Ambiguous,
    NotText,
}

async fn run_lookup(pool: &sqlx::PgPool, sql: &str, input: &Value) -> Result<LookupOutcome, sqlx::Error> {
    use futures_util::TryStreamExt;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $2, true), set_config('transaction_read_only', 'on', true)")
        .bind(format!("{LOOKUP_STATEMENT_TIMEOUT_MS}ms"))
        .bind(format!("{LOOKUP_LOCK_TIMEOUT_MS}ms"))
        .execute(&mut *tx)
        .await?;
    let mut rows = Vec::new();
    {
        let mut stream = sqlx::query(sql).bind(input).fetch(&mut *tx);
        while let Some(row) = stream.try_next().await? {
            rows.push(row);
            if rows.len() > 1 {
                break;
            }
        }
    }
    tx.rollback().await?;
    Ok(match rows.as_slice() {
        [] => LookupOutcome::Empty,
        [row] => match row.try_get::<Option<String>, _>(0) {
            Ok(Some(v)) => LookupOutcome::Value(v),
            Ok(None) => LookupOutcome::Empty,
            Err(_) => LookupOutcome::NotText,
        },
        _ => LookupOutcome::Ambiguous,
    })
}

async fn audit_lookup_fault(ctx: &StepContext<'_>, name: &str, action: &str, detail: Value) {
    let result = async {
        let mut conn = ctx.services.pool.acquire().await?;
        audit::record(&mut conn, Entity::Run, &ctx.run.id.to_string(), action, None, None, &ctx.services.actor(), detail).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(lookup = %name, error = %crate::capture::db_message(&e), "auditing a lookup fault failed");
    }
}

fn position(state: &Value) -> (i32, i32) {
    (state.get("cycle").and_then(Value::as_i64).unwrap_or(0) as i32, state.get("step_index").and_then(Value::as_i64).unwrap_or(0) as i32)
}

/// How long recording a create-call result is retried (ms) before the step
/// gives up on it; the CallSid is kept in memory meanwhile, and an engine
/// taking the run over finds the call through the provider's call list.
pub const RECORD_RETRY_BUDGET_MS: u64 = 60_000;

/// The result of one create-call, as placed by [`place_calls`].
struct PlacedCall {
    attempt_id: Uuid,
    person_id: String,
    phone: String,
    result: Result<crate::providers::twilio::client::CreatedCall, crate::providers::twilio::client::TwilioError>,
    /// The provider refused the alert's own message for its content; the
    /// result above is that of the short fallback message.
    content_refused: Option<crate::providers::twilio::client::TwilioError>,
}

/// Records one create-call result, retrying while the database refuses
/// (statement timeout, failover) for up to [`RECORD_RETRY_BUDGET_MS`], even if
/// this engine lost the run meanwhile: a CallSid the provider returned is never
/// dropped because a write failed. Returns what [`record_call_result`] does.
async fn record_with_retry(ctx: &StepContext<'_>, settings: &EscalationWorkflow, actor: &str, placed: &PlacedCall) -> Result<Option<String>, StepError> {
    let started = std::time::Instant::now();
    let mut delay = std::time::Duration::from_millis(50);
    loop {
        match record_call_result(ctx, settings, actor, placed).await {
            Ok(outcome) => return Ok(outcome),
            Err(e) => {
                let sqlstate = e.as_database_error().and_then(|d| d.code()).map(|c| c.to_string());
                // Not stopped by a lost lease: the record is not fenced, and it is
                // the only copy of the CallSid (a cancel, too, takes the lease).
                // A unique violation cannot heal by waiting.
                if started.elapsed().as_millis() as u64 > RECORD_RETRY_BUDGET_MS || sqlstate.as_deref() == Some("23505") {
                    tracing::error!(attempt = %placed.attempt_id, sqlstate = ?sqlstate, "recording a create-call result failed for good; the call is reconciled from the provider's call list");
                    return Err(StepError::Retryable(anyhow!("recording a call result failed: {}", crate::capture::db_message(&e))));
                }
                tracing::warn!(attempt = %placed.attempt_id, sqlstate = ?sqlstate, retry_in_ms = delay.as_millis() as u64, "recording a create-call result failed; retrying before anything else");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
        }
    }
}

/// Records the outcome of one create-call request. Returns `Some(reason)` when
/// the step must be retried: a transient or authentication failure leaves the
/// intent in place (the re-call rule reconciles it with the provider, then
/// places it again), because a provider outage must never be mistaken for a
/// nurse who did not answer. Only a request Twilio definitively refused for
/// that call (an invalid number, a geographic permission) marks the attempt
/// failed, so the policy escalates. A call that was placed after its alert
/// closed is handed to the call sweeper, which ends it at once.
async fn record_call_result(ctx: &StepContext<'_>, settings: &EscalationWorkflow, actor: &str, placed: &PlacedCall) -> Result<Option<String>, sqlx::Error> {
    use crate::providers::twilio::client::TwilioError;
    let engine = ctx.services;
    let attempt_id = placed.attempt_id;
    let id_text = attempt_id.to_string();
    let mut tx = engine.pool.begin().await?;
    let (previous, alert_status): (String, String) = sqlx::query_as(
        "SELECT n.status, a.status FROM wardcall.notification_attempts n JOIN wardcall.alerts a ON a.id = n.alert_id
          WHERE n.id = $1 FOR UPDATE OF n",
    )
    .bind(attempt_id)
    .fetch_one(&mut *tx)
    .await?;
    if let Some(e) = &placed.content_refused {
        tracing::warn!(attempt = %attempt_id, person = %placed.person_id, error = %e, "Twilio refused the alert's message for its content; called with the short fallback message instead");
        audit::record(
            &mut tx,
            Entity::NotificationAttempt,
            &id_text,
            "attempt.content_refused",
            None,
            None,
            actor,
            json!({"error": e.to_string(), "fallback": true}),
        )
        .await?;
    }
    let mut wake_sweeper = false;
    let transient = match &placed.result {
        Ok(call) => {
            tracing::info!(attempt = %attempt_id, person = %placed.person_id, to = %redact_phone(&placed.phone), call_sid = %call.sid, "call requested");
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
            if previous == "intent" {
                audit::record(
                    &mut tx,
                    Entity::NotificationAttempt,
                    &id_text,
                    "attempt.requested",
                    Some("intent"),
                    Some("requested"),
                    actor,
                    json!({"call_sid": call.sid}),
                )
                .await?;
            } else {
                // Callbacks (or a takeover) moved the attempt on first: the
                // create response confirms the call, it is not a transition.
                audit::record(
                    &mut tx,
                    Entity::NotificationAttempt,
                    &id_text,
                    "attempt.create_confirmed",
                    None,
                    None,
                    actor,
                    json!({"call_sid": call.sid, "status": previous}),
                )
                .await?;
            }
            write_back(&mut tx, settings.write_back.on_call_placed.as_deref(), "on_call_placed", &ctx.run.input, WriteBackSubject::Attempt(attempt_id), actor)
                .await?;
            if alert_status != "open" {
                tracing::warn!(attempt = %attempt_id, call_sid = %call.sid, alert_status = %alert_status, "a call was placed after its alert closed; ending it");
                wake_sweeper = true;
            }
            None
        }
        // A success answer that could not be read (`Decode`) most likely
        // placed the call: ambiguous, like a timeout.
        Err(e) if e.is_retryable() || matches!(e, TwilioError::Api { http_status: 401 | 403, .. } | TwilioError::Decode(_)) => {
            tracing::error!(attempt = %attempt_id, person = %placed.person_id, error = %e, "call could not be placed or its outcome is unknown (provider unavailable, slow, or refusing our credentials); retrying the step after reconciling with the provider");
            audit::record(
                &mut tx,
                Entity::NotificationAttempt,
                &id_text,
                "attempt.provider_error",
                None,
                None,
                actor,
                json!({"error": e.to_string(), "retry": true}),
            )
            .await?;
            Some(format!("Twilio create-call failed: {e}"))
        }
        Err(e) => {
            tracing::error!(attempt = %attempt_id, person = %placed.person_id, error = %e, "Twilio refused this call; escalating past it");
            let failed = sqlx::query(
                "UPDATE wardcall.notification_attempts SET status = 'failed', error = $2, ended_at = clock_timestamp(),
                        updated_at = clock_timestamp() WHERE id = $1 AND status = 'intent'",
            )
            .bind(attempt_id)
            .bind(e.to_string())
            .execute(&mut *tx)
            .await?;
            if failed.rows_affected() == 1 {
                audit::record(
                    &mut tx,
                    Entity::NotificationAttempt,
                    &id_text,
                    "attempt.failed",
                    Some("intent"),
                    Some("failed"),
                    actor,
                    json!({"error": e.to_string()}),
                )
                .await?;
            }
            None
        }
    };
    tx.commit().await?;
    if wake_sweeper {
        engine.wake_call_sweeper();
    }
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
    destination: String,
    /// `created_at`, milliseconds since the Unix epoch (UTC).
    created_ms: f64,
}

const ATTEMPT_COLUMNS: &str = "id, person_id, status, provider_id, answered_by,
     acknowledged_at IS NOT NULL AS acknowledged_at_set, declined_at IS NOT NULL AS declined_at_set,
     fencing_token, generation, destination, (extract(epoch FROM created_at) * 1000)::float8 AS created_ms";

/// Each person's latest call attempt (highest generation) at one escalation
/// position (text messages, the SMS fallback, are read by [`crate::notify::sms`]).
async fn latest_attempts(conn: &mut PgConnection, run: Uuid, cycle: i32, step_index: i32) -> Result<Vec<Attempt>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT DISTINCT ON (person_id) {ATTEMPT_COLUMNS} FROM wardcall.notification_attempts
          WHERE run_id = $1 AND cycle = $2 AND step_index = $3 AND channel = 'voice' ORDER BY person_id, generation DESC"
    ))
    .bind(run)
    .bind(cycle)
    .bind(step_index)
    .fetch_all(conn)
    .await
}

impl Attempt {
    fn machine(&self) -> bool {
        crate::notify::acknowledgement::is_machine(self.answered_by.as_deref())
    }
    /// This call can no longer produce an acknowledgement.
    fn definitively_failed(&self) -> bool {
        !self.acknowledged_at_set && (TERMINAL_CALL_STATUSES.contains(&self.status.as_str()) || self.machine() || self.declined_at_set)
    }
    /// An intent of an earlier execution whose call was never confirmed: the
    /// create request may or may not have placed it.
    fn ambiguous(&self, fencing_token: i64) -> bool {
        self.status == "intent" && self.provider_id.is_none() && self.fencing_token < fencing_token
    }
}

/// Slack (ms) when matching a provider's call to an intent: Twilio's
/// `date_created` has whole seconds, and clocks differ a little.
const RECONCILE_CLOCK_SLACK_MS: f64 = 2_000.0;

/// How long (ms after the intent) an ambiguous create may stay unverified
/// because the provider's call list cannot be read, before the person is
/// called again anyway (a critical alert: better a second call than none).
pub const UNVERIFIED_RECALL_AFTER_MS: f64 = 30_000.0;

/// For each ambiguous intent at this position (see [`Attempt::ambiguous`]),
/// asks the provider whether it created a call for it: the newest calls to the
/// same number (Twilio's call list filtered by `To`), created at or after the
/// intent, whose CallSid no attempt has recorded yet. `Some(sid)`: adopt that
/// call; `None`: the provider has none, so placing it again is safe. Runs
/// outside any transaction.
///
/// Errors: the provider cannot be asked (the step retries; nothing is placed).
async fn reconcile_ambiguous(
    ctx: &StepContext<'_>,
    twilio: &crate::providers::TwilioProvider,
    cycle: i32,
    step_index: i32,
) -> Result<HashMap<Uuid, Option<String>>, StepError> {
    // No connection is held while the provider is asked.
    let ambiguous: Vec<Attempt> = {
        let mut conn = ctx.services.pool.acquire().await?;
        latest_attempts(&mut conn, ctx.run.id, cycle, step_index).await?.into_iter().filter(|a| a.ambiguous(ctx.run.fencing_token)).collect()
    };
    let pool = &ctx.services.pool;
    let mut found = HashMap::new();
    for a in ambiguous {
        let calls = match twilio.client.list_calls_to(&a.destination, 20).await {
            Ok(calls) => calls,
            Err(e) if jiff::Timestamp::now().as_millisecond() as f64 - a.created_ms > UNVERIFIED_RECALL_AFTER_MS => {
                // Better a second call than none: the provider could not be
                // asked for this long, so the person is called again unverified.
                tracing::error!(attempt = %a.id, error = %e, "cannot ask Twilio whether an ambiguous call was placed, for too long; calling again unverified");
                found.insert(a.id, None);
                continue;
            }
            Err(e) => {
                tracing::error!(attempt = %a.id, error = %e, "cannot ask Twilio whether an ambiguous call was placed; retrying before calling again");
                return Err(StepError::Retryable(anyhow!("reconciling an ambiguous create-call with Twilio failed: {e}")));
            }
        };
        let candidates: Vec<&crate::providers::twilio::client::CallResource> =
            calls.iter().filter(|c| c.created_at().is_some_and(|t| t.as_millisecond() as f64 >= a.created_ms - RECONCILE_CLOCK_SLACK_MS)).collect();
        let sids: Vec<String> = candidates.iter().map(|c| c.sid.clone()).collect();
        let known: Vec<String> =
            sqlx::query_scalar("SELECT provider_id FROM wardcall.notification_attempts WHERE provider = 'twilio' AND provider_id = ANY($1)")
                .bind(&sids)
                .fetch_all(pool)
                .await?;
        // Another unconfirmed intent to the same number (another alert paging
        // the same nurse, or two people sharing a phone) could own an
        // unclaimed call: then nothing is adopted, and the person is called
        // again rather than risk taking another attempt's call.
        let rivals: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM wardcall.notification_attempts
              WHERE destination = $1 AND id <> $2 AND channel = 'voice' AND status IN ('intent','unknown') AND provider_id IS NULL
                AND created_at > clock_timestamp() - interval '1 hour'",
        )
        .bind(&a.destination)
        .bind(a.id)
        .fetch_one(pool)
        .await?;
        // The oldest unclaimed call since the intent is the one it created.
        let adopt = if rivals == 0 { candidates.iter().rev().find(|c| !known.contains(&c.sid)).map(|c| c.sid.clone()) } else { None };
        found.insert(a.id, adopt);
    }
    Ok(found)
}

/// How long (ms) an alert whose policy yielded nobody to call at all waits
/// before its tiers are resolved again (someone coming on shift is then called).
pub const NOBODY_RETRY_MS: i64 = 5_000;

/// The key of an escalation position in the run's recorded recipients
/// (`"<cycle>.<tier>"`, see [`recipients::recorded`]).
pub fn position_key(cycle: i32, step_index: i32) -> String {
    format!("{cycle}.{step_index}")
}

/// Open alerts whose policy yielded nobody to call, per policy: (policy id,
/// alerts, seconds since the oldest was found with nobody). For `wardcall status`.
pub async fn alerts_with_nobody_to_call(pool: &sqlx::PgPool) -> Result<Vec<(String, i64, f64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT policy, count(*), extract(epoch FROM clock_timestamp() - min(nobody_since))::float8
           FROM wardcall.alerts WHERE status = 'open' AND nobody_since IS NOT NULL GROUP BY policy ORDER BY policy",
    )
    .fetch_all(pool)
    .await
}

/// A tier's recipients, as [`tier_recipients`] found them.
struct TierRecipients {
    list: Vec<Recipient>,
    /// True when resolved by this execution (to be recorded with the
    /// intents); false when an earlier execution recorded the list.
    resolved_now: bool,
    /// What to audit (`alert.recipients_resolved`) when resolved now from a
    /// query, or when rows were skipped or the query failed; `None` for a
    /// tier of static people only (its intents say who was called).
    audit: Option<Value>,
}

/// The recipients of the tier at (`cycle`, `step_index`): the list recorded
/// in the run's state if an earlier execution resolved it (a takeover calls
/// the same people), otherwise resolved now ([`recipients::resolve`]) and
/// recorded in `ctx.state`. A failing query is tried once more, then the tier
/// goes on with its static people only (logged at error, audited
/// `alert.recipients_resolved` with the SQLSTATE): a broken query never holds
/// the alert (DESIGN.md invariant 10).
async fn tier_recipients(ctx: &mut StepContext<'_>, step: &PolicyStep, cycle: i32, step_index: i32) -> TierRecipients {
    let key = position_key(cycle, step_index);
    if let Some(list) = recipients::recorded(ctx.state, &key) {
        return TierRecipients { list, resolved_now: false, audit: None };
    }
    let engine = ctx.services.clone();
    // `$2`: the run's variables (kept by earlier steps of the workflow).
    let vars = crate::workflows::variables(ctx.state);
    let mut outcome = recipients::resolve(&engine.pool, &engine.config, &step.who, &ctx.run.input, &vars).await;
    if outcome.as_ref().err().and_then(|e| e.sqlstate()).is_some_and(|c| !c.starts_with("42")) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        outcome = recipients::resolve(&engine.pool, &engine.config, &step.who, &ctx.run.input, &vars).await;
    }
    let (resolved, failure) = match outcome {
        Ok(r) => (r, None),
        Err(e) => {
            tracing::error!(run = %ctx.run.id, cycle, step_index, error = %e, "resolving a tier's recipients failed; the tier calls its static people only");
            let failure = json!({"sqlstate": e.sqlstate(), "problem": "recipients query failed"});
            (recipients::static_people(&engine.config, &step.who), Some(failure))
        }
    };
    for skipped in &resolved.skipped {
        tracing::warn!(run = %ctx.run.id, cycle, step_index, recipient = ?skipped.id, channel = ?skipped.channel, reason = ?skipped.reason, "a recipients row was skipped");
    }
    recipients::record(ctx.state, &key, &resolved.recipients);
    let audit = (step.who.recipients.is_some() || failure.is_some() || !resolved.skipped.is_empty()).then(|| {
        let mut detail = resolved.audit_detail();
        detail["cycle"] = json!(cycle);
        detail["step_index"] = json!(step_index);
        if let Some(f) = failure {
            detail["query_failed"] = f;
        }
        detail
    });
    TierRecipients { list: resolved.recipients, resolved_now: true, audit }
}

/// Records a tier's freshly resolved list with the run's state (inside the
/// fenced transaction that records the intents, so an engine taking the run
/// over finds it) and audits it (ids, skipped rows and reasons; no names, no numbers).
async fn record_tier_recipients(tx: &mut PgConnection, ctx: &StepContext<'_>, alert_id: Uuid, audit: Option<&Value>, actor: &str) -> Result<(), StepError> {
    sqlx::query("UPDATE wardcall.runs SET state = $2 WHERE id = $1").bind(ctx.run.id).bind(&*ctx.state).execute(&mut *tx).await?;
    if let Some(detail) = audit {
        audit::record(tx, Entity::Alert, &alert_id.to_string(), "alert.recipients_resolved", None, None, actor, detail.clone()).await?;
    }
    Ok(())
}

/// Someone can be called again: clears the "nobody to call" alarm of the alert, if raised.
async fn recipients_found(tx: &mut PgConnection, alert_id: Uuid, actor: &str) -> Result<(), StepError> {
    let cleared =
        sqlx::query("UPDATE wardcall.alerts SET nobody_since = NULL WHERE id = $1 AND nobody_since IS NOT NULL").bind(alert_id).execute(&mut *tx).await?;
    if cleared.rows_affected() > 0 {
        audit::record(tx, Entity::Alert, &alert_id.to_string(), "alert.recipients_found", None, None, actor, json!({})).await?;
        tracing::info!(alert = %alert_id, "an alert that had nobody to call has recipients again");
    }
    Ok(())
}

/// A tier with nobody to call (no recipient with a voice number): audited
/// `alert.tier_empty` (position and count only) and the policy goes on to the
/// next tier at once. When every tier of the cycle was empty, the policy
/// yielded nobody at all: the alert stays open, `wardcall.alerts.nobody_since`
/// is set (listed by `wardcall status`), the first time is logged at error and
/// audited `alert.nobody_to_call`, and the cycle's tiers are resolved again
/// after [`NOBODY_RETRY_MS`], for ever, until someone can be called or the
/// alert is cancelled: never silence (DESIGN.md invariant 10).
#[allow(clippy::too_many_arguments)]
async fn empty_tier(
    ctx: &mut StepContext<'_>,
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    settings: &EscalationWorkflow,
    policy: &Policy,
    alert_id: Uuid,
    cycle: i32,
    step_index: i32,
    listed: usize,
) -> Result<Transition, StepError> {
    let actor = ctx.services.actor();
    // While the alarm is raised, the rounds that find nobody again are not
    // audited one by one (the alarm is, once, and `wardcall status` shows it).
    let alarmed: bool = sqlx::query_scalar("SELECT nobody_since IS NOT NULL FROM wardcall.alerts WHERE id = $1").bind(alert_id).fetch_one(&mut *tx).await?;
    if !alarmed {
        audit::record(
            &mut tx,
            Entity::Alert,
            &alert_id.to_string(),
            "alert.tier_empty",
            Some("open"),
            Some("open"),
            &actor,
            json!({"cycle": cycle, "step_index": step_index, "listed_without_voice": listed}),
        )
        .await?;
    }
    let tiers = policy.steps.len() as i32;
    let whole_cycle_empty = step_index + 1 >= tiers
        && (0..tiers).all(|j| recipients::recorded(ctx.state, &position_key(cycle, j)).is_some_and(|l| l.iter().all(|r| r.voice.is_none())));
    if let Some(o) = ctx.state.as_object_mut() {
        o.remove("step_deadline_ms");
    }
    if whole_cycle_empty {
        // (The alert row is locked by `open_alert`.)
        let first = sqlx::query("UPDATE wardcall.alerts SET nobody_since = clock_timestamp() WHERE id = $1 AND nobody_since IS NULL")
            .bind(alert_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if first {
            audit::record(
                &mut tx,
                Entity::Alert,
                &alert_id.to_string(),
                "alert.nobody_to_call",
                Some("open"),
                Some("open"),
                &actor,
                json!({"policy": policy.id, "cycle": cycle, "retry_ms": NOBODY_RETRY_MS}),
            )
            .await?;
        }
        tx.commit().await?;
        if first {
            tracing::error!(alert = %alert_id, policy = %policy.id, cycle, retry_ms = NOBODY_RETRY_MS, "ALARM: the policy yielded nobody to call; its tiers are resolved again until someone can be called");
        }
        recipients::forget(ctx.state, &format!("{cycle}."));
        ctx.state["step_index"] = json!(0);
        return Ok(Transition::Sleep { step: "call".into(), delay_ms: NOBODY_RETRY_MS });
    }
    tx.commit().await?;
    if alarmed {
        tracing::debug!(alert = %alert_id, cycle, step_index, "a tier still has nobody to call");
    } else {
        tracing::warn!(alert = %alert_id, cycle, step_index, "a tier has nobody to call; going on to the next tier at once");
    }
    let mut next = (cycle, step_index + 1);
    if next.1 >= tiers {
        next = (cycle + 1, 0);
    }
    if next.0 as u32 >= policy.repeat {
        // The end of the policy (people were called in an earlier tier): as after a timeout.
        return evaluate_position(ctx, settings, policy, Some(true)).await;
    }
    ctx.state["cycle"] = json!(next.0);
    ctx.state["step_index"] = json!(next.1);
    Ok(Transition::Next { step: "call".into() })
}

/// Opens the run's alert (once) and locks it. Returns its id, its status and
/// whether its "nobody to call" alarm is raised.
async fn open_alert(conn: &mut PgConnection, ctx: &StepContext<'_>, settings: &EscalationWorkflow, message: &str) -> Result<(Uuid, String, bool), StepError> {
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
        audit::record(
            conn,
            Entity::Alert,
            &id.to_string(),
            "alert.opened",
            None,
            Some("open"),
            &ctx.services.actor(),
            json!({"run_id": ctx.run.id, "policy": settings.policy}),
        )
        .await?;
    }
    let (id, status, nobody): (Uuid, String, bool) =
        sqlx::query_as("SELECT id, status, nobody_since IS NOT NULL FROM wardcall.alerts WHERE run_id = $1 FOR UPDATE")
            .bind(ctx.run.id)
            .fetch_one(&mut *conn)
            .await?;
    Ok((id, status, nobody))
}

async fn place_calls(ctx: &mut StepContext<'_>, settings: &EscalationWorkflow, policy: &Policy) -> Result<Transition, StepError> {
    let engine = ctx.services.clone();
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
    let ack_timeout_ms = (step.ack_timeout_seconds * 1000.0) as i64;
    // Twilio's Timeout is whole seconds; let the phone ring for most of the step's
    // budget, leaving time to hear the message and press 1 (min 5 s, max 600 s).
    let ring_timeout_seconds = ((step.ack_timeout_seconds * 0.6).floor() as u32).clamp(5, 600);
    // When an attempt without a final callback is fetched from the provider.
    let reconcile_after_ms = (ring_timeout_seconds as u64 * 1000 + crate::workflows::call_sweeper::RECONCILE_MARGIN.as_millis() as u64) as i64;

    // 0. An earlier execution's create requests whose outcome is unknown are
    //    reconciled with the provider first, outside any transaction.
    //    Only a takeover or a retry can find such intents; a first execution
    //    skips the look-up (if it ever were wrong, the rule below falls back to
    //    calling again, never to silence).
    let reconciled = if ctx.run.step_attempt > 0 || ctx.run.previous_status == "running" {
        reconcile_ambiguous(ctx, twilio, cycle, step_index).await?
    } else {
        HashMap::new()
    };
    // Who this tier calls: the list recorded at this position by an earlier
    // execution (a takeover calls the same people), or resolved now from the
    // config and the team's tables.
    let tier = tier_recipients(ctx, step, cycle, step_index).await;
    let callable: Vec<Recipient> = tier.list.iter().filter(|r| r.address(Channel::Voice).is_some()).cloned().collect();

    // 1. Record the intents (and the alert), fenced, in one transaction.
    let mut tx = engine.pool.begin().await?;
    if !lock_fenced(&mut tx, ctx.run.id, ctx.run.fencing_token).await? {
        return Err(StepError::LeaseLost);
    }
    let (alert_id, alert_status, nobody_alarm) = open_alert(&mut tx, ctx, settings, &message).await?;
    ctx.state["alert_id"] = json!(alert_id);
    if alert_status != "open" {
        tx.commit().await?;
        return Ok(Transition::Complete);
    }
    // A list from a query is recorded with the intents (a takeover must call
    // the same people); a tier of static people only is the config's, the
    // same after a takeover: recording it would cost a statement before every call.
    if tier.resolved_now && (step.who.recipients.is_some() || tier.audit.is_some()) {
        record_tier_recipients(&mut tx, ctx, alert_id, tier.audit.as_ref(), &actor).await?;
    }
    if callable.is_empty() {
        return empty_tier(ctx, tx, settings, policy, alert_id, cycle, step_index, tier.list.len()).await;
    }
    if nobody_alarm {
        recipients_found(&mut tx, alert_id, &actor).await?;
    }
    let existing = latest_attempts(&mut tx, ctx.run.id, cycle, step_index).await?;
    if existing.is_empty() && (cycle, step_index) != (0, 0) {
        audit::record(
            &mut tx,
            Entity::Alert,
            &alert_id.to_string(),
            "alert.escalated",
            Some("open"),
            Some("open"),
            &actor,
            json!({"cycle": cycle, "step_index": step_index}),
        )
        .await?;
        write_back(&mut tx, settings.write_back.on_escalated.as_deref(), "on_escalated", &ctx.run.input, WriteBackSubject::Alert(alert_id), &actor).await?;
    }
    let mut to_place: Vec<(Uuid, String, String)> = Vec::new(); // attempt, person, phone
    for person in &callable {
        let person_id = &person.id;
        let phone = person.voice.clone().unwrap_or_default();
        let latest = existing.iter().find(|a| &a.person_id == person_id);
        let generation = match latest {
            None => 0,
            Some(a) if a.ambiguous(ctx.run.fencing_token) => match reconciled.get(&a.id) {
                Some(Some(sid)) => {
                    // The provider did create it: adopt the call, never place it again.
                    sqlx::query(
                        "UPDATE wardcall.notification_attempts SET provider_id = $2, status = 'requested',
                                requested_at = coalesce(requested_at, clock_timestamp()), updated_at = clock_timestamp()
                          WHERE id = $1 AND provider_id IS NULL",
                    )
                    .bind(a.id)
                    .bind(sid)
                    .execute(&mut *tx)
                    .await?;
                    audit::record(
                        &mut tx,
                        Entity::NotificationAttempt,
                        &a.id.to_string(),
                        "attempt.reconciled",
                        Some("intent"),
                        Some("requested"),
                        &actor,
                        json!({"call_sid": sid, "rule": "found in the provider's call list"}),
                    )
                    .await?;
                    tracing::info!(attempt = %a.id, call_sid = %sid, "an ambiguous create-call had placed the call; adopted it instead of calling again");
                    continue;
                }
                _ => {
                    // The provider has no call for it: the outcome was "not placed"
                    // (or is still unknown after the provider's answer): re-call rule.
                    let marked = sqlx::query(
                        "UPDATE wardcall.notification_attempts SET status = 'unknown', updated_at = clock_timestamp(),
                                error = 'create-call outcome unknown and no such call at the provider'
                          WHERE id = $1 AND status = 'intent' AND provider_id IS NULL",
                    )
                    .bind(a.id)
                    .execute(&mut *tx)
                    .await?;
                    if marked.rows_affected() == 0 {
                        // A late create response (from an engine that lost the
                        // run) confirmed the call meanwhile: never call twice.
                        continue;
                    }
                    audit::record(
                        &mut tx,
                        Entity::NotificationAttempt,
                        &a.id.to_string(),
                        "attempt.outcome_unknown",
                        Some("intent"),
                        Some("unknown"),
                        &actor,
                        json!({"rule": "re-call", "provider_has_call": false}),
                    )
                    .await?;
                    a.generation + 1
                }
            },
            Some(_) => continue, // placed (or being reported on by callbacks): never call twice
        };
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO wardcall.notification_attempts
                 (alert_id, run_id, cycle, step_index, person_id, generation, channel, destination, provider, status, fencing_token,
                  reconcile_after, person_name)
             VALUES ($1, $2, $3, $4, $5, $6, 'voice', $7, 'twilio', 'intent', $8, clock_timestamp() + $9 * interval '1 millisecond', $10)
             RETURNING id",
        )
        .bind(alert_id)
        .bind(ctx.run.id)
        .bind(cycle)
        .bind(step_index)
        .bind(person_id)
        .bind(generation)
        .bind(&phone)
        .bind(ctx.run.fencing_token)
        .bind(reconcile_after_ms)
        .bind(&person.name)
        .fetch_one(&mut *tx)
        .await?;
        audit::record(
            &mut tx,
            Entity::NotificationAttempt,
            &id.to_string(),
            "attempt.intent",
            None,
            Some("intent"),
            &actor,
            json!({"person_id": person_id, "cycle": cycle, "step_index": step_index, "generation": generation}),
        )
        .await?;
        to_place.push((id, person_id.clone(), phone));
    }
    tx.commit().await?;

    // 2. Place the calls, outside any transaction, in parallel.
    let calls = to_place.iter().map(|(attempt_id, person_id, phone)| {
        let engine = engine.clone();
        let message = message.clone();
        async move {
            let base = &engine.public_url;
            let action = crate::providers::twilio::callback_url(base, "gather", *attempt_id);
            let gather_timeout = twilio.config.gather_timeout_seconds;
            // The message is shortened to fit Twilio's inline TwiML limit,
            // keeping its start and the keypad instruction (invariant 10).
            let twiml = twiml::say_and_gather_within(&message, &action, gather_timeout, MAX_INLINE_TWIML_CHARS)
                .unwrap_or_else(|| twiml::say_and_gather(twiml::FALLBACK_MESSAGE, &action, gather_timeout));
            let mut req = CreateCallRequest {
                to: phone.clone(),
                from: twilio.config.from.clone(),
                twiml,
                status_callback: crate::providers::twilio::callback_url(base, "status", *attempt_id),
                ring_timeout_seconds,
                machine_detection: twilio.config.machine_detection,
                async_amd_status_callback: twilio.config.machine_detection.then(|| crate::providers::twilio::callback_url(base, "amd", *attempt_id)),
            };
            // No retry of an ambiguous failure here (a timeout, a 5xx): it may
            // have placed the call. The step is retried under a new fencing
            // token, and the re-call rule asks the provider first. A refusal for
            // the content placed nothing: the same person is called at once
            // with the short fallback message instead of being skipped.
            let mut result = twilio.client.create_call(&req).await;
            let mut content_refused = None;
            if let Err(e) = &result {
                if e.is_content_refusal() {
                    content_refused = Some(e.clone());
                    req.twiml = twiml::say_and_gather(twiml::FALLBACK_MESSAGE, &action, gather_timeout);
                    result = twilio.client.create_call(&req).await;
                }
            }
            PlacedCall { attempt_id: *attempt_id, person_id: person_id.clone(), phone: phone.clone(), result, content_refused }
        }
    });
    let results = futures_util::future::join_all(calls).await;
    // Record every result before returning any error, so no placed call loses its CallSid.
    let mut retry_step: Option<String> = None;
    for placed in &results {
        match record_with_retry(ctx, settings, &actor, placed).await {
            Ok(None) => {}
            Ok(Some(transient)) => retry_step = Some(transient),
            Err(e) => {
                retry_step.get_or_insert_with(|| e.to_string());
            }
        }
    }
    if let Some(why) = retry_step {
        return Err(StepError::Retryable(anyhow!("{why}")));
    }
    let deadline = jiff::Timestamp::now().as_millisecond() + ack_timeout_ms;
    if ctx.state.get("step_deadline_ms").is_none() || to_place.len() == callable.len() {
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
    let engine = ctx.services.clone();
    let actor = engine.actor();
    let (cycle, step_index) = position(ctx.state);
    let alert_id: Uuid = ctx
        .state
        .get("alert_id")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StepError::Permanent(anyhow!("escalation state has no alert_id")))?;
    // The SMS fallback of failed calls (its own intents and requests, before
    // this evaluation's transaction).
    // Only when the last evaluation found a failed call not yet texted
    // (`state.sms_fallback_due`, committed with it) or after a retry or a
    // takeover (an ambiguous text to reconcile): otherwise an evaluation costs
    // no statement for the fallback beyond `fallback_due` below.
    let sms_fallback = policy.steps.get(step_index as usize).is_some_and(|s| s.sms_fallback);
    let flagged = ctx.state.get("sms_fallback_due").and_then(Value::as_bool).unwrap_or(false);
    if sms_fallback && (flagged || ctx.run.step_attempt > 0 || ctx.run.previous_status == "running") {
        let tier = recipients::recorded(ctx.state, &position_key(cycle, step_index)).unwrap_or_default();
        crate::notify::sms::send_fallbacks(&engine, ctx.run, alert_id, cycle, step_index, &tier).await?;
        if let Some(o) = ctx.state.as_object_mut() {
            o.remove("sms_fallback_due");
        }
    }
    let mut tx = engine.pool.begin().await?;
    if !lock_fenced(&mut tx, ctx.run.id, ctx.run.fencing_token).await? {
        return Err(StepError::LeaseLost);
    }
    let alert_status: String = sqlx::query_scalar("SELECT status FROM wardcall.alerts WHERE id = $1 FOR UPDATE").bind(alert_id).fetch_one(&mut *tx).await?;
    if alert_status != "open" {
        tx.commit().await?;
        if alert_status == "acknowledged" {
            end_ringing_calls(ctx, alert_id).await;
        }
        return Ok(Transition::Complete);
    }
    if sms_fallback && crate::notify::sms::fallback_due(&mut tx, ctx.run.id, cycle, step_index).await? {
        // A call failed and its person is not texted yet: evaluate again at
        // once, which sends the text (outside this transaction).
        tx.commit().await?;
        ctx.state["sms_fallback_due"] = json!(true);
        return Ok(Transition::Next { step: "await".into() });
    }
    let attempts = latest_attempts(&mut tx, ctx.run.id, cycle, step_index).await?;
    // A text that can still be answered keeps the step waiting for its timeout.
    let all_failed = !attempts.is_empty()
        && attempts.iter().all(Attempt::definitively_failed)
        && !(sms_fallback && crate::notify::sms::fallback_pending(&mut tx, ctx.run.id, cycle, step_index).await?);
    let declined = attempts.iter().any(|a| a.declined_at_set);
    let now = jiff::Timestamp::now().as_millisecond();
    let deadline = ctx.state.get("step_deadline_ms").and_then(Value::as_i64).unwrap_or(now);
    // A human on the line (answered, not a machine, no key yet) gets time to
    // hear the message and press a key: the step does not expire under them.
    let human_on_line = attempts.iter().any(|a| a.status == "in-progress" && !a.machine() && !a.declined_at_set && !a.acknowledged_at_set);
    let grace_deadline = deadline + HUMAN_ON_LINE_GRACE_MS;
    let expired = (timed_out == Some(true) || deadline <= now) && !(human_on_line && now < grace_deadline);
    // Voicemail calls still connected: hang them up (never an acknowledgement).
    let machines: Vec<String> =
        attempts.iter().filter(|a| a.machine() && !TERMINAL_CALL_STATUSES.contains(&a.status.as_str())).filter_map(|a| a.provider_id.clone()).collect();
    if !(all_failed || declined || expired) {
        tx.commit().await?;
        end_calls(ctx, &machines).await;
        let until = if deadline <= now { grace_deadline } else { deadline };
        return Ok(Transition::Wait { step: "await".into(), signal: CALL_UPDATE_SIGNAL.into(), timeout_ms: (until - now).max(1) });
    }
    let reason = if declined {
        "declined"
    } else if all_failed {
        "all_calls_failed"
    } else {
        "ack_timeout"
    };
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
        audit::record(
            &mut tx,
            Entity::Alert,
            &alert_id.to_string(),
            "alert.unacknowledged",
            Some("open"),
            Some("unacknowledged"),
            &actor,
            json!({"reason": reason, "cycles": policy.repeat}),
        )
        .await?;
        write_back(&mut tx, settings.write_back.on_unacknowledged.as_deref(), "on_unacknowledged", &ctx.run.input, WriteBackSubject::Alert(alert_id), &actor)
            .await?;
        tx.commit().await?;
        end_calls(ctx, &machines).await;
        tracing::warn!(alert = %alert_id, "alert unacknowledged after the whole policy");
        return Ok(Transition::Complete);
    }
    audit::record(
        &mut tx,
        Entity::Alert,
        &alert_id.to_string(),
        "alert.step_ended",
        Some("open"),
        Some("open"),
        &actor,
        json!({"reason": reason, "cycle": cycle, "step_index": step_index}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(alert = %alert_id, reason, from_cycle = cycle, from_step = step_index, to_cycle = next.0, to_step = next.1, "alert escalated");
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
          WHERE alert_id = $1 AND provider_id IS NOT NULL AND acknowledged_at IS NULL AND channel = 'voice'
            AND status IN ('requested','initiated','ringing','in-progress')",
    )
    .bind(alert_id)
    .fetch_all(&ctx.services.pool)
    .await
    .unwrap_or_default();
    end_calls(ctx, &sids).await;
}

async fn end_calls(ctx: &StepContext<'_>, sids: &[String]) {
    let Some(twilio) = ctx.services.providers.twilio.as_ref() else { return };
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
        // The recipient's id and name (`person_id`, `person_name`) come with the attempt's details.
        WriteBackSubject::Attempt(id) => {
            sqlx::query_scalar("SELECT wardcall.attempt_details($1) || wardcall.attempt_recipient($1)").bind(id).fetch_one(&mut *conn).await?
        }
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
