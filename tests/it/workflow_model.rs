//! The workflow model: steps over the team's own tables, keys, replace,
//! cancel_on, waits for events by key, hooks, and the checks at load.

use crate::harness::*;
use serde_json::Value;
use std::time::Duration;
use wardcall::config::Config;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        workflow_model::sql_steps_keep_variables_emit_and_write_back,
        workflow_model::the_last_step_of_a_phase_ends_it_in_its_own_transition,
        workflow_model::replace_by_key_moves_a_timer,
        workflow_model::cancel_on_cancels_a_sleeping_run_and_runs_on_cancel,
        workflow_model::wait_for_an_event_by_key_with_and_without_timeout,
        workflow_model::when_condition_filters_events,
        workflow_model::a_when_that_fails_on_one_event_decides_the_others,
        workflow_model::on_failure_hook_runs_once_after_the_last_retry,
        workflow_model::on_failure_hook_runs_once_when_its_statement_is_interrupted,
        workflow_model::on_failure_hook_runs_once_when_its_commit_fails_after_its_statement,
        workflow_model::unknown_variable_is_refused_naming_the_key,
        workflow_model::wrong_column_is_refused_naming_the_key,
    ]
}

/// The team's table: jobs that come due.
const JOBS: &str = "CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    due_at timestamptz NOT NULL DEFAULT now(),
    status text NOT NULL DEFAULT 'pending',
    task_name text,
    note text,
    fired_at timestamptz,
    fire_count integer NOT NULL DEFAULT 0);
CREATE TABLE job_log (id bigserial PRIMARY KEY, job_id bigint, what text, at timestamptz NOT NULL DEFAULT clock_timestamp());";

fn jobs_config(workflows: &str) -> String {
    format!(
        r#"
[engine]
lease_ms = 2000
sweep_ms = 100
poll_ms = 50

[[sources]]
name = "jobs_saved"
table = "jobs"
operations = ["INSERT", "UPDATE"]
condition = "NEW.status IN ('pending', 'scheduled')"
event = "job.saved"
{workflows}
"#
    )
}

async fn job_row(db: &TestDb, id: i64) -> (String, Option<String>, Option<String>, i32) {
    sqlx::query_as("SELECT status, task_name, note, fire_count FROM jobs WHERE id = $1").bind(id).fetch_one(&db.pool).await.unwrap()
}

pub async fn sql_steps_keep_variables_emit_and_write_back() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let cfg = jobs_config(
        r#"
[[workflows]]
name = "schedule"
event = "job.saved"
key = "{id}"

[[workflows.steps]]
sql = """UPDATE jobs SET status = 'scheduled', task_name = 'job-' || ($1->>'id') || '-' || extract(epoch FROM due_at)::bigint
          WHERE id = ($1->>'id')::bigint RETURNING task_name"""
keep = "scheduled"

[[workflows.steps]]
emit = { event = "job.scheduled", payload = { job = "{id}", name = "{scheduled.task_name}", kind = "{event.kind}" } }

[[workflows]]
name = "log"
event = "job.scheduled"

[[workflows.steps]]
sql = "INSERT INTO job_log (job_id, what) VALUES (($1->>'job')::bigint, $1->>'name')"
"#,
    );
    let app = start_app(&db, config(&cfg)).await;
    let id = db.scalar_i64("INSERT INTO jobs (kind, due_at) VALUES ('call', '2030-01-01T00:00:00Z') RETURNING id").await;
    await_true(&db, "the emitted event's run to write the log", Duration::from_secs(10), "SELECT count(*) = 1 FROM job_log").await;
    let (status, name, _, _) = job_row(&db, id).await;
    assert_eq!(status, "scheduled");
    let expected = format!("job-{id}-1893456000");
    assert_eq!(name.as_deref(), Some(expected.as_str()));
    let logged: (i64, String) = sqlx::query_as("SELECT job_id, what FROM job_log").fetch_one(&db.pool).await.unwrap();
    assert_eq!(logged, (id, expected.clone()));
    // The write-back did not re-trigger the UPDATE capture: one run of `schedule`.
    await_true(&db, "both runs completed", Duration::from_secs(10), "SELECT count(*) = 2 FROM wardcall.runs WHERE status = 'completed'").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.runs WHERE workflow = 'schedule'").await, 1);
    let vars: Value = sqlx::query_scalar("SELECT state->'vars' FROM wardcall.runs WHERE workflow = 'schedule'").fetch_one(&db.pool).await.unwrap();
    assert_eq!(vars["scheduled"]["task_name"], expected.as_str());
    let emitted: Value = sqlx::query_scalar("SELECT payload FROM wardcall.outbox WHERE event = 'job.scheduled'").fetch_one(&db.pool).await.unwrap();
    assert_eq!(emitted["job"], id, "a lone placeholder keeps the JSON type: {emitted}");
    assert_eq!(emitted["kind"], "call");
    app.stop(Duration::from_secs(2)).await;
}

