//! Delivery through any [`ChannelSender`], the same for every channel:
//!
//! 1. an ambiguous intent of an earlier execution (a crash or a timeout
//!    between the request and its record) is reconciled with the provider's
//!    list of sends to the same address ([`reconcile`]), outside any
//!    transaction;
//! 2. in the step's fenced transaction, the person's latest attempt decides
//!    ([`settle`]): adopt the send the provider has, send again under the
//!    re-send rule (a new generation), or send nothing (it went out, or was
//!    refused); new intents are recorded (`crate::store::attempts::insert_intent`)
//!    and committed;
//! 3. the sends run outside any transaction, in parallel, and every result is
//!    recorded before any error is returned ([`send_and_record`]): a
//!    provider's id of a send is never dropped because a write failed.
//!
//! Re-send rule (ARCHITECTURE.md): for a critical alert a second call or
//! text is better than none, so an intent whose send cannot be found at the
//! provider is marked `unknown` and sent again.

use super::channel::{ChannelSender, Outgoing, ProviderRecord, SendError, SendOutcome, Sent};
use super::Channel;
use crate::config::redact_phone;
use crate::db::batches::BatchQueue;
use crate::db::deadline::{within, within_on, HeldConnection};
use crate::runtime::step::WorkerSlot;
use crate::runtime::Services;
use crate::store::attempts::{self, AttemptRow};
use crate::store::write_backs;
use crate::workflows::StepError;
use anyhow::anyhow;
use serde_json::Value;
use sqlx::PgConnection;
use std::collections::HashMap;
use tokio::sync::watch;
use uuid::Uuid;

/// Slack (ms) when matching a provider's send to an intent: Twilio's
/// `date_created` has whole seconds, and clocks differ a little.
const RECONCILE_CLOCK_SLACK_MS: f64 = 2_000.0;

/// How long (ms after the intent) an ambiguous send may stay unverified
/// because the provider's list cannot be read, before it is sent again
/// anyway (a critical alert: better a second call than none).
pub const UNVERIFIED_RESEND_AFTER_MS: f64 = 30_000.0;

/// How long recording a send's result is retried (ms) before the step gives
/// up on it; the provider's id is kept in memory meanwhile, and a later
/// execution finds the send through the provider's list.
pub const RECORD_RETRY_BUDGET_MS: u64 = 60_000;

/// What the provider says of each ambiguous intent: `Some(sent)` to adopt
/// (with the status to record, if one is worth it), `None` when it has no
/// such send (send again). Intents not looked up are absent.
pub type Reconciled = HashMap<Uuid, Option<Sent>>;

