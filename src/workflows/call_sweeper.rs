//! The call sweeper: keeps what the provider does and what wardcall records
//! in step, on every engine, every [`SWEEP_INTERVAL`] or when woken.
//!
//! 1. **Hang-ups.** A call still queued, ringing or connected whose alert is
//!    no longer open (acknowledged on another call, or cancelled) is ended
//!    through the provider (Twilio "Update a Call" with `Status=completed`),
//!    once, audited as `attempt.hangup_requested`, and asked again after
//!    [`HANGUP_RETRY`] if it still has not ended. This covers cancellation
//!    from the API, the CLI or SQL, and a call whose create request returned
//!    only after its alert was closed.
//! 2. **Lost callbacks.** An attempt whose final status callback has not
//!    arrived by its `reconcile_after` (the intent time + ring timeout +
//!    [`RECONCILE_MARGIN`]) is fetched from the provider ("Fetch a Call") and
//!    its status applied as a callback would be
//!    ([`crate::notify::acknowledgement::apply_status`], actor
//!    `reconciler:<engine>`); a call still live is looked at again after
//!    [`RECONCILE_MARGIN`]. An intent never confirmed whose run has finished
//!    is marked `unknown`. So no attempt stays `ringing` or `in-progress`
//!    for ever (test `lost_callbacks_are_reconciled_from_the_provider`). An
//!    `unknown` attempt that a late create response or callback showed to
//!    have a call is hung up or reconciled like a live one.
//! 3. **Receipts.** Webhook receipts older than a day are deleted (Twilio
//!    retries a webhook for at most 15 s).
//!
//! Several engines sweep at once safely: rows are claimed with
//! `FOR UPDATE SKIP LOCKED` and their next time is pushed on before the
//! provider is asked.

use crate::notify::acknowledgement::{self, Delivery};
use crate::runtime::Services;
use crate::store::audit::{self, Entity};
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

/// How often each engine sweeps when nothing wakes it.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
/// How long after its expected end an attempt without a final status is
/// fetched from the provider, and how often after that.
pub const RECONCILE_MARGIN: Duration = Duration::from_secs(10);
/// How long after an unanswered hang-up request it is sent again.
pub const HANGUP_RETRY: Duration = Duration::from_secs(30);

