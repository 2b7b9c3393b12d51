//! The SMS channel: one-way messages of a
//! workflow step ([`send_one_way`]) and the escalation's SMS fallback after a
//! failed call ([`send_fallbacks`]).
//!
//! Messages go through the SMS channel's [`ChannelSender`] and
//! [`crate::notify::delivery`], like calls: the intent row (channel `sms`,
//! the run's fencing token) is committed under the run's lease before the
//! send; the send runs outside any transaction; its id (or the refusal) is
//! recorded after. An intent found unconfirmed by a later execution is
//! reconciled with the provider's list (same number, created since the
//! intent, the same body, an id no attempt holds): adopted if found, sent
//! again (a new generation) if not. A message whose id is recorded is never
//! sent again. Delivery is then recorded by the status callbacks
//! ([`crate::notify::acknowledgement::apply_message_status`]).
//!
//! Logging: attempt ids, SIDs and statuses only; numbers through
//! [`redact_phone`]; never a body.

use super::channel::{ChannelSender, Content, Outgoing};
use super::delivery::{self, NotLookedUp};
use crate::config::redact_phone;
use crate::notify::acknowledgement::{is_machine, FAILED_MESSAGE_STATUSES};
use crate::notify::{Channel, Recipient};
use crate::runtime::step::WorkerSlot;
use crate::runtime::Services;
use crate::store::alerts;
use crate::store::attempts::{self, AttemptRow, NewIntent, Position};
use crate::store::audit::{self, Entity};
use crate::store::runs::{lock_fenced, ClaimedRun};
use crate::workflows::StepError;
use anyhow::anyhow;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

/// The instruction appended to every acknowledgeable text message. A reply
/// of exactly `1` (trimmed) acknowledges; Twilio's reserved keywords
/// (`crate::providers::twilio::messages::RESERVED_KEYWORDS`, told by the provider's webhook) are never commands.
pub const REPLY_INSTRUCTION: &str = "Reply 1 to acknowledge.";

/// Text fit for a message body: NUL and every other control character (C0,
/// DEL, C1) removed, except line feeds; tabs and carriage returns become a
/// space. Letters, digits and punctuation of any script pass unchanged.
pub fn textable(text: &str) -> String {
    text.chars()
        .filter_map(|c| match c {
            '\n' => Some('\n'),
            '\t' | '\r' => Some(' '),
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect()
}

/// The body of an acknowledgeable alert message: `message` made
/// [`textable`], a line break and `instruction` (e.g. [`REPLY_INSTRUCTION`]),
/// never longer than `max_chars` characters (Unicode scalar values;
/// the channel's limit, [`ChannelSender::max_text_chars`]). A message too long keeps as much of its
/// start as fits, then "…", so the instruction always survives (invariant 10:
/// a message is never refused for its length). With an empty `instruction`
/// the body is the message alone, shortened the same way.
pub fn fit_body(message: &str, instruction: &str, max_chars: usize) -> String {
    let message = textable(message);
    let message = message.trim();
    let instruction = textable(instruction);
    let instruction = instruction.trim();
    let tail: String = if instruction.is_empty() { String::new() } else { format!("\n{instruction}") };
    let tail_len = tail.chars().count();
    let message_len = message.chars().count();
    if message_len + tail_len <= max_chars {
        return format!("{message}{tail}");
    }
    if tail_len + 1 > max_chars {
        // Not even "…" and the instruction fit: the instruction's start.
        return instruction.chars().take(max_chars).collect();
    }
    let keep = max_chars - tail_len - 1;
    let head: String = message.chars().take(keep).collect();
    format!("{}…{tail}", head.trim_end())
}

/// How long after its intent a text message without a final status is
/// fetched from the provider (and how often after that, for a day).
pub const MESSAGE_RECONCILE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// The SMS channel's sender, or a permanent step error naming `what`.
fn sms_sender<'a>(services: &'a Services, what: &str) -> Result<&'a dyn ChannelSender, StepError> {
    services.providers.sender(Channel::Sms).ok_or_else(|| StepError::Permanent(anyhow!("{what} sends SMS, but no SMS provider is configured")))
}

/// The intent of a text to `to` at `pos` (`person_name`: the recipient's
/// display name, kept on the attempt for write-backs, never logged).
#[allow(clippy::too_many_arguments)]
fn sms_intent<'a>(
    run: &ClaimedRun,
    alert_id: Option<Uuid>,
    pos: Position<'a>,
    person_id: &'a str,
    person_name: Option<&'a str>,
    generation: i32,
    to: &'a str,
    provider: &'a str,
) -> NewIntent<'a> {
    NewIntent {
        alert_id,
        pos,
        person_id,
        person_name,
        generation,
        channel: Channel::Sms.as_str(),
        destination: to,
        provider,
        fencing_token: run.fencing_token,
        reconcile_after_ms: MESSAGE_RECONCILE_AFTER.as_millis() as i64,
    }
}

