//! Fail towards a human (issue 7, DESIGN.md invariant 10): no alert silenced
//! by its content, a slow or refusing provider, a lost callback or a blocked
//! lookup; no second call where wardcall already knew the first; cancel hangs
//! up; the records say only what happened.

use crate::escalation::{await_alert_status, calls_to, hospital_config, Hospital, NURSE_A, NURSE_B, SEIZURE_INSERT};
use crate::harness::*;
use serde_json::Value;
use std::time::{Duration, Instant};
use wardcall::config::Config;
use wardcall::devtools::twilio_emulator::{EmulatorEvent, Persona};
use wardcall::providers::twilio::signature::compute_signature;
use wardcall::providers::twilio::twiml::{FALLBACK_MESSAGE, KEYPAD_INSTRUCTION};

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        fail_safe::long_or_escaped_message_still_rings_with_keypad_instruction,
        fail_safe::content_refusal_calls_the_same_person_with_the_fallback_message,
        fail_safe::slow_provider_is_reconciled_not_called_twice,
        fail_safe::failing_callsid_record_is_retried_not_called_again,
        fail_safe::cancel_hangs_up_and_runs_on_cancelled,
        fail_safe::call_placed_after_acknowledgement_is_ended,
        fail_safe::lost_callbacks_are_reconciled_from_the_provider,
        fail_safe::answered_by_on_status_callback_is_honoured,
        fail_safe::replayed_keypress_changes_nothing,
        fail_safe::keypress_is_recorded_when_another_attempt_holds_the_call_sid,
        fail_safe::audit_records_only_transitions_that_happened,
        fail_safe::blocked_lookup_times_out_and_the_call_goes_out,
        fail_safe::a_burst_of_blocked_lookups_holds_no_call_past_the_pools_wait,
        fail_safe::ambiguous_lookup_renders_without_a_value,
    ]
}

fn answers_and_presses(digits: &str) -> Persona {
    Persona::Answer { ring_ms: 100, think_ms: 100, digits: digits.into() }
}

/// The hospital with both nurses' personas and a config tweak.
async fn hospital_with(a: Persona, b: Persona, ack_timeout: f64, tweak: impl FnOnce(&mut Config)) -> Hospital {
    hospital_with_schema("", a, b, ack_timeout, tweak).await
}

/// As [`hospital_with`], with more of the team's schema created before start.
async fn hospital_with_schema(extra_schema: &str, a: Persona, b: Persona, ack_timeout: f64, tweak: impl FnOnce(&mut Config)) -> Hospital {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    if !extra_schema.is_empty() {
        db.exec(extra_schema).await;
    }
    crate::escalation::start_with(db, a, b, |cfg| {
        *cfg = hospital_config(&cfg.providers.twilio.as_ref().unwrap().api_base, ack_timeout, 1);
        for w in &mut cfg.workflows {
            w.retry_base_ms = 100;
        }
        tweak(cfg);
    })
    .await
}

async fn insert_titled(h: &Hospital, title: &str) {
    sqlx::query(
        "INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title)
         VALUES ('P-DHE-001', (SELECT room_id FROM rooms WHERE room_name = 'Room 2'), 'critical', 'active', 'seizure_detected', $1)",
    )
    .bind(title)
    .execute(&h.db.pool)
    .await
    .unwrap();
}

