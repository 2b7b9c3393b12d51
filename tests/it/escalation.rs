//! The hospital scenario: Twilio voice, keypad acknowledgement, escalation,
//! write-back, signed webhooks, and the re-call rule after a crash.

use crate::harness::*;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use wardcall::app::App;
use wardcall::config::Config;
use wardcall::devtools::twilio_emulator::{EmulatorConfig, EmulatorEvent, EmulatorHandle, Persona, TwilioEmulator};
use wardcall::providers::twilio::signature::compute_signature;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        escalation::scenario_end_to_end_no_answer_then_backup_acknowledges,
        escalation::busy_escalates_without_waiting_out_the_timeout,
        escalation::failed_call_escalates_without_waiting_out_the_timeout,
        escalation::refused_call_escalates_without_waiting_out_the_timeout,
        escalation::voicemail_is_not_an_acknowledgement,
        escalation::digit_two_escalates_at_once,
        escalation::silent_answer_is_not_an_acknowledgement_and_policy_repeats,
        escalation::late_and_repeated_callbacks_change_nothing,
        escalation::forged_or_missing_signature_gets_403_and_changes_nothing,
        escalation::recall_rule_unknown_outcome_calls_again,
        escalation::recall_rule_confirmed_call_is_not_repeated,
        escalation::recall_rule_call_named_by_callbacks_is_not_repeated,
        escalation::special_characters_still_produce_a_valid_call,
        escalation::non_e164_number_is_refused_at_config_load,
        escalation::call_log_answers_the_monitoring_questions,
        escalation::provider_outage_never_escalates_or_gives_up,
        escalation::late_press_of_one_acknowledges_an_unacknowledged_alert,
        escalation::write_back_does_not_retrigger_an_update_source,
        escalation::a_deferred_team_trigger_fired_by_a_write_back_is_captured,
        escalation::write_back_keeps_the_change_and_puts_its_settings_back,
        escalation::fence_and_open_opens_once_and_never_without_the_lease,
        escalation::open_with_intents_writes_all_or_nothing,
        escalation::a_batch_of_first_tiers_keeps_each_run_to_itself,
    ]
}

pub const NURSE_A: &str = "+13855550101";
pub const NURSE_B: &str = "+13855550102";

pub struct Hospital {
    pub db: TestDb,
    pub app: App,
    pub emulator: EmulatorHandle,
}

impl Hospital {
    pub async fn stop(self) {
        self.app.stop(Duration::from_secs(2)).await;
        self.emulator.shutdown().await;
    }
}

pub fn hospital_config(emulator_url: &str, ack_timeout: f64, repeat: u32) -> Config {
    let mut c = Config::parse(wardcall::devtools::demo::HOSPITAL_CONFIG, "hospital.toml").unwrap();
    let t = c.providers.twilio.as_mut().unwrap();
    t.api_base = emulator_url.to_string();
    t.account_sid = ACCOUNT_SID.into();
    t.gather_timeout_seconds = 2;
    for p in &mut c.policies {
        p.repeat = repeat;
        for s in &mut p.steps {
            s.ack_timeout_seconds = ack_timeout;
            // The voice tests test voice alone; the SMS tests turn it on.
            s.sms_fallback = false;
        }
    }
    c.engine.lease_ms = 2000;
    c.engine.poll_ms = 100;
    c.validate("hospital.toml").unwrap();
    c
}

pub async fn hospital(a: Persona, b: Persona, ack_timeout: f64, repeat: u32) -> Hospital {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    start_on(db, a, b, ack_timeout, repeat).await
}

pub const SEIZURE_INSERT: &str = "INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title, description)
VALUES ('P-DHE-001', (SELECT room_id FROM rooms WHERE room_name = 'Room 2' LIMIT 1),
        'critical', 'active', 'seizure_detected', 'Seizure Activity Detected', 'Immediate response required')";

pub async fn await_alert_status(db: &TestDb, status: &str, timeout: Duration) {
    await_true(db, &format!("the alert to be {status}"), timeout, &format!("SELECT count(*) = 1 FROM wardcall.alerts WHERE status = '{status}'")).await;
}

pub fn calls_to(h: &Hospital, number: &str) -> usize {
    h.emulator.calls().iter().filter(|c| c.to == number).count()
}

