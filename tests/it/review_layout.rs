//! Review of the layout refactor (555941d..bb78958): behaviour the moves
//! changed that DESIGN.md's invariants forbid. Each test failed on the
//! refactored code before its fix.

use crate::escalation::{start_on, start_with, Hospital, NURSE_A, SEIZURE_INSERT};
use crate::harness::*;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wardcall::devtools::twilio_emulator::Persona;
use wardcall::notify::channel::{ChannelSender, Content, Outgoing, ProviderRecord, SendOutcome, Sent};
use wardcall::notify::{Channel, Recipient};
use wardcall::providers::twilio::signature::compute_signature;
use wardcall::providers::twilio::twiml;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        review_layout::keypress_receipts_of_the_previous_version_replay_as_before,
        review_layout::late_create_answer_on_an_unknown_attempt_is_audited_as_a_transition,
        review_layout::ambiguous_text_is_not_sent_again_unverified,
        review_layout::sms_fallback_attempt_keeps_the_person_name,
        review_layout::ambiguous_text_is_adopted_beside_another_alerts_text,
        review_layout::sms_fallback_is_not_held_by_an_unreadable_message_list,
    ]
}

/// A sender that answers from the test: `send` succeeds with a fixed id (or
/// is counted only), `sent_to` fails (the provider's list cannot be read).
struct FakeSender {
    channel: Channel,
    provider_id: String,
    sends: AtomicUsize,
}

impl ChannelSender for FakeSender {
    fn channel(&self) -> Channel {
        self.channel
    }
    fn provider(&self) -> &'static str {
        "twilio"
    }
    fn send<'a>(&'a self, _out: &'a Outgoing, _public_url: &'a str) -> BoxFuture<'a, SendOutcome> {
        self.sends.fetch_add(1, Ordering::SeqCst);
        let result = Ok(Sent { provider_id: self.provider_id.clone(), status: None });
        async move { SendOutcome { result, content_refused: None } }.boxed()
    }
    fn sent_to<'a>(&'a self, _to: &'a str, _limit: u32) -> BoxFuture<'a, Result<Vec<ProviderRecord>, String>> {
        async move { Err("HTTP 503 from the provider's list".to_string()) }.boxed()
    }
    fn fetch<'a>(&'a self, _provider_id: &'a str) -> BoxFuture<'a, Result<ProviderRecord, String>> {
        async move { Err("not in this test".to_string()) }.boxed()
    }
    fn max_text_chars(&self) -> usize {
        1600
    }
    fn end<'a>(&'a self, _provider_id: &'a str) -> BoxFuture<'a, Result<(), String>> {
        async move { Err("not in this test".to_string()) }.boxed()
    }
}

async fn hospital_a_silent() -> Hospital {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    start_on(db, Persona::SilentHuman { ring_ms: 50 }, Persona::NoAnswer, 30.0, 1).await
}

