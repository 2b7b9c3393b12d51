//! The escalation workflow: an alert row commits; the people of the policy's
//! first step are called; the message is read aloud; whoever presses 1 first
//! acknowledges. No acknowledgement within the step's timeout, or every call of
//! the step definitively failed (busy, no answer, failed, voicemail, hung up
//! without a key) or someone pressed 2: the next step is called. After the
//! policy has run `repeat` times the alert is marked `unacknowledged`.
//!
//! Steps of the state machine:
//! - `start`: looks up the message's values, renders it, opens the alert and
//!   places the first step's calls (as `call` does); when the run's dispatch
//!   already opened the alert and committed those calls' intents
//!   ([`tier_at_dispatch`]: a first step of the config's people), it places
//!   them and writes the message to the alert once they are answered;
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

use super::team_sql::{self, write_back, WriteBackSubject};
use super::{StepContext, StepError, Transition};
use crate::config::{EscalationWorkflow, Policy, PolicyStep};
use crate::db::batches::BatchQueue;
use crate::db::deadline::{within, HeldConnection};
use crate::notify::channel::{ChannelSender, Content, Outgoing};
use crate::notify::delivery::{self, NotLookedUp, OnSent};
use crate::notify::recipients;
use crate::notify::{Channel, Recipient};
use crate::runtime::step::DispatchedTier;
use crate::store::attempts::{self, AttemptRow, Position};
use crate::store::audit::{self, Entity};
use crate::store::{alerts, runs};
use crate::template::Template;
use anyhow::anyhow;
use serde_json::{json, Value};
use sqlx::PgConnection;
use std::collections::HashMap;
use uuid::Uuid;

/// Signal name the webhooks send to an escalation run on every call event
/// that can change its decision: a final status, a machine verdict, a
/// keypress, an acknowledgement, a text's status (progress is recorded, not signalled).
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

