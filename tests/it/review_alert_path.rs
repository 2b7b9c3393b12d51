//! Defects found in review of the alert path's round-trip cuts (issue 9:
//! `fence_and_open`, `open_with_intents`, `write_back`, the
//! dispatcher's `BEGIN` + lock in one simple query, lookups in one
//! statement), each with the test that showed it (each failed before its fix).

use crate::harness::*;
use sqlx::ConnectOptions;
use std::time::Duration;
use wardcall::config::EngineConfig;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        review_alert_path::a_dispatch_lock_timeout_leaves_no_aborted_transaction_in_the_pool,
        review_alert_path::lookups_of_a_domain_over_text_render_as_they_do_alone,
        review_alert_path::a_takeover_after_open_with_intents_calls_again_under_the_recall_rule,
        review_alert_path::an_alert_without_lookups_takes_no_connection_to_render,
        review_alert_path::a_new_runs_lookups_run_while_its_creation_commits,
        review_alert_path::a_dispatch_dropped_during_its_lock_wait_leaves_no_transaction_in_the_pool,
        review_alert_path::a_direct_dispatch_in_flight_holds_back_the_cancel_of_its_key,
        review_alert_path::events_a_batch_must_see_are_not_dispatched_directly,
        review_alert_path::a_direct_dispatch_waiting_for_a_batch_takes_no_row_the_batch_took,
        review_alert_path::an_event_with_more_runs_than_free_workers_starts_them_all_at_once,
        review_alert_path::a_direct_dispatch_commits_the_first_tier_with_the_run_and_the_message_follows,
        review_alert_path::a_takeover_after_the_dispatch_opened_the_first_tier_writes_the_message_and_calls_under_the_recall_rule,
        review_alert_path::a_dispatched_tier_whose_step_came_late_calls_nobody_for_a_cancelled_run,
        review_alert_path::a_dispatch_opening_several_tiers_keeps_each_run_to_itself,
        review_alert_path::a_dispatch_whose_commit_outlasted_the_lease_calls_nobody_once_the_run_is_taken_over,
    ]
}

const QUIET: &str = "[engine]\nsweep_ms = 100\n";

/// Connections of this test's database other than `except_pid` that sit in
/// a transaction between statements (open or aborted) for 300 ms or more. A
/// leaked transaction stays for good; the engine's own dispatcher (sweeping
/// every 100 ms) is between two statements of a live one for microseconds,
/// which a loaded machine can stretch to milliseconds, never to 300 ms: an
/// absence is checked over a window, so the check waits for it first.
async fn idle_in_transaction(db: &TestDb, except_pid: i32) -> Vec<String> {
    tokio::time::sleep(Duration::from_millis(400)).await;
    sqlx::query_scalar(
        "SELECT state || ': ' || left(query, 80) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> $1 AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'
            AND state_change < clock_timestamp() - interval '300 milliseconds'",
    )
    .bind(except_pid)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// The dispatcher begins its transaction and takes the dispatch lock in one
/// simple query (`BEGIN; SELECT pg_advisory_xact_lock(…)`). When the lock
/// wait ends in an error (another engine's batch held it past the engine's
/// `lock_timeout`: several engines, DESIGN.md invariant 9), sqlx never
/// counted the transaction as open (it does so only once the whole query
/// succeeded), so it queues no `ROLLBACK`: the connection went back to the
/// pool inside an aborted transaction, and every later statement on it
/// (a run's fence, an alert's intents) failed with 25P02 until the
/// connection's lifetime ended.
pub async fn a_dispatch_lock_timeout_leaves_no_aborted_transaction_in_the_pool() {
    let db = TestDb::new().await;
    let settings = EngineConfig { lock_timeout_ms: 200, pool_size: 4, ..EngineConfig::default() };
    let pool = wardcall::db::connect_pool_with(db.options.clone(), &settings).await.unwrap();
    let database = wardcall::db::Database { pool: pool.clone(), connect_options: db.options.clone(), embedded: None };
    let app =
        wardcall::app::App::start(database, config(QUIET), wardcall::app::StartOptions { no_http: true, ..Default::default() }).await.expect("app starts");

    // "Another engine" holds the dispatch lock (its batch is slow).
    let mut other = db.options.connect().await.unwrap();
    let other_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut other).await.unwrap();
    sqlx::raw_sql(&format!("BEGIN; SELECT pg_advisory_xact_lock({})", wardcall::runtime::DISPATCH_LOCK_KEY)).execute(&mut other).await.unwrap();
    let err = app.engine.dispatch_batch(10).await.expect_err("the lock wait is bounded by lock_timeout");
    let code = err.downcast_ref::<sqlx::Error>().and_then(|e| e.as_database_error()).and_then(|d| d.code()).map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("55P03"), "{err:#}");
    sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();

    // The batch's connection went back to the pool: it must be usable.
    await_some("no pooled connection left in a transaction", Duration::from_secs(3), || async {
        let left = idle_in_transaction(&db, other_pid).await;
        if !left.is_empty() {
            eprintln!("left in a transaction: {left:?}");
        }
        left.is_empty().then_some(())
    })
    .await;
    // Every pooled connection answers (taken all at once, so each is tried).
    let mut held = Vec::new();
    for _ in 0..settings.pool_size {
        held.push(pool.acquire().await.unwrap());
    }
    for conn in &mut held {
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut **conn).await.expect("a pooled connection answers");
        assert_eq!(one, 1);
    }
    drop(held);
    assert!(app.engine.dispatch_batch(10).await.is_ok(), "the dispatcher works again once the lock is free");
    app.stop(Duration::from_secs(2)).await;
}

