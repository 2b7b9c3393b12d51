//! What a notification's events mean for an alert: the one home of the
//! acknowledgement rules, for every channel (voice calls and text messages).
//!
//! Providers translate their webhooks (or a fetched call or message resource)
//! into the calls below; this module decides what each means: a status moves
//! the notification attempt forward (never back), an answering-machine verdict
//! marks a call as not human, a keypress of 1 from a human acknowledges the
//! alert, 2 passes it on, any other key replays the message; a text reply of
//! `1` acknowledges the open alert its sender was most recently texted for
//! (by a text that did not fail; never an alert that only called), and
//! Twilio's reserved keywords (STOP, HELP, …) are never commands. Both
//! acknowledgements go through one function (`acknowledge_in`), which records
//! the channel (`alerts.acknowledged_via`, given to write-backs). Each event is
//! applied in one transaction that locks the run row first, then the alert,
//! then the attempt (the lock order of the workers), writes back into the
//! team's row, and signals the run; except a call's progress status without
//! an AMD verdict or an `on_call_status` write-back, which decides nothing
//! and is recorded in one statement that locks only the attempt (see
//! [`apply_status`]).
//!
//! Replays: a webhook carrying an idempotency token (Twilio's
//! `I-Twilio-Idempotency-Token`; for an inbound message, its `MessageSid`) is
//! applied once; a replay with the same token gets the first delivery's
//! response and changes nothing.

use crate::notify::Channel;
use crate::runtime::Services;
use crate::store::attempts::{self, EventAttempt};
use crate::store::audit::{self, Entity};
use crate::store::{alerts, runs, webhooks};
use crate::workflows::escalation::CALL_UPDATE_SIGNAL;
use crate::workflows::team_sql::{write_back, WriteBackSubject};
use serde_json::{json, Value};
use sqlx::PgConnection;
use uuid::Uuid;

/// Why a call event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum CallEventError {
    /// No notification attempt has this id (a forged or stale callback URL).
    #[error("unknown attempt")]
    UnknownAttempt,
    /// The database could not record it; the provider should retry.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Provider call statuses and their ranks (the one table of them): updates
/// only ever move forward. `intent` and `unknown` 0 < `requested` 1 <
/// `initiated` 2 < `ringing` 3 < `in-progress` 4 < final 5. `unknown` (an
/// intent whose outcome was never learnt) ranks with `intent`: a callback
/// that shows the call exists after all moves it on, so it can be ended and
/// reconciled.
const CALL_STATUS_RANKS: &[(&str, i32)] = &[
    ("intent", 0),
    ("unknown", 0),
    ("requested", 1),
    ("initiated", 2),
    ("ringing", 3),
    ("in-progress", 4),
    ("completed", FINAL_CALL_RANK),
    ("busy", FINAL_CALL_RANK),
    ("no-answer", FINAL_CALL_RANK),
    ("failed", FINAL_CALL_RANK),
    ("canceled", FINAL_CALL_RANK),
];

/// Rank of a provider call status (see `CALL_STATUS_RANKS`): updates only
/// ever move forward. `intent` and `unknown` 0 < `requested` 1 <
/// `initiated` 2 < `ringing` 3 < `in-progress` 4 < final 5; unknown words
/// are -1.
pub fn status_rank(s: &str) -> i32 {
    rank_in(CALL_STATUS_RANKS, s)
}

fn rank_in(table: &[(&str, i32)], s: &str) -> i32 {
    table.iter().find(|(word, _)| *word == s).map_or(-1, |(_, rank)| *rank)
}

/// The [`status_rank`] of a final call status (`completed`, `busy`,
/// `no-answer`, `failed`, `canceled`).
const FINAL_CALL_RANK: i32 = 5;

/// Every status an attempt can hold (a call's or a message's, each once)
/// whose [`status_rank`] is below `rank`: the statuses a call status of
/// `rank` moves forward from, for SQL that compares ranks without a second
/// table of them (a message's words rank -1 as call statuses, as in
/// [`apply_status`]'s comparison).
fn statuses_ranked_below(rank: i32) -> Vec<&'static str> {
    let mut words: Vec<&'static str> = CALL_STATUS_RANKS.iter().chain(MESSAGE_STATUS_RANKS).map(|(word, _)| *word).filter(|w| status_rank(w) < rank).collect();
    words.sort_unstable();
    words.dedup();
    words
}

