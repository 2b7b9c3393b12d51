//! Issue 9: the batched runtime. Group commits keep per-run fencing (a run
//! whose lease was lost in a batch does not commit, the others do), a batch is
//! atomic (a crash in the middle writes none of its runs), critical work is not
//! held behind a batch of other work, and two engines at burst size still run
//! each step once. Many due timers are claimed in few claims (the scheduler
//! waits for several workers to free), yet a critical run due meanwhile is
//! claimed as soon as one worker frees. A due timer whose step needs no I/O
//! runs inside its claim, which commits the step's transition: one version
//! per timer; the claim stays atomic, and a transition it cannot write
//! holds up no other run.

use crate::harness::*;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;
use wardcall::config::Workflow;
use wardcall::devtools::twilio_emulator::EmulatorEvent;
use wardcall::store::runs::{self as store, Parking, TransitionCommit};

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        batching::lost_lease_in_a_batch_commits_the_others,
        batching::crash_in_a_batched_commit_writes_none_of_its_runs,
        batching::a_held_run_does_not_hold_its_batch,
        batching::engine_batch_with_a_lost_lease,
        batching::critical_alert_is_not_held_behind_a_batch,
        batching::two_engines_at_burst_size_run_each_step_once,
        batching::due_timers_are_claimed_in_few_claims,
        batching::critical_run_is_claimed_at_once_during_a_timer_flood,
        batching::group_commit_finds_its_runs_by_primary_key,
        batching::a_timer_whose_step_needs_no_io_fires_inside_its_claim,
        batching::an_error_inside_a_claim_that_ran_steps_writes_none_of_it,
        batching::a_step_run_inside_a_claim_that_cannot_be_written_holds_up_no_run,
        batching::chained_sleeps_fired_inside_claims_run_each_element_once,
        batching::a_runs_large_state_is_compressed_with_lz4,
        batching::a_due_run_held_by_another_transaction_is_not_claimed_every_millisecond,
        batching::new_runs_alerts_and_attempts_get_time_ordered_ids,
        batching::a_send_being_recorded_holds_no_worker_slot,
        batching::a_write_back_waiting_for_a_team_lock_does_not_hold_its_batch,
        batching::write_backs_left_out_of_a_batch_outlive_their_engine,
        batching::a_kept_write_back_is_taken_once_and_given_up_with_an_audit,
        batching::a_batch_of_send_records_keeps_the_others_when_one_write_back_fails,
        batching::continues_append_to_the_step_log_and_a_takeover_folds_them,
        batching::a_cancel_folds_the_step_log_before_its_hook,
        batching::the_step_logs_patches_apply_in_sql_as_in_rust,
        batching::a_failure_after_logged_steps_keeps_their_results_and_counts_its_attempt,
        batching::transitions_that_keep_columns_take_them_from_the_logged_steps,
        batching::a_claim_calls_the_fold_only_for_runs_taken_over,
        batching::a_step_that_saved_its_state_commits_a_checkpoint_not_a_patch,
    ]
}

const TASKS_TABLE: &str = "CREATE TABLE IF NOT EXISTS tasks (id bigserial PRIMARY KEY, kind text NOT NULL, steps jsonb NOT NULL DEFAULT '[]')";

fn script_config(workers: usize) -> String {
    format!(
        r#"
[engine]
lease_ms = 2000
sweep_ms = 200
poll_ms = 100
workers = {workers}

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
"#
    )
}

/// Inserts `n` pending runs (no engine runs here) and claims them for
/// `owner` with a long lease, as an engine's scheduler would.
async fn claimed_runs(db: &TestDb, n: i64, owner: &str) -> Vec<store::ClaimedRun> {
    sqlx::query(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status) SELECT 'script', 'test', '{}', 'start', 'pending' FROM generate_series(1, $1)",
    )
    .bind(n)
    .execute(&db.pool)
    .await
    .unwrap();
    let mut runs = store::claim_due(&mut db.pool.acquire().await.unwrap(), owner, n, 600_000).await.unwrap();
    assert_eq!(runs.len() as i64, n);
    runs.sort_by_key(|r| r.id);
    runs
}

fn transition(run: &store::ClaimedRun, parking: Parking) -> TransitionCommit {
    TransitionCommit {
        id: run.id,
        fencing_token: run.fencing_token,
        step: run.step.clone(),
        state: json!({"done": run.id.to_string()}).into(),
        next_step: "op:1".into(),
        parking,
        actor: "engine:test".into(),
        seq: run.step_seq + 1,
        patch: None,
    }
}

fn parkings() -> Vec<Parking> {
    vec![
        Parking::Continue,
        Parking::Sleep { due_at_epoch_ms: None, delay_ms: 60_000 },
        Parking::Wait { signal: "ack".into(), timeout_ms: 60_000 },
        Parking::Complete,
        Parking::Fail { error: "gave up".into() },
        Parking::Defer { delay_ms: 60_000 },
    ]
}

async fn audited(db: &TestDb, run: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT action FROM wardcall.audit_log WHERE entity = 'run' AND entity_id = $1 ORDER BY id")
        .bind(run.to_string())
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// A batch of six runs, each parking differently, one of whose lease was
/// taken over before the commit: the five others commit (state, status,
/// audit), that one is neither written nor audited.
pub async fn lost_lease_in_a_batch_commits_the_others() {
    let db = TestDb::new().await;
    let runs = claimed_runs(&db, 6, "test").await;
    // Another engine takes run 2 over (a new claim bumps the token).
    let thief = runs[2].id;
    sqlx::query("UPDATE wardcall.runs SET fencing_token = fencing_token + 1, lease_owner = 'thief' WHERE id = $1").bind(thief).execute(&db.pool).await.unwrap();
    let batch: Vec<TransitionCommit> = runs.iter().zip(parkings()).map(|(r, p)| transition(r, p)).collect();
    let outcomes = store::commit_transitions(&mut db.pool.acquire().await.unwrap(), &batch).await.unwrap();
    assert_eq!(outcomes.len(), 6);
    for (i, (run, outcome)) in runs.iter().zip(&outcomes).enumerate() {
        let (status, step, state, token): (String, String, Value, i64) =
            sqlx::query_as("SELECT status, step, state, fencing_token FROM wardcall.runs WHERE id = $1").bind(run.id).fetch_one(&db.pool).await.unwrap();
        let actions = audited(&db, run.id).await;
        if run.id == thief {
            assert_eq!(*outcome, None, "the run whose lease was lost reports it");
            assert_eq!((status.as_str(), step.as_str(), token), ("running", "start", run.fencing_token + 1), "nothing written for the lost run");
            assert_eq!(state, json!({}));
            assert_eq!(actions, vec!["run.claimed"], "nothing audited for the lost run");
        } else {
            assert_eq!(*outcome, Some(false), "run {i} commits");
            let want = ["running", "sleeping", "waiting", "completed", "failed", "sleeping"][i];
            assert_eq!(status, want, "run {i}");
            assert_eq!(state["done"], run.id.to_string());
            assert_eq!(actions.len(), 2, "run {i}: {actions:?}");
        }
    }
    // A wait whose signal was already kept is due at once (the second statement of the batch).
    let more = claimed_runs(&db, 3, "test").await;
    sqlx::query("SELECT wardcall.send_signal($1, 'ack', '{}')").bind(more[1].id).execute(&db.pool).await.unwrap();
    let batch: Vec<TransitionCommit> = more.iter().map(|r| transition(r, Parking::Wait { signal: "ack".into(), timeout_ms: 60_000 })).collect();
    let outcomes = store::commit_transitions(&mut db.pool.acquire().await.unwrap(), &batch).await.unwrap();
    assert_eq!(outcomes, vec![Some(false), Some(true), Some(false)]);
}

/// A batch whose statement is killed half-way (its backend terminated while
/// it waits for the lock of the fourth of six runs, the first three already
/// updated in its transaction) writes none of them: each run is either fully
/// advanced or not at all. The same batch then commits whole.
pub async fn crash_in_a_batched_commit_writes_none_of_its_runs() {
    let db = TestDb::new().await;
    let runs = claimed_runs(&db, 6, "test").await;
    // Hold the fourth run (in id order, the batch's lock order).
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM wardcall.runs WHERE id = $1 FOR UPDATE").bind(runs[3].id).execute(&mut *holder).await.unwrap();
    let committer = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db.database().connect_options.clone().application_name("batch-under-test"))
        .await
        .unwrap();
    let batch: Vec<TransitionCommit> = runs.iter().map(|r| transition(r, Parking::Continue)).collect();
    let task = {
        let (committer, batch) = (committer.clone(), batch.clone());
        tokio::spawn(async move { store::commit_transitions(&mut committer.acquire().await.unwrap(), &batch).await })
    };
    await_true(
        &db,
        "the batch to block on the held run",
        Duration::from_secs(10),
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = 'batch-under-test' AND wait_event_type = 'Lock')",
    )
    .await;
    db.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'batch-under-test'").await;
    let result = tokio::time::timeout(Duration::from_secs(10), task).await.expect("the killed batch returns").unwrap();
    assert!(result.is_err(), "the killed batch reports an error: {result:?}");
    holder.rollback().await.unwrap();
    for run in &runs {
        let (step, token): (String, i64) =
            sqlx::query_as("SELECT step, fencing_token FROM wardcall.runs WHERE id = $1").bind(run.id).fetch_one(&db.pool).await.unwrap();
        assert_eq!((step.as_str(), token), ("start", run.fencing_token), "no run of the killed batch advanced");
        assert_eq!(audited(&db, run.id).await, vec!["run.claimed"]);
    }
    let outcomes = store::commit_transitions(&mut db.pool.acquire().await.unwrap(), &batch).await.unwrap();
    assert!(outcomes.iter().all(|o| *o == Some(false)), "{outcomes:?}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.runs WHERE step = 'op:1'").await, 6);
    committer.close().await;
}