/// Lookups go as one statement, each gathered with `ARRAY(…)`; alone, a
/// lookup's first column renders when it is text-like. A team's column of a
/// domain over text (`CREATE DOMAIN room_code AS text`, common for codes
/// and identifiers) is reported as `text` alone, but `ARRAY(…)` of it is an
/// array of the domain, which the decoder does not take for text: the value
/// rendered empty and was audited as a config fault ("not one text
/// column") whenever the alert had two or more lookups.
pub async fn lookups_of_a_domain_over_text_render_as_they_do_alone() {
    use wardcall::workflows::team_sql::{run_lookup, run_lookups, LookupOutcome};
    let db = TestDb::new().await;
    db.exec("CREATE DOMAIN room_code AS text CHECK (VALUE <> ''); CREATE TABLE rooms (code room_code); INSERT INTO rooms VALUES ('ICU-2');").await;
    let input = serde_json::json!({});
    let show = |o: &Result<LookupOutcome, sqlx::Error>| match o {
        Ok(LookupOutcome::Value(v)) => format!("value {v}"),
        Ok(LookupOutcome::Empty) => "empty".into(),
        Ok(LookupOutcome::Ambiguous) => "ambiguous".into(),
        Ok(LookupOutcome::NotText) => "not text".into(),
        Err(e) => format!("error {e}"),
    };
    let alone = run_lookup(&db.team_reads(), "SELECT code FROM rooms", &input).await;
    assert_eq!(show(&alone), "value ICU-2", "alone, a domain over text is text");
    let together = run_lookups(&db.team_reads(), &["SELECT code FROM rooms", "SELECT 'Dana'", "SELECT 42"], &input).await;
    let seen: Vec<String> = together.iter().map(show).collect();
    assert_eq!(seen, ["value ICU-2", "value Dana", "not text"], "each lookup has the outcome it has alone");
}

/// A database with the hospital's schema and capture, and a seizure alert
/// committed with no engine running: its event waits in the outbox.
async fn seizure_in_the_outbox() -> TestDb {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let cfg = crate::escalation::hospital_config("http://127.0.0.1:9", 30.0, 1);
    wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap();
    db.exec(crate::escalation::SEIZURE_INSERT).await;
    db
}

/// After a takeover of a run whose first tier's intent (nurse A, generation
/// 0) had an unknown outcome: nurse A was called once more, the intent was
/// marked `unknown` and a generation 1 attempt made, and the alert was
/// opened (and audited so) once.
async fn called_again_once_under_the_recall_rule(h: &crate::escalation::Hospital) {
    use crate::escalation::{calls_to, NURSE_A};
    assert_eq!(calls_to(h, NURSE_A), 1, "the intent of unknown outcome was called again, once");
    let statuses: Vec<(i32, String)> =
        sqlx::query_as("SELECT generation, status FROM wardcall.notification_attempts ORDER BY generation").fetch_all(&h.db.pool).await.unwrap();
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    assert_eq!(statuses[0], (0, "unknown".to_string()));
    assert_eq!(statuses[1].0, 1);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.alerts").await, 1);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'alert.opened'").await, 1);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'attempt.outcome_unknown'").await, 1);
}

/// Checked, not a defect: an engine that committed a run's first tier with
/// `alerts::open_with_intents` (alert and intents in one autocommit
/// statement) and died before its send and before the run's transition is
/// taken over like one that used the transaction path: the new owner (a
/// takeover, so the general path) finds the alert, marks the intent of
/// unknown outcome `unknown` and calls nurse A again (generation 1, the
/// re-call rule), once; the alert is opened and audited once.
pub async fn a_takeover_after_open_with_intents_calls_again_under_the_recall_rule() {
    use crate::escalation::{await_alert_status, start_on, NURSE_A};
    use wardcall::devtools::twilio_emulator::Persona;
    use wardcall::store::alerts::{open_with_intents, FirstTier, OpenedWithIntents};
    let db = seizure_in_the_outbox().await;
    let message = "Critical alert at Haven Hospital. Room 2, patient Dana Vale.";
    let run: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.runs (workflow, event_id, event, input, state, step, status, lease_owner, fencing_token, due_at)
         SELECT 'critical-alert-call', o.id, o.event, o.payload, '{}', 'start', 'running', 'crashed-engine', 1, clock_timestamp() + interval '1 hour'
           FROM wardcall.outbox o RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    db.exec("UPDATE wardcall.outbox SET processed_at = clock_timestamp(), processed_by = 'crashed-engine'").await;
    // The crashed engine's first tier, committed; then it died.
    let tier = FirstTier {
        workflow: "critical-alert-call".into(),
        policy: "critical-care".into(),
        message: message.into(),
        actor: "engine:crashed".into(),
        ..crate::escalation::first_tier(run, 1, &[("nurse-avery", "Avery Quinn", NURSE_A)])
    };
    let opened = open_with_intents(&mut db.pool.acquire().await.unwrap(), &tier).await.unwrap();
    assert!(matches!(opened, OpenedWithIntents::Opened { .. }), "{opened:?}");
    sqlx::query("UPDATE wardcall.runs SET due_at = clock_timestamp() - interval '1 second' WHERE id = $1").bind(run).execute(&db.pool).await.unwrap();

    let h = start_on(db, Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() }, Persona::NoAnswer, 10.0, 1).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    called_again_once_under_the_recall_rule(&h).await;
    h.stop().await;
}