/// Sends `message` as a one-way text to each recipient with an SMS number,
/// for the `notify` workflow step `step_key` of `run` (no reply instruction;
/// the body is made [`textable`] and shortened to the channel's limit
/// ([`ChannelSender::max_text_chars`]), keeping its start and "…", never
/// refused for length).
///
/// Idempotent per (run, `step_key`, recipient id): the intents are committed
/// first under the run's fencing token; a retried or taken-over step never
/// re-sends a message whose id is recorded (or that the provider refused),
/// and an ambiguous send (no id recorded) is reconciled with the provider's
/// message list before it is sent again. Delivery is then tracked in the
/// notification log by the status callbacks (`wardcall.message_log`).
/// Recipients without an SMS number are skipped, logged and audited
/// (`notify.no_address` on the run).
///
/// Errors: [`StepError::LeaseLost`] when the run is no longer this
/// execution's; [`StepError::Retryable`] for a database error, a transient or
/// ambiguous provider failure, or a message list that cannot be read;
/// [`StepError::Permanent`] when no SMS provider is configured.
pub async fn send_one_way(
    services: &Services,
    run: &ClaimedRun,
    slot: &WorkerSlot,
    step_key: &str,
    recipients: &[Recipient],
    message: &str,
) -> Result<(), StepError> {
    let sender = sms_sender(services, &format!("the notify step '{step_key}'"))?;
    let actor = services.actor();
    let critical = services.config.workflows.iter().any(|w| w.name == run.workflow && crate::workflows::is_critical(w));
    let pos = Position { run: run.id, step_key, cycle: 0, step_index: 0 };
    let body = fit_body(message, "", sender.max_text_chars());
    // Each database part bounded by `engine.database_deadline_ms`
    // ([`Services::bounded`]); the provider requests have their own timeouts.
    let existing = services
        .bounded(async {
            let mut conn = services.pool.acquire().await?;
            attempts::latest_per_person(&mut conn, pos, Channel::Sms.as_str()).await
        })
        .await?;
    let reconciled = delivery::reconcile(services, sender, &existing, run.fencing_token, Some(&body), delivery::Unverified::Retry).await?;
    let mut conn = services.pool.acquire().await?;
    let outgoing = services
        .bounded(async {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            if !lock_fenced(&mut tx, run.id, run.fencing_token).await? {
                return Err(StepError::LeaseLost);
            }
            let existing = attempts::latest_per_person(&mut tx, pos, Channel::Sms.as_str()).await?;
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
                if let Some(generation) = delivery::settle(&mut tx, latest, &reconciled, run.fencing_token, NotLookedUp::Wait, &actor).await? {
                    let attempt_id =
                        attempts::insert_intent(&mut tx, &sms_intent(run, None, pos, &r.id, Some(&r.name), generation, to, sender.provider()), &actor).await?;
                    outgoing.push(Outgoing {
                        attempt_id,
                        person_id: r.id.clone(),
                        to: to.to_string(),
                        content: Content::Text { body: body.clone() },
                        critical,
                    });
                }
            }
            tx.commit().await?;
            Ok(outgoing)
        })
        .await?;
    drop(conn); // given back before any provider request
    delivery::send_and_record(services, sender, &outgoing, None, &actor, slot, None).await.map(|_| ())
}

/// The SMS number of an escalation recipient: the config person's `phone`
/// (config people have one number for both channels), else the number the
/// call went to. The tier's recorded recipients (`tier`) come first: a
/// recipient from the team's tables is texted at their `sms` number.
fn fallback_address(services: &Services, tier: &[crate::notify::Recipient], person_id: &str, called: &str) -> String {
    if let Some(sms) = tier.iter().find(|r| r.id == person_id).and_then(|r| r.sms.clone()) {
        return sms;
    }
    services.config.person(person_id).map(|p| p.phone.clone()).unwrap_or_else(|| called.to_string())
}

/// The display name of an escalation recipient (the tier's recorded
/// recipient, else the config person), kept on the text's attempt as on the
/// call's: write-backs get it as `person_name` (README, write-back details).
fn fallback_name(services: &Services, tier: &[crate::notify::Recipient], person_id: &str) -> Option<String> {
    tier.iter().find(|r| r.id == person_id).map(|r| r.name.clone()).or_else(|| services.config.person(person_id).map(|p| p.name.clone()))
}