/// A batch in which one run's row is held by another transaction (a webhook
/// locks the run first) commits the others at once and reports that one
/// `Busy` (not lost): the engine then commits it alone, waiting for the lock.
pub async fn a_held_run_does_not_hold_its_batch() {
    let db = TestDb::new().await;
    let runs = claimed_runs(&db, 4, "test").await;
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM wardcall.runs WHERE id = $1 FOR UPDATE").bind(runs[1].id).execute(&mut *holder).await.unwrap();
    // And one whose lease was lost.
    sqlx::query("UPDATE wardcall.runs SET fencing_token = fencing_token + 1 WHERE id = $1").bind(runs[3].id).execute(&db.pool).await.unwrap();
    let batch: Vec<TransitionCommit> = runs.iter().map(|r| transition(r, Parking::Continue)).collect();
    let outcomes = tokio::time::timeout(Duration::from_secs(5), store::commit_transitions_skip_locked(&mut db.pool.acquire().await.unwrap(), &batch))
        .await
        .expect("the batch does not wait for the held row")
        .unwrap();
    use store::GroupOutcome::*;
    assert_eq!(outcomes, vec![Committed { due_now: false }, Busy, Committed { due_now: false }, LeaseLost]);
    assert_eq!(audited(&db, runs[1].id).await, vec!["run.claimed"], "the held run was not written");
    holder.rollback().await.unwrap();
    let alone = store::commit_transitions(&mut db.pool.acquire().await.unwrap(), &batch[1..2]).await.unwrap();
    assert_eq!(alone, vec![Some(false)]);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.runs WHERE step = 'op:1'").await, 3);

    // The same with a worker's logged `continue`s only (the step log's own
    // statement): the free runs append, the held one is busy; the one whose
    // lease was lost, the one no longer running (same token) and the one
    // whose step number is taken append nothing and report a lost lease.
    let runs = claimed_runs(&db, 6, "logged").await;
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM wardcall.runs WHERE id = $1 FOR UPDATE").bind(runs[1].id).execute(&mut *holder).await.unwrap();
    sqlx::query("UPDATE wardcall.runs SET fencing_token = fencing_token + 1 WHERE id = $1").bind(runs[3].id).execute(&db.pool).await.unwrap();
    sqlx::query("UPDATE wardcall.runs SET status = 'sleeping' WHERE id = $1").bind(runs[4].id).execute(&db.pool).await.unwrap();
    sqlx::query(
        "INSERT INTO wardcall.run_steps (run_id, seq, step, next_step, patch, fencing_token, actor) VALUES ($1, 1, 'start', 'other', '[]', $2, 'engine:other')",
    )
    .bind(runs[5].id)
    .bind(runs[5].fencing_token)
    .execute(&db.pool)
    .await
    .unwrap();
    let batch: Vec<TransitionCommit> = runs
        .iter()
        .map(|r| TransitionCommit { patch: Some(json!([{"set": ["n"], "value": 1}])), state: Value::Null.into(), ..transition(r, Parking::Continue) })
        .collect();
    let outcomes = tokio::time::timeout(Duration::from_secs(5), store::commit_transitions_skip_locked(&mut db.pool.acquire().await.unwrap(), &batch))
        .await
        .expect("the batch does not wait for the held row")
        .unwrap();
    assert_eq!(outcomes, vec![Committed { due_now: false }, Busy, Committed { due_now: false }, LeaseLost, LeaseLost, LeaseLost]);
    holder.rollback().await.unwrap();
    for (i, run) in runs.iter().enumerate() {
        let logged: Vec<(i64, String, String, String, Value)> =
            sqlx::query_as("SELECT seq, step, next_step, actor, patch FROM wardcall.run_steps WHERE run_id = $1")
                .bind(run.id)
                .fetch_all(&db.pool)
                .await
                .unwrap();
        let (step, row_state): (String, Value) =
            sqlx::query_as("SELECT step, state FROM wardcall.runs WHERE id = $1").bind(run.id).fetch_one(&db.pool).await.unwrap();
        assert_eq!((step.as_str(), row_state), ("start", json!({})), "run {i}: the row is not rewritten by an append");
        if i == 0 || i == 2 {
            assert_eq!(logged, vec![(1, "start".into(), "op:1".into(), "engine:test".into(), json!([{"set": ["n"], "value": 1}]))], "run {i}");
            assert_eq!(audited(&db, run.id).await, vec!["run.claimed", "run.step_completed"], "run {i}");
        } else if i == 5 {
            assert_eq!(logged, vec![(1, "start".into(), "other".into(), "engine:other".into(), json!([]))], "run {i}: only the step logged first");
        } else {
            assert!(logged.is_empty(), "run {i} appended nothing: {logged:?}");
            assert_eq!(audited(&db, run.id).await, vec!["run.claimed"], "run {i}");
        }
    }
}

/// Through the engine: eight runs whose first step ends at the same moment
/// are committed in group; one of them was taken over meanwhile. The seven
/// others commit; that one commits nothing until this engine takes it back
/// (after its lease lapses) and then runs each step once.
pub async fn engine_batch_with_a_lost_lease() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(8))).await;
    db.exec(r#"INSERT INTO tasks (kind, steps) SELECT 'go', '[{"op":"work","ms":400},{"op":"step"}]' FROM generate_series(1, 8)"#).await;
    await_true(
        &db,
        "eight runs in their first step",
        Duration::from_secs(10),
        "SELECT count(*) = 8 FROM wardcall.runs WHERE status = 'running' AND step = 'start'",
    )
    .await;
    // Another engine takes one over (its lease renewal has not run yet: 400 ms < 2000/3 ms).
    let thief: Uuid = sqlx::query_scalar(
        "UPDATE wardcall.runs SET fencing_token = fencing_token + 1, lease_owner = 'thief'
          WHERE id = (SELECT id FROM wardcall.runs ORDER BY id LIMIT 1) RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    await_true(&db, "the seven others to complete", Duration::from_secs(10), "SELECT count(*) = 7 FROM wardcall.runs WHERE status = 'completed'").await;
    let thief_steps = db
        .scalar_i64(&format!("SELECT count(*) FROM wardcall.audit_log WHERE entity_id = '{thief}' AND action IN ('run.step_completed', 'run.completed')"))
        .await;
    assert_eq!(thief_steps, 0, "the run whose lease was lost committed nothing");
    let stats = app.engine.group_commit_stats();
    assert!(stats.fenced_out.load(Ordering::Relaxed) >= 1, "the lost run was fenced out of its batch");
    assert!(stats.largest.load(Ordering::Relaxed) > 1, "transitions were committed in groups");
    // Its lease (still the old one's due_at) lapses; this engine takes it over.
    await_true(&db, "the taken-over run to complete", Duration::from_secs(15), "SELECT count(*) = 8 FROM wardcall.runs WHERE status = 'completed'").await;
    let dupes = db
        .scalar_i64(
            "SELECT count(*) FROM (SELECT entity_id, action, detail->>'from_step' FROM wardcall.audit_log
              WHERE entity = 'run' AND action IN ('run.step_completed','run.completed') GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
        )
        .await;
    assert_eq!(dupes, 0, "each step committed once");
    app.stop(Duration::from_secs(2)).await;
}

/// A critical alert arriving while group commits of a flood of other runs
/// are under way (16 workers all stepping, batches of many runs) is called
/// while most of the flood is unfinished, in a small fraction of its drain time.
pub async fn critical_alert_is_not_held_behind_a_batch() {
    const FLOOD: i64 = 400;
    const STEPS: usize = 25;
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let emulator = no_answer_emulator().await;
    let mut cfg = crate::escalation::hospital_config(&emulator.base_url(), 600.0, 1);
    cfg.engine.workers = 16;
    cfg.workflows.push(Workflow { max_attempts: 3, retry_base_ms: 20, retry_max_ms: 100, ..Workflow::script("flood", "flood") });
    cfg.validate("hospital.toml").unwrap();
    let app = start_app(&db, Arc::new(cfg)).await;
    let flooded = "SELECT count(*) FROM wardcall.runs WHERE workflow = 'flood' AND status = 'completed'";
    let script: Vec<Value> = (0..STEPS).map(|i| json!({"op": "step", "name": format!("s{i}")})).collect();
    let t0 = Instant::now();
    sqlx::query("SELECT count(wardcall.emit('flood', $1)) FROM generate_series(1, $2)")
        .bind(json!({ "steps": script }))
        .bind(FLOOD)
        .execute(&db.pool)
        .await
        .unwrap();
    await_true(
        &db,
        "the flood to be under way",
        Duration::from_secs(30),
        "SELECT count(*) FILTER (WHERE status = 'completed') >= 16 FROM wardcall.runs WHERE workflow = 'flood'",
    )
    .await;
    let mut events = emulator.subscribe();
    db.exec(crate::escalation::SEIZURE_INSERT).await;
    let inserted = Instant::now();
    let called_at = loop {
        match tokio::time::timeout(Duration::from_secs(60), events.recv()).await.expect("the critical alert is called").unwrap() {
            EmulatorEvent::CallCreated { received_at, .. } => break received_at,
            _ => continue,
        }
    };
    let first_call = called_at.saturating_duration_since(inserted);
    let unfinished = FLOOD - db.scalar_i64(flooded).await;
    let largest = app.engine.group_commit_stats().largest.load(Ordering::Relaxed);
    await_true(&db, "the flood to drain", Duration::from_secs(240), &format!("SELECT ({flooded}) = {FLOOD}")).await;
    let drain = t0.elapsed();
    eprintln!("critical first call after {first_call:?}; flood unfinished then: {unfinished} of {FLOOD}; drained in {drain:?}; largest batch {largest}");
    assert!(largest > 1, "the flood was committed in groups (largest batch {largest})");
    assert!(unfinished * 2 > FLOOD, "the call waited for the flood: only {unfinished} of {FLOOD} flood runs were left");
    assert!(first_call * 4 < drain, "first call after {first_call:?}, flood drained in {drain:?}");
    app.stop(Duration::from_secs(2)).await;
    emulator.shutdown().await;
}

/// The two-engine test of `capture_runtime` at burst size: 1,000 runs, each
/// a step, a sleep, a wait that times out and a step, on two engines sharing
/// one database; every transition is committed exactly once and both engines work.
pub async fn two_engines_at_burst_size_run_each_step_once() {
    const RUNS: i64 = 1000;
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let cfg = config(&script_config(16));
    let a = start_app(&db, cfg.clone()).await;
    let b = start_app(&db, cfg).await;
    db.exec(&format!(
        "INSERT INTO tasks (kind, steps) SELECT 'go', '[{{\"op\":\"step\"}},{{\"op\":\"sleep\",\"ms\":30}},{{\"op\":\"step\"}},{{\"op\":\"wait\",\"signal\":\"x\",\"timeout_ms\":50}},{{\"op\":\"step\"}}]' FROM generate_series(1, {RUNS})"
    ))
    .await;
    await_true(&db, "all runs completed", Duration::from_secs(180), &format!("SELECT count(*) = {RUNS} FROM wardcall.runs WHERE status = 'completed'")).await;
    let dupes = db
        .scalar_i64(
            "SELECT count(*) FROM (SELECT entity_id, action, detail->>'from_step' FROM wardcall.audit_log
              WHERE entity = 'run' AND action IN ('run.step_completed','run.sleeping','run.waiting','run.completed')
              GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
        )
        .await;
    assert_eq!(dupes, 0, "a transition was committed twice");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.completed'").await, RUNS);
    // Each run: 2 steps + sleep + wait + the last step, which completes the run = 5 transitions.
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action IN ('run.step_completed','run.sleeping','run.waiting','run.completed')").await,
        RUNS * 5
    );
    let owners = db.scalar_i64("SELECT count(DISTINCT actor) FROM wardcall.audit_log WHERE action IN ('run.claimed','run.created')").await;
    assert!(owners >= 2, "only one engine worked");
    let (ga, gb) = (a.engine.group_commit_stats(), b.engine.group_commit_stats());
    eprintln!(
        "group commits: engine a {} batches / {} transitions (largest {}), engine b {} / {} (largest {})",
        ga.batches.load(Ordering::Relaxed),
        ga.transitions.load(Ordering::Relaxed),
        ga.largest.load(Ordering::Relaxed),
        gb.batches.load(Ordering::Relaxed),
        gb.transitions.load(Ordering::Relaxed),
        gb.largest.load(Ordering::Relaxed)
    );
    a.stop(Duration::from_secs(2)).await;
    b.stop(Duration::from_secs(2)).await;
}

/// Inserts `n` script runs parked as a `sleep_until` step leaves them (status
/// `sleeping`, due now), each running `steps` when woken; `critical` as the
/// dispatcher would set it for a workflow that pages people.
async fn due_timers(db: &TestDb, n: i64, steps: &str, critical: bool) {
    sqlx::query(&format!(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at, critical)
         SELECT 'script', 'timer', jsonb_build_object('steps', {steps}), 'op:0', 'sleeping', now(), $2 FROM generate_series(1, $1) g"
    ))
    .bind(n)
    .bind(critical)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Claim statements that claimed runs, counted in the audit log: the
/// `run.claimed` rows of one claim share its transaction id.
async fn claim_transactions(db: &TestDb) -> i64 {
    db.scalar_i64("SELECT count(DISTINCT xmin::text) FROM wardcall.audit_records WHERE action = 'run.claimed'").await
}