/// An escalation without lookups rendered through `run_lookups` with an
/// empty list, which still took a pooled connection and began a read-only
/// transaction (a round trip, and under a burst a wait for a connection) on
/// every alert's way to its first call, for nothing.
pub async fn an_alert_without_lookups_takes_no_connection_to_render() {
    use wardcall::workflows::team_sql::run_lookups;
    let db = TestDb::new().await;
    let settings = EngineConfig { team_read_pool_size: 1, acquire_timeout_ms: 3_000, ..EngineConfig::default() };
    let reads = wardcall::db::TeamReadPool::new(&db.pool, &settings);
    let _busy = reads.pool().acquire().await.unwrap(); // every connection is busy (a burst)
    let out =
        tokio::time::timeout(Duration::from_millis(500), run_lookups(&reads, &[], &serde_json::json!({}))).await.expect("no lookups: nothing to wait for");
    assert!(out.is_empty());
}

/// The same `BEGIN` + lock, its future dropped during the lock wait (an
/// engine's tasks aborted, e.g. an `App` dropped without `stop`): the pool's
/// return ping waited for the lock, then put the connection back into the
/// pool inside an open transaction holding the dispatch lock, which stalled
/// every engine's dispatcher, and whose next user's autocommit statements (a
/// run's intents) would not have committed.
pub async fn a_dispatch_dropped_during_its_lock_wait_leaves_no_transaction_in_the_pool() {
    let db = TestDb::new().await;
    let settings = EngineConfig { lock_timeout_ms: 2_000, pool_size: 4, ..EngineConfig::default() };
    let pool = wardcall::db::connect_pool_with(db.options.clone(), &settings).await.unwrap();
    let database = wardcall::db::Database { pool: pool.clone(), connect_options: db.options.clone(), embedded: None };
    let app =
        wardcall::app::App::start(database, config(QUIET), wardcall::app::StartOptions { no_http: true, ..Default::default() }).await.expect("app starts");
    let mut other = db.options.connect().await.unwrap();
    let other_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut other).await.unwrap();
    sqlx::raw_sql(&format!("BEGIN; SELECT pg_advisory_xact_lock({})", wardcall::runtime::DISPATCH_LOCK_KEY)).execute(&mut other).await.unwrap();
    let dropped = tokio::time::timeout(Duration::from_millis(300), app.engine.dispatch_batch(10)).await;
    assert!(dropped.is_err(), "the dispatch waited for the lock and was dropped");
    sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
    // The dropped dispatch's lock request was queued before this one: had its
    // connection gone back to the pool, it would hold the lock now, for good.
    let again = app.engine.dispatch_batch(10).await;
    let left = idle_in_transaction(&db, other_pid).await;
    assert!(again.is_ok() && left.is_empty(), "dispatch after the lock was freed: {again:?}; left in a transaction: {left:?}");
    app.stop(Duration::from_secs(2)).await;
}

/// A new run's lookups are read ahead by the dispatcher while the run's
/// creation commits (`WorkflowHost::prefetch_first_step`), off the way to
/// the first call. Shown by holding the dispatch up inside its transaction:
/// a test transaction holds an uncommitted run with the alert's key, so the
/// dispatcher's INSERT of the run waits for it; the lookups have started all
/// the same (the team-read pool, which opens a connection for its first
/// lookup, has one). Once the test
/// transaction rolls back, the run is created and the call speaks the
/// looked-up values, from the values read ahead.
pub async fn a_new_runs_lookups_run_while_its_creation_commits() {
    use crate::escalation::{hospital_db, start_on, NURSE_A};
    use wardcall::devtools::twilio_emulator::{EmulatorEvent, Persona};
    let db = hospital_db().await;
    let h = start_on(db, Persona::NoAnswer, Persona::NoAnswer, 30.0, 1).await;
    let mut events = h.emulator.subscribe();
    let alert = uuid::Uuid::new_v4();
    let mut holder = h.db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, key, due_at)
         VALUES ('critical-alert-call', 'alert.critical', '{}', 'start', 'sleeping', $1, now() + interval '1 hour')",
    )
    .bind(alert.to_string())
    .execute(&mut *holder)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO alerts (id, patient_id, room_id, severity, status, alert_type, title, description)
         VALUES ($1, 'P-DHE-001', (SELECT room_id FROM rooms WHERE room_name = 'Room 2' LIMIT 1),
                 'critical', 'active', 'seizure_detected', 'Seizure Activity Detected', 'Immediate response required')",
    )
    .bind(alert)
    .execute(&h.db.pool)
    .await
    .unwrap();
    await_true(
        &h.db,
        "the dispatcher's INSERT of the run to wait for the test's run with the same key",
        Duration::from_secs(10),
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'wardcall'
                          AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO wardcall.runs%')",
    )
    .await;
    await_true(
        &h.db,
        "the alert's lookups to have started while its run's creation has not committed",
        Duration::from_secs(10),
        // The pool opens its first connection for the first lookup (and a
        // connection's last query is soon its reset, `RESET ALL`).
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'wardcall-team-reads')",
    )
    .await;
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.alerts").await, 0, "no step has run yet");
    holder.rollback().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(EmulatorEvent::CallCreated { to, .. }) = events.recv().await {
                if to == NURSE_A {
                    break;
                }
            }
        }
    })
    .await
    .expect("nurse A called once the dispatch went on");
    // (Written while the call is placed.)
    await_true(&h.db, "the alert's message", Duration::from_secs(5), "SELECT EXISTS (SELECT 1 FROM wardcall.alerts WHERE message IS NOT NULL)").await;
    let message: String = sqlx::query_scalar("SELECT message FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    assert!(message.contains("Room 2, patient Dana Vale. Seizure Activity Detected."), "the looked-up values are spoken: {message}");
    h.stop().await;
}