pub async fn scenario_end_to_end_no_answer_then_backup_acknowledges() {
    let h = hospital(Persona::NoAnswer, Persona::Answer { ring_ms: 200, think_ms: 200, digits: "1".into() }, 8.0, 2).await;
    let mut events = h.emulator.subscribe();
    h.db.exec(SEIZURE_INSERT).await;
    let t0 = std::time::Instant::now();
    let first = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("a call").unwrap() {
            EmulatorEvent::CallCreated { to, received_at, .. } => break (to, received_at),
            _ => continue,
        }
    };
    assert_eq!(first.0, NURSE_A, "the first step's nurse is called first");
    eprintln!("commit → call request: {:?}", first.1.saturating_duration_since(t0));
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(30)).await;
    // What the nurse heard.
    let calls = h.emulator.calls();
    let b = calls.iter().find(|c| c.to == NURSE_B).expect("the backup was called");
    assert_eq!(b.digits_pressed, "1");
    let spoken = b.spoken.join(" ");
    assert!(
        spoken.contains("Critical alert at Haven Hospital. Room 2, patient Dana Vale. Seizure Activity Detected. Please respond immediately. Press 1 to acknowledge this alert."),
        "{spoken}"
    );
    // Written back into the hospital's own row.
    let (status, ack_at, ack_by, meta): (String, Option<String>, Option<String>, Value) =
        sqlx::query_as("SELECT status, acknowledged_at::text, acknowledged_by, metadata FROM alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(status, "acknowledged");
    assert!(ack_at.is_some());
    assert_eq!(ack_by.as_deref(), Some("nurse_phone"));
    let call = &meta["call"];
    assert_eq!(call["phone_number"], NURSE_B);
    assert_eq!(call["call_status"], "answered");
    assert!(call["call_id"].as_str().unwrap().starts_with("CA"));
    assert!(call["message"].as_str().unwrap().starts_with("Critical alert at Haven Hospital. Room 2"));
    assert!(call["initiated_at"].as_str().unwrap().ends_with('Z'));
    assert!(call["answered_at"].as_str().unwrap().ends_with('Z'));
    // wardcall's own records.
    let (acked_by,): (String,) = sqlx::query_as("SELECT acknowledged_by FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(acked_by, "nurse-blake");
    assert_eq!(calls_to(&h, NURSE_A), 1, "no second call to the nurse who did not answer");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'alert.acknowledged'").await, 1);
    await_true(&h.db, "the run to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    // Progress callbacks (initiated, ringing, in-progress) are recorded but
    // do not wake the run; the final ones (nurse A's no-answer) do.
    let progress = h.db.scalar_i64("SELECT count(*) FROM wardcall.signals WHERE payload->>'status' IN ('initiated','ringing','in-progress')").await;
    assert_eq!(progress, 0, "progress callbacks signalled the run");
    assert!(h.db.scalar_i64("SELECT count(*) FROM wardcall.signals WHERE payload->>'status' = 'no-answer'").await >= 1);
    assert!(h.db.scalar_i64("SELECT count(*) FROM wardcall.notification_attempts WHERE ringing_at IS NOT NULL").await >= 2, "progress is still recorded");
    h.stop().await;
}

async fn escalation_delay(a: Persona) -> (Hospital, Duration) {
    // A 30 s timeout: escalation must not wait it out.
    let h = hospital(a, Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() }, 30.0, 1).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
    let calls = h.emulator.calls();
    let a = calls.iter().find(|c| c.to == NURSE_A).unwrap();
    let b = calls.iter().find(|c| c.to == NURSE_B).unwrap();
    let delay = b.received_at.duration_since(a.received_at);
    (h, delay)
}

pub async fn busy_escalates_without_waiting_out_the_timeout() {
    let (h, delay) = escalation_delay(Persona::Busy).await;
    assert!(delay < Duration::from_secs(5), "escalated after {delay:?}");
    assert_eq!(
        h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'alert.step_ended' AND detail->>'reason' = 'all_calls_failed'").await,
        1
    );
    h.stop().await;
}

pub async fn failed_call_escalates_without_waiting_out_the_timeout() {
    let (h, delay) = escalation_delay(Persona::Fail).await;
    assert!(delay < Duration::from_secs(5), "escalated after {delay:?}");
    h.stop().await;
}

/// The provider refuses the first tier's only call at once (Twilio 400 /
/// 21215, the account may not call that number): no callback will ever come,
/// so the step must decide right after the send, not wait out its 30 s.
pub async fn refused_call_escalates_without_waiting_out_the_timeout() {
    let h = hospital(Persona::NoAnswer, Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() }, 30.0, 1).await;
    h.emulator.set_geo_permission_denied(NURSE_A, true);
    let inserted = std::time::Instant::now();
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
    let calls = h.emulator.calls();
    assert!(calls.iter().all(|c| c.to != NURSE_A), "the refused call never existed");
    let b = calls.iter().find(|c| c.to == NURSE_B).expect("the backup was called");
    let delay = b.received_at.duration_since(inserted);
    assert!(delay < Duration::from_secs(5), "escalated after {delay:?}");
    assert_eq!(h.db.scalar_i64(&format!("SELECT count(*) FROM wardcall.notification_attempts WHERE destination = '{NURSE_A}' AND status = 'failed'")).await, 1);
    h.stop().await;
}

