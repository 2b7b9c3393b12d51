//! The runtime and its database connections (issue 7, items 7, 8 and 12):
//! bounded database waits with PostgreSQL's own reasons, a listener on its own
//! connection that notices a silent server, critical alerts claimed before a
//! flood of other work, and `/healthz` / `wardcall status` naming what is wrong.

use crate::harness::*;
use serde_json::{json, Value};
use sqlx::{ConnectOptions, Connection};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wardcall::config::{EngineConfig, Workflow};
use wardcall::devtools::twilio_emulator::EmulatorEvent;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        runtime_resilience::listener_uses_its_own_connection_and_survives_a_frozen_backend,
        runtime_resilience::pool_that_cannot_connect_fails_in_time_with_the_servers_reason,
        runtime_resilience::pool_pings_only_connections_idle_for_a_second,
        runtime_resilience::engine_connections_plan_with_the_configured_random_page_cost,
        runtime_resilience::engine_statements_are_bounded_by_lock_and_statement_timeouts,
        runtime_resilience::critical_alert_is_called_first_during_a_flood,
        runtime_resilience::healthz_reports_a_missing_capture_trigger,
        runtime_resilience::healthz_reports_the_listener_down,
        runtime_resilience::healthz_reports_a_stalled_scheduler,
        runtime_resilience::status_shows_the_same_problems,
        runtime_resilience::a_hard_failover_leaves_no_engine_waiting_on_a_dead_connection,
        runtime_resilience::a_connection_dropped_mid_statement_after_a_failover_is_closed_not_waited_on,
        runtime_resilience::an_escalation_caught_by_a_hard_failover_calls_the_next_tier,
        runtime_resilience::a_later_tier_caught_by_a_hard_failover_is_called,
    ]
}

const TASKS_TABLE: &str = "CREATE TABLE IF NOT EXISTS tasks (id bigserial PRIMARY KEY, kind text NOT NULL, steps jsonb NOT NULL DEFAULT '[]')";

fn tasks_config(engine: &str, with_source: bool) -> String {
    let source = if with_source {
        r#"
[[sources]]
name = "tasks"
table = "tasks"
operations = ["INSERT"]
condition = "NEW.kind = 'go'"
event = "task.created"
"#
    } else {
        ""
    };
    format!(
        r#"
[engine]
lease_ms = 2000
poll_ms = 100
{engine}
{source}
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

/// The backend pid of the engine's listener session on `db`, if any.
async fn listener_pid(db: &TestDb) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'wardcall-listener' ORDER BY backend_start DESC LIMIT 1",
    )
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

/// Resumes a SIGSTOPped backend when dropped (also when the test panics), so
/// the database can be dropped afterwards.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), nix::sys::signal::Signal::SIGCONT);
    }
}

async fn get_healthz(addr: std::net::SocketAddr) -> (u16, Value) {
    let resp = reqwest::get(format!("http://{addr}/healthz")).await.expect("healthz answers");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// Awaits `/healthz` answering `status` with a problem containing `needle` (any, for 200).
async fn await_healthz(addr: std::net::SocketAddr, status: u16, needle: &str, timeout: Duration) -> Value {
    await_some(&format!("/healthz {status} {needle}"), timeout, || async move {
        let (s, body) = get_healthz(addr).await;
        let text = body.to_string();
        (s == status && text.contains(needle)).then_some(body)
    })
    .await
}

/// Item 7: the listener has its own connection (`wardcall-listener`, not one of
/// the pool's), and a backend that stops answering (SIGSTOP: no clean close, no
/// error) is noticed by the heartbeat within seconds; the engine reconnects and
/// an event committed meanwhile is still run promptly.
pub async fn listener_uses_its_own_connection_and_survives_a_frozen_backend() {
    if init().cluster.is_none() {
        eprintln!("skipped: needs the embedded cluster (signals its backend)");
        return;
    }
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&tasks_config("sweep_ms = 1000\nheartbeat_ms = 500", true))).await;
    let frozen = await_some("the listener's own session", Duration::from_secs(10), || listener_pid(&db)).await;
    await_some("the listener to report itself up", Duration::from_secs(10), || async { app.engine.health().listener_up().then_some(()) }).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(frozen), nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP the listener's backend");
    let _resume = Resume(frozen);
    let t0 = Instant::now();
    db.exec(r#"INSERT INTO tasks (kind, steps) VALUES ('go', '[{"op":"step","name":"during the freeze"}]')"#).await;
    let fresh = await_some("a new listener session", Duration::from_secs(10), || async { listener_pid(&db).await.filter(|pid| *pid != frozen) }).await;
    let detected = t0.elapsed();
    eprintln!("frozen listener replaced after {detected:?} (backend {frozen} → {fresh})");
    assert!(detected < Duration::from_secs(5), "the silent connection was noticed after {detected:?}");
    await_true(
        &db,
        "the event committed during the freeze to run",
        Duration::from_secs(5),
        "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'completed'",
    )
    .await;
    // The new session is listed as soon as it connects; it reports itself up
    // once its LISTEN has completed, which on a loaded host can come after the
    // sweep has already run the event.
    await_some("the new listener to report itself up", Duration::from_secs(5), || async { app.engine.health().listener_up().then_some(()) }).await;
    app.stop(Duration::from_secs(2)).await;
    drop(_resume);
    let _ = sqlx::query("SELECT pg_terminate_backend($1)").bind(frozen).execute(&db.pool).await;
}