const PAGES: &str = "CREATE TABLE pages (id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'raised');";

const PAGES_CFG: &str = r#"
[engine]
sweep_ms = 100

[[sources]]
name = "pages_raised"
table = "pages"
operations = ["INSERT"]
event = "page.raised"

[[sources]]
name = "pages_resolved"
table = "pages"
operations = ["UPDATE"]
condition = "NEW.status = 'resolved' AND OLD.status <> 'resolved'"
event = "page.resolved"

[[workflows]]
name = "page"
event = "page.raised"
critical = true
key = "{id}"
cancel_on = [{ event = "page.resolved" }]

[[workflows.steps]]
sleep = "1h"
"#;

/// The direct dispatch (`runtime::direct_dispatch`) claims a critical
/// event and creates its run in one statement, outside any dispatch batch.
/// Were it to do so without the dispatch lock, another engine's batch
/// holding the event that cancels the same key (the alert resolved) would
/// find no run to cancel while the direct claim was in flight, and the
/// resolved alert would go on paging. Here the direct claim is slowed
/// down (a trigger sleeps in its insert of the run) while a batch is asked
/// to dispatch the cancel: the run must end cancelled.
pub async fn a_direct_dispatch_in_flight_holds_back_the_cancel_of_its_key() {
    let db = TestDb::new().await;
    db.exec(PAGES).await;
    db.exec(
        "CREATE FUNCTION slow_page_run() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.6); RETURN NEW; END $$;
         CREATE TRIGGER slow_page_run BEFORE INSERT ON wardcall.runs FOR EACH ROW WHEN (NEW.workflow = 'page') EXECUTE FUNCTION slow_page_run();",
    )
    .await;
    let app = start_app(&db, config(PAGES_CFG)).await;
    let id = db.scalar_i64("INSERT INTO pages DEFAULT VALUES RETURNING id").await;
    await_true(
        &db,
        "the direct dispatch to be creating the run",
        Duration::from_secs(5),
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
                          AND state = 'active' AND query LIKE '%dispatch_lock AS MATERIALIZED%')",
    )
    .await;
    db.exec(&format!("UPDATE pages SET status = 'resolved' WHERE id = {id}")).await;
    // "Another engine's" batch, while the direct claim is in flight: it
    // must wait for it (or time out waiting and leave the event), never
    // dispatch the cancel before the run exists.
    let batch = app.engine.dispatch_batch(10).await;
    println!("the other batch: {:?}", batch.as_ref().map_err(|e| format!("{e:#}")));
    await_true(
        &db,
        "the resolved page's run to be cancelled",
        Duration::from_secs(10),
        "SELECT coalesce((SELECT status = 'cancelled' FROM wardcall.runs WHERE workflow = 'page'), false)",
    )
    .await;
    let direct: Option<String> = sqlx::query_scalar("SELECT processed_by FROM wardcall.outbox WHERE event = 'page.raised'").fetch_one(&db.pool).await.unwrap();
    app.stop(Duration::from_secs(2)).await;
    assert!(direct.is_some(), "the raising event was dispatched");
}

