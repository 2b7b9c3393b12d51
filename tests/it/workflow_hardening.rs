//! Defects found in review of the workflow model, each with the test that
//! showed it (each failed before its fix).

use crate::harness::*;
use std::time::Duration;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        workflow_hardening::cancel_on_is_lost_when_another_engine_holds_the_creating_event,
        workflow_hardening::retrying_a_dead_letter_with_on_failure_reruns_the_failed_step,
        workflow_hardening::one_long_key_wedges_the_dispatcher_for_every_event,
        workflow_hardening::http_step_of_a_run_cancelled_in_its_dispatch_batch_still_posts,
        workflow_hardening::cancel_on_key_reading_a_variable_is_refused_at_load,
        workflow_hardening::escalation_run_live_across_the_upgrade_keeps_escalating,
        workflow_hardening::a_failing_step_before_escalate_does_not_stop_the_alert,
        workflow_hardening::team_sql_puts_the_session_settings_back,
        workflow_hardening::a_failing_lookup_is_its_own_outcome_and_the_others_still_render,
        workflow_hardening::team_reads_are_read_only_and_bounded_without_a_transaction,
        workflow_hardening::lookups_go_as_one_statement_and_a_slow_one_delays_once,
        workflow_hardening::lookups_without_a_connection_wait_for_one_once,
    ]
}

const JOBS: &str = "CREATE TABLE jobs (
    id bigserial PRIMARY KEY, kind text NOT NULL, due_at timestamptz NOT NULL DEFAULT now(),
    status text NOT NULL DEFAULT 'pending', note text, fire_count integer NOT NULL DEFAULT 0);
CREATE TABLE fixes (id int);";

const CFG: &str = r#"
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

[[sources]]
name = "jobs_cancelled"
table = "jobs"
operations = ["UPDATE"]
condition = "NEW.status = 'cancelled' AND OLD.status <> 'cancelled'"
event = "job.cancelled"

[[workflows]]
name = "timer"
event = "job.saved"
when = "payload->>'kind' = 'timer'"
key = "{id}"
on_duplicate = "replace"
cancel_on = [{ event = "job.cancelled" }]

[[workflows.steps]]
sleep_until = "{due_at}"

[[workflows.steps]]
sql = "UPDATE jobs SET fire_count = fire_count + 1 WHERE id = ($1->>'id')::bigint"

[[workflows]]
name = "fragile"
event = "job.saved"
when = "payload->>'kind' = 'fragile'"
max_attempts = 1

[[workflows.steps]]
sql = "SELECT 1 / (SELECT count(*) FROM fixes)::int"

[[workflows.on_failure]]
sql = "UPDATE jobs SET status = 'failed' WHERE id = ($1->>'id')::bigint"
"#;

/// Engine A is dispatching the outbox row that creates the run (not yet
/// committed) while engine B would dispatch the later cancel event: B would
/// find no run to cancel, A would then create it, and the cancelled job would
/// fire. Dispatch is serialised across engines (an advisory lock), so B waits.
pub async fn cancel_on_is_lost_when_another_engine_holds_the_creating_event() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let cfg = config(CFG);
    wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap(); // triggers, no engine
    let id = db.scalar_i64("INSERT INTO jobs (kind, due_at) VALUES ('timer', clock_timestamp() + interval '2 seconds') RETURNING id").await;
    db.exec(&format!("UPDATE jobs SET status = 'cancelled' WHERE id = {id}")).await;
    // "Engine A" is dispatching the creating event (its batch holds the
    // dispatch lock and the outbox row, not yet committed).
    let mut a = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(wardcall::runtime::DISPATCH_LOCK_KEY).execute(&mut *a).await.unwrap();
    sqlx::query("SELECT id FROM wardcall.outbox WHERE event = 'job.saved' FOR UPDATE").fetch_all(&mut *a).await.unwrap();
    // "Engine B" must not dispatch the later cancel event meanwhile.
    let app = start_app(&db, cfg).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox WHERE processed_at IS NOT NULL").await, 0, "B dispatched while A's batch was open");
    a.rollback().await.unwrap(); // A's dispatch goes on (here: B takes the rows, in order)
    await_true(
        &db,
        "the creating event to be dispatched",
        Duration::from_secs(5),
        "SELECT processed_at IS NOT NULL FROM wardcall.outbox WHERE event = 'job.saved'",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let fires = db.scalar_i64(&format!("SELECT fire_count::bigint FROM jobs WHERE id = {id}")).await;
    let live = db.scalar_i64("SELECT count(*) FROM wardcall.runs WHERE workflow = 'timer' AND status <> 'cancelled'").await;
    app.stop(Duration::from_secs(2)).await;
    assert_eq!((fires, live), (0, 0), "a cancelled job fired: the cancel_on event reached no run");
}

