//! What a notification's events mean for an alert: the one home of the
//! acknowledgement rules, for every channel (voice calls and text messages).
//!
//! Providers translate their webhooks (or a fetched call or message resource)
//! into the calls below; this module decides what each means: a status moves
//! the notification attempt forward (never back), an answering-machine verdict
//! marks a call as not human, a keypress of 1 from a human acknowledges the
//! alert, 2 passes it on, any other key replays the message; a text reply of
//! `1` acknowledges the alert its sender was most recently paged for, and
//! Twilio's reserved keywords (STOP, HELP, …) are never commands. Both
//! acknowledgements go through one function (`acknowledge_in`), which records
//! the channel (`alerts.acknowledged_via`, given to write-backs). Each event is
//! applied in one transaction that locks the run row first, then the alert,
//! then the attempt (the lock order of the workers), writes back into the
//! team's row, and signals the run.
//!
//! Replays: a webhook carrying an idempotency token (Twilio's
//! `I-Twilio-Idempotency-Token`; for an inbound message, its `MessageSid`) is
//! applied once; a replay with the same token gets the first delivery's
//! response and changes nothing.

use crate::notify::Channel;
use crate::providers::twilio::twiml;
use crate::runtime::Services;
use crate::store::audit::{self, Entity};
use crate::store::runs as store;
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

/// Rank of a provider call status: updates only ever move forward.
/// `intent` and `unknown` 0 < `requested` 1 < `initiated` 2 < `ringing` 3 <
/// `in-progress` 4 < final 5; unknown words are -1. `unknown` (an intent
/// whose outcome was never learnt) ranks with `intent`: a callback that shows
/// the call exists after all moves it on, so it can be ended and reconciled.
pub fn status_rank(s: &str) -> i32 {
    match s {
        "intent" | "unknown" => 0,
        "requested" => 1,
        "initiated" => 2,
        "ringing" => 3,
        "in-progress" => 4,
        "completed" | "busy" | "no-answer" | "failed" | "canceled" => 5,
        _ => -1,
    }
}

/// Whether an AMD verdict (`AnsweredBy`) says no human took the call.
pub fn is_machine(answered_by: Option<&str>) -> bool {
    answered_by.is_some_and(|a| a.starts_with("machine") || a == "fax")
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    run_id: Uuid,
    /// `None` for a one-way message of a `notify` step.
    alert_id: Option<Uuid>,
    person_id: String,
    status: String,
    provider_id: Option<String>,
    answered_by: Option<String>,
    acknowledged: bool,
}

/// A webhook delivery's identity, for replay detection.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// `twilio`, …
    pub provider: &'a str,
    /// The provider's idempotency token, when it sent one.
    pub idempotency_token: Option<&'a str>,
}