async fn attempt_of(db: &TestDb, person: &str) -> (uuid::Uuid, Option<String>) {
    sqlx::query_as("SELECT id, provider_id FROM wardcall.notification_attempts WHERE person_id = $1 ORDER BY generation DESC LIMIT 1")
        .bind(person)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// The final status of call `sid`, awaited on the emulator's events.
async fn await_call_ended(
    events: &mut tokio::sync::broadcast::Receiver<EmulatorEvent>,
    sid: &str,
    timeout: Duration,
) -> Result<String, tokio::time::error::Elapsed> {
    tokio::time::timeout(timeout, async {
        loop {
            if let Ok(EmulatorEvent::CallEnded { sid: s, final_status }) = events.recv().await {
                if s == sid {
                    return final_status;
                }
            }
        }
    })
    .await
}

/// Inserts the seizure alert and awaits the first nurse's call being answered;
/// returns her attempt and its CallSid.
async fn seizure_answered_by_first_nurse(h: &Hospital) -> (uuid::Uuid, String) {
    h.db.exec(SEIZURE_INSERT).await;
    await_true(&h.db, "the nurse to answer", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE status = 'in-progress'")
        .await;
    let (attempt, sid) = attempt_of(&h.db, "nurse-avery").await;
    (attempt, sid.expect("the answered call's CallSid is recorded"))
}

/// Posts a signed Twilio webhook, optionally with an idempotency token;
/// returns the status and body.
async fn webhook(h: &Hospital, path_and_query: &str, params: &[(&str, &str)], idempotency_token: Option<&str>) -> (u16, String) {
    let url = format!("http://{}{}", h.app.http_addr.unwrap(), path_and_query);
    let owned: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut req = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("X-Twilio-Signature", compute_signature(AUTH_TOKEN, &url, &owned))
        .body(serde_urlencoded::to_string(&owned).unwrap());
    if let Some(t) = idempotency_token {
        req = req.header("I-Twilio-Idempotency-Token", t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Item 1: a 3,950-character title, or 800 `&` (which escaping lengthens
/// five-fold), exceeded Twilio's 4,000-character inline TwiML: every call was
/// refused and the alert went unacknowledged with no phone ringing. Now the
/// message is shortened, keeps its start and the keypad instruction, and
/// control characters are not spoken.
pub async fn long_or_escaped_message_still_rings_with_keypad_instruction() {
    for title in ["x".repeat(3950), format!("Bell\u{7} \u{1b}[1m{}", "&".repeat(800))] {
        let h = hospital_with(answers_and_presses("1"), Persona::NoAnswer, 10.0, |_| {}).await;
        insert_titled(&h, &title).await;
        await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
        let calls = h.emulator.calls();
        assert_eq!(calls.len(), 1, "one call, to the first nurse");
        let twiml = calls[0].params.iter().find(|(k, _)| k == "Twiml").map(|(_, v)| v.clone()).unwrap();
        assert!(twiml.chars().count() <= 4000, "{} characters", twiml.chars().count());
        let spoken = calls[0].spoken.join(" ");
        assert!(spoken.starts_with("Critical alert at Haven Hospital. Room 2, patient Dana Vale."), "the start is kept: {}", &spoken[..80]);
        assert!(spoken.contains(KEYPAD_INSTRUCTION), "the keypad instruction is kept");
        assert!(!spoken.contains(['\u{7}', '\u{1b}', '\u{0}']), "no control characters are spoken");
        let acked_by: String = sqlx::query_scalar("SELECT acknowledged_by FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
        assert_eq!(acked_by, "nurse-avery");
        h.stop().await;
    }
}

/// Item 1: a provider that refuses the message for its content (a stricter
/// TwiML limit: 400 / 32018) does not make wardcall escalate past the nurse:
/// the same nurse is called at once with the short fallback message.
pub async fn content_refusal_calls_the_same_person_with_the_fallback_message() {
    let h = hospital_with(answers_and_presses("1"), answers_and_presses("1"), 10.0, |_| {}).await;
    h.emulator.set_twiml_limit(Some(900));
    insert_titled(&h, &"Seizure ".repeat(150)).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
    assert_eq!(calls_to(&h, NURSE_B), 0, "nobody was skipped");
    let calls = h.emulator.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].to, NURSE_A);
    assert_eq!(calls[0].spoken[0], FALLBACK_MESSAGE);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'attempt.content_refused'").await, 1);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.call_log").await, 1, "one call in the call log");
    h.stop().await;
}

/// Item 2: Twilio answers the create request after the client's timeout
/// (the call exists). The retry asks Twilio's call list first and adopts that
/// call instead of ringing the nurse again; the call log counts it once.
pub async fn slow_provider_is_reconciled_not_called_twice() {
    let h = hospital_with(Persona::NoAnswer, answers_and_presses("1"), 3.0, |c| {
        c.providers.twilio.as_mut().unwrap().request_timeout_seconds = 0.5;
    })
    .await;
    h.emulator.set_create_response_delay(Duration::from_millis(2000));
    // Its callbacks are lost too, so only the call list can tell.
    h.emulator.set_status_callbacks_lost(NURSE_A, true);
    h.db.exec(SEIZURE_INSERT).await;
    await_true(
        &h.db,
        "the ambiguous call to be reconciled",
        Duration::from_secs(20),
        "SELECT count(*) = 1 FROM wardcall.audit_log WHERE action = 'attempt.reconciled'",
    )
    .await;
    h.emulator.set_create_response_delay(Duration::ZERO);
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(30)).await;
    assert_eq!(calls_to(&h, NURSE_A), 1, "the nurse was called once, not again after the timeout");
    let (_, sid) = attempt_of(&h.db, "nurse-avery").await;
    let placed = h.emulator.calls().into_iter().find(|c| c.to == NURSE_A).unwrap();
    assert_eq!(sid.as_deref(), Some(placed.sid.as_str()), "the attempt holds the call Twilio created");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.call_log WHERE person_id = 'nurse-avery'").await, 1);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.call_log").await, h.emulator.calls().len() as i64, "the call log matches the provider");
    h.stop().await;
}