/// 640 timers due at one instant on an engine of 32 workers, each holding
/// its worker 10 to 100 ms (so that workers free one by one): the scheduler
/// claims when a quarter of its workers are free (or a few milliseconds
/// after the first frees), not for every worker that frees, so the timers
/// take few claims (before: one to two runs per claim).
pub async fn due_timers_are_claimed_in_few_claims() {
    const TIMERS: i64 = 640;
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(32))).await;
    due_timers(&db, TIMERS, "jsonb_build_array(jsonb_build_object('op', 'work', 'ms', 10 + (g * 37) % 91), jsonb_build_object('op', 'step'))", false).await;
    await_true(
        &db,
        "every timer to complete",
        Duration::from_secs(60),
        &format!("SELECT count(*) = {TIMERS} FROM wardcall.runs WHERE event = 'timer' AND status = 'completed'"),
    )
    .await;
    let claims = claim_transactions(&db).await;
    let stats = app.engine.claim_stats();
    let (counted, runs) = (stats.claims.load(Ordering::Relaxed), stats.runs.load(Ordering::Relaxed));
    let (empty, largest) = (stats.empty.load(Ordering::Relaxed), stats.largest.load(Ordering::Relaxed));
    eprintln!("{TIMERS} timers: {claims} claims in the audit log; engine: {counted} claims ({empty} empty) of {runs} runs, largest {largest}");
    assert_eq!(runs as i64, TIMERS, "each timer claimed once");
    assert_eq!(counted - empty, claims as u64, "the engine's count of claims that took runs matches the audit log");
    assert!(claims * 4 <= TIMERS, "{claims} claims for {TIMERS} timers: fewer than 4 runs per claim");
    app.stop(Duration::from_secs(2)).await;
}

/// A critical run falls due while the 8 workers are busy with a flood of
/// non-critical timers that free them one by one, about every 250 ms: it is
/// claimed as soon as the first worker frees (the scheduler asks whether a
/// critical run is due instead of waiting for more workers), before the next
/// worker frees and before any timer of the flood claimed after it fell due.
/// (With 100 ms between frees and a 60 ms bound, a loaded CI machine once
/// took 96 ms to claim: the gaps leave room for a slow machine.)
pub async fn critical_run_is_claimed_at_once_during_a_timer_flood() {
    const FLOOD: i64 = 64;
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(8))).await;
    due_timers(&db, FLOOD, "jsonb_build_array(jsonb_build_object('op', 'work', 'ms', 250 + (g % 8) * 250), jsonb_build_object('op', 'step'))", false).await;
    await_true(
        &db,
        "the flood to take every worker",
        Duration::from_secs(10),
        "SELECT count(*) = 8 FROM wardcall.runs WHERE event = 'timer' AND status = 'running'",
    )
    .await;
    // Every worker is busy: the first frees about 250 ms after the flood's claim
    // (the assertions below measure from the frees themselves, not from here).
    sqlx::query(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at, critical)
         VALUES ('script', 'critical-timer', '{\"steps\": [{\"op\": \"step\"}]}', 'op:0', 'sleeping', now(), true)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    await_true(
        &db,
        "the critical run to complete",
        Duration::from_secs(20),
        "SELECT count(*) = 1 FROM wardcall.runs WHERE event = 'critical-timer' AND status = 'completed'",
    )
    .await;
    await_true(
        &db,
        "two flood workers to free after the critical run fell due",
        Duration::from_secs(20),
        "SELECT count(*) >= 2 FROM wardcall.audit_log a JOIN wardcall.runs r ON a.entity_id = r.id::text
          WHERE r.event = 'timer' AND a.action = 'run.completed'
            AND a.at > (SELECT created_at FROM wardcall.runs WHERE event = 'critical-timer')",
    )
    .await;
    // After the first worker that freed once the critical run was due.
    let (after_free_ms, next_free_ms, flood_first): (f64, f64, i64) = sqlx::query_as(
        "WITH c AS (SELECT r.created_at AS due, a.at AS claimed, a.xmin::text AS claim
                      FROM wardcall.runs r JOIN wardcall.audit_records a ON a.entity_id = r.id::text AND a.action = 'run.claimed'
                     WHERE r.event = 'critical-timer'),
              frees AS (SELECT a.at, row_number() OVER (ORDER BY a.at) AS n
                          FROM wardcall.audit_log a JOIN wardcall.runs r ON a.entity_id = r.id::text, c
                         WHERE r.event = 'timer' AND a.action = 'run.completed' AND a.at > c.due),
              freed AS (SELECT (SELECT at FROM frees WHERE n = 1) AS at, (SELECT at FROM frees WHERE n = 2) AS next)
         SELECT (extract(epoch FROM c.claimed - freed.at) * 1000)::float8, (extract(epoch FROM freed.next - freed.at) * 1000)::float8,
                (SELECT count(*) FROM wardcall.audit_records a JOIN wardcall.runs r ON a.entity_id = r.id::text
                  WHERE r.event = 'timer' AND a.action = 'run.claimed' AND a.at > c.due AND a.at < c.claimed AND a.xmin::text <> c.claim)
           FROM c, freed",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let left = db.scalar_i64("SELECT count(*) FROM wardcall.runs WHERE event = 'timer' AND status <> 'completed'").await;
    eprintln!(
        "critical run claimed {after_free_ms:.1} ms after the first worker freed (the next freed {next_free_ms:.1} ms after it); flood timers claimed before it: {flood_first}; flood left: {left} of {FLOOD}"
    );
    assert_eq!(flood_first, 0, "flood timers were claimed before the critical run");
    assert!(
        after_free_ms < 150.0 && after_free_ms < next_free_ms,
        "the critical run was claimed {after_free_ms:.1} ms after a worker freed; the next worker freed {next_free_ms:.1} ms after it"
    );
    assert!(left > FLOOD / 2, "the flood was nearly over ({left} left): the test did not test a busy engine");
    app.stop(Duration::from_secs(2)).await;
}

/// Whether an `EXPLAIN (FORMAT JSON)` plan has a nested loop whose inner
/// side scans the CTE `locked` or `input`, directly or under another node
/// (once per outer row: quadratic in the batch).
fn rescans_locked(plan: &Value) -> bool {
    fn scans_batch(node: &Value) -> bool {
        (node.get("Node Type").and_then(Value::as_str) == Some("CTE Scan") && matches!(node.get("CTE Name").and_then(Value::as_str), Some("locked" | "input")))
            || node.get("Plans").and_then(Value::as_array).is_some_and(|a| a.iter().any(scans_batch))
    }
    let nodes = plan.get("Plans").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let here = plan.get("Node Type").and_then(Value::as_str) == Some("Nested Loop")
        && nodes.iter().any(|n| n.get("Parent Relationship").and_then(Value::as_str) == Some("Inner") && scans_batch(n));
    here || nodes.iter().any(rescans_locked) || plan.as_array().is_some_and(|a| a.iter().any(rescans_locked)) || plan.get("Plan").is_some_and(rescans_locked)
}

/// The group commit's plan finds the batch's runs by primary key whatever the
/// statistics say. Here they were taken while 5,000 runs slept (so "running"
/// looks rare), then all 5,000 were claimed: a plan through `runs_status`
/// would read every running run to find the 30 of the batch. Checked with and
/// without `SKIP LOCKED`, for a custom plan (the values known) and a generic one
/// (PREPAREd and EXECUTEd under `force_generic_plan`); and no nested loop
/// rescans the batch per row (a filter on the input's `patch` once made the
/// planner do so: 62,250 rows filtered for 250 timers). And
/// the status still fences: a run whose token matches but which no longer
/// runs is not written.
/// The arguments of an `EXECUTE` of a group commit's prepared statement
/// (which takes no bound parameters): the batch's ids and tokens as array
/// literals (ours, not a team's values), then one `array_fill` per
/// `(value, type)` for the other arrays.
fn literal_args(ids: &[Uuid], tokens: &[i64], fills: &[(&str, &str)]) -> String {
    let n = ids.len();
    let ids = ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(",");
    let tokens = tokens.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec![format!("'{{{ids}}}'"), format!("'{{{tokens}}}'")];
    args.extend(fills.iter().map(|(v, t)| format!("array_fill({v}::{t}, ARRAY[{n}])")));
    args.join(", ")
}

/// A group commit's plan (`what` names it in the failures): no nested loop
/// rescans the batch, the runs are found by primary key and never through
/// `runs_status`, and, for a skip-locked batch (`busy_found`), the busy runs
/// by a hashed `NOT IN`.
fn check_group_plan(plan: &Value, what: &str, busy_found: bool) {
    assert!(!rescans_locked(plan), "{what}: a nested loop rescans the batch per row: {plan}");
    let text = plan.to_string();
    assert!(!text.contains("runs_status"), "{what}: the plan reads runs_status: {text}");
    assert!(text.contains("runs_pkey"), "{what}: the plan does not use the primary key: {text}");
    if busy_found {
        assert!(text.contains("hashed SubPlan"), "{what}: the busy runs are not found by a hashed NOT IN: {text}");
    }
}

pub async fn group_commit_finds_its_runs_by_primary_key() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at)
         SELECT 'script', 'test', '{}', 'start', 'sleeping', now() - interval '1 minute' FROM generate_series(1, 5000)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    db.exec("ANALYZE wardcall.runs").await;
    let claimed = store::claim_due(&mut db.pool.acquire().await.unwrap(), "test", 5000, 600_000).await.unwrap();
    assert_eq!(claimed.len(), 5000);
    let mut conn = db.pool.acquire().await.unwrap();
    // A custom plan: EXPLAIN with the values bound. A generic one: the
    // statement PREPAREd, then EXECUTEd under force_generic_plan.
    sqlx::query("SET plan_cache_mode = force_generic_plan").execute(&mut *conn).await.unwrap();
    for (name, skip_locked) in [("group_commit", false), ("group_commit_skip_locked", true)] {
        let types = "uuid[], bigint[], jsonb[], text[], text[], bigint[], bigint[], text[], text[], text[], text[], jsonb[], text[], text[], bigint[], jsonb[]";
        sqlx::raw_sql(&format!("PREPARE {name} ({types}) AS {}", store::group_commit_statement(skip_locked))).execute(&mut *conn).await.unwrap();
    }
    sqlx::raw_sql(&format!("PREPARE step_log (uuid[], bigint[], bigint[], text[], text[], jsonb[], text[]) AS {}", store::STEP_LOG_STATEMENT))
        .execute(&mut *conn)
        .await
        .unwrap();
    // A batch of 30 and one of 250 (a claim's timers): custom plans change
    // with the arrays' length.
    for size in [30, 250] {
        let batch = &claimed[..size];
        let ids: Vec<Uuid> = batch.iter().map(|r| r.id).collect();
        let tokens: Vec<i64> = batch.iter().map(|r| r.fencing_token).collect();
        let text = |v: &str| vec![v.to_string(); batch.len()];
        let none_text: Vec<Option<String>> = vec![None; batch.len()];
        let jsonb: Vec<Value> = vec![json!({}); batch.len()];
        for mode in ["custom", "generic"] {
            for skip_locked in [false, true] {
                let plan: Value = if mode == "generic" {
                    let args = literal_args(
                        &ids,
                        &tokens,
                        &[
                            ("'{}'", "jsonb"),
                            ("'op:1'", "text"),
                            ("'continue'", "text"),
                            ("NULL", "bigint"),
                            ("0", "bigint"),
                            ("NULL", "text"),
                            ("NULL", "text"),
                            ("'run.step_completed'", "text"),
                            ("'running'", "text"),
                            ("'{}'", "jsonb"),
                            ("'engine:test'", "text"),
                            ("'running'", "text"),
                            ("1", "bigint"),
                            ("NULL", "jsonb"),
                        ],
                    );
                    let name = if skip_locked { "group_commit_skip_locked" } else { "group_commit" };
                    sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) EXECUTE {name}({args})")).fetch_one(&mut *conn).await.unwrap()
                } else {
                    let sql = format!("EXPLAIN (FORMAT JSON) {}", store::group_commit_statement(skip_locked));
                    sqlx::query_scalar(&sql)
                        .bind(&ids)
                        .bind(&tokens)
                        .bind(&jsonb)
                        .bind(text("op:1"))
                        .bind(text("continue"))
                        .bind(vec![None::<i64>; batch.len()])
                        .bind(vec![0i64; batch.len()])
                        .bind(&none_text)
                        .bind(&none_text)
                        .bind(text("run.step_completed"))
                        .bind(text("running"))
                        .bind(&jsonb)
                        .bind(text("engine:test"))
                        .bind(text("running"))
                        .bind(vec![1i64; batch.len()])
                        .bind(vec![None::<Value>; batch.len()])
                        .fetch_one(&mut *conn)
                        .await
                        .unwrap()
                };
                check_group_plan(&plan, &format!("{size} runs, {mode}, skip_locked {skip_locked}"), skip_locked);
            }
            // The statement of a batch of logged `continue`s, the same checks.
            let plan: Value = if mode == "generic" {
                let args =
                    literal_args(&ids, &tokens, &[("1", "bigint"), ("'start'", "text"), ("'op:1'", "text"), ("'[]'", "jsonb"), ("'engine:test'", "text")]);
                sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) EXECUTE step_log({args})")).fetch_one(&mut *conn).await.unwrap()
            } else {
                sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {}", store::STEP_LOG_STATEMENT))
                    .bind(&ids)
                    .bind(&tokens)
                    .bind(vec![1i64; batch.len()])
                    .bind(text("start"))
                    .bind(text("op:1"))
                    .bind(vec![json!([]); batch.len()])
                    .bind(text("engine:test"))
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap()
            };
            check_group_plan(&plan, &format!("{size} runs, {mode}, step log"), true);
        }
    }
    drop(conn);
    let batch = &claimed[..30];
    // The status is still part of the fence: a run whose token matches but
    // which is no longer running is neither written nor audited.
    let stopped = batch[1].id;
    sqlx::query("UPDATE wardcall.runs SET status = 'sleeping' WHERE id = $1").bind(stopped).execute(&db.pool).await.unwrap();
    let commits: Vec<TransitionCommit> = batch[..3].iter().map(|r| transition(r, Parking::Continue)).collect();
    for skip_locked in [false, true] {
        let outcomes = if skip_locked {
            store::commit_transitions_skip_locked(&mut db.pool.acquire().await.unwrap(), &commits[1..])
                .await
                .unwrap()
                .into_iter()
                .map(|o| o == store::GroupOutcome::LeaseLost)
                .collect::<Vec<_>>()
        } else {
            store::commit_transitions(&mut db.pool.acquire().await.unwrap(), &commits[..2]).await.unwrap().into_iter().map(|o| o.is_none()).collect()
        };
        // (with skip_locked: runs 1, stopped, and 2, committed again as it goes on)
        assert_eq!(outcomes, if skip_locked { vec![true, false] } else { vec![false, true] }, "skip_locked {skip_locked}");
    }
    let (status, step): (String, String) =
        sqlx::query_as("SELECT status, step FROM wardcall.runs WHERE id = $1").bind(stopped).fetch_one(&db.pool).await.unwrap();
    assert_eq!((status.as_str(), step.as_str()), ("sleeping", "start"), "the stopped run is not written");
    assert_eq!(audited(&db, stopped).await, vec!["run.claimed"], "nor audited");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.runs WHERE step = 'op:1'").await, 2);
}