/// Opens the event's transaction: locks the run row first, then the attempt.
/// Records the CallSid if the attempt had none (a call whose create response
/// was lost: the callback names it).
async fn lock_attempt(tx: &mut PgConnection, attempt: Uuid, call_sid: Option<&str>) -> Result<AttemptRow, CallEventError> {
    let run_id: Option<Uuid> =
        sqlx::query_scalar("SELECT run_id FROM wardcall.notification_attempts WHERE id = $1").bind(attempt).fetch_optional(&mut *tx).await?;
    let run_id = run_id.ok_or(CallEventError::UnknownAttempt)?;
    sqlx::query("SELECT 1 FROM wardcall.runs WHERE id = $1 FOR UPDATE").bind(run_id).execute(&mut *tx).await?;
    let row: AttemptRow = sqlx::query_as(
        "SELECT run_id, alert_id, person_id, status, provider_id, answered_by, acknowledged_at IS NOT NULL AS acknowledged
           FROM wardcall.notification_attempts WHERE id = $1 FOR UPDATE",
    )
    .bind(attempt)
    .fetch_one(&mut *tx)
    .await?;
    if row.provider_id.is_none() {
        if let Some(sid) = call_sid {
            // Never the CallSid another attempt holds (the unique index would
            // refuse the whole event, and a nurse's keypress with it).
            sqlx::query(
                "UPDATE wardcall.notification_attempts SET provider_id = $2 WHERE id = $1 AND provider_id IS NULL
                    AND NOT EXISTS (SELECT 1 FROM wardcall.notification_attempts o WHERE o.provider = 'twilio' AND o.provider_id = $2)",
            )
            .bind(attempt)
            .bind(sid)
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(row)
}

/// Claims the delivery inside the event's transaction. `Some(response)`: a
/// replay (the first delivery's response); the caller must roll back.
async fn claim_delivery(tx: &mut PgConnection, delivery: Delivery<'_>, attempt: Uuid) -> Result<Option<String>, sqlx::Error> {
    let Some(token) = delivery.idempotency_token else { return Ok(None) };
    let inserted: Option<i32> = sqlx::query_scalar(
        "INSERT INTO wardcall.webhook_receipts (provider, idempotency_token, attempt_id, response) VALUES ($1, $2, $3, '')
         ON CONFLICT DO NOTHING RETURNING 1",
    )
    .bind(delivery.provider)
    .bind(token)
    .bind(attempt)
    .fetch_optional(&mut *tx)
    .await?;
    if inserted.is_some() {
        return Ok(None);
    }
    let response: Option<String> = sqlx::query_scalar("SELECT response FROM wardcall.webhook_receipts WHERE provider = $1 AND idempotency_token = $2")
        .bind(delivery.provider)
        .bind(token)
        .fetch_optional(&mut *tx)
        .await?;
    Ok(Some(response.unwrap_or_default()))
}

/// Stored instead of a reply that reads the alert aloud: receipts never hold
/// the alert's text (patient data); a replay rebuilds that reply.
const REPLAY_MESSAGE_MARKER: &str = "replay:message";

async fn finish_delivery(tx: &mut PgConnection, delivery: Delivery<'_>, response: &str) -> Result<(), sqlx::Error> {
    if let Some(token) = delivery.idempotency_token {
        sqlx::query("UPDATE wardcall.webhook_receipts SET response = $3 WHERE provider = $1 AND idempotency_token = $2")
            .bind(delivery.provider)
            .bind(token)
            .bind(response)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

async fn signal_run(tx: &mut PgConnection, run: Uuid, payload: Value) -> Result<(), sqlx::Error> {
    store::send_signal(tx, run, CALL_UPDATE_SIGNAL, &payload).await.map(|_| ())
}

/// The escalation settings of a run's workflow (for its write-back hooks) and
/// the run's input (the event payload, write-back's `$1`).
async fn run_settings_and_input(
    engine: &Services,
    tx: &mut PgConnection,
    run: Uuid,
) -> Result<Option<(crate::config::EscalationWorkflow, Value)>, sqlx::Error> {
    let (workflow, input): (String, Value) = sqlx::query_as("SELECT workflow, input FROM wardcall.runs WHERE id = $1").bind(run).fetch_one(&mut *tx).await?;
    Ok(engine.config.workflow(&workflow).and_then(|w| w.escalation()).map(|e| (e.clone(), input)))
}

/// A call-progress status (`initiated`, `ringing`, `in-progress`, or a final
/// status) for `attempt`, with the AMD verdict when the provider reported one
/// alongside (Twilio's `AnsweredBy` on status callbacks). Monotonic: a late or
/// repeated status changes nothing. `actor` names the source in the audit log
/// (`webhook:twilio`, `reconciler:<engine>`).
///
/// Errors: [`CallEventError::UnknownAttempt`], or a database error.
pub async fn apply_status(
    engine: &Services,
    delivery: Delivery<'_>,
    attempt: Uuid,
    call_sid: Option<&str>,
    call_status: &str,
    answered_by: Option<&str>,
    actor: &str,
) -> Result<(), CallEventError> {
    let new_rank = status_rank(call_status);
    let mut tx = engine.pool.begin().await?;
    let row = lock_attempt(&mut tx, attempt, call_sid).await?;
    if claim_delivery(&mut tx, delivery, attempt).await?.is_some() {
        tx.rollback().await?;
        return Ok(());
    }
    let mut changed = false;
    if let (Some(verdict), None) = (answered_by.filter(|v| !v.is_empty()), row.answered_by.as_deref()) {
        sqlx::query("UPDATE wardcall.notification_attempts SET answered_by = $2, updated_at = clock_timestamp() WHERE id = $1")
            .bind(attempt)
            .bind(verdict)
            .execute(&mut *tx)
            .await?;
        audit::record(&mut tx, Entity::NotificationAttempt, &attempt.to_string(), "attempt.answered_by", None, None, actor, json!({"answered_by": verdict}))
            .await?;
        changed = true;
    }
    if new_rank > status_rank(&row.status) && new_rank >= 0 {
        let column = match call_status {
            "initiated" => "initiated_at",
            "ringing" => "ringing_at",
            "in-progress" => "answered_at",
            _ => "ended_at",
        };
        sqlx::query(&format!(
            "UPDATE wardcall.notification_attempts SET status = $2, {column} = coalesce({column}, clock_timestamp()),
                    updated_at = clock_timestamp() WHERE id = $1"
        ))
        .bind(attempt)
        .bind(call_status)
        .execute(&mut *tx)
        .await?;
        audit::record(
            &mut tx,
            Entity::NotificationAttempt,
            &attempt.to_string(),
            "attempt.status",
            Some(&row.status),
            Some(call_status),
            actor,
            json!({"call_sid": call_sid}),
        )
        .await?;
        if let Some((settings, input)) = run_settings_and_input(engine, &mut tx, row.run_id).await? {
            write_back(&mut tx, settings.write_back.on_call_status.as_deref(), "on_call_status", &input, WriteBackSubject::Attempt(attempt), actor).await?;
        }
        changed = true;
    }
    if changed {
        signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "status": call_status})).await?;
    }
    finish_delivery(&mut tx, delivery, "").await?;
    tx.commit().await?;
    if changed {
        engine.wake();
        engine.wake_call_sweeper();
    }
    Ok(())
}

/// The asynchronous answering-machine verdict (`human`, `machine_start`,
/// `machine_end_beep`, `fax`, `unknown`) for `attempt`; the first one wins.
///
/// Errors: [`CallEventError::UnknownAttempt`], or a database error.
pub async fn apply_amd(
    engine: &Services,
    delivery: Delivery<'_>,
    attempt: Uuid,
    call_sid: Option<&str>,
    answered_by: &str,
    actor: &str,
) -> Result<(), CallEventError> {
    let mut tx = engine.pool.begin().await?;
    let row = lock_attempt(&mut tx, attempt, call_sid).await?;
    if claim_delivery(&mut tx, delivery, attempt).await?.is_some() || row.answered_by.is_some() {
        tx.rollback().await?;
        return Ok(());
    }
    sqlx::query("UPDATE wardcall.notification_attempts SET answered_by = $2, updated_at = clock_timestamp() WHERE id = $1")
        .bind(attempt)
        .bind(answered_by)
        .execute(&mut *tx)
        .await?;
    audit::record(&mut tx, Entity::NotificationAttempt, &attempt.to_string(), "attempt.answered_by", None, None, actor, json!({"answered_by": answered_by}))
        .await?;
    signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "answered_by": answered_by})).await?;
    finish_delivery(&mut tx, delivery, "").await?;
    tx.commit().await?;
    engine.wake();
    Ok(())
}