/// A dead letter of a workflow with an on_failure hook: `wardcall retry`
/// should run the failed step again; it resumes past the hook and fails at once.
pub async fn retrying_a_dead_letter_with_on_failure_reruns_the_failed_step() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let app = start_app(&db, config(CFG)).await;
    db.exec("INSERT INTO jobs (kind) VALUES ('fragile')").await;
    await_true(&db, "the run to fail", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'failed'").await;
    let (run, step): (uuid::Uuid, String) = sqlx::query_as("SELECT run_id, step FROM wardcall.dead_letters").fetch_one(&db.pool).await.unwrap();
    db.exec("INSERT INTO fixes VALUES (1)").await; // the cause is fixed
    let r = wardcall::runtime::dead_letters::retry(&db.pool, run, "test").await.unwrap();
    println!("dead letter step = {step}, retry = {r:?}");
    await_true(
        &db,
        "the retried run to finish",
        Duration::from_secs(10),
        "SELECT status IN ('completed', 'failed') FROM wardcall.runs WHERE workflow = 'fragile'",
    )
    .await;
    let status: String = sqlx::query_scalar("SELECT status FROM wardcall.runs WHERE workflow = 'fragile'").fetch_one(&db.pool).await.unwrap();
    app.stop(Duration::from_secs(2)).await;
    assert_eq!(status, "completed", "the dead letter's step was '{step}': the retry did not run the failed step again");
}

/// A key that renders longer than a btree entry allows (~2.7 kB) makes the
/// dispatcher's INSERT fail; the whole batch rolls back and is retried for
/// ever: no event of any workflow (critical ones included) starts a run.
pub async fn one_long_key_wedges_the_dispatcher_for_every_event() {
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let cfg = r#"
[engine]
lease_ms = 2000
sweep_ms = 100
poll_ms = 50

[[sources]]
name = "jobs_saved"
table = "jobs"
operations = ["INSERT"]
event = "job.saved"

[[workflows]]
name = "keyed"
event = "job.saved"
key = "{note}"

[[workflows.steps]]
sql = "UPDATE jobs SET fire_count = fire_count + 1 WHERE id = ($1->>'id')::bigint"
"#;
    let app = start_app(&db, config(cfg)).await;
    db.exec("INSERT INTO jobs (kind, note) SELECT 'long', string_agg(md5(random()::text), '') FROM generate_series(1, 300)").await;
    let ok = db.scalar_i64("INSERT INTO jobs (kind, note) VALUES ('ordinary', 'short') RETURNING id").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let fired = db.scalar_i64(&format!("SELECT fire_count::bigint FROM jobs WHERE id = {ok}")).await;
    let unprocessed = db.scalar_i64("SELECT count(*) FROM wardcall.outbox WHERE processed_at IS NULL").await;
    let rows: Vec<(i64, bool, i32)> =
        sqlx::query_as("SELECT id, processed_at IS NULL, length(payload::text) FROM wardcall.outbox ORDER BY id").fetch_all(&db.pool).await.unwrap();
    let runs: Vec<(i64, String)> = sqlx::query_as("SELECT event_id, status FROM wardcall.runs ORDER BY event_id").fetch_all(&db.pool).await.unwrap();
    println!("outbox (id, unprocessed, len) = {rows:?}; runs = {runs:?}");
    app.stop(Duration::from_secs(2)).await;
    assert_eq!((fired, unprocessed), (1, 0), "the ordinary event never started its run: the dispatcher is wedged");
}