/// Audit actions of the runs of `event`, per run, in order, with the
/// status each left (`action:from_state`).
async fn audit_by_run(db: &TestDb, event: &str) -> Vec<Vec<String>> {
    sqlx::query_scalar(
        "SELECT array_agg(a.action || ':' || coalesce(a.from_state, '') ORDER BY a.id)
           FROM wardcall.runs r JOIN wardcall.audit_log a ON a.entity = 'run' AND a.entity_id = r.id::text
          WHERE r.event = $1 GROUP BY r.id ORDER BY r.id",
    )
    .bind(event)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// 300 timers due at once whose woken element needs no I/O (a script
/// `step`, the script's last: it ends the run), beside 20 whose element
/// holds a worker (`work`) and 20 that sleep once more (`sleep`, then a
/// `step`): the first are each written once, `sleeping` → `completed` in the
/// claim's own commit (no `run.claimed`, no lease, one row version); the
/// sleeping ones likewise go `sleeping` → `sleeping` → `completed`; the
/// `work` ones are claimed with a lease and run by a worker as before.
pub async fn a_timer_whose_step_needs_no_io_fires_inside_its_claim() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(16))).await;
    let insert = |event: &'static str, n: i64, steps: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(&format!(
                "INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at)
                 SELECT 'script', $2, jsonb_build_object('steps', {steps}), 'op:0', 'sleeping', now() FROM generate_series(1, $1) g"
            ))
            .bind(n)
            .bind(event)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    // One transaction: the scheduler sees them all due at once.
    insert("local", 300, "jsonb_build_array(jsonb_build_object('op', 'step', 'name', 'fired'))").await;
    insert("work", 20, "jsonb_build_array(jsonb_build_object('op', 'work', 'ms', 5), jsonb_build_object('op', 'step'))").await;
    insert("twice", 20, "jsonb_build_array(jsonb_build_object('op', 'sleep', 'ms', 1), jsonb_build_object('op', 'step'))").await;
    await_true(
        &db,
        "every timer to complete",
        Duration::from_secs(30),
        "SELECT count(*) = 340 FROM wardcall.runs WHERE event IN ('local','work','twice') AND status = 'completed'",
    )
    .await;
    let local = audit_by_run(&db, "local").await;
    assert_eq!(local.len(), 300);
    for actions in &local {
        assert_eq!(actions, &vec!["run.completed:sleeping".to_string()], "a local timer is written once, by its claim");
    }
    for actions in audit_by_run(&db, "twice").await {
        assert_eq!(actions, vec!["run.sleeping:sleeping", "run.completed:sleeping"], "each element of a sleeping chain once");
    }
    for actions in audit_by_run(&db, "work").await {
        assert_eq!(actions[0], "run.claimed:sleeping", "a step that holds a worker is claimed with a lease: {actions:?}");
        assert_eq!(actions.last().map(String::as_str), Some("run.completed:running"), "{actions:?}");
    }
    // The step ran (its result is kept) and the run holds no lease.
    let (with_result, leased, tokens): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state->'results'->'0'->>'name' = 'fired'), count(lease_owner), max(fencing_token)
           FROM wardcall.runs WHERE event = 'local'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((with_result, leased, tokens), (300, 0, 1), "each local step's result kept, no lease taken, the token moved on once");
    let stats = app.engine.claim_stats();
    let (fired, leased_runs) = (stats.fired_in_claim.load(Ordering::Relaxed), stats.runs.load(Ordering::Relaxed));
    eprintln!("fired inside claims: {fired}; leased: {leased_runs}; claims: {}", stats.claims.load(Ordering::Relaxed));
    assert_eq!(fired, 300 + 20 * 2, "the engine counts the steps it ran inside claims");
    assert_eq!(leased_runs, 20, "only the work timers were leased");
    app.stop(Duration::from_secs(2)).await;
}

/// Sequence `claim_failures` counts each claim that reached a `run.claimed`
/// row of an event-`poison` run (a sequence is not rolled back), and the
/// trigger then makes the claim fail, as a crash between its statements would.
const POISON_CLAIMS: &str = "
    CREATE SEQUENCE claim_failures;
    CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.action = 'run.claimed' AND EXISTS (SELECT 1 FROM wardcall.runs WHERE id::text = NEW.entity_id AND event = 'poison') THEN
            PERFORM nextval('claim_failures');
            RAISE EXCEPTION 'poisoned claim';
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER poison BEFORE INSERT ON wardcall.audit_records FOR EACH ROW EXECUTE FUNCTION poison();";

/// A claim that has run 50 timers' steps inside it (their transitions
/// written) fails afterwards, when it leases a 51st run (due first, so that
/// every claim, of any size, takes it): none of the 50 is
/// advanced or audited, however often the claim is tried; once the failure
/// is gone, each of them completes exactly once (on a worker if claims are
/// still pausing steps inside them, `STEPS_IN_CLAIM_PAUSE`).
pub async fn an_error_inside_a_claim_that_ran_steps_writes_none_of_it() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    db.exec(POISON_CLAIMS).await;
    sqlx::raw_sql(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at)
         SELECT 'script', 'local', '{\"steps\": [{\"op\": \"step\"}]}', 'op:0', 'sleeping', now() - interval '1 second' FROM generate_series(1, 50);
         INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at)
         VALUES ('script', 'poison', '{\"steps\": [{\"op\": \"work\", \"ms\": 1}]}', 'op:0', 'sleeping', now() - interval '2 seconds')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let app = start_app(&db, config(&script_config(64))).await;
    // Each claim is tried twice (with steps run inside it, then leases only).
    await_true(&db, "three claims to fail", Duration::from_secs(20), "SELECT last_value >= 6 FROM claim_failures").await;
    let (sleeping, audited): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'sleeping' AND fencing_token = 0 AND state = '{}'),
                (SELECT count(*) FROM wardcall.audit_log WHERE entity = 'run')
           FROM wardcall.runs WHERE event = 'local'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((sleeping, audited), (50, 0), "a failed claim wrote nothing of the steps it ran");
    db.exec("DROP TRIGGER poison ON wardcall.audit_records").await;
    await_true(
        &db,
        "every run to complete",
        Duration::from_secs(20),
        "SELECT count(*) = 51 FROM wardcall.runs WHERE event IN ('local','poison') AND status = 'completed'",
    )
    .await;
    // Inside a claim, or (for a second after a failed one) on a worker:
    // either way once.
    for actions in audit_by_run(&db, "local").await {
        assert!(actions == ["run.completed:sleeping"] || actions == ["run.claimed:sleeping", "run.completed:running"], "each step written once: {actions:?}");
    }
    app.stop(Duration::from_secs(2)).await;
}

/// When the transitions of the steps a claim ran cannot be written (here a
/// trigger refuses them), the claim is tried again with leases only: every
/// run, the critical one first, is run by a worker and completes; nothing
/// waits for the cause to go away (DESIGN.md invariant 10).
pub async fn a_step_run_inside_a_claim_that_cannot_be_written_holds_up_no_run() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    db.exec(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.from_state = 'sleeping' AND NEW.action = 'run.completed' THEN RAISE EXCEPTION 'refused'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON wardcall.audit_records FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .await;
    sqlx::raw_sql(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at)
         SELECT 'script', 'local', '{\"steps\": [{\"op\": \"step\"}]}', 'op:0', 'sleeping', now() FROM generate_series(1, 40);
         INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at, critical)
         VALUES ('script', 'critical-timer', '{\"steps\": [{\"op\": \"step\"}]}', 'op:0', 'sleeping', now(), true)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let app = start_app(&db, config(&script_config(64))).await;
    await_true(
        &db,
        "every run to complete on a worker",
        Duration::from_secs(20),
        "SELECT count(*) = 41 FROM wardcall.runs WHERE event IN ('local','critical-timer') AND status = 'completed'",
    )
    .await;
    for event in ["local", "critical-timer"] {
        for actions in audit_by_run(&db, event).await {
            assert_eq!(actions, vec!["run.claimed:sleeping", "run.completed:running"], "{event}: leased and run by a worker");
        }
    }
    assert_eq!(app.engine.claim_stats().fired_in_claim.load(Ordering::Relaxed), 0);
    app.stop(Duration::from_secs(2)).await;
}