/// Keypad input on a call: 1 acknowledges (a human only; also an alert the
/// policy gave up on), 2 passes the alert to the next step, any other key
/// replays the message. Returns the TwiML that continues the call. A replay
/// (same idempotency token) returns the first response and changes nothing.
///
/// Errors: [`CallEventError::UnknownAttempt`], or a database error.
pub async fn apply_keypress(engine: &Services, delivery: Delivery<'_>, attempt: Uuid, call_sid: Option<&str>, digits: &str) -> Result<String, CallEventError> {
    let mut tx = engine.pool.begin().await?;
    let row = lock_attempt(&mut tx, attempt, call_sid).await?;
    if let Some(first_response) = claim_delivery(&mut tx, delivery, attempt).await? {
        tx.rollback().await?;
        tracing::info!(attempt = %attempt, "replayed keypress webhook ignored");
        return Ok(match first_response.as_str() {
            "" => twiml::say_and_hangup("Goodbye."),
            REPLAY_MESSAGE_MARKER => {
                let message: String = sqlx::query_scalar("SELECT message FROM wardcall.alerts WHERE id = $1")
                    .bind(row.alert_id)
                    .fetch_optional(&engine.pool)
                    .await?
                    .unwrap_or_default();
                replay_message_twiml(engine, attempt, &message)
            }
            _ => first_response,
        });
    }
    let Some(alert_id) = row.alert_id else {
        tx.rollback().await?;
        return Err(CallEventError::UnknownAttempt);
    };
    let (alert_status, message): (String, String) =
        sqlx::query_as("SELECT status, message FROM wardcall.alerts WHERE id = $1 FOR UPDATE").bind(alert_id).fetch_one(&mut *tx).await?;
    if row.acknowledged || (status_rank(&row.status) == 5 && !digits.starts_with('1')) {
        // The attempt that acknowledged has hung up, and no other key means
        // anything once its call ended: a replay of an earlier keypress. (A
        // late 1 on an ended call is still honoured: it can only help.)
        tx.rollback().await?;
        tracing::info!(attempt = %attempt, "keypress on an ended or acknowledging call ignored (a replay)");
        return Ok(if alert_status == "acknowledged" {
            twiml::say_and_hangup("This alert was already acknowledged. Goodbye.")
        } else {
            twiml::say_and_hangup("Goodbye.")
        });
    }
    sqlx::query("UPDATE wardcall.notification_attempts SET digits = coalesce(digits, '') || $2, updated_at = clock_timestamp() WHERE id = $1")
        .bind(attempt)
        .bind(digits)
        .execute(&mut *tx)
        .await?;
    let key = digits.chars().next();
    let person_actor = format!("person:{}", row.person_id);
    let mut replays_message = false;
    let reply = if is_machine(row.answered_by.as_deref()) {
        twiml::say_and_hangup("Goodbye.")
    } else if key == Some('1') {
        // An alert the policy gave up on is still acknowledged by a human's 1.
        if alert_status == "open" || alert_status == "unacknowledged" {
            let ack = Acknowledgement { run_id: row.run_id, alert_id, alert_status: &alert_status, attempt, person_id: &row.person_id, via: Channel::Voice };
            acknowledge_in(engine, &mut tx, ack, json!({"digits": digits})).await?;
            tracing::info!(attempt = %attempt, person = %row.person_id, "alert acknowledged by keypress");
            twiml::say_and_hangup("Thank you. The alert is acknowledged. Goodbye.")
        } else if alert_status == "acknowledged" {
            twiml::say_and_hangup("This alert was already acknowledged. Goodbye.")
        } else {
            twiml::say_and_hangup("This alert was cancelled. Goodbye.")
        }
    } else if key == Some('2') && alert_status == "open" {
        sqlx::query(
            "UPDATE wardcall.notification_attempts SET declined_at = coalesce(declined_at, clock_timestamp()), updated_at = clock_timestamp() WHERE id = $1",
        )
        .bind(attempt)
        .execute(&mut *tx)
        .await?;
        audit::record(&mut tx, Entity::NotificationAttempt, &attempt.to_string(), "attempt.declined", None, None, &person_actor, json!({"digits": digits}))
            .await?;
        signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "declined": true})).await?;
        twiml::say_and_hangup("Understood. Escalating to the next person. Goodbye.")
    } else if alert_status == "open" {
        replays_message = true;
        replay_message_twiml(engine, attempt, &message)
    } else if alert_status == "acknowledged" {
        twiml::say_and_hangup("This alert was already acknowledged. Goodbye.")
    } else {
        twiml::say_and_hangup("This alert is no longer open. Goodbye.")
    };
    finish_delivery(&mut tx, delivery, if replays_message { REPLAY_MESSAGE_MARKER } else { &reply }).await?;
    tx.commit().await?;
    engine.wake();
    engine.wake_call_sweeper();
    Ok(reply)
}

