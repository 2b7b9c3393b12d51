//! Capture from the team's tables and the durable runtime.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;
use wardcall::config::Config;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        capture_runtime::committed_row_starts_a_run,
        capture_runtime::a_run_whose_last_step_was_retried_completes_without_its_error,
        capture_runtime::rolled_back_row_starts_nothing,
        capture_runtime::one_notify_per_statement_and_condition_filters,
        capture_runtime::update_capture_sees_old_and_new,
        capture_runtime::rows_inserted_while_no_engine_runs_are_processed_on_start,
        capture_runtime::killing_the_listener_connection_loses_nothing,
        capture_runtime::emit_dedup_key_starts_one_run,
        capture_runtime::two_engines_run_each_step_once,
        capture_runtime::signal_before_wait_is_kept,
        capture_runtime::signal_racing_timeout_has_exactly_one_outcome,
        capture_runtime::retries_end_in_failed_with_error_kept,
        capture_runtime::sleep_due_while_engine_down_fires_on_start,
        capture_runtime::cancel_stops_a_run,
        capture_runtime::audit_log_is_append_only,
        capture_runtime::steps_logged_before_migration_18_stay_in_the_trail_once,
        capture_runtime::source_removed_from_config_loses_its_trigger,
        capture_runtime::bad_condition_is_refused_naming_the_source,
        capture_runtime::worker_process_killed_mid_step_is_taken_over,
        capture_runtime::bad_config_gives_a_clear_error,
        capture_runtime::api_rejects_malformed_json,
        capture_runtime::serve_lifecycle_sigterm_and_killed_cluster_reuse,
    ]
}

const TASKS_TABLE: &str = "CREATE TABLE IF NOT EXISTS tasks (id bigserial PRIMARY KEY, kind text NOT NULL, steps jsonb NOT NULL DEFAULT '[]')";

fn script_config(extra: &str) -> String {
    format!(
        r#"
[engine]
lease_ms = 2000
sweep_ms = 200
poll_ms = 100

[[sources]]
name = "tasks"
table = "tasks"
operations = ["INSERT"]
condition = "NEW.kind = 'go'"
event = "task.created"

[[workflows]]
name = "script"
event = "task.created"
kind = "script"
max_attempts = 3
retry_base_ms = 20
retry_max_ms = 100
{extra}
"#
    )
}

async fn run_statuses(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT status FROM wardcall.runs ORDER BY created_at").fetch_all(&db.pool).await.unwrap()
}

pub async fn committed_row_starts_a_run() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(""))).await;
    db.exec(r#"INSERT INTO tasks (kind, steps) VALUES ('go', '[{"op":"step","name":"a"},{"op":"step","name":"b"}]')"#).await;
    await_true(&db, "the run to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    let (input, state): (Value, Value) = sqlx::query_as("SELECT input, state FROM wardcall.runs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(input["kind"], "go");
    assert_eq!(state["results"]["0"]["name"], "a");
    assert_eq!(state["results"]["1"]["name"], "b");
    // Every state change is audited and nothing was deleted.
    let actions: Vec<String> = sqlx::query_scalar("SELECT action FROM wardcall.audit_log WHERE entity = 'run' ORDER BY id").fetch_all(&db.pool).await.unwrap();
    // The last step ends the run in its own transition.
    assert_eq!(actions, vec!["run.created", "run.step_completed", "run.completed"]);
    let ended_at: String =
        sqlx::query_scalar("SELECT detail->>'step' FROM wardcall.audit_log WHERE action = 'run.completed'").fetch_one(&db.pool).await.unwrap();
    assert_eq!(ended_at, "op:1");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox WHERE processed_at IS NOT NULL").await, 1);
    app.stop(Duration::from_secs(2)).await;
}

/// The last step ends the run in its own transition: when that step failed
/// once before it succeeded, the completed run keeps neither its error nor
/// its attempt count (a `Next` used to clear them first).
pub async fn a_run_whose_last_step_was_retried_completes_without_its_error() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(""))).await;
    db.exec(r#"INSERT INTO tasks (kind, steps) VALUES ('go', '[{"op":"step"},{"op":"fail","times":1,"error":"flaky"}]')"#).await;
    await_true(&db, "the run to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    let (last_error, step_attempt): (Option<String>, i32) =
        sqlx::query_as("SELECT last_error, step_attempt FROM wardcall.runs").fetch_one(&db.pool).await.unwrap();
    assert_eq!((last_error, step_attempt), (None, 0));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.retry_scheduled'").await, 1, "the step failed once");
    app.stop(Duration::from_secs(2)).await;
}

pub async fn rolled_back_row_starts_nothing() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(""))).await;
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO tasks (kind) VALUES ('go')").execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    // A committed marker row after it: once its run exists, the rolled-back one would have too.
    db.exec("INSERT INTO tasks (kind, steps) VALUES ('go', '[{\"op\":\"step\",\"name\":\"marker\"}]')").await;
    await_true(&db, "the marker run to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 1);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.runs").await, 1);
    app.stop(Duration::from_secs(2)).await;
}