pub async fn voicemail_is_not_an_acknowledgement() {
    let (h, delay) = escalation_delay(Persona::Machine { ring_ms: 100, hangup_ms: 20_000 }).await;
    assert!(delay < Duration::from_secs(5), "escalated after {delay:?}");
    let (answered_by, acked): (Option<String>, bool) =
        sqlx::query_as("SELECT answered_by, acknowledged_at IS NOT NULL FROM wardcall.notification_attempts WHERE destination = $1")
            .bind(NURSE_A)
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(answered_by.as_deref(), Some("machine_start"));
    assert!(!acked);
    let acked_by: String = sqlx::query_scalar("SELECT acknowledged_by FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(acked_by, "nurse-blake");
    // The voicemail call was hung up through the API, not left running 20 s.
    await_true(
        &h.db,
        "the voicemail call to end",
        Duration::from_secs(10),
        &format!("SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE destination = '{NURSE_A}' AND ended_at IS NOT NULL"),
    )
    .await;
    h.stop().await;
}

pub async fn digit_two_escalates_at_once() {
    let (h, delay) = escalation_delay(Persona::Answer { ring_ms: 100, think_ms: 100, digits: "2".into() }).await;
    assert!(delay < Duration::from_secs(5), "escalated after {delay:?}");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'alert.step_ended' AND detail->>'reason' = 'declined'").await, 1);
    h.stop().await;
}

pub async fn silent_answer_is_not_an_acknowledgement_and_policy_repeats() {
    // Both answer but never press a key; two cycles; then unacknowledged.
    let h = hospital(Persona::SilentHuman { ring_ms: 50 }, Persona::SilentHuman { ring_ms: 50 }, 4.0, 2).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "unacknowledged", Duration::from_secs(40)).await;
    assert_eq!(calls_to(&h, NURSE_A), 2, "called once per cycle");
    assert_eq!(calls_to(&h, NURSE_B), 2);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'alert.unacknowledged'").await, 1);
    let status: String = sqlx::query_scalar("SELECT status FROM alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(status, "active", "no acknowledgement was written back");
    h.stop().await;
}

/// Posts a webhook as Twilio would, signed with `token`.
pub async fn post_webhook(h: &Hospital, path_and_query: &str, params: &[(&str, &str)], token: Option<&str>) -> reqwest::StatusCode {
    let url = format!("http://{}{}", h.app.http_addr.unwrap(), path_and_query);
    let owned: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut req =
        reqwest::Client::new().post(&url).header("content-type", "application/x-www-form-urlencoded").body(serde_urlencoded::to_string(&owned).unwrap());
    if let Some(token) = token {
        req = req.header("X-Twilio-Signature", compute_signature(token, &url, &owned));
    }
    req.send().await.unwrap().status()
}

async fn snapshot(db: &TestDb) -> (Value, Value, i64) {
    let alerts: Value =
        sqlx::query_scalar("SELECT coalesce(jsonb_agg(to_jsonb(a) ORDER BY id), '[]') FROM wardcall.alerts a").fetch_one(&db.pool).await.unwrap();
    let attempts: Value = sqlx::query_scalar("SELECT coalesce(jsonb_agg(to_jsonb(n) - 'updated_at' ORDER BY id), '[]') FROM wardcall.notification_attempts n")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let audit = db.scalar_i64("SELECT count(*) FROM wardcall.audit_log").await;
    (alerts, attempts, audit)
}

pub async fn late_and_repeated_callbacks_change_nothing() {
    let h = hospital(Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() }, Persona::NoAnswer, 10.0, 1).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
    await_true(&h.db, "the call to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE status = 'completed'")
        .await;
    await_true(&h.db, "the run to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    let (attempt, sid): (uuid::Uuid, String) =
        sqlx::query_as("SELECT id, provider_id FROM wardcall.notification_attempts").fetch_one(&h.db.pool).await.unwrap();
    let (alerts_before, attempts_before, _) = snapshot(&h.db).await;
    let row_before: Value = sqlx::query_scalar("SELECT to_jsonb(a) FROM alerts a").fetch_one(&h.db.pool).await.unwrap();
    let base = [("CallSid", sid.as_str()), ("AccountSid", ACCOUNT_SID), ("From", "+13855550100"), ("To", NURSE_A)];
    for status in ["ringing", "initiated", "in-progress", "completed", "no-answer"] {
        let mut p = base.to_vec();
        p.push(("CallStatus", status));
        assert_eq!(post_webhook(&h, &format!("/webhooks/twilio/status?attempt={attempt}"), &p, Some(AUTH_TOKEN)).await, 200);
    }
    let mut p = base.to_vec();
    p.push(("Digits", "1"));
    assert_eq!(post_webhook(&h, &format!("/webhooks/twilio/gather?attempt={attempt}"), &p, Some(AUTH_TOKEN)).await, 200);
    let mut p = base.to_vec();
    p.push(("AnsweredBy", "machine_start"));
    assert_eq!(post_webhook(&h, &format!("/webhooks/twilio/amd?attempt={attempt}"), &p, Some(AUTH_TOKEN)).await, 200);
    let (alerts_after, attempts_after, _) = snapshot(&h.db).await;
    assert_eq!(alerts_before, alerts_after, "the alert did not move");
    assert_eq!(attempts_before[0], attempts_after[0], "the attempt did not change at all (no digits appended)");
    assert_eq!(attempts_before[0]["status"], attempts_after[0]["status"], "the attempt did not move backwards");
    assert_eq!(attempts_before[0]["answered_by"], attempts_after[0]["answered_by"]);
    let row_after: Value = sqlx::query_scalar("SELECT to_jsonb(a) FROM alerts a").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(row_before, row_after, "the hospital's row did not change");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'alert.acknowledged'").await, 1);
    h.stop().await;
}

pub async fn forged_or_missing_signature_gets_403_and_changes_nothing() {
    let h = hospital(Persona::NoAnswer, Persona::NoAnswer, 30.0, 1).await;
    h.db.exec(SEIZURE_INSERT).await;
    // Ringing: the no-answer persona now sends nothing for 18 s (the ring timeout).
    // Quiet state: the call is ringing and the run has consumed every signal and waits again.
    await_true(
        &h.db,
        "a ringing call and a waiting run",
        Duration::from_secs(10),
        "SELECT (SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE status = 'ringing')
            AND (SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'waiting')
            AND (SELECT count(*) = 0 FROM wardcall.signals WHERE consumed_at IS NULL)",
    )
    .await;
    let (attempt, sid): (uuid::Uuid, String) =
        sqlx::query_as("SELECT id, provider_id FROM wardcall.notification_attempts").fetch_one(&h.db.pool).await.unwrap();
    let (alerts_before, _, audit_before) = snapshot(&h.db).await;
    let p = [("CallSid", sid.as_str()), ("AccountSid", ACCOUNT_SID), ("Digits", "1")];
    let gather = format!("/webhooks/twilio/gather?attempt={attempt}");
    assert_eq!(post_webhook(&h, &gather, &p, None).await, 403, "missing signature");
    assert_eq!(post_webhook(&h, &gather, &p, Some("wrong-token")).await, 403, "forged signature");
    // A valid signature over other parameters than those sent.
    let url = format!("http://{}{}", h.app.http_addr.unwrap(), gather);
    let signed_for: Vec<(String, String)> = vec![("CallSid".into(), sid.clone()), ("Digits".into(), "2".into())];
    let sent: Vec<(String, String)> = vec![("CallSid".into(), sid.clone()), ("Digits".into(), "1".into())];
    let status = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("X-Twilio-Signature", compute_signature(AUTH_TOKEN, &url, &signed_for))
        .body(serde_urlencoded::to_string(&sent).unwrap())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 403, "tampered parameters");
    let status_url = format!("/webhooks/twilio/status?attempt={attempt}");
    assert_eq!(post_webhook(&h, &status_url, &[("CallSid", sid.as_str()), ("CallStatus", "completed")], Some("nope")).await, 403);
    let (alerts_after, _, audit_after) = snapshot(&h.db).await;
    assert_eq!(alerts_before, alerts_after);
    assert_eq!(audit_before, audit_after, "nothing was recorded");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.alerts WHERE status = 'open'").await, 1);
    h.stop().await;
}