/// An acknowledgement being applied: whose, of which alert, through which
/// attempt and channel.
struct Acknowledgement<'a> {
    run_id: Uuid,
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
async fn acknowledge_in(engine: &Services, tx: &mut PgConnection, ack: Acknowledgement<'_>, detail: Value) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE wardcall.alerts SET status = 'acknowledged', acknowledged_at = clock_timestamp(), acknowledged_by = $2, acknowledged_via = $3,
                updated_at = clock_timestamp() WHERE id = $1",
    )
    .bind(ack.alert_id)
    .bind(ack.person_id)
    .bind(ack.via.as_str())
    .execute(&mut *tx)
    .await?;
    let answered = if ack.via == Channel::Voice {
        ", answered_at = coalesce(answered_at, clock_timestamp())"
    } else {
        ", replied_at = coalesce(replied_at, clock_timestamp())"
    };
    sqlx::query(&format!(
        "UPDATE wardcall.notification_attempts SET acknowledged_at = clock_timestamp(){answered}, updated_at = clock_timestamp() WHERE id = $1"
    ))
    .bind(ack.attempt)
    .execute(&mut *tx)
    .await?;
    let mut detail = detail;
    detail["attempt"] = json!(ack.attempt);
    detail["channel"] = json!(ack.via.as_str());
    audit::record(
        &mut *tx,
        Entity::Alert,
        &ack.alert_id.to_string(),
        "alert.acknowledged",
        Some(ack.alert_status),
        Some("acknowledged"),
        &format!("person:{}", ack.person_id),
        detail,
    )
    .await?;
    if let Some((settings, input)) = run_settings_and_input(engine, tx, ack.run_id).await? {
        write_back(tx, settings.write_back.on_acknowledged.as_deref(), "on_acknowledged", &input, WriteBackSubject::Attempt(ack.attempt), "webhook:twilio")
            .await?;
    }
    signal_run(tx, ack.run_id, json!({"attempt": ack.attempt, "acknowledged": true})).await
}

