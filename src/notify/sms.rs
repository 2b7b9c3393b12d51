//! The SMS channel (Twilio Programmable Messaging): one-way messages of a
//! workflow step ([`send_one_way`]) and the escalation's SMS fallback after a
//! failed call ([`send_fallbacks`]).
//!
//! Every message follows invariant 2: its intent row
//! (`notification_attempts`, channel `sms`, status `intent`, the run's fencing
//! token) is committed under the run's lease ([`lock_fenced`]) before the
//! create-message request; the request runs outside any transaction; its
//! MessageSid (or Twilio's refusal) is recorded after. An intent found
//! unconfirmed by a later execution (a crash or a timeout between request and
//! record) is reconciled with Twilio's message list (`To` the same number,
//! created since the intent, the same body, a SID no attempt holds): adopted
//! if found, sent again (a new generation) if not. A message whose SID is
//! recorded is never sent again. Delivery is then recorded by the status
//! callbacks ([`crate::notify::acknowledgement::apply_message_status`]).
//!
//! Logging: attempt ids, SIDs and statuses only; numbers through
//! [`redact_phone`]; never a body.

use crate::config::redact_phone;
use crate::notify::acknowledgement::{is_machine, message_status_rank, FAILED_MESSAGE_STATUSES};
use crate::notify::{Channel, Recipient};
use crate::providers::twilio::client::TwilioError;
use crate::providers::twilio::messages::{fit_body, CreateMessageRequest, MessageResource, MAX_BODY_CHARS, REPLY_INSTRUCTION};
use crate::runtime::Services;
use crate::store::audit::{self, Entity};
use crate::store::runs::{lock_fenced, ClaimedRun};
use crate::workflows::StepError;
use anyhow::anyhow;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

/// Slack (ms) when matching a provider's message to an intent: Twilio's
/// `date_created` has whole seconds, and clocks differ a little.
const RECONCILE_CLOCK_SLACK_MS: f64 = 2_000.0;

/// How long after its intent a text message without a final status is
/// fetched from Twilio (and how often after that, for a day).
pub const MESSAGE_RECONCILE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// How long recording a create-message result is retried (ms) before the step
/// gives up on it (the intent is then reconciled from the message list).
const RECORD_RETRY_BUDGET_MS: u64 = 30_000;

/// One SMS attempt as this module reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct SmsAttempt {
    id: Uuid,
    person_id: String,
    status: String,
    provider_id: Option<String>,
    generation: i32,
    destination: String,
    /// `created_at`, milliseconds since the Unix epoch (UTC).
    created_ms: f64,
}

impl SmsAttempt {
    /// An intent whose create request may or may not have sent the message.
    fn ambiguous(&self) -> bool {
        self.status == "intent" && self.provider_id.is_none()
    }
}

/// A message to send, its intent committed.
struct Outgoing {
    attempt_id: Uuid,
    person_id: String,
    to: String,
    body: String,
}

/// Where an SMS attempt sits: a `notify` step (`step_key`, position 0/0) or
/// an escalation position (`step_key` empty).
#[derive(Clone, Copy)]
struct Position<'a> {
    run: Uuid,
    step_key: &'a str,
    cycle: i32,
    step_index: i32,
}

/// Each person's latest SMS attempt (highest generation) at `pos`.
async fn latest_sms_attempts(conn: &mut PgConnection, pos: Position<'_>) -> Result<Vec<SmsAttempt>, sqlx::Error> {
    sqlx::query_as(
        "SELECT DISTINCT ON (person_id) id, person_id, status, provider_id, generation, destination,
                (extract(epoch FROM created_at) * 1000)::float8 AS created_ms
           FROM wardcall.notification_attempts
          WHERE run_id = $1 AND step_key = $2 AND cycle = $3 AND step_index = $4 AND channel = 'sms'
          ORDER BY person_id, generation DESC",
    )
    .bind(pos.run)
    .bind(pos.step_key)
    .bind(pos.cycle)
    .bind(pos.step_index)
    .fetch_all(conn)
    .await
}

