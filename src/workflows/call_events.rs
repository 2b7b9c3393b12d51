//! What a voice call's events mean for an alert: the one home of the
//! acknowledgement rules.
//!
//! Providers translate their webhooks (or a fetched call resource) into the
//! calls below; this module decides what each means: a status moves the
//! notification attempt forward (never back), an answering-machine verdict
//! marks a call as not human, a keypress of 1 from a human acknowledges the
//! alert, 2 passes it on, any other key replays the message. Each event is
//! applied in one transaction that locks the run row first, then the alert,
//! then the attempt (the lock order of the workers), writes back into the
//! team's row, and signals the run.
//!
//! Replays: a webhook carrying an idempotency token (Twilio's
//! `I-Twilio-Idempotency-Token`) is applied once; a replay with the same
//! token gets the first delivery's response and changes nothing.

use crate::audit::{self, Entity};
use crate::runtime::{store, Engine};
use crate::twilio::twiml;
use crate::workflows::escalation::{write_back, WriteBackSubject, CALL_UPDATE_SIGNAL};
use serde_json::{json, Value};
use sqlx::PgConnection;
use std::sync::Arc;
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
    alert_id: Uuid,
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
async fn run_settings_and_input(engine: &Engine, tx: &mut PgConnection, run: Uuid) -> Result<Option<(crate::config::EscalationWorkflow, Value)>, sqlx::Error> {
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
    engine: &Arc<Engine>,
    delivery: Delivery<'_>,
    attempt: Uuid,
    call_sid: Option<&str>,
    call_status: &str,
    answered_by: Option<&str>,
    actor: &str,
) -> Result<(), CallEventError> {
    let new_rank = status_rank(call_status);
    let mut tx = engine.db.pool.begin().await?;
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
    engine: &Arc<Engine>,
    delivery: Delivery<'_>,
    attempt: Uuid,
    call_sid: Option<&str>,
    answered_by: &str,
    actor: &str,
) -> Result<(), CallEventError> {
    let mut tx = engine.db.pool.begin().await?;
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
pub async fn apply_keypress(
    engine: &Arc<Engine>,
    delivery: Delivery<'_>,
    attempt: Uuid,
    call_sid: Option<&str>,
    digits: &str,
) -> Result<String, CallEventError> {
    let mut tx = engine.db.pool.begin().await?;
    let row = lock_attempt(&mut tx, attempt, call_sid).await?;
    if let Some(first_response) = claim_delivery(&mut tx, delivery, attempt).await? {
        tx.rollback().await?;
        tracing::info!(attempt = %attempt, "replayed keypress webhook ignored");
        return Ok(match first_response.as_str() {
            "" => twiml::say_and_hangup("Goodbye."),
            REPLAY_MESSAGE_MARKER => {
                let message: String =
                    sqlx::query_scalar("SELECT message FROM wardcall.alerts WHERE id = $1").bind(row.alert_id).fetch_one(&engine.db.pool).await?;
                replay_message_twiml(engine, attempt, &message)
            }
            _ => first_response,
        });
    }
    let (alert_status, message): (String, String) =
        sqlx::query_as("SELECT status, message FROM wardcall.alerts WHERE id = $1 FOR UPDATE").bind(row.alert_id).fetch_one(&mut *tx).await?;
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
            sqlx::query(
                "UPDATE wardcall.alerts SET status = 'acknowledged', acknowledged_at = clock_timestamp(), acknowledged_by = $2,
                        updated_at = clock_timestamp() WHERE id = $1",
            )
            .bind(row.alert_id)
            .bind(&row.person_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE wardcall.notification_attempts SET acknowledged_at = clock_timestamp(),
                        answered_at = coalesce(answered_at, clock_timestamp()), updated_at = clock_timestamp() WHERE id = $1",
            )
            .bind(attempt)
            .execute(&mut *tx)
            .await?;
            audit::record(
                &mut tx,
                Entity::Alert,
                &row.alert_id.to_string(),
                "alert.acknowledged",
                Some(&alert_status),
                Some("acknowledged"),
                &person_actor,
                json!({"attempt": attempt, "channel": "voice", "digits": digits}),
            )
            .await?;
            if let Some((settings, input)) = run_settings_and_input(engine, &mut tx, row.run_id).await? {
                write_back(
                    &mut tx,
                    settings.write_back.on_acknowledged.as_deref(),
                    "on_acknowledged",
                    &input,
                    WriteBackSubject::Attempt(attempt),
                    "webhook:twilio",
                )
                .await?;
            }
            signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "acknowledged": true})).await?;
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

/// The TwiML that reads the alert again and waits for a key.
fn replay_message_twiml(engine: &Engine, attempt: Uuid, message: &str) -> String {
    let gather_timeout = engine.providers.twilio.as_ref().map(|t| t.config.gather_timeout_seconds).unwrap_or(10);
    let action = crate::twilio::callback_url(&engine.public_url, "gather", attempt);
    // A webhook's TwiML may be 64 kB (Twilio error 11750); the message fits.
    twiml::say_and_gather_within(message, &action, gather_timeout, 60_000)
        .unwrap_or_else(|| twiml::say_and_gather(twiml::FALLBACK_MESSAGE, &action, gather_timeout))
}