/// The attempt's column a call status stamps (once): `initiated_at`,
/// `ringing_at`, `answered_at` (`in-progress`), else `ended_at`.
fn time_column(call_status: &str) -> &'static str {
    match call_status {
        "initiated" => "initiated_at",
        "ringing" => "ringing_at",
        "in-progress" => "answered_at",
        _ => "ended_at",
    }
}

/// Whether an AMD verdict (`AnsweredBy`) says no human took the call.
pub fn is_machine(answered_by: Option<&str>) -> bool {
    answered_by.is_some_and(|a| a.starts_with("machine") || a == "fax")
}

/// A webhook delivery's identity, for replay detection.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// `twilio`, …
    pub provider: &'a str,
    /// The provider's idempotency token, when it sent one.
    pub idempotency_token: Option<&'a str>,
    /// Whether the provider sent it (a webhook), rather than wardcall's own
    /// reconciliation fetching it: only a webhook's `initiated` or
    /// `ringing` waits for a progress lane ([`PROGRESS_LANES`]).
    pub webhook: bool,
}

/// Opens the event's transaction: locks the run row first, then the attempt
/// ([`attempts::lock_for_event`]).
async fn lock_attempt(tx: &mut PgConnection, delivery: Delivery<'_>, attempt: Uuid, provider_id: Option<&str>) -> Result<EventAttempt, CallEventError> {
    attempts::lock_for_event(tx, attempt, delivery.provider, provider_id).await?.ok_or(CallEventError::UnknownAttempt)
}

/// Claims the delivery inside the event's transaction. `Some(response)`: a
/// replay (the first delivery's response); the caller must roll back.
async fn claim_delivery(tx: &mut PgConnection, delivery: Delivery<'_>, attempt: Uuid) -> Result<Option<String>, sqlx::Error> {
    match delivery.idempotency_token {
        Some(token) => webhooks::claim(tx, delivery.provider, token, attempt).await,
        None => Ok(None),
    }
}

/// Keeps a first delivery's response for its replays (a receipt is
/// recorded with an empty one: nothing to do for an empty response).
async fn finish_delivery(tx: &mut PgConnection, delivery: Delivery<'_>, response: &str) -> Result<(), sqlx::Error> {
    match delivery.idempotency_token {
        Some(token) if !response.is_empty() => webhooks::finish(tx, delivery.provider, token, response).await,
        _ => Ok(()),
    }
}

async fn signal_run(tx: &mut PgConnection, run: Uuid, payload: Value) -> Result<(), sqlx::Error> {
    runs::send_signal(tx, run, CALL_UPDATE_SIGNAL, &payload).await.map(|_| ())
}

/// The escalation settings of an attempt's run's workflow (for its
/// write-back hooks) and the run's input (the event payload, write-back's
/// `$1`), as read with the run's lock.
fn run_settings_and_input(services: &Services, row: &EventAttempt) -> Option<(crate::config::EscalationWorkflow, Value)> {
    services.config.workflow(&row.run_workflow).and_then(|w| w.escalation()).map(|e| (e.clone(), row.run_input.clone()))
}