/// 600 runs of five sleeps of 0 ms and a last `step`, all due at once: each
/// element fires inside a claim and makes its run due again at once, while
/// two claims are in flight (one landing while the next locks). Each element
/// is written exactly once: a claim that locks a run another claim has just
/// advanced reads it as that claim left it (not the version of its
/// snapshot, which would run the same element a second time).
pub async fn chained_sleeps_fired_inside_claims_run_each_element_once() {
    const RUNS: i64 = 600;
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(16))).await;
    sqlx::query(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at)
         SELECT 'script', 'chain', jsonb_build_object('steps', jsonb_build_array(
                    jsonb_build_object('op', 'sleep', 'ms', 0), jsonb_build_object('op', 'sleep', 'ms', 0),
                    jsonb_build_object('op', 'sleep', 'ms', 0), jsonb_build_object('op', 'sleep', 'ms', 0),
                    jsonb_build_object('op', 'sleep', 'ms', 0), jsonb_build_object('op', 'step'))),
                'op:0', 'sleeping', now()
           FROM generate_series(1, $1)",
    )
    .bind(RUNS)
    .execute(&db.pool)
    .await
    .unwrap();
    await_true(
        &db,
        "every chain to complete",
        Duration::from_secs(60),
        &format!("SELECT count(*) = {RUNS} FROM wardcall.runs WHERE event = 'chain' AND status = 'completed'"),
    )
    .await;
    let expected: Vec<String> = ["run.sleeping:sleeping"; 5].into_iter().chain(["run.completed:sleeping"]).map(String::from).collect();
    let by_run = audit_by_run(&db, "chain").await;
    let wrong: Vec<&Vec<String>> = by_run.iter().filter(|a| **a != expected).collect();
    assert!(wrong.is_empty(), "{} of {RUNS} runs audited otherwise, e.g. {:?}", wrong.len(), wrong.first());
    let stats = app.engine.claim_stats();
    eprintln!("{RUNS} chains: {} claims, {} steps inside them", stats.claims.load(Ordering::Relaxed), stats.fired_in_claim.load(Ordering::Relaxed));
    app.stop(Duration::from_secs(2)).await;
}

/// Migration 0013: where the server has lz4 (it does here: the test asserts
/// it, so that a cluster without it is noticed), `runs.state` is compressed
/// with lz4, not pglz: a script run of 60 steps, whose state passes the
/// 2 kB at which PostgreSQL compresses, is stored lz4-compressed.
pub async fn a_runs_large_state_is_compressed_with_lz4() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let lz4: bool =
        sqlx::query_scalar("SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'").fetch_one(&db.pool).await.unwrap();
    assert!(lz4, "this PostgreSQL was built without lz4: runs.state keeps pglz (the migration is a no-op there)");
    let app = start_app(&db, config(&script_config(4))).await;
    let steps: Vec<Value> = (0..60).map(|i| json!({"op": "step", "name": format!("step number {i}")})).collect();
    sqlx::query("INSERT INTO tasks (kind, steps) VALUES ('go', $1)").bind(json!(steps)).execute(&db.pool).await.unwrap();
    await_true(&db, "the run to complete", Duration::from_secs(20), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    let (compression, text_bytes): (Option<String>, i32) =
        sqlx::query_as("SELECT pg_column_compression(state), octet_length(state::text) FROM wardcall.runs").fetch_one(&db.pool).await.unwrap();
    assert!(text_bytes > 2048, "the state ({text_bytes} bytes) is large enough to be compressed");
    assert_eq!(compression.as_deref(), Some("lz4"));
    app.stop(Duration::from_secs(2)).await;
}

/// A run falls due while another transaction holds its row (as another
/// engine's claim, a webhook's transaction or a team's write-back can, for
/// seconds): the scheduler's claims skip it (`SKIP LOCKED`) and the next
/// due time says it is due. For the 1.5 s the lock is held the scheduler
/// backs off (1, 2, 4 … ms up to `LOCKED_DUE_POLL_MAX`, starting again after
/// each claim that took a run: about 110 claims) instead of claiming every
/// millisecond (about 450); yet 15 critical runs falling due one by one meanwhile are
/// each claimed at their due time (the back-off never sleeps past the next
/// run still ahead: median lateness within 15 ms, where sleeping out the
/// back-off would make it about 25 ms); once the lock goes the held run is
/// claimed and completes.
pub async fn a_due_run_held_by_another_transaction_is_not_claimed_every_millisecond() {
    const CRITICAL: i64 = 15;
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(4))).await;
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at)
         VALUES ('script', 'held', jsonb_build_object('steps', jsonb_build_array(jsonb_build_object('op', 'work', 'ms', 1))), 'op:0', 'sleeping',
                 clock_timestamp() + interval '1 hour')
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // The holder's share lock makes every claim (`FOR UPDATE SKIP LOCKED`)
    // skip the row, but lets another session make it due (an update of a
    // column no key holds does not conflict with it).
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM wardcall.runs WHERE id = $1 FOR KEY SHARE").bind(id).execute(&mut *holder).await.unwrap();
    sqlx::query("UPDATE wardcall.runs SET due_at = clock_timestamp() WHERE id = $1").bind(id).execute(&db.pool).await.unwrap();
    // Critical runs due one by one while the row is held, each with its due
    // time (ms since the epoch) in its input: the lease overwrites `due_at`.
    sqlx::query(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at, critical)
         SELECT 'script', 'critical_timer', jsonb_build_object('steps', jsonb_build_array(jsonb_build_object('op', 'step')), 'due_ms', ms), 'op:0', 'sleeping',
                to_timestamp(ms / 1000.0), true
           FROM (SELECT extract(epoch FROM clock_timestamp()) * 1000 + 200 + g * 83 AS ms FROM generate_series(1, $1) g) d",
    )
    .bind(CRITICAL)
    .execute(&db.pool)
    .await
    .unwrap();
    let stats = app.engine.claim_stats();
    let before = stats.claims.load(Ordering::Relaxed);
    // The window in which the held run can only be polled: what is counted
    // is how often (absence of claims, not an event to await).
    let held = Duration::from_millis(1500);
    tokio::time::sleep(held).await;
    let claims = stats.claims.load(Ordering::Relaxed) - before;
    let status: String = sqlx::query_scalar("SELECT status FROM wardcall.runs WHERE id = $1").bind(id).fetch_one(&db.pool).await.unwrap();
    assert_eq!(status, "sleeping", "the held run cannot be claimed");
    holder.rollback().await.unwrap();
    let released = Instant::now();
    await_true(&db, "the run to complete once released", Duration::from_secs(5), &format!("SELECT status = 'completed' FROM wardcall.runs WHERE id = '{id}'"))
        .await;
    await_true(
        &db,
        "every critical run to complete",
        Duration::from_secs(5),
        &format!("SELECT count(*) = {CRITICAL} FROM wardcall.runs WHERE event = 'critical_timer' AND status = 'completed'"),
    )
    .await;
    let lateness: Vec<f64> = sqlx::query_scalar(
        "SELECT (SELECT extract(epoch FROM min(a.at)) * 1000 FROM wardcall.audit_log a WHERE a.entity = 'run' AND a.entity_id = r.id::text AND a.from_state = 'sleeping')::float8
                - (r.input->>'due_ms')::float8
           FROM wardcall.runs r WHERE r.event = 'critical_timer' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let median = lateness[lateness.len() / 2];
    eprintln!(
        "claims while the due run was held for {held:?}: {claims}; completed {:?} after the release; critical runs claimed late by (ms) {lateness:.1?}",
        released.elapsed()
    );
    assert!(claims >= 10, "the scheduler kept looking for the due run while it was held ({claims} claims)");
    assert!(claims <= 200, "{claims} claims in {held:?} while a due run was held elsewhere: polling every millisecond");
    assert!(lateness[0] >= -1.0, "a critical run was claimed before it was due: {lateness:?}");
    assert!(median <= 15.0, "critical runs falling due while another run was held were claimed {median:.1} ms late (median): {lateness:.1?}");
    app.stop(Duration::from_secs(2)).await;
}

/// Runs, alerts and notification attempts get UUID version 7 ids by default
/// (migration 0014): the version nibble is 7, the variant is RFC 9562's, the
/// first 48 bits are the insert's Unix time in ms, and ids of rows inserted
/// later sort after earlier ones (their primary-key entries go to the
/// right-most leaf pages instead of random ones).
pub async fn new_runs_alerts_and_attempts_get_time_ordered_ids() {
    let db = TestDb::new().await;
    for table in ["runs", "alerts", "notification_attempts"] {
        let default: String = sqlx::query_scalar(
            "SELECT column_default FROM information_schema.columns WHERE table_schema = 'wardcall' AND table_name = $1 AND column_name = 'id'",
        )
        .bind(table)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(default, "wardcall.uuid_v7()", "wardcall.{table}.id");
    }
    let mut ids: Vec<Uuid> = Vec::new();
    for _ in 0..5 {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO wardcall.runs (workflow, event, input, step, status) VALUES ('script', 'ids', '{}', 'op:0', 'completed') RETURNING id",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        ids.push(id);
        // The next insert a millisecond later at least: a later time prefix.
        sqlx::query("SELECT pg_sleep(0.002)").execute(&db.pool).await.unwrap();
    }
    let now_ms = jiff::Timestamp::now().as_millisecond() as u64;
    for id in &ids {
        assert_eq!(id.get_version_num(), 7, "{id}");
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
        let b = id.as_bytes();
        let ms = u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]);
        assert!(ms <= now_ms && now_ms - ms < 60_000, "{id}: time prefix {ms} ms, now {now_ms} ms");
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "ids inserted later sort after earlier ones");
    sorted.dedup();
    assert_eq!(sorted.len(), 5);
}

/// A hospital whose `on_call_placed` write-back is `write_back` (over a
/// `wb_gate` table of one row that the test can lock), with `workers`
/// workers; the emulator's nurses never answer.
async fn gated_hospital(write_back: &str, workers: usize) -> (TestDb, wardcall::devtools::twilio_emulator::EmulatorHandle, wardcall::app::App) {
    let (db, emulator, cfg) = gated_hospital_config(write_back, workers).await;
    let app = start_app(&db, cfg).await;
    (db, emulator, app)
}

/// The database, emulator and configuration of [`gated_hospital`], without an engine.
async fn gated_hospital_config(
    write_back: &str,
    workers: usize,
) -> (TestDb, wardcall::devtools::twilio_emulator::EmulatorHandle, Arc<wardcall::config::Config>) {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    db.exec("CREATE TABLE wb_gate (n int NOT NULL); INSERT INTO wb_gate VALUES (0)").await;
    let emulator = no_answer_emulator().await;
    let mut cfg = crate::escalation::hospital_config(&emulator.base_url(), 600.0, 1);
    cfg.engine.workers = workers;
    cfg.workflows[0].escalation_mut().expect("an escalation").write_back.on_call_placed = Some(write_back.into());
    cfg.validate("hospital.toml").unwrap();
    (db, emulator, Arc::new(cfg))
}

/// Inserts one critical alert per title, in one statement.
async fn insert_titled_alerts(db: &TestDb, titles: &[&str]) {
    sqlx::query(
        "INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title, description)
         SELECT 'P-DHE-001', (SELECT room_id FROM rooms WHERE room_name = 'Room 2' LIMIT 1), 'critical', 'active', 'seizure_detected', t, 'test'
           FROM unnest($1::text[]) AS t",
    )
    .bind(titles)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Waits for `n` create-call requests at the emulator.
async fn await_call_requests(events: &mut tokio::sync::broadcast::Receiver<EmulatorEvent>, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    let mut seen = 0;
    while seen < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(EmulatorEvent::CallCreated { .. })) => seen += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("emulator events: {e}"),
            Err(_) => panic!("{seen} of {n} calls requested within {within:?}"),
        }
    }
}