/// A phase's last step ends the phase in its own transition (with its
/// statement, exactly once): the main list's last step goes on to
/// `on_complete` and the hook's last step completes the run, so no run
/// commits a transition of its own only to find that nothing is left.
pub async fn the_last_step_of_a_phase_ends_it_in_its_own_transition() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let cfg = jobs_config(
        r#"
[[workflows]]
name = "noted"
event = "job.saved"
key = "{id}"

[[workflows.steps]]
sql = "INSERT INTO job_log (job_id, what) VALUES (($1->>'id')::bigint, 'first')"

[[workflows.steps]]
sql = "INSERT INTO job_log (job_id, what) VALUES (($1->>'id')::bigint, 'last')"

[[workflows.on_complete]]
sql = "INSERT INTO job_log (job_id, what) VALUES (($1->>'id')::bigint, 'completed')"
"#,
    );
    let app = start_app(&db, config(&cfg)).await;
    let id = db.scalar_i64("INSERT INTO jobs (kind) VALUES ('call') RETURNING id").await;
    await_true(&db, "the run to complete", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'").await;
    let logged: Vec<String> = sqlx::query_scalar("SELECT what FROM job_log WHERE job_id = $1 ORDER BY id").bind(id).fetch_all(&db.pool).await.unwrap();
    assert_eq!(logged, vec!["first", "last", "completed"], "each statement ran once");
    let audited: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT action, coalesce(detail->>'from_step', detail->>'step') FROM wardcall.audit_log WHERE entity = 'run' ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let expected =
        [("run.created", None), ("run.step_completed", Some("start")), ("run.step_completed", Some("steps:1")), ("run.completed", Some("on_complete:0"))];
    let expected: Vec<(String, Option<String>)> = expected.iter().map(|(a, s)| (a.to_string(), s.map(str::to_string))).collect();
    assert_eq!(audited, expected);
    let to_step: String =
        sqlx::query_scalar("SELECT detail->>'to_step' FROM wardcall.audit_log WHERE detail->>'from_step' = 'steps:1'").fetch_one(&db.pool).await.unwrap();
    assert_eq!(to_step, "on_complete:0", "the main list's last step goes straight to the hook");
    app.stop(Duration::from_secs(2)).await;
}

const TIMER: &str = r#"
[[sources]]
name = "jobs_cancelled"
table = "jobs"
operations = ["UPDATE"]
condition = "NEW.status = 'cancelled' AND OLD.status <> 'cancelled'"
event = "job.cancelled"

[[workflows]]
name = "timer"
event = "job.saved"
key = "{id}"
on_duplicate = "replace"
cancel_on = [{ event = "job.cancelled" }]

[[workflows.steps]]
sleep_until = "{due_at}"

[[workflows.steps]]
sql = "UPDATE jobs SET fired_at = clock_timestamp(), fire_count = fire_count + 1, status = 'done' WHERE id = ($1->>'id')::bigint"

[[workflows.on_cancel]]
sql = "UPDATE jobs SET note = 'timer cancelled: ' || ($2->'ending'->>'status') WHERE id = ($1->>'id')::bigint"
"#;