/// The call failed to reach a human: busy, no answer, failed, voicemail,
/// or ended without a key. Not a decline (2), not our own hang-up.
fn call_failed(c: &AttemptRow) -> bool {
    !c.acknowledged && !c.declined && (matches!(c.status.as_str(), "busy" | "no-answer" | "failed" | "completed") || is_machine(c.answered_by.as_deref()))
}

/// An SMS intent that may or may not have been sent (any fencing token: the
/// fallback is decided per person, see [`send_fallbacks`]).
fn unconfirmed(a: &AttemptRow) -> bool {
    a.status == "intent" && a.provider_id.is_none()
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
/// `rendered`: the message as the step rendered it, texted (and written to
/// the alert) when the alert has none yet (opened by its dispatch, and the
/// step's write of it failed).
///
/// Errors: as [`send_one_way`].
#[allow(clippy::too_many_arguments)]
pub async fn send_fallbacks(
    services: &Services,
    run: &ClaimedRun,
    slot: &WorkerSlot,
    alert_id: Uuid,
    cycle: i32,
    step_index: i32,
    tier: &[crate::notify::Recipient],
    rendered: &str,
) -> Result<(), StepError> {
    let sender = sms_sender(services, "the escalation's SMS fallback")?;
    let actor = services.actor();
    let pos = Position { run: run.id, step_key: "", cycle, step_index };
    // Each database part bounded by `engine.database_deadline_ms`
    // ([`Services::bounded`]); the provider requests have their own timeouts.
    let read = services
        .bounded(async {
            let mut conn = services.pool.acquire().await?;
            let calls = attempts::latest_per_person(&mut conn, pos, Channel::Voice.as_str()).await?;
            if !calls.iter().any(call_failed) {
                return Ok::<_, sqlx::Error>(None);
            }
            let existing = attempts::latest_per_person(&mut conn, pos, Channel::Sms.as_str()).await?;
            Ok(Some((calls, existing)))
        })
        .await?;
    let Some((calls, existing)) = read else { return Ok(()) };
    let pending = |c: &&AttemptRow| existing.iter().find(|a| a.person_id == c.person_id).map_or(true, unconfirmed);
    if !calls.iter().filter(|c| call_failed(c)).any(|c| pending(&c)) {
        return Ok(());
    }
    let mut message = services.bounded(alerts::message(&services.pool, alert_id)).await?;
    if message.is_empty() && !rendered.is_empty() {
        if let Err(e) = services.bounded(alerts::write_message(&services.pool, alert_id, rendered)).await {
            tracing::warn!(alert = %alert_id, error = %crate::capture::db_message(&e), "writing the alert's message failed; the text carries the step's rendering");
        }
        message = rendered.to_string();
    }
    let body = fit_body(&message, REPLY_INSTRUCTION, sender.max_text_chars());
    // A critical alert's fallback follows the re-call rule (better a second
    // text than none): a message list that stays unreadable must not hold the
    // escalation's evaluation, and with it the next tier's calls, for ever.
    let reconciled = delivery::reconcile(services, sender, &existing, run.fencing_token, Some(&body), delivery::Unverified::ResendAfter30s).await?;
    let mut conn = services.pool.acquire().await?;
    let outgoing = services.bounded(async {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        if !lock_fenced(&mut tx, run.id, run.fencing_token).await? {
            return Err(StepError::LeaseLost);
        }
        if alerts::lock_status(&mut tx, alert_id).await? != "open" {
            tx.commit().await?;
            return Ok(Vec::new()); // acknowledged on some channel: no further messages
        }
        let calls = attempts::latest_per_person(&mut tx, pos, Channel::Voice.as_str()).await?;
        let existing = attempts::latest_per_person(&mut tx, pos, Channel::Sms.as_str()).await?;
        let mut outgoing = Vec::new();
        for c in calls.iter().filter(|c| call_failed(c)) {
            let latest = existing.iter().find(|a| a.person_id == c.person_id);
            if let Some(generation) = delivery::settle(&mut tx, latest, &reconciled, run.fencing_token, NotLookedUp::Wait, &actor).await? {
                let to = fallback_address(services, tier, &c.person_id, &c.destination);
                let name = fallback_name(services, tier, &c.person_id);
                let intent = sms_intent(run, Some(alert_id), pos, &c.person_id, name.as_deref(), generation, &to, sender.provider());
                let attempt_id = attempts::insert_intent(&mut tx, &intent, &actor).await?;
                tracing::info!(attempt = %attempt_id, person = %c.person_id, call_status = %c.status, to = %redact_phone(&to), "call failed; sending the SMS fallback");
                // An escalation's fallback: always critical (`workflows::is_critical`).
                outgoing.push(Outgoing { attempt_id, person_id: c.person_id.clone(), to, content: Content::Text { body: body.clone() }, critical: true });
            }
        }
        tx.commit().await?;
        Ok(outgoing)
    }).await?;
    drop(conn); // given back before any provider request
    delivery::send_and_record(services, sender, &outgoing, None, &actor, slot, None).await.map(|_| ())
}

/// Whether a person's call at the escalation position `pos` failed and they
/// have not been texted there yet (the fallback is due; [`send_fallbacks`]
/// sends it). `calls`: each person's latest call attempt at `pos`, as the
/// caller read them in its transaction.
pub async fn fallback_due(conn: &mut PgConnection, pos: Position<'_>, calls: &[AttemptRow]) -> Result<bool, sqlx::Error> {
    if !calls.iter().any(call_failed) {
        return Ok(false);
    }
    let texted = attempts::latest_per_person(&mut *conn, pos, Channel::Sms.as_str()).await?;
    Ok(calls.iter().any(|c| call_failed(c) && !texted.iter().any(|t| t.person_id == c.person_id)))
}

/// Whether a text message at the position can still be answered: sent (or
/// being sent) and not failed, undelivered or acknowledged. While one can, a
/// step whose calls all failed waits out its acknowledgement timeout instead
/// of escalating at once.
pub async fn fallback_pending(conn: &mut PgConnection, run: Uuid, cycle: i32, step_index: i32) -> Result<bool, sqlx::Error> {
    let statuses = attempts::unacknowledged_text_statuses(conn, Position { run, step_key: "", cycle, step_index }).await?;
    Ok(statuses.iter().any(|s| !FAILED_MESSAGE_STATUSES.contains(&s.as_str())))
}

/// For the call sweeper: text messages sent within the last day whose final
/// status has not arrived [`MESSAGE_RECONCILE_AFTER`] after their intent are
/// fetched from the provider and their status applied as a callback's would
/// be (monotonic), at most 20 per sweep, each again after the same interval.
/// Returns how many were fetched. Provider errors are logged and retried at
/// the next interval.
///
/// Errors: a database error.
pub async fn reconcile_messages(services: &Services) -> Result<usize, sqlx::Error> {
    let Some(sender) = services.providers.sender(Channel::Sms) else { return Ok(0) };
    let actor = format!("reconciler:{}", services.engine_id);
    // Each database part bounded by `engine.database_deadline_ms`
    // ([`Services::bounded`]); the provider's fetch has its own timeout.
    let due = services.bounded(attempts::claim_texts_to_reconcile(&services.pool, 20, MESSAGE_RECONCILE_AFTER.as_millis() as i64)).await?;
    for (id, provider_id) in &due {
        match sender.fetch(provider_id).await {
            Ok(m) => {
                let delivery = crate::notify::acknowledgement::Delivery { provider: sender.provider(), idempotency_token: None, webhook: false };
                let applied = crate::notify::acknowledgement::apply_message_status(
                    services,
                    delivery,
                    *id,
                    Some(provider_id),
                    &m.status,
                    m.error_code.as_deref(),
                    &actor,
                );
                match services.bounded(applied).await {
                    Ok(()) => {}
                    Err(crate::notify::acknowledgement::CallEventError::Db(e)) => return Err(e),
                    Err(e) => tracing::warn!(attempt = %id, error = %e, "reconciling a text message failed"),
                }
            }
            Err(e) => tracing::warn!(attempt = %id, provider_id = %provider_id, error = %e, "fetching a text message to reconcile it failed; will try again"),
        }
    }
    Ok(due.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Twilio's limit (`crate::providers::twilio::messages::MAX_BODY_CHARS`).
    const MAX_BODY_CHARS: usize = 1600;

    #[test]
    fn short_bodies_pass_whole_with_the_instruction() {
        assert_eq!(fit_body("Room 2: seizure.", REPLY_INSTRUCTION, MAX_BODY_CHARS), "Room 2: seizure.\nReply 1 to acknowledge.");
        assert_eq!(fit_body("a\u{0}b\u{7}c\td\r\ne", "", 100), "abc d \ne");
    }

    #[test]
    fn long_bodies_keep_start_ellipsis_and_instruction() {
        let long = "é".repeat(5000);
        let body = fit_body(&long, REPLY_INSTRUCTION, MAX_BODY_CHARS);
        assert_eq!(body.chars().count(), MAX_BODY_CHARS);
        assert!(body.starts_with("éé"));
        assert!(body.ends_with("…\nReply 1 to acknowledge."));
        assert_eq!(fit_body("abcdef", "xyz", 3), "xyz");
        assert_eq!(fit_body("abcdef", "xy", 6), "ab…\nxy");
    }
}
