//! Twilio SMS, the second channel: delivery recorded from status callbacks,
//! signed SMS webhooks (forged refused, replayed ignored), acknowledgement by
//! replying `1` (ending ringing calls), reserved keywords never commands, the
//! call → SMS fallback, long messages shortened, and one-way notify sending
//! once per recipient.

use crate::escalation::{await_alert_status, calls_to, start_with, Hospital, NURSE_A, NURSE_B, SEIZURE_INSERT};
use crate::harness::*;
use serde_json::Value;
use std::time::Duration;
use wardcall::config::Config;
use wardcall::devtools::twilio_emulator::{Persona, SmsPersona};
use wardcall::notify::Recipient;
use wardcall::providers::twilio::signature::compute_signature;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        sms::delivery_lifecycle_is_recorded,
        sms::forged_sms_webhooks_are_refused_and_change_nothing,
        sms::replayed_sms_webhooks_change_nothing,
        sms::reply_one_acknowledges_and_hangs_up_ringing_calls,
        sms::stop_and_other_texts_are_not_acknowledgements,
        sms::a_reply_answers_the_alert_that_was_texted_not_a_newer_call,
        sms::a_reply_never_acknowledges_an_alert_whose_text_failed,
        sms::busy_callee_gets_the_sms_and_acknowledges_by_reply,
        sms::long_message_is_shortened_not_refused,
        sms::one_way_notify_sends_once_per_recipient_even_when_rerun,
        sms::keypress_acknowledgement_names_voice_and_ends_texting,
        sms::a_fallback_text_carries_the_message_the_alert_could_not_store,
    ]
}

/// The hospital's Twilio number (examples/hospital.toml).
const HOSPITAL_NUMBER: &str = "+13855550100";

/// The hospital with `sms_fallback` on every tier, the emulator's messaging
/// webhook pointed at the engine, and `sms_a` as nurse A's texting behaviour.
async fn sms_hospital(a: Persona, b: Persona, sms_a: SmsPersona, ack_timeout: f64, configure: impl FnOnce(&mut Config)) -> Hospital {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let h = start_with(db, a, b, |c| {
        for p in &mut c.policies {
            for s in &mut p.steps {
                s.sms_fallback = true;
                s.ack_timeout_seconds = ack_timeout;
            }
        }
        configure(c);
    })
    .await;
    h.emulator.set_sms_persona(NURSE_A, sms_a);
    h.emulator.set_messaging_webhook(HOSPITAL_NUMBER, &wardcall::providers::twilio::inbound_sms_url(&h.app.engine.public_url));
    h
}