/// A call-progress status (`initiated`, `ringing`, `in-progress`, or a final
/// status) for `attempt`, with the AMD verdict when the provider reported one
/// alongside (Twilio's `AnsweredBy` on status callbacks). Monotonic: a late or
/// repeated status changes nothing. `actor` names the source in the audit log
/// (`webhook:twilio`, `reconciler:<engine>`).
///
/// Two paths, one outcome. A progress status (ranked above `requested` and
/// below final) without an AMD verdict, with the provider's call id, takes
/// the short path first: one statement in autocommit that locks only the
/// attempt ([`attempts::advance_progress`]: receipt, monotonic advance, audit
/// row). It applies only when the attempt holds that call id (or none yet,
/// and the status moves it) and its run's workflow has no `on_call_status`
/// write-back; otherwise it writes nothing and the full transaction follows
/// (`apply_status_locked`: run, then attempt locked; the verdict; a final
/// status signals the run; the write-back). An unknown attempt is answered
/// by the full path, as [`CallEventError::UnknownAttempt`].
///
/// Why the short path needs no run lock. Such a status cannot change a run's
/// decision through a signal (progress does not signal the run since 8ca512a)
/// and writes nothing of the team's. The only thing a run reads of it is the
/// attempt row: the escalation's `evaluate_position` reads its position's
/// voice attempts once, in one statement (`attempts::latest_per_person`),
/// under the run's lock, and decides from that one snapshot (failed calls,
/// declines, a human on the line, voicemail to end). The short path changes
/// the attempt row, its receipt and its audit row in one atomic commit, and
/// nothing else a run reads: an evaluation sees the attempt either wholly
/// before or wholly after it, which is exactly what the full path allowed
/// (its callback waited for the run's lock, so it ran wholly before or
/// wholly after the evaluation's transaction). The sending side's writes of
/// the attempt (`record_sent`, `adopt`, `mark_unknown`) lock the row and
/// re-check their conditions in SQL, so they compose with it as they did
/// with the full path. A webhook's `initiated` or `ringing` on the short
/// path takes one of [`PROGRESS_LANES`] (waiting at most
/// [`PROGRESS_LANE_WAIT_MAX`]); nothing else takes a lane.
/// Neither path wakes the run for progress. The full
/// path wakes the call sweeper when something changed; the short path only
/// when the call's alert was no longer open (a call to end).
///
/// Errors: [`CallEventError::UnknownAttempt`], or a database error.
pub async fn apply_status(
    services: &Services,
    delivery: Delivery<'_>,
    attempt: Uuid,
    call_sid: Option<&str>,
    call_status: &str,
    answered_by: Option<&str>,
    actor: &str,
) -> Result<(), CallEventError> {
    let new_rank = status_rank(call_status);
    let progress = new_rank > status_rank("requested") && new_rank < FINAL_CALL_RANK;
    let verdict = answered_by.is_some_and(|v| !v.is_empty());
    if let (true, false, Some(call_sid)) = (progress, verdict, call_sid) {
        let excluded = workflows_with_status_write_back(&services.config);
        let from = statuses_ranked_below(new_rank);
        let update = attempts::ProgressUpdate {
            attempt,
            provider: delivery.provider,
            idempotency_token: delivery.idempotency_token,
            provider_id: call_sid,
            status: call_status,
            time_column: time_column(call_status),
            from_statuses: &from,
            excluded_workflows: &excluded,
            actor,
        };
        // A lane not free within the bound is not waited for longer: with
        // the row's `lock_timeout` after it, the webhook is still answered
        // within `WEBHOOK_DEADLINE` (5 s; Twilio's read timeout is 6 s).
        let _lane = if delivery.webhook && new_rank < status_rank("in-progress") {
            let lanes = services.shared(ProgressLanes::default);
            tokio::time::timeout(PROGRESS_LANE_WAIT_MAX, lanes.0.clone().acquire_owned()).await.ok().and_then(Result::ok)
        } else {
            None
        };
        match attempts::advance_progress(&services.pool, &update).await? {
            attempts::ProgressOutcome::Recorded { changed, alert_open } => {
                // Only a call of a closed alert gives the sweeper work (a
                // hang-up): waking it for every progress status kept it
                // sweeping back to back through a burst's thousands of
                // callbacks (BENCHMARKS.md, "Issue 9, ninth session").
                if changed && !alert_open {
                    services.wake_call_sweeper();
                }
                return Ok(());
            }
            attempts::ProgressOutcome::NotApplicable => {}
        }
    }
    apply_status_locked(services, delivery, attempt, call_sid, call_status, answered_by, actor).await
}

/// How many `initiated` and `ringing` webhooks ([`apply_status`]'s short
/// path) are recorded at once, per engine. They decide nothing (an
/// `in-progress` does: a human on the line extends the step's deadline, so
/// it never waits for a lane): during a burst their thousands of statements
/// only competed for the CPU with the next alerts' first calls
/// (BENCHMARKS.md, "Issue 9, ninth session"). Final statuses, verdicts,
/// keypresses, replies and wardcall's own reconciliation never take a lane.
pub const PROGRESS_LANES: usize = 1;

/// Longest a progress status waits for a lane (then it is recorded without
/// one). The lane's holder may itself wait up to the engine's
/// `lock_timeout` for its attempt's row (the send's record holds it for
/// milliseconds); the webhook is answered within `WEBHOOK_DEADLINE` (5 s)
/// either way, or answered 503 and retried by Twilio, and a status recorded
/// late is still recorded in order (statuses only move forward).
pub const PROGRESS_LANE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// The [`PROGRESS_LANES`] of one engine ([`Services::shared`]).
struct ProgressLanes(std::sync::Arc<tokio::sync::Semaphore>);

impl Default for ProgressLanes {
    fn default() -> Self {
        ProgressLanes(std::sync::Arc::new(tokio::sync::Semaphore::new(PROGRESS_LANES)))
    }
}