pub async fn one_notify_per_statement_and_condition_filters() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let cfg = config(&script_config(""));
    wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen("wardcall_outbox").await.unwrap();
    // 100 rows in one statement, 40 of which match the condition.
    db.exec("INSERT INTO tasks (kind) SELECT CASE WHEN g % 5 < 2 THEN 'go' ELSE 'skip' END FROM generate_series(1, 100) g").await;
    let first = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.expect("a notification").unwrap();
    assert_eq!(first.payload(), "", "NOTIFY carries no payload");
    // A marker NOTIFY after the statement: nothing else may arrive before it.
    db.exec("SELECT pg_notify('wardcall_outbox', 'marker')").await;
    let next = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.unwrap().unwrap();
    assert_eq!(next.payload(), "marker", "exactly one NOTIFY for the 100-row statement");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 40);
    // A statement that matches nothing sends nothing.
    db.exec("INSERT INTO tasks (kind) VALUES ('skip')").await;
    db.exec("SELECT pg_notify('wardcall_outbox', 'marker2')").await;
    let next = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.unwrap().unwrap();
    assert_eq!(next.payload(), "marker2");
}

pub async fn update_capture_sees_old_and_new() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE bookings (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), status text NOT NULL, scheduled_at timestamptz NOT NULL)").await;
    let cfg = config(
        r#"
[[sources]]
name = "booking_moves"
table = "public.bookings"
operations = ["UPDATE"]
condition = "NEW.scheduled_at IS DISTINCT FROM OLD.scheduled_at"
event = "booking.rescheduled"
payload = "jsonb_build_object('id', NEW.id, 'from', OLD.scheduled_at, 'to', NEW.scheduled_at)"

[[workflows]]
name = "reschedule"
event = "booking.rescheduled"
kind = "script"
"#,
    );
    wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap();
    db.exec("INSERT INTO bookings (status, scheduled_at) VALUES ('pending', '2026-11-22 10:00Z'), ('pending', '2026-11-22 11:00Z')").await;
    db.exec("UPDATE bookings SET status = 'scheduled'").await; // no move: no event
    db.exec("UPDATE bookings SET scheduled_at = scheduled_at + interval '1 hour' WHERE scheduled_at = '2026-11-22 10:00Z'").await;
    let payloads: Vec<Value> = sqlx::query_scalar("SELECT payload FROM wardcall.outbox").fetch_all(&db.pool).await.unwrap();
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    assert!(payloads[0]["from"].as_str().unwrap().starts_with("2026-11-22T10:00:00"));
    assert!(payloads[0]["to"].as_str().unwrap().starts_with("2026-11-22T11:00:00"));
    // Installing twice is idempotent.
    wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap();
    assert_eq!(db.scalar_i64("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'wardcall_capture_%'").await, 1);
}

pub async fn rows_inserted_while_no_engine_runs_are_processed_on_start() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let cfg = config(&script_config(""));
    wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap();
    db.exec("INSERT INTO tasks (kind, steps) SELECT 'go', '[{\"op\":\"step\"}]' FROM generate_series(1, 25)").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox WHERE processed_at IS NULL").await, 25);
    let app = start_app(&db, cfg).await;
    await_true(&db, "25 completed runs", Duration::from_secs(15), "SELECT count(*) = 25 FROM wardcall.runs WHERE status = 'completed'").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox WHERE processed_at IS NULL").await, 0);
    app.stop(Duration::from_secs(2)).await;
}

