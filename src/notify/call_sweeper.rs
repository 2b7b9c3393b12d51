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
//! 4. **Kept write-backs.** Write-backs left out of a batch of send records
//!    and not written by the engine that kept them (it stopped, or the
//!    database was out) are run on a task of their own
//!    ([`crate::notify::delivery::run_due_kept_write_backs`]), so that a
//!    team's lock never delays a hang-up.
//!
//! Several engines sweep at once safely: rows are claimed with
//! `FOR UPDATE SKIP LOCKED` and their next time is pushed on before the
//! provider is asked.

use crate::db::deadline::within_on;
use crate::notify::acknowledgement::{self, Delivery};
use crate::notify::Channel;
use crate::runtime::Services;
use crate::store::{attempts, webhooks};
use std::time::Duration;

/// How often each engine sweeps when nothing wakes it.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
/// How long after its expected end an attempt without a final status is
/// fetched from the provider, and how often after that.
pub const RECONCILE_MARGIN: Duration = Duration::from_secs(10);
/// How long after an unanswered hang-up request it is sent again.
pub const HANGUP_RETRY: Duration = Duration::from_secs(30);

/// Runs until the engine stops.
pub async fn run(services: Services) {
    let mut stop = services.stop_signal();
    loop {
        if *stop.borrow() {
            return;
        }
        services.shared(SweepCount::default).0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = sweep_once(&services).await {
            tracing::warn!(error = %crate::capture::db_message(&e), "call sweep failed; retrying");
        }
        tokio::select! {
            _ = services.call_sweeper_woken() => {}
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How many sweeps this engine's call sweeper has started (one per engine,
/// [`Services::shared`]): each is six statements, so a sweeper woken for
/// nothing is load a burst pays for.
#[derive(Debug, Default)]
pub struct SweepCount(pub std::sync::atomic::AtomicU64);

/// The sweeps started so far by the call sweeper of the engine of `services`.
pub fn sweeps_started(services: &Services) -> u64 {
    services.shared(SweepCount::default).0.load(std::sync::atomic::Ordering::Relaxed)
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
pub async fn sweep_once(services: &Services) -> Result<SweepReport, sqlx::Error> {
    let mut report = SweepReport::default();
    // Write-backs kept for an engine that did not write them: first, on a
    // task of their own, so that no failure below skips them and no team's
    // lock delays what follows.
    crate::notify::delivery::run_due_kept_write_backs(services);
    let Some(voice) = services.providers.sender(Channel::Voice) else { return Ok(report) };
    let actor = format!("reconciler:{}", services.engine_id);
    // Each database step bounded (`crate::db::deadline`): a connection a hard
    // failover left half-open must not hold the sweeper (hang-ups of
    // acknowledged alerts, reconciliation) until the kernel gives up.
    let (pool, deadline) = (&services.pool, services.config.engine.database_deadline());

    // 1. Hang-ups.
    let to_end = within_on(pool, deadline, attempts::claim_calls_to_end(pool, 50, HANGUP_RETRY.as_millis() as i64, &actor)).await?;
    for (id, provider_id, alert_status) in &to_end {
        match voice.end(provider_id).await {
            Ok(()) => tracing::info!(attempt = %id, provider_id = %provider_id, alert_status = %alert_status, "ended a call of a closed alert"),
            Err(e) => tracing::warn!(attempt = %id, provider_id = %provider_id, error = %e, "ending a call of a closed alert failed; will ask again"),
        }
    }
    report.hangups = to_end.len();

    // 2. Attempts past their expected end without a final status.
    let overdue = within_on(pool, deadline, attempts::claim_calls_to_reconcile(pool, 20, RECONCILE_MARGIN.as_millis() as i64)).await?;
    for (id, provider_id) in &overdue {
        match voice.fetch(provider_id).await {
            Ok(call) => {
                tracing::info!(attempt = %id, provider_id = %provider_id, status = %call.status, "reconciled a call whose final callback had not arrived");
                let delivery = Delivery { provider: voice.provider(), idempotency_token: None, webhook: false };
                let applied = within_on(
                    pool,
                    deadline,
                    acknowledgement::apply_status(services, delivery, *id, Some(provider_id), &call.status, call.answered_by.as_deref(), &actor),
                );
                match applied.await {
                    Ok(()) => {}
                    Err(acknowledgement::CallEventError::Db(e)) => return Err(e),
                    Err(e) => tracing::warn!(attempt = %id, error = %e, "reconciling an attempt failed"),
                }
            }
            Err(e) => tracing::warn!(attempt = %id, provider_id = %provider_id, error = %e, "fetching a call to reconcile it failed; will try again"),
        }
    }
    report.fetched = overdue.len();
    // Text messages whose final status never came.
    report.fetched += crate::notify::sms::reconcile_messages(services).await?;

    // 3. Intents never confirmed whose run is over: nothing will place or
    //    reconcile them any more.
    report.abandoned_intents = within_on(pool, deadline, attempts::abandon_unconfirmed_intents(pool, 50, &actor)).await?;

    // 4. Webhook receipts outlive any retry or replay by far after a day.
    within_on(pool, deadline, webhooks::prune(pool)).await?;
    Ok(report)
}