/// For each ambiguous intent among `attempts`, asks Twilio whether it sent
/// the message: `Some(resource)` to adopt, `None` to send again. Outside any
/// transaction.
///
/// Errors: Twilio's message list cannot be read (the step retries; nothing
/// is sent meanwhile).
async fn reconcile(
    engine: &Services,
    attempts: &[SmsAttempt],
    body_of: impl Fn(&SmsAttempt) -> String,
) -> Result<Vec<(Uuid, Option<MessageResource>)>, StepError> {
    let twilio = engine.providers.twilio.as_ref().ok_or_else(|| StepError::Permanent(anyhow!("no Twilio provider configured")))?;
    let mut found = Vec::new();
    for a in attempts.iter().filter(|a| a.ambiguous()) {
        let messages = twilio.client.list_messages_to(&a.destination, 20).await.map_err(|e| {
            tracing::error!(attempt = %a.id, error = %e, "cannot ask Twilio whether an ambiguous message was sent; retrying before sending again");
            StepError::Retryable(anyhow!("reconciling an ambiguous create-message with Twilio failed: {e}"))
        })?;
        let body = body_of(a);
        let candidates: Vec<&MessageResource> = messages
            .iter()
            .filter(|m| m.created_at().is_some_and(|t| t.as_millisecond() as f64 >= a.created_ms - RECONCILE_CLOCK_SLACK_MS))
            .filter(|m| m.body.as_deref() == Some(body.as_str()))
            .collect();
        let sids: Vec<String> = candidates.iter().map(|m| m.sid.clone()).collect();
        let known: Vec<String> =
            sqlx::query_scalar("SELECT provider_id FROM wardcall.notification_attempts WHERE provider = 'twilio' AND provider_id = ANY($1)")
                .bind(&sids)
                .fetch_all(&engine.pool)
                .await?;
        // The oldest unclaimed message since the intent is the one it created.
        let adopt = candidates.iter().rev().find(|m| !known.contains(&m.sid)).map(|m| (*m).clone());
        found.push((a.id, adopt));
    }
    Ok(found)
}

/// In the step's fenced transaction: adopts a reconciled message, or marks
/// the ambiguous intent `unknown`; returns the generation of the new intent
/// to record, or `None` when nothing is to be sent for this person.
async fn settle_latest(
    tx: &mut PgConnection,
    latest: Option<&SmsAttempt>,
    reconciled: &[(Uuid, Option<MessageResource>)],
    actor: &str,
) -> Result<Option<i32>, sqlx::Error> {
    let Some(a) = latest else { return Ok(Some(0)) };
    if !a.ambiguous() {
        // Sent (a SID is recorded), refused, or reported on: never again.
        return Ok(None);
    }
    match reconciled.iter().find(|(id, _)| *id == a.id).map(|(_, m)| m) {
        Some(Some(m)) => {
            let status = if message_status_rank(&m.status) > 0 { m.status.as_str() } else { "requested" };
            let adopted = sqlx::query(
                "UPDATE wardcall.notification_attempts SET provider_id = $2, status = $3, requested_at = coalesce(requested_at, clock_timestamp()),
                        updated_at = clock_timestamp()
                  WHERE id = $1 AND provider_id IS NULL AND status = 'intent'",
            )
            .bind(a.id)
            .bind(&m.sid)
            .bind(status)
            .execute(&mut *tx)
            .await?;
            if adopted.rows_affected() == 1 {
                audit::record(
                    tx,
                    Entity::NotificationAttempt,
                    &a.id.to_string(),
                    "attempt.reconciled",
                    Some("intent"),
                    Some(status),
                    actor,
                    json!({"message_sid": m.sid, "rule": "found in the provider's message list"}),
                )
                .await?;
                tracing::info!(attempt = %a.id, message_sid = %m.sid, "an ambiguous create-message had sent the message; adopted it instead of sending again");
            }
            Ok(None)
        }
        Some(None) => {
            let marked = sqlx::query(
                "UPDATE wardcall.notification_attempts SET status = 'unknown', updated_at = clock_timestamp(),
                        error = 'create-message outcome unknown and no such message at the provider'
                  WHERE id = $1 AND status = 'intent' AND provider_id IS NULL",
            )
            .bind(a.id)
            .execute(&mut *tx)
            .await?;
            if marked.rows_affected() == 0 {
                return Ok(None); // confirmed meanwhile: never send twice
            }
            audit::record(
                tx,
                Entity::NotificationAttempt,
                &a.id.to_string(),
                "attempt.outcome_unknown",
                Some("intent"),
                Some("unknown"),
                actor,
                json!({"rule": "re-send", "provider_has_message": false}),
            )
            .await?;
            Ok(Some(a.generation + 1))
        }
        // Not reconciled (it appeared after the look-up): leave it to the next execution.
        None => Ok(None),
    }
}