/// Which events go directly: a critical workflow's, with no `when`, a
/// key only with `on_duplicate = "skip"`, and not an event that cancels
/// or signals by key; every other event goes through a batch, which sees
/// the runs of every older event.
pub async fn events_a_batch_must_see_are_not_dispatched_directly() {
    use wardcall::runtime::direct_dispatch::DirectRoutes;
    let host = wardcall::workflows::Host;
    let cfg = config(PAGES_CFG);
    assert_eq!(
        DirectRoutes::of(&cfg, &host).events(),
        ["page.raised"],
        "the raising event (keyed, duplicates skipped by default) goes directly; the cancel does not"
    );
    let replace = PAGES_CFG.replace("key = \"{id}\"", "key = \"{id}\"\non_duplicate = \"replace\"");
    assert!(DirectRoutes::of(&config(&replace), &host).is_empty(), "a replacing key needs the batch (it cancels the live run)");
    let conditional = PAGES_CFG.replace("critical = true", "critical = true\nwhen = \"payload->>'id' IS NOT NULL\"");
    assert!(DirectRoutes::of(&config(&conditional), &host).is_empty(), "a `when` needs the batch");
    let ordinary = PAGES_CFG.replace("critical = true\n", "");
    assert!(DirectRoutes::of(&config(&ordinary), &host).is_empty(), "only critical events go directly");
    let second =
        |critical: &str| format!("{PAGES_CFG}\n[[workflows]]\nname = \"log\"\nevent = \"page.raised\"\n{critical}\n[[workflows.steps]]\nsleep = \"1h\"\n");
    assert!(DirectRoutes::of(&config(&second("")), &host).is_empty(), "an event that also starts an ordinary run goes through the batch");
    assert_eq!(DirectRoutes::of(&config(&second("critical = true\n")), &host).events(), ["page.raised"], "two critical runs of one event go directly");
    let signalled = format!(
        "{PAGES_CFG}\n[[workflows]]\nname = \"watch\"\nevent = \"page.resolved\"\nkey = \"{{id}}\"\n\n[[workflows.steps]]\nwait = {{ event = \"page.raised\", timeout = \"1h\" }}\n"
    );
    assert!(DirectRoutes::of(&config(&signalled), &host).is_empty(), "an event a run waits for by key needs the batch");
}

/// The other order of `a_direct_dispatch_in_flight_holds_back_the_cancel_of_its_key`:
/// a batch holds the dispatch lock while the direct dispatch has read the
/// raising event and waits for the lock. The direct statement must lock no
/// outbox row before it has the lock (the batch claims the row meanwhile,
/// unhindered), and, once it has the lock, must see that the batch took the
/// row, although its snapshot is older than the batch's commit (`FOR
/// UPDATE` re-checks a row updated meanwhile): no run is created.
pub async fn a_direct_dispatch_waiting_for_a_batch_takes_no_row_the_batch_took() {
    let db = TestDb::new().await;
    db.exec(PAGES).await;
    let app = start_app(&db, config(PAGES_CFG)).await;
    // "Another engine's batch" holds the dispatch lock.
    let mut batch = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(wardcall::runtime::DISPATCH_LOCK_KEY).execute(&mut *batch).await.unwrap();
    db.exec("INSERT INTO pages DEFAULT VALUES").await;
    await_true(
        &db,
        "the direct dispatch to wait for the dispatch lock",
        Duration::from_secs(5),
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = 'advisory'
                          AND query LIKE '%dispatch_lock AS MATERIALIZED%')",
    )
    .await;
    // The batch claims the row: it is not locked by the waiting statement
    // (were it locked, the two would wait for each other until one of them
    // is cancelled as a deadlock).
    sqlx::query("SELECT id FROM wardcall.outbox WHERE event = 'page.raised' FOR UPDATE NOWAIT")
        .execute(&mut *batch)
        .await
        .expect("the direct dispatch locked an outbox row before it had the dispatch lock");
    let claimed = sqlx::query(
        "UPDATE wardcall.outbox SET processed_at = clock_timestamp(), processed_by = 'another engine' WHERE event = 'page.raised' AND processed_at IS NULL",
    )
    .execute(&mut *batch)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(claimed, 1);
    batch.commit().await.unwrap();
    await_true(
        &db,
        "the direct dispatch to finish",
        Duration::from_secs(5),
        "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
                              AND state = 'active' AND query LIKE '%dispatch_lock AS MATERIALIZED%')",
    )
    .await;
    // A later page is dispatched: whatever the dispatcher would do with the
    // first one is done by then.
    let later = db.scalar_i64("INSERT INTO pages DEFAULT VALUES RETURNING id").await;
    await_true(&db, "the later page's run", Duration::from_secs(5), &format!("SELECT EXISTS (SELECT 1 FROM wardcall.runs WHERE input->>'id' = '{later}')"))
        .await;
    let runs = db.scalar_i64("SELECT count(*) FROM wardcall.runs").await;
    app.stop(Duration::from_secs(2)).await;
    assert_eq!(runs, 1, "the direct dispatch created a run for an event another batch had taken");
}

/// An event that starts two critical runs while one worker is free: the
/// direct dispatch takes whole events only, as many as there are free
/// workers for all of their runs. Were it to count events instead of runs,
/// it would create both runs leased to this engine with one worker to
/// start them: the second would wait for its lease to lapse (5 s) before
/// anyone ran it.
pub async fn an_event_with_more_runs_than_free_workers_starts_them_all_at_once() {
    let db = TestDb::new().await;
    db.exec(PAGES).await;
    let cfg = format!(
        "{}\n[[workflows]]\nname = \"log\"\nevent = \"page.raised\"\ncritical = true\n\n[[workflows.steps]]\nsleep = \"1h\"\n",
        PAGES_CFG.replace("sweep_ms = 100", "sweep_ms = 100\nworkers = 1")
    );
    let app = start_app(&db, config(&cfg)).await;
    db.exec("INSERT INTO pages DEFAULT VALUES").await;
    await_true(
        &db,
        "both runs of the event to have run their first step",
        Duration::from_secs(3),
        "SELECT count(*) = 2 FROM wardcall.runs WHERE status = 'sleeping'",
    )
    .await;
    app.stop(Duration::from_secs(2)).await;
}