/// For each attempt of `attempts` that is ambiguous under `fencing_token`
/// ([`AttemptRow::ambiguous`]), asks the provider for its newest sends to the
/// same address created at or after the intent (and carrying `body`, for a
/// text) that no attempt holds yet: the oldest of them is the one the intent
/// created. When another unconfirmed intent to the same address exists (two
/// alerts paging the same nurse; for a text, only one of the same run, as
/// another alert's text has another body), nothing is adopted and the person
/// is sent to again rather than risk taking another attempt's send.
///
/// `unverified`: what happens while the provider's list cannot be read.
///
/// Errors: [`StepError::Retryable`] when the provider cannot be asked (under
/// [`Unverified::ResendAfter30s`], only while the intent is younger than
/// [`UNVERIFIED_RESEND_AFTER_MS`]); nothing is sent meanwhile; a database error.
pub async fn reconcile(
    services: &Services,
    sender: &dyn ChannelSender,
    attempts: &[AttemptRow],
    fencing_token: i64,
    body: Option<&str>,
    unverified: Unverified,
) -> Result<Reconciled, StepError> {
    let mut found = HashMap::new();
    for a in attempts.iter().filter(|a| a.ambiguous(fencing_token)) {
        let records = match sender.sent_to(&a.destination, 20).await {
            Ok(r) => r,
            Err(e)
                if unverified == Unverified::ResendAfter30s && jiff::Timestamp::now().as_millisecond() as f64 - a.created_ms > UNVERIFIED_RESEND_AFTER_MS =>
            {
                tracing::error!(attempt = %a.id, error = %e, "cannot ask the provider whether an ambiguous send went out, for too long; sending again unverified");
                found.insert(a.id, None);
                continue;
            }
            Err(e) => {
                tracing::error!(attempt = %a.id, error = %e, "cannot ask the provider whether an ambiguous send went out; retrying before sending again");
                return Err(StepError::Retryable(anyhow!("reconciling an ambiguous send with {} failed: {e}", sender.provider())));
            }
        };
        let candidates: Vec<&ProviderRecord> = records
            .iter()
            .filter(|r| r.created_ms.is_some_and(|t| t as f64 >= a.created_ms - RECONCILE_CLOCK_SLACK_MS))
            .filter(|r| body.is_none() || r.body.as_deref() == body)
            .collect();
        let ids: Vec<String> = candidates.iter().map(|r| r.provider_id.clone()).collect();
        let known = services.bounded(attempts::known_provider_ids(&services.pool, sender.provider(), &ids)).await?;
        // A text is matched by its body too: another alert's text to the
        // same number is told apart, so only the same run's intents (the same
        // body: two people sharing a phone) are rivals; without that, both
        // would adopt one message and the unique index would refuse the step.
        let rivals = services.bounded(attempts::unconfirmed_rivals(&services.pool, &a.destination, a.id, sender.channel().as_str(), body.is_some())).await?;
        let adopt = if rivals == 0 { candidates.iter().rev().find(|r| !known.contains(&r.provider_id)) } else { None };
        // A text's status is recorded as the provider has it; a call's
        // statuses arrive by callback (the sweeper fetches late ones).
        let adopt = adopt.map(|r| Sent {
            provider_id: r.provider_id.clone(),
            status: (sender.channel() == Channel::Sms && super::acknowledgement::message_status_rank(&r.status) > 0).then(|| r.status.clone()),
        });
        found.insert(a.id, adopt);
    }
    Ok(found)
}

/// What [`reconcile`] does while the provider's list of sends cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unverified {
    /// The re-call rule of a critical alert (ARCHITECTURE.md): after
    /// [`UNVERIFIED_RESEND_AFTER_MS`] the person is called (or, for the
    /// escalation's SMS fallback, texted) again unverified: better a second
    /// call than none, and an unreadable list never holds the escalation.
    ResendAfter30s,
    /// A `notify` step's one-way text is never sent again before the
    /// provider's list says it did not go out: the step retries
    /// (ARCHITECTURE.md, invariant 2).
    Retry,
}

/// What to do when an ambiguous intent was not looked up at the provider
/// (a first execution skips the look-up; only a retry or a takeover can find one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotLookedUp {
    /// Send again (a call: better twice than never).
    Resend,
    /// Leave it to the next execution, which looks it up.
    Wait,
}

/// In the step's fenced transaction: decides from a person's latest attempt
/// (`latest`) whether to send them anything. Returns the generation of the
/// intent to record, or `None`: adopted (audited `attempt.reconciled`), sent
/// or refused already, or confirmed meanwhile (never twice).
///
/// Errors: a database error.
pub async fn settle(
    tx: &mut PgConnection,
    latest: Option<&AttemptRow>,
    reconciled: &Reconciled,
    fencing_token: i64,
    not_looked_up: NotLookedUp,
    actor: &str,
) -> Result<Option<i32>, sqlx::Error> {
    let Some(a) = latest else { return Ok(Some(0)) };
    if !a.ambiguous(fencing_token) {
        // Sent (or reported on by callbacks), refused: never again.
        return Ok(None);
    }
    match reconciled.get(&a.id) {
        Some(Some(r)) => {
            let status = r.status.as_deref().unwrap_or("requested");
            if attempts::adopt(tx, a.id, &r.provider_id, status, actor).await? {
                tracing::info!(attempt = %a.id, provider_id = %r.provider_id, "an ambiguous send had gone out; adopted it instead of sending again");
            }
            Ok(None)
        }
        None if not_looked_up == NotLookedUp::Wait => Ok(None),
        _ => Ok(attempts::mark_unknown(tx, a.id, actor).await?.then_some(a.generation + 1)),
    }
}

/// A write-back run in the transaction that records a send as placed (the
/// escalation's `on_call_placed`): the team's SQL and the event's payload.
#[derive(Debug, Clone, Copy)]
pub struct OnSent<'a> {
    pub hook: &'a str,
    pub sql: &'a str,
    pub payload: &'a Value,
}