/// Runs until the engine stops.
pub async fn run(engine: Services) {
    let mut stop = engine.stop_signal();
    loop {
        if *stop.borrow() {
            return;
        }
        if let Err(e) = sweep_once(&engine).await {
            tracing::warn!(error = %crate::capture::db_message(&e), "call sweep failed; retrying");
        }
        tokio::select! {
            _ = engine.call_sweeper_woken() => {}
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Calls the provider was asked to end.
    pub hangups: usize,
    /// Attempts fetched from the provider.
    pub fetched: usize,
    /// Never-confirmed intents of finished runs marked `unknown`.
    pub abandoned_intents: usize,
}

/// One sweep: hang-ups, then reconciliation. Errors: a database error (the
/// next sweep tries again; provider errors are logged, not returned).
pub async fn sweep_once(engine: &Services) -> Result<SweepReport, sqlx::Error> {
    let mut report = SweepReport::default();
    let Some(twilio) = engine.providers.twilio.as_ref() else { return Ok(report) };
    let actor = format!("reconciler:{}", engine.engine_id);

    // 1. Hang-ups.
    let mut tx = engine.pool.begin().await?;
    let to_end: Vec<(Uuid, String, String)> = sqlx::query_as(
        "WITH due AS (
             SELECT n.id, a.status AS alert_status FROM wardcall.notification_attempts n
               JOIN wardcall.alerts a ON a.id = n.alert_id
              WHERE (n.status IN ('intent','requested','initiated','ringing','in-progress')
                     OR (n.status = 'unknown' AND n.ended_at IS NULL))
                AND n.provider_id IS NOT NULL AND n.acknowledged_at IS NULL AND n.channel = 'voice'
                AND a.status IN ('acknowledged','cancelled')
                AND (n.hangup_requested_at IS NULL
                     OR n.hangup_requested_at < clock_timestamp() - $1 * interval '1 millisecond')
              ORDER BY n.created_at LIMIT 50
                FOR UPDATE OF n SKIP LOCKED)
         UPDATE wardcall.notification_attempts n SET hangup_requested_at = clock_timestamp()
           FROM due WHERE n.id = due.id
         RETURNING n.id, n.provider_id, due.alert_status",
    )
    .bind(HANGUP_RETRY.as_millis() as i64)
    .fetch_all(&mut *tx)
    .await?;
    for (id, _, alert_status) in &to_end {
        audit::record(
            &mut tx,
            Entity::NotificationAttempt,
            &id.to_string(),
            "attempt.hangup_requested",
            None,
            None,
            &actor,
            json!({"alert_status": alert_status}),
        )
        .await?;
    }
    tx.commit().await?;
    for (id, sid, alert_status) in &to_end {
        match twilio.client.end_call(sid).await {
            Ok(()) => tracing::info!(attempt = %id, call_sid = %sid, alert_status = %alert_status, "ended a call of a closed alert"),
            Err(e) => tracing::warn!(attempt = %id, call_sid = %sid, error = %e, "ending a call of a closed alert failed; will ask again"),
        }
    }
    report.hangups = to_end.len();

    // 2. Attempts past their expected end without a final status.
    let mut tx = engine.pool.begin().await?;
    let overdue: Vec<(Uuid, String)> = sqlx::query_as(
        "WITH due AS (
             SELECT id FROM wardcall.notification_attempts
              WHERE (status IN ('requested','initiated','ringing','in-progress') OR (status = 'unknown' AND ended_at IS NULL))
                AND provider_id IS NOT NULL AND channel = 'voice'
                AND reconcile_after <= clock_timestamp()
              ORDER BY reconcile_after LIMIT 20 FOR UPDATE SKIP LOCKED)
         UPDATE wardcall.notification_attempts n
            SET reconcile_after = clock_timestamp() + $1 * interval '1 millisecond'
           FROM due WHERE n.id = due.id RETURNING n.id, n.provider_id",
    )
    .bind(RECONCILE_MARGIN.as_millis() as i64)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    for (id, sid) in &overdue {
        match twilio.client.fetch_call(sid).await {
            Ok(call) => {
                tracing::info!(attempt = %id, call_sid = %sid, status = %call.status, "reconciled a call whose final callback had not arrived");
                let delivery = Delivery { provider: "twilio", idempotency_token: None };
                match acknowledgement::apply_status(engine, delivery, *id, Some(sid), &call.status, call.answered_by.as_deref(), &actor).await {
                    Ok(()) => {}
                    Err(acknowledgement::CallEventError::Db(e)) => return Err(e),
                    Err(e) => tracing::warn!(attempt = %id, error = %e, "reconciling an attempt failed"),
                }
            }
            Err(e) => tracing::warn!(attempt = %id, call_sid = %sid, error = %e, "fetching a call to reconcile it failed; will try again"),
        }
    }
    report.fetched = overdue.len();
    // Text messages whose final status never came.
    report.fetched += crate::notify::sms::reconcile_messages(engine).await?;

    // 3. Intents never confirmed whose run is over: nothing will place or
    //    reconcile them any more.
    let mut tx = engine.pool.begin().await?;
    let abandoned: Vec<Uuid> = sqlx::query_scalar(
        "WITH due AS (
             SELECT n.id FROM wardcall.notification_attempts n JOIN wardcall.runs r ON r.id = n.run_id
              WHERE n.status = 'intent' AND n.provider_id IS NULL AND n.reconcile_after <= clock_timestamp()
                AND r.status IN ('completed','failed','cancelled')
              LIMIT 50 FOR UPDATE OF n SKIP LOCKED)
         UPDATE wardcall.notification_attempts n
            SET status = 'unknown', error = 'never confirmed by the provider; the run has ended',
                ended_at = clock_timestamp(), updated_at = clock_timestamp()
           FROM due WHERE n.id = due.id RETURNING n.id",
    )
    .fetch_all(&mut *tx)
    .await?;
    for id in &abandoned {
        audit::record(
            &mut tx,
            Entity::NotificationAttempt,
            &id.to_string(),
            "attempt.outcome_unknown",
            Some("intent"),
            Some("unknown"),
            &actor,
            json!({"rule": "run ended"}),
        )
        .await?;
    }
    tx.commit().await?;
    report.abandoned_intents = abandoned.len();

    // 4. Webhook receipts outlive any retry or replay by far after a day.
    sqlx::query(
        "DELETE FROM wardcall.webhook_receipts WHERE ctid IN (
             SELECT ctid FROM wardcall.webhook_receipts WHERE received_at < clock_timestamp() - interval '1 day' LIMIT 1000)",
    )
    .execute(&engine.pool)
    .await?;
    Ok(report)
}