/// The hospital's seizure alert, dispatched directly: its first tier calls
/// a person of the config, so the statement that creates the run also opens
/// its alert and commits the tier's intent (one transaction: the run's, the
/// alert's and the intent's audit records share one `xmin`, in that order),
/// before the message is rendered; the step then places the call with the
/// rendered message and writes it to the alert.
pub async fn a_direct_dispatch_commits_the_first_tier_with_the_run_and_the_message_follows() {
    use crate::escalation::{await_alert_status, calls_to, hospital, NURSE_A, SEIZURE_INSERT};
    use wardcall::devtools::twilio_emulator::Persona;
    let h = hospital(Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() }, Persona::NoAnswer, 10.0, 1).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    let trail: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, xmin::text FROM wardcall.audit_records
          WHERE action IN ('run.created', 'alert.opened', 'attempt.intent') ORDER BY id",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    let actions: Vec<&str> = trail.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(actions, ["run.created", "alert.opened", "attempt.intent"], "audited in order");
    assert!(trail.iter().all(|(_, x)| *x == trail[0].1), "the run, its alert and its intent committed in one transaction: {trail:?}");
    let message: Option<String> = sqlx::query_scalar("SELECT message FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    let message = message.expect("the alert's message was written");
    assert!(message.contains("Room 2") && message.contains("Seizure Activity Detected"), "rendered with its lookups: {message}");
    assert_eq!(calls_to(&h, NURSE_A), 1, "called once");
    let spoken = h.emulator.calls().iter().find(|c| c.to == NURSE_A).map(|c| c.spoken.clone()).unwrap_or_default();
    assert!(spoken.iter().any(|s| s.contains(&message)), "the call read the alert's message: {spoken:?}");
    h.stop().await;
}

/// An engine whose direct dispatch committed a run with its first tier
/// (`store::runs::claim_into_runs` with a tier: the alert without its
/// message, the intent) and died before its call and before writing the
/// message: the engine taking the run over renders the message, writes it
/// to the alert before its own call, and calls nurse A again under the
/// re-call rule (the intent of unknown outcome marked `unknown`, generation
/// 1), once; the alert is opened and audited once.
pub async fn a_takeover_after_the_dispatch_opened_the_first_tier_writes_the_message_and_calls_under_the_recall_rule() {
    use crate::escalation::{await_alert_status, calls_to, start_on, NURSE_A};
    use wardcall::devtools::twilio_emulator::Persona;
    use wardcall::store::alerts::{FirstIntent, OpenedWithIntents, TierIntents};
    use wardcall::store::runs::{claim_into_runs, NewRuns};
    let db = seizure_in_the_outbox().await;
    let (event_id, payload): (i64, serde_json::Value) = sqlx::query_as("SELECT id, payload FROM wardcall.outbox").fetch_one(&db.pool).await.unwrap();
    let workflows = ["critical-alert-call".to_string()];
    let events = ["alert.critical".to_string()];
    let runs = NewRuns {
        workflows: &workflows,
        event_ids: &[event_id],
        events: &events,
        inputs: std::slice::from_ref(&payload),
        leased: &[true],
        criticals: &[true],
        keys: &[payload.get("id").and_then(|v| v.as_str()).map(str::to_string)],
    };
    let tier = TierIntents {
        policy: "critical-care".into(),
        position: (0, 0),
        channel: "voice".into(),
        provider: "twilio".into(),
        reconcile_after_ms: 60_000,
        recipients: vec![FirstIntent { person_id: "nurse-avery".into(), person_name: "Avery Quinn".into(), destination: NURSE_A.into() }],
    };
    // The crashed engine's dispatch: its lease lapses at once.
    let created =
        claim_into_runs(&mut db.pool.acquire().await.unwrap(), &runs, &[Some(tier)], "crashed", 1, wardcall::runtime::DISPATCH_LOCK_KEY).await.unwrap();
    let Some(Some(dispatched)) = created.into_iter().next() else { panic!("the run was created") };
    let Some(OpenedWithIntents::Opened { intents, .. }) = dispatched.first_tier else { panic!("the tier was opened: {:?}", dispatched.first_tier) };
    assert_eq!(intents.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), ["nurse-avery"]);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.alerts WHERE message IS NULL").await, 1, "opened without its message");

    let h = start_on(db, Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() }, Persona::NoAnswer, 10.0, 1).await;
    await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    assert_eq!(calls_to(&h, NURSE_A), 1, "the intent of unknown outcome was called again, once");
    let message: Option<String> = sqlx::query_scalar("SELECT message FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    let message = message.expect("the taking-over engine wrote the alert's message");
    assert!(message.contains("Room 2"), "rendered: {message}");
    let spoken = h.emulator.calls().iter().find(|c| c.to == NURSE_A).map(|c| c.spoken.clone()).unwrap_or_default();
    assert!(spoken.iter().any(|s| s.contains(&message)), "the call read the alert's message: {spoken:?}");
    called_again_once_under_the_recall_rule(&h).await;
    h.stop().await;
}