/// The workflows with an `on_call_status` write-back (their attempts'
/// statuses take the full path, which runs it).
fn workflows_with_status_write_back(config: &crate::config::Config) -> Vec<&str> {
    config.workflows.iter().filter(|w| w.escalation().is_some_and(|e| e.write_back.on_call_status.is_some())).map(|w| w.name.as_str()).collect()
}

/// [`apply_status`]'s full path: one transaction that locks the run's row,
/// then the attempt's, records the verdict and the status, runs the
/// `on_call_status` write-back, and signals the run when the status is
/// final or a machine answered.
async fn apply_status_locked(
    services: &Services,
    delivery: Delivery<'_>,
    attempt: Uuid,
    call_sid: Option<&str>,
    call_status: &str,
    answered_by: Option<&str>,
    actor: &str,
) -> Result<(), CallEventError> {
    let new_rank = status_rank(call_status);
    let mut tx = services.pool.begin().await?;
    let row = lock_attempt(&mut tx, delivery, attempt, call_sid).await?;
    if claim_delivery(&mut tx, delivery, attempt).await?.is_some() {
        tx.rollback().await?;
        return Ok(());
    }
    let mut changed = false;
    // Whether the run must look again: a final status or a machine verdict
    // can end the step (every call failed, voicemail to hang up). Progress
    // (`initiated`, `ringing`, `in-progress`) cannot: a run waits for its
    // deadline anyway, and a human on the line is seen then (the grace
    // period). Signalling progress cost a signal row, a wake-up and an
    // evaluation per callback, with the run's row held.
    let mut decisive = false;
    if let (Some(verdict), None) = (answered_by.filter(|v| !v.is_empty()), row.answered_by.as_deref()) {
        attempts::record_answered_by(&mut tx, attempt, verdict, actor).await?;
        changed = true;
        decisive = true;
    }
    if new_rank > status_rank(&row.status) && new_rank >= 0 {
        attempts::advance_status(&mut tx, attempt, &row.status, call_status, Some(time_column(call_status)), None, json!({"provider_id": call_sid}), actor)
            .await?;
        if let Some((settings, input)) = run_settings_and_input(services, &row) {
            write_back(&mut tx, settings.write_back.on_call_status.as_deref(), "on_call_status", &input, WriteBackSubject::Attempt(attempt), actor).await?;
        }
        changed = true;
        decisive |= new_rank == FINAL_CALL_RANK;
    }
    if decisive {
        signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "status": call_status})).await?;
    }
    finish_delivery(&mut tx, delivery, "").await?;
    tx.commit().await?;
    if decisive {
        services.wake();
    }
    if changed {
        services.wake_call_sweeper();
    }
    Ok(())
}

/// The asynchronous answering-machine verdict (`human`, `machine_start`,
/// `machine_end_beep`, `fax`, `unknown`) for `attempt`; the first one wins.
///
/// Errors: [`CallEventError::UnknownAttempt`], or a database error.
pub async fn apply_amd(
    services: &Services,
    delivery: Delivery<'_>,
    attempt: Uuid,
    call_sid: Option<&str>,
    answered_by: &str,
    actor: &str,
) -> Result<(), CallEventError> {
    let mut tx = services.pool.begin().await?;
    let row = lock_attempt(&mut tx, delivery, attempt, call_sid).await?;
    if claim_delivery(&mut tx, delivery, attempt).await?.is_some() || row.answered_by.is_some() {
        tx.rollback().await?;
        return Ok(());
    }
    attempts::record_answered_by(&mut tx, attempt, answered_by, actor).await?;
    signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "answered_by": answered_by})).await?;
    finish_delivery(&mut tx, delivery, "").await?;
    tx.commit().await?;
    services.wake();
    Ok(())
}

/// What a keypress on a call answers: the provider turns it into its own
/// markup (Twilio: TwiML) and the call goes on or ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeypressReply {
    /// 1 acknowledged the alert: thank and hang up.
    Acknowledged,
    /// The alert was acknowledged already (by someone else, or a replay).
    AlreadyAcknowledged,
    /// The alert was cancelled at the source.
    Cancelled,
    /// The alert is no longer open (unacknowledged and not a 1, or ended).
    NoLongerOpen,
    /// 2: the alert goes on to the next person.
    Declined,
    /// Hang up politely (a machine, an ended call, a replay).
    Goodbye,
    /// Any other key on an open alert: read `message` again (patient data:
    /// never logged or stored in a receipt) and wait for a key.
    ReadAgain { message: String },
}