pub async fn killing_the_listener_connection_loses_nothing() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(""))).await;
    await_true(
        &db,
        "the listener to connect",
        Duration::from_secs(10),
        "SELECT count(*) >= 1 FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .await;
    // Backends already terminated: one may still be listed for a moment
    // after `pg_terminate_backend` returns, so each round waits for a
    // listener that is not one of them (the engine's reconnection).
    let mut terminated: Vec<i32> = Vec::new();
    for round in 0..3 {
        let known = format!("ARRAY[{}]::int[]", terminated.iter().map(i32::to_string).collect::<Vec<_>>().join(","));
        await_true(
            &db,
            "the listener to be connected",
            Duration::from_secs(10),
            &format!("SELECT count(*) >= 1 FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> ALL ({known})"),
        )
        .await;
        let killed: Vec<i32> = sqlx::query_scalar(&format!(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid() AND pid <> ALL ({known})
                AND pg_terminate_backend(pid)"
        ))
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert!(!killed.is_empty(), "round {round}: no listener backend found");
        terminated.extend(killed);
        db.exec("INSERT INTO tasks (kind, steps) VALUES ('go', '[{\"op\":\"step\"}]')").await;
    }
    await_true(&db, "all three runs complete", Duration::from_secs(10), "SELECT count(*) = 3 FROM wardcall.runs WHERE status = 'completed'").await;
    // And the listener came back.
    await_true(
        &db,
        "the listener to reconnect",
        Duration::from_secs(10),
        "SELECT count(*) >= 1 FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .await;
    app.stop(Duration::from_secs(2)).await;
}

pub async fn emit_dedup_key_starts_one_run() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(""))).await;
    for _ in 0..3 {
        db.exec("SELECT wardcall.emit('task.created', '{\"steps\":[{\"op\":\"step\"}]}', 'booking-42')").await;
    }
    await_true(&db, "the run to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 1);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.runs").await, 1);
    app.stop(Duration::from_secs(2)).await;
}

pub async fn two_engines_run_each_step_once() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    // Four workers each and a first step that holds its worker 20 ms: one
    // engine alone cannot take all 60 runs at once (with the default 128
    // workers, a loaded machine let the first engine to wake claim them all).
    let cfg = config(&script_config("").replace("poll_ms = 100", "poll_ms = 100\nworkers = 4"));
    let a = start_app(&db, cfg.clone()).await;
    let b = start_app(&db, cfg).await;
    db.exec(
        "INSERT INTO tasks (kind, steps) SELECT 'go', '[{\"op\":\"work\",\"ms\":20},{\"op\":\"sleep\",\"ms\":30},{\"op\":\"step\"},{\"op\":\"wait\",\"signal\":\"x\",\"timeout_ms\":50},{\"op\":\"step\"}]' FROM generate_series(1, 60)",
    )
    .await;
    await_true(&db, "60 completed runs", Duration::from_secs(30), "SELECT count(*) = 60 FROM wardcall.runs WHERE status = 'completed'").await;
    // Each run: each step transition committed exactly once.
    let dupes = db
        .scalar_i64(
            "SELECT count(*) FROM (SELECT entity_id, action, detail->>'from_step' FROM wardcall.audit_log
              WHERE entity = 'run' AND action IN ('run.step_completed','run.sleeping','run.waiting','run.completed')
              GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
        )
        .await;
    assert_eq!(dupes, 0);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.completed'").await, 60);
    // Both engines did work.
    let per_actor: Vec<(String, i64)> =
        sqlx::query_as("SELECT actor, count(*) FROM wardcall.audit_log WHERE action IN ('run.claimed','run.created') GROUP BY actor ORDER BY actor")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    eprintln!("claims and creations per engine: {per_actor:?}");
    let owners = per_actor.len();
    assert!(owners >= 2, "only one engine worked ({owners} distinct actors claimed or created runs)");
    a.stop(Duration::from_secs(2)).await;
    b.stop(Duration::from_secs(2)).await;
}

async fn only_run(db: &TestDb) -> uuid::Uuid {
    let pool = db.pool.clone();
    await_some("a run", Duration::from_secs(10), || {
        let pool = pool.clone();
        async move { sqlx::query_scalar("SELECT id FROM wardcall.runs LIMIT 1").fetch_optional(&pool).await.unwrap() }
    })
    .await
}