/// Posts a signed gather webhook with an idempotency token; returns the status and body.
async fn gather(h: &Hospital, attempt: uuid::Uuid, sid: &str, digits: &str, idem: &str) -> (u16, String) {
    let url = format!("http://{}/webhooks/twilio/gather?attempt={attempt}", h.app.http_addr.unwrap());
    let owned: Vec<(String, String)> =
        [("CallSid", sid), ("AccountSid", ACCOUNT_SID), ("Digits", digits)].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let r = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("X-Twilio-Signature", compute_signature(AUTH_TOKEN, &url, &owned))
        .header("I-Twilio-Idempotency-Token", idem)
        .body(serde_urlencoded::to_string(&owned).unwrap())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Receipts written by the previous version kept the TwiML it answered (or
/// `replay:message` for a reply that read the alert again). Twilio retries a
/// keypress webhook whose answer was lost; if that retry reaches the upgraded
/// engine, it must answer as the first delivery did: a nurse whose 1 was
/// recorded hears that the alert is acknowledged, and a nurse who asked to
/// hear the alert again hears it, instead of being hung up on with "Goodbye".
pub async fn keypress_receipts_of_the_previous_version_replay_as_before() {
    let h = hospital_a_silent().await;
    h.db.exec(SEIZURE_INSERT).await;
    await_true(&h.db, "the nurse to answer", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE status = 'in-progress'")
        .await;
    let (attempt, sid): (uuid::Uuid, String) =
        sqlx::query_as("SELECT id, provider_id FROM wardcall.notification_attempts WHERE status = 'in-progress'").fetch_one(&h.db.pool).await.unwrap();
    // What the previous version stored for a 1 that acknowledged, and for a 3.
    let acknowledged = twiml::say_and_hangup("Thank you. The alert is acknowledged. Goodbye.");
    for (token, response) in [("old-ack", acknowledged.as_str()), ("old-read", "replay:message")] {
        sqlx::query("INSERT INTO wardcall.webhook_receipts (provider, idempotency_token, attempt_id, response) VALUES ('twilio', $1, $2, $3)")
            .bind(token)
            .bind(attempt)
            .bind(response)
            .execute(&h.db.pool)
            .await
            .unwrap();
    }
    let (status, body) = gather(&h, attempt, &sid, "1", "old-ack").await;
    assert_eq!(status, 200);
    assert!(body.contains("The alert is acknowledged"), "the replay answers as the first delivery did: {body}");
    let (status, body) = gather(&h, attempt, &sid, "3", "old-read").await;
    assert_eq!(status, 200);
    assert!(body.contains("<Gather") && body.contains("Room 2"), "the replay reads the alert again: {body}");
    // A replay changes nothing (the call itself goes on meanwhile).
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.notification_attempts WHERE digits IS NOT NULL").await, 0, "no key recorded");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE actor LIKE 'person:%'").await, 0, "nothing audited by the nurse");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.alerts WHERE status = 'open'").await, 1);
    h.stop().await;
}

/// A create-call answer that arrives late (from an engine that lost the run)
/// for an attempt the re-call rule already marked `unknown` moves it on (it
/// holds a live call now); that change must be in the audit log as a
/// transition from `unknown` (invariant 6), so the attempt's audited states
/// chain to its current status.
pub async fn late_create_answer_on_an_unknown_attempt_is_audited_as_a_transition() {
    let h = hospital_a_silent().await;
    h.db.exec(SEIZURE_INSERT).await;
    await_true(&h.db, "the first call", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE status = 'in-progress'").await;
    // The state the re-call rule leaves: an earlier generation of the
    // person's attempt, marked unknown (audited so), never confirmed. (No
    // alert_id: the foreign-key locks of alert then run would deadlock with
    // the engine's run-then-alert evaluation of the live call.)
    let unknown: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.notification_attempts (run_id, cycle, step_index, person_id, generation, channel, destination, provider, status, fencing_token)
         SELECT run_id, 5, 0, person_id, 0, 'voice', destination, 'twilio', 'unknown', 0 FROM wardcall.notification_attempts RETURNING id",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
         VALUES ('notification_attempt', $1, 'attempt.outcome_unknown', 'intent', 'unknown', 'engine:test', '{}')",
    )
    .bind(unknown.to_string())
    .execute(&h.db.pool)
    .await
    .unwrap();
    let late = FakeSender { channel: Channel::Voice, provider_id: "CA0123456789abcdef0123456789abcdef".into(), sends: AtomicUsize::new(0) };
    let out = Outgoing {
        attempt_id: unknown,
        person_id: "nurse-avery".into(),
        to: NURSE_A.into(),
        content: Content::Spoken { message: "m".into(), ring_timeout_seconds: 18 },
        critical: true,
    };
    let services = h.app.engine.services.clone();
    wardcall::notify::delivery::send_and_record(&services, &late, &[out], None, "engine:lost", &wardcall::runtime::step::WorkerSlot::none(), None)
        .await
        .expect("recorded");
    let status: String =
        sqlx::query_scalar("SELECT status FROM wardcall.notification_attempts WHERE id = $1").bind(unknown).fetch_one(&h.db.pool).await.unwrap();
    let last_audited: Option<String> =
        sqlx::query_scalar("SELECT to_state FROM wardcall.audit_log WHERE entity_id = $1 AND to_state IS NOT NULL ORDER BY id DESC LIMIT 1")
            .bind(unknown.to_string())
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(last_audited.as_deref(), Some(status.as_str()), "the attempt's last audited state is its status");
    assert_eq!(
        h.db.scalar_i64(&format!("SELECT count(*) FROM wardcall.audit_log WHERE entity_id = '{unknown}' AND from_state = 'unknown' AND to_state = '{status}'"))
            .await,
        1,
        "unknown → {status} is audited once"
    );
    h.stop().await;
}

/// A text whose send is ambiguous is reconciled with the provider's message
/// list before it is sent again (ARCHITECTURE.md, invariant 2: "an
/// unconfirmed intent is reconciled with Twilio's message list before it is
/// sent again"); the voice channel's written exception (call again
/// unverified after 30 s) is not the text channel's rule. While the list
/// cannot be read, the step retries and sends nothing.
pub async fn ambiguous_text_is_not_sent_again_unverified() {
    let h = hospital_a_silent().await;
    // A notify step's run, held by this execution (fencing token 2), with an
    // intent of an earlier execution (token 1) recorded a minute ago.
    let run: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, lease_owner, fencing_token, due_at)
         VALUES ('critical-alert-call', 'test', '{}', 'notify', 'running', 'engine:test', 2, clock_timestamp() + interval '1 hour') RETURNING id",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    let intent: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.notification_attempts (run_id, step_key, cycle, step_index, person_id, generation, channel, destination, provider, status,
                                                     fencing_token, created_at)
         VALUES ($1, 'notify', 0, 0, 'nurse-avery', 0, 'sms', $2, 'twilio', 'intent', 1, clock_timestamp() - interval '60 seconds') RETURNING id",
    )
    .bind(run)
    .bind(NURSE_A)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    let sms = Arc::new(FakeSender { channel: Channel::Sms, provider_id: "SM0123456789abcdef0123456789abcdef".into(), sends: AtomicUsize::new(0) });
    let mut services = h.app.engine.services.clone();
    services.providers = Arc::new(wardcall::providers::Providers { senders: vec![sms.clone()], ..Default::default() });
    let claimed = wardcall::store::runs::ClaimedRun {
        id: run,
        workflow: "critical-alert-call".into(),
        event: "test".into(),
        input: serde_json::json!({}),
        state: serde_json::json!({}),
        step: "notify".into(),
        step_attempt: 1,
        fencing_token: 2,
        wait_signal: None,
        wait_outcome: None,
        previous_status: "pending".into(),
        step_seq: 0,
    };
    let who = Recipient { id: "nurse-avery".into(), name: "Avery".into(), voice: None, sms: Some(NURSE_A.into()) };
    let result =
        wardcall::notify::sms::send_one_way(&services, &claimed, &wardcall::runtime::step::WorkerSlot::none(), "notify", &[who], "Linen change in Room 2")
            .await;
    assert!(matches!(result, Err(wardcall::workflows::StepError::Retryable(_))), "the step retries: {result:?}");
    assert_eq!(sms.sends.load(Ordering::SeqCst), 0, "nothing is sent while the provider cannot be asked");
    let status: String =
        sqlx::query_scalar("SELECT status FROM wardcall.notification_attempts WHERE id = $1").bind(intent).fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(status, "intent", "the intent stays for reconciliation");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.notification_attempts WHERE channel = 'sms'").await, 1);
    h.stop().await;
}