/// Item 7: a pool whose connections the server refuses (a role with CONNECTION
/// LIMIT 0: SQLSTATE 53300, which sqlx retries until its deadline) fails within
/// the acquire timeout, and the error carries PostgreSQL's reason, not only
/// "pool timed out". A database that does not exist is named too.
pub async fn pool_that_cannot_connect_fails_in_time_with_the_servers_reason() {
    let db = TestDb::new().await;
    let role = format!("wardcall_it_nolimit_{}", std::process::id());
    let mut admin = init().admin.connect().await.unwrap();
    sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")).execute(&mut admin).await.unwrap();
    let limited = db.options.clone().username(&role);

    // The default acquire timeout (what `wardcall serve` uses).
    let t0 = Instant::now();
    let err = wardcall::db::connect_pool(limited.clone(), 2).await.expect_err("the role may not connect");
    let took = t0.elapsed();
    let text = format!("{err:#}");
    eprintln!("after {took:?}: {text}");
    let default_ms = EngineConfig::default().acquire_timeout_ms;
    assert!(took < Duration::from_millis(default_ms + 3000), "took {took:?}");
    assert!(text.contains("too many connections for role"), "{text}");

    // A configured acquire timeout is honoured.
    let settings = EngineConfig { acquire_timeout_ms: 500, pool_size: 2, ..EngineConfig::default() };
    let t0 = Instant::now();
    let err = wardcall::db::connect_pool_with(limited, &settings).await.expect_err("the role may not connect");
    assert!(t0.elapsed() < Duration::from_millis(500 + 3000), "took {:?}", t0.elapsed());
    assert!(format!("{err:#}").contains("too many connections for role"), "{err:#}");

    // Not retried by sqlx: named at once.
    let err = wardcall::db::connect_pool(db.options.clone().database("wardcall_it_absent_database"), 2).await.expect_err("no such database");
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");

    // At run time: every pooled connection busy is told apart from a refusal.
    let pool = wardcall::db::connect_pool_with(db.options.clone(), &settings).await.unwrap();
    let (_a, _b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
    let t0 = Instant::now();
    let busy = pool.acquire().await.expect_err("the pool is exhausted");
    assert!(t0.elapsed() < Duration::from_millis(500 + 2000));
    let why = wardcall::db::explain_error(&db.options, &busy, Duration::from_secs(3)).await;
    assert!(why.contains("every pooled connection stayed busy"), "{why}");
    drop((_a, _b));
    pool.close().await;
    sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {role}")).execute(&mut admin).await.unwrap();
}

/// Item 7: the engine's connections carry `lock_timeout` and
/// `statement_timeout`, so a wait on a lock another session holds ends with an
/// error instead of hanging.
pub async fn engine_statements_are_bounded_by_lock_and_statement_timeouts() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let settings = EngineConfig { lock_timeout_ms: 300, statement_timeout_ms: 700, ..EngineConfig::default() };
    let pool = wardcall::db::connect_pool_with(db.options.clone(), &settings).await.unwrap();
    let (lock, stmt): (String, String) =
        sqlx::query_as("SELECT current_setting('lock_timeout'), current_setting('statement_timeout')").fetch_one(&pool).await.unwrap();
    assert_eq!((lock.as_str(), stmt.as_str()), ("300ms", "700ms"));
    // The defaults hold on `connect_pool` as well.
    let lock: String = sqlx::query_scalar("SELECT current_setting('lock_timeout')").fetch_one(&db.pool).await.unwrap();
    assert_eq!(lock, "2s");

    let mut holder = db.options.connect().await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE").execute(&mut holder).await.unwrap();
    let t0 = Instant::now();
    let err = sqlx::query("SELECT count(*) FROM tasks").execute(&pool).await.expect_err("the lock wait is bounded");
    assert!(t0.elapsed() < Duration::from_secs(3), "waited {:?}", t0.elapsed());
    let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("55P03"), "{err}");
    let t0 = Instant::now();
    let err = sqlx::query("SELECT pg_sleep(5)").execute(&pool).await.expect_err("the statement is bounded");
    assert!(t0.elapsed() < Duration::from_secs(3), "waited {:?}", t0.elapsed());
    assert_eq!(err.as_database_error().and_then(|e| e.code()).as_deref(), Some("57014"), "{err}");
    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.unwrap();
    holder.close().await.ok();
    pool.close().await;
}