pub async fn replace_by_key_moves_a_timer() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let app = start_app(&db, config(&jobs_config(TIMER))).await;
    let id = db.scalar_i64("INSERT INTO jobs (kind, due_at) VALUES ('call', clock_timestamp() + interval '1.5 seconds') RETURNING id").await;
    await_true(&db, "the first run to sleep", Duration::from_secs(5), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'sleeping'").await;
    // Rescheduled: the timer moves to 3 s from now.
    db.exec(&format!("UPDATE jobs SET due_at = clock_timestamp() + interval '3 seconds' WHERE id = {id}")).await;
    await_true(
        &db,
        "the second run to sleep",
        Duration::from_secs(5),
        "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'sleeping' AND key IS NOT NULL AND event_id = (SELECT max(id) FROM wardcall.outbox)",
    )
    .await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.replaced'").await, 1);
    await_true(&db, "the job to fire", Duration::from_secs(10), &format!("SELECT fire_count = 1 FROM jobs WHERE id = {id}")).await;
    let late_ms: f64 =
        sqlx::query_scalar("SELECT (extract(epoch FROM fired_at - due_at) * 1000)::float8 FROM jobs WHERE id = $1").bind(id).fetch_one(&db.pool).await.unwrap();
    assert!((0.0..2000.0).contains(&late_ms), "fired {late_ms} ms after the new due time (before it if negative)");
    // Fired once, at the new time; the replaced run ran no on_cancel hook.
    // Await the run's end (its last step writes `done`) rather than sleeping.
    await_true(
        &db,
        "every run to end",
        Duration::from_secs(5),
        "SELECT count(*) = 0 FROM wardcall.runs WHERE status IN ('pending','running','sleeping','waiting')",
    )
    .await;
    let (status, _, note, fires) = job_row(&db, id).await;
    assert_eq!((status.as_str(), note, fires), ("done", None, 1));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.runs WHERE status = 'cancelled'").await, 1);
    app.stop(Duration::from_secs(2)).await;
}