/// The recipient's name is kept on every attempt, a text's as a call's
/// (README: write-backs get `person_name`): an alert acknowledged by a text
/// reply gives its `on_acknowledged` write-back the name, as a keypress does.
pub async fn sms_fallback_attempt_keeps_the_person_name() {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let h = start_with(db, Persona::Busy, Persona::NoAnswer, |c| {
        for p in &mut c.policies {
            for s in &mut p.steps {
                s.sms_fallback = true;
            }
        }
    })
    .await;
    h.emulator.set_sms_persona(NURSE_A, wardcall::devtools::twilio_emulator::SmsPersona::Deliver);
    h.db.exec(SEIZURE_INSERT).await;
    await_true(&h.db, "the SMS fallback", Duration::from_secs(15), "SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE channel = 'sms'").await;
    let (call, text): (serde_json::Value, serde_json::Value) = sqlx::query_as(
        "SELECT wardcall.attempt_recipient((SELECT id FROM wardcall.notification_attempts WHERE channel = 'voice' AND destination = $1)),
                wardcall.attempt_recipient((SELECT id FROM wardcall.notification_attempts WHERE channel = 'sms'))",
    )
    .bind(NURSE_A)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert!(call.get("person_name").is_some(), "the call's attempt has the name: {call}");
    assert_eq!(text, call, "the text's attempt names the same person as the call's");
    h.stop().await;
}

/// Inserts a run of the hospital's workflow held by an execution with
/// fencing token 2 (not due: the engine leaves it alone) and returns it as claimed.
async fn held_run(h: &Hospital) -> wardcall::store::runs::ClaimedRun {
    let id: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, lease_owner, fencing_token, due_at)
         VALUES ('critical-alert-call', 'test', '{}', 'notify', 'running', 'engine:test', 2, clock_timestamp() + interval '1 hour') RETURNING id",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    wardcall::store::runs::ClaimedRun {
        id,
        workflow: "critical-alert-call".into(),
        event: "test".into(),
        input: serde_json::json!({}),
        state: serde_json::json!({}),
        step: "notify".into(),
        step_attempt: 1,
        fencing_token: 2,
        wait_signal: None,
        wait_outcome: None,
        previous_status: "pending".into(),
        step_seq: 0,
    }
}