/// Sends each message (intents committed) through `sender`, outside any
/// transaction, in parallel; then, with the step's worker `slot` traded for
/// a recording place ([`WorkerSlot::leave_for_records`]: a burst's next
/// calls go first), records every result (an accepted send through the
/// [`RecordCommitter`]'s next batch), retrying while the
/// database refuses for up to [`RECORD_RETRY_BUDGET_MS`] (even if the run
/// was lost meanwhile: the record is not fenced, and it is the only copy of
/// the provider's id). A send placed after its alert closed wakes the call
/// sweeper, which ends it. `beside` (if any) runs once the requests are
/// answered, before any result is recorded (an alert's message, which a
/// write-back of the record reads): after them, so that nothing of it
/// delays a request (measured: BENCHMARKS.md, "Issue 9, nineteenth
/// session").
///
/// Returns how many sends the provider accepted (each recorded); the others
/// were refused for good (recorded `failed`).
///
/// Errors: [`StepError::Retryable`] when any send was unavailable or its
/// outcome unknown (the intent stays for reconciliation), or a result could
/// not be recorded within the budget.
pub async fn send_and_record(
    services: &Services,
    sender: &dyn ChannelSender,
    outgoing: &[Outgoing],
    on_sent: Option<OnSent<'_>>,
    actor: &str,
    slot: &WorkerSlot,
    beside: Option<futures_util::future::BoxFuture<'_, ()>>,
) -> Result<usize, StepError> {
    if outgoing.is_empty() {
        if let Some(work) = beside {
            work.await;
        }
        return Ok(0);
    }
    let public_url = services.public_url.clone();
    let results = futures_util::future::join_all(outgoing.iter().map(|o| sender.send(o, &public_url))).await;
    if let Some(work) = beside {
        work.await;
    }
    // The requests are answered: from here the step only records, on a
    // recording place, and its worker slot starts the next run.
    slot.leave_for_records().await;
    let mut retry: Option<String> = None;
    for (o, outcome) in outgoing.iter().zip(&results) {
        let started = std::time::Instant::now();
        let mut delay = std::time::Duration::from_millis(50);
        loop {
            match record_result(services, sender, o, outcome, on_sent, actor).await {
                Ok(transient) => {
                    if let Some(t) = transient {
                        retry = Some(t);
                    }
                    break;
                }
                Err(e) => {
                    let sqlstate = e.as_database_error().and_then(|d| d.code()).map(|c| c.to_string());
                    // A unique violation cannot heal by waiting.
                    if started.elapsed().as_millis() as u64 > RECORD_RETRY_BUDGET_MS || sqlstate.as_deref() == Some("23505") {
                        tracing::error!(attempt = %o.attempt_id, sqlstate = ?sqlstate, "recording a send's result failed for good; it is reconciled from the provider's list");
                        retry.get_or_insert_with(|| format!("recording a send's result failed: {}", crate::capture::db_message(&e)));
                        break;
                    }
                    tracing::warn!(attempt = %o.attempt_id, sqlstate = ?sqlstate, retry_in_ms = delay.as_millis() as u64, "recording a send's result failed; retrying before anything else");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(2));
                }
            }
        }
    }
    match retry {
        Some(why) => Err(StepError::Retryable(anyhow!("{why}"))),
        None => Ok(results.iter().filter(|r| r.result.is_ok()).count()),
    }
}