/// Builds the state a crashed engine leaves: a run in step `start` whose lease
/// lapsed, its open alert, and one attempt for nurse A as given.
async fn crashed_state(db: &TestDb, attempt_status: &str, provider_id: Option<&str>) -> uuid::Uuid {
    db.exec(SEIZURE_INSERT).await; // (no engine yet: the outbox keeps it)
    let run: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.runs (workflow, event_id, event, input, state, step, status, lease_owner, fencing_token, due_at)
         SELECT 'critical-alert-call', o.id, o.event, o.payload,
                jsonb_build_object('message', 'Critical alert at Haven Hospital. Room 2, patient Dana Vale.', 'cycle', 0, 'step_index', 0),
                'start', 'running', 'crashed-engine', 1, clock_timestamp() - interval '1 second'
           FROM wardcall.outbox o RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    db.exec("UPDATE wardcall.outbox SET processed_at = clock_timestamp(), processed_by = 'crashed-engine'").await;
    let alert: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.alerts (run_id, workflow, policy, message, status)
         VALUES ($1, 'critical-alert-call', 'critical-care', 'Critical alert at Haven Hospital. Room 2, patient Dana Vale.', 'open') RETURNING id",
    )
    .bind(run)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO wardcall.notification_attempts (alert_id, run_id, cycle, step_index, person_id, channel, destination, provider, provider_id, status, fencing_token, requested_at)
         VALUES ($1, $2, 0, 0, 'nurse-avery', 'voice', $3, 'twilio', $4, $5, 1, CASE WHEN $4::text IS NOT NULL THEN clock_timestamp() END)",
    )
    .bind(alert)
    .bind(run)
    .bind(NURSE_A)
    .bind(provider_id)
    .bind(attempt_status)
    .execute(&db.pool)
    .await
    .unwrap();
    run
}

pub async fn start_on(db: TestDb, a: Persona, b: Persona, ack_timeout: f64, repeat: u32) -> Hospital {
    start_with(db, a, b, |cfg| *cfg = hospital_config(&cfg.providers.twilio.as_ref().unwrap().api_base, ack_timeout, repeat)).await
}

/// Starts the emulator (nurse A and B with these personas, everyone else not
/// answering) and the hospital app on `db`; `configure` gets the hospital
/// config pointed at the emulator and may change it (it is validated after).
pub async fn start_with(db: TestDb, a: Persona, b: Persona, configure: impl FnOnce(&mut Config)) -> Hospital {
    let mut personas = HashMap::new();
    personas.insert(NURSE_A.to_string(), a);
    personas.insert(NURSE_B.to_string(), b);
    let emulator = TwilioEmulator::start(
        EmulatorConfig { account_sid: ACCOUNT_SID.into(), auth_token: AUTH_TOKEN.into(), personas, default_persona: Persona::NoAnswer },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let mut cfg = hospital_config(&emulator.base_url(), 30.0, 1);
    configure(&mut cfg);
    cfg.validate("hospital.toml").unwrap();
    let app = start_app(&db, std::sync::Arc::new(cfg)).await;
    Hospital { db, app, emulator }
}

pub async fn hospital_db() -> TestDb {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let cfg = hospital_config("http://127.0.0.1:9", 30.0, 1);
    wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap();
    db
}

pub async fn recall_rule_unknown_outcome_calls_again() {
    let db = hospital_db().await;
    crashed_state(&db, "intent", None).await;
    let h = start_on(db, Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() }, Persona::NoAnswer, 10.0, 1).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    assert_eq!(calls_to(&h, NURSE_A), 1, "the unconfirmed call was placed again");
    let statuses: Vec<(i32, String)> =
        sqlx::query_as("SELECT generation, status FROM wardcall.notification_attempts ORDER BY generation").fetch_all(&h.db.pool).await.unwrap();
    assert_eq!(statuses[0], (0, "unknown".to_string()));
    assert_eq!(statuses[1].0, 1);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'attempt.outcome_unknown'").await, 1);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.lease_taken_over'").await, 1);
    h.stop().await;
}

pub async fn recall_rule_confirmed_call_is_not_repeated() {
    let db = hospital_db().await;
    crashed_state(&db, "requested", Some("CA00000000000000000000000000000001")).await;
    // The confirmed call's callbacks went to the dead engine; the step times out and escalates.
    let h = start_on(
        db,
        Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() },
        Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() },
        2.0,
        1,
    )
    .await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    assert_eq!(calls_to(&h, NURSE_A), 0, "a confirmed call is never placed twice");
    assert_eq!(calls_to(&h, NURSE_B), 1, "the alert was not lost: the backup was called");
    h.stop().await;
}

pub async fn recall_rule_call_named_by_callbacks_is_not_repeated() {
    let db = hospital_db().await;
    // The create response was lost, but a callback named the call (CallSid recorded, ringing).
    crashed_state(&db, "ringing", Some("CA00000000000000000000000000000002")).await;
    let h = start_on(db, Persona::NoAnswer, Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() }, 2.0, 1).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    assert_eq!(calls_to(&h, NURSE_A), 0);
    assert_eq!(calls_to(&h, NURSE_B), 1);
    h.stop().await;
}

pub async fn special_characters_still_produce_a_valid_call() {
    let h = hospital(Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() }, Persona::NoAnswer, 10.0, 1).await;
    let title = "Zoë <Room 2> & \"ICU\" O'Brien ]]> — Ünïcødé 发作";
    sqlx::query(
        "INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title)
         VALUES ('P-DHE-001', (SELECT room_id FROM rooms WHERE room_name = 'Room 2'), 'critical', 'active', 'fall_detected', $1)",
    )
    .bind(title)
    .execute(&h.db.pool)
    .await
    .unwrap();
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
    let call = h.emulator.calls().into_iter().next().unwrap();
    let spoken = call.spoken.join(" ");
    assert!(spoken.contains(title), "the text was read exactly: {spoken}");
    h.stop().await;
}