/// Records one intent; returns its id.
#[allow(clippy::too_many_arguments)]
async fn insert_intent(
    tx: &mut PgConnection,
    run: &ClaimedRun,
    alert_id: Option<Uuid>,
    pos: Position<'_>,
    person_id: &str,
    generation: i32,
    to: &str,
    actor: &str,
) -> Result<Uuid, sqlx::Error> {
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.notification_attempts
             (alert_id, run_id, step_key, cycle, step_index, person_id, generation, channel, destination, provider, status, fencing_token,
              reconcile_after)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'sms', $8, 'twilio', 'intent', $9, clock_timestamp() + $10 * interval '1 millisecond')
         RETURNING id",
    )
    .bind(alert_id)
    .bind(run.id)
    .bind(pos.step_key)
    .bind(pos.cycle)
    .bind(pos.step_index)
    .bind(person_id)
    .bind(generation)
    .bind(to)
    .bind(run.fencing_token)
    .bind(MESSAGE_RECONCILE_AFTER.as_millis() as i64)
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        tx,
        Entity::NotificationAttempt,
        &id.to_string(),
        "attempt.intent",
        None,
        Some("intent"),
        actor,
        json!({"person_id": person_id, "channel": "sms", "step_key": pos.step_key, "cycle": pos.cycle, "step_index": pos.step_index, "generation": generation}),
    )
    .await?;
    Ok(id)
}