/// The dispatch fenced the run when it committed its first tier; the step
/// that places the calls comes later, normally within a millisecond, but
/// here its lookup takes a second and a half (a slow team query, under its
/// 2 s timeout). The alert is
/// resolved meanwhile (`cancel_on`): the run is cancelled, and the step,
/// checking the run before it calls because it came late, calls nobody.
pub async fn a_dispatched_tier_whose_step_came_late_calls_nobody_for_a_cancelled_run() {
    use crate::escalation::{calls_to, start_with, NURSE_A, SEIZURE_INSERT};
    use wardcall::devtools::twilio_emulator::Persona;
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let answer = Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() };
    let h = start_with(db, answer, Persona::NoAnswer, |cfg| {
        let escalate = cfg.workflows[0].steps[0].escalate.as_mut().expect("the hospital escalates");
        escalate.lookups.insert("room_name".into(), "SELECT room_name FROM rooms, pg_sleep(1.5) WHERE room_id = ($1->>'room_id')::uuid".into());
    })
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    await_true(
        &h.db,
        "the run's first tier opened by its dispatch",
        Duration::from_secs(5),
        "SELECT EXISTS (SELECT 1 FROM wardcall.notification_attempts WHERE status = 'intent')",
    )
    .await;
    h.db.exec("UPDATE alerts SET status = 'resolved'").await;
    await_true(&h.db, "the run cancelled", Duration::from_secs(5), "SELECT EXISTS (SELECT 1 FROM wardcall.runs WHERE status = 'cancelled')").await;
    // An absence: the lookup ends a second and a half after the dispatch;
    // the step would have called by then.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(calls_to(&h, NURSE_A), 0, "a cancelled run's dispatched tier was called");
    h.stop().await;
}

/// A direct dispatch whose statement took longer to commit than its runs'
/// leases last (a synchronous standby gone for a second; here a trigger
/// sleeps inside the statement, after the leases were set) returns with
/// the lease lapsed, and another engine may take the run over the moment
/// the commit lands (here a session queued on the outbox row's lock bumps
/// the token as a claim would). The dispatching engine must not call then:
/// its step renews the lease under its own token before the calls, and
/// that fails. (Timed from the statement's reply, the step took itself for
/// fresh and called, beside the engine that took the run over.) The claim
/// races the step's renewal; warmed up, it wins (its backend wakes at the
/// commit, before the engine reads the reply). Should the renewal win, the
/// engine rightly holds the run and calls once, and the test says so.
pub async fn a_dispatch_whose_commit_outlasted_the_lease_calls_nobody_once_the_run_is_taken_over() {
    use crate::escalation::{calls_to, start_with, NURSE_A, SEIZURE_INSERT};
    use wardcall::devtools::twilio_emulator::Persona;
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    db.exec(
        "CREATE TABLE public.stall_once (armed bool); INSERT INTO public.stall_once VALUES (true);
         CREATE FUNCTION public.stall_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           DELETE FROM public.stall_once;
           IF FOUND THEN PERFORM pg_sleep(1); END IF;
           RETURN NULL;
         END $$;
         CREATE TRIGGER stall_once AFTER INSERT ON wardcall.audit_records
           FOR EACH ROW WHEN (NEW.action = 'alert.opened') EXECUTE FUNCTION public.stall_once();",
    )
    .await;
    let answer = Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() };
    let h = start_with(db, answer, Persona::NoAnswer, |cfg| cfg.engine.lease_ms = 500).await;
    // What another engine's claim does to a lapsed run, as one call: run
    // once first (nothing to take), so that its plans are cached and it
    // takes the run microseconds after the dispatch commits.
    h.db.exec(
        "CREATE FUNCTION public.take_over_lapsed_runs() RETURNS int LANGUAGE plpgsql AS $$
         DECLARE taken int;
         BEGIN
           PERFORM 1 FROM wardcall.outbox FOR UPDATE;
           UPDATE wardcall.runs SET fencing_token = fencing_token + 1, lease_owner = 'another-engine',
                  due_at = clock_timestamp() + interval '1 hour'
            WHERE status = 'running' AND due_at < clock_timestamp();
           GET DIAGNOSTICS taken = ROW_COUNT;
           RETURN taken;
         END $$",
    )
    .await;
    let mut other = h.db.options.connect().await.unwrap();
    let nothing: i32 = sqlx::query_scalar("SELECT public.take_over_lapsed_runs()").fetch_one(&mut other).await.unwrap();
    assert_eq!(nothing, 0);
    h.db.exec(SEIZURE_INSERT).await;
    await_true(
        &h.db,
        "the dispatch statement stalled after setting the lease",
        Duration::from_secs(5),
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep')",
    )
    .await;
    // Another engine's claim, the moment the dispatch commits: it waits
    // for the outbox row the statement holds, then takes the lapsed run.
    let taken: i32 = sqlx::query_scalar("SELECT public.take_over_lapsed_runs()").fetch_one(&mut other).await.unwrap();
    if taken == 1 {
        // An absence: the dispatched step would have called within milliseconds.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(calls_to(&h, NURSE_A), 0, "the dispatching engine called for a run another engine had taken over");
    } else {
        // The engine renewed the lease (its step, or its scheduler's own
        // takeover) before the claim came (the claim's backend was
        // scheduled late): the engine holds the run and calls, once.
        eprintln!("the engine renewed the lease before the takeover: it calls (the takeover branch was not exercised this time)");
        await_some("the engine's call", Duration::from_secs(5), || async { (calls_to(&h, NURSE_A) >= 1).then_some(()) }).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(calls_to(&h, NURSE_A), 1, "called once");
    }
    h.stop().await;
}