/// Issue 9, eighth session: a step whose calls are placed gives its worker
/// slot to the next run while the calls are recorded. With one worker and
/// the first alert's record held (its `on_call_placed` write-back takes
/// 0.9 s, inside the batched write-backs' 1 s statement timeout), the second
/// alert is still called before either record commits. (With the worker
/// slot held through the record, the second call waits for that record.)
pub async fn a_send_being_recorded_holds_no_worker_slot() {
    let (db, emulator, app) = gated_hospital("UPDATE wb_gate SET n = n + 1 FROM pg_sleep(0.9) WHERE $1 IS NOT NULL AND $2 IS NOT NULL", 1).await;
    let mut events = emulator.subscribe();
    insert_titled_alerts(&db, &["first", "second"]).await;
    let t0 = Instant::now();
    await_call_requests(&mut events, 2, Duration::from_secs(10)).await;
    let both_called = t0.elapsed();
    let recorded = db.scalar_i64("SELECT count(*) FROM wardcall.notification_attempts WHERE requested_at IS NOT NULL").await;
    eprintln!("both alerts called {both_called:?} after the insert; records committed then: {recorded}");
    assert_eq!(recorded, 0, "the second alert was called only after the first one's record committed");
    await_true(
        &db,
        "both sends recorded and written back",
        Duration::from_secs(10),
        "SELECT (SELECT count(*) FROM wardcall.notification_attempts WHERE requested_at IS NOT NULL AND provider_id IS NOT NULL) = 2
            AND (SELECT n FROM wb_gate) = 2",
    )
    .await;
    await_true(&db, "both runs to wait for an acknowledgement", Duration::from_secs(10), "SELECT count(*) = 2 FROM wardcall.runs WHERE status = 'waiting'")
        .await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'write_back.failed'").await, 0);
    app.stop(Duration::from_secs(2)).await;
    emulator.shutdown().await;
}

/// Issue 9, eighth session (review): a write-back that waits for a team's
/// lock inside a batch of send records does not hold the batch: after the
/// batched write-backs' 200 ms lock timeout it and the batch's later ones
/// are left out, the records commit (a nurse's keypress waits for the
/// attempt's row: it must not wait for the team's lock), and the left-out
/// write-backs run alone after the commit, with the write-back's own 2 s
/// lock timeout: the row the test holds for 1 s is written by all of them
/// once it is free, and none is audited as failed.
pub async fn a_write_back_waiting_for_a_team_lock_does_not_hold_its_batch() {
    let titles = ["a", "b", "c", "d"];
    let (db, emulator, app) = gated_hospital("UPDATE wb_gate SET n = n + 1 WHERE $1 IS NOT NULL AND $2 IS NOT NULL", 128).await;
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT n FROM wb_gate FOR UPDATE").execute(&mut *holder).await.unwrap();
    let held = Instant::now();
    let mut events = emulator.subscribe();
    insert_titled_alerts(&db, &titles).await;
    await_call_requests(&mut events, titles.len(), Duration::from_secs(10)).await;
    await_true(
        &db,
        "every send recorded while the team's row is held",
        Duration::from_secs(5),
        &format!("SELECT count(*) = {} FROM wardcall.notification_attempts WHERE requested_at IS NOT NULL", titles.len()),
    )
    .await;
    let recorded_after = held.elapsed();
    eprintln!("every send recorded {recorded_after:?} after the team's row was locked");
    assert!(recorded_after < Duration::from_millis(1500), "the records waited {recorded_after:?} for the team's lock");
    // Keep the row 1 s in all, then let the deferred write-backs through.
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(held.elapsed())).await;
    holder.rollback().await.unwrap();
    await_true(&db, "every write-back applied", Duration::from_secs(10), &format!("SELECT n = {} FROM wb_gate", titles.len())).await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'write_back.failed'").await, 0);
    app.stop(Duration::from_secs(2)).await;
    emulator.shutdown().await;
}

/// Issue 9, tenth session: write-backs left out of a batch of send records
/// are kept in the batch's own transaction (`wardcall.pending_write_backs`),
/// so that an engine that stops before it writes them leaves them to the
/// next: the team's row is held until the first engine has stopped (its
/// write-backs wait for it, then are dropped with the engine, as if the
/// process had ended); a second engine's call sweeper writes every one,
/// once, and none is audited as failed.
pub async fn write_backs_left_out_of_a_batch_outlive_their_engine() {
    let titles = ["a", "b", "c"];
    let (db, emulator, cfg) = gated_hospital_config("UPDATE wb_gate SET n = n + 1 WHERE $1 IS NOT NULL AND $2 IS NOT NULL", 128).await;
    let first = start_app(&db, cfg.clone()).await;
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT n FROM wb_gate FOR UPDATE").execute(&mut *holder).await.unwrap();
    let mut events = emulator.subscribe();
    insert_titled_alerts(&db, &titles).await;
    await_call_requests(&mut events, titles.len(), Duration::from_secs(10)).await;
    await_true(
        &db,
        "every send recorded and its write-back kept",
        Duration::from_secs(5),
        &format!(
            "SELECT (SELECT count(*) FROM wardcall.notification_attempts WHERE requested_at IS NOT NULL) = {n}
                AND (SELECT count(*) FROM wardcall.pending_write_backs WHERE hook = 'on_call_placed') = {n}",
            n = titles.len()
        ),
    )
    .await;
    first.stop(Duration::from_secs(2)).await;
    // The first engine's own try waits for the row with the write-back's 2 s
    // lock timeout: its stop must come sooner, or that try is audited failed.
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'write_back.failed'").await,
        0,
        "the first engine stopped more than 2 s after its batch committed (a slow host): its own try timed out on the team's lock"
    );
    holder.rollback().await.unwrap();
    assert_eq!(db.scalar_i64("SELECT n::bigint FROM wb_gate").await, 0, "the stopped engine wrote none of them");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.pending_write_backs").await, titles.len() as i64, "they are still kept");
    // Kept for long, they are a problem `wardcall status` shows.
    db.exec("UPDATE wardcall.pending_write_backs SET deferred_at = deferred_at - interval '2 minutes'").await;
    let problems = wardcall::status::problems(&db.pool, &cfg).await.unwrap();
    assert!(
        problems.iter().any(|p| p.starts_with(&format!("write-backs: {} kept write-back(s) not yet written", titles.len()))),
        "status shows the kept write-backs: {problems:?}"
    );
    let second = start_app(&db, cfg.clone()).await;
    await_true(
        &db,
        "the second engine to write every kept write-back",
        Duration::from_secs(20),
        &format!("SELECT n = {} AND NOT EXISTS (SELECT 1 FROM wardcall.pending_write_backs) FROM wb_gate", titles.len()),
    )
    .await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'write_back.failed'").await, 0);
    second.stop(Duration::from_secs(2)).await;
    assert_eq!(db.scalar_i64("SELECT n::bigint FROM wb_gate").await, titles.len() as i64, "each was written once");
    assert!(!wardcall::status::problems(&db.pool, &cfg).await.unwrap().iter().any(|p| p.starts_with("write-backs:")));
    emulator.shutdown().await;
}