/// The creating event and its cancel event are dispatched in one batch: the
/// run is created leased to this engine, cancelled (token bumped) in the same
/// transaction, then executed anyway; its first step, an http step, checks
/// only the in-memory lease flag and records an unfenced intent: the POST goes out.
pub async fn http_step_of_a_run_cancelled_in_its_dispatch_batch_still_posts() {
    use wardcall::devtools::team_endpoint::{Behaviour, TeamEndpoint};
    let db = TestDb::new().await;
    db.exec(JOBS).await;
    let endpoint = TeamEndpoint::start(Behaviour::Up).await.unwrap();
    let cfg = format!(
        r#"
[engine]
lease_ms = 3000
sweep_ms = 100
poll_ms = 50

[[endpoints]]
name = "exec"
url = "{}/api"

[[sources]]
name = "jobs_saved"
table = "jobs"
operations = ["INSERT"]
event = "job.saved"

[[sources]]
name = "jobs_cancelled"
table = "jobs"
operations = ["UPDATE"]
condition = "NEW.status = 'cancelled' AND OLD.status <> 'cancelled'"
event = "job.cancelled"

[[workflows]]
name = "poster"
event = "job.saved"
key = "{{id}}"
cancel_on = [{{ event = "job.cancelled" }}]

[[workflows.steps]]
http = {{ endpoint = "exec", method = "POST", path = "/tasks/{{id}}" }}
"#,
        endpoint.base_url()
    );
    let cfg = config(&cfg);
    wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap(); // triggers, no engine
    let id = db.scalar_i64("INSERT INTO jobs (kind) VALUES ('post') RETURNING id").await;
    db.exec(&format!("UPDATE jobs SET status = 'cancelled' WHERE id = {id}")).await;
    let app = start_app(&db, cfg).await;
    await_true(&db, "both events dispatched", Duration::from_secs(5), "SELECT bool_and(processed_at IS NOT NULL) FROM wardcall.outbox").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status: String = sqlx::query_scalar("SELECT status FROM wardcall.runs").fetch_one(&db.pool).await.unwrap();
    let posts = endpoint.received().len();
    app.stop(Duration::from_secs(2)).await;
    assert_eq!((status.as_str(), posts), ("cancelled", 0), "a run cancelled before its http step ran still POSTed");
}

/// A cancel_on key that reads a run variable renders empty over the
/// cancelling event (variables are not bound there): the event never cancels
/// anything, silently. The workflow's own key refuses this; cancel_on.key and wait.key do not.
pub async fn cancel_on_key_reading_a_variable_is_refused_at_load() {
    let text = r#"
[[sources]]
name = "jobs_saved"
table = "jobs"
event = "job.saved"

[[workflows]]
name = "timer"
event = "job.saved"
key = "{id}"
cancel_on = [{ event = "job.cancelled", key = "{picked.id}" }]

[[workflows.steps]]
sql = "SELECT 1 AS id"
keep = "picked"

[[workflows.steps]]
sleep = "1h"
"#;
    let c = wardcall::config::Config::parse(text, "t.toml").unwrap();
    assert!(c.validate("t.toml").is_err(), "a cancel_on key reading variable 'picked' was accepted");
}