impl KeypressReply {
    /// The form kept in a webhook receipt (never the message).
    fn receipt(&self) -> &'static str {
        match self {
            KeypressReply::Acknowledged => "acknowledged",
            KeypressReply::AlreadyAcknowledged => "already_acknowledged",
            KeypressReply::Cancelled => "cancelled",
            KeypressReply::NoLongerOpen => "no_longer_open",
            KeypressReply::Declined => "declined",
            KeypressReply::Goodbye => "goodbye",
            KeypressReply::ReadAgain { .. } => "read_again",
        }
    }

    /// The reply a replay of a delivery gets, from its receipt (a replay
    /// that read the message reads it again: `message`).
    ///
    /// Receipts written before replies had names (kept for a day, see
    /// [`crate::store::webhooks::prune`]) hold the TwiML answered, or
    /// `replay:message` for a reply that read the alert again: they are read
    /// by their spoken words, so a replay that reaches an upgraded engine
    /// still answers as the first delivery did.
    fn from_receipt(receipt: &str, message: impl FnOnce() -> String) -> KeypressReply {
        match receipt {
            "acknowledged" => KeypressReply::Acknowledged,
            "already_acknowledged" => KeypressReply::AlreadyAcknowledged,
            "cancelled" => KeypressReply::Cancelled,
            "no_longer_open" => KeypressReply::NoLongerOpen,
            "declined" => KeypressReply::Declined,
            "read_again" | "replay:message" => KeypressReply::ReadAgain { message: message() },
            // The previous version's TwiML receipts.
            r if r.contains("The alert is acknowledged.") => KeypressReply::Acknowledged,
            r if r.contains("This alert was already acknowledged.") => KeypressReply::AlreadyAcknowledged,
            r if r.contains("This alert was cancelled.") => KeypressReply::Cancelled,
            r if r.contains("This alert is no longer open.") => KeypressReply::NoLongerOpen,
            r if r.contains("Escalating to the next person.") => KeypressReply::Declined,
            _ => KeypressReply::Goodbye,
        }
    }
}

/// Keypad input on a call: 1 acknowledges (a human only; also an alert the
/// policy gave up on), 2 passes the alert to the next step, any other key
/// replays the message. Returns what the call answers ([`KeypressReply`]).
/// A replay (same idempotency token) answers as the first delivery did and
/// changes nothing.
///
/// Errors: [`CallEventError::UnknownAttempt`], or a database error.
pub async fn apply_keypress(
    services: &Services,
    delivery: Delivery<'_>,
    attempt: Uuid,
    call_sid: Option<&str>,
    digits: &str,
) -> Result<KeypressReply, CallEventError> {
    let mut tx = services.pool.begin().await?;
    let row = lock_attempt(&mut tx, delivery, attempt, call_sid).await?;
    if let Some(first_response) = claim_delivery(&mut tx, delivery, attempt).await? {
        tx.rollback().await?;
        tracing::info!(attempt = %attempt, "replayed keypress webhook ignored");
        let message = if matches!(first_response.as_str(), "read_again" | "replay:message") {
            alerts::message_if_any(&services.pool, row.alert_id).await?.unwrap_or_default()
        } else {
            String::new()
        };
        return Ok(KeypressReply::from_receipt(&first_response, || message));
    }
    let Some(alert_id) = row.alert_id else {
        tx.rollback().await?;
        return Err(CallEventError::UnknownAttempt);
    };
    let (alert_status, message) = alerts::lock_status_and_message(&mut tx, alert_id).await?;
    if row.acknowledged || (status_rank(&row.status) == 5 && !digits.starts_with('1')) {
        // The attempt that acknowledged has hung up, and no other key means
        // anything once its call ended: a replay of an earlier keypress. (A
        // late 1 on an ended call is still honoured: it can only help.)
        tx.rollback().await?;
        tracing::info!(attempt = %attempt, "keypress on an ended or acknowledging call ignored (a replay)");
        return Ok(if alert_status == "acknowledged" { KeypressReply::AlreadyAcknowledged } else { KeypressReply::Goodbye });
    }
    attempts::append_digits(&mut tx, attempt, digits).await?;
    let key = digits.chars().next();
    let person_actor = format!("person:{}", row.person_id);
    let reply = if is_machine(row.answered_by.as_deref()) {
        KeypressReply::Goodbye
    } else if key == Some('1') {
        // An alert the policy gave up on is still acknowledged by a human's 1.
        if alert_status == "open" || alert_status == "unacknowledged" {
            let ack = Acknowledgement {
                run_id: row.run_id,
                run_workflow: &row.run_workflow,
                run_input: &row.run_input,
                alert_id,
                alert_status: &alert_status,
                attempt,
                person_id: &row.person_id,
                via: Channel::Voice,
            };
            acknowledge_in(services, &mut tx, ack, json!({"digits": digits})).await?;
            tracing::info!(attempt = %attempt, person = %row.person_id, "alert acknowledged by keypress");
            KeypressReply::Acknowledged
        } else if alert_status == "acknowledged" {
            KeypressReply::AlreadyAcknowledged
        } else {
            KeypressReply::Cancelled
        }
    } else if key == Some('2') && alert_status == "open" {
        attempts::record_declined(&mut tx, attempt, digits, &person_actor).await?;
        signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "declined": true})).await?;
        KeypressReply::Declined
    } else if alert_status == "open" {
        KeypressReply::ReadAgain { message }
    } else if alert_status == "acknowledged" {
        KeypressReply::AlreadyAcknowledged
    } else {
        KeypressReply::NoLongerOpen
    };
    finish_delivery(&mut tx, delivery, reply.receipt()).await?;
    tx.commit().await?;
    services.wake();
    services.wake_call_sweeper();
    Ok(reply)
}