pub async fn non_e164_number_is_refused_at_config_load() {
    let mut text = wardcall::devtools::demo::HOSPITAL_CONFIG.replace("+13855550102", "385-555-0102");
    let e = Config::parse(&text, "hospital.toml").unwrap().validate("hospital.toml").unwrap_err().to_string();
    assert!(e.contains("hospital.toml") && e.contains("people[1].phone") && e.contains("E.164"), "{e}");
    assert!(!e.contains("385-555-0102"), "the number itself is not echoed: {e}");
    text = wardcall::devtools::demo::HOSPITAL_CONFIG.replace("from = \"+13855550100\"", "from = \"0044 20 7946 0000\"");
    let e = Config::parse(&text, "hospital.toml").unwrap().validate("hospital.toml").unwrap_err().to_string();
    assert!(e.contains("providers.twilio.from"), "{e}");
}

pub async fn call_log_answers_the_monitoring_questions() {
    let h = hospital(Persona::NoAnswer, Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() }, 8.0, 1).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(30)).await;
    let per_hour =
        h.db.scalar_i64(
            "SELECT sum(n)::bigint FROM (SELECT date_trunc('hour', attempted_at) AS hour, count(*) AS n FROM wardcall.call_log
              WHERE source_row->>'severity' = 'critical' AND attempted_at > now() - interval '24 hours' GROUP BY 1) t",
        )
        .await;
    assert_eq!(per_hour, 2);
    let rate: f64 = sqlx::query_scalar("SELECT avg(answered::int)::float8 FROM wardcall.call_log WHERE attempted_at > now() - interval '7 days'")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert!((rate - 0.5).abs() < 1e-9, "answer rate {rate}");
    h.stop().await;
}

pub async fn provider_outage_never_escalates_or_gives_up() {
    // Twilio unreachable (a closed port): no call can be placed. The alert must
    // stay open and keep being retried, never escalate past the nurse nor be
    // marked unacknowledged, as it would if outages counted as unanswered calls.
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut cfg = hospital_config(&dead_url, 1.0, 1);
    for w in &mut cfg.workflows {
        w.retry_base_ms = 100;
    }
    let app = start_app(&db, std::sync::Arc::new(cfg)).await;
    db.exec(SEIZURE_INSERT).await;
    // The first round fails to create; the next ones cannot ask Twilio whether
    // that call exists (the re-call rule's reconciliation) and retry too.
    await_true(&db, "three failed rounds", Duration::from_secs(20), "SELECT count(*) >= 3 FROM wardcall.audit_log WHERE action = 'run.retry_scheduled'").await;
    assert!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'attempt.provider_error'").await >= 1);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.alerts WHERE status = 'open'").await, 1);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action IN ('alert.step_ended','alert.unacknowledged','run.failed')").await, 0);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.notification_attempts WHERE person_id <> 'nurse-avery'").await, 0, "nobody else was tried");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.runs WHERE status IN ('pending','running')").await, 1, "the run keeps retrying");
    app.stop(Duration::from_secs(2)).await;
}

pub async fn late_press_of_one_acknowledges_an_unacknowledged_alert() {
    let h = hospital(Persona::SilentHuman { ring_ms: 50 }, Persona::SilentHuman { ring_ms: 50 }, 1.0, 1).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "unacknowledged", Duration::from_secs(60)).await;
    let (attempt, sid): (uuid::Uuid, String) =
        sqlx::query_as("SELECT id, provider_id FROM wardcall.notification_attempts WHERE person_id = 'nurse-avery'").fetch_one(&h.db.pool).await.unwrap();
    let p = [("CallSid", sid.as_str()), ("AccountSid", ACCOUNT_SID), ("Digits", "1")];
    assert_eq!(post_webhook(&h, &format!("/webhooks/twilio/gather?attempt={attempt}"), &p, Some(AUTH_TOKEN)).await, 200);
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(5)).await;
    let (status, by): (String, Option<String>) = sqlx::query_as("SELECT status, acknowledged_by FROM alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!((status.as_str(), by.as_deref()), ("acknowledged", Some("nurse_phone")), "written back");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'alert.acknowledged' AND from_state = 'unacknowledged'").await, 1);
    h.stop().await;
}