/// An escalation run that was live when wardcall was upgraded has
/// `runs.step = 'await'` (the model before 0006 wrote start/call/await, and
/// no migration rewrites it). The new engine cannot parse it: the run fails
/// permanently (an escalate step's "never give up" rule does not apply to an
/// unparsable address) and the backup nurse is never called.
pub async fn escalation_run_live_across_the_upgrade_keeps_escalating() {
    use crate::escalation::{start_with, NURSE_B, SEIZURE_INSERT};
    use wardcall::devtools::twilio_emulator::Persona;
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let h = start_with(db, Persona::NoAnswer, Persona::NoAnswer, |c| {
        for s in &mut c.policies[0].steps {
            s.ack_timeout_seconds = 3.0;
        }
    })
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    await_true(
        &h.db,
        "the run to await nurse A",
        Duration::from_secs(10),
        "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'waiting' AND step = 'steps:0/await'",
    )
    .await;
    // As a run written by the previous release would be.
    h.db.exec("UPDATE wardcall.runs SET step = 'await'").await;
    let outcome = await_some("nurse B called or the run failed", Duration::from_secs(20), || async {
        let failed = h.db.scalar_i64("SELECT count(*) FROM wardcall.runs WHERE status = 'failed'").await;
        let b = h.emulator.calls().iter().filter(|c| c.to == NURSE_B).count();
        (failed > 0 || b > 0).then_some((failed, b))
    })
    .await;
    let err: Option<String> = sqlx::query_scalar("SELECT last_error FROM wardcall.runs").fetch_one(&h.db.pool).await.unwrap();
    h.app.stop(Duration::from_secs(2)).await;
    assert_eq!(outcome.0, 0, "the live escalation failed after the upgrade: {err:?}");
}

/// A step before the escalate step fails for good (a data error in a
/// write-back): the alert still reaches a nurse (invariant 10).
pub async fn a_failing_step_before_escalate_does_not_stop_the_alert() {
    use crate::escalation::{start_with, NURSE_A, SEIZURE_INSERT};
    use wardcall::devtools::twilio_emulator::Persona;
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let h = start_with(db, Persona::NoAnswer, Persona::NoAnswer, |c| {
        let failing = wardcall::workflows::model::StepConfig { sql: Some("SELECT 1 / 0".into()), ..Default::default() };
        c.workflows[0].steps.insert(0, failing);
    })
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    await_some("nurse A to be called", Duration::from_secs(10), || async { h.emulator.calls().iter().any(|c| c.to == NURSE_A).then_some(()) }).await;
    let jumped = h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.failing' AND detail->>'hook' = 'steps:1'").await;
    assert_eq!(jumped, 1, "the failure is audited with the step the run went on at");
    h.app.stop(Duration::from_secs(2)).await;
}

/// A write-back (succeeding or failing) and a `sql` step's statement bound
/// their own statement and mark it a write-back, then put the transaction's
/// settings back as they were: later statements of the same transaction (the
/// step's commit, the webhook's audit rows) keep the session's timeouts, and
/// capture triggers fire again.
pub async fn team_sql_puts_the_session_settings_back() {
    use wardcall::workflows::team_sql::{run_step_statement, write_back, WriteBackSubject};
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE wb (id int PRIMARY KEY);
         INSERT INTO wardcall.runs (id, workflow, event, input, step, status)
              VALUES ('00000000-0000-0000-0000-0000000000a2', 'w', 'e', '{}', 'call', 'completed');
         INSERT INTO wardcall.alerts (id, run_id, workflow, policy, message, status)
              VALUES ('00000000-0000-0000-0000-0000000000b2', '00000000-0000-0000-0000-0000000000a2', 'w', 'p', 'm', 'open');",
    )
    .await;
    let alert = uuid::Uuid::parse_str("00000000-0000-0000-0000-0000000000b2").unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let settings = "SELECT current_setting('statement_timeout') || ' ' || current_setting('lock_timeout') || ' '
                           || coalesce(nullif(current_setting('wardcall.write_back', true), ''), 'off')";
    let session: String = sqlx::query_scalar(settings).fetch_one(&mut *conn).await.unwrap();
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    let payload = serde_json::json!({"id": 1});
    for (sql, what) in [("INSERT INTO wb VALUES (($1->>'id')::int)", "a write-back that succeeds"), ("INSERT INTO wb VALUES (1)", "a write-back that fails")] {
        write_back(&mut conn, Some(sql), "on_acknowledged", &payload, WriteBackSubject::Alert(alert), "test").await.unwrap();
        let now: String = sqlx::query_scalar(settings).fetch_one(&mut *conn).await.unwrap();
        assert_eq!(now, session, "after {what}");
    }
    run_step_statement(&mut conn, "INSERT INTO wb VALUES (2)", false, &payload, &serde_json::json!({})).await.unwrap();
    let now: String = sqlx::query_scalar(settings).fetch_one(&mut *conn).await.unwrap();
    assert_eq!(now, session, "after a sql step's statement");
    sqlx::query("COMMIT").execute(&mut *conn).await.unwrap();
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wb").await, 2);
}