/// Issue 9, tenth session: the SQL of kept write-backs. One kept twice is
/// kept once; it is not due to the sweepers before
/// `write_backs::FIRST_SWEEP_AFTER_S`; a try count past any power of two a
/// float holds still pushes it on by at most `RETRY_MAX_S`; two
/// transactions cannot both take it, and a rollback keeps it; giving it up
/// deletes it and audits `write_back.failed` with its tries, under the actor
/// giving up.
pub async fn a_kept_write_back_is_taken_once_and_given_up_with_an_audit() {
    use wardcall::store::write_backs::{self, AttemptWriteBack};
    let db = TestDb::new().await;
    let run: Uuid = sqlx::query_scalar(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, fencing_token) VALUES ('w', 'e', '{}', 'call', 'running', 3) RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let tier = crate::escalation::first_tier(run, 3, &[("nurse-a", "A", crate::escalation::NURSE_A)]);
    wardcall::store::alerts::open_with_intents(&mut db.pool.acquire().await.unwrap(), &tier).await.unwrap();
    let attempt: Uuid = sqlx::query_scalar("SELECT id FROM wardcall.notification_attempts").fetch_one(&db.pool).await.unwrap();
    let payload = json!({"title": "t"});
    let kept = [AttemptWriteBack { attempt, hook: "on_call_placed", statement: "UPDATE x SET y = $1", payload: &payload }];
    for _ in 0..2 {
        let mut tx = db.pool.begin().await.unwrap();
        write_backs::keep(&mut tx, &kept, "engine:a").await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.pending_write_backs").await, 1, "kept once");
    assert!(write_backs::due(&db.pool).await.unwrap().is_none(), "left to its engine at first");
    db.exec("UPDATE wardcall.pending_write_backs SET next_try_at = clock_timestamp() - interval '1 second', tries = 5000").await;
    let (due_attempt, hook, tries) = write_backs::due(&db.pool).await.unwrap().expect("due");
    assert_eq!((due_attempt, hook.as_str(), tries), (attempt, "on_call_placed", 5001));
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM wardcall.pending_write_backs WHERE next_try_at <= clock_timestamp() + make_interval(secs => {})",
            write_backs::RETRY_MAX_S
        ))
        .await,
        1,
        "pushed on by at most RETRY_MAX_S"
    );
    assert!(write_backs::due(&db.pool).await.unwrap().is_none(), "not due again at once");
    let mut first = db.pool.begin().await.unwrap();
    let taken = write_backs::take(&mut first, attempt, "on_call_placed").await.unwrap().expect("taken");
    assert_eq!((taken.statement.as_str(), &taken.payload, taken.actor.as_str()), ("UPDATE x SET y = $1", &payload, "engine:a"));
    let mut second = db.pool.begin().await.unwrap();
    assert!(write_backs::take(&mut second, attempt, "on_call_placed").await.unwrap().is_none(), "held by the first");
    assert!(!write_backs::give_up(&db.pool, attempt, "on_call_placed", "x", "engine:b").await.unwrap(), "held by the first");
    second.rollback().await.unwrap();
    first.rollback().await.unwrap();
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.pending_write_backs").await, 1, "a rollback keeps it");
    assert!(write_backs::give_up(&db.pool, attempt, "on_call_placed", "a deferred trigger failed", "engine:b").await.unwrap());
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.pending_write_backs").await, 0);
    let (actor, detail): (String, Value) = sqlx::query_as("SELECT actor, detail FROM wardcall.audit_log WHERE action = 'write_back.failed' AND entity_id = $1")
        .bind(attempt.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(actor, "engine:b");
    assert_eq!(detail, json!({"hook": "on_call_placed", "error": "a deferred trigger failed", "tries": 5001}));
    // Kept again, and its alert closed meanwhile: superseded, audited, not run.
    let mut tx = db.pool.begin().await.unwrap();
    write_backs::keep(&mut tx, &kept, "engine:a").await.unwrap();
    tx.commit().await.unwrap();
    db.exec("UPDATE wardcall.alerts SET status = 'acknowledged'").await;
    assert!(wardcall::notify::delivery::run_kept_write_back(&db.pool, attempt, "on_call_placed", "engine:c").await.unwrap());
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.pending_write_backs").await, 0);
    let (actor, detail): (String, Value) =
        sqlx::query_as("SELECT actor, detail FROM wardcall.audit_log WHERE action = 'write_back.failed' AND entity_id = $1 ORDER BY id DESC LIMIT 1")
            .bind(attempt.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(actor, "engine:c");
    assert!(detail["error"].as_str().unwrap().starts_with("superseded"), "{detail}");
    assert_eq!(detail["kept_by"], "engine:a");
}

/// Issue 9, eighth session: the records of sends that return together are
/// committed in one transaction (the record committer's batch), and a
/// write-back that fails in it is rolled back to its savepoint and audited
/// while the batch's other records and write-backs commit. The first
/// record's write-back waits for a row the test holds, so the others queue
/// into one batch meanwhile.
pub async fn a_batch_of_send_records_keeps_the_others_when_one_write_back_fails() {
    let titles = ["ok-1", "fail-2", "ok-3", "ok-4", "fail-5", "ok-6", "ok-7"];
    let (db, emulator, app) =
        gated_hospital("UPDATE wb_gate SET n = n + 1 WHERE $2 IS NOT NULL AND (CASE WHEN $1->>'title' LIKE 'fail-%' THEN 1 / 0 ELSE 1 END) = 1", 128).await;
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT n FROM wb_gate FOR UPDATE").execute(&mut *holder).await.unwrap();
    let mut events = emulator.subscribe();
    insert_titled_alerts(&db, &titles).await;
    await_call_requests(&mut events, titles.len(), Duration::from_secs(10)).await;
    // Every record waits: the first batch for the row, the rest for the first batch.
    tokio::time::sleep(Duration::from_millis(100)).await;
    holder.rollback().await.unwrap();
    await_true(
        &db,
        "every send recorded",
        Duration::from_secs(10),
        &format!("SELECT count(*) = {} FROM wardcall.notification_attempts WHERE requested_at IS NOT NULL AND provider_id IS NOT NULL", titles.len()),
    )
    .await;
    let failed: Vec<String> = sqlx::query_scalar(
        "SELECT r.input->>'title' FROM wardcall.audit_log l
           JOIN wardcall.notification_attempts n ON n.id::text = l.entity_id JOIN wardcall.runs r ON r.id = n.run_id
          WHERE l.action = 'write_back.failed' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(failed, vec!["fail-2", "fail-5"], "the failing write-backs are audited, each once");
    assert_eq!(db.scalar_i64("SELECT n::bigint FROM wb_gate").await, 5, "the other write-backs committed");
    let largest_batch =
        db.scalar_i64("SELECT max(c) FROM (SELECT count(*) AS c FROM wardcall.audit_records WHERE action IN ('attempt.requested', 'attempt.create_confirmed') GROUP BY xmin::text) t").await;
    eprintln!("largest transaction of send records: {largest_batch}");
    assert!(largest_batch >= 2, "the records were committed one transaction each");
    await_true(
        &db,
        "every run to wait for an acknowledgement",
        Duration::from_secs(10),
        &format!("SELECT count(*) = {} FROM wardcall.runs WHERE status = 'waiting'", titles.len()),
    )
    .await;
    app.stop(Duration::from_secs(2)).await;
    emulator.shutdown().await;
}

/// A worker's `continue` of run `run` to `op:<n>`, adding result `n` (with a
/// JSON null in it) as a step-log patch; returns the transition and the
/// state after it.
fn logged_continue(run: &store::ClaimedRun, n: usize) -> (TransitionCommit, Value) {
    let mut after = if run.state.is_object() { run.state.clone() } else { json!({}) };
    after["results"][n.to_string()] = json!({"n": n, "none": null});
    let commit = TransitionCommit {
        id: run.id,
        fencing_token: run.fencing_token,
        step: run.step.clone(),
        state: Arc::new(Value::Null),
        next_step: format!("op:{}", n + 1),
        parking: Parking::Continue,
        actor: "engine:test".into(),
        seq: run.step_seq + 1,
        patch: Some(wardcall::runtime::state_patch::diff(&run.state, &after)),
    };
    (commit, after)
}

/// Goes on with `run` through `steps` logged `continue`s, as its worker would.
async fn continue_logged(db: &TestDb, run: &mut store::ClaimedRun, steps: std::ops::Range<usize>) {
    for n in steps {
        let (commit, after) = logged_continue(run, n);
        let outcome = store::commit_transitions(&mut db.pool.acquire().await.unwrap(), std::slice::from_ref(&commit)).await.unwrap();
        assert_eq!(outcome, vec![Some(false)], "continue {n} commits");
        run.state = after;
        run.step = commit.next_step;
        run.step_seq += 1;
    }
}

/// The step log (migration 0017): a worker's `continue`s append one row each
/// to `wardcall.run_steps` and leave the run's row as it was (no new row
/// version), each audited `run.step_completed`. When the lease lapses, the
/// claim that takes the run over folds them into its row and hands them to
/// the new owner; the old owner's next append is fenced out, the new one's
/// goes on from the next number.
pub async fn continues_append_to_the_step_log_and_a_takeover_folds_them() {
    let db = TestDb::new().await;
    let mut run = claimed_runs(&db, 1, "old").await.remove(0);
    let version = |db: &TestDb, id: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (String, String, i64, Value)>("SELECT xmin::text, step, step_seq, state FROM wardcall.runs WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let before = version(&db, run.id).await;
    continue_logged(&db, &mut run, 0..3).await;
    assert_eq!(version(&db, run.id).await, before, "the run's row was not rewritten by the logged steps");
    assert_eq!(db.scalar_i64(&format!("SELECT count(*) FROM wardcall.run_steps WHERE run_id = '{}'", run.id)).await, 3);
    assert_eq!(audited(&db, run.id).await, vec!["run.claimed", "run.step_completed", "run.step_completed", "run.step_completed"]);
    // The lease lapses; another engine's claim takes the run over.
    sqlx::query("UPDATE wardcall.runs SET due_at = clock_timestamp() - interval '1 second' WHERE id = $1").bind(run.id).execute(&db.pool).await.unwrap();
    let mut taken = store::claim_due(&mut db.pool.acquire().await.unwrap(), "new", 10, 600_000).await.unwrap();
    assert_eq!(taken.len(), 1);
    let mut taken = taken.remove(0);
    assert_eq!((taken.previous_status.as_str(), taken.step.as_str(), taken.step_seq, taken.step_attempt), ("running", "op:3", 3, 0));
    assert_eq!(taken.state, run.state, "the claim folded the logged steps in");
    let (_, step, seq, state) = version(&db, run.id).await;
    assert_eq!((step.as_str(), seq, &state), ("op:3", 3, &run.state), "and wrote the fold into the run's row");
    // The old owner's next step is fenced out and leaves no row.
    let (late, _) = logged_continue(&run, 3);
    assert_eq!(store::commit_transitions(&mut db.pool.acquire().await.unwrap(), &[late]).await.unwrap(), vec![None]);
    assert_eq!(db.scalar_i64(&format!("SELECT count(*) FROM wardcall.run_steps WHERE run_id = '{}'", run.id)).await, 3);
    // The new owner goes on, then completes (a checkpoint of the whole state).
    continue_logged(&db, &mut taken, 3..5).await;
    let done = TransitionCommit {
        id: taken.id,
        fencing_token: taken.fencing_token,
        step: taken.step.clone(),
        state: Arc::new(taken.state.clone()),
        next_step: taken.step.clone(),
        parking: Parking::Complete,
        actor: "engine:test".into(),
        seq: taken.step_seq + 1,
        patch: None,
    };
    assert_eq!(store::commit_transitions(&mut db.pool.acquire().await.unwrap(), &[done]).await.unwrap(), vec![Some(false)]);
    let (_, step, seq, state) = version(&db, run.id).await;
    assert_eq!((step.as_str(), seq), ("op:5", 6));
    assert_eq!(state["results"].as_object().unwrap().len(), 5, "{state}");
    assert_eq!(state["results"]["4"], json!({"n": 4, "none": null}));
}

/// A run cancelled while its worker has logged steps after the checkpoint:
/// the cancel folds them into the row first, so that its `on_cancel` hook
/// starts from the state they made (and no later claim folds them over the
/// hook's step).
pub async fn a_cancel_folds_the_step_log_before_its_hook() {
    let db = TestDb::new().await;
    let mut run = claimed_runs(&db, 1, "old").await.remove(0);
    continue_logged(&db, &mut run, 0..2).await;
    let mut tx = db.pool.begin().await.unwrap();
    let hook = |_: &str, _: &str| Some("on_cancel:0".to_string());
    let cancelled = store::cancel_run_in(&mut tx, run.id, "engine:test", "test", false, &hook).await.unwrap();
    assert!(cancelled.is_some());
    tx.commit().await.unwrap();
    let mut claimed = store::claim_due(&mut db.pool.acquire().await.unwrap(), "hook", 10, 600_000).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let claimed = claimed.remove(0);
    assert_eq!((claimed.step.as_str(), claimed.step_seq, claimed.previous_status.as_str()), ("on_cancel:0", 2, "pending"));
    assert_eq!(claimed.state["results"], run.state["results"], "the hook sees the logged steps' state");
    assert_eq!(claimed.state["ending"], json!({"status": "cancelled"}));
    // The cancelled lease's next step is fenced out.
    let (late, _) = logged_continue(&run, 2);
    assert_eq!(store::commit_transitions(&mut db.pool.acquire().await.unwrap(), &[late]).await.unwrap(), vec![None]);
}

/// `runtime::state_patch::diff` and `wardcall.apply_state_patch` agree: a
/// patch applied by PostgreSQL to the state it was made from gives the state
/// after, nulls, removals, arrays, type changes and odd keys included.
pub async fn the_step_logs_patches_apply_in_sql_as_in_rust() {
    let db = TestDb::new().await;
    let pairs = [
        (json!({}), json!({"results": {"0": {"a": null}}})),
        (json!({"results": {"0": 1, "1": {"b": [1, 2]}}, "x": "y"}), json!({"results": {"0": 1, "1": {"b": [2]}, "2": null}})),
        (json!({"a": {"b": 1}}), json!({"a": "text", "c": {"d": {}}})),
        (json!({"a/b": {"~0": 1}, "{x,y}": 2}), json!({"a/b": {"~0": 2}, "{x,y}": 3, "": 4})),
        (json!({"cycle": 0}), json!([1, 2])),
        (json!({"cycle": 0}), json!({})),
        (Value::Null, json!({"cycle": 1})),
    ];
    for (before, after) in pairs {
        let patch = wardcall::runtime::state_patch::diff(&before, &after);
        let applied: Value = sqlx::query_scalar("SELECT wardcall.apply_state_patch($1, $2)").bind(&before).bind(&patch).fetch_one(&db.pool).await.unwrap();
        assert_eq!(applied, after, "{before} with {patch}");
    }
    // Total, as the Rust mirror: operations that are malformed, or whose
    // path crosses an array or a scalar, are skipped, never an error.
    let odd = [
        (json!({"a": [{"b": 1}]}), json!([{"set": ["a", "0", "b"], "value": 2}, {"remove": ["a", "0"]}, {"set": ["c"], "value": 3}])),
        (json!("scalar"), json!([{"set": ["a"], "value": 1}, {"remove": ["a"]}])),
        (json!({"a": 1}), json!([{"set": ["a", "b"], "value": 1}, {"set": ["x"]}, {"remove": []}, "junk", {"set": "a", "value": 1}])),
        (json!({"a": 1}), json!({"not": "an array"})),
        (json!({"a": {}}), json!([{"remove": [null]}, {"set": ["a", null], "value": 1}, {"set": [1], "value": 2}, {"set": ["a", true], "value": 1}])),
        (json!({"a": 1}), json!([{"set": ["a"], "remove": [null]}, {"set": ["b"], "remove": ["a"]}, {"remove": ["a"]}])),
    ];
    for (before, patch) in odd {
        let applied: Value = sqlx::query_scalar("SELECT wardcall.apply_state_patch($1, $2)").bind(&before).bind(&patch).fetch_one(&db.pool).await.unwrap();
        let mut mirrored = before.clone();
        wardcall::runtime::state_patch::apply(&mut mirrored, &patch);
        assert_eq!(applied, mirrored, "{before} with {patch}");
    }
}

/// An engine's run whose third step fails once after two logged steps: the
/// failure is recorded on the step after them (the log folded into the row
/// first), so the retry starts from their results with the attempt counted,
/// and the run completes with every result once.
pub async fn a_failure_after_logged_steps_keeps_their_results_and_counts_its_attempt() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&script_config(4))).await;
    db.exec(
        r#"INSERT INTO tasks (kind, steps) VALUES ('go', '[{"op":"step","name":"a"},{"op":"step","name":"b"},{"op":"fail","times":1},{"op":"step","name":"c"}]')"#,
    )
    .await;
    await_true(&db, "the run to complete", Duration::from_secs(30), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    let state: Value = sqlx::query_scalar("SELECT state FROM wardcall.runs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(state["results"]["0"]["name"], "a", "{state}");
    assert_eq!(state["results"]["1"]["name"], "b", "{state}");
    assert_eq!(state["results"]["2"]["succeeded_after_attempts"], 2, "{state}");
    assert_eq!(state["results"]["3"]["name"], "c", "{state}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.retry_scheduled' AND detail->>'step' = 'op:2'").await, 1);
    for from in ["start", "op:1"] {
        let n =
            db.scalar_i64(&format!("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.step_completed' AND detail->>'from_step' = '{from}'")).await;
        assert_eq!(n, 1, "step {from} ran once, not again after the failure");
    }
    assert!(db.scalar_i64("SELECT count(*) FROM wardcall.run_steps").await >= 2, "the first steps were logged");
    app.stop(Duration::from_secs(2)).await;
}

/// A `defer`, `fail` or `cancelled` transition keeps some of the run's
/// columns (the step, its attempts, the wait outcome, the last error). After
/// logged steps, the row's are the checkpoint's (here: two failed attempts,
/// their error and a wait's outcome, all before the logged steps): each
/// such transition takes them as the logged `continue`s left them.
pub async fn transitions_that_keep_columns_take_them_from_the_logged_steps() {
    let db = TestDb::new().await;
    let runs = claimed_runs(&db, 3, "test").await;
    let ids: Vec<Uuid> = runs.iter().map(|r| r.id).collect();
    sqlx::query("UPDATE wardcall.runs SET step_attempt = 2, last_error = 'old error', wait_outcome = '{\"signal\": \"x\"}' WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&db.pool)
        .await
        .unwrap();
    let parkings = [Parking::Defer { delay_ms: 60_000 }, Parking::Fail { error: "new error".into() }, Parking::Cancelled];
    for (mut run, parking) in runs.into_iter().zip(parkings) {
        continue_logged(&db, &mut run, 0..2).await;
        let kind = format!("{parking:?}");
        let commit = TransitionCommit {
            id: run.id,
            fencing_token: run.fencing_token,
            step: run.step.clone(),
            state: Arc::new(run.state.clone()),
            next_step: run.step.clone(),
            parking,
            actor: "engine:test".into(),
            seq: run.step_seq + 1,
            patch: None,
        };
        assert_eq!(store::commit_transitions(&mut db.pool.acquire().await.unwrap(), &[commit]).await.unwrap(), vec![Some(false)], "{kind}");
        let (step, attempt, error, outcome, seq, state): (String, i32, Option<String>, Option<Value>, i64, Value) =
            sqlx::query_as("SELECT step, step_attempt, last_error, wait_outcome, step_seq, state FROM wardcall.runs WHERE id = $1")
                .bind(run.id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!((step.as_str(), seq, &state), ("op:2", 3, &run.state), "{kind}: the step after the logged ones");
        assert_eq!(outcome, None, "{kind}: the logged steps consumed the wait's outcome");
        if kind.starts_with("Fail") {
            assert_eq!((attempt, error.as_deref()), (1, Some("new error")), "{kind}: the failed step's first attempt");
        } else {
            assert_eq!((attempt, error), (0, None), "{kind}: no attempt and no error of the logged steps' step");
        }
    }
    // The same through a step's own fenced transaction (a `sql` step that
    // ends the run failed): `write_transition` folds the log in first.
    let mut run = claimed_runs(&db, 1, "test").await.remove(0);
    sqlx::query("UPDATE wardcall.runs SET step_attempt = 2, last_error = 'old error', wait_outcome = '{\"signal\": \"x\"}' WHERE id = $1")
        .bind(run.id)
        .execute(&db.pool)
        .await
        .unwrap();
    continue_logged(&db, &mut run, 0..2).await;
    let mut tx = db.pool.begin().await.unwrap();
    assert!(store::lock_fenced(&mut tx, run.id, run.fencing_token).await.unwrap());
    let fail = Parking::Fail { error: "new error".into() };
    store::write_transition(&mut tx, &run, &run.state, &run.step, &fail, "engine:test").await.unwrap();
    tx.commit().await.unwrap();
    let (step, attempt, error, outcome, state): (String, i32, Option<String>, Option<Value>, Value) =
        sqlx::query_as("SELECT step, step_attempt, last_error, wait_outcome, state FROM wardcall.runs WHERE id = $1")
            .bind(run.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((step.as_str(), attempt, error.as_deref(), outcome, &state), ("op:2", 1, Some("new error"), None, &run.state), "write_transition");
}

/// The fold (`wardcall.step_log_fold`, a PL/pgSQL call) runs in a claim
/// only for the runs taken over from `running`, not for every claimed run:
/// counted with `track_functions` in the claim's own transaction.
pub async fn a_claim_calls_the_fold_only_for_runs_taken_over() {
    let db = TestDb::new().await;
    let mut left = claimed_runs(&db, 1, "gone").await.remove(0);
    continue_logged(&db, &mut left, 0..1).await;
    sqlx::query("UPDATE wardcall.runs SET due_at = clock_timestamp() - interval '1 second' WHERE id = $1").bind(left.id).execute(&db.pool).await.unwrap();
    db.exec("INSERT INTO wardcall.runs (workflow, event, input, step, status) SELECT 'script', 'test', '{}', 'start', 'pending' FROM generate_series(1, 20)")
        .await;
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL track_functions = 'pl'").execute(&mut *tx).await.unwrap();
    let claimed = store::claim_due(&mut tx, "new", 100, 600_000).await.unwrap();
    let calls: i64 = sqlx::query_scalar("SELECT pg_stat_get_xact_function_calls('wardcall.step_log_fold'::regproc)").fetch_one(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(claimed.len(), 21);
    assert_eq!(claimed.iter().filter(|r| r.step_seq == 1).count(), 1, "the run taken over was folded");
    assert_eq!(calls, 1, "the fold ran for the one run taken over, not for the 20 pending ones");
    // The same for the claim that may run steps inside it (`lock_due`).
    let mut left = claimed_runs(&db, 1, "gone again").await.remove(0);
    continue_logged(&db, &mut left, 0..2).await;
    sqlx::query("UPDATE wardcall.runs SET due_at = clock_timestamp() - interval '1 second' WHERE id = $1").bind(left.id).execute(&db.pool).await.unwrap();
    db.exec("UPDATE wardcall.runs SET status = 'pending', due_at = clock_timestamp() - interval '1 second' WHERE lease_owner = 'new'").await;
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL track_functions = 'pl'").execute(&mut *tx).await.unwrap();
    let locked = store::lock_due(&mut tx, 100, 100).await.unwrap();
    let calls: i64 = sqlx::query_scalar("SELECT pg_stat_get_xact_function_calls('wardcall.step_log_fold'::regproc)").fetch_one(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(locked.len(), 22);
    assert_eq!(locked.iter().filter(|(r, _)| r.step_seq == 2 && r.step == "op:2").count(), 1, "lock_due reads the run taken over folded");
    assert_eq!(calls, 1, "lock_due folds only the run left running");
}

/// The workflows as they are, but for one thing: the script step `op:1`
/// saves its state mid-way, as an escalation tier saves its recipients
/// (`StepContext::save_state`, in a fenced transaction of its own).
struct SavingMidWay;

impl wardcall::runtime::step::WorkflowHost for SavingMidWay {
    fn run_step<'a, 'c: 'a>(
        &'a self,
        ctx: &'a mut wardcall::runtime::step::StepContext<'c>,
    ) -> futures_util::future::BoxFuture<'a, Result<wardcall::runtime::step::Transition, wardcall::runtime::step::StepError>> {
        Box::pin(async move {
            let transition = wardcall::workflows::Host.run_step(ctx).await?;
            if ctx.run.step == "op:1" {
                ctx.state["saved_mid_way"] = json!(true);
                let mut tx = ctx.services.pool.begin().await.map_err(|e| wardcall::runtime::step::StepError::Retryable(e.into()))?;
                assert!(store::lock_fenced(&mut tx, ctx.run.id, ctx.run.fencing_token).await.unwrap(), "the step holds its lease");
                ctx.save_state(&mut tx).await.map_err(|e| wardcall::runtime::step::StepError::Retryable(e.into()))?;
                tx.commit().await.map_err(|e| wardcall::runtime::step::StepError::Retryable(e.into()))?;
            }
            Ok(transition)
        })
    }
    fn is_critical(&self, w: &Workflow) -> bool {
        wardcall::workflows::Host.is_critical(w)
    }
    fn runs_in_claim(&self, w: &Workflow, run: &store::ClaimedRun) -> bool {
        wardcall::workflows::Host.runs_in_claim(w, run)
    }
    fn retry_rule(&self, w: &Workflow, step: &str) -> wardcall::runtime::step::RetryRule {
        wardcall::workflows::Host.retry_rule(w, step)
    }
    fn failure_hook(&self, w: &Workflow, step: &str) -> Option<String> {
        wardcall::workflows::Host.failure_hook(w, step)
    }
    fn cancel_run_in<'a>(
        &'a self,
        conn: &'a mut sqlx::PgConnection,
        config: &'a wardcall::config::Config,
        run: Uuid,
        actor: &'a str,
        reason: &'a str,
        replaced: bool,
    ) -> futures_util::future::BoxFuture<'a, Result<bool, sqlx::Error>> {
        wardcall::workflows::Host.cancel_run_in(conn, config, run, actor, reason, replaced)
    }
    fn keyed_routes(&self, w: &Workflow, event: &str) -> Vec<(String, wardcall::runtime::step::KeyedRoute)> {
        wardcall::workflows::Host.keyed_routes(w, event)
    }
    fn background_tasks(&self, services: wardcall::runtime::Services) -> Vec<futures_util::future::BoxFuture<'static, ()>> {
        wardcall::workflows::Host.background_tasks(services)
    }
    fn prefetch_first_step(
        &self,
        services: &wardcall::runtime::Services,
        w: &Workflow,
        input: &Value,
    ) -> Option<futures_util::future::BoxFuture<'static, Box<dyn std::any::Any + Send>>> {
        wardcall::workflows::Host.prefetch_first_step(services, w, input)
    }
}