/// Records one send's result in its own transaction. Returns `Some(reason)`
/// when the step must be retried: an unavailable provider or an unknown
/// outcome leaves the intent in place (a provider outage is never mistaken
/// for a person who did not answer). Only a definitive refusal marks the
/// attempt failed, so the policy goes on.
async fn record_result(
    services: &Services,
    sender: &dyn ChannelSender,
    o: &Outgoing,
    outcome: &SendOutcome,
    on_sent: Option<OnSent<'_>>,
    actor: &str,
) -> Result<Option<String>, sqlx::Error> {
    if let (Ok(sent), None) = (&outcome.result, &outcome.content_refused) {
        // The common case: an accepted send, recorded (with its write-back)
        // in the record committer's next batch.
        tracing::info!(attempt = %o.attempt_id, person = %o.person_id, channel = sender.channel().as_str(), to = %redact_phone(&o.to), provider_id = %sent.provider_id, "sent");
        let committer = services.shared(|| RecordCommitter::new(services.pool.clone(), services.config.engine.database_deadline(), services.stop_signal()));
        let alert_status = committer
            .record(QueuedRecord {
                attempt_id: o.attempt_id,
                provider_id: sent.provider_id.clone(),
                status: sent.status.clone().unwrap_or_else(|| "requested".into()),
                on_sent: on_sent.map(|w| (w.hook.to_string(), w.sql.to_string(), w.payload.clone())),
                actor: actor.to_string(),
            })
            .await?;
        if alert_status.as_deref().is_some_and(|s| s != "open") {
            tracing::warn!(attempt = %o.attempt_id, provider_id = %sent.provider_id, alert_status = ?alert_status, "a send went out after its alert closed; ending it if it can be");
            services.wake_call_sweeper();
        }
        return Ok(None);
    }
    // A write-back or a content refusal to audit share the send's
    // transaction; otherwise the result is one statement on its own.
    // Bounded by `engine.database_deadline_ms` ([`Services::bounded`]).
    let (transient, closed_alert) = services.bounded(async {
        let shared = on_sent.is_some() || outcome.content_refused.is_some();
        let (mut tx, mut conn) = if shared { (Some(services.pool.begin().await?), None) } else { (None, Some(services.pool.acquire().await?)) };
        let c: &mut PgConnection = match (tx.as_mut(), conn.as_mut()) {
            (Some(t), _) => t,
            (None, Some(c)) => c,
            (None, None) => unreachable!("a transaction or a connection was opened above"),
        };
        if let Some(e) = &outcome.content_refused {
            tracing::warn!(attempt = %o.attempt_id, person = %o.person_id, error = %e, "the provider refused the alert's text for its content; sent the short fallback text instead");
            attempts::audit_content_refused(c, o.attempt_id, e, actor).await?;
        }
        let mut closed_alert = false;
        let transient = match &outcome.result {
            Ok(sent) => {
                tracing::info!(attempt = %o.attempt_id, person = %o.person_id, channel = sender.channel().as_str(), to = %redact_phone(&o.to), provider_id = %sent.provider_id, "sent");
                let (_, alert_status) = attempts::record_sent(c, o.attempt_id, &sent.provider_id, sent.status.as_deref().unwrap_or("requested"), actor).await?;
                if let Some(w) = on_sent {
                    crate::workflows::team_sql::write_back(
                        c,
                        Some(w.sql),
                        w.hook,
                        w.payload,
                        crate::workflows::team_sql::WriteBackSubject::Attempt(o.attempt_id),
                        actor,
                    )
                    .await?;
                }
                closed_alert = alert_status.as_deref().is_some_and(|s| s != "open");
                if closed_alert {
                    tracing::warn!(attempt = %o.attempt_id, provider_id = %sent.provider_id, alert_status = ?alert_status, "a send went out after its alert closed; ending it if it can be");
                }
                None
            }
            Err(SendError::Unavailable(e)) => {
                tracing::error!(attempt = %o.attempt_id, person = %o.person_id, error = %e, "could not send, or the outcome is unknown (provider unavailable, slow, or refusing our credentials); retrying the step after reconciling with the provider");
                attempts::audit_provider_error(c, o.attempt_id, e, actor).await?;
                Some(format!("{} send failed: {e}", sender.provider()))
            }
            Err(SendError::Refused(e)) => {
                tracing::error!(attempt = %o.attempt_id, person = %o.person_id, error = %e, "the provider refused this send; going on without it");
                attempts::record_refused(c, o.attempt_id, e, actor).await?;
                None
            }
        };
        if let Some(tx) = tx {
            tx.commit().await?;
        }
        Ok::<_, sqlx::Error>((transient, closed_alert))
    }).await?;
    if closed_alert {
        services.wake_call_sweeper();
    }
    Ok(transient)
}

/// Largest batch of records the record committer commits in one transaction.
/// Its write-backs run one after another inside it, within
/// `team_sql::BATCHED_WRITE_BACKS_BUDGET_MS` in all (the later ones are
/// deferred out of it).
pub const RECORD_BATCH_MAX: usize = 64;