async fn await_sms_status(h: &Hospital, to: &str, status: &str) {
    let sql = format!("SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE channel = 'sms' AND destination = '{to}' AND status = '{status}'");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let done: bool = sqlx::query_scalar(&sql).fetch_one(&h.db.pool).await.unwrap();
        if done {
            return;
        }
        if std::time::Instant::now() > deadline {
            let attempts: Value = sqlx::query_scalar(
                "SELECT jsonb_agg(jsonb_build_object('channel', channel, 'status', status, 'sid', provider_id, 'error', error) ORDER BY created_at)
                   FROM wardcall.notification_attempts",
            )
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
            let runs: Value =
                sqlx::query_scalar("SELECT jsonb_agg(jsonb_build_object('status', status, 'step', step, 'error', last_error)) FROM wardcall.runs")
                    .fetch_one(&h.db.pool)
                    .await
                    .unwrap();
            panic!("timed out waiting for a text to be {status}: attempts {attempts}, runs {runs}, emulator messages {:?}", h.emulator.messages().len());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the run has consumed every signal and waits again.
async fn quiet(h: &Hospital) {
    await_true(
        &h.db,
        "a waiting run without pending signals",
        Duration::from_secs(10),
        "SELECT (SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'waiting')
            AND (SELECT count(*) = 0 FROM wardcall.signals WHERE consumed_at IS NULL)",
    )
    .await;
}

/// Alerts, attempts (without `updated_at`) and the audit log's size.
async fn snapshot(db: &TestDb) -> (Value, Value, i64) {
    let alerts: Value =
        sqlx::query_scalar("SELECT coalesce(jsonb_agg(to_jsonb(a) ORDER BY id), '[]') FROM wardcall.alerts a").fetch_one(&db.pool).await.unwrap();
    let attempts: Value = sqlx::query_scalar("SELECT coalesce(jsonb_agg(to_jsonb(n) - 'updated_at' ORDER BY id), '[]') FROM wardcall.notification_attempts n")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (alerts, attempts, db.scalar_i64("SELECT count(*) FROM wardcall.audit_log").await)
}

/// Posts form `params` to the engine at `path_and_query`, signed with
/// `token` over `signed` (the sent parameters when `None`), with an optional
/// idempotency token.
async fn post(h: &Hospital, path_and_query: &str, params: &[(&str, &str)], token: Option<&str>, signed: Option<&[(&str, &str)]>, idem: Option<&str>) -> u16 {
    let url = format!("{}{}", h.app.engine.public_url, path_and_query);
    let owned = |p: &[(&str, &str)]| -> Vec<(String, String)> { p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
    let mut req =
        reqwest::Client::new().post(&url).header("content-type", "application/x-www-form-urlencoded").body(serde_urlencoded::to_string(owned(params)).unwrap());
    if let Some(token) = token {
        req = req.header("X-Twilio-Signature", compute_signature(token, &url, &owned(signed.unwrap_or(params))));
    }
    if let Some(idem) = idem {
        req = req.header("I-Twilio-Idempotency-Token", idem);
    }
    req.send().await.unwrap().status().as_u16()
}

fn inbound<'a>(from: &'a str, sid: &'a str, body: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("MessageSid", sid), ("SmsSid", sid), ("AccountSid", ACCOUNT_SID), ("From", from), ("To", HOSPITAL_NUMBER), ("Body", body), ("NumMedia", "0")]
}

pub async fn delivery_lifecycle_is_recorded() {
    let h = sms_hospital(Persona::Busy, Persona::NoAnswer, SmsPersona::Deliver, 30.0, |_| {}).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_sms_status(&h, NURSE_A, "delivered").await;
    let (attempt, sid, ended): (uuid::Uuid, String, bool) = sqlx::query_as(
        "SELECT attempt_id, message_id, ended_at IS NOT NULL FROM wardcall.message_log WHERE phone_number = $1 AND delivered AND alert_id IS NOT NULL",
    )
    .bind(NURSE_A)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert!(sid.starts_with("SM"), "{sid}");
    assert!(ended, "delivery is final");
    // intent → queued (create response) → sent → delivered, each audited once.
    let transitions: Vec<(String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT action, from_state, to_state FROM wardcall.audit_log WHERE entity_id = $1 ORDER BY id")
            .bind(attempt.to_string())
            .fetch_all(&h.db.pool)
            .await
            .unwrap();
    let t: Vec<String> = transitions.iter().map(|(a, f, to)| format!("{a} {} {}", f.as_deref().unwrap_or("-"), to.as_deref().unwrap_or("-"))).collect();
    assert_eq!(t, ["attempt.intent - intent", "attempt.requested intent queued", "attempt.status queued sent", "attempt.status sent delivered"]);
    let messages = h.emulator.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].to, NURSE_A);
    assert_eq!(messages[0].from, HOSPITAL_NUMBER);
    assert!(messages[0].body.starts_with("Critical alert at Haven Hospital. Room 2, patient Dana Vale."), "{}", messages[0].body);
    assert!(messages[0].body.ends_with("\nReply 1 to acknowledge."));
    // The tier waits out its timeout while the text can be answered.
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.alerts WHERE status = 'open'").await, 1);
    assert_eq!(calls_to(&h, NURSE_B), 0, "no escalation while the text can be answered");
    h.stop().await;
}

/// A ringing call to nurse A (no SMS yet), the run waiting, no signal pending.
async fn ringing(h: &Hospital) {
    h.db.exec(SEIZURE_INSERT).await;
    await_true(
        &h.db,
        "a ringing call and a waiting run",
        Duration::from_secs(10),
        "SELECT (SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE status = 'ringing')
            AND (SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'waiting')
            AND (SELECT count(*) = 0 FROM wardcall.signals WHERE consumed_at IS NULL)",
    )
    .await;
}

pub async fn forged_sms_webhooks_are_refused_and_change_nothing() {
    let h = sms_hospital(Persona::NoAnswer, Persona::NoAnswer, SmsPersona::Deliver, 30.0, |_| {}).await;
    ringing(&h).await;
    let attempt: uuid::Uuid = sqlx::query_scalar("SELECT id FROM wardcall.notification_attempts").fetch_one(&h.db.pool).await.unwrap();
    let before = snapshot(&h.db).await;
    let reply = inbound(NURSE_A, "SM00000000000000000000000000000001", "1");
    assert_eq!(post(&h, "/webhooks/twilio/sms", &reply, None, None, None).await, 403, "missing signature");
    assert_eq!(post(&h, "/webhooks/twilio/sms", &reply, Some("wrong-token"), None, None).await, 403, "forged signature");
    let signed_for = inbound(NURSE_A, "SM00000000000000000000000000000001", "2");
    assert_eq!(post(&h, "/webhooks/twilio/sms", &reply, Some(AUTH_TOKEN), Some(&signed_for), None).await, 403, "tampered body");
    let status_path = format!("/webhooks/twilio/sms-status?attempt={attempt}");
    let status = [("MessageSid", "SM00000000000000000000000000000002"), ("MessageStatus", "failed"), ("ErrorCode", "30008")];
    assert_eq!(post(&h, &status_path, &status, Some("wrong-token"), None, None).await, 403, "forged status callback");
    assert_eq!(snapshot(&h.db).await, before, "nothing changed");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.alerts WHERE status = 'open'").await, 1);
    h.stop().await;
}

pub async fn replayed_sms_webhooks_change_nothing() {
    let h = sms_hospital(Persona::Busy, Persona::NoAnswer, SmsPersona::Deliver, 30.0, |_| {}).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_sms_status(&h, NURSE_A, "delivered").await;
    let (attempt, sid): (uuid::Uuid, String) =
        sqlx::query_as("SELECT id, provider_id FROM wardcall.notification_attempts WHERE channel = 'sms'").fetch_one(&h.db.pool).await.unwrap();
    // A status callback replayed with its idempotency token, then a late one.
    quiet(&h).await;
    let path = format!("/webhooks/twilio/sms-status?attempt={attempt}");
    let undelivered = [("MessageSid", sid.as_str()), ("MessageStatus", "undelivered"), ("ErrorCode", "30003")];
    let sent = [("MessageSid", sid.as_str()), ("MessageStatus", "sent")];
    let before = snapshot(&h.db).await;
    assert_eq!(post(&h, &path, &undelivered, Some(AUTH_TOKEN), None, Some("idem-1")).await, 200);
    assert_eq!(post(&h, &path, &sent, Some(AUTH_TOKEN), None, Some("idem-2")).await, 200);
    assert_eq!(snapshot(&h.db).await, before, "a final status never moves, a late one changes nothing");
    // The reply acknowledges once; its replay (same MessageSid) changes nothing.
    let reply = inbound(NURSE_A, "SM0000000000000000000000000000aaaa", "1");
    assert_eq!(post(&h, "/webhooks/twilio/sms", &reply, Some(AUTH_TOKEN), None, Some("idem-3")).await, 200);
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(5)).await;
    await_true(&h.db, "the run to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    let acked = snapshot(&h.db).await;
    assert_eq!(post(&h, "/webhooks/twilio/sms", &reply, Some(AUTH_TOKEN), None, Some("idem-3")).await, 200);
    assert_eq!(post(&h, "/webhooks/twilio/sms", &reply, Some(AUTH_TOKEN), None, Some("idem-4")).await, 200);
    assert_eq!(snapshot(&h.db).await, acked, "a replayed reply changes nothing");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'alert.acknowledged'").await, 1);
    h.stop().await;
}

pub async fn reply_one_acknowledges_and_hangs_up_ringing_calls() {
    // Both nurses in the first tier: A is busy and gets the text, B's phone rings.
    let h = sms_hospital(Persona::Busy, Persona::NoAnswer, SmsPersona::Reply { delay_ms: 300, body: " 1 ".into() }, 30.0, |c| {
        c.policies[0].steps[0].who.notify = vec!["nurse-avery".into(), "nurse-blake".into()];
        if let Some(e) = c.workflows[0].escalation_mut() {
            // The team's write-back names the channel.
            e.write_back.on_acknowledged = Some(
                "UPDATE alerts SET status = 'acknowledged', acknowledged_at = now(), acknowledged_by = 'nurse_' || ($2->>'acknowledged_via')
                  WHERE id = ($1->>'id')::uuid"
                    .into(),
            );
        }
    })
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    let (by, via): (String, String) = sqlx::query_as("SELECT acknowledged_by, acknowledged_via FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!((by.as_str(), via.as_str()), ("nurse-avery", "sms"));
    let (status, ack_by): (String, String) = sqlx::query_as("SELECT status, acknowledged_by FROM alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!((status.as_str(), ack_by.as_str()), ("acknowledged", "nurse_sms"), "written back naming the channel");
    // B's ringing call is hung up; nothing more is sent.
    await_some("B's call to end", Duration::from_secs(10), || async {
        h.emulator.calls().iter().find(|c| c.to == NURSE_B).and_then(|c| c.final_status.clone())
    })
    .await;
    let b = h.emulator.calls().into_iter().find(|c| c.to == NURSE_B).unwrap();
    assert_eq!(b.final_status.as_deref(), Some("canceled"));
    assert!(b.received_at.elapsed() < Duration::from_secs(15), "hung up, not rung out");
    await_true(&h.db, "the run to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    assert_eq!(h.emulator.messages().len(), 1, "no further messages");
    h.stop().await;
}

/// The hospital with texts, its first alert texted to nurse A (her phone
/// busy) and delivered: (hospital, that alert's id).
async fn an_alert_texted_to_nurse_a() -> (Hospital, uuid::Uuid) {
    let h = sms_hospital(Persona::Busy, Persona::NoAnswer, SmsPersona::Deliver, 30.0, |_| {}).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_sms_status(&h, NURSE_A, "delivered").await;
    let x: uuid::Uuid = sqlx::query_scalar("SELECT id FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    (h, x)
}

/// Nurse A replies "1" with two alerts open: the first (`first`) is
/// acknowledged (`why_first`), the second stays open (`why_second`).
async fn reply_one_acknowledges_the_first_of_two(h: &Hospital, first: uuid::Uuid, why_first: &str, why_second: &str) {
    assert_eq!(h.emulator.send_inbound(NURSE_A, HOSPITAL_NUMBER, "1").await, Some(200));
    await_true(&h.db, "an alert acknowledged", Duration::from_secs(5), "SELECT EXISTS (SELECT 1 FROM wardcall.alerts WHERE status = 'acknowledged')").await;
    let statuses: Vec<(uuid::Uuid, String)> = sqlx::query_as("SELECT id, status FROM wardcall.alerts ORDER BY created_at").fetch_all(&h.db.pool).await.unwrap();
    assert_eq!(statuses.len(), 2);
    assert_eq!(statuses[0], (first, "acknowledged".to_string()), "{why_first}");
    assert_eq!(statuses[1].1, "open", "{why_second}");
}

/// A nurse texted for alert X (her phone was busy) is then called for a
/// newer alert Y. Her reply "1" answers X's text: X is acknowledged, and Y
/// (which only called her) keeps calling until she presses 1 or its tier
/// escalates. (Taking the newest attempt of any channel, the reply
/// acknowledged Y, which she had not heard, and left X escalating.)
pub async fn a_reply_answers_the_alert_that_was_texted_not_a_newer_call() {
    let (h, x) = an_alert_texted_to_nurse_a().await;
    h.emulator.set_persona(NURSE_A, Persona::NoAnswer);
    h.db.exec(SEIZURE_INSERT).await;
    await_some("the newer alert's call to the nurse", Duration::from_secs(10), || async { (calls_to(&h, NURSE_A) == 2).then_some(()) }).await;
    reply_one_acknowledges_the_first_of_two(
        &h,
        x,
        "the texted alert is the one acknowledged",
        "the alert that only called her is not acknowledged by a reply to another's text",
    )
    .await;
    h.stop().await;
}

/// A nurse's text for alert X arrived; the text of a newer alert Z to her
/// failed (the carrier could not deliver it). Her reply "1" answers X: Z,
/// which never reached her, is not acknowledged and goes on escalating.
pub async fn a_reply_never_acknowledges_an_alert_whose_text_failed() {
    let (h, x) = an_alert_texted_to_nurse_a().await;
    h.emulator.set_sms_persona(NURSE_A, SmsPersona::Undelivered);
    h.db.exec(SEIZURE_INSERT).await;
    await_true(
        &h.db,
        "the newer alert's text undelivered",
        Duration::from_secs(10),
        "SELECT EXISTS (SELECT 1 FROM wardcall.notification_attempts WHERE channel = 'sms' AND status = 'undelivered')",
    )
    .await;
    reply_one_acknowledges_the_first_of_two(
        &h,
        x,
        "the alert whose text arrived is the one acknowledged",
        "an alert whose text failed is not acknowledged by a reply",
    )
    .await;
    h.stop().await;
}

pub async fn stop_and_other_texts_are_not_acknowledgements() {
    let h = sms_hospital(Persona::Busy, Persona::NoAnswer, SmsPersona::Deliver, 30.0, |_| {}).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_sms_status(&h, NURSE_A, "delivered").await;
    for text in ["STOP", "Stop", "HELP", "start", "ok thanks, room 2", "11", "1 2"] {
        assert_eq!(h.emulator.send_inbound(NURSE_A, HOSPITAL_NUMBER, text).await, Some(200), "{text}");
    }
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.alerts WHERE status = 'open'").await, 1, "not acknowledged");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'reply.reserved_keyword'").await, 4);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'reply.not_an_acknowledgement'").await, 3);
    assert_eq!(
        h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE detail::text ILIKE '%thanks%' OR detail::text ILIKE '%stop%'").await,
        0,
        "texts are never audited"
    );
    // A reply of 1 still acknowledges afterwards.
    assert_eq!(h.emulator.send_inbound(NURSE_A, HOSPITAL_NUMBER, "1").await, Some(200));
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(5)).await;
    h.stop().await;
}

pub async fn busy_callee_gets_the_sms_and_acknowledges_by_reply() {
    let h = sms_hospital(
        Persona::Busy,
        Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() },
        SmsPersona::Reply { delay_ms: 500, body: "1".into() },
        30.0,
        |_| {},
    )
    .await;
    let t0 = std::time::Instant::now();
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
    assert!(t0.elapsed() < Duration::from_secs(15), "acknowledged by the text, not after the tier's timeout");
    assert_eq!(calls_to(&h, NURSE_B), 0, "the backup was never called");
    let (by, via): (String, String) = sqlx::query_as("SELECT acknowledged_by, acknowledged_via FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!((by.as_str(), via.as_str()), ("nurse-avery", "sms"));
    let (status, meta): (String, Value) = sqlx::query_as("SELECT status, metadata FROM alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(status, "acknowledged", "written back as a keypress is");
    assert_eq!(meta["call"]["phone_number"], NURSE_A);
    let acked: (String, bool) = sqlx::query_as("SELECT channel, replied_at IS NOT NULL FROM wardcall.notification_attempts WHERE acknowledged_at IS NOT NULL")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(acked, ("sms".to_string(), true));
    h.stop().await;
}

pub async fn long_message_is_shortened_not_refused() {
    let h = sms_hospital(Persona::Busy, Persona::NoAnswer, SmsPersona::Deliver, 30.0, |_| {}).await;
    h.db.exec(
        "INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title)
         VALUES ('P-DHE-001', (SELECT room_id FROM rooms WHERE room_name = 'Room 2' LIMIT 1), 'critical', 'active', 'seizure_detected',
                 repeat('Seizure activity detected ' || chr(7), 200))",
    )
    .await;
    await_sms_status(&h, NURSE_A, "delivered").await;
    let body = h.emulator.messages()[0].body.clone();
    assert_eq!(body.chars().count(), 1600, "shortened to Twilio's limit");
    assert!(body.starts_with("Critical alert at Haven Hospital. Room 2, patient Dana Vale. Seizure activity detected"), "{body}");
    assert!(body.ends_with("…\nReply 1 to acknowledge."), "{body}");
    assert!(!body.contains('\u{7}'), "control characters stripped");
    h.stop().await;
}

/// A run row held by a test as a step would hold it (running, lease far away).
async fn held_run(db: &TestDb, token: i64) -> wardcall::store::runs::ClaimedRun {
    let id: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, fencing_token, due_at, lease_owner)
         VALUES ('sla-monitor', 'task.created', '{}', 'notify_warning', 'running', $1, now() + interval '1 hour', 'test') RETURNING id",
    )
    .bind(token)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    claimed(id, token)
}

fn claimed(id: uuid::Uuid, token: i64) -> wardcall::store::runs::ClaimedRun {
    wardcall::store::runs::ClaimedRun {
        id,
        workflow: "sla-monitor".into(),
        event: "task.created".into(),
        input: serde_json::json!({}),
        state: serde_json::json!({}),
        step: "notify_warning".into(),
        step_attempt: 0,
        fencing_token: token,
        wait_signal: None,
        wait_outcome: None,
        previous_status: "pending".into(),
        step_seq: 0,
    }
}

pub async fn one_way_notify_sends_once_per_recipient_even_when_rerun() {
    let h = sms_hospital(Persona::NoAnswer, Persona::NoAnswer, SmsPersona::Deliver, 30.0, |c| {
        c.providers.twilio.as_mut().unwrap().request_timeout_seconds = 0.5;
    })
    .await;
    let engine = h.app.engine.clone();
    let run = held_run(&h.db, 1).await;
    let person = |id: &str, sms: Option<&str>| Recipient { id: id.into(), name: format!("Nurse {id}"), voice: None, sms: sms.map(str::to_string) };
    let recipients = vec![person("n1", Some(NURSE_A)), person("n2", Some(NURSE_B)), person("n1", Some(NURSE_A)), person("n3", None)];
    // Called outside a worker, as a test does: no worker slot to leave.
    let no_slot = wardcall::runtime::step::WorkerSlot::none();
    // 1. Twilio answers too late, and its status callbacks are lost: the
    //    messages exist, the outcome is ambiguous.
    h.emulator.set_create_response_delay(Duration::from_secs(1));
    h.emulator.set_status_callbacks_lost(NURSE_A, true);
    h.emulator.set_status_callbacks_lost(NURSE_B, true);
    let first = wardcall::notify::sms::send_one_way(&engine.services, &run, &no_slot, "warn", &recipients, "SLA warning: task 42 is at 75 %.").await;
    assert!(matches!(first, Err(wardcall::workflows::StepError::Retryable(_))), "{first:?}");
    assert_eq!(h.emulator.messages().len(), 2);
    // 2. Retried by another execution (new token): reconciled, nothing re-sent.
    h.emulator.set_create_response_delay(Duration::ZERO);
    sqlx::query("UPDATE wardcall.runs SET fencing_token = 2 WHERE id = $1").bind(run.id).execute(&h.db.pool).await.unwrap();
    let stale = wardcall::notify::sms::send_one_way(&engine.services, &run, &no_slot, "warn", &recipients, "SLA warning: task 42 is at 75 %.").await;
    assert!(matches!(stale, Err(wardcall::workflows::StepError::LeaseLost)), "the old token is fenced out: {stale:?}");
    let rerun = claimed(run.id, 2);
    wardcall::notify::sms::send_one_way(&engine.services, &rerun, &no_slot, "warn", &recipients, "SLA warning: task 42 is at 75 %.").await.unwrap();
    // 3. And once more: everything recorded, nothing sent.
    wardcall::notify::sms::send_one_way(&engine.services, &rerun, &no_slot, "warn", &recipients, "SLA warning: task 42 is at 75 %.").await.unwrap();
    assert_eq!(h.emulator.messages().len(), 2, "one message per recipient");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'attempt.reconciled'").await, 2);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'notify.no_address'").await, 3, "n3 skipped on each execution");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.message_log WHERE step_key = 'warn' AND alert_id IS NULL").await, 2, "SIDs recorded");
    // Another step of the same run sends again. Its status callbacks are
    // lost too: the call sweeper fetches the message once it is due.
    wardcall::notify::sms::send_one_way(&engine.services, &rerun, &no_slot, "breach", &recipients[..1], "SLA breach: task 42.").await.unwrap();
    assert_eq!(h.emulator.messages().len(), 3);
    await_some("the emulator to deliver the breach message", Duration::from_secs(10), || async {
        h.emulator.messages().iter().any(|m| m.body == "SLA breach: task 42." && m.status == "delivered").then_some(())
    })
    .await;
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.message_log WHERE step_key = 'breach' AND message_status = 'queued'").await, 1);
    h.db.exec("UPDATE wardcall.notification_attempts SET reconcile_after = now() WHERE step_key = 'breach'").await;
    wardcall::notify::sms::reconcile_messages(&engine.services).await.unwrap();
    await_true(
        &h.db,
        "the breach message reconciled as delivered",
        Duration::from_secs(10),
        "SELECT count(*) = 1 FROM wardcall.message_log WHERE step_key = 'breach' AND delivered",
    )
    .await;
    // A message made of the step's details is given to write-backs.
    let details: Value = sqlx::query_scalar("SELECT wardcall.attempt_details(id) FROM wardcall.notification_attempts WHERE step_key = 'breach'")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(details["channel"], "sms");
    assert_eq!(details["step_key"], "breach");
    assert!(details["message_id"].as_str().unwrap().starts_with("SM"));
    h.stop().await;
}

