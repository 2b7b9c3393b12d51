//! Call status callbacks (issue 9): a progress status (`initiated`,
//! `ringing`, `in-progress`) without an AMD verdict is recorded in one short
//! statement that never waits for the run's row; everything else (a final
//! status, a verdict, an `on_call_status` write-back) keeps the full
//! transaction, which locks the run first.

use crate::escalation::{hospital_config, start_with, Hospital, NURSE_A, SEIZURE_INSERT};
use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;
use uuid::Uuid;
use wardcall::devtools::twilio_emulator::Persona;
use wardcall::providers::twilio::signature::compute_signature;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        callbacks::progress_advances_once_and_replays_and_late_statuses_change_nothing,
        callbacks::progress_does_not_wait_for_the_run_row_but_a_final_status_does,
        callbacks::progress_with_on_call_status_write_back_still_writes_back,
        callbacks::webhooks_have_their_own_pool,
        callbacks::progress_of_open_alerts_does_not_keep_the_call_sweeper_busy,
        callbacks::progress_takes_a_lane_that_decisive_statuses_never_wait_for,
    ]
}

/// The hospital app (both nurses never answer), with no alert: the tests
/// build the attempts themselves.
async fn quiet_hospital(configure: impl FnOnce(&mut wardcall::config::Config)) -> Hospital {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    start_with(db, Persona::NoAnswer, Persona::NoAnswer, |cfg| {
        *cfg = hospital_config(&cfg.providers.twilio.as_ref().unwrap().api_base, 30.0, 1);
        configure(cfg);
    })
    .await
}

/// A run waiting for an hour (nothing claims it meanwhile), its open alert,
/// and a call attempt for nurse A in `status` holding `call_sid`. Returns
/// (run, attempt).
async fn waiting_attempt(db: &TestDb, status: &str, call_sid: Option<&str>) -> (Uuid, Uuid) {
    let run: Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.runs (workflow, event, input, state, step, status, fencing_token, due_at, wait_signal, wait_deadline)
         VALUES ('critical-alert-call', 'alert.critical', '{}', '{\"cycle\": 0, \"step_index\": 0}', 'await', 'waiting', 1,
                 clock_timestamp() + interval '1 hour', 'call_update', clock_timestamp() + interval '1 hour') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let alert: Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.alerts (run_id, workflow, policy, message, status)
         VALUES ($1, 'critical-alert-call', 'critical-care', 'Critical alert.', 'open') RETURNING id",
    )
    .bind(run)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let attempt: Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.notification_attempts
             (alert_id, run_id, cycle, step_index, person_id, channel, destination, provider, provider_id, status, fencing_token, requested_at)
         VALUES ($1, $2, 0, 0, 'nurse-avery', 'voice', $3, 'twilio', $4, $5, 1, clock_timestamp()) RETURNING id",
    )
    .bind(alert)
    .bind(run)
    .bind(NURSE_A)
    .bind(call_sid)
    .bind(status)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    (run, attempt)
}

/// Posts a signed status callback for `attempt` as Twilio would, with
/// `I-Twilio-Idempotency-Token: token` when given.
async fn post_status(h: &Hospital, attempt: Uuid, call_sid: &str, status: &str, token: Option<&str>) -> reqwest::StatusCode {
    let url = format!("http://{}/webhooks/twilio/status?attempt={attempt}", h.app.http_addr.unwrap());
    let params: Vec<(String, String)> = [("CallSid", call_sid), ("AccountSid", ACCOUNT_SID), ("To", NURSE_A), ("CallStatus", status)]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut req = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("X-Twilio-Signature", compute_signature(AUTH_TOKEN, &url, &params))
        .body(serde_urlencoded::to_string(&params).unwrap());
    if let Some(token) = token {
        req = req.header("I-Twilio-Idempotency-Token", token);
    }
    req.send().await.unwrap().status()
}

/// The attempt's whole row (`updated_at` included: a callback that changes
/// nothing does not touch it).
async fn attempt_row(db: &TestDb, attempt: Uuid) -> Value {
    sqlx::query_scalar("SELECT to_jsonb(n) FROM wardcall.notification_attempts n WHERE id = $1").bind(attempt).fetch_one(&db.pool).await.unwrap()
}