/// Item 8: a flood of non-critical script runs, all due now, does not delay a
/// critical alert: its first call is requested while most of the flood is still
/// unfinished, in a small fraction of the flood's drain time.
pub async fn critical_alert_is_called_first_during_a_flood() {
    // Each flood run holds its worker 300 ms, so that a worker slot is almost
    // never free when the alert arrives: the alert's run must be claimed
    // ahead of the flood's due runs, not slip into a free slot by luck.
    const FLOOD: i64 = 40;
    const WORK_MS: i64 = 300;
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let emulator = no_answer_emulator().await;
    let mut cfg = crate::escalation::hospital_config(&emulator.base_url(), 600.0, 1);
    cfg.engine.workers = 2;
    cfg.workflows.push(Workflow { max_attempts: 3, retry_base_ms: 20, retry_max_ms: 100, ..Workflow::script("flood", "flood") });
    cfg.validate("hospital.toml").unwrap();
    let app = start_app(&db, Arc::new(cfg)).await;
    let flooded = "SELECT count(*) FROM wardcall.runs WHERE workflow = 'flood' AND status = 'completed'";

    let t0 = Instant::now();
    sqlx::query("SELECT count(wardcall.emit('flood', $1)) FROM generate_series(1, $2)")
        .bind(json!({"steps": [{"op": "work", "ms": WORK_MS}]}))
        .bind(FLOOD)
        .execute(&db.pool)
        .await
        .unwrap();
    // Under way, and both workers busy again (claimed their next flood runs).
    await_true(
        &db,
        "the flood to be under way",
        Duration::from_secs(30),
        "SELECT count(*) FILTER (WHERE status = 'completed') >= 2 AND count(*) FILTER (WHERE status = 'running') = 2
           FROM wardcall.runs WHERE workflow = 'flood'",
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
    await_true(&db, "the flood to drain", Duration::from_secs(120), &format!("SELECT ({flooded}) = {FLOOD}")).await;
    let drain = t0.elapsed();
    eprintln!("critical first call after {first_call:?}; flood unfinished at that instant: {unfinished} of {FLOOD}; flood drained in {drain:?}");
    assert!(unfinished * 2 > FLOOD, "the call waited for the flood: only {unfinished} of {FLOOD} flood runs were left");
    assert!(first_call * 4 < drain, "first call after {first_call:?}, flood drained in {drain:?}");
    let critical: bool = sqlx::query_scalar("SELECT critical FROM wardcall.runs WHERE workflow = 'critical-alert-call'").fetch_one(&db.pool).await.unwrap();
    assert!(critical, "escalation runs are marked critical");
    app.stop(Duration::from_secs(2)).await;
    emulator.shutdown().await;
}

/// Item 12: a configured source whose capture trigger was dropped (or
/// disabled) makes `/healthz` answer 503 naming the source and the trigger.
pub async fn healthz_reports_a_missing_capture_trigger() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let app = start_app(&db, config(&tasks_config("", true))).await;
    let addr = app.http_addr.unwrap();
    await_healthz(addr, 200, "", Duration::from_secs(10)).await;
    db.exec("ALTER TABLE tasks DISABLE TRIGGER wardcall_capture_tasks_insert").await;
    let body = await_healthz(addr, 503, "wardcall_capture_tasks_insert is disabled", Duration::from_secs(5)).await;
    assert_eq!(body["status"], "unhealthy");
    db.exec("DROP TRIGGER wardcall_capture_tasks_insert ON tasks").await;
    let body = await_healthz(addr, 503, "source tasks: trigger wardcall_capture_tasks_insert is missing", Duration::from_secs(5)).await;
    eprintln!("{body}");
    app.stop(Duration::from_secs(2)).await;
}