/// One dispatch statement (`store::runs::claim_into_runs` with tiers) for
/// four events: a run with a tier of two people, a run without a tier, a
/// run whose key a live run holds (not created: no alert, no intent), and a
/// run with a tier of one. Each created run with a tier gets its own alert
/// (no message yet) and its own intents, in recipient order, fenced by its
/// token; the audit trail has every `run.created` first, then run by run
/// its `alert.opened` and its intents.
pub async fn a_dispatch_opening_several_tiers_keeps_each_run_to_itself() {
    use wardcall::store::alerts::{FirstIntent, OpenedWithIntents, TierIntents};
    use wardcall::store::runs::{claim_into_runs, NewRuns};
    let db = TestDb::new().await;
    let mut ids = Vec::new();
    for n in 1..=4 {
        ids.push(db.scalar_i64(&format!("SELECT wardcall.emit('page.raised', '{{\"n\": {n}}}'::jsonb, NULL)")).await);
    }
    db.exec("INSERT INTO wardcall.runs (workflow, event, input, step, status, key) VALUES ('page', 'page.raised', '{}', 'start', 'sleeping', 'k3')").await;
    let workflows: Vec<String> = vec!["page".into(); 4];
    let events: Vec<String> = vec!["page.raised".into(); 4];
    let inputs: Vec<serde_json::Value> = (1..=4).map(|n| serde_json::json!({ "n": n })).collect();
    let keys: Vec<Option<String>> = (1..=4).map(|n| Some(format!("k{n}"))).collect();
    let runs = NewRuns { workflows: &workflows, event_ids: &ids, events: &events, inputs: &inputs, leased: &[true; 4], criticals: &[true; 4], keys: &keys };
    let person = |id: &str, phone: &str| FirstIntent { person_id: id.into(), person_name: format!("Name of {id}"), destination: phone.into() };
    let tier = |people: Vec<FirstIntent>| TierIntents {
        policy: "p".into(),
        position: (0, 0),
        channel: "voice".into(),
        provider: "twilio".into(),
        reconcile_after_ms: 60_000,
        recipients: people,
    };
    let tiers = vec![
        Some(tier(vec![person("ann", "+15550000001"), person("bob", "+15550000002")])),
        None,
        Some(tier(vec![person("cid", "+15550000003")])),
        Some(tier(vec![person("dee", "+15550000004")])),
    ];
    let created = claim_into_runs(&mut db.pool.acquire().await.unwrap(), &runs, &tiers, "e1", 60_000, wardcall::runtime::DISPATCH_LOCK_KEY).await.unwrap();
    let created: Vec<_> = created.into_iter().map(|c| c.expect("leased")).collect();
    let inputs_created: Vec<i64> = created.iter().map(|c| c.run.input["n"].as_i64().unwrap()).collect();
    assert_eq!(inputs_created, [1, 2, 4], "created in order; the third's key is held by a live run");
    let people_of = |i: usize| match &created[i].first_tier {
        Some(OpenedWithIntents::Opened { intents, .. }) => intents.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        other => panic!("run {i}: {other:?}"),
    };
    assert_eq!(people_of(0), ["ann", "bob"]);
    assert!(created[1].first_tier.is_none(), "no tier, no alert");
    assert_eq!(people_of(2), ["dee"]);
    for c in &created {
        let Some(OpenedWithIntents::Opened { alert, intents }) = &c.first_tier else { continue };
        let rows: Vec<(uuid::Uuid, uuid::Uuid, i64, String)> =
            sqlx::query_as("SELECT n.id, n.alert_id, n.fencing_token, n.status FROM wardcall.notification_attempts n WHERE n.run_id = $1 ORDER BY n.person_id")
                .bind(c.run.id)
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(rows.len(), intents.len());
        for (id, alert_id, token, status) in rows {
            assert!(intents.iter().any(|(_, i)| *i == id));
            assert_eq!((alert_id, token, status.as_str()), (*alert, c.run.fencing_token, "intent"));
        }
        let (run_of_alert, message): (uuid::Uuid, Option<String>) =
            sqlx::query_as("SELECT run_id, message FROM wardcall.alerts WHERE id = $1").bind(alert).fetch_one(&db.pool).await.unwrap();
        assert_eq!((run_of_alert, message), (c.run.id, None));
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.alerts").await, 2);
    let trail: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, coalesce(detail->>'person_id', '') FROM wardcall.audit_records
          WHERE action IN ('run.created', 'alert.opened', 'attempt.intent') ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let trail: Vec<String> = trail.into_iter().map(|(a, p)| if p.is_empty() { a } else { format!("{a} {p}") }).collect();
    assert_eq!(
        trail,
        ["run.created", "run.created", "run.created", "alert.opened", "attempt.intent ann", "attempt.intent bob", "alert.opened", "attempt.intent dee"]
    );
}