/// An acknowledgement being applied: whose, of which alert, through which
/// attempt and channel.
struct Acknowledgement<'a> {
    run_id: Uuid,
    /// The run's workflow and input, read with its lock.
    run_workflow: &'a str,
    run_input: &'a Value,
    alert_id: Uuid,
    /// The alert's status, read under its row lock (`open` or `unacknowledged`).
    alert_status: &'a str,
    attempt: Uuid,
    person_id: &'a str,
    via: Channel,
}

/// The one acknowledgement, whatever the channel: the alert becomes
/// `acknowledged` (by the attempt's person, `acknowledged_via` the channel),
/// the attempt records the time, the audit log the change, the workflow's
/// `on_acknowledged` write-back runs (its `$2`, `attempt_details`, carries
/// `acknowledged_via`), and the run is signalled (it ends ringing calls and
/// sends nothing more). In the caller's transaction, which holds the run, the
/// alert and the attempt locked (in that order).
async fn acknowledge_in(services: &Services, tx: &mut PgConnection, ack: Acknowledgement<'_>, detail: Value) -> Result<(), sqlx::Error> {
    let mut detail = detail;
    detail["attempt"] = json!(ack.attempt);
    detail["channel"] = json!(ack.via.as_str());
    alerts::acknowledge(tx, ack.alert_id, ack.alert_status, ack.person_id, ack.via.as_str(), detail).await?;
    attempts::record_acknowledged(tx, ack.attempt, ack.via.as_str()).await?;
    if let Some(settings) = services.config.workflow(ack.run_workflow).and_then(|w| w.escalation()) {
        let actor = format!("person:{}", ack.person_id);
        write_back(tx, settings.write_back.on_acknowledged.as_deref(), "on_acknowledged", ack.run_input, WriteBackSubject::Attempt(ack.attempt), &actor)
            .await?;
    }
    signal_run(tx, ack.run_id, json!({"attempt": ack.attempt, "acknowledged": true})).await
}

/// Message statuses (Twilio's Message resource status values,
/// <https://www.twilio.com/docs/messaging/api/message-resource#message-status-values>)
/// and their ranks: `intent`/`unknown` 0 < `requested` 1 <
/// `accepted`/`scheduled` 2 < `queued` 3 < `sending` 4 < `sent` 5 < final
/// (`delivered`, `undelivered`, `failed`, `canceled`) 6 < `read` 7.
const MESSAGE_STATUS_RANKS: &[(&str, i32)] = &[
    ("intent", 0),
    ("unknown", 0),
    ("requested", 1),
    ("accepted", 2),
    ("scheduled", 2),
    ("queued", 3),
    ("sending", 4),
    ("sent", 5),
    ("delivered", 6),
    ("undelivered", 6),
    ("failed", 6),
    ("canceled", 6),
    ("read", 7),
];

/// Rank of a message status (see `MESSAGE_STATUS_RANKS`): updates only ever
/// move forward. `intent`/`unknown` 0 < `requested` 1 <
/// `accepted`/`scheduled` 2 < `queued` 3 < `sending` 4 < `sent` 5 < final
/// (`delivered`, `undelivered`, `failed`, `canceled`) 6 < `read` 7; unknown
/// words are -1.
pub fn message_status_rank(s: &str) -> i32 {
    rank_in(MESSAGE_STATUS_RANKS, s)
}