/// A step that saved its state mid-way (`StepContext::save_state`: the
/// run's row now holds that state, with the logged steps before it folded
/// in) and then goes on commits a checkpoint of the whole state, not a
/// patch: a patch would be relative to the state before the step, which
/// the row no longer holds. Through the engine, a script of four steps whose
/// second saves its state: the first step is logged, the second is a
/// checkpoint (no log row of its number), the third is logged after it, and
/// the run ends with every result and the saved member.
pub async fn a_step_that_saved_its_state_commits_a_checkpoint_not_a_patch() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let cfg = config(&script_config(4));
    wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap();
    let providers = wardcall::providers::Providers::from_config(&cfg, None).unwrap();
    let engine = wardcall::runtime::Engine::new(db.database(), cfg, providers, "http://127.0.0.1:9".into(), Arc::new(SavingMidWay));
    let tasks = engine.spawn();
    db.exec(
        r#"INSERT INTO tasks (kind, steps) VALUES ('go', '[{"op":"step","name":"a"},{"op":"step","name":"b"},{"op":"step","name":"c"},{"op":"step","name":"d"}]')"#,
    )
    .await;
    await_true(&db, "the run to complete", Duration::from_secs(30), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    tasks.stop(Duration::from_secs(2)).await;
    let logged: Vec<(i64, String)> = sqlx::query_as("SELECT seq, step FROM wardcall.run_steps ORDER BY seq").fetch_all(&db.pool).await.unwrap();
    assert_eq!(logged, vec![(1, "start".to_string()), (3, "op:2".to_string())], "the step that saved its state was not logged as a patch");
    let state: Value = sqlx::query_scalar("SELECT state FROM wardcall.runs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(state["saved_mid_way"], true, "{state}");
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        assert_eq!(state["results"][i.to_string()]["name"], *name, "{state}");
    }
    let steps = db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action IN ('run.step_completed', 'run.completed')").await;
    assert_eq!(steps, 4, "each step audited once");
}