/// The attempt's `attempt.status` audit rows: (from, to, actor, detail), oldest first.
async fn status_audit(db: &TestDb, attempt: Uuid) -> Vec<(Option<String>, Option<String>, String, Value)> {
    sqlx::query_as(
        "SELECT from_state, to_state, actor, detail FROM wardcall.audit_log
          WHERE entity = 'notification_attempt' AND entity_id = $1::text AND action = 'attempt.status' ORDER BY id",
    )
    .bind(attempt)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

pub async fn progress_advances_once_and_replays_and_late_statuses_change_nothing() {
    let h = quiet_hospital(|_| {}).await;
    let sid = "CA00000000000000000000000000000a01";
    let (_, attempt) = waiting_attempt(&h.db, "requested", Some(sid)).await;
    assert_eq!(post_status(&h, attempt, sid, "initiated", Some("tok-initiated")).await, 200);
    let after_initiated = attempt_row(&h.db, attempt).await;
    assert_eq!(after_initiated["status"], "initiated");
    assert!(after_initiated["initiated_at"].is_string());
    assert_eq!(post_status(&h, attempt, sid, "ringing", Some("tok-ringing")).await, 200);
    let after_ringing = attempt_row(&h.db, attempt).await;
    assert_eq!(after_ringing["status"], "ringing");
    assert!(after_ringing["ringing_at"].is_string());
    assert_eq!(after_ringing["initiated_at"], after_initiated["initiated_at"], "a time is stamped once");
    let expected = vec![
        (Some("requested".to_string()), Some("initiated".to_string()), "webhook:twilio".to_string(), json!({"provider_id": sid})),
        (Some("initiated".to_string()), Some("ringing".to_string()), "webhook:twilio".to_string(), json!({"provider_id": sid})),
    ];
    assert_eq!(status_audit(&h.db, attempt).await, expected, "one audit row per change");
    // Replays of both deliveries (same tokens), and a late `initiated` (a new
    // token): answered as before, nothing changed, nothing audited.
    assert_eq!(post_status(&h, attempt, sid, "ringing", Some("tok-ringing")).await, 200);
    assert_eq!(post_status(&h, attempt, sid, "initiated", Some("tok-initiated")).await, 200);
    assert_eq!(post_status(&h, attempt, sid, "initiated", Some("tok-late")).await, 200);
    assert_eq!(post_status(&h, attempt, sid, "initiated", None).await, 200);
    assert_eq!(attempt_row(&h.db, attempt).await, after_ringing, "the attempt did not change (nor its updated_at)");
    assert_eq!(status_audit(&h.db, attempt).await, expected, "no audit row for what did not happen");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.webhook_receipts WHERE response = ''").await, 3, "one receipt per delivery");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.signals").await, 0, "progress does not signal the run");
    // A send whose answer was lost: the callback names the call, as before.
    let (_, unnamed) = waiting_attempt(&h.db, "intent", None).await;
    let sid2 = "CA00000000000000000000000000000a02";
    assert_eq!(post_status(&h, unnamed, sid2, "ringing", Some("tok-unnamed")).await, 200);
    let row = attempt_row(&h.db, unnamed).await;
    assert_eq!((row["status"].as_str(), row["provider_id"].as_str()), (Some("ringing"), Some(sid2)));
    assert_eq!(status_audit(&h.db, unnamed).await.len(), 1);
    // An unknown attempt is answered as before.
    assert_eq!(post_status(&h, Uuid::new_v4(), sid, "ringing", Some("tok-unknown")).await, 404);
    h.stop().await;
}