/// An escalation's lookups: one that returns several rows leaves the others
/// unharmed, and one that fails (so the shared statement fails) is its own
/// outcome while the lookups before and after it still render.
pub async fn a_failing_lookup_is_its_own_outcome_and_the_others_still_render() {
    use wardcall::workflows::team_sql::run_lookups;
    let db = TestDb::new().await;
    db.exec("CREATE TABLE two_rows (x text); INSERT INTO two_rows VALUES ('a'), ('b');").await;
    let sqls = ["SELECT x FROM two_rows", "SELECT $1->>'room'", "SELECT (1 / ($1->>'zero')::int)::text", "SELECT 'after the failure'", "SELECT NULL::text"];
    let out = run_lookups(&db.team_reads(), &sqls, &serde_json::json!({"room": "Room 2", "zero": 0})).await;
    assert_eq!(lookup_outcomes(&out), ["ambiguous", "value Room 2", "error 22012", "value after the failure", "empty"]);
}

/// The team-read pool's sessions are what its statements rely on, since
/// they run without a transaction of their own (one round trip): read-only,
/// 2 s statement and 1 s lock timeouts. A lookup that writes fails with
/// SQLSTATE 25006 and writes nothing, alone or among others; the session's
/// bounds are those of the lookups, and a lookup that changes them changes
/// them for itself only. (A recipients query runs in its own
/// read-only transaction on the engine's pool: it fails the same way.)
pub async fn team_reads_are_read_only_and_bounded_without_a_transaction() {
    use wardcall::notify::recipients::{resolve, RecipientsSpec};
    use wardcall::workflows::team_sql::run_lookups;
    let db = TestDb::new().await;
    db.exec("CREATE TABLE written (x text)").await;
    let reads = db.team_reads();
    let input = serde_json::json!({});
    let writes = "WITH w AS (INSERT INTO written VALUES ('x') RETURNING x) SELECT x FROM w";
    let out = run_lookups(&reads, &[writes], &input).await;
    assert_eq!(lookup_outcomes(&out), ["error 25006"], "a writing lookup alone");
    let settings = [
        writes,
        "SELECT current_setting('statement_timeout')",
        "SELECT current_setting('lock_timeout')",
        "SELECT current_setting('transaction_read_only')",
        "SELECT current_setting('application_name')",
    ];
    let out = run_lookups(&reads, &settings, &input).await;
    assert_eq!(lookup_outcomes(&out), ["error 25006", "value 2s", "value 1s", "value on", "value wardcall-team-reads"], "among others");
    // A lookup that changes its session's settings changes them for itself
    // only: the connection is reset as it goes back (one connection here, so
    // the next lookups run on the same session).
    let settings = wardcall::config::EngineConfig { team_read_pool_size: 1, ..Default::default() };
    let one = wardcall::db::TeamReadPool::new(&db.pool, &settings);
    let changes = "SELECT set_config('default_transaction_read_only', 'off', false) || set_config('statement_timeout', '0', false)";
    assert_eq!(lookup_outcomes(&run_lookups(&one, &[changes], &input).await), ["value off0"]);
    let out = run_lookups(&one, &[writes, "SELECT current_setting('statement_timeout')"], &input).await;
    assert_eq!(lookup_outcomes(&out), ["error 25006", "value 2s"], "after a lookup that changed its session's settings");
    let cfg = crate::escalation::hospital_config("http://127.0.0.1:9", 30.0, 1);
    let spec = RecipientsSpec {
        notify: vec![],
        recipients: Some("WITH w AS (INSERT INTO written VALUES ('y') RETURNING x) SELECT x AS id, x AS name, x AS voice, x AS sms FROM w".into()),
    };
    let err = resolve(&db.pool, &cfg, &spec, &input, &serde_json::json!({})).await.expect_err("a writing recipients query");
    assert_eq!(err.sqlstate().as_deref(), Some("25006"), "{err}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM written").await, 0, "nothing was written");
}