/// Sends each message (committed intents) outside any transaction, in
/// parallel, then records every result before returning: a MessageSid is
/// never dropped. A refusal of that message (4xx: invalid number, opted out
/// with STOP, not a mobile) marks the attempt `failed`; a transient or
/// ambiguous failure leaves the intent for reconciliation and makes the step
/// retry.
async fn send_and_record(engine: &Services, outgoing: Vec<Outgoing>, actor: &str) -> Result<(), StepError> {
    if outgoing.is_empty() {
        return Ok(());
    }
    let twilio = engine.providers.twilio.as_ref().ok_or_else(|| StepError::Permanent(anyhow!("no Twilio provider configured")))?;
    let sends = outgoing.iter().map(|o| {
        let req = CreateMessageRequest {
            to: o.to.clone(),
            from: twilio.config.from.clone(),
            body: o.body.clone(),
            status_callback: crate::providers::twilio::callback_url(&engine.public_url, "sms-status", o.attempt_id),
        };
        async move { twilio.client.create_message(&req).await }
    });
    let results = futures_util::future::join_all(sends).await;
    let mut retry: Option<String> = None;
    for (o, result) in outgoing.iter().zip(results) {
        let started = std::time::Instant::now();
        let mut delay = std::time::Duration::from_millis(50);
        loop {
            match record_result(engine, o, &result, actor).await {
                Ok(Some(transient)) => {
                    retry = Some(transient);
                    break;
                }
                Ok(None) => break,
                Err(e) if started.elapsed().as_millis() as u64 <= RECORD_RETRY_BUDGET_MS => {
                    tracing::warn!(attempt = %o.attempt_id, error = %crate::capture::db_message(&e), "recording a create-message result failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(2));
                }
                Err(e) => {
                    retry.get_or_insert_with(|| format!("recording a message result failed: {}", crate::capture::db_message(&e)));
                    break;
                }
            }
        }
    }
    match retry {
        Some(why) => Err(StepError::Retryable(anyhow!("{why}"))),
        None => Ok(()),
    }
}

/// Records one create-message result (see [`send_and_record`]). `Some(reason)`:
/// the step must be retried.
async fn record_result(engine: &Services, o: &Outgoing, result: &Result<MessageResource, TwilioError>, actor: &str) -> Result<Option<String>, sqlx::Error> {
    let id_text = o.attempt_id.to_string();
    let mut tx = engine.pool.begin().await?;
    let previous: String =
        sqlx::query_scalar("SELECT status FROM wardcall.notification_attempts WHERE id = $1 FOR UPDATE").bind(o.attempt_id).fetch_one(&mut *tx).await?;
    let transient = match result {
        Ok(m) => {
            tracing::info!(attempt = %o.attempt_id, person = %o.person_id, to = %redact_phone(&o.to), message_sid = %m.sid, "text message sent");
            let status = if message_status_rank(&m.status) > 0 { m.status.as_str() } else { "requested" };
            sqlx::query(
                "UPDATE wardcall.notification_attempts
                    SET provider_id = coalesce(provider_id, $2), requested_at = coalesce(requested_at, clock_timestamp()),
                        status = CASE WHEN status IN ('intent','unknown') THEN $3 ELSE status END, updated_at = clock_timestamp()
                  WHERE id = $1",
            )
            .bind(o.attempt_id)
            .bind(&m.sid)
            .bind(status)
            .execute(&mut *tx)
            .await?;
            let action = if previous == "intent" { "attempt.requested" } else { "attempt.create_confirmed" };
            audit::record(&mut tx, Entity::NotificationAttempt, &id_text, action, Some(&previous), Some(status), actor, json!({"message_sid": m.sid})).await?;
            None
        }
        Err(e) if e.is_retryable() || matches!(e, TwilioError::Api { http_status: 401 | 403, .. } | TwilioError::Decode(_)) => {
            tracing::error!(attempt = %o.attempt_id, error = %e, "text message could not be sent or its outcome is unknown; retrying the step after reconciling with the provider");
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
            Some(format!("Twilio create-message failed: {e}"))
        }
        Err(e) => {
            tracing::error!(attempt = %o.attempt_id, error = %e, "Twilio refused this text message");
            let failed = sqlx::query(
                "UPDATE wardcall.notification_attempts SET status = 'failed', error = $2, ended_at = clock_timestamp(), updated_at = clock_timestamp()
                  WHERE id = $1 AND status = 'intent'",
            )
            .bind(o.attempt_id)
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
    Ok(transient)
}

/// Sends `message` as a one-way text to each recipient with an SMS number,
/// for the `notify` workflow step `step_key` of `run` (no reply instruction;
/// the body is made [`crate::providers::twilio::messages::textable`] and shortened to
/// [`MAX_BODY_CHARS`], keeping its start and "…", never refused for length).
///
/// Idempotent per (run, `step_key`, recipient id): the intents are committed
/// first under the run's fencing token; a retried or taken-over step never
/// re-sends a message whose SID is recorded (or that Twilio refused), and an
/// ambiguous create (no SID recorded) is reconciled with Twilio's message
/// list before it is sent again. Delivery is then tracked in the
/// notification log by the status callbacks (`wardcall.message_log`).
/// Recipients without an SMS number are skipped, logged and audited
/// (`notify.no_address` on the run).
///
/// Errors: [`StepError::LeaseLost`] when the run is no longer this
/// execution's; [`StepError::Retryable`] for a database error, a transient or
/// ambiguous Twilio failure, or a message list that cannot be read;
/// [`StepError::Permanent`] when no Twilio provider is configured.
pub async fn send_one_way(engine: &Services, run: &ClaimedRun, step_key: &str, recipients: &[Recipient], message: &str) -> Result<(), StepError> {
    if engine.providers.twilio.is_none() {
        return Err(StepError::Permanent(anyhow!("the notify step '{step_key}' sends SMS, but no Twilio provider is configured")));
    }
    let actor = engine.actor();
    let pos = Position { run: run.id, step_key, cycle: 0, step_index: 0 };
    let body = fit_body(message, "", MAX_BODY_CHARS);
    let existing = {
        let mut conn = engine.pool.acquire().await?;
        latest_sms_attempts(&mut conn, pos).await?
    };
    let reconciled = reconcile(engine, &existing, |_| body.clone()).await?;
    let mut tx = engine.pool.begin().await?;
    if !lock_fenced(&mut tx, run.id, run.fencing_token).await? {
        return Err(StepError::LeaseLost);
    }
    let existing = latest_sms_attempts(&mut tx, pos).await?;
    let mut outgoing = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in recipients {
        if !seen.insert(r.id.as_str()) {
            continue; // one message per recipient id
        }
        let Some(to) = r.address(Channel::Sms) else {
            tracing::warn!(run = %run.id, step = %step_key, recipient = %r.id, "recipient has no SMS number; skipped");
            audit::record(
                &mut tx,
                Entity::Run,
                &run.id.to_string(),
                "notify.no_address",
                None,
                None,
                &actor,
                json!({"step_key": step_key, "recipient": r.id, "channel": "sms"}),
            )
            .await?;
            continue;
        };
        let latest = existing.iter().find(|a| a.person_id == r.id);
        if let Some(generation) = settle_latest(&mut tx, latest, &reconciled, &actor).await? {
            let attempt_id = insert_intent(&mut tx, run, None, pos, &r.id, generation, to, &actor).await?;
            outgoing.push(Outgoing { attempt_id, person_id: r.id.clone(), to: to.to_string(), body: body.clone() });
        }
    }
    tx.commit().await?;
    send_and_record(engine, outgoing, &actor).await
}

/// The SMS number of an escalation recipient: the config person's `phone`
/// (config people have one number for both channels), else the number the
/// call went to. The tier's recorded recipients (`tier`) come first: a
/// recipient from the team's tables is texted at their `sms` number.
fn fallback_address(engine: &Services, tier: &[crate::notify::Recipient], person_id: &str, called: &str) -> String {
    if let Some(sms) = tier.iter().find(|r| r.id == person_id).and_then(|r| r.sms.clone()) {
        return sms;
    }
    engine.config.person(person_id).map(|p| p.phone.clone()).unwrap_or_else(|| called.to_string())
}

/// A call attempt at the position, as the fallback needs it.
#[derive(sqlx::FromRow)]
struct CallAttempt {
    person_id: String,
    status: String,
    answered_by: Option<String>,
    destination: String,
    acknowledged: bool,
    declined: bool,
}

impl CallAttempt {
    /// The call failed to reach a human: busy, no answer, failed, voicemail,
    /// or ended without a key. Not a decline (2), not our own hang-up.
    fn failed(&self) -> bool {
        !self.acknowledged
            && !self.declined
            && (matches!(self.status.as_str(), "busy" | "no-answer" | "failed" | "completed") || is_machine(self.answered_by.as_deref()))
    }
}

/// Each person's latest call attempt at the escalation position `pos`.
async fn call_attempts(conn: &mut PgConnection, pos: Position<'_>) -> Result<Vec<CallAttempt>, sqlx::Error> {
    sqlx::query_as(
        "SELECT DISTINCT ON (person_id) person_id, status, answered_by, destination,
                acknowledged_at IS NOT NULL AS acknowledged, declined_at IS NOT NULL AS declined
           FROM wardcall.notification_attempts
          WHERE run_id = $1 AND step_key = '' AND cycle = $2 AND step_index = $3 AND channel = 'voice'
          ORDER BY person_id, generation DESC",
    )
    .bind(pos.run)
    .bind(pos.cycle)
    .bind(pos.step_index)
    .fetch_all(conn)
    .await
}

/// The escalation's SMS fallback (`sms_fallback = true` on a policy step):
/// for every person at the run's position (`cycle`, `step_index`) whose
/// latest call failed (busy, no answer, failed, voicemail, or ended without a
/// key) and who has not been texted at this position, sends the alert's
/// message with the reply instruction ([`REPLY_INSTRUCTION`], acknowledged by
/// [`crate::notify::acknowledgement::apply_reply`]), at most once per person
/// and position. Nothing is sent once the alert is no longer open (checked
/// under the alert's row lock in the fenced transaction that commits the
/// intents). Called by the escalation each time it evaluates its position.
///
/// Errors: as [`send_one_way`].
pub async fn send_fallbacks(
    engine: &Services,
    run: &ClaimedRun,
    alert_id: Uuid,
    cycle: i32,
    step_index: i32,
    tier: &[crate::notify::Recipient],
) -> Result<(), StepError> {
    let actor = engine.actor();
    let pos = Position { run: run.id, step_key: "", cycle, step_index };
    let (calls, existing) = {
        let mut conn = engine.pool.acquire().await?;
        let calls = call_attempts(&mut conn, pos).await?;
        if !calls.iter().any(CallAttempt::failed) {
            return Ok(());
        }
        (calls, latest_sms_attempts(&mut conn, pos).await?)
    };
    let failed: Vec<&CallAttempt> = calls.iter().filter(|c| c.failed()).collect();
    let pending = |c: &&CallAttempt| existing.iter().find(|a| a.person_id == c.person_id).map_or(true, SmsAttempt::ambiguous);
    if !failed.iter().any(pending) {
        return Ok(());
    }
    let message: String = sqlx::query_scalar("SELECT message FROM wardcall.alerts WHERE id = $1").bind(alert_id).fetch_one(&engine.pool).await?;
    let body = fit_body(&message, REPLY_INSTRUCTION, MAX_BODY_CHARS);
    let reconciled = reconcile(engine, &existing, |_| body.clone()).await?;
    let mut tx = engine.pool.begin().await?;
    if !lock_fenced(&mut tx, run.id, run.fencing_token).await? {
        return Err(StepError::LeaseLost);
    }
    let alert_status: String = sqlx::query_scalar("SELECT status FROM wardcall.alerts WHERE id = $1 FOR UPDATE").bind(alert_id).fetch_one(&mut *tx).await?;
    if alert_status != "open" {
        tx.commit().await?;
        return Ok(()); // acknowledged on some channel: no further messages
    }
    let calls = call_attempts(&mut tx, pos).await?;
    let existing = latest_sms_attempts(&mut tx, pos).await?;
    let mut outgoing = Vec::new();
    for c in calls.iter().filter(|c| c.failed()) {
        let latest = existing.iter().find(|a| a.person_id == c.person_id);
        if let Some(generation) = settle_latest(&mut tx, latest, &reconciled, &actor).await? {
            let to = fallback_address(engine, tier, &c.person_id, &c.destination);
            let attempt_id = insert_intent(&mut tx, run, Some(alert_id), pos, &c.person_id, generation, &to, &actor).await?;
            tracing::info!(attempt = %attempt_id, person = %c.person_id, call_status = %c.status, "call failed; sending the SMS fallback");
            outgoing.push(Outgoing { attempt_id, person_id: c.person_id.clone(), to, body: body.clone() });
        }
    }
    tx.commit().await?;
    send_and_record(engine, outgoing, &actor).await
}

/// Whether a person's call at the position failed and they have not been
/// texted there yet (the fallback is due; [`send_fallbacks`] sends it).
pub async fn fallback_due(conn: &mut PgConnection, run: Uuid, cycle: i32, step_index: i32) -> Result<bool, sqlx::Error> {
    let pos = Position { run, step_key: "", cycle, step_index };
    let calls = call_attempts(&mut *conn, pos).await?;
    if !calls.iter().any(CallAttempt::failed) {
        return Ok(false);
    }
    let texted = latest_sms_attempts(&mut *conn, pos).await?;
    Ok(calls.iter().any(|c| c.failed() && !texted.iter().any(|t| t.person_id == c.person_id)))
}

/// Whether a text message at the position can still be answered: sent (or
/// being sent) and not failed, undelivered or acknowledged. While one can, a
/// step whose calls all failed waits out its acknowledgement timeout instead
/// of escalating at once.
pub async fn fallback_pending(conn: &mut PgConnection, run: Uuid, cycle: i32, step_index: i32) -> Result<bool, sqlx::Error> {
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT ON (person_id) status FROM wardcall.notification_attempts
          WHERE run_id = $1 AND step_key = '' AND cycle = $2 AND step_index = $3 AND channel = 'sms' AND acknowledged_at IS NULL
          ORDER BY person_id, generation DESC",
    )
    .bind(run)
    .bind(cycle)
    .bind(step_index)
    .fetch_all(conn)
    .await?;
    Ok(statuses.iter().any(|s| !FAILED_MESSAGE_STATUSES.contains(&s.as_str())))
}

/// For the call sweeper: text messages sent within the last day whose final
/// status has not arrived [`MESSAGE_RECONCILE_AFTER`] after their intent are
/// fetched from Twilio ("Fetch a Message") and their status applied as a
/// callback's would be (monotonic), at most 20 per sweep, each again after
/// the same interval. Returns how many were fetched. Provider errors are
/// logged and retried at the next interval.
///
/// Errors: a database error.
pub async fn reconcile_messages(engine: &Services) -> Result<usize, sqlx::Error> {
    let Some(twilio) = engine.providers.twilio.as_ref() else { return Ok(0) };
    let actor = format!("reconciler:{}", engine.engine_id);
    let due: Vec<(Uuid, String)> = sqlx::query_as(
        "WITH due AS (
             SELECT id FROM wardcall.notification_attempts
              WHERE channel = 'sms' AND provider_id IS NOT NULL
                AND status IN ('requested','accepted','scheduled','queued','sending','sent')
                AND reconcile_after <= clock_timestamp() AND created_at > clock_timestamp() - interval '1 day'
              ORDER BY reconcile_after LIMIT 20 FOR UPDATE SKIP LOCKED)
         UPDATE wardcall.notification_attempts n SET reconcile_after = clock_timestamp() + $1 * interval '1 millisecond'
           FROM due WHERE n.id = due.id RETURNING n.id, n.provider_id",
    )
    .bind(MESSAGE_RECONCILE_AFTER.as_millis() as i64)
    .fetch_all(&engine.pool)
    .await?;
    for (id, sid) in &due {
        match twilio.client.fetch_message(sid).await {
            Ok(m) => {
                let delivery = crate::notify::acknowledgement::Delivery { provider: "twilio", idempotency_token: None };
                let code = m.error_code.map(|c| c.to_string());
                match crate::notify::acknowledgement::apply_message_status(engine, delivery, *id, Some(sid), &m.status, code.as_deref(), &actor).await {
                    Ok(()) => {}
                    Err(crate::notify::acknowledgement::CallEventError::Db(e)) => return Err(e),
                    Err(e) => tracing::warn!(attempt = %id, error = %e, "reconciling a text message failed"),
                }
            }
            Err(e) => tracing::warn!(attempt = %id, message_sid = %sid, error = %e, "fetching a text message to reconcile it failed; will try again"),
        }
    }
    Ok(due.len())
}