/// Item 12: a listener that cannot reconnect makes `/healthz` answer 503 with
/// the reason; once it reconnects, 200 again.
pub async fn healthz_reports_the_listener_down() {
    let db = TestDb::new().await;
    // No source: the health check then needs no database connection at all.
    let app = start_app(&db, config(&tasks_config("heartbeat_ms = 300", false))).await;
    let addr = app.http_addr.unwrap();
    await_some("the listener's own session", Duration::from_secs(10), || listener_pid(&db)).await;
    await_healthz(addr, 200, "", Duration::from_secs(10)).await;
    let mut admin = init().admin.connect().await.unwrap();
    sqlx::raw_sql(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", db.name)).execute(&mut admin).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'wardcall-listener'")
        .bind(&db.name)
        .execute(&mut admin)
        .await
        .unwrap();
    let body = await_healthz(addr, 503, "listener: not connected", Duration::from_secs(10)).await;
    eprintln!("{body}");
    sqlx::raw_sql(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", db.name)).execute(&mut admin).await.unwrap();
    await_healthz(addr, 200, "", Duration::from_secs(10)).await;
    app.stop(Duration::from_secs(2)).await;
}

/// Item 12: a scheduler that makes no progress (here blocked on a lock the
/// test holds, with the lock timeout raised to its maximum) makes `/healthz`
/// answer 503 after `stall_after_ms`; it recovers once the lock is released.
pub async fn healthz_reports_a_stalled_scheduler() {
    let db = TestDb::new().await;
    let cfg = config(&tasks_config("sweep_ms = 100\nlock_timeout_ms = 600000\nstatement_timeout_ms = 3600000\ndatabase_deadline_ms = 3600001", false));
    assert_eq!(wardcall::runtime::stall_after_ms(&cfg.engine), 5000);
    // The engine's own pool, with the configured (raised) timeouts.
    let pool = wardcall::db::connect_pool_with(db.options.clone(), &cfg.engine).await.unwrap();
    let database = wardcall::db::Database { pool: pool.clone(), connect_options: db.options.clone(), embedded: None };
    let app = wardcall::app::App::start(
        database,
        cfg,
        wardcall::app::StartOptions { http_listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()), ..Default::default() },
    )
    .await
    .unwrap();
    let addr = app.http_addr.unwrap();
    await_healthz(addr, 200, "", Duration::from_secs(10)).await;
    let mut holder = db.options.connect().await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE wardcall.runs IN ACCESS EXCLUSIVE MODE").execute(&mut holder).await.unwrap();
    let t0 = Instant::now();
    let body = await_healthz(addr, 503, "scheduler: stalled", Duration::from_secs(15)).await;
    eprintln!("after {:?}: {body}", t0.elapsed());
    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.unwrap();
    holder.close().await.ok();
    await_healthz(addr, 200, "", Duration::from_secs(10)).await;
    app.stop(Duration::from_secs(2)).await;
    pool.close().await;
}