fn lookup_outcomes(out: &[Result<wardcall::workflows::team_sql::LookupOutcome, sqlx::Error>]) -> Vec<String> {
    use wardcall::workflows::team_sql::LookupOutcome;
    out.iter()
        .map(|o| match o {
            Ok(LookupOutcome::Value(v)) => format!("value {v}"),
            Ok(LookupOutcome::Empty) => "empty".into(),
            Ok(LookupOutcome::Ambiguous) => "ambiguous".into(),
            Ok(LookupOutcome::NotText) => "not text".into(),
            Err(e) => format!("error {}", e.as_database_error().and_then(|d| d.code()).unwrap_or_default()),
        })
        .collect()
}

/// Lookups that all succeed go as one statement (`lookups_statement`), each
/// with the outcome it has alone: a value whatever its column's name, no
/// row, NULL, more than one row, a column that is not text, a trailing
/// comment and semicolon. A lookup that outlasts the statement timeout
/// (2 s) delays the call once: the others still render, and the whole takes
/// well under two timeouts.
pub async fn lookups_go_as_one_statement_and_a_slow_one_delays_once() {
    use wardcall::workflows::team_sql::run_lookups;
    let db = TestDb::new().await;
    db.exec("CREATE TABLE two_rows (x text); INSERT INTO two_rows VALUES ('a'), ('b');").await;
    let input = serde_json::json!({"room": "Room 2"});
    let sqls = [
        "SELECT $1->>'room' AS room_name",
        "SELECT x FROM two_rows WHERE false",
        "SELECT NULL::text",
        "SELECT x FROM two_rows",
        "SELECT 42",
        "SELECT 'Dana Vale'::varchar, 1 -- the patient\n;",
    ];
    let out = run_lookups(&db.team_reads(), &sqls, &input).await;
    assert_eq!(lookup_outcomes(&out), ["value Room 2", "empty", "empty", "ambiguous", "not text", "value Dana Vale"]);

    let slow = ["SELECT $1->>'room'", "SELECT 'slow'::text FROM pg_sleep(5)", "SELECT 'after'"];
    let started = std::time::Instant::now();
    let out = run_lookups(&db.team_reads(), &slow, &input).await;
    let took = started.elapsed();
    assert_eq!(lookup_outcomes(&out), ["value Room 2", "error 57014", "value after"]);
    assert!(took < std::time::Duration::from_millis(3_500), "a slow lookup delayed the call by {took:?}");
}

/// The pool has no connection to give (every one held): the lookups wait for
/// one once (the pool's acquire timeout), not again for each lookup, and all
/// render without their values.
pub async fn lookups_without_a_connection_wait_for_one_once() {
    use wardcall::workflows::team_sql::run_lookups;
    let db = TestDb::new().await;
    let acquire = std::time::Duration::from_millis(400);
    let settings = wardcall::config::EngineConfig { team_read_pool_size: 1, acquire_timeout_ms: acquire.as_millis() as u64, ..Default::default() };
    let reads = wardcall::db::TeamReadPool::new(&db.pool, &settings);
    let held = reads.pool().acquire().await.unwrap();
    let started = std::time::Instant::now();
    let out = run_lookups(&reads, &["SELECT 'a'", "SELECT 'b'", "SELECT 'c'"], &serde_json::json!({})).await;
    let took = started.elapsed();
    assert!(out.iter().all(|o| matches!(o, Err(sqlx::Error::PoolTimedOut))), "{:?}", lookup_outcomes(&out));
    assert!(took < acquire * 2, "waited for a connection more than once: {took:?}");
    drop(held);
}