/// Item 2: recording the CallSid fails a few times (as under a statement
/// timeout or a failover); it is retried under the lease, and the step's
/// retry never places the call a second time.
pub async fn failing_callsid_record_is_retried_not_called_again() {
    let h = hospital_with(answers_and_presses("1"), Persona::NoAnswer, 10.0, |_| {}).await;
    h.db.exec(
        "CREATE SEQUENCE test_record_failures;
         CREATE FUNCTION test_fail_sid_record() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF OLD.provider_id IS NULL AND NEW.provider_id IS NOT NULL AND nextval('test_record_failures') <= 4 THEN
                 RAISE EXCEPTION 'simulated statement timeout' USING ERRCODE = '57014';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER test_fail_sid_record BEFORE UPDATE ON wardcall.notification_attempts
             FOR EACH ROW EXECUTE FUNCTION test_fail_sid_record();",
    )
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(30)).await;
    assert_eq!(calls_to(&h, NURSE_A), 1, "one call, although its record failed");
    assert!(h.db.scalar_i64("SELECT last_value FROM test_record_failures").await >= 4, "the record did fail");
    let (_, sid) = attempt_of(&h.db, "nurse-avery").await;
    assert_eq!(sid.as_deref(), Some(h.emulator.calls()[0].sid.as_str()));
    h.stop().await;
}

/// Item 3: cancelling a run hangs up its ringing call through the provider
/// and runs the `on_cancelled` write-back.
pub async fn cancel_hangs_up_and_runs_on_cancelled() {
    let h = hospital_with(Persona::NoAnswer, Persona::NoAnswer, 30.0, |c| {
        if let Some(e) = c.workflows[0].escalation_mut() {
            e.write_back.on_cancelled =
                Some("UPDATE alerts SET status = 'resolved', acknowledged_by = 'cancelled:' || ($2->>'alert_status') WHERE id = ($1->>'id')::uuid".into());
        }
    })
    .await;
    let mut events = h.emulator.subscribe();
    h.db.exec(SEIZURE_INSERT).await;
    await_true(&h.db, "the call to ring", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE status = 'ringing'").await;
    let (run, sid): (uuid::Uuid, String) =
        sqlx::query_as("SELECT run_id, provider_id FROM wardcall.notification_attempts").fetch_one(&h.db.pool).await.unwrap();
    let cancelled_at = Instant::now();
    assert!(wardcall::workflows::cancel_run(&h.db.pool, &h.app.engine.config, run, "test", "resolved at the bedside").await.unwrap());
    let ended = await_call_ended(&mut events, &sid, Duration::from_secs(5)).await.expect("the ringing call is ended after the cancel");
    assert_eq!(ended, "canceled");
    eprintln!("cancel → hang-up: {:?}", cancelled_at.elapsed());
    let (status, by): (String, Option<String>) = sqlx::query_as("SELECT status, acknowledged_by FROM alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!((status.as_str(), by.as_deref()), ("resolved", Some("cancelled:cancelled")), "on_cancelled wrote back");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'attempt.hangup_requested'").await, 1);
    h.stop().await;
}