/// Renders the alert's message. The lookups run read-only on the team-read
/// pool ([`team_sql::run_lookups`]: one statement for all, one round trip),
/// bounded by [`LOOKUP_STATEMENT_TIMEOUT_MS`] and [`LOOKUP_LOCK_TIMEOUT_MS`]; a lookup that fails, times out, or returns
/// more than one row renders without its value, and is logged and audited
/// (`lookup.failed`, `lookup.ambiguous`) by name and SQLSTATE, never with
/// the row's data. A lookup never stops a call.
///
/// A new run's lookups may have been read ahead by the dispatcher while the
/// run's creation committed ([`prefetch_lookups`]); they are then taken from
/// there, read over the same payload a millisecond or so earlier.
async fn render_message(ctx: &mut StepContext<'_>, settings: &EscalationWorkflow) -> Result<String, StepError> {
    let template = Template::parse(&settings.message).map_err(|e| StepError::Permanent(anyhow!(e)))?;
    let mut values = HashMap::new();
    let sqls: Vec<&str> = settings.lookups.values().map(|sql| sql.as_str()).collect();
    let prefetched = match ctx.prefetched.take() {
        Some(p) => p.take::<PrefetchedLookups>().await.filter(|p| p.sqls.iter().map(String::as_str).eq(sqls.iter().copied())),
        None => None,
    };
    let outcomes = match prefetched {
        Some(p) => p.outcomes,
        None => team_sql::run_lookups(&ctx.services.team_reads, &sqls, &ctx.run.input).await,
    };
    for ((name, _), outcome) in settings.lookups.iter().zip(outcomes) {
        match outcome {
            Ok(team_sql::LookupOutcome::Value(v)) => {
                values.insert(name.clone(), v);
            }
            Ok(team_sql::LookupOutcome::Empty) => {}
            Ok(team_sql::LookupOutcome::Ambiguous) => {
                tracing::error!(run = %ctx.run.id, lookup = %name, "lookup returned more than one row (config fault); its value renders empty");
                audit_lookup_fault(ctx, name, "lookup.ambiguous", json!({"lookup": name, "rows": "more than one"})).await;
            }
            Ok(team_sql::LookupOutcome::NotText) => {
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

/// An escalation's lookups read ahead by the dispatcher ([`prefetch_lookups`]).
struct PrefetchedLookups {
    /// The lookups' statements, in order (checked against the step's own).
    sqls: Vec<String>,
    /// One outcome per lookup, as [`team_sql::run_lookups`] returns them.
    outcomes: Vec<Result<team_sql::LookupOutcome, sqlx::Error>>,
}

/// The read-ahead of a new run of `w` over the payload `input`
/// ([`crate::runtime::step::WorkflowHost::prefetch_first_step`]): when `w`'s
/// first step is an escalation with lookups, those lookups
/// ([`team_sql::run_lookups`] on the team-read pool: read-only, bounded by
/// the wait for a connection, `engine.acquire_timeout_ms`, and their 2 s
/// statement timeout, as when the step runs them) as a [`PrefetchedLookups`]. The rendering
/// ([`render_message`]) takes them; anything else (faults audited, the
/// message) stays with the step. `None` for any other workflow.
pub fn prefetch_lookups(
    services: &crate::runtime::Services,
    w: &crate::config::Workflow,
    input: &Value,
) -> Option<futures_util::future::BoxFuture<'static, Box<dyn std::any::Any + Send>>> {
    let settings = w.steps.first()?.escalate.as_deref()?;
    if settings.lookups.is_empty() {
        return None;
    }
    let sqls: Vec<String> = settings.lookups.values().cloned().collect();
    let (reads, input) = (services.team_reads.clone(), input.clone());
    Some(Box::pin(async move {
        let statements: Vec<&str> = sqls.iter().map(String::as_str).collect();
        let outcomes = team_sql::run_lookups(&reads, &statements, &input).await;
        Box::new(PrefetchedLookups { sqls, outcomes }) as Box<dyn std::any::Any + Send>
    }))
}

async fn audit_lookup_fault(ctx: &StepContext<'_>, name: &str, action: &str, detail: Value) {
    let result = ctx
        .services
        .bounded(async {
            let mut conn = ctx.services.pool.acquire().await?;
            audit::record(&mut conn, Entity::Run, &ctx.run.id.to_string(), action, None, None, &ctx.services.actor(), detail).await
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(lookup = %name, error = %crate::capture::db_message(&e), "auditing a lookup fault failed");
    }
}

fn position(state: &Value) -> (i32, i32) {
    (state.get("cycle").and_then(Value::as_i64).unwrap_or(0) as i32, state.get("step_index").and_then(Value::as_i64).unwrap_or(0) as i32)
}

/// Whether a call's answering-machine verdict says a machine answered.
fn machine(a: &AttemptRow) -> bool {
    crate::notify::acknowledgement::is_machine(a.answered_by.as_deref())
}

/// This call can no longer produce an acknowledgement.
fn definitively_failed(a: &AttemptRow) -> bool {
    !a.acknowledged && (TERMINAL_CALL_STATUSES.contains(&a.status.as_str()) || machine(a) || a.declined)
}

/// The escalation position (`cycle`, `step_index`) of `run` among the attempts.
fn voice_position(run: Uuid, cycle: i32, step_index: i32) -> Position<'static> {
    Position { run, step_key: "", cycle, step_index }
}

/// How long (ms) an alert whose policy yielded nobody to call at all waits
/// before its tiers are resolved again (someone coming on shift is then called).
pub const NOBODY_RETRY_MS: i64 = 5_000;

/// The key of an escalation position in the run's recorded recipients
/// (`"<cycle>.<tier>"`, see [`recipients::recorded`]).
pub fn position_key(cycle: i32, step_index: i32) -> String {
    format!("{cycle}.{step_index}")
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
    // Tried once more unless the query itself is at fault (SQLSTATE class
    // 42: syntax, an undefined column): a timeout, a conflict, or an error
    // without a SQLSTATE (a connection cut under it) may pass the second time.
    if outcome.as_ref().err().is_some_and(|e| e.sqlstate().map_or(true, |c| !c.starts_with("42"))) {
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
    ctx.save_state(tx).await?;
    if let Some(detail) = audit {
        audit::record(tx, Entity::Alert, &alert_id.to_string(), "alert.recipients_resolved", None, None, actor, detail.clone()).await?;
    }
    Ok(())
}

/// What a tier's transaction did ([`place_calls`], the general path).
enum TierOpening {
    /// The alert is no longer open: the run is complete.
    Closed,
    /// Nobody of the tier can be called ([`record_empty_tier`]).
    Empty(EmptyTier),
    /// The intents committed, one per call to place.
    Intents(Vec<Outgoing>),
}

/// What [`record_empty_tier`] recorded, for [`after_empty_tier`].
struct EmptyTier {
    alert_id: Uuid,
    /// The alarm was raised before this tier (its rounds are not audited again).
    alarmed: bool,
    /// Every tier of the cycle was empty: the policy yielded nobody at all.
    whole_cycle_empty: bool,
    /// This tier raised the alarm (the first time nobody could be called).
    first_alarm: bool,
}

/// A tier with nobody to call (no recipient with a voice number), in the
/// tier's transaction: audited `alert.tier_empty` (position and count only).
/// When every tier of the cycle was empty, the policy yielded nobody at all:
/// `wardcall.alerts.nobody_since` is set (listed by `wardcall status`) and
/// the first time is audited `alert.nobody_to_call` (not again while that
/// alarm is raised). [`after_empty_tier`] decides what follows, after the
/// commit.
#[allow(clippy::too_many_arguments)]
async fn record_empty_tier(
    tx: &mut PgConnection,
    ctx: &StepContext<'_>,
    policy: &Policy,
    alert: &alerts::LockedAlert,
    cycle: i32,
    step_index: i32,
    listed: usize,
) -> Result<EmptyTier, StepError> {
    let actor = ctx.services.actor();
    let alert_id = alert.id;
    // While the alarm is raised, the rounds that find nobody again are not
    // audited one by one (the alarm is, once, and `wardcall status` shows it).
    let alarmed = alert.nobody_alarm;
    if !alarmed {
        let detail = json!({"cycle": cycle, "step_index": step_index, "listed_without_voice": listed});
        alerts::audit_open(tx, alert_id, "alert.tier_empty", detail, &actor).await?;
    }
    let tiers = policy.steps.len() as i32;
    let whole_cycle_empty = step_index + 1 >= tiers
        && (0..tiers).all(|j| recipients::recorded(ctx.state, &position_key(cycle, j)).is_some_and(|l| l.iter().all(|r| r.voice.is_none())));
    let mut first_alarm = false;
    if whole_cycle_empty {
        // (The alert row is locked by `fence_and_open`.)
        let detail = json!({"policy": policy.id, "cycle": cycle, "retry_ms": NOBODY_RETRY_MS});
        first_alarm = alerts::raise_nobody_alarm(tx, alert_id, detail, &actor).await?;
    }
    Ok(EmptyTier { alert_id, alarmed, whole_cycle_empty, first_alarm })
}

/// After an empty tier committed ([`record_empty_tier`]): the policy goes on
/// to the next tier at once; when the whole cycle was empty, the cycle's
/// tiers are resolved again after [`NOBODY_RETRY_MS`], for ever, until
/// someone can be called or the alert is cancelled: never silence
/// (DESIGN.md invariant 10).
async fn after_empty_tier(
    ctx: &mut StepContext<'_>,
    settings: &EscalationWorkflow,
    policy: &Policy,
    empty: EmptyTier,
    cycle: i32,
    step_index: i32,
) -> Result<Transition, StepError> {
    let alert_id = empty.alert_id;
    if let Some(o) = ctx.state.as_object_mut() {
        o.remove("step_deadline_ms");
    }
    if empty.whole_cycle_empty {
        if empty.first_alarm {
            tracing::error!(alert = %alert_id, policy = %policy.id, cycle, retry_ms = NOBODY_RETRY_MS, "ALARM: the policy yielded nobody to call; its tiers are resolved again until someone can be called");
        }
        recipients::forget(ctx.state, &format!("{cycle}."));
        ctx.state["step_index"] = json!(0);
        return Ok(Transition::Sleep { step: "call".into(), delay_ms: NOBODY_RETRY_MS });
    }
    if empty.alarmed {
        tracing::debug!(alert = %alert_id, cycle, step_index, "a tier still has nobody to call");
    } else {
        tracing::warn!(alert = %alert_id, cycle, step_index, "a tier has nobody to call; going on to the next tier at once");
    }
    let tiers = policy.steps.len() as i32;
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

/// Twilio's ring `Timeout` for a tier of `step` (whole seconds): most of the
/// step's budget, leaving time to hear the message and press 1 (min 5 s,
/// max 600 s); and when an attempt of it without a final callback is
/// fetched from the provider (milliseconds after its intent).
fn ring_and_reconcile(step: &PolicyStep) -> (u32, i64) {
    let ring_timeout_seconds = ((step.ack_timeout_seconds * 0.6).floor() as u32).clamp(5, 600);
    let reconcile_after_ms = (ring_timeout_seconds as u64 * 1000 + crate::notify::call_sweeper::RECONCILE_MARGIN.as_millis() as u64) as i64;
    (ring_timeout_seconds, reconcile_after_ms)
}

/// The first tier a new run of `w` has its dispatch open
/// ([`crate::runtime::step::WorkflowHost::first_tier_at_dispatch`]): when
/// `w`'s first step is an escalation whose policy's first step calls
/// people of the config only (no `recipients` query, none skipped), the
/// tier exactly as [`place_calls`] records it for a run's first execution:
/// the same people reachable by voice, position (0, 0), the voice provider,
/// the same reconciliation time. `None` otherwise (a query, a skipped
/// person, nobody callable, no voice provider): the step opens its tier.
pub fn tier_at_dispatch(services: &crate::runtime::Services, w: &crate::config::Workflow) -> Option<alerts::TierIntents> {
    let settings = w.steps.first()?.escalate.as_deref()?;
    let step = services.config.policy(&settings.policy)?.steps.first()?;
    if step.who.recipients.is_some() {
        return None;
    }
    let resolved = recipients::static_people(&services.config, &step.who);
    if !resolved.skipped.is_empty() {
        return None;
    }
    let people: Vec<alerts::FirstIntent> = resolved
        .recipients
        .iter()
        .filter_map(|p| Some(alerts::FirstIntent { person_id: p.id.clone(), person_name: p.name.clone(), destination: p.address(Channel::Voice)?.to_string() }))
        .collect();
    if people.is_empty() {
        return None;
    }
    let provider = voice_sender(services).ok()?.provider().to_string();
    Some(alerts::TierIntents {
        policy: settings.policy.clone(),
        position: (0, 0),
        channel: Channel::Voice.as_str().to_string(),
        provider,
        reconcile_after_ms: ring_and_reconcile(step).1,
        recipients: people,
    })
}

/// The voice channel's sender, or a permanent step error when none is configured.
fn voice_sender(services: &crate::runtime::Services) -> Result<&dyn ChannelSender, StepError> {
    services.providers.sender(Channel::Voice).ok_or_else(|| StepError::Permanent(anyhow!("no voice provider configured")))
}

/// How long after its dispatch's statement was sent a dispatched first
/// tier's calls go out without asking the database whether the run is still
/// this execution's: the dispatch fenced it, and its lease
/// (`engine.lease_ms`, 500 ms at least) has most of its time left. Past
/// these 100 ms (a lookup waiting for a connection, or a commit that took
/// long: a lease may have lapsed and the run been taken over) the step
/// renews the lease under its token first ([`runs::renew_if_held`]) and
/// calls only if it still holds the run. A cancel (the alert resolved)
/// that came after these 100 ms stops the calls; one within them does not
/// (the call sweeper ends the calls of a closed alert). Normally the calls
/// leave about 1 ms after the statement was sent.
const DISPATCHED_TIER_FRESH: std::time::Duration = std::time::Duration::from_millis(100);

/// Most first tiers opened in one statement ([`FirstTierOpener`]).
pub const FIRST_TIER_BATCH_MAX: usize = 64;

/// The first tiers of this engine's runs, opened in batches
/// ([`alerts::open_first_tiers`], one batch at a time, up to
/// [`FIRST_TIER_BATCH_MAX`], runs whose row is held elsewhere left out):
/// during a burst every worker reaches its alert's first tier at about the
/// same time, and one statement and one commit for all of them leaves the
/// CPU to the calls (BENCHMARKS.md, "Issue 9, ninth session"). A lone
/// alert's tier is served at once. `None`: the batch failed; the tier is
/// opened alone.
struct FirstTierOpener(BatchQueue<alerts::FirstTier, Option<alerts::OpenedWithIntents>>);

/// Opens a run's first tier through the engine's [`FirstTierOpener`]; a
/// tier its batch left out (its run's row was held, or the batch failed)
/// is opened alone, waiting for the row ([`alerts::open_with_intents`]),
/// so that a fault of one tier is its own.
///
/// Errors: the database's, from the tier opened alone, or
/// [`crate::db::deadline::NoReply`] (each statement is bounded by
/// `engine.database_deadline_ms`; a batch that gets no reply falls back
/// to opening its tiers alone).
async fn open_first_tier(services: &crate::runtime::Services, tier: alerts::FirstTier) -> Result<alerts::OpenedWithIntents, sqlx::Error> {
    let deadline = services.config.engine.database_deadline();
    let opener = services.shared(|| {
        let pool = services.pool.clone();
        FirstTierOpener(BatchQueue::start(
            FIRST_TIER_BATCH_MAX,
            |_, _| true,
            move |batch: Vec<alerts::FirstTier>| {
                let pool = pool.clone();
                async move {
                    let opened = async {
                        let mut conn = HeldConnection::acquire(&pool).await?;
                        let opened = within(deadline, alerts::open_first_tiers(&mut conn, &batch, alerts::RunLocks::SkipLocked)).await;
                        conn.settle(opened)
                    };
                    match opened.await {
                        Ok(outcomes) => outcomes.into_iter().map(Some).collect(),
                        Err(e) => {
                            tracing::warn!(tiers = batch.len(), error = %crate::capture::db_message(&e), "a batch of first tiers failed; opening them one by one");
                            vec![None; batch.len()]
                        }
                    }
                }
            },
        ))
    });
    match opener.0.submit(tier.clone()).await {
        Ok(Some(alerts::OpenedWithIntents::Busy) | None) | Err(_) => {
            let mut conn = HeldConnection::acquire(&services.pool).await?;
            let opened = within(deadline, alerts::open_with_intents(&mut conn, &tier)).await;
            conn.settle(opened)
        }
        Ok(Some(outcome)) => Ok(outcome),
    }
}

async fn place_calls(ctx: &mut StepContext<'_>, settings: &EscalationWorkflow, policy: &Policy) -> Result<Transition, StepError> {
    let services = ctx.services.clone();
    let voice = voice_sender(&services)?;
    let message = ctx.state.get("message").and_then(Value::as_str).unwrap_or_default().to_string();
    let (cycle, step_index) = position(ctx.state);
    let pos = voice_position(ctx.run.id, cycle, step_index);
    let actor = services.actor();
    // The first tier the run's dispatch opened (`tier_at_dispatch`), if any.
    let dispatched = ctx.first_tier_opened.take();
    let Some(step) = policy.steps.get(step_index as usize) else {
        // The policy lost steps in a config change while this run was on them:
        // nobody is left to call at this position.
        tracing::error!(run = %ctx.run.id, step_index, "the policy has no such step (config changed?); escalating past it");
        return evaluate_position(ctx, settings, policy, Some(true)).await;
    };
    let ack_timeout_ms = (step.ack_timeout_seconds * 1000.0) as i64;
    let (ring_timeout_seconds, reconcile_after_ms) = ring_and_reconcile(step);

    // 0. An earlier execution's sends whose outcome is unknown are reconciled
    //    with the provider first, outside any transaction. Only a takeover or
    //    a retry can find such intents; a first execution skips the look-up
    //    (if it ever were wrong, the re-send rule falls back to calling
    //    again, never to silence).
    let reconciled = if ctx.run.step_attempt > 0 || ctx.run.previous_status == "running" {
        let existing = services
            .bounded(async {
                let mut conn = services.pool.acquire().await?;
                attempts::latest_per_person(&mut conn, pos, Channel::Voice.as_str()).await
            })
            .await?;
        delivery::reconcile(&services, voice, &existing, ctx.run.fencing_token, None, delivery::Unverified::ResendAfter30s).await?
    } else {
        delivery::Reconciled::new()
    };
    // Who this tier calls: the list recorded at this position by an earlier
    // execution (a takeover calls the same people), or resolved now from the
    // config and the team's tables.
    let tier = tier_recipients(ctx, step, cycle, step_index).await;
    let callable: Vec<Recipient> = tier.list.iter().filter(|r| r.address(Channel::Voice).is_some()).cloned().collect();

    // 1. Record the intents (and the alert), fenced. A run's first tier (no
    //    alert yet, nothing to reconcile, no recipient list to record) is
    //    one autocommit statement; anything else is one transaction.
    let first_tier = ctx.state.get("alert_id").is_none()
        && ctx.run.step_attempt == 0
        && ctx.run.previous_status != "running"
        && (cycle, step_index) == (0, 0)
        && !(tier.resolved_now && (step.who.recipients.is_some() || tier.audit.is_some()))
        && !callable.is_empty();
    let mut opened: Option<Vec<Outgoing>> = None;
    // The alert opened by the run's dispatch, without its message: written
    // once the calls' requests are answered.
    let mut message_unwritten: Option<Uuid> = None;
    if dispatched.is_some() && !first_tier {
        // Not expected (a dispatch opens only tiers the step would open so).
        // The general path would find the dispatch's intents under this
        // execution's own token and take them for placed: the step is retried
        // instead, under a new token, where the re-call rule applies.
        tracing::error!(run = %ctx.run.id, "the dispatch opened a first tier the step would not; retrying the step");
        return Err(StepError::Retryable(anyhow!("the dispatch opened a first tier this step would not open")));
    }
    if first_tier {
        let outcome = match dispatched {
            Some(DispatchedTier { opened, sent_at }) => {
                // Fenced when the dispatch committed; a step that took long
                // to get here (a lookup waiting for a connection, a slow
                // commit) renews its lease and checks that the run is still
                // its own (not taken over, not cancelled) before it calls.
                ctx.check_lease()?;
                if sent_at.elapsed() > DISPATCHED_TIER_FRESH {
                    let lease_ms = services.config.engine.lease_ms as i64;
                    if !services.bounded(runs::renew_if_held(&services.pool, ctx.run.id, ctx.run.fencing_token, lease_ms)).await? {
                        return Err(StepError::LeaseLost);
                    }
                }
                if let alerts::OpenedWithIntents::Opened { alert, .. } = &opened {
                    message_unwritten = Some(*alert);
                }
                opened
            }
            None => {
                let tier = alerts::FirstTier {
                    run: ctx.run.id,
                    token: ctx.run.fencing_token,
                    workflow: ctx.workflow.name.clone(),
                    policy: settings.policy.clone(),
                    message: message.clone(),
                    position: (cycle, step_index),
                    channel: Channel::Voice.as_str().to_string(),
                    provider: voice.provider().to_string(),
                    reconcile_after_ms,
                    recipients: callable
                        .iter()
                        .map(|p| alerts::FirstIntent { person_id: p.id.clone(), person_name: p.name.clone(), destination: p.voice.clone().unwrap_or_default() })
                        .collect(),
                    actor: actor.clone(),
                };
                open_first_tier(&services, tier).await?
            }
        };
        match outcome {
            alerts::OpenedWithIntents::LeaseLost => return Err(StepError::LeaseLost),
            alerts::OpenedWithIntents::Busy => return Err(StepError::Retryable(anyhow!("the run's row stayed locked while its first tier was opened"))),
            // A takeover of a run whose alert committed: the general path.
            alerts::OpenedWithIntents::AlertExists => {}
            alerts::OpenedWithIntents::Opened { alert, intents } => {
                ctx.state["alert_id"] = json!(alert);
                let by_person: HashMap<String, Uuid> = intents.into_iter().collect();
                let mut out = Vec::with_capacity(callable.len());
                for person in &callable {
                    let attempt_id = *by_person.get(&person.id).ok_or_else(|| {
                        StepError::Retryable(anyhow!("an intent of the first tier was not recorded; the step is retried on the general path"))
                    })?;
                    out.push(Outgoing {
                        attempt_id,
                        person_id: person.id.clone(),
                        to: person.voice.clone().unwrap_or_default(),
                        content: Content::Spoken { message: message.clone(), ring_timeout_seconds },
                        critical: true, // an escalation is always critical (`workflows::is_critical`)
                    });
                }
                opened = Some(out);
            }
        }
    }
    let outgoing = match opened {
        Some(outgoing) => outgoing,
        None => {
            // Database work only (the calls are placed after its commit),
            // bounded by `engine.database_deadline_ms` as an evaluation is
            // ([`evaluate_position`]): a tier after the first must not wait
            // on a half-open connection after a hard failover.
            let mut conn = services.pool.acquire().await?;
            let opening = services
                .bounded(async {
                    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                    let Some(alert) =
                        alerts::fence_and_open(&mut tx, ctx.run.id, ctx.run.fencing_token, &ctx.workflow.name, &settings.policy, &message, &actor).await?
                    else {
                        return Err(StepError::LeaseLost);
                    };
                    let alert_id = alert.id;
                    ctx.state["alert_id"] = json!(alert_id);
                    if alert.message_missing {
                        // Opened by the run's dispatch; the execution that
                        // would have written the message did not.
                        alerts::write_message_in(&mut tx, alert_id, &message).await?;
                    }
                    if alert.status != "open" {
                        tx.commit().await?;
                        return Ok(TierOpening::Closed);
                    }
                    // A list from a query is recorded with the intents (a takeover must call
                    // the same people); a tier of static people only is the config's, the
                    // same after a takeover: recording it would cost a statement before every call.
                    if tier.resolved_now && (step.who.recipients.is_some() || tier.audit.is_some()) {
                        record_tier_recipients(&mut tx, ctx, alert_id, tier.audit.as_ref(), &actor).await?;
                    }
                    if callable.is_empty() {
                        let empty = record_empty_tier(&mut tx, ctx, policy, &alert, cycle, step_index, tier.list.len()).await?;
                        tx.commit().await?;
                        return Ok(TierOpening::Empty(empty));
                    }
                    if alert.nobody_alarm && alerts::clear_nobody_alarm(&mut tx, alert_id, &actor).await? {
                        tracing::info!(alert = %alert_id, "an alert that had nobody to call has recipients again");
                    }
                    // An alert opened by this transaction has no attempts yet: no look-up.
                    let existing = if alert.opened_now { Vec::new() } else { attempts::latest_per_person(&mut tx, pos, Channel::Voice.as_str()).await? };
                    if existing.is_empty() && (cycle, step_index) != (0, 0) {
                        alerts::audit_open(&mut tx, alert_id, "alert.escalated", json!({"cycle": cycle, "step_index": step_index}), &actor).await?;
                        write_back(
                            &mut tx,
                            settings.write_back.on_escalated.as_deref(),
                            "on_escalated",
                            &ctx.run.input,
                            WriteBackSubject::Alert(alert_id),
                            &actor,
                        )
                        .await?;
                    }
                    let mut outgoing: Vec<Outgoing> = Vec::new();
                    for person in &callable {
                        let phone = person.voice.clone().unwrap_or_default();
                        let latest = existing.iter().find(|a| a.person_id == person.id);
                        let Some(generation) = delivery::settle(&mut tx, latest, &reconciled, ctx.run.fencing_token, NotLookedUp::Resend, &actor).await? else {
                            continue; // placed, adopted, refused, or being reported on by callbacks: never call twice
                        };
                        let intent = attempts::NewIntent {
                            alert_id: Some(alert_id),
                            pos,
                            person_id: &person.id,
                            person_name: Some(&person.name),
                            generation,
                            channel: Channel::Voice.as_str(),
                            destination: &phone,
                            provider: voice.provider(),
                            fencing_token: ctx.run.fencing_token,
                            reconcile_after_ms,
                        };
                        let attempt_id = attempts::insert_intent(&mut tx, &intent, &actor).await?;
                        outgoing.push(Outgoing {
                            attempt_id,
                            person_id: person.id.clone(),
                            to: phone,
                            content: Content::Spoken { message: message.clone(), ring_timeout_seconds },
                            critical: true,
                        });
                    }
                    tx.commit().await?;
                    Ok(TierOpening::Intents(outgoing))
                })
                .await?;
            drop(conn); // given back before any provider request
            match opening {
                TierOpening::Closed => return Ok(Transition::Complete),
                TierOpening::Empty(empty) => return after_empty_tier(ctx, settings, policy, empty, cycle, step_index).await,
                TierOpening::Intents(outgoing) => outgoing,
            }
        }
    };

    // 2. Place the calls, outside any transaction, in parallel, and record
    //    every result before returning any error.
    let on_sent = settings.write_back.on_call_placed.as_deref().map(|sql| OnSent { hook: "on_call_placed", sql, payload: &ctx.run.input });
    // The message of an alert its dispatch opened, written once the calls'
    // requests are answered, before their results are recorded (an
    // `on_call_placed` write-back reads it); tried twice. A write that still
    // fails does not fail the step (its calls are out): the SMS fallback
    // texts the step's rendering and writes it, and a later tier or an
    // engine taking the run over at a tier writes it.
    let write_message = message_unwritten.map(|alert| -> futures_util::future::BoxFuture<'_, ()> {
        let (services, message, run) = (&services, &message, ctx.run.id);
        Box::pin(async move {
            let mut outcome = services.bounded(alerts::write_message(&services.pool, alert, message)).await;
            if outcome.is_err() {
                outcome = services.bounded(alerts::write_message(&services.pool, alert, message)).await;
            }
            if let Err(e) = outcome {
                tracing::warn!(run = %run, alert = %alert, error = %crate::capture::db_message(&e), "writing the alert's message failed twice; a fallback text, a later tier or a takeover writes it");
            }
        })
    });
    let accepted = delivery::send_and_record(&services, voice, &outgoing, on_sent, &actor, ctx.slot, write_message).await?;
    let deadline = jiff::Timestamp::now().as_millisecond() + ack_timeout_ms;
    let everyone_called = outgoing.len() == callable.len();
    if ctx.state.get("step_deadline_ms").is_none() || everyone_called {
        ctx.state["step_deadline_ms"] = json!(deadline);
    }
    ctx.check_lease()?;
    // Every person of the tier was called now and the provider accepted
    // every call: nothing can be decided before a final status, a machine
    // verdict, a key or an acknowledgement (each signals the run, and a
    // signal that arrives before the wait is kept) or the deadline (the
    // wait's timeout). Wait at once, without reading back what was just
    // written (a transaction of four statements per alert in a burst).
    if everyone_called && accepted == outgoing.len() {
        return Ok(Transition::Wait { step: "await".into(), signal: CALL_UPDATE_SIGNAL.into(), timeout_ms: ack_timeout_ms.max(1) });
    }
    // Otherwise decide at once whether anything can still be acknowledged
    // (a refused call, a tier partly called before a takeover).
    evaluate_position(ctx, settings, policy, None).await
}

/// What an evaluation's transaction decided ([`evaluate_position`]); the
/// provider requests it implies (hang-ups) are made after its commit.
enum Evaluation {
    /// The alert is no longer open (`acknowledged`: by a person).
    Closed { acknowledged: bool },
    /// A call failed and its person is not texted yet.
    FallbackDue,
    /// Nothing decided yet: wait `timeout_ms` more (ms, at least 1).
    KeepWaiting { timeout_ms: i64, machines: Vec<String> },
    /// The whole policy ran without an acknowledgement.
    Unacknowledged { machines: Vec<String> },
    /// The tier ended (`reason`); `next` is the (cycle, step index) to call.
    Escalate { reason: &'static str, next: (i32, i32), machines: Vec<String> },
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
    let services = ctx.services.clone();
    let actor = services.actor();
    let (cycle, step_index) = position(ctx.state);
    let pos = voice_position(ctx.run.id, cycle, step_index);
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
        let rendered = ctx.state.get("message").and_then(Value::as_str).unwrap_or_default().to_string();
        crate::notify::sms::send_fallbacks(&services, ctx.run, ctx.slot, alert_id, cycle, step_index, &tier, &rendered).await?;
        if let Some(o) = ctx.state.as_object_mut() {
            o.remove("sms_fallback_due");
        }
    }
    // The decision's transaction (database work only: no provider request
    // inside it), bounded by `engine.database_deadline_ms`: after a hard
    // failover a statement in flight on a half-open connection would
    // otherwise hold this alert's escalation for the kernel's retransmission
    // timeout (ARCHITECTURE.md, "PostgreSQL high availability"); past the
    // deadline the step fails, is retried, and the next tier is called.
    // (The connection is taken outside the bound: the pool's own wait has
    // its acquire timeout; only a silent server is to meet the deadline.)
    let mut conn = services.pool.acquire().await?;
    let decided = services
        .bounded(async {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            if !runs::lock_fenced(&mut tx, ctx.run.id, ctx.run.fencing_token).await? {
                return Err(StepError::LeaseLost);
            }
            let alert_status = alerts::lock_status(&mut tx, alert_id).await?;
            if alert_status != "open" {
                tx.commit().await?;
                return Ok(Evaluation::Closed { acknowledged: alert_status == "acknowledged" });
            }
            let attempts = attempts::latest_per_person(&mut tx, pos, Channel::Voice.as_str()).await?;
            if sms_fallback && crate::notify::sms::fallback_due(&mut tx, pos, &attempts).await? {
                tx.commit().await?;
                return Ok(Evaluation::FallbackDue);
            }
            // A text that can still be answered keeps the step waiting for its timeout.
            let all_failed = !attempts.is_empty()
                && attempts.iter().all(definitively_failed)
                && !(sms_fallback && crate::notify::sms::fallback_pending(&mut tx, ctx.run.id, cycle, step_index).await?);
            let declined = attempts.iter().any(|a| a.declined);
            // The clock read after the locks and reads, which may have waited.
            let now = jiff::Timestamp::now().as_millisecond();
            let deadline = ctx.state.get("step_deadline_ms").and_then(Value::as_i64).unwrap_or(now);
            // A human on the line (answered, not a machine, no key yet) gets time to
            // hear the message and press a key: the step does not expire under them.
            let human_on_line = attempts.iter().any(|a| a.status == "in-progress" && !machine(a) && !a.declined && !a.acknowledged);
            let grace_deadline = deadline + HUMAN_ON_LINE_GRACE_MS;
            let expired = (timed_out == Some(true) || deadline <= now) && !(human_on_line && now < grace_deadline);
            // Voicemail calls still connected: hang them up (never an acknowledgement).
            let machines: Vec<String> =
                attempts.iter().filter(|a| machine(a) && !TERMINAL_CALL_STATUSES.contains(&a.status.as_str())).filter_map(|a| a.provider_id.clone()).collect();
            if !(all_failed || declined || expired) {
                tx.commit().await?;
                let until = if deadline <= now { grace_deadline } else { deadline };
                return Ok(Evaluation::KeepWaiting { timeout_ms: (until - now).max(1), machines });
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
                alerts::mark_unacknowledged(&mut tx, alert_id, json!({"reason": reason, "cycles": policy.repeat}), &actor).await?;
                write_back(
                    &mut tx,
                    settings.write_back.on_unacknowledged.as_deref(),
                    "on_unacknowledged",
                    &ctx.run.input,
                    WriteBackSubject::Alert(alert_id),
                    &actor,
                )
                .await?;
                tx.commit().await?;
                return Ok(Evaluation::Unacknowledged { machines });
            }
            alerts::audit_open(&mut tx, alert_id, "alert.step_ended", json!({"reason": reason, "cycle": cycle, "step_index": step_index}), &actor).await?;
            tx.commit().await?;
            Ok(Evaluation::Escalate { reason, next, machines })
        })
        .await?;
    drop(conn); // given back before any provider request
    let (reason, next, machines) = match decided {
        Evaluation::Closed { acknowledged } => {
            if acknowledged {
                end_ringing_calls(&services, alert_id).await;
            }
            return Ok(Transition::Complete);
        }
        Evaluation::FallbackDue => {
            // A call failed and its person is not texted yet: evaluate again at
            // once, which sends the text (outside the transaction).
            ctx.state["sms_fallback_due"] = json!(true);
            return Ok(Transition::Next { step: "await".into() });
        }
        Evaluation::KeepWaiting { timeout_ms, machines } => {
            end_calls(&services, &machines).await;
            return Ok(Transition::Wait { step: "await".into(), signal: CALL_UPDATE_SIGNAL.into(), timeout_ms });
        }
        Evaluation::Unacknowledged { machines } => {
            end_calls(&services, &machines).await;
            tracing::warn!(alert = %alert_id, "alert unacknowledged after the whole policy");
            return Ok(Transition::Complete);
        }
        Evaluation::Escalate { reason, next, machines } => (reason, next, machines),
    };
    tracing::info!(alert = %alert_id, reason, from_cycle = cycle, from_step = step_index, to_cycle = next.0, to_step = next.1, "alert escalated");
    end_calls(&services, &machines).await;
    ctx.state["cycle"] = json!(next.0);
    ctx.state["step_index"] = json!(next.1);
    if let Some(o) = ctx.state.as_object_mut() {
        o.remove("step_deadline_ms");
    }
    Ok(Transition::Next { step: "call".into() })
}

/// After an acknowledgement: ends every call of the alert still ringing or
/// connected (other than the one that acknowledged), through the voice channel.
async fn end_ringing_calls(services: &crate::runtime::Services, alert_id: Uuid) {
    let ids = services.bounded(attempts::live_calls_of_alert(&services.pool, alert_id)).await.unwrap_or_default();
    end_calls(services, &ids).await;
}

/// Hangs up calls by their provider ids (failures are logged; the call
/// sweeper ends what is left).
async fn end_calls(services: &crate::runtime::Services, ids: &[String]) {
    let Some(voice) = services.providers.sender(Channel::Voice) else { return };
    for id in ids {
        match voice.end(id).await {
            Ok(()) => tracing::info!(provider_id = %id, "ended call"),
            Err(e) => tracing::warn!(provider_id = %id, error = %e, "ending call failed"),
        }
    }
}