/// An accepted send's record, queued for the [`RecordCommitter`]: the
/// attempt, the provider's id and status, the write-back to run with it
/// (`(hook, sql, payload)`) and the audit actor.
#[derive(Debug)]
pub struct QueuedRecord {
    pub attempt_id: Uuid,
    pub provider_id: String,
    pub status: String,
    pub on_sent: Option<(String, String, Value)>,
    pub actor: String,
}

/// Commits the records of accepted sends in batches, one batch at a time:
/// every record queued meanwhile (up to [`RECORD_BATCH_MAX`]) in one
/// transaction: the attempts in one statement
/// ([`attempts::record_sent_many`]) and the write-backs each in a savepoint
/// ([`crate::workflows::team_sql::write_back_attempts`]), one commit.
///
/// Why: during a burst the records of the calls already placed were two
/// thirds of the database's work, and they ran beside the next alerts'
/// first calls. One batch at a time leaves the CPU to those calls; a batch
/// of many records costs one commit and three round trips a record instead
/// of a transaction of seven round trips each (BENCHMARKS.md, "Issue 9,
/// eighth session"). Two batches never wait for each other (there is one),
/// and a batch locks its attempts in id order.
///
/// A batch that fails is retried record by record, so that each record gets
/// its own outcome (the caller retries or gives up on it: [`send_and_record`]).
/// One per engine ([`Services::shared`], made with the engine's pool by the
/// first step that records), over a [`BatchQueue`] whose task ends when the
/// engine's services are dropped.
pub struct RecordCommitter(BatchQueue<QueuedRecord, Result<Option<String>, sqlx::Error>>);

impl std::fmt::Debug for RecordCommitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordCommitter").finish_non_exhaustive()
    }
}

impl RecordCommitter {
    /// A committer taking its connections from `pool` (the engine's); its
    /// task starts now (inside a Tokio runtime). One actor per batch (the
    /// audit rows' actor): a record of another waits for the next. `stop`
    /// (the engine's stop signal) ends the runs of write-backs left out of
    /// a batch; they stay kept for the call sweepers. Each batch's
    /// transaction is bounded by `deadline` (`engine.database_deadline_ms`,
    /// [`crate::db::deadline`]): one that gets no reply fails (its records
    /// are then tried one by one, each bounded too), and its connection is closed.
    pub fn new(pool: sqlx::PgPool, deadline: std::time::Duration, stop: watch::Receiver<bool>) -> RecordCommitter {
        RecordCommitter(BatchQueue::start(
            RECORD_BATCH_MAX,
            |first, next| first.actor == next.actor,
            move |batch: Vec<QueuedRecord>| {
                let (pool, stop) = (pool.clone(), stop.clone());
                async move { commit_batch(&pool, deadline, &stop, batch).await }
            },
        ))
    }

    /// Queues `record` for the next batch and waits for its commit. Returns
    /// the status of the attempt's alert (`None` for a `notify` step's
    /// attempt).
    ///
    /// Errors: the database's (the record committed alone after its batch
    /// failed, and failed again); `RowNotFound` when the attempt does not
    /// exist; a protocol error if the committer's task is gone.
    pub async fn record(&self, record: QueuedRecord) -> Result<Option<String>, sqlx::Error> {
        self.0.submit(record).await.map_err(|e| sqlx::Error::Protocol(format!("the record committer: {e}")))?
    }
}

/// Commits a batch of records ([`commit_records`]); a batch that fails is
/// retried record by record, so that each record gets its own outcome.
async fn commit_batch(
    pool: &sqlx::PgPool,
    deadline: std::time::Duration,
    stop: &watch::Receiver<bool>,
    batch: Vec<QueuedRecord>,
) -> Vec<Result<Option<String>, sqlx::Error>> {
    let records: Vec<&QueuedRecord> = batch.iter().collect();
    match commit_records(pool, deadline, stop, &records).await {
        Ok(statuses) => batch.iter().map(|r| statuses.get(&r.attempt_id).cloned().ok_or(sqlx::Error::RowNotFound)).collect(),
        Err(e) if batch.len() == 1 => vec![Err(e)],
        // No reply at all (a half-open connection): recording them one by
        // one would give each its own deadline, in turn, while the queue
        // waits; each caller retries on its own instead.
        Err(e) if crate::db::deadline::is_no_reply(&e) => {
            tracing::warn!(records = batch.len(), error = %e, "a batch of send records got no reply; each is retried by its step");
            batch.iter().map(|_| Err(crate::db::deadline::no_reply(deadline))).collect()
        }
        Err(e) => {
            tracing::warn!(records = batch.len(), error = %crate::capture::db_message(&e), "a batch of send records failed; recording them one by one");
            let mut out = Vec::with_capacity(batch.len());
            for r in &batch {
                out.push(commit_records(pool, deadline, stop, &[r]).await.and_then(|s| s.get(&r.attempt_id).cloned().ok_or(sqlx::Error::RowNotFound)));
            }
            out
        }
    }
}