/// Item 2: a call whose create response comes back after its alert was
/// acknowledged (here, by SQL while the request was in flight) is ended at once.
pub async fn call_placed_after_acknowledgement_is_ended() {
    let h = hospital_with(Persona::NoAnswer, Persona::NoAnswer, 30.0, |_| {}).await;
    h.emulator.set_create_response_delay(Duration::from_millis(1500));
    h.emulator.set_status_callbacks_lost(NURSE_A, true);
    let mut events = h.emulator.subscribe();
    h.db.exec(SEIZURE_INSERT).await;
    let sid = loop {
        if let EmulatorEvent::CallCreated { sid, .. } = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap() {
            break sid;
        }
    };
    // Acknowledged on another channel while the create request is in flight.
    h.db.exec("UPDATE wardcall.alerts SET status = 'acknowledged', acknowledged_by = 'charge-nurse', acknowledged_at = now()").await;
    let ended = await_call_ended(&mut events, &sid, Duration::from_secs(8)).await.expect("the late call is ended");
    assert_eq!(ended, "canceled");
    h.stop().await;
}

/// Item 4: a call whose final callback never arrived is fetched from the
/// provider after its expected end; the attempt does not stay `requested`.
pub async fn lost_callbacks_are_reconciled_from_the_provider() {
    let h = hospital_with(Persona::Busy, answers_and_presses("1"), 2.0, |_| {}).await;
    h.emulator.set_status_callbacks_lost(NURSE_A, true);
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(30)).await;
    await_true(
        &h.db,
        "the lost final status to be reconciled",
        Duration::from_secs(40),
        "SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE person_id = 'nurse-avery' AND status = 'busy' AND ended_at IS NOT NULL",
    )
    .await;
    assert_eq!(
        h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'attempt.status' AND to_state = 'busy' AND actor LIKE 'reconciler:%'").await,
        1
    );
    h.stop().await;
}

/// Item 4: `AnsweredBy` on a status callback is recorded; a machine pickup is
/// not an answer in the call log.
pub async fn answered_by_on_status_callback_is_honoured() {
    let h = hospital_with(Persona::NoAnswer, Persona::NoAnswer, 30.0, |c| c.providers.twilio.as_mut().unwrap().machine_detection = false).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_true(&h.db, "the call to ring", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.notification_attempts WHERE status = 'ringing'").await;
    let (attempt, sid) = attempt_of(&h.db, "nurse-avery").await;
    let sid = sid.unwrap();
    let p = [("CallSid", sid.as_str()), ("AccountSid", ACCOUNT_SID), ("CallStatus", "in-progress"), ("AnsweredBy", "machine_start")];
    assert_eq!(webhook(&h, &format!("/webhooks/twilio/status?attempt={attempt}"), &p, None).await.0, 200);
    let answered_by: Option<String> =
        sqlx::query_scalar("SELECT answered_by FROM wardcall.notification_attempts WHERE id = $1").bind(attempt).fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(answered_by.as_deref(), Some("machine_start"));
    let answered: bool = sqlx::query_scalar("SELECT answered FROM wardcall.call_log WHERE attempt_id = $1").bind(attempt).fetch_one(&h.db.pool).await.unwrap();
    assert!(!answered, "a voicemail pickup is not an answer");
    h.stop().await;
}

/// Item 4: a replayed keypress webhook (same `I-Twilio-Idempotency-Token`)
/// changes nothing: digits are not appended twice, nothing is audited twice,
/// and the replay gets the first response.
pub async fn replayed_keypress_changes_nothing() {
    let h = hospital_with(Persona::SilentHuman { ring_ms: 50 }, Persona::NoAnswer, 30.0, |_| {}).await;
    let (attempt, sid) = seizure_answered_by_first_nurse(&h).await;
    let path = format!("/webhooks/twilio/gather?attempt={attempt}");
    let p3 = [("CallSid", sid.as_str()), ("AccountSid", ACCOUNT_SID), ("Digits", "3")];
    let first = webhook(&h, &path, &p3, Some("idem-3")).await;
    let replay = webhook(&h, &path, &p3, Some("idem-3")).await;
    assert_eq!(first.0, 200);
    assert_eq!(first, replay, "the replay gets the first response");
    let p1 = [("CallSid", sid.as_str()), ("AccountSid", ACCOUNT_SID), ("Digits", "1")];
    let ack = webhook(&h, &path, &p1, Some("idem-1")).await;
    let ack_replay = webhook(&h, &path, &p1, Some("idem-1")).await;
    assert_eq!(ack, ack_replay);
    let digits: Option<String> =
        sqlx::query_scalar("SELECT digits FROM wardcall.notification_attempts WHERE id = $1").bind(attempt).fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(digits.as_deref(), Some("31"), "each key once, in order");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'alert.acknowledged'").await, 1);
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(5)).await;
    h.stop().await;
}