pub async fn keypress_acknowledgement_names_voice_and_ends_texting() {
    // Both nurses in the first tier: A is busy and is texted; B answers and presses 1.
    let h = sms_hospital(Persona::Busy, Persona::Answer { ring_ms: 600, think_ms: 100, digits: "1".into() }, SmsPersona::Deliver, 30.0, |c| {
        c.policies[0].steps[0].who.notify = vec!["nurse-avery".into(), "nurse-blake".into()];
    })
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    let (by, via): (String, String) = sqlx::query_as("SELECT acknowledged_by, acknowledged_via FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!((by.as_str(), via.as_str()), ("nurse-blake", "voice"));
    let details: Value = sqlx::query_scalar("SELECT wardcall.attempt_details(id) FROM wardcall.notification_attempts WHERE acknowledged_at IS NOT NULL")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(details["acknowledged_via"], "voice");
    assert_eq!(details["call_status"], "answered");
    assert_eq!(h.emulator.messages().len(), 1, "only A's fallback text");
    // A's late reply finds nothing open: nothing changes but the audit.
    await_true(&h.db, "the run to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    assert_eq!(h.emulator.send_inbound(NURSE_A, HOSPITAL_NUMBER, "1").await, Some(200));
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'reply.nothing_to_acknowledge'").await, 1);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'alert.acknowledged'").await, 1);
    assert_eq!(h.emulator.messages().len(), 1, "no further messages");
    h.stop().await;
}