pub async fn cancel_on_cancels_a_sleeping_run_and_runs_on_cancel() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let app = start_app(&db, config(&jobs_config(TIMER))).await;
    let id = db.scalar_i64("INSERT INTO jobs (kind, due_at) VALUES ('call', clock_timestamp() + interval '2 seconds') RETURNING id").await;
    await_true(&db, "the run to sleep", Duration::from_secs(5), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'sleeping'").await;
    db.exec(&format!("UPDATE jobs SET status = 'cancelled' WHERE id = {id}")).await;
    await_true(&db, "the run to end cancelled", Duration::from_secs(5), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'cancelled'").await;
    let (_, _, note, _) = job_row(&db, id).await;
    assert_eq!(note.as_deref(), Some("timer cancelled: cancelled"));
    // Past the old due time: nothing fired.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, _, _, fires) = job_row(&db, id).await;
    assert_eq!((status.as_str(), fires), ("cancelled", 0));
    let actions: Vec<String> = sqlx::query_scalar("SELECT action FROM wardcall.audit_log WHERE entity = 'run' ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert!(actions.contains(&"run.cancelled".to_string()), "{actions:?}");
    app.stop(Duration::from_secs(2)).await;
}

pub async fn wait_for_an_event_by_key_with_and_without_timeout() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    db.exec("CREATE TABLE confirmations (id bigserial PRIMARY KEY, job_id bigint NOT NULL, by_whom text NOT NULL)").await;
    let cfg = format!(
        "{}{}",
        jobs_config(
            r#"
[[workflows]]
name = "await-confirmation"
event = "job.saved"
when = "payload->>'status' = 'pending'"
key = "{id}"

[[workflows.steps]]
wait = { event = "job.confirmed", key = "{job_id}", timeout = "1500ms" }
keep = "confirmation"

[[workflows.steps]]
sql = "UPDATE jobs SET note = coalesce($2->'confirmation'->>'by_whom', 'nobody') WHERE id = ($1->>'id')::bigint"
"#
        ),
        r#"
[[sources]]
name = "confirmations"
table = "confirmations"
event = "job.confirmed"
"#
    );
    let app = start_app(&db, config(&cfg)).await;
    let a = db.scalar_i64("INSERT INTO jobs (kind) VALUES ('a') RETURNING id").await;
    let b = db.scalar_i64("INSERT INTO jobs (kind) VALUES ('b') RETURNING id").await;
    await_true(&db, "both runs to wait", Duration::from_secs(5), "SELECT count(*) = 2 FROM wardcall.runs WHERE status = 'waiting'").await;
    // A confirmation for another key wakes nobody; one for `a` resumes only `a`.
    db.exec("INSERT INTO confirmations (job_id, by_whom) VALUES (999999, 'stranger')").await;
    db.exec(&format!("INSERT INTO confirmations (job_id, by_whom) VALUES ({a}, 'avery')")).await;
    await_true(&db, "job a to be confirmed", Duration::from_secs(5), &format!("SELECT note IS NOT NULL FROM jobs WHERE id = {a}")).await;
    assert_eq!(job_row(&db, a).await.2.as_deref(), Some("avery"));
    // `b` times out and goes on with the variable null.
    await_true(&db, "job b to time out", Duration::from_secs(5), &format!("SELECT note IS NOT NULL FROM jobs WHERE id = {b}")).await;
    assert_eq!(job_row(&db, b).await.2.as_deref(), Some("nobody"));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.wait_timed_out'").await, 1);
    app.stop(Duration::from_secs(2)).await;
}

pub async fn when_condition_filters_events() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let cfg = jobs_config(
        r#"
[[workflows]]
name = "calls-only"
event = "job.saved"
when = "lower(payload->>'kind') IN ('call', 'follow_up') AND payload->>'status' = 'pending'"

[[workflows.steps]]
sql = "UPDATE jobs SET note = 'seen' WHERE id = ($1->>'id')::bigint"
"#,
    );
    let app = start_app(&db, config(&cfg)).await;
    db.exec("INSERT INTO jobs (kind) VALUES ('CALL'), ('email'), ('Follow_Up'), ('call')").await;
    db.exec("UPDATE jobs SET note = NULL WHERE kind = 'nothing'").await;
    await_true(&db, "three runs to complete", Duration::from_secs(10), "SELECT count(*) = 3 FROM wardcall.runs WHERE status = 'completed'").await;
    let seen: Vec<String> = sqlx::query_scalar("SELECT kind FROM jobs WHERE note = 'seen' ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert_eq!(seen, vec!["CALL", "Follow_Up", "call"]);
    // The filtered event was processed, not left unrouted.
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox WHERE processed_at IS NULL OR unrouted_at IS NOT NULL").await, 0);
    app.stop(Duration::from_secs(2)).await;
}

pub async fn a_when_that_fails_on_one_event_decides_the_others() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let cfg = jobs_config(
        r#"
[[workflows]]
name = "big-only"
event = "job.saved"
when = "(payload->>'note')::int > 5"

[[workflows.steps]]
sql = "UPDATE jobs SET status = 'done' WHERE id = ($1->>'id')::bigint"
"#,
    );
    let app = start_app(&db, config(&cfg)).await;
    // One statement, one batch: 'seven' cannot be cast; 7 and 3 are decided as usual.
    db.exec("INSERT INTO jobs (kind, note) VALUES ('a', '7'), ('b', 'seven'), ('c', '3')").await;
    await_true(&db, "the outbox to be processed", Duration::from_secs(10), "SELECT bool_and(processed_at IS NOT NULL) FROM wardcall.outbox").await;
    await_true(&db, "job a's run to complete", Duration::from_secs(10), "SELECT status = 'done' FROM jobs WHERE kind = 'a'").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.runs").await, 1, "only the event that matched started a run");
    let failed: Value = sqlx::query_scalar("SELECT detail FROM wardcall.audit_log WHERE action = 'event.when_failed'").fetch_one(&db.pool).await.unwrap();
    assert_eq!((failed["workflow"].as_str(), failed["sqlstate"].as_str(), failed["run_started"].as_bool()), (Some("big-only"), Some("22P02"), Some(false)));
    app.stop(Duration::from_secs(2)).await;
}