/// Item 4: the create-call response arrives after the callbacks moved the
/// attempt on; the audit log does not append `intent → requested` after
/// `ringing`: every attempt's transitions chain (each from = previous to).
pub async fn audit_records_only_transitions_that_happened() {
    let h = hospital_with(answers_and_presses("1"), Persona::NoAnswer, 10.0, |_| {}).await;
    h.emulator.set_create_response_delay(Duration::from_millis(700));
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
    await_true(
        &h.db,
        "the create response to be recorded",
        Duration::from_secs(10),
        "SELECT count(*) = 1 FROM wardcall.audit_log WHERE action IN ('attempt.requested','attempt.create_confirmed')",
    )
    .await;
    let rows: Vec<(Option<String>, Option<String>, String)> = sqlx::query_as(
        "SELECT from_state, to_state, action FROM wardcall.audit_log
          WHERE entity = 'notification_attempt' AND to_state IS NOT NULL ORDER BY id",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    let mut current: Option<String> = None;
    for (from, to, action) in &rows {
        assert_eq!(from, &current, "{action}: {from:?} → {to:?} after {current:?} ({rows:?})");
        current = to.clone();
    }
    assert_eq!(calls_to(&h, NURSE_A), 1);
    h.stop().await;
}

/// The hospital, nurse A as `a`, whose `room_name` lookup reads a table the
/// team's migration holds (`LOCK TABLE … ACCESS EXCLUSIVE` in the returned
/// transaction, until it is rolled back); `tweak` adjusts the config.
async fn hospital_with_a_blocked_lookup(
    a: Persona,
    ack_timeout: f64,
    tweak: impl FnOnce(&mut Config),
) -> (Hospital, sqlx::Transaction<'static, sqlx::Postgres>) {
    let census = "CREATE TABLE ward_census (room_id uuid PRIMARY KEY); INSERT INTO ward_census SELECT room_id FROM rooms";
    let h = hospital_with_schema(census, a, Persona::NoAnswer, ack_timeout, |c| {
        tweak(c);
        if let Some(e) = c.workflows[0].escalation_mut() {
            e.lookups.insert(
                "room_name".into(),
                "SELECT r.room_name FROM rooms r JOIN ward_census w USING (room_id) WHERE r.room_id = ($1->>'room_id')::uuid".into(),
            );
        }
    })
    .await;
    let mut locker = h.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE ward_census IN ACCESS EXCLUSIVE MODE").execute(&mut *locker).await.unwrap();
    (h, locker)
}

/// Item 9: a lookup blocked behind a lock (a team's `LOCK TABLE`, an
/// `ALTER TABLE`) times out and renders without its value; the call goes out
/// while the lock is still held, and the fault is audited.
pub async fn blocked_lookup_times_out_and_the_call_goes_out() {
    let (h, locker) = hospital_with_a_blocked_lookup(answers_and_presses("1"), 10.0, |_| {}).await;
    let inserted = Instant::now();
    h.db.exec(SEIZURE_INSERT).await;
    await_some("the call while the lock is held", Duration::from_secs(8), || {
        let n = h.emulator.calls().len();
        async move { (n > 0).then_some(()) }
    })
    .await;
    let waited = inserted.elapsed();
    assert!(waited < Duration::from_secs(6), "the call did not wait for the lock: {waited:?}");
    locker.rollback().await.unwrap();
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
    let message: String = sqlx::query_scalar("SELECT message FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    assert!(message.starts_with("Critical alert at Haven Hospital. , patient Dana Vale. Seizure Activity Detected."), "{message}");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'lookup.failed' AND detail->>'lookup' = 'room_name'").await, 1);
    h.stop().await;
}