pub async fn signal_before_wait_is_kept() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(""))).await;
    db.exec(r#"SELECT wardcall.emit('task.created', '{"steps":[{"op":"work","ms":300},{"op":"wait","signal":"ack","timeout_ms":60000}]}')"#).await;
    let run = only_run(&db).await;
    // The run is still in its first step: the signal arrives before the wait exists.
    let status: String = sqlx::query_scalar("SELECT status FROM wardcall.runs WHERE id = $1").bind(run).fetch_one(&db.pool).await.unwrap();
    assert_ne!(status, "waiting");
    sqlx::query("SELECT wardcall.send_signal($1, 'ack', '{\"by\":\"early\"}')").bind(run).execute(&db.pool).await.unwrap();
    await_true(&db, "the run to complete on the kept signal", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'")
        .await;
    let state: Value = sqlx::query_scalar("SELECT state FROM wardcall.runs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(state["results"]["1"]["payload"]["by"], "early", "{state}");
    assert!(state["results"]["1"].get("timeout").is_none());
    app.stop(Duration::from_secs(2)).await;
}

pub async fn signal_racing_timeout_has_exactly_one_outcome() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(""))).await;
    let n = 40;
    for i in 0..n {
        sqlx::query("SELECT wardcall.emit('task.created', $1)")
            .bind(json!({"i": i, "steps": [{"op": "wait", "signal": "ack", "timeout_ms": 2500 + (i % 8) * 10}, {"op": "step"}]}))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    await_true(&db, "all runs waiting", Duration::from_secs(10), &format!("SELECT count(*) = {n} FROM wardcall.runs WHERE status = 'waiting'")).await;
    // Aim each run's signal at its own deadline, from 45 ms before to 5 ms after
    // (the sending loop itself runs a few ms late).
    let deadlines: Vec<(uuid::Uuid, f64)> =
        sqlx::query_as("SELECT id, (extract(epoch FROM wait_deadline - clock_timestamp()) * 1000)::float8 FROM wardcall.runs ORDER BY wait_deadline")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let start = std::time::Instant::now();
    for (k, (run, ms_left)) in deadlines.iter().enumerate() {
        let offset = (k % 5) as f64 * 12.5 - 45.0;
        let target = Duration::from_micros(((ms_left + offset).max(0.0) * 1000.0) as u64);
        if let Some(d) = target.checked_sub(start.elapsed()) {
            tokio::time::sleep(d).await;
        }
        sqlx::query("SELECT wardcall.send_signal($1, 'ack', '{}')").bind(run).execute(&db.pool).await.unwrap();
    }
    await_true(&db, "all runs complete", Duration::from_secs(15), &format!("SELECT count(*) = {n} FROM wardcall.runs WHERE status = 'completed'")).await;
    // Exactly one outcome per run, and a losing signal is kept, unconsumed.
    let rows: Vec<(uuid::Uuid, i64, i64, i64)> = sqlx::query_as(
        "SELECT r.id,
                (SELECT count(*) FROM wardcall.audit_log l WHERE l.entity_id = r.id::text AND l.action = 'run.signal_received'),
                (SELECT count(*) FROM wardcall.audit_log l WHERE l.entity_id = r.id::text AND l.action = 'run.wait_timed_out'),
                (SELECT count(*) FROM wardcall.signals s WHERE s.run_id = r.id AND s.consumed_at IS NOT NULL)
           FROM wardcall.runs r",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut by_signal = 0;
    for (id, received, timed_out, consumed) in rows {
        assert_eq!(received + timed_out, 1, "run {id}: {received} signal outcomes, {timed_out} timeouts");
        assert_eq!(consumed, received, "run {id}: a signal is consumed only by the outcome it produced");
        by_signal += received;
    }
    eprintln!("signal won {by_signal} of {n} races");
    assert!(by_signal > 0 && by_signal < n as i64, "both outcomes should occur in {n} races (signal won {by_signal})");
    // A signal committed before the deadline always wins.
    let early_losers = db
        .scalar_i64(
            "SELECT count(*) FROM wardcall.signals s JOIN wardcall.runs r ON r.id = s.run_id WHERE s.consumed_at IS NULL AND s.created_at < r.wait_deadline",
        )
        .await;
    assert_eq!(early_losers, 0, "a signal that arrived before the deadline lost to the timeout");
    app.stop(Duration::from_secs(2)).await;
}

pub async fn retries_end_in_failed_with_error_kept() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(""))).await;
    db.exec(r#"SELECT wardcall.emit('task.created', '{"steps":[{"op":"fail","times":-1,"error":"downstream 503"}]}')"#).await;
    db.exec(r#"SELECT wardcall.emit('task.created', '{"steps":[{"op":"fail","times":2,"error":"flaky"},{"op":"step"}]}')"#).await;
    await_true(&db, "both runs finished", Duration::from_secs(10), "SELECT count(*) = 2 FROM wardcall.runs WHERE status IN ('failed','completed')").await;
    let (status, error, attempts): (String, String, i32) =
        sqlx::query_as("SELECT status, last_error, step_attempt FROM wardcall.runs WHERE input->'steps'->0->>'error' = 'downstream 503'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(error.contains("downstream 503"), "{error}");
    assert_eq!(attempts, 3);
    let retries = db.scalar_i64("SELECT count(*) FROM wardcall.audit_log l JOIN wardcall.runs r ON l.entity_id = r.id::text WHERE r.status = 'failed' AND l.action = 'run.retry_scheduled'").await;
    assert_eq!(retries, 2);
    let status: String = sqlx::query_scalar("SELECT status FROM wardcall.runs WHERE input->'steps'->0->>'error' = 'flaky'").fetch_one(&db.pool).await.unwrap();
    assert_eq!(status, "completed", "a step that recovers within the limit completes");
    app.stop(Duration::from_secs(2)).await;
}

pub async fn sleep_due_while_engine_down_fires_on_start() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let cfg = config(&script_config(""));
    let app = start_app(&db, cfg.clone()).await;
    db.exec(r#"SELECT wardcall.emit('task.created', '{"steps":[{"op":"sleep","ms":400},{"op":"step","name":"after"}]}')"#).await;
    await_true(&db, "the run to sleep", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'sleeping'").await;
    app.stop(Duration::from_secs(2)).await;
    await_true(
        &db,
        "the sleep to fall due with no engine running",
        Duration::from_secs(10),
        "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'sleeping' AND due_at < clock_timestamp()",
    )
    .await;
    let app = start_app(&db, cfg).await;
    await_true(&db, "the run to complete after restart", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    app.stop(Duration::from_secs(2)).await;
}

pub async fn cancel_stops_a_run() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(""))).await;
    db.exec(r#"SELECT wardcall.emit('task.created', '{"steps":[{"op":"wait","signal":"never","timeout_ms":60000},{"op":"step"}]}')"#).await;
    await_true(&db, "the run to wait", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'waiting'").await;
    let run = only_run(&db).await;
    assert!(wardcall::workflows::cancel_run(&db.pool, &wardcall::config::Config::default(), run, "test", "no longer needed").await.unwrap());
    assert!(!wardcall::workflows::cancel_run(&db.pool, &wardcall::config::Config::default(), run, "test", "twice").await.unwrap());
    sqlx::query("SELECT wardcall.send_signal($1, 'never', '{}')").bind(run).execute(&db.pool).await.unwrap();
    assert_eq!(run_statuses(&db).await, vec!["cancelled"]);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.cancelled'").await, 1);
    app.stop(Duration::from_secs(2)).await;
}

/// The audit trail (`wardcall.audit_log`, a view) is its two tables, the
/// audit records and the step log, in one order; neither table can be
/// changed, emptied or shortened, and neither can the view.
pub async fn audit_log_is_append_only() {
    let db = TestDb::new().await;
    db.exec("SELECT wardcall.emit('nothing', '{}')").await;
    db.exec("INSERT INTO wardcall.audit_records (entity, entity_id, action, actor) VALUES ('run', 'x', 'test', 'test')").await;
    db.exec(
        "INSERT INTO wardcall.run_steps (run_id, seq, step, next_step, patch, fencing_token, actor)
         VALUES ('00000000-0000-0000-0000-000000000001', 1, 'op:0', 'op:1', '[]', 1, 'engine:test')",
    )
    .await;
    db.exec("INSERT INTO wardcall.audit_records (entity, entity_id, action, actor) VALUES ('run', 'y', 'test', 'test')").await;
    let trail: Vec<(String, String, String, serde_json::Value)> =
        sqlx::query_as("SELECT entity_id, action, actor, detail FROM wardcall.audit_log ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert_eq!(
        trail,
        vec![
            ("x".into(), "test".into(), "test".into(), serde_json::json!({})),
            (
                "00000000-0000-0000-0000-000000000001".into(),
                "run.step_completed".into(),
                "engine:test".into(),
                serde_json::json!({"from_step": "op:0", "to_step": "op:1"})
            ),
            ("y".into(), "test".into(), "test".into(), serde_json::json!({})),
        ],
        "one trail, in the order the rows were written"
    );
    for table in ["wardcall.audit_records", "wardcall.run_steps"] {
        for sql in [format!("UPDATE {table} SET actor = 'forged'"), format!("DELETE FROM {table}"), format!("TRUNCATE {table}")] {
            let err = sqlx::raw_sql(&sql).execute(&db.pool).await.expect_err(&sql);
            assert!(err.to_string().contains("append-only"), "{sql}: {err}");
        }
    }
    for sql in ["UPDATE wardcall.audit_log SET action = 'forged'", "DELETE FROM wardcall.audit_log", "TRUNCATE wardcall.audit_log"] {
        sqlx::raw_sql(sql).execute(&db.pool).await.expect_err(sql);
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log").await, 3);
    // A logged step always joins the trail: no step without its number or actor.
    let refused = sqlx::raw_sql(
        "INSERT INTO wardcall.run_steps (run_id, seq, step, next_step, patch, fencing_token, actor, audit_id)
         VALUES ('00000000-0000-0000-0000-000000000001', 2, 'op:1', 'op:2', '[]', 1, 'engine:test', NULL)",
    )
    .execute(&db.pool)
    .await
    .expect_err("a step row without an audit id");
    assert!(refused.to_string().contains("run_steps_audited"), "{refused}");
}

/// A database upgraded to migration 18 with steps logged (and audited, in
/// the table of the time) before it: each of those steps is in the trail
/// once, later steps join it, and a role that could read the audit log
/// still can.
pub async fn steps_logged_before_migration_18_stay_in_the_trail_once() {
    let db = TestDb::new().await;
    db.exec(
        "DROP SCHEMA wardcall CASCADE;
         CREATE SCHEMA wardcall;
         CREATE TABLE wardcall.schema_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .await;
    for (version, name, sql) in wardcall::db::migrate::MIGRATIONS.iter().filter(|(v, _, _)| *v < 18) {
        db.exec(sql).await;
        sqlx::query("INSERT INTO wardcall.schema_migrations (version, name) VALUES ($1, $2)").bind(version).bind(name).execute(&db.pool).await.unwrap();
    }
    let auditor = format!("{}_auditor", db.name);
    db.exec(&format!(
        "CREATE ROLE {auditor};
         GRANT SELECT ON wardcall.audit_log TO {auditor};
         INSERT INTO wardcall.run_steps (run_id, seq, step, next_step, patch, fencing_token)
         VALUES ('00000000-0000-0000-0000-000000000001', 1, 'op:0', 'op:1', '[]', 1);
         INSERT INTO wardcall.audit_log (entity, entity_id, action, from_state, to_state, actor, detail)
         VALUES ('run', '00000000-0000-0000-0000-000000000001', 'run.step_completed', 'running', 'running', 'engine:old',
                 '{{\"from_step\": \"op:0\", \"to_step\": \"op:1\"}}')"
    ))
    .await;
    let from_18 = wardcall::db::migrate::MIGRATIONS.iter().filter(|(v, _, _)| *v >= 18).count();
    assert_eq!(wardcall::db::migrate::migrate(&db.pool).await.unwrap(), from_18, "migration 18 and the later ones");
    db.exec(
        "INSERT INTO wardcall.run_steps (run_id, seq, step, next_step, patch, fencing_token, actor)
         VALUES ('00000000-0000-0000-0000-000000000001', 2, 'op:1', 'op:2', '[]', 1, 'engine:new')",
    )
    .await;
    let trail: Vec<(String, String)> =
        sqlx::query_as("SELECT actor, detail->>'from_step' FROM wardcall.audit_log WHERE entity_id = '00000000-0000-0000-0000-000000000001' ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(trail, vec![("engine:old".to_string(), "op:0".to_string()), ("engine:new".to_string(), "op:1".to_string())], "each step once, in order");
    let readable: bool = sqlx::query_scalar("SELECT has_table_privilege($1, 'wardcall.audit_log', 'SELECT')").bind(&auditor).fetch_one(&db.pool).await.unwrap();
    db.exec(&format!("REVOKE ALL ON ALL TABLES IN SCHEMA wardcall FROM {auditor}; DROP ROLE {auditor}")).await;
    assert!(readable, "the view keeps the table's readers");
}

pub async fn source_removed_from_config_loses_its_trigger() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    wardcall::app::prepare_database(&db.database(), &config(&script_config("")), "test").await.unwrap();
    assert_eq!(db.scalar_i64("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'wardcall_capture_%'").await, 1);
    // Without a config file (built-in defaults) nothing is removed...
    wardcall::app::prepare_database(&db.database(), &Config::default(), "test").await.unwrap();
    assert_eq!(db.scalar_i64("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'wardcall_capture_%'").await, 1);
    // ...a config file without the source keeps it too (it may belong to
    // another config); only an explicit --prune removes it.
    wardcall::app::prepare_database(&db.database(), &config(""), "test").await.unwrap();
    assert_eq!(db.scalar_i64("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'wardcall_capture_%'").await, 1);
    let mut pruning = (*config("")).clone();
    pruning.prune_sources = true;
    wardcall::app::prepare_database(&db.database(), &pruning, "test").await.unwrap();
    assert_eq!(db.scalar_i64("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'wardcall_capture_%'").await, 0);
    db.exec("INSERT INTO tasks (kind) VALUES ('go')").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 0);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'source.removed'").await, 1);
}

pub async fn bad_condition_is_refused_naming_the_source() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let cfg = config(&script_config("").replace("NEW.kind = 'go'", "NEW.knid = 'go'"));
    let err = wardcall::app::prepare_database(&db.database(), &cfg, "test").await.expect_err("bad condition");
    let msg = format!("{err:#}");
    assert!(msg.contains("source 'tasks'") && msg.contains("knid"), "{msg}");
    // The team's own INSERTs are untouched by the refused source.
    db.exec("INSERT INTO tasks (kind) VALUES ('go')").await;
}

pub async fn worker_process_killed_mid_step_is_taken_over() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let dir = std::env::temp_dir().join(format!("wardcall-it-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_text = format!("database_url = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n{}", db.url(), script_config(""));
    let cfg_path = dir.join("child.toml");
    std::fs::write(&cfg_path, &cfg_text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
        .args(["--config", cfg_path.to_str().unwrap(), "serve"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("child.log")).unwrap())
        .spawn()
        .expect("spawn wardcall serve");
    let listening = {
        let pool = db.pool.clone();
        let log = dir.join("child.log");
        await_some("the child engine to migrate and listen", Duration::from_secs(30), || {
            let pool = pool.clone();
            let log = log.clone();
            async move {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                if n >= 1 {
                    return Some(true);
                }
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                text.contains("wardcall:").then_some(false)
            }
        })
        .await
    };
    assert!(listening, "child failed: {}", std::fs::read_to_string(dir.join("child.log")).unwrap_or_default());
    // A first step, logged (`wardcall.run_steps`: the run's row still says
    // `start`), then the slow one, killed mid-way.
    db.exec(r#"SELECT wardcall.emit('task.created', '{"steps":[{"op":"step","name":"before"},{"op":"work","ms":1500},{"op":"step","name":"after"}]}')"#).await;
    let owner: String = await_some("the child to hold the run past its first step", Duration::from_secs(10), || async {
        sqlx::query_scalar(
            "SELECT lease_owner FROM wardcall.runs r WHERE status = 'running' AND step = 'start'
                AND EXISTS (SELECT 1 FROM wardcall.run_steps s WHERE s.run_id = r.id AND s.next_step = 'op:1')",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    })
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let killed_at = std::time::Instant::now();
    let app = start_app(&db, config(&script_config(""))).await;
    await_true(&db, "the run to be taken over and completed", Duration::from_secs(15), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'")
        .await;
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(8), "takeover took {took:?}");
    let state: Value = sqlx::query_scalar("SELECT state FROM wardcall.runs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(state["results"]["0"]["name"], "before", "the killed engine's logged step was folded into the run: {state}");
    assert_ne!(state["results"]["1"]["by"].as_str().unwrap(), owner, "the surviving engine completed the step");
    assert_eq!(state["results"]["2"]["name"], "after", "{state}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.lease_taken_over'").await, 1);
    for from in ["start", "op:1"] {
        assert_eq!(
            db.scalar_i64(&format!("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.step_completed' AND detail->>'from_step' = '{from}'")).await,
            1,
            "step {from} committed once"
        );
    }
    app.stop(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

pub async fn bad_config_gives_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("wardcall-it-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("[engine]\nworkerz = 4\n", "workerz"),
        ("[[people]]\nid = \"n1\"\nname = \"Nurse\"\nphone = \"555-0101\"\n", "people[0].phone"),
        ("[engine]\nsweep_ms = 5000\n", "engine.sweep_ms"),
        ("[[policies]]\nid = \"p\"\n[[policies.steps]]\nnotify = [\"ghost\"]\n", "unknown person 'ghost'"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wardcall")).args(["--config", path.to_str().unwrap(), "migrate"]).output().unwrap();
        assert!(!out.status.success(), "case {i} should refuse to start");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("bad{i}.toml")), "case {i}: file not named: {stderr}");
        assert!(stderr.contains(expected), "case {i}: expected '{expected}' in: {stderr}");
        assert!(!stderr.contains("555-0101"), "case {i}: a phone number reached the output: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

pub async fn api_rejects_malformed_json() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(""))).await;
    let base = format!("http://{}", app.http_addr.unwrap());
    let http = reqwest::Client::new();
    // The API needs the bearer token and the JSON content type (ARCHITECTURE.md).
    let post = |url: String| http.post(url).bearer_auth(API_TOKEN).header("content-type", "application/json");
    let r = post(format!("{base}/api/events/task.created")).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("malformed JSON"));
    let r = post(format!("{base}/api/events/task.created")).body(r#"{"payload": [1,2]}"#).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let r = post(format!("{base}/api/runs/not-a-uuid/cancel")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = post(format!("{base}/api/events/task.created")).body(r#"{"payload": {"steps": []}, "dedup_key": "k1"}"#).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = post(format!("{base}/api/events/task.created")).body(r#"{"payload": {"steps": []}, "dedup_key": "k1"}"#).send().await.unwrap();
    assert_eq!(r.status(), 200, "a duplicate is acknowledged, not re-emitted");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 1);
    app.stop(Duration::from_secs(2)).await;
}

fn spawn_serve(dir: &std::path::Path, log: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
        .args(["--config", dir.join("wardcall.toml").to_str().unwrap(), "serve"])
        .env("RUST_LOG", "info")
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).unwrap())
        .spawn()
        .expect("spawn wardcall serve")
}

async fn await_log(dir: &std::path::Path, log: &str, needle: &str) {
    let path = dir.join(log);
    await_some(&format!("'{needle}' in {log}"), Duration::from_secs(60), || {
        let path = path.clone();
        async move {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(!text.contains("wardcall: "), "the child failed: {text}");
            text.contains(needle).then_some(())
        }
    })
    .await
}

fn postmaster_running(data_dir: &std::path::Path) -> bool {
    match std::fs::read_to_string(data_dir.join("postmaster.pid")) {
        Ok(text) => text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
            .is_some_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()),
        Err(_) => false,
    }
}

/// `wardcall serve` on its own embedded cluster: SIGTERM stops it gracefully
/// (exit 0, cluster stopped); after a SIGKILL the cluster is left running and
/// the next start reuses it.
pub async fn serve_lifecycle_sigterm_and_killed_cluster_reuse() {
    let dir = std::env::temp_dir().join(format!("wardcall-it-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data_dir = dir.join("data");
    std::fs::write(dir.join("wardcall.toml"), format!("data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n", data_dir.display())).unwrap();
    // 1. SIGTERM: graceful stop, exit 0, cluster stopped.
    let mut child = spawn_serve(&dir, "first.log");
    await_log(&dir, "first.log", "wardcall engine started").await;
    assert!(postmaster_running(&data_dir), "the embedded cluster runs while wardcall serves");
    let log = std::fs::read_to_string(dir.join("first.log")).unwrap();
    if nix::unistd::geteuid().is_root() {
        assert!(log.contains("postgres"), "running as root, the log says which account runs PostgreSQL: {log}");
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    assert!(!postmaster_running(&data_dir), "the embedded cluster was stopped");
    // 2. SIGKILL: the cluster is left running...
    let mut child = spawn_serve(&dir, "second.log");
    await_log(&dir, "second.log", "wardcall engine started").await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(postmaster_running(&data_dir), "a killed wardcall leaves its cluster running");
    // 3. ...and the next start reuses it, then stops it on SIGTERM.
    let mut child = spawn_serve(&dir, "third.log");
    await_log(&dir, "third.log", "wardcall engine started").await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    assert!(!postmaster_running(&data_dir));
    let _ = std::fs::remove_dir_all(&dir);
}