/// Message statuses after which a text can no longer be acknowledged by its
/// delivery (it may still be answered if delivered).
pub const FAILED_MESSAGE_STATUSES: &[&str] = &["undelivered", "failed", "canceled", "unknown"];

/// A text message's status (`queued`, `sending`, `sent`, `delivered`,
/// `undelivered`, `failed`, …, with Twilio's `ErrorCode` on failure) for
/// `attempt`, from its status callback or a fetched message resource.
/// Monotonic and idempotent: a late or repeated status changes nothing, and
/// a replay (same idempotency token) is ignored. The attempt's run is
/// signalled when the attempt belongs to an alert (an escalation re-reads
/// its position); one-way messages only record delivery.
///
/// Errors: [`CallEventError::UnknownAttempt`], or a database error.
pub async fn apply_message_status(
    services: &Services,
    delivery: Delivery<'_>,
    attempt: Uuid,
    message_sid: Option<&str>,
    message_status: &str,
    error_code: Option<&str>,
    actor: &str,
) -> Result<(), CallEventError> {
    let new_rank = message_status_rank(message_status);
    let mut tx = services.pool.begin().await?;
    let row = lock_attempt(&mut tx, delivery, attempt, message_sid).await?;
    if claim_delivery(&mut tx, delivery, attempt).await?.is_some() || new_rank < 0 || new_rank <= message_status_rank(&row.status) {
        tx.rollback().await?;
        return Ok(());
    }
    let error =
        error_code.filter(|c| !c.is_empty() && message_status != "delivered").map(|c| format!("Twilio error {}", c.chars().take(10).collect::<String>()));
    let ended = (new_rank >= 6).then_some("ended_at");
    let detail = json!({"provider_id": message_sid, "error_code": error_code.filter(|c| !c.is_empty())});
    attempts::advance_status(&mut tx, attempt, &row.status, message_status, ended, error.as_deref(), detail, actor).await?;
    if row.alert_id.is_some() {
        signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "status": message_status})).await?;
    }
    finish_delivery(&mut tx, delivery, "").await?;
    tx.commit().await?;
    if row.alert_id.is_some() {
        services.wake();
    }
    Ok(())
}

/// What an inbound text meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// `1` from a recipient of an open alert: the alert is acknowledged.
    Acknowledged,
    /// `1`, but no open alert texted the sender (by a text that did not
    /// fail): nothing changed.
    NothingToAcknowledge,
    /// One of Twilio's reserved keywords (STOP, HELP, …): Twilio handles
    /// it; wardcall ignores it (audited, without the text).
    ReservedKeyword,
    /// Any other text: not an acknowledgement (audited, without the text).
    NotACommand,
    /// A message already handled (same MessageSid): nothing changed.
    Replay,
}