pub async fn write_back_does_not_retrigger_an_update_source() {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let mut personas = HashMap::new();
    personas.insert(NURSE_A.to_string(), Persona::Answer { ring_ms: 50, think_ms: 50, digits: "1".into() });
    let emulator = TwilioEmulator::start(
        EmulatorConfig { account_sid: ACCOUNT_SID.into(), auth_token: AUTH_TOKEN.into(), personas, default_persona: Persona::NoAnswer },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let mut cfg = hospital_config(&emulator.base_url(), 10.0, 1);
    cfg.sources[0].operations.push(wardcall::config::Operation::Update);
    let app = start_app(&db, std::sync::Arc::new(cfg)).await;
    db.exec(SEIZURE_INSERT).await;
    await_true(&db, "the acknowledgement written back", Duration::from_secs(20), "SELECT count(*) = 1 FROM alerts WHERE status = 'acknowledged'").await;
    await_true(&db, "the run to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 1, "write-backs were not captured as new alerts");
    // The team's own UPDATE is still captured.
    db.exec("UPDATE alerts SET status = 'active', metadata = '{}'").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 2);
    app.stop(Duration::from_secs(2)).await;
    emulator.shutdown().await;
}

/// A team's `DEFERRABLE INITIALLY DEFERRED` trigger that a write-back fires
/// runs at the send's commit, after the write-back statement: the row it
/// writes into a captured table is captured (the send's record once left
/// `wardcall.write_back` on until the commit, and such rows were dropped).
/// What the write-back statement writes, with its immediate triggers, is
/// not captured, so that no write-back can loop into a page.
pub async fn a_deferred_team_trigger_fired_by_a_write_back_is_captured() {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    db.exec(
        "CREATE TABLE followups (id serial PRIMARY KEY, alert_id uuid NOT NULL, via text NOT NULL);
         CREATE FUNCTION note_call_placed() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO followups (alert_id, via) VALUES (NEW.id, TG_ARGV[0]); RETURN NULL; END $$;
         CREATE TRIGGER call_placed_now AFTER UPDATE ON alerts FOR EACH ROW
           WHEN (OLD.metadata->'call' IS NULL AND NEW.metadata->'call' IS NOT NULL) EXECUTE FUNCTION note_call_placed('immediate');
         CREATE CONSTRAINT TRIGGER call_placed_at_commit AFTER UPDATE ON alerts DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
           WHEN (OLD.metadata->'call' IS NULL AND NEW.metadata->'call' IS NOT NULL) EXECUTE FUNCTION note_call_placed('deferred');",
    )
    .await;
    let followups = Config::parse(
        "[[sources]]\nname = \"followups\"\ntable = \"followups\"\nevent = \"followup.created\"\n\n[[workflows]]\nname = \"followup\"\nevent = \"followup.created\"\nkind = \"script\"\n",
        "followups.toml",
    )
    .unwrap();
    let h = start_with(db, Persona::Answer { ring_ms: 50, think_ms: 50, digits: "1".into() }, Persona::NoAnswer, |cfg| {
        cfg.sources[0].operations.push(wardcall::config::Operation::Update);
        cfg.sources.extend(followups.sources);
        cfg.workflows.extend(followups.workflows);
    })
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    await_true(&h.db, "the acknowledgement written back", Duration::from_secs(20), "SELECT count(*) = 1 FROM alerts WHERE status = 'acknowledged'").await;
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM followups").await, 2, "the team's triggers ran once each");
    await_true(
        &h.db,
        "the deferred trigger's follow-up captured",
        Duration::from_secs(10),
        "SELECT coalesce(array_agg(payload->>'via') = '{deferred}', false) FROM wardcall.outbox WHERE source = 'followups'",
    )
    .await;
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.outbox WHERE source <> 'followups'").await, 1, "the write-backs' own rows were not captured");
    h.stop().await;
}

/// `write_back` (the send's record, a hook's write-back): the team's
/// statement gets the subject's details as `$2`; a failing one is rolled back
/// to its savepoint and audited while the state change before it commits; and
/// `wardcall.write_back` and the write-back's timeouts are back to what they
/// were as soon as it returns, before the commit (whose deferred triggers
/// must not run with capture off).
pub async fn write_back_keeps_the_change_and_puts_its_settings_back() {
    use wardcall::workflows::team_sql::{write_back, WriteBackSubject};
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE wb_seen (status text NOT NULL);
         INSERT INTO wardcall.runs (id, workflow, event, input, step, status)
              VALUES ('00000000-0000-0000-0000-0000000000a2', 'w', 'e', '{}', 'call', 'completed');
         INSERT INTO wardcall.alerts (id, run_id, workflow, policy, message, status)
              VALUES ('00000000-0000-0000-0000-0000000000b2', '00000000-0000-0000-0000-0000000000a2', 'w', 'p', 'm', 'open');",
    )
    .await;
    let alert = uuid::Uuid::parse_str("00000000-0000-0000-0000-0000000000b2").unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let settings = "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), coalesce(current_setting('wardcall.write_back', true), '')";
    let before: (String, String, String) = sqlx::query_as(settings).fetch_one(&mut *conn).await.unwrap();
    assert_ne!(before.2, "on");
    for (sql, message) in [("INSERT INTO wb_seen VALUES ($2->>'alert_status')", "first"), ("INSERT INTO wb_seen VALUES (NULL)", "second")] {
        sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
        sqlx::query("UPDATE wardcall.alerts SET message = $1 WHERE id = $2").bind(message).bind(alert).execute(&mut *conn).await.unwrap();
        write_back(&mut conn, Some(sql), "on_call_placed", &serde_json::json!({}), WriteBackSubject::Alert(alert), "test")
            .await
            .expect("a failing write-back is kept out of the transaction");
        let inside: (String, String, String) = sqlx::query_as(settings).fetch_one(&mut *conn).await.unwrap();
        assert_eq!((&inside.0, &inside.1), (&before.0, &before.1), "the write-back's timeouts are put back before the commit ({sql})");
        assert_ne!(inside.2, "on", "wardcall.write_back is off again before the commit ({sql})");
        sqlx::query("COMMIT").execute(&mut *conn).await.unwrap();
        let kept: String = sqlx::query_scalar("SELECT message FROM wardcall.alerts WHERE id = $1").bind(alert).fetch_one(&db.pool).await.unwrap();
        assert_eq!(kept, message, "the state change before the write-back committed");
    }
    let seen: Vec<String> = sqlx::query_scalar("SELECT status FROM wb_seen").fetch_all(&db.pool).await.unwrap();
    assert_eq!(seen, vec!["open".to_string()], "the first statement saw the alert's details as $2; the failing one left nothing");
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM wardcall.audit_log WHERE action = 'write_back.failed' AND entity_id = $1")
        .bind(alert.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(failed, 1, "the failing write-back is audited");
}

/// `alerts::fence_and_open` (fence, open and lock in one statement): a stale
/// fencing token opens nothing; the holder opens the alert once, audited
/// once; a later tier of the same execution finds and locks the same alert.
pub async fn fence_and_open_opens_once_and_never_without_the_lease() {
    use wardcall::store::alerts::fence_and_open;
    let db = TestDb::new().await;
    let run = uuid::Uuid::parse_str("00000000-0000-0000-0000-0000000000a3").unwrap();
    sqlx::query("INSERT INTO wardcall.runs (id, workflow, event, input, step, status, fencing_token) VALUES ($1, 'w', 'e', '{}', 'call', 'running', 7)")
        .bind(run)
        .execute(&db.pool)
        .await
        .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let stale = fence_and_open(&mut conn, run, 6, "w", "p", "m", "test").await.unwrap();
    assert!(stale.is_none(), "a stale fencing token opens nothing");
    let alerts: i64 = sqlx::query_scalar("SELECT count(*) FROM wardcall.alerts WHERE run_id = $1").bind(run).fetch_one(&db.pool).await.unwrap();
    assert_eq!(alerts, 0, "no alert without the lease");
    let first = fence_and_open(&mut conn, run, 7, "w", "p", "m", "test").await.unwrap().expect("the holder opens the alert");
    assert!(first.opened_now && first.status == "open");
    let again = fence_and_open(&mut conn, run, 7, "w", "p", "m", "test").await.unwrap().expect("the holder finds the alert");
    assert!(!again.opened_now, "the second call finds the alert it opened");
    assert_eq!(again.id, first.id);
    assert_eq!(again.status, "open");
    let opened: i64 = sqlx::query_scalar("SELECT count(*) FROM wardcall.audit_log WHERE action = 'alert.opened' AND entity_id = $1")
        .bind(first.id.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(opened, 1, "opened and audited once");
    sqlx::query("UPDATE wardcall.runs SET status = 'cancelled' WHERE id = $1").bind(run).execute(&db.pool).await.unwrap();
    assert!(fence_and_open(&mut conn, run, 7, "w", "p", "m", "test").await.unwrap().is_none(), "a run no longer running is not fenced");
}

/// `alerts::open_with_intents` (a run's first tier in one statement): a stale
/// fencing token writes nothing; the holder gets the alert and one intent per
/// recipient, audited alert first, then the intents in order; a run that
/// already has its alert gets nothing more (the general path decides).
pub async fn open_with_intents_writes_all_or_nothing() {
    use wardcall::store::alerts::{open_with_intents, OpenedWithIntents};
    let db = TestDb::new().await;
    let run = uuid::Uuid::parse_str("00000000-0000-0000-0000-0000000000a4").unwrap();
    sqlx::query("INSERT INTO wardcall.runs (id, workflow, event, input, step, status, fencing_token) VALUES ($1, 'w', 'e', '{}', 'call', 'running', 3)")
        .bind(run)
        .execute(&db.pool)
        .await
        .unwrap();
    let people = [("nurse-a", "A", NURSE_A), ("nurse-b", "B", NURSE_B)];
    let open = |token: i64| {
        let tier = first_tier(run, token, &people);
        let pool = db.pool.clone();
        async move { open_with_intents(&mut pool.acquire().await.unwrap(), &tier).await }
    };
    assert_eq!(open(2).await.unwrap(), OpenedWithIntents::LeaseLost);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.alerts").await + db.scalar_i64("SELECT count(*) FROM wardcall.notification_attempts").await, 0);
    let OpenedWithIntents::Opened { alert, intents } = open(3).await.unwrap() else { panic!("the holder opens the alert") };
    assert_eq!(intents.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), vec!["nurse-a", "nurse-b"]);
    let rows: Vec<(uuid::Uuid, String, String, i32, String, Option<uuid::Uuid>)> =
        sqlx::query_as("SELECT id, person_id, status, generation, destination, alert_id FROM wardcall.notification_attempts ORDER BY person_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    for ((id, person, status, generation, destination, alert_id), (want_person, want_id)) in rows.iter().zip(&intents) {
        assert_eq!((person, id), (want_person, want_id));
        assert_eq!((status.as_str(), *generation, *alert_id), ("intent", 0, Some(alert)));
        assert_eq!(destination, if person == "nurse-a" { NURSE_A } else { NURSE_B });
    }
    let audit: Vec<String> = sqlx::query_scalar("SELECT action FROM wardcall.audit_log ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert_eq!(audit, vec!["alert.opened", "attempt.intent", "attempt.intent"], "the alert's audit row comes first");
    let details: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT detail FROM wardcall.audit_log WHERE action = 'attempt.intent' ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert_eq!(details[0], serde_json::json!({"person_id": "nurse-a", "channel": "voice", "cycle": 0, "step_index": 0, "generation": 0}));
    assert!(!audit_text(&db).await.contains(NURSE_A), "no phone number in the audit log");
    assert_eq!(open(3).await.unwrap(), OpenedWithIntents::AlertExists, "a second first tier finds the alert");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.notification_attempts").await, 2, "and records nothing more");
}

/// A first tier of `run` under fencing `token` for `people` (id, name,
/// number), workflow `w`, policy `p`, message `m`, actor `test`.
pub fn first_tier(run: uuid::Uuid, token: i64, people: &[(&str, &str, &str)]) -> wardcall::store::alerts::FirstTier {
    wardcall::store::alerts::FirstTier {
        run,
        token,
        workflow: "w".into(),
        policy: "p".into(),
        message: "m".into(),
        position: (0, 0),
        channel: "voice".into(),
        provider: "twilio".into(),
        reconcile_after_ms: 60_000,
        recipients: people
            .iter()
            .map(|(id, name, number)| wardcall::store::alerts::FirstIntent {
                person_id: id.to_string(),
                person_name: name.to_string(),
                destination: number.to_string(),
            })
            .collect(),
        actor: "test".into(),
    }
}

/// `alerts::open_first_tiers`: one statement for the first tiers of many
/// runs, each run to itself. In one batch: a fenced run opens its alert and
/// intents; a run whose lease was lost (stale token), one whose row another
/// transaction holds (left out, `Busy`, without waiting) and one that already
/// has its alert write nothing, and do not stop the others. The audit rows
/// go run by run, each alert before its intents. A batch that fails (the
/// same person twice in one tier) writes nothing for any run.
pub async fn a_batch_of_first_tiers_keeps_each_run_to_itself() {
    use wardcall::store::alerts::{open_first_tiers, open_with_intents, OpenedWithIntents, RunLocks};
    let db = TestDb::new().await;
    let mut runs = Vec::new();
    for _ in 0..5 {
        let run: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO wardcall.runs (workflow, event, input, step, status, fencing_token) VALUES ('w', 'e', '{}', 'call', 'running', 3) RETURNING id",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        runs.push(run);
    }
    let (fenced, stale, held, opened_before, fenced_too) = (runs[0], runs[1], runs[2], runs[3], runs[4]);
    open_with_intents(&mut db.pool.acquire().await.unwrap(), &first_tier(opened_before, 3, &[("nurse-a", "A", NURSE_A)])).await.unwrap();
    db.exec("DELETE FROM wardcall.notification_attempts").await;
    let audit_mark = db.scalar_i64("SELECT coalesce(max(id), 0) FROM wardcall.audit_log").await;
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM wardcall.runs WHERE id = $1 FOR UPDATE").bind(held).execute(&mut *holder).await.unwrap();

    let batch = [
        first_tier(fenced, 3, &[("nurse-a", "A", NURSE_A), ("nurse-b", "B", NURSE_B)]),
        first_tier(stale, 2, &[("nurse-a", "A", NURSE_A)]),
        first_tier(held, 3, &[("nurse-a", "A", NURSE_A)]),
        first_tier(opened_before, 3, &[("nurse-b", "B", NURSE_B)]),
        first_tier(fenced_too, 3, &[("nurse-b", "B", NURSE_B)]),
    ];
    let started = std::time::Instant::now();
    let outcomes = open_first_tiers(&mut db.pool.acquire().await.unwrap(), &batch, RunLocks::SkipLocked).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "the batch did not wait for the held run");
    let opened = |o: &OpenedWithIntents| match o {
        OpenedWithIntents::Opened { intents, .. } => intents.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        other => panic!("not opened: {other:?}"),
    };
    assert_eq!(opened(&outcomes[0]), vec!["nurse-a", "nurse-b"]);
    assert_eq!(outcomes[1], OpenedWithIntents::LeaseLost);
    assert_eq!(outcomes[2], OpenedWithIntents::Busy);
    assert_eq!(outcomes[3], OpenedWithIntents::AlertExists);
    assert_eq!(opened(&outcomes[4]), vec!["nurse-b"]);
    let per_run: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT run_id, count(*) FROM wardcall.notification_attempts GROUP BY run_id ORDER BY count(*) DESC").fetch_all(&db.pool).await.unwrap();
    assert_eq!(per_run, vec![(fenced, 2), (fenced_too, 1)], "only the fenced runs without an alert recorded intents");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.alerts").await, 3);
    let audit: Vec<(String, String)> =
        sqlx::query_as("SELECT action, coalesce(detail->>'person_id', detail->>'run_id') FROM wardcall.audit_log WHERE id > $1 ORDER BY id")
            .bind(audit_mark)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let want = vec![
        ("alert.opened".to_string(), fenced.to_string()),
        ("attempt.intent".into(), "nurse-a".into()),
        ("attempt.intent".into(), "nurse-b".into()),
        ("alert.opened".into(), fenced_too.to_string()),
        ("attempt.intent".into(), "nurse-b".into()),
    ];
    assert_eq!(audit, want, "run by run, each alert before its intents");

    // A run twice in one batch: its second tier is left out.
    let twice: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, fencing_token) VALUES ('w', 'e', '{}', 'call', 'running', 3) RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let outcomes = open_first_tiers(
        &mut db.pool.acquire().await.unwrap(),
        &[first_tier(twice, 3, &[("nurse-b", "B", NURSE_B)]), first_tier(twice, 2, &[("nurse-a", "A", NURSE_A)])],
        RunLocks::SkipLocked,
    )
    .await
    .unwrap();
    assert_eq!(opened(&outcomes[0]), vec!["nurse-b"], "the holder's tier, with its own intents only");
    assert_eq!(outcomes[1], OpenedWithIntents::Busy, "the second tier of the same run is left out");
    assert_eq!(db.scalar_i64(&format!("SELECT count(*) FROM wardcall.notification_attempts WHERE run_id = '{twice}'")).await, 1);

    // The held run, opened alone once its row is free.
    holder.rollback().await.unwrap();
    assert!(matches!(open_with_intents(&mut db.pool.acquire().await.unwrap(), &batch[2]).await.unwrap(), OpenedWithIntents::Opened { .. }));

    // A batch that fails writes nothing for any run.
    let more: Vec<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, fencing_token) SELECT 'w', 'e', '{}', 'call', 'running', 3 FROM generate_series(1, 2) RETURNING id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let counts = "SELECT (SELECT count(*) FROM wardcall.alerts) * 1000 + (SELECT count(*) FROM wardcall.notification_attempts)";
    let before = db.scalar_i64(counts).await;
    let failing = [first_tier(more[0], 3, &[("nurse-a", "A", NURSE_A)]), first_tier(more[1], 3, &[("nurse-a", "A", NURSE_A), ("nurse-a", "A", NURSE_A)])];
    assert!(
        open_first_tiers(&mut db.pool.acquire().await.unwrap(), &failing, RunLocks::SkipLocked).await.is_err(),
        "the same person twice in one tier fails the batch"
    );
    assert_eq!(db.scalar_i64(counts).await, before, "nothing written");
}

async fn audit_text(db: &TestDb) -> String {
    sqlx::query_scalar::<_, String>("SELECT string_agg(detail::text, ' ') FROM wardcall.audit_log").fetch_one(&db.pool).await.unwrap()
}