pub async fn on_failure_hook_runs_once_after_the_last_retry() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    // A transient failure (serialization_failure, SQLSTATE 40001): retried.
    db.exec("CREATE FUNCTION flaky(bigint) RETURNS void LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'contention' USING ERRCODE = '40001'; END $$").await;
    let cfg = jobs_config(
        r#"
[[workflows]]
name = "fragile"
event = "job.saved"
max_attempts = 3
retry_base_ms = 20
retry_max_ms = 50

[[workflows.steps]]
sql = "UPDATE jobs SET fire_count = fire_count + 1 WHERE id = ($1->>'id')::bigint"

[[workflows.steps]]
sql = "SELECT flaky(($1->>'id')::bigint)"

[[workflows.on_failure]]
sql = "INSERT INTO job_log (job_id, what) VALUES (($1->>'id')::bigint, 'failed at ' || ($2->'ending'->>'step'))"

[[workflows.on_failure]]
sql = "UPDATE jobs SET status = 'failed', note = $2->'ending'->>'error' WHERE id = ($1->>'id')::bigint"
"#,
    );
    let app = start_app(&db, config(&cfg)).await;
    let id = db.scalar_i64("INSERT INTO jobs (kind) VALUES ('x') RETURNING id").await;
    await_true(&db, "the run to fail", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'failed'").await;
    let (status, _, note, fires) = job_row(&db, id).await;
    assert_eq!((status.as_str(), fires), ("failed", 1), "the first step committed once");
    assert!(note.as_deref().unwrap_or("").contains("40001"), "the last error (SQLSTATE 40001) is kept: {note:?}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.retry_scheduled'").await, 2, "3 attempts");
    let log: Vec<String> = sqlx::query_scalar("SELECT what FROM job_log").fetch_all(&db.pool).await.unwrap();
    assert_eq!(log, vec!["failed at steps:1".to_string()]);
    let last_error: String = sqlx::query_scalar("SELECT last_error FROM wardcall.runs").fetch_one(&db.pool).await.unwrap();
    assert!(last_error.contains("40001"), "{last_error}");
    app.stop(Duration::from_secs(2)).await;
}

pub async fn on_failure_hook_runs_once_when_its_statement_is_interrupted() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let cfg = jobs_config(
        r#"
[[workflows]]
name = "fragile"
event = "job.saved"
max_attempts = 1

[[workflows.steps]]
sql = "SELECT 1 / 0"

[[workflows.on_failure]]
sql = "INSERT INTO job_log (job_id, what) SELECT ($1->>'id')::bigint, 'hook' FROM pg_sleep(1)"

[[workflows.on_failure]]
sql = "UPDATE jobs SET status = 'failed' WHERE id = ($1->>'id')::bigint"
"#,
    );
    let app = start_app(&db, config(&cfg)).await;
    let id = db.scalar_i64("INSERT INTO jobs (kind) VALUES ('x') RETURNING id").await;
    // The engine's connection dies in the middle of the hook's statement (as
    // when an engine crashes): its transaction never commits.
    let pid: i32 = await_some("the hook's statement to run", Duration::from_secs(10), || async {
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE query LIKE 'INSERT INTO job_log%' AND state = 'active'")
            .fetch_optional(&db.pool)
            .await
            .unwrap()
    })
    .await;
    db.exec(&format!("SELECT pg_terminate_backend({pid})")).await;
    await_true(&db, "the run to end failed", Duration::from_secs(20), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'failed'").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM job_log").await, 1, "the hook's statement took effect once");
    assert_eq!(job_row(&db, id).await.0, "failed");
    app.stop(Duration::from_secs(2)).await;
}