/// One transaction: the records, then the write-backs in queue order, then
/// the write-backs those left out kept (`store::write_backs::keep`), run
/// after the commit on a task of their own that ends when the engine stops
/// (`stop`). Returns each recorded attempt's alert status.
async fn commit_records(
    pool: &sqlx::PgPool,
    deadline: std::time::Duration,
    stop: &watch::Receiver<bool>,
    records: &[&QueuedRecord],
) -> Result<HashMap<Uuid, Option<String>>, sqlx::Error> {
    let actor = records.first().map_or("", |r| r.actor.as_str());
    let mut conn = HeldConnection::acquire(pool).await?;
    let written = within(deadline, write_records(&mut conn, records, actor)).await;
    let (recorded, left_out) = conn.settle(written)?;
    if !left_out.is_empty() {
        let later = left_out;
        let (pool, mut stop, actor) = (pool.clone(), stop.clone(), actor.to_string());
        tokio::spawn(async move {
            for (attempt, hook) in later {
                // An engine that stops leaves the rest kept, for the call
                // sweepers ([`run_due_kept_write_backs`]); so does an error
                // around the team's statement (the database unreachable).
                let outcome = tokio::select! {
                    outcome = within_on(&pool, deadline, run_kept_write_back(&pool, attempt, &hook, &actor)) => outcome,
                    _ = stop.changed() => return,
                };
                if let Err(e) = outcome {
                    tracing::warn!(%attempt, hook, error = %crate::capture::db_message(&e), "a write-back left out of its batch failed around its statement; it stays kept for the call sweepers");
                }
            }
        });
    }
    Ok(recorded)
}

/// The transaction of [`commit_records`] on `conn`: returns each recorded
/// attempt's alert status, and the write-backs it kept (attempt, hook).
async fn write_records(
    conn: &mut PgConnection,
    records: &[&QueuedRecord],
    actor: &str,
) -> Result<(HashMap<Uuid, Option<String>>, Vec<(Uuid, String)>), sqlx::Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let sends: Vec<(Uuid, &str, &str)> = records.iter().map(|r| (r.attempt_id, r.provider_id.as_str(), r.status.as_str())).collect();
    let recorded = attempts::record_sent_many(&mut tx, &sends, actor).await?;
    let found: std::collections::HashSet<Uuid> = recorded.iter().map(|r| r.0).collect();
    let write_backs: Vec<write_backs::AttemptWriteBack<'_>> = records
        .iter()
        .filter(|r| found.contains(&r.attempt_id))
        .filter_map(|r| r.on_sent.as_ref().map(|(hook, statement, payload)| write_backs::AttemptWriteBack { attempt: r.attempt_id, hook, statement, payload }))
        .collect();
    let deferred = crate::workflows::team_sql::write_back_attempts(&mut tx, &write_backs, actor).await?;
    // Write-backs that waited too long inside the batch are kept in the
    // batch's own transaction (`wardcall.pending_write_backs`), so that they
    // outlive this engine; then run at once, each alone, on a task of their
    // own (they hold no attempt's row; the next batch does not wait for them).
    let left_out = &write_backs[write_backs.len() - deferred..];
    write_backs::keep(&mut tx, left_out, actor).await?;
    tx.commit().await?;
    let left_out: Vec<(Uuid, String)> = left_out.iter().map(|w| (w.attempt, w.hook.to_string())).collect();
    Ok((recorded.into_iter().map(|(id, _, alert_status)| (id, alert_status)).collect(), left_out))
}