/// The TwiML that reads the alert again and waits for a key.
fn replay_message_twiml(engine: &Services, attempt: Uuid, message: &str) -> String {
    let gather_timeout = engine.providers.twilio.as_ref().map(|t| t.config.gather_timeout_seconds).unwrap_or(10);
    let action = crate::providers::twilio::callback_url(&engine.public_url, "gather", attempt);
    // A webhook's TwiML may be 64 kB (Twilio error 11750); the message fits.
    twiml::say_and_gather_within(message, &action, gather_timeout, 60_000)
        .unwrap_or_else(|| twiml::say_and_gather(twiml::FALLBACK_MESSAGE, &action, gather_timeout))
}

/// Rank of a message status (Twilio's Message resource status values):
/// updates only ever move forward. `intent`/`unknown` 0 < `requested` 1 <
/// `accepted`/`scheduled` 2 < `queued` 3 < `sending` 4 < `sent` 5 < final
/// (`delivered`, `undelivered`, `failed`, `canceled`) 6 < `read` 7; unknown
/// words are -1.
pub fn message_status_rank(s: &str) -> i32 {
    match s {
        "intent" | "unknown" => 0,
        "requested" => 1,
        "accepted" | "scheduled" => 2,
        "queued" => 3,
        "sending" => 4,
        "sent" => 5,
        "delivered" | "undelivered" | "failed" | "canceled" => 6,
        "read" => 7,
        _ => -1,
    }
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
    engine: &Services,
    delivery: Delivery<'_>,
    attempt: Uuid,
    message_sid: Option<&str>,
    message_status: &str,
    error_code: Option<&str>,
    actor: &str,
) -> Result<(), CallEventError> {
    let new_rank = message_status_rank(message_status);
    let mut tx = engine.pool.begin().await?;
    let row = lock_attempt(&mut tx, attempt, message_sid).await?;
    if claim_delivery(&mut tx, delivery, attempt).await?.is_some() || new_rank < 0 || new_rank <= message_status_rank(&row.status) {
        tx.rollback().await?;
        return Ok(());
    }
    let error =
        error_code.filter(|c| !c.is_empty() && message_status != "delivered").map(|c| format!("Twilio error {}", c.chars().take(10).collect::<String>()));
    let ended = if new_rank >= 6 { ", ended_at = coalesce(ended_at, clock_timestamp())" } else { "" };
    sqlx::query(&format!(
        "UPDATE wardcall.notification_attempts SET status = $2, error = coalesce($3, error){ended}, updated_at = clock_timestamp() WHERE id = $1"
    ))
    .bind(attempt)
    .bind(message_status)
    .bind(&error)
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Entity::NotificationAttempt,
        &attempt.to_string(),
        "attempt.status",
        Some(&row.status),
        Some(message_status),
        actor,
        json!({"message_sid": message_sid, "error_code": error_code.filter(|c| !c.is_empty())}),
    )
    .await?;
    if row.alert_id.is_some() {
        signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "status": message_status})).await?;
    }
    finish_delivery(&mut tx, delivery, "").await?;
    tx.commit().await?;
    if row.alert_id.is_some() {
        engine.wake();
    }
    Ok(())
}