/// Item 12: `wardcall status` (another process) shows a missing capture
/// trigger, no engine listening and an overdue run.
pub async fn status_shows_the_same_problems() {
    let db = TestDb::new().await;
    db.exec(TASKS_TABLE).await;
    let text = tasks_config("", true);
    let cfg = config(&text);
    wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap();
    db.exec("DROP TRIGGER wardcall_capture_tasks_insert ON tasks").await;
    db.exec("INSERT INTO wardcall.runs (workflow, event, input, step, status, due_at) VALUES ('script', 'task.created', '{}', 'start', 'pending', now() - interval '1 minute')").await;
    let dir = std::env::temp_dir().join(format!("wardcall-it-status-{}-{}", std::process::id(), db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wardcall.toml");
    std::fs::write(&file, format!("database_url = \"{}\"\n{text}", db.url())).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
        .arg("--config")
        .arg(&file)
        .arg("status")
        .env_remove("DATABASE_URL")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(stdout.contains("UNHEALTHY: source tasks: trigger wardcall_capture_tasks_insert is missing"), "{stdout}");
    assert!(stdout.contains("UNHEALTHY: listener: no engine is listening"), "{stdout}");
    assert!(stdout.contains("UNHEALTHY: scheduler: a run has been due for"), "{stdout}");
    // status did not quietly reinstall the trigger.
    assert_eq!(db.scalar_i64("SELECT count(*) FROM pg_trigger WHERE tgname = 'wardcall_capture_tasks_insert'").await, 0);
    std::fs::remove_dir_all(&dir).ok();
}

/// wardcall's pools (`db::pool_options`) ping a connection before handing it
/// out only when it was idle for `PING_AFTER_IDLE` or longer: one whose
/// backend was cut while it sat idle that long is replaced without an error;
/// one reused sooner is handed out as it is (no round trip), so a cut within
/// that second is the next statement's error, and the connection after it
/// works (sqlx closes a connection whose release ping fails).
/// Issue 9, tenth session: the engine's connections plan with
/// `engine.random_page_cost` (default 1.1), set as a startup option, so a
/// connection reopened after a failover has it too.
pub async fn engine_connections_plan_with_the_configured_random_page_cost() {
    let db = TestDb::new().await;
    for (settings, expected) in [
        (EngineConfig { pool_size: 1, ..EngineConfig::default() }, "1.1"),
        (EngineConfig { pool_size: 1, random_page_cost: 4.0, ..EngineConfig::default() }, "4"),
    ] {
        let pool = wardcall::db::connect_pool_with(db.options.clone(), &settings).await.unwrap();
        let shown: String = sqlx::query_scalar("SELECT current_setting('random_page_cost')").fetch_one(&pool).await.unwrap();
        assert_eq!(shown, expected);
        let webhooks = wardcall::db::webhook_pool(&pool, &settings);
        let shown: String = sqlx::query_scalar("SELECT current_setting('random_page_cost')").fetch_one(&webhooks).await.unwrap();
        assert_eq!(shown, expected, "the webhooks' pool too");
        pool.close().await;
        webhooks.close().await;
    }
}

pub async fn pool_pings_only_connections_idle_for_a_second() {
    let db = TestDb::new().await;
    let settings = EngineConfig { pool_size: 1, ..EngineConfig::default() };
    let pool = wardcall::db::connect_pool_with(db.options.clone(), &settings).await.unwrap();
    let pid = |pool: sqlx::PgPool| async move { sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(&pool).await };
    async fn cut(db: &TestDb, victim: i32) {
        assert!(sqlx::query_scalar::<_, bool>("SELECT pg_terminate_backend($1)").bind(victim).fetch_one(&db.pool).await.unwrap());
        // The backend is gone once it is no longer listed.
        await_true(db, "the backend to exit", Duration::from_secs(5), &format!("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = {victim}")).await;
    }
    // Cut while idle past the bound: replaced on acquire, no error.
    let first = pid(pool.clone()).await.unwrap();
    cut(&db, first).await;
    tokio::time::sleep(wardcall::db::PING_AFTER_IDLE + Duration::from_millis(100)).await;
    let second = pid(pool.clone()).await.expect("a connection idle past the bound is pinged and replaced");
    let used = Instant::now();
    assert_ne!(first, second);
    // Released (sqlx pings a connection as it goes back to the pool) before
    // it is cut: a release after the cut would close it instead.
    while pool.num_idle() < 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Cut and reused at once: not pinged, so the statement meets the cut…
    cut(&db, second).await;
    let reused = pid(pool.clone()).await;
    if used.elapsed() < wardcall::db::PING_AFTER_IDLE {
        assert!(reused.is_err(), "a connection reused within the bound is not pinged");
    } else {
        eprintln!("the cut took {:?} on a loaded machine: the connection was idle past the bound", used.elapsed());
    }
    // …and the pool opens a new connection for the next one.
    let third = pid(pool.clone()).await.expect("the broken connection was closed");
    assert_ne!(third, second);
    pool.close().await;
}

/// A stand-in for a primary-only endpoint (a DNS name or a proxy that the HA
/// manager moves) in front of the test's PostgreSQL. [`FailoverProxy::fail_over`]
/// turns every connection made through it so far into a half-open one, as
/// after the primary's machine died without a reset: nothing more is
/// forwarded on them in either direction (not even the server's farewell),
/// yet they stay open; their backends are terminated, as a dead primary's
/// sessions are gone. Connections made afterwards reach the server (the new
/// primary). The engine cannot tell a frozen connection from a slow one.
struct FailoverProxy {
    port: u16,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    frozen_below: Arc<std::sync::atomic::AtomicU64>,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl FailoverProxy {
    async fn start(server: &sqlx::postgres::PgConnectOptions) -> FailoverProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        let socket = server.get_socket().expect("the test cluster listens on a Unix socket").join(format!(".s.PGSQL.{}", server.get_port()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, frozen_below) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (a, f, t) = (accepted.clone(), frozen_below.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let generation = a.fetch_add(1, Ordering::SeqCst);
                let Ok(upstream) = tokio::net::UnixStream::connect(&socket).await else { continue };
                client.set_nodelay(true).ok();
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = upstream.into_split();
                let mut t = t.lock().unwrap();
                t.push(tokio::spawn(pump(client_read, server_write, generation, f.clone())));
                t.push(tokio::spawn(pump(server_read, client_write, generation, f.clone())));
            }
        });
        tasks.lock().unwrap().push(accept);
        FailoverProxy { port, accepted, frozen_below, tasks }
    }

    /// Options for a connection through the proxy (TCP to 127.0.0.1).
    fn options(&self, db: &TestDb) -> sqlx::postgres::PgConnectOptions {
        sqlx::postgres::PgConnectOptions::new_without_pgpass().host("127.0.0.1").port(self.port).username(db.options.get_username()).database(&db.name)
    }

    /// Every connection made so far goes silent, and its backend is
    /// terminated (through `admin`, a session of the test's own).
    async fn fail_over(&self, admin: &mut sqlx::PgConnection) {
        use std::sync::atomic::Ordering;
        self.frozen_below.store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
            .execute(admin)
            .await
            .unwrap();
    }
}

impl Drop for FailoverProxy {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// Forwards `from` to `to` until either closes, or, once its connection is
/// frozen, holds both open and forwards nothing more.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    generation: u64,
    frozen_below: Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if generation < frozen_below.load(std::sync::atomic::Ordering::SeqCst) {
            let _held = (from, to);
            return std::future::pending().await;
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A hard failover: the engine's connections all go half-open at once (the
/// old primary gone without a reset, new connections reaching the new
/// one), right after each was used, so that none is pinged before its next
/// statement. Before `engine.database_deadline_ms`, the dispatcher's next
/// transaction, and every first tier, claim or record after it, waited on a
/// dead connection for as long as the kernel keeps retransmitting (here:
/// for ever): no alert was called again. Now each unit of work gives its
/// connection up after the deadline (2 s here), closes it, and the alert
/// committed after the failover is called on new connections.
pub async fn a_hard_failover_leaves_no_engine_waiting_on_a_dead_connection() {
    let Some(BehindProxy { db, emulator, cfg, proxy, pool, app }) = hospital_behind_proxy(600.0, |c| {
        let e = &mut c.engine;
        e.heartbeat_ms = 500;
        e.acquire_timeout_ms = 1000;
        e.statement_timeout_ms = 1000;
        e.database_deadline_ms = 2000;
    })
    .await
    else {
        return;
    };
    let mut events = emulator.subscribe();
    let mut admin = db.options.connect().await.unwrap();
    let insert = |title: &'static str| {
        sqlx::query(
            "INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title, description)
             SELECT 'P-DHE-001', room_id, 'critical', 'active', 'seizure_detected', $1, 'test' FROM rooms WHERE room_name = 'Room 2' LIMIT 1",
        )
        .bind(title)
        .persistent(false)
    };
    // Every pooled connection used just now (none is pinged before its next
    // statement, PING_AFTER_IDLE); then an alert, and the failover as soon as
    // its call is requested: its status callbacks meet frozen connections.
    // (The webhooks' pool likewise: the next callbacks' statements wait on
    // frozen connections until their deadline drops them.)
    // (And the team-read pool's: the new alert's lookups meet a frozen
    // connection, render without their values at their deadline, and the
    // call still goes out.)
    let webhook_pool = app.engine.services.webhook_pool.clone();
    let team_reads = app.engine.services.team_reads.pool().clone();
    for (pool, size) in [(&pool, cfg.engine.pool_size), (&webhook_pool, cfg.engine.webhook_pool_size), (&team_reads, cfg.engine.team_read_pool_size)] {
        let mut held = Vec::new();
        for _ in 0..size {
            let mut c = pool.acquire().await.unwrap();
            sqlx::query("SELECT 1").execute(&mut *c).await.unwrap();
            held.push(c);
        }
        drop(held);
        // Back in the pool (sqlx pings each as it is released): none is in flight.
        await_some("the pool's connections idle", Duration::from_secs(5), || {
            let pool = pool.clone();
            async move { (pool.num_idle() == pool.size() as usize).then_some(()) }
        })
        .await;
    }
    insert("before the failover").execute(&mut admin).await.unwrap();
    await_call(&mut events, None, Duration::from_secs(10)).await;
    proxy.fail_over(&mut admin).await;
    let failed_over = Instant::now();
    insert("after the failover").execute(&mut admin).await.unwrap();
    await_call(&mut events, None, Duration::from_secs(30)).await;
    eprintln!("called {:?} after the failover", failed_over.elapsed());
    // That call was the new alert's (not a re-call of the first), and its
    // CallSid is recorded. (Polled on the test's own session: the failover
    // ended the pool's.)
    await_on_session(
        &mut admin,
        "the new alert's call recorded",
        Duration::from_secs(15),
        "SELECT count(*) = 1 FROM wardcall.notification_attempts n JOIN wardcall.runs r ON r.id = n.run_id
          WHERE r.input->>'title' = 'after the failover' AND n.provider_id IS NOT NULL",
    )
    .await;
    // The webhooks too: the first callbacks after the failover wait on their
    // frozen connections, are answered 503 at their deadline and retried on
    // live connections, and both calls' progress is recorded.
    await_on_session(
        &mut admin,
        "both calls' ringing recorded",
        Duration::from_secs(30),
        "SELECT count(*) = 2 FROM wardcall.notification_attempts WHERE ringing_at IS NOT NULL",
    )
    .await;
    eprintln!("webhooks recorded {:?} after the failover", failed_over.elapsed());
    app.stop(Duration::from_secs(5)).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
}

/// The escalation's own transactions are bounded too (`Services::bounded`):
/// an evaluation whose statement is in flight when a hard failover leaves
/// its connection half-open fails at `engine.database_deadline_ms`, is
/// retried on a live connection, and the next tier is called. Without the
/// bound the step waits on the dead connection while its lease is renewed,
/// and nobody else is called for the kernel's retransmission timeout.
pub async fn an_escalation_caught_by_a_hard_failover_calls_the_next_tier() {
    // The alert's row held: the evaluation at the tier's timeout waits for it.
    next_tier_after_a_failover_mid_step(|_| {}, None, "SELECT 1 FROM wardcall.alerts FOR UPDATE", "the evaluation waiting for the alert's row", None).await;
}

/// A later tier's transaction (its intents, with the `on_escalated`
/// write-back) is bounded as the evaluation is: caught by a hard failover
/// while its write-back waits for the team's row, it fails at the deadline,
/// is retried on a live connection, and the tier is called. (The test fails
/// with only `place_calls`' bound removed.)
pub async fn a_later_tier_caught_by_a_hard_failover_is_called() {
    next_tier_after_a_failover_mid_step(
        |c| {
            c.workflows[0].escalation_mut().expect("an escalation").write_back.on_escalated =
                Some("UPDATE alerts SET description = 'escalated' WHERE id = ($1->>'id')::uuid".into());
        },
        // Tier 1's own write-back done first: only the next tier's
        // `on_escalated` then waits for the team's row, inside the tier's transaction.
        Some(("tier 1's call written back", "SELECT metadata->'call'->>'call_id' IS NOT NULL FROM alerts")),
        "SELECT 1 FROM alerts FOR UPDATE",
        "the next tier's write-back waiting for the team's row",
        Some(("the escalation written back once the tier committed", "SELECT description = 'escalated' FROM alerts")),
    )
    .await;
}

/// The scenario of the two tests above. An alert's tier 1 (nurse-avery) is
/// called and not answered within 3 s; once `ready` (a label and a query of
/// one boolean) holds, the test's own transaction runs `lock` (taking a row
/// the next step's transaction needs) and, as soon as an engine statement
/// waits for it (`waiting` names it), every engine connection is frozen (a
/// hard failover; the holder's backend ends too, which frees the row). The
/// next tier (nurse-blake) must be called within 15 s, well before the
/// 60 s lease could lapse, and each tier exactly once; then `after` must
/// hold.
async fn next_tier_after_a_failover_mid_step(
    adjust: impl FnOnce(&mut wardcall::config::Config),
    ready: Option<(&str, &str)>,
    lock: &str,
    waiting: &str,
    after: Option<(&str, &str)>,
) {
    let Some(BehindProxy { db, emulator, proxy, pool, app, .. }) = hospital_behind_proxy(3.0, |c| {
        adjust(c);
        let e = &mut c.engine;
        // Above the 2 s check of every connection a suspect pool hands out.
        e.acquire_timeout_ms = 3000;
        // A statement waits for the test's lock: long enough for the test to
        // see it waiting and fail over before a server-side timeout.
        e.statement_timeout_ms = 3000;
        e.lock_timeout_ms = 3000;
        e.database_deadline_ms = 4000;
        // Renewals never let the lease lapse within the test (a takeover after
        // the lease would call the next tier without the bound under test).
        e.lease_ms = 60_000;
    })
    .await
    else {
        return;
    };
    let mut events = emulator.subscribe();
    let mut watcher = db.options.connect().await.unwrap();
    let mut holder = db.options.connect().await.unwrap();
    sqlx::query(
        "INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title, description)
         SELECT 'P-DHE-001', room_id, 'critical', 'active', 'seizure_detected', 'caught by a failover', 'test' FROM rooms WHERE room_name = 'Room 2' LIMIT 1",
    )
    .execute(&mut holder)
    .await
    .unwrap();
    await_call(&mut events, Some("+13855550101"), Duration::from_secs(10)).await;
    if let Some((what, sql)) = ready {
        await_on_session(&mut watcher, what, Duration::from_secs(10), sql).await;
    }
    let mut hold = holder.begin().await.unwrap();
    sqlx::query(lock).execute(&mut *hold).await.unwrap();
    await_on_session(
        &mut watcher,
        waiting,
        Duration::from_secs(15),
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
          WHERE datname = current_database() AND application_name = 'wardcall' AND wait_event_type = 'Lock')",
    )
    .await;
    proxy.fail_over(&mut watcher).await;
    let failed_over = Instant::now();
    drop(hold);
    await_call(&mut events, Some("+13855550102"), Duration::from_secs(20)).await;
    let took = failed_over.elapsed();
    eprintln!("the next tier called {took:?} after the failover");
    assert!(took < Duration::from_secs(15), "the next tier was called {took:?} after the failover: by the lease's lapse, not the deadline");
    // Each tier called once: the retried step called nobody again.
    let calls = emulator.calls();
    for to in ["+13855550101", "+13855550102"] {
        assert_eq!(calls.iter().filter(|c| c.to == to).count(), 1, "calls to {to}");
    }
    if let Some((what, sql)) = after {
        await_on_session(&mut watcher, what, Duration::from_secs(10), sql).await;
    }
    app.stop(Duration::from_secs(5)).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
}

/// Awaits the emulator's next create-call request (to `to`, E.164, if
/// given), at most `within`.
async fn await_call(events: &mut tokio::sync::broadcast::Receiver<EmulatorEvent>, to: Option<&str>, within: Duration) {
    let until = Instant::now() + within;
    loop {
        match tokio::time::timeout(until.saturating_duration_since(Instant::now()), events.recv()).await {
            Ok(Ok(EmulatorEvent::CallCreated { to: called, .. })) if to.map_or(true, |t| t == called) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("emulator events: {e}"),
            Err(_) => panic!("no create-call request to {} within {within:?}", to.unwrap_or("anyone")),
        }
    }
}

/// The hospital's app whose engine's pool reaches the database through a
/// [`FailoverProxy`] ([`hospital_behind_proxy`]).
struct BehindProxy {
    db: TestDb,
    emulator: wardcall::devtools::twilio_emulator::EmulatorHandle,
    cfg: Arc<wardcall::config::Config>,
    proxy: FailoverProxy,
    pool: sqlx::PgPool,
    app: wardcall::app::App,
}

/// A database with the hospital's schema, the no-answer emulator, and the
/// app with the hospital config (acknowledgement timeout `ack_timeout_s`
/// seconds, a pool of 4 and 2 webhook connections, a 100 ms sweep,
/// then `adjust`), its engine's pool behind a [`FailoverProxy`]. `None`
/// (the test skipped) without the embedded cluster, whose Unix socket the
/// proxy forwards to.
async fn hospital_behind_proxy(ack_timeout_s: f64, adjust: impl FnOnce(&mut wardcall::config::Config)) -> Option<BehindProxy> {
    if init().cluster.is_none() {
        eprintln!("skipped: needs the embedded cluster (its Unix socket behind the proxy)");
        return None;
    }
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let emulator = no_answer_emulator().await;
    let mut cfg = crate::escalation::hospital_config(&emulator.base_url(), ack_timeout_s, 1);
    cfg.engine.pool_size = 4;
    cfg.engine.webhook_pool_size = 2;
    cfg.engine.sweep_ms = 100;
    adjust(&mut cfg);
    cfg.validate("hospital.toml").unwrap();
    let cfg = Arc::new(cfg);
    let proxy = FailoverProxy::start(&db.options).await;
    let through_proxy = proxy.options(&db);
    let pool = wardcall::db::connect_pool_with(through_proxy.clone(), &cfg.engine).await.unwrap();
    let app = wardcall::app::App::start(
        wardcall::db::Database { pool: pool.clone(), connect_options: through_proxy, embedded: None },
        cfg.clone(),
        wardcall::app::StartOptions {
            twilio_auth_token: Some(AUTH_TOKEN.into()),
            http_listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            api_token: Some(API_TOKEN.into()),
            ..Default::default()
        },
    )
    .await
    .expect("app starts");
    Some(BehindProxy { db, emulator, cfg, proxy, pool, app })
}

/// [`await_true`] on one session of the test's own (`conn`), polled every 20 ms.
async fn await_on_session(conn: &mut sqlx::PgConnection, what: &str, timeout: Duration, sql: &str) {
    let until = Instant::now() + timeout;
    while !sqlx::query_scalar::<_, bool>(sql).persistent(false).fetch_one(&mut *conn).await.unwrap() {
        assert!(Instant::now() < until, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// sqlx pings every connection given back to its pool, without a bound: a
/// connection whose statement was dropped (at its deadline) on a
/// connection a hard failover left half-open would hold its pool slot in
/// that ping for as long as the kernel retransmits. After a missed
/// deadline (`within_on`, which marks the pool suspect) the pool checks it
/// first within 2 s and closes it (`wardcall::db::deadline::check_on_release`):
/// the slot comes back. (The mark is the pool's own: other tests' pools,
/// and their ping counts, are not touched.)
pub async fn a_connection_dropped_mid_statement_after_a_failover_is_closed_not_waited_on() {
    if init().cluster.is_none() {
        eprintln!("skipped: needs the embedded cluster (its Unix socket behind the proxy)");
        return;
    }
    let db = TestDb::new().await;
    let proxy = FailoverProxy::start(&db.options).await;
    // One slot only: while it is held, nothing else gets a connection.
    let (options, clock) = wardcall::db::pool_options();
    let pool = options.max_connections(1).acquire_timeout(Duration::from_millis(500)).connect_with(proxy.options(&db)).await.unwrap();
    wardcall::db::deadline::register(&pool, clock);
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *conn).await.unwrap();
    let mut admin = db.options.connect().await.unwrap();
    proxy.fail_over(&mut admin).await;
    assert!(!wardcall::db::deadline::suspect(&pool));
    let e = wardcall::db::deadline::within_on(&pool, Duration::from_millis(300), sqlx::query("SELECT 1").execute(&mut *conn)).await.unwrap_err();
    assert!(wardcall::db::deadline::is_no_reply(&e), "{e}");
    assert!(wardcall::db::deadline::suspect(&pool), "the missed deadline marks its pool");
    drop(conn);
    let dropped = Instant::now();
    let again = await_some("the pool's one slot back", Duration::from_secs(6), || {
        let pool = pool.clone();
        async move { pool.acquire().await.ok() }
    })
    .await;
    eprintln!("slot back {:?} after the drop", dropped.elapsed());
    drop(again);
}