/// Runs the kept write-back of `attempt` and `hook`
/// ([`write_backs::take`]), in one transaction with its row's deletion:
/// the team's statement in a savepoint with the write-back's own timeouts
/// ([`crate::workflows::team_sql::write_back`]; the team's own error is
/// audited `write_back.failed` there), or, when the call was answered,
/// declined or ended meanwhile (its later write-backs ran, and this one must
/// not overwrite them), an audit row `write_back.failed` saying it was
/// superseded (with `kept_by`, the engine that kept it). Its audit rows name
/// `actor`, the engine running it. Returns whether it ran (`false`: another
/// transaction holds it, or it ran already).
///
/// Errors: a database error around the team's statement; nothing is
/// written, and the write-back stays kept.
pub async fn run_kept_write_back(pool: &sqlx::PgPool, attempt: Uuid, hook: &str, actor: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some(kept) = write_backs::take(&mut tx, attempt, hook).await? else { return Ok(false) };
    if attempts::lock_if_unsettled(&mut tx, attempt).await? {
        let subject = crate::workflows::team_sql::WriteBackSubject::Attempt(attempt);
        crate::workflows::team_sql::write_back(&mut tx, Some(&kept.statement), hook, &kept.payload, subject, actor).await?;
    } else {
        tracing::warn!(%attempt, hook, "a write-back left out of its batch is superseded (the call or its alert moved on); not run");
        let detail = serde_json::json!({"hook": hook, "error": "superseded: the call was answered or ended, or its alert closed, before this write-back could run", "kept_by": kept.actor});
        crate::store::audit::record(
            &mut tx,
            crate::store::audit::Entity::NotificationAttempt,
            &attempt.to_string(),
            "write_back.failed",
            None,
            None,
            actor,
            detail,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Runs the kept write-backs that are due ([`write_backs::due`]: left by an
/// engine that stopped, or whose earlier tries failed), one by one, on a
/// task of their own so that the caller (the call sweeper, every sweep) never
/// waits for a team's lock; at most one such task per engine, which ends when
/// nothing is due or the engine stops. One that failed around the team's
/// statement [`write_backs::TRIES_MAX`] times is given up, audited
/// ([`write_backs::give_up`]). Returns at once.
pub fn run_due_kept_write_backs(services: &Services) {
    let running = services.shared(KeptWriteBackRunner::default);
    let Ok(guard) = running.0.clone().try_lock_owned() else { return };
    let (pool, mut stop, actor) = (services.pool.clone(), services.stop_signal(), services.actor());
    // Each statement bounded ([`crate::db::deadline`]): a half-open
    // connection must not hold the runner, and so the call sweeper's next
    // sweeps' kept write-backs, until the kernel gives up.
    let deadline = services.config.engine.database_deadline();
    tokio::spawn(async move {
        let _one_at_a_time = guard;
        while !*stop.borrow() {
            let (attempt, hook, tries) = match within_on(&pool, deadline, write_backs::due(&pool)).await {
                Ok(Some(due)) => due,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %crate::capture::db_message(&e), "reading the kept write-backs failed; the next sweep retries");
                    return;
                }
            };
            let outcome = tokio::select! {
                outcome = within_on(&pool, deadline, run_kept_write_back(&pool, attempt, &hook, &actor)) => outcome,
                _ = stop.changed() => return,
            };
            match outcome {
                Ok(true) => tracing::info!(%attempt, hook, "ran a kept write-back"),
                Ok(false) => {}
                Err(e) if tries >= write_backs::TRIES_MAX => {
                    let error = crate::capture::db_message(&e);
                    tracing::error!(%attempt, hook, tries, error = %error, "a kept write-back failed around its statement every time; given up and audited");
                    if let Err(e) = within_on(&pool, deadline, write_backs::give_up(&pool, attempt, &hook, &error, &actor)).await {
                        tracing::warn!(%attempt, hook, error = %crate::capture::db_message(&e), "giving up a kept write-back failed; tried again later");
                    }
                }
                Err(e) => {
                    tracing::warn!(%attempt, hook, tries, error = %crate::capture::db_message(&e), "a kept write-back failed around its statement; tried again later")
                }
            }
        }
    });
}

/// The one task per engine running kept write-backs ([`run_due_kept_write_backs`]).
#[derive(Debug, Default)]
struct KeptWriteBackRunner(std::sync::Arc<tokio::sync::Mutex<()>>);