pub async fn on_failure_hook_runs_once_when_its_commit_fails_after_its_statement() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    // The first commit of the hook's step fails after its statement ran (as
    // when the engine dies between the two): a trigger refuses that step's
    // audit row once. The statement must not have taken effect on its own.
    db.exec(
        "CREATE SEQUENCE refusals; -- not transactional: counts the refused commit
         CREATE FUNCTION refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.action = 'run.step_completed' AND NEW.detail->>'from_step' = 'on_failure:0'
                AND nextval('refusals') = 1 THEN
                 RAISE EXCEPTION 'simulated crash before the commit' USING ERRCODE = '57P01';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_once BEFORE INSERT ON wardcall.audit_records FOR EACH ROW EXECUTE FUNCTION refuse_once();",
    )
    .await;
    let cfg = jobs_config(
        r#"
[[workflows]]
name = "fragile"
event = "job.saved"
max_attempts = 1

[[workflows.steps]]
sql = "SELECT 1 / 0"

[[workflows.on_failure]]
sql = "INSERT INTO job_log (job_id, what) VALUES (($1->>'id')::bigint, 'hook')"

[[workflows.on_failure]]
sql = "UPDATE jobs SET status = 'failed' WHERE id = ($1->>'id')::bigint"
"#,
    );
    let app = start_app(&db, config(&cfg)).await;
    let id = db.scalar_i64("INSERT INTO jobs (kind) VALUES ('x') RETURNING id").await;
    await_true(&db, "the run to end failed", Duration::from_secs(20), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'failed'").await;
    assert!(db.scalar_i64("SELECT last_value FROM refusals").await >= 2, "the simulated crash happened, then the retry");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM job_log").await, 1, "the hook's statement took effect once");
    assert_eq!(job_row(&db, id).await.0, "failed");
    app.stop(Duration::from_secs(2)).await;
}

fn load(text: &str) -> Result<Config, String> {
    let c = Config::parse(text, "test.toml").map_err(|e| e.to_string())?;
    c.validate("test.toml").map_err(|e| e.to_string())?;
    Ok(c)
}

pub async fn unknown_variable_is_refused_naming_the_key() {
    let base = jobs_config(
        r#"
[[workflows]]
name = "w"
event = "job.saved"

[[workflows.steps]]
sql = "UPDATE jobs SET status = 'scheduled' WHERE id = ($1->>'id')::bigint RETURNING task_name"
keep = "scheduled"

[[workflows.steps]]
emit = { event = "x", payload = { name = "{scheduled.task_name}" } }

[[workflows.steps]]
sql = "UPDATE jobs SET note = $2->>'scheduled' WHERE id = 1"
"#,
    );
    load(&base).expect("the base config is valid");
    for (from, to, key, words) in [
        ("{scheduled.task_name}", "{schedueld.task_name}", "workflows[0].steps[1].emit.payload", "schedueld"),
        ("$2->>'scheduled'", "$2->>'sched'", "workflows[0].steps[2].sql", "sched"),
        ("keep = \"scheduled\"", "keep = \"scheduled\"\ncolour = 1", "workflows[0].steps[0].colour", "unknown field"),
        ("sql = \"UPDATE jobs SET note", "sleep = \"soon\"\nsql = \"UPDATE jobs SET note", "workflows[0].steps[2]", "exactly one kind"),
        ("name = \"w\"", "name = \"w\"\non_duplicate = \"replace\"", "workflows[0].on_duplicate", "needs a key"),
        ("$2->>'scheduled'", "$3", "workflows[0].steps[2].sql", "$3"),
    ] {
        let text = base.replacen(from, to, 1);
        let e = load(&text).expect_err(&format!("{key} must be refused"));
        assert!(e.contains("test.toml") && e.contains(key) && e.contains(words), "{key}: {e}");
    }
}

pub async fn wrong_column_is_refused_naming_the_key() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let text = jobs_config(
        r#"
[[workflows]]
name = "w"
event = "job.saved"
when = "payload->>'status' = 'pending'"

[[workflows.steps]]
sql = "UPDATE jobs SET stauts = 'scheduled' WHERE id = ($1->>'id')::bigint"
"#,
    );
    let started = wardcall::app::App::start(db.database(), config(&text), Default::default()).await;
    let e = format!("{:#}", started.err().expect("a wrong column refuses to start"));
    assert!(e.contains("workflows[0].steps[0].sql") && e.contains("stauts"), "{e}");
    let started = wardcall::app::App::start(
        db.database(),
        config(&text.replace("stauts", "status").replace("payload->>'status'", "payload->>>'status'")),
        Default::default(),
    )
    .await;
    let e = format!("{:#}", started.err().expect("a broken when refuses to start"));
    assert!(e.contains("workflows[0].when"), "{e}");
}