pub async fn progress_does_not_wait_for_the_run_row_but_a_final_status_does() {
    let h = quiet_hospital(|_| {}).await;
    let sid = "CA00000000000000000000000000000b01";
    let (run, attempt) = waiting_attempt(&h.db, "initiated", Some(sid)).await;
    // Another transaction (a worker evaluating the run, a group commit) holds the run's row.
    let mut holder = h.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM wardcall.runs WHERE id = $1 FOR UPDATE").bind(run).execute(&mut *holder).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(3), post_status(&h, attempt, sid, "ringing", Some("tok-b-ringing"))).await;
    assert_eq!(answered.expect("a progress callback answered while the run's row is held"), 200);
    let row = attempt_row(&h.db, attempt).await;
    assert_eq!(row["status"], "ringing", "recorded while the run's row is held");
    assert_eq!(status_audit(&h.db, attempt).await.len(), 1);
    // A final status still takes the run's lock (it signals the run): it
    // waits for the holder, then is recorded once the row is released.
    let h_url = h.app.http_addr.unwrap();
    let final_status = tokio::spawn({
        let url = format!("http://{h_url}/webhooks/twilio/status?attempt={attempt}");
        async move {
            let params: Vec<(String, String)> =
                [("CallSid", sid), ("AccountSid", ACCOUNT_SID), ("CallStatus", "no-answer")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            reqwest::Client::new()
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("X-Twilio-Signature", compute_signature(AUTH_TOKEN, &url, &params))
                .header("I-Twilio-Idempotency-Token", "tok-b-final")
                .body(serde_urlencoded::to_string(&params).unwrap())
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    await_true(
        &h.db,
        "the final callback waiting for the run's row",
        Duration::from_secs(3),
        "SELECT count(*) = 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%wardcall.runs%'",
    )
    .await;
    assert_eq!(attempt_row(&h.db, attempt).await["status"], "ringing");
    holder.rollback().await.unwrap();
    assert_eq!(final_status.await.unwrap(), 200);
    assert_eq!(attempt_row(&h.db, attempt).await["status"], "no-answer");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.signals WHERE payload->>'status' = 'no-answer'").await, 1, "the final status signalled the run");
    h.stop().await;
}

pub async fn progress_with_on_call_status_write_back_still_writes_back() {
    // The team keeps the latest call status on its row: every status,
    // progress included, is written back (the full path).
    let hook = "UPDATE alerts SET metadata = jsonb_set(metadata, '{statuses}', coalesce(metadata->'statuses', '[]'::jsonb) || to_jsonb($2->>'provider_status'))
                 WHERE id = ($1->>'id')::uuid";
    let h = quiet_hospital(|cfg| {
        cfg.workflows[0].escalation_mut().unwrap().write_back.on_call_status = Some(hook.into());
    })
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    // The emulator's nurse never answers: `initiated`, then `ringing`.
    await_true(
        &h.db,
        "initiated and ringing written back",
        Duration::from_secs(15),
        "SELECT count(*) = 1 FROM alerts WHERE metadata->'statuses' @> '[\"initiated\", \"ringing\"]'",
    )
    .await;
    let statuses: Value = sqlx::query_scalar("SELECT metadata->'statuses' FROM alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(statuses, json!(["initiated", "ringing"]), "each progress status written back once");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'attempt.status'").await, 2);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.alerts WHERE status = 'open'").await, 1);
    h.stop().await;
}

/// The provider webhooks take their connections from their own pool
/// (`engine.webhook_pool_size`): with every connection of the engine's pool
/// held (workers busy, or waiting for locks), a status callback is still
/// recorded at once, and its connection is `wardcall-webhooks`'.
pub async fn webhooks_have_their_own_pool() {
    let h = quiet_hospital(|cfg| {
        cfg.engine.pool_size = 2;
        cfg.engine.webhook_pool_size = 1;
        cfg.engine.acquire_timeout_ms = 1000;
    })
    .await;
    let sid = "CA00000000000000000000000000000c01";
    let (_, attempt) = waiting_attempt(&h.db, "requested", Some(sid)).await;
    let pool = &h.app.engine.services.pool;
    // Hold every connection the engine's pool will give.
    let mut held = Vec::new();
    while let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_millis(300), pool.acquire()).await {
        held.push(conn);
        assert!(held.len() <= 100, "the engine's pool never ran out");
    }
    // The handler answers after its transaction committed.
    assert_eq!(post_status(&h, attempt, sid, "ringing", Some("tok-own-pool")).await, 200);
    drop(held);
    assert_eq!(attempt_row(&h.db, attempt).await["status"], "ringing", "recorded while the engine's pool was exhausted");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wardcall-webhooks' AND datname = current_database()").await, 1);
    h.stop().await;
}

/// A progress status wakes the call sweeper only when its call's alert is
/// no longer open (a call to end): 40 ringing callbacks of open alerts, one
/// after another, start no more sweeps than the sweeper's own interval
/// would (each sweep is five statements; woken by every callback, it swept
/// back to back through a burst). A ringing call of an acknowledged alert
/// still wakes it, and the call is ended.
pub async fn progress_of_open_alerts_does_not_keep_the_call_sweeper_busy() {
    let h = quiet_hospital(|_| {}).await;
    let services = &h.app.engine.services;
    let mut attempts = Vec::new();
    for i in 0..40 {
        let sid = format!("CA{i:032x}");
        let (_, attempt) = waiting_attempt(&h.db, "requested", Some(&sid)).await;
        attempts.push((attempt, sid));
    }
    let sweeps_started = || async { wardcall::notify::call_sweeper::sweeps_started(services) };
    // The sweeper's first sweep (at its start) has begun.
    await_some("the call sweeper's first sweep", Duration::from_secs(5), || async { (sweeps_started().await > 0).then_some(()) }).await;
    let before = sweeps_started().await;
    let started = std::time::Instant::now();
    for (attempt, sid) in &attempts {
        assert_eq!(post_status(&h, *attempt, sid, "ringing", None).await, 200);
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let sweeps = sweeps_started().await - before;
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.notification_attempts WHERE status = 'ringing'").await, 40);
    let interval_ms = wardcall::notify::call_sweeper::SWEEP_INTERVAL.as_millis() as u64;
    eprintln!("40 ringing callbacks in {elapsed_ms} ms started {sweeps} sweeps");
    assert!(sweeps <= 2 + elapsed_ms / interval_ms, "{sweeps} sweeps in {elapsed_ms} ms for callbacks of open alerts");

    // The call of an alert acknowledged meanwhile is ended.
    let (_, attempt) = waiting_attempt(&h.db, "requested", Some("CA00000000000000000000000000000e01")).await;
    h.db.exec(&format!(
        "UPDATE wardcall.alerts SET status = 'acknowledged' WHERE id = (SELECT alert_id FROM wardcall.notification_attempts WHERE id = '{attempt}')"
    ))
    .await;
    let before = sweeps_started().await;
    assert_eq!(post_status(&h, attempt, "CA00000000000000000000000000000e01", "ringing", None).await, 200);
    // Woken at once, not at its next interval (500 ms).
    await_some("the call sweeper to be woken by the ringing call of a closed alert", Duration::from_millis(100), || async {
        (sweeps_started().await != before).then_some(())
    })
    .await;
    await_true(
        &h.db,
        "the call of the closed alert to be ended",
        Duration::from_secs(5),
        &format!("SELECT count(*) = 1 FROM wardcall.audit_log WHERE action = 'attempt.hangup_requested' AND entity_id = '{attempt}'"),
    )
    .await;
    h.stop().await;
}

/// Progress statuses take one of `PROGRESS_LANES` (one): while a ringing
/// status holds it (its attempt's row locked elsewhere), a second waits for
/// the lane, not in the database; a final status of another call is
/// recorded at once (it never takes a lane); the waiting status goes without
/// a lane after `PROGRESS_LANE_WAIT_MAX`; and the first is recorded once the
/// row is free (by the provider's retry if it was answered 503 meanwhile).
pub async fn progress_takes_a_lane_that_decisive_statuses_never_wait_for() {
    use wardcall::notify::acknowledgement::{PROGRESS_LANES, PROGRESS_LANE_WAIT_MAX};
    assert_eq!(PROGRESS_LANES, 1, "this test holds the one lane");
    // The lane's holder waits for its row longer than the lane's bound.
    let h = std::sync::Arc::new(quiet_hospital(|cfg| cfg.engine.lock_timeout_ms = 4000).await);
    let (sid_a, sid_b, sid_c) = ("CA000000000000000000000000000000a1", "CA000000000000000000000000000000b1", "CA000000000000000000000000000000c1");
    let (_, a) = waiting_attempt(&h.db, "requested", Some(sid_a)).await;
    let (_, b) = waiting_attempt(&h.db, "requested", Some(sid_b)).await;
    let (_, c) = waiting_attempt(&h.db, "in-progress", Some(sid_c)).await;
    let mut holder = h.db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM wardcall.notification_attempts WHERE id = $1 FOR UPDATE").bind(a).execute(&mut *holder).await.unwrap();

    let post = |attempt: Uuid, sid: &'static str, status: &'static str| {
        let h = h.clone();
        tokio::spawn(async move { post_status(&h, attempt, sid, status, None).await })
    };
    let ringing_a = post(a, sid_a, "ringing");
    await_true(
        &h.db,
        "the first ringing status to wait for its attempt's row",
        Duration::from_secs(5),
        "SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'wardcall-webhooks' AND wait_event_type = 'Lock'",
    )
    .await;
    let b_posted = std::time::Instant::now();
    let ringing_b = post(b, sid_b, "ringing");
    // A final status of another call is not held behind the lane.
    let completed = tokio::time::timeout(Duration::from_secs(1), post_status(&h, c, sid_c, "completed", None)).await;
    assert_eq!(completed.expect("a final status does not wait for the progress lane"), 200);
    assert_eq!(attempt_row(&h.db, c).await["status"], "completed");
    assert!(b_posted.elapsed() < PROGRESS_LANE_WAIT_MAX, "checked while the second status still waits for the lane");
    assert_eq!(attempt_row(&h.db, b).await["status"], "requested", "the second progress status waits for the lane");
    // After the bound it goes without one, while the first still holds
    // the lane, waiting for its row.
    assert_eq!(ringing_b.await.unwrap(), 200);
    let waited = b_posted.elapsed();
    assert!(waited >= PROGRESS_LANE_WAIT_MAX - Duration::from_millis(100), "recorded after {waited:?}");
    assert_eq!(attempt_row(&h.db, b).await["status"], "ringing");
    assert_eq!(
        h.db.scalar_i64("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wardcall-webhooks' AND wait_event_type = 'Lock'").await,
        1,
        "the first status still waits for its row (it holds the lane)"
    );
    holder.rollback().await.unwrap();
    // The first is recorded once the row is free (or, answered 503 had
    // it waited past the engine's `lock_timeout`, by the provider's retry).
    if ringing_a.await.unwrap() != 200 {
        assert_eq!(post_status(&h, a, sid_a, "ringing", None).await, 200);
    }
    assert_eq!(attempt_row(&h.db, a).await["status"], "ringing");
    match std::sync::Arc::try_unwrap(h) {
        Ok(h) => h.stop().await,
        Err(_) => panic!("the posting tasks hold no copy of the hospital"),
    }
}