/// The seizure alert is opened by its dispatch without its message, and
/// here every write of the message is refused (a trigger stands in for a
/// database that keeps failing that one statement). Nurse A's line is busy:
/// the SMS fallback still texts the alert as the step rendered it, never a
/// text with the reply instruction alone, and her reply acknowledges.
pub async fn a_fallback_text_carries_the_message_the_alert_could_not_store() {
    let h = sms_hospital(Persona::Busy, Persona::NoAnswer, SmsPersona::Reply { delay_ms: 200, body: "1".into() }, 30.0, |_| {}).await;
    h.db.exec(
        "CREATE FUNCTION refuse_message() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'message refused (test)'; END $$;
         CREATE TRIGGER refuse_message BEFORE UPDATE OF message ON wardcall.alerts FOR EACH ROW WHEN (OLD.message IS NULL) EXECUTE FUNCTION refuse_message();",
    )
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
    let texts: Vec<String> = h.emulator.messages().iter().filter(|m| m.to == NURSE_A).map(|m| m.body.clone()).collect();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(texts[0].contains("Room 2") && texts[0].contains("Seizure Activity Detected"), "the text carries the alert: {:?}", texts[0]);
    let stored: Option<String> = sqlx::query_scalar("SELECT message FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(stored, None, "(every write was refused)");
    h.stop().await;
}