/// An inbound text message from `from` (E.164): a reply of exactly `1`
/// (trimmed) acknowledges the alert the sender was most recently texted for
/// (the newest `sms` attempt to that number of an alert still open; the
/// call of a newer alert does not take a reply meant for an older alert's
/// text), through the same acknowledgement as a keypress ([`acknowledge_in`]:
/// alert, attempt, audit, `on_acknowledged` write-back with
/// `acknowledged_via = 'sms'`, run signalled so ringing calls end). A
/// provider's reserved keyword (`reserved_keyword`, told by the provider's
/// webhook: Twilio's STOP, HELP…, which Twilio itself acts on) is never a
/// command; any other text is audited as not an acknowledgement,
/// without its text. A message already handled (`delivery`'s token: the
/// provider's message id, under the provider's inbound name) is a replay and changes
/// nothing.
///
/// Errors: a database error (the provider should retry).
pub async fn apply_reply(
    services: &Services,
    delivery: Delivery<'_>,
    from: &str,
    body: &str,
    reserved_keyword: bool,
    actor: &str,
) -> Result<ReplyOutcome, CallEventError> {
    let message_sid = delivery.idempotency_token.unwrap_or_default();
    let body = body.trim();
    // The newest attempt to this number; the open alert most recently
    // texted to it, by a text that did not fail (a reply answers a text the
    // nurse received, never a call).
    let newest = attempts::newest_to(&services.pool, from).await?;
    let open = attempts::newest_open_alert_texted_to(&services.pool, from, FAILED_MESSAGE_STATUSES).await?;
    let mut tx = services.pool.begin().await?;
    // Lock order: run, alert, attempt.
    let run_lock = open.map(|o| o.0).or(newest.map(|n| n.1));
    let (run_workflow, run_input) = match run_lock {
        Some(run) => runs::lock_row_reading(&mut tx, run).await?,
        None => (String::new(), Value::Null),
    };
    if claim_delivery(&mut tx, delivery, newest.map(|n| n.0).unwrap_or_else(Uuid::nil)).await?.is_some() {
        tx.rollback().await?;
        tracing::info!("replayed inbound message ignored");
        return Ok(ReplyOutcome::Replay);
    }
    let outcome = if body == "1" {
        match open {
            Some((run_id, alert_id)) => {
                let alert_status = alerts::lock_status(&mut tx, alert_id).await?;
                // The person's text attempt of that alert to the sender's number.
                let attempt = attempts::lock_text_attempt_of_alert_to(&mut tx, alert_id, from, FAILED_MESSAGE_STATUSES).await?;
                match (alert_status.as_str(), attempt) {
                    ("open", Some((attempt, person_id))) => {
                        // (The run locked above is this alert's: `open` comes first.)
                        let ack = Acknowledgement {
                            run_id,
                            run_workflow: &run_workflow,
                            run_input: &run_input,
                            alert_id,
                            alert_status: &alert_status,
                            attempt,
                            person_id: &person_id,
                            via: Channel::Sms,
                        };
                        acknowledge_in(services, &mut tx, ack, json!({"message_sid": message_sid})).await?;
                        tracing::info!(attempt = %attempt, person = %person_id, "alert acknowledged by text reply");
                        ReplyOutcome::Acknowledged
                    }
                    _ => ReplyOutcome::NothingToAcknowledge,
                }
            }
            None => ReplyOutcome::NothingToAcknowledge,
        }
    } else if reserved_keyword {
        ReplyOutcome::ReservedKeyword
    } else {
        ReplyOutcome::NotACommand
    };
    if outcome != ReplyOutcome::Acknowledged {
        // Audited on the sender's newest attempt, never with the text.
        let (action, detail) = match outcome {
            ReplyOutcome::ReservedKeyword => ("reply.reserved_keyword", json!({"message_sid": message_sid, "handled_by": "provider"})),
            ReplyOutcome::NothingToAcknowledge => ("reply.nothing_to_acknowledge", json!({"message_sid": message_sid})),
            _ => ("reply.not_an_acknowledgement", json!({"message_sid": message_sid, "chars": body.chars().count()})),
        };
        match newest {
            Some((attempt, _, _)) => {
                audit::record(&mut tx, Entity::NotificationAttempt, &attempt.to_string(), action, None, None, actor, detail).await?;
            }
            None => tracing::info!(from = %crate::config::redact_phone(from), action, "inbound message from a number wardcall never reached; ignored"),
        }
    }
    finish_delivery(&mut tx, delivery, "").await?;
    tx.commit().await?;
    if outcome == ReplyOutcome::Acknowledged {
        services.wake();
        services.wake_call_sweeper();
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_statuses_rank_as_before_and_the_ones_below_are_derived() {
        let ranks: Vec<i32> =
            ["intent", "unknown", "requested", "initiated", "ringing", "in-progress", "completed", "busy", "no-answer", "failed", "canceled", "queued", ""]
                .iter()
                .map(|s| status_rank(s))
                .collect();
        assert_eq!(ranks, [0, 0, 1, 2, 3, 4, 5, 5, 5, 5, 5, -1, -1]);
        assert_eq!(message_status_rank("sent"), 5);
        assert_eq!(message_status_rank("read"), 7);
        assert_eq!(message_status_rank("ringing"), -1);
        // `ringing` moves forward from everything ranked below it, a message's
        // words included (they rank -1 as call statuses), and from nothing else.
        let below = statuses_ranked_below(status_rank("ringing"));
        for w in ["intent", "unknown", "requested", "initiated", "accepted", "queued", "sent", "delivered", "read"] {
            assert!(below.contains(&w), "{w} is below ringing");
        }
        for w in ["ringing", "in-progress", "completed", "failed", "canceled"] {
            assert!(!below.contains(&w), "{w} is not below ringing");
        }
        assert_eq!(below.len(), below.iter().collect::<std::collections::BTreeSet<_>>().len(), "each once");
        assert_eq!(time_column("in-progress"), "answered_at");
    }
}