/// Two runs text the same nurse (two alerts while she is busy) and both
/// engines stop between the create request and its record. Each text is told
/// apart at the provider by its body, so each intent adopts its own message
/// and nobody is texted twice (as before the refactor); the rivals rule of
/// calls (which cannot be told apart) must not turn that into a re-send.
pub async fn ambiguous_text_is_adopted_beside_another_alerts_text() {
    let h = hospital_a_silent().await;
    let (a, b) = (held_run(&h).await, held_run(&h).await);
    for run in [&a, &b] {
        sqlx::query(
            "INSERT INTO wardcall.notification_attempts (run_id, step_key, cycle, step_index, person_id, generation, channel, destination, provider,
                                                         status, fencing_token, created_at)
             VALUES ($1, 'notify', 0, 0, 'nurse-avery', 0, 'sms', $2, 'twilio', 'intent', 1, clock_timestamp() - interval '3 seconds')",
        )
        .bind(run.id)
        .bind(NURSE_A)
        .execute(&h.db.pool)
        .await
        .unwrap();
    }
    // Both messages reached the provider; their answers were lost.
    let services = h.app.engine.services.clone();
    let sms = services.providers.sender(Channel::Sms).expect("Twilio SMS");
    for (run, body) in [(&a, "Linen change in Room 2"), (&b, "Fall risk in Room 7")] {
        let out = Outgoing {
            attempt_id: uuid::Uuid::new_v4(),
            person_id: "nurse-avery".into(),
            to: NURSE_A.into(),
            content: Content::Text { body: body.into() },
            critical: false,
        };
        assert!(sms.send(&out, &services.public_url).await.result.is_ok(), "run {}", run.id);
    }
    let who = Recipient { id: "nurse-avery".into(), name: "Avery".into(), voice: None, sms: Some(NURSE_A.into()) };
    wardcall::notify::sms::send_one_way(
        &services,
        &a,
        &wardcall::runtime::step::WorkerSlot::none(),
        "notify",
        std::slice::from_ref(&who),
        "Linen change in Room 2",
    )
    .await
    .expect("reconciled");
    assert_eq!(h.emulator.messages().len(), 2, "nothing was sent again");
    let adopted: Option<String> = sqlx::query_scalar("SELECT provider_id FROM wardcall.notification_attempts WHERE run_id = $1 AND generation = 0")
        .bind(a.id)
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    let linen = h.emulator.messages().into_iter().find(|m| m.body == "Linen change in Room 2").unwrap().sid;
    assert_eq!(adopted, Some(linen), "run A adopted its own message");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'attempt.outcome_unknown'").await, 0);
    h.stop().await;
}

/// The escalation's SMS fallback is a critical alert's: when its ambiguous
/// text cannot be checked because the provider's message list stays
/// unreadable, it follows the re-call rule (texted again after 30 s) rather
/// than failing every evaluation, which would hold the escalation (and the
/// next tier's calls) for as long as the list is down (invariant 10).
pub async fn sms_fallback_is_not_held_by_an_unreadable_message_list() {
    let h = hospital_a_silent().await;
    let run = held_run(&h).await;
    let alert: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.alerts (run_id, workflow, policy, message, status) VALUES ($1, 'critical-alert-call', 'critical-care', 'Seizure in Room 2', 'open')
         RETURNING id",
    )
    .bind(run.id)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    // Nurse A's call was busy; her fallback text's answer was lost a minute ago.
    for (channel, status) in [("voice", "busy"), ("sms", "intent")] {
        sqlx::query(
            "INSERT INTO wardcall.notification_attempts (alert_id, run_id, cycle, step_index, person_id, generation, channel, destination, provider, status,
                                                         fencing_token, created_at)
             VALUES ($1, $2, 0, 0, 'nurse-avery', 0, $3, $4, 'twilio', $5, 1, clock_timestamp() - interval '60 seconds')",
        )
        .bind(alert)
        .bind(run.id)
        .bind(channel)
        .bind(NURSE_A)
        .bind(status)
        .execute(&h.db.pool)
        .await
        .unwrap();
    }
    let sms = Arc::new(FakeSender { channel: Channel::Sms, provider_id: "SM0123456789abcdef0123456789abcdee".into(), sends: AtomicUsize::new(0) });
    let mut services = h.app.engine.services.clone();
    services.providers = Arc::new(wardcall::providers::Providers { senders: vec![sms.clone()], ..Default::default() });
    wardcall::notify::sms::send_fallbacks(&services, &run, &wardcall::runtime::step::WorkerSlot::none(), alert, 0, 0, &[], "")
        .await
        .expect("the fallback goes on");
    assert_eq!(sms.sends.load(Ordering::SeqCst), 1, "texted again under the re-call rule");
    let statuses: Vec<(i32, String)> =
        sqlx::query_as("SELECT generation, status FROM wardcall.notification_attempts WHERE channel = 'sms' AND run_id = $1 ORDER BY generation")
            .bind(run.id)
            .fetch_all(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(statuses, vec![(0, "unknown".to_string()), (1, "requested".to_string())]);
    h.stop().await;
}