/// What an inbound text meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// `1` from a recipient of an open alert: the alert is acknowledged.
    Acknowledged,
    /// `1`, but the sender's most recent alert is no longer open (or the
    /// sender was never paged): nothing changed.
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
/// (trimmed) acknowledges the alert the sender was most recently paged for
/// (the newest attempt, any channel, to that number, of an alert still
/// open), through the same acknowledgement as a keypress ([`acknowledge_in`]:
/// alert, attempt, audit, `on_acknowledged` write-back with
/// `acknowledged_via = 'sms'`, run signalled so ringing calls end). Twilio's
/// reserved keywords ([`crate::providers::twilio::messages::RESERVED_KEYWORDS`]) are
/// never commands; any other text is audited as not an acknowledgement,
/// without its text. A `message_sid` already handled is a replay and changes
/// nothing.
///
/// Errors: a database error (the provider should retry).
pub async fn apply_reply(engine: &Services, from: &str, message_sid: &str, body: &str) -> Result<ReplyOutcome, CallEventError> {
    use crate::providers::twilio::messages::is_reserved_keyword;
    let body = body.trim();
    // The newest attempt to this number; the newest of an open alert.
    let newest: Option<(Uuid, Uuid, Option<Uuid>)> = sqlx::query_as(
        "SELECT n.id, n.run_id, n.alert_id FROM wardcall.notification_attempts n
          WHERE n.destination = $1 ORDER BY n.created_at DESC LIMIT 1",
    )
    .bind(from)
    .fetch_optional(&engine.pool)
    .await?;
    let open: Option<(Uuid, Uuid, Uuid)> = sqlx::query_as(
        "SELECT n.run_id, n.alert_id, a.id FROM wardcall.notification_attempts n JOIN wardcall.alerts a ON a.id = n.alert_id
          WHERE n.destination = $1 AND a.status = 'open' ORDER BY n.created_at DESC LIMIT 1",
    )
    .bind(from)
    .fetch_optional(&engine.pool)
    .await?;
    let mut tx = engine.pool.begin().await?;
    // Lock order: run, alert, attempt.
    let run_lock = open.map(|o| o.0).or(newest.map(|n| n.1));
    if let Some(run) = run_lock {
        sqlx::query("SELECT 1 FROM wardcall.runs WHERE id = $1 FOR UPDATE").bind(run).execute(&mut *tx).await?;
    }
    let delivery = Delivery { provider: "twilio-sms", idempotency_token: Some(message_sid) };
    if claim_delivery(&mut tx, delivery, newest.map(|n| n.0).unwrap_or_else(Uuid::nil)).await?.is_some() {
        tx.rollback().await?;
        tracing::info!("replayed inbound message ignored");
        return Ok(ReplyOutcome::Replay);
    }
    let outcome = if body == "1" {
        match open {
            Some((run_id, _, alert_id)) => {
                let alert_status: String =
                    sqlx::query_scalar("SELECT status FROM wardcall.alerts WHERE id = $1 FOR UPDATE").bind(alert_id).fetch_one(&mut *tx).await?;
                // The person's attempt of that alert to the sender's number, a
                // text one if there is one.
                let attempt: Option<(Uuid, String)> = sqlx::query_as(
                    "SELECT id, person_id FROM wardcall.notification_attempts WHERE alert_id = $1 AND destination = $2
                      ORDER BY (channel = 'sms') DESC, created_at DESC LIMIT 1 FOR UPDATE",
                )
                .bind(alert_id)
                .bind(from)
                .fetch_optional(&mut *tx)
                .await?;
                match (alert_status.as_str(), attempt) {
                    ("open", Some((attempt, person_id))) => {
                        let ack = Acknowledgement { run_id, alert_id, alert_status: &alert_status, attempt, person_id: &person_id, via: Channel::Sms };
                        acknowledge_in(engine, &mut tx, ack, json!({"message_sid": message_sid})).await?;
                        tracing::info!(attempt = %attempt, person = %person_id, "alert acknowledged by text reply");
                        ReplyOutcome::Acknowledged
                    }
                    _ => ReplyOutcome::NothingToAcknowledge,
                }
            }
            None => ReplyOutcome::NothingToAcknowledge,
        }
    } else if is_reserved_keyword(body) {
        ReplyOutcome::ReservedKeyword
    } else {
        ReplyOutcome::NotACommand
    };
    if outcome != ReplyOutcome::Acknowledged {
        // Audited on the sender's newest attempt, never with the text.
        let (action, detail) = match outcome {
            ReplyOutcome::ReservedKeyword => ("reply.reserved_keyword", json!({"message_sid": message_sid, "handled_by": "twilio"})),
            ReplyOutcome::NothingToAcknowledge => ("reply.nothing_to_acknowledge", json!({"message_sid": message_sid})),
            _ => ("reply.not_an_acknowledgement", json!({"message_sid": message_sid, "chars": body.chars().count()})),
        };
        match newest {
            Some((attempt, _, _)) => {
                audit::record(&mut tx, Entity::NotificationAttempt, &attempt.to_string(), action, None, None, "webhook:twilio", detail).await?;
            }
            None => tracing::info!(from = %crate::config::redact_phone(from), action, "inbound message from a number wardcall never reached; ignored"),
        }
    }
    finish_delivery(&mut tx, delivery, "").await?;
    tx.commit().await?;
    if outcome == ReplyOutcome::Acknowledged {
        engine.wake();
        engine.wake_call_sweeper();
    }
    Ok(outcome)
}