/// The lookups have a small pool of their own (`engine.team_read_pool_size`,
/// 4). A burst of alerts whose lookup is blocked behind a team's lock holds
/// each of its connections for the lock timeout, so most alerts wait for a
/// connection: they wait at most `engine.acquire_timeout_ms`, then render
/// without their values, and every call goes out while the lock is still
/// held (DESIGN.md invariant 10).
pub async fn a_burst_of_blocked_lookups_holds_no_call_past_the_pools_wait() {
    const ALERTS: usize = 40;
    let (h, locker) = hospital_with_a_blocked_lookup(Persona::NoAnswer, 60.0, |c| c.engine.acquire_timeout_ms = 2_000).await;
    let inserted = Instant::now();
    h.db.exec(&format!(
        "INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title, description)
         SELECT 'P-DHE-001', (SELECT room_id FROM rooms WHERE room_name = 'Room 2' LIMIT 1), 'critical', 'active', 'seizure_detected',
                'Seizure ' || g, 'burst' FROM generate_series(1, {ALERTS}) g"
    ))
    .await;
    // Each alert's lookups hold a connection about 1.2 s (the shared
    // statement's 1 s lock wait, then the blocked lookup's 0.1 s alone): 40
    // alerts on 4 connections would take 12 s in turn. Bound: the 2 s wait
    // for a connection, the lookups' own bounds, and a loaded machine's slack.
    await_some("every alert's call while the lock is held", Duration::from_secs(20), || {
        let n = h.emulator.calls().len();
        async move { (n >= ALERTS).then_some(()) }
    })
    .await;
    let waited = inserted.elapsed();
    assert!(waited < Duration::from_secs(9), "the burst's calls waited for the lookups' pool in turn: {waited:?}");
    assert_eq!(
        h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'lookup.failed' AND detail->>'lookup' = 'room_name'").await,
        ALERTS as i64,
        "every alert rendered without the blocked value, and said so"
    );
    locker.rollback().await.unwrap();
    h.stop().await;
}

/// Item 9: a lookup that returns more than one row renders without a value
/// (the first row would name the wrong patient) and is audited as a config
/// fault.
pub async fn ambiguous_lookup_renders_without_a_value() {
    let h = hospital_with(answers_and_presses("1"), Persona::NoAnswer, 10.0, |c| {
        if let Some(e) = c.workflows[0].escalation_mut() {
            e.lookups.insert("patient_name".into(), "SELECT name FROM patients ORDER BY name DESC".into());
        }
    })
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
    let message: String = sqlx::query_scalar("SELECT message FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    assert!(message.contains("Room 2, patient . Seizure"), "{message}");
    assert!(!message.contains("Rowan") && !message.contains("Dana"), "no patient's name is guessed");
    let detail: Value = sqlx::query_scalar("SELECT detail FROM wardcall.audit_log WHERE action = 'lookup.ambiguous'").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(detail["lookup"], "patient_name");
    h.stop().await;
}

/// Review fix: a callback that names its attempt is applied even when another
/// attempt holds its CallSid (a call adopted from the call list by mistake);
/// before, the unique index refused the whole webhook (503 on every retry) and
/// the nurse's 1 was lost.
pub async fn keypress_is_recorded_when_another_attempt_holds_the_call_sid() {
    let h = hospital_with(Persona::SilentHuman { ring_ms: 50 }, Persona::NoAnswer, 30.0, |_| {}).await;
    let (attempt, sid) = seizure_answered_by_first_nurse(&h).await;
    // Another attempt took the CallSid; this one has none recorded. (The run
    // row is locked first, in the engine's lock order.)
    let mut tx = h.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM wardcall.runs WHERE id = (SELECT run_id FROM wardcall.notification_attempts WHERE id = $1) FOR UPDATE")
        .bind(attempt)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "WITH mine AS (UPDATE wardcall.notification_attempts SET provider_id = NULL WHERE id = $1 RETURNING *)
         INSERT INTO wardcall.notification_attempts (alert_id, run_id, cycle, step_index, person_id, channel, destination, provider, provider_id, status, fencing_token)
         SELECT alert_id, run_id, 9, 9, person_id, 'voice', destination, 'twilio', $2, 'requested', fencing_token FROM mine",
    )
    .bind(attempt)
    .bind(&sid)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let p1 = [("CallSid", sid.as_str()), ("AccountSid", ACCOUNT_SID), ("Digits", "1")];
    let (status, _) = webhook(&h, &format!("/webhooks/twilio/gather?attempt={attempt}"), &p1, Some("idem-adopted")).await;
    assert_eq!(status, 200, "the keypress is recorded");
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(5)).await;
    h.stop().await;
}
