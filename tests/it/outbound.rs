//! Outgoing HTTP (issue 8, item 4): `outbound::perform` against a real local
//! HTTP server that can be told to fail, answer a status or hang; retry with
//! backoff, the circuit breaker in PostgreSQL (open, shared by two engines,
//! one probe at half-open, recovery), counts, secrets that never leak, and
//! dead letters listed and retried from the API and the CLI.

use crate::harness::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;
use wardcall::config::Config;
use wardcall::outbound::{decide, idempotency_key, perform, Decision, Endpoint, Endpoints, Method, Outcome, Request, RequestKey, RetryConfig};

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        outbound::retry_with_backoff_then_success_keeps_one_idempotency_key,
        outbound::non_retryable_4xx_fails_at_once,
        outbound::timeout_is_retryable_and_counts_for_the_breaker,
        outbound::breaker_opens_and_nothing_is_sent_while_open,
        outbound::breaker_is_shared_by_two_engines,
        outbound::half_open_lets_exactly_one_probe_through,
        outbound::failed_probe_reopens_and_recovery_closes,
        outbound::crashed_prober_does_not_wedge_the_breaker,
        outbound::secret_header_is_sent_and_never_leaks,
        outbound::endpoint_config_is_checked_and_a_missing_secret_stops_start,
        outbound::dead_letter_is_listed_and_retried_from_api_and_cli,
        outbound::waiting_for_the_breaker_costs_no_attempt,
        outbound::audit_entity_widening_keeps_other_migrations_values,
    ]
}

/// What the local server answers: the first `fail_first` requests get
/// `fail_status`, later ones `status`; every answer comes after `delay_ms`.
#[derive(Clone, Copy)]
struct Script {
    fail_first: usize,
    fail_status: u16,
    status: u16,
    delay_ms: u64,
}

impl Script {
    fn ok() -> Script {
        Script { fail_first: 0, fail_status: 503, status: 200, delay_ms: 0 }
    }
    fn always(status: u16) -> Script {
        Script { fail_first: 0, fail_status: status, status, delay_ms: 0 }
    }
}

/// One request the server saw.
#[derive(Clone, Debug)]
struct Seen {
    idempotency_key: Option<String>,
    authorization: Option<String>,
    path: String,
    body: Value,
}

/// A real HTTP server on 127.0.0.1:0 (the team's endpoint).
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<(Script, usize)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(script: Script) -> Upstream {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script = Arc::new(Mutex::new((script, 0usize)));
        let (s1, s2) = (seen.clone(), script.clone());
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let (seen, script) = (s1.clone(), s2.clone());
            async move {
                let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
                seen.lock().unwrap().push(Seen {
                    idempotency_key: header("idempotency-key"),
                    authorization: header("authorization"),
                    path: uri.path().to_string(),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                });
                let (s, n) = {
                    let mut g = script.lock().unwrap();
                    g.1 += 1;
                    (g.0, g.1 - 1)
                };
                tokio::time::sleep(Duration::from_millis(s.delay_ms)).await;
                let status = if n < s.fail_first { s.fail_status } else { s.status };
                let code = axum::http::StatusCode::from_u16(status).unwrap();
                (code, [("retry-after", "1")], axum::Json(json!({"n": n, "task_id": format!("task-{n}")})))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { addr, seen, script, task }
    }

    /// Changes the script; its count of failures starts again.
    fn set(&self, script: Script) {
        *self.script.lock().unwrap() = (script, 0);
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn url(&self) -> String {
        format!("http://{}/api", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The endpoint `tasks` at `url`, with `extra` TOML lines, resolved as at start.
fn endpoint(url: &str, extra: &str) -> Arc<Endpoint> {
    let text = format!("[[endpoints]]\nname = \"tasks\"\nurl = \"{url}\"\n{extra}\n");
    let c = Config::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    c.validate("test.toml").unwrap_or_else(|e| panic!("{e}"));
    Endpoints::resolve(&c.endpoints, "test.toml").unwrap_or_else(|e| panic!("{e}")).get("tasks").unwrap().clone()
}

const STEP: &str = "notify_tasks";

/// One attempt of the step `notify_tasks` of `run`, from `engine`.
async fn send(pool: &sqlx::PgPool, ep: &Endpoint, engine: &str, run: Uuid, attempt: i32) -> Outcome {
    let request = Request {
        method: Method::Post,
        url: ep.url_for("/tasks/booking-17").unwrap(),
        headers: Vec::new(),
        body: Some(json!({"name": "followup-17", "patient": "PATIENT-MARKER-0042"})),
        timeout_ms: None,
        success: None,
    };
    let key = idempotency_key(run, STEP);
    perform(pool, std::time::Duration::from_secs(20), ep, &request, &RequestKey { run_id: Some(run), step: STEP, attempt, idempotency_key: &key }, engine)
        .await
        .expect("perform")
}

/// (state, consecutive failures, attempts, successes, failures, openings) of `tasks`.
async fn stats(db: &TestDb) -> (String, i32, i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT state, consecutive_failures, attempts, successes, failures, breaker_openings
           FROM wardcall.http_endpoint_stats WHERE endpoint = 'tasks'",
    )
    .fetch_optional(&db.pool)
    .await
    .unwrap()
    .unwrap_or(("closed".into(), 0, 0, 0, 0, 0))
}

async fn audit_actions(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT action FROM wardcall.audit_log WHERE entity = 'http_endpoint' AND entity_id = 'tasks' ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// Waits until the open breaker's cool-down has ended.
async fn await_cooldown(db: &TestDb) {
    await_true(
        db,
        "the cool-down to end",
        Duration::from_secs(10),
        "SELECT coalesce(bool_and(opened_until <= clock_timestamp()), true) FROM wardcall.http_endpoints WHERE state = 'open'",
    )
    .await;
}

pub async fn retry_with_backoff_then_success_keeps_one_idempotency_key() {
    let db = TestDb::new().await;
    let up = Upstream::start(Script { fail_first: 2, fail_status: 503, status: 201, delay_ms: 0 }).await;
    let ep = endpoint(&up.url(), "");
    let retry = RetryConfig { max_attempts: 5, base_ms: 40, max_ms: 1000 };
    let run = Uuid::new_v4();
    let started = Instant::now();
    let mut attempt = 1;
    // The caller's loop, as an `http` step runs it across executions.
    let decision = loop {
        let outcome = send(&db.pool, &ep, "engine-a", run, attempt).await;
        if let Outcome::Failed { retryable, status, retry_after_ms, .. } = &outcome {
            assert_eq!((*retryable, *status, *retry_after_ms), (true, Some(503), Some(1000)), "503 is retryable; Retry-After is read");
        }
        match decide(outcome, &retry, attempt) {
            Decision::Retry { delay_ms, .. } => {
                assert_eq!(delay_ms, 1000, "Retry-After (1 s) is longer than the backoff");
                tokio::time::sleep(Duration::from_millis(delay_ms as u64)).await;
                attempt += 1;
            }
            other => break other,
        }
    };
    assert!(started.elapsed() >= Duration::from_millis(2000), "{:?}", started.elapsed());
    match decision {
        Decision::Done { status, body } => {
            assert_eq!(status, 201);
            assert_eq!(body["task_id"], "task-2", "the response's JSON is parsed");
        }
        other => panic!("expected success, got {other:?}"),
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 3, "N failures + 1 success reached the server");
    let key = idempotency_key(run, STEP);
    assert!(seen.iter().all(|s| s.idempotency_key.as_deref() == Some(key.as_str())), "{seen:?}");
    assert!(seen.iter().all(|s| s.path == "/api/tasks/booking-17" && s.body["name"] == "followup-17"), "{seen:?}");
    // One intent row per attempt, each with its outcome; no body or URL kept.
    type Row = (i32, String, Option<i32>, Option<bool>, bool);
    let rows: Vec<Row> =
        sqlx::query_as("SELECT attempt, outcome, status, retryable, latency_ms IS NOT NULL FROM wardcall.http_requests WHERE run_id = $1 ORDER BY attempt")
            .bind(run)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            (1, "failed".into(), Some(503), Some(true), true),
            (2, "failed".into(), Some(503), Some(true), true),
            (3, "success".into(), Some(201), None, true)
        ]
    );
    let (state, consecutive, attempts, successes, failures, openings) = stats(&db).await;
    assert_eq!((state.as_str(), consecutive, attempts, successes, failures, openings), ("closed", 0, 3, 1, 2, 0), "a success resets the consecutive failures");
}

pub async fn non_retryable_4xx_fails_at_once() {
    let db = TestDb::new().await;
    let up = Upstream::start(Script::always(400)).await;
    let ep = endpoint(&up.url(), "failure_threshold = 1");
    match send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await {
        Outcome::Failed { retryable: false, status: Some(400), error, .. } => {
            assert!(error.contains("tasks") && error.contains("400"), "{error}");
        }
        other => panic!("expected a non-retryable failure, got {other:?}"),
    }
    assert_eq!(up.count(), 1);
    // Not counted for the breaker (threshold 1 would have opened it).
    let (state, consecutive, attempts, _, failures, openings) = stats(&db).await;
    assert_eq!((state.as_str(), consecutive, attempts, failures, openings), ("closed", 0, 1, 1, 0));
    assert!(matches!(send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await, Outcome::Failed { retryable: false, .. }));
    assert_eq!(up.count(), 2, "the breaker stayed closed");
}

pub async fn timeout_is_retryable_and_counts_for_the_breaker() {
    let db = TestDb::new().await;
    let up = Upstream::start(Script { fail_first: 0, fail_status: 200, status: 200, delay_ms: 5000 }).await;
    let ep = endpoint(&up.url(), "timeout_ms = 200\nfailure_threshold = 2");
    let started = Instant::now();
    match send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await {
        Outcome::Failed { retryable: true, status: None, error, .. } => assert!(error.contains("200 ms") && error.contains("tasks"), "{error}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3), "the timeout holds: {:?}", started.elapsed());
    // A refused connection is a retryable transport failure too, and the second opens the breaker.
    let closed = endpoint("http://127.0.0.1:9/api", "timeout_ms = 200\nfailure_threshold = 2");
    match send(&db.pool, &closed, "engine-a", Uuid::new_v4(), 1).await {
        Outcome::Failed { retryable: true, status: None, error, .. } => {
            assert!(error.starts_with("endpoint 'tasks'") && !error.contains("127.0.0.1:9") && !error.contains("booking-17"), "{error}")
        }
        other => panic!("expected a transport failure, got {other:?}"),
    }
    let (state, consecutive, _, _, failures, openings) = stats(&db).await;
    assert_eq!((state.as_str(), consecutive, failures, openings), ("open", 2, 2, 1));
}

pub async fn breaker_opens_and_nothing_is_sent_while_open() {
    let db = TestDb::new().await;
    let up = Upstream::start(Script { fail_first: 2, fail_status: 503, status: 429, delay_ms: 0 }).await;
    let ep = endpoint(&up.url(), "failure_threshold = 3\ncooldown_ms = 60000");
    for i in 0..3 {
        assert!(matches!(send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await, Outcome::Failed { retryable: true, .. }), "request {i}");
    }
    assert_eq!(up.count(), 3);
    for _ in 0..3 {
        match send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await {
            Outcome::BreakerOpen { retry_in_ms } => assert!((55_000..=60_000).contains(&retry_in_ms), "{retry_in_ms}"),
            other => panic!("expected BreakerOpen, got {other:?}"),
        }
    }
    assert_eq!(up.count(), 3, "no request reached the server while the breaker was open");
    let (state, consecutive, attempts, successes, failures, openings) = stats(&db).await;
    assert_eq!((state.as_str(), consecutive, attempts, successes, failures, openings), ("open", 3, 3, 0, 3, 1));
    assert_eq!(audit_actions(&db).await, vec!["breaker.opened"]);
    let (from, to, actor, detail): (String, String, String, Value) =
        sqlx::query_as("SELECT from_state, to_state, actor, detail FROM wardcall.audit_log WHERE entity = 'http_endpoint'").fetch_one(&db.pool).await.unwrap();
    assert_eq!((from.as_str(), to.as_str(), actor.as_str()), ("closed", "open", "engine:engine-a"));
    assert_eq!(detail["consecutive_failures"], 3);
    assert_eq!(detail["status"], 429, "429 counts for the breaker");
    let rows = db.scalar_i64("SELECT count(*) FROM wardcall.http_requests").await;
    assert_eq!(rows, 3, "a refused request leaves no intent row");
}

pub async fn breaker_is_shared_by_two_engines() {
    let db = TestDb::new().await;
    let up = Upstream::start(Script::always(502)).await;
    let ep_a = endpoint(&up.url(), "failure_threshold = 2\ncooldown_ms = 60000");
    // The second engine resolves its own endpoint from the same config.
    let ep_b = endpoint(&up.url(), "failure_threshold = 2\ncooldown_ms = 60000");
    assert!(matches!(send(&db.pool, &ep_a, "engine-a", Uuid::new_v4(), 1).await, Outcome::Failed { .. }));
    assert!(matches!(send(&db.pool, &ep_b, "engine-b", Uuid::new_v4(), 1).await, Outcome::Failed { .. }), "engine b's failure counts too");
    assert_eq!(stats(&db).await.0, "open", "two failures from two engines opened it");
    assert!(matches!(send(&db.pool, &ep_b, "engine-b", Uuid::new_v4(), 1).await, Outcome::BreakerOpen { .. }));
    assert!(matches!(send(&db.pool, &ep_a, "engine-a", Uuid::new_v4(), 1).await, Outcome::BreakerOpen { .. }));
    assert_eq!(up.count(), 2);
    let engines: Vec<String> = sqlx::query_scalar("SELECT DISTINCT engine FROM wardcall.http_requests ORDER BY 1").fetch_all(&db.pool).await.unwrap();
    assert_eq!(engines, vec!["engine-a", "engine-b"]);
}

pub async fn half_open_lets_exactly_one_probe_through() {
    let db = TestDb::new().await;
    let up = Upstream::start(Script::always(503)).await;
    let ep = endpoint(&up.url(), "failure_threshold = 1\ncooldown_ms = 300");
    assert!(matches!(send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await, Outcome::Failed { .. }));
    assert_eq!(stats(&db).await.0, "open");
    // The endpoint recovers, slowly: the probe takes 400 ms.
    up.set(Script { fail_first: 0, fail_status: 200, status: 200, delay_ms: 400 });
    await_cooldown(&db).await;
    let mut callers = tokio::task::JoinSet::new();
    for i in 0..6 {
        let (pool, ep) = (db.pool.clone(), ep.clone());
        callers.spawn(async move { send(&pool, &ep, if i % 2 == 0 { "engine-a" } else { "engine-b" }, Uuid::new_v4(), 1).await });
    }
    let mut successes = 0;
    let mut refused = 0;
    while let Some(r) = callers.join_next().await {
        match r.unwrap() {
            Outcome::Success { .. } => successes += 1,
            Outcome::BreakerOpen { retry_in_ms } => {
                assert!(retry_in_ms <= 1000, "a caller waiting for a probe looks again within 1 s: {retry_in_ms}");
                refused += 1
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((successes, refused), (1, 5), "exactly one caller probed");
    assert_eq!(up.count(), 2, "one failure, one probe");
    let probes = db.scalar_i64("SELECT count(*) FROM wardcall.http_requests WHERE probe").await;
    assert_eq!(probes, 1);
    assert_eq!(stats(&db).await.0, "closed", "the probe's success closed the breaker");
    assert_eq!(audit_actions(&db).await, vec!["breaker.opened", "breaker.half_opened", "breaker.closed"]);
}

pub async fn failed_probe_reopens_and_recovery_closes() {
    let db = TestDb::new().await;
    let up = Upstream::start(Script::always(500)).await;
    let ep = endpoint(&up.url(), "failure_threshold = 2\ncooldown_ms = 200");
    for _ in 0..2 {
        assert!(matches!(send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await, Outcome::Failed { .. }));
    }
    await_cooldown(&db).await;
    // The probe fails: open again for the cool-down.
    assert!(matches!(send(&db.pool, &ep, "engine-b", Uuid::new_v4(), 1).await, Outcome::Failed { retryable: true, .. }));
    assert_eq!(stats(&db).await.0, "open");
    assert!(matches!(send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await, Outcome::BreakerOpen { .. }));
    up.set(Script::ok());
    await_cooldown(&db).await;
    assert!(matches!(send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await, Outcome::Success { .. }), "the probe succeeds");
    assert!(matches!(send(&db.pool, &ep, "engine-b", Uuid::new_v4(), 1).await, Outcome::Success { .. }), "closed: requests flow again");
    assert_eq!(up.count(), 5);
    let (state, consecutive, attempts, successes, failures, openings) = stats(&db).await;
    assert_eq!((state.as_str(), consecutive, attempts, successes, failures, openings), ("closed", 0, 5, 2, 3, 2));
    assert_eq!(audit_actions(&db).await, vec!["breaker.opened", "breaker.half_opened", "breaker.reopened", "breaker.half_opened", "breaker.closed"]);
}

pub async fn crashed_prober_does_not_wedge_the_breaker() {
    let db = TestDb::new().await;
    let up = Upstream::start(Script::ok()).await;
    let ep = endpoint(&up.url(), "");
    // An engine claimed the probe and died: its claim is still running, then expires.
    db.exec(
        "INSERT INTO wardcall.http_endpoints (name, state, consecutive_failures, probe_owner, probe_request, probe_expires_at)
         VALUES ('tasks', 'half_open', 5, 'dead-engine', gen_random_uuid(), clock_timestamp() + interval '300 milliseconds')",
    )
    .await;
    assert!(matches!(send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await, Outcome::BreakerOpen { .. }), "the claim still runs");
    assert_eq!(up.count(), 0);
    await_true(&db, "the probe claim to expire", Duration::from_secs(5), "SELECT probe_expires_at <= clock_timestamp() FROM wardcall.http_endpoints").await;
    assert!(matches!(send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await, Outcome::Success { .. }), "another engine probes");
    assert_eq!(stats(&db).await.0, "closed");
    assert_eq!(audit_actions(&db).await, vec!["breaker.probe_reclaimed", "breaker.closed"]);
}

/// A `tracing` writer into a shared buffer (the log lines of this thread).
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> LogBuffer {
        self.clone()
    }
}

pub async fn secret_header_is_sent_and_never_leaks() {
    const SECRET: &str = "Bearer sk-live-SECRET-7f3a9c";
    let var = format!("WARDCALL_IT_TASKS_TOKEN_{}", std::process::id());
    std::env::set_var(&var, SECRET);
    let db = TestDb::new().await;
    let up = Upstream::start(Script { fail_first: 1, fail_status: 500, status: 200, delay_ms: 0 }).await;
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt().with_writer(logs.clone()).with_max_level(tracing::Level::TRACE).with_ansi(false).finish();
    // With exactly one dispatcher registered, tracing caches a callsite that
    // another test's thread reaches first as "never" (tracing-core's
    // `has_just_one` shortcut asks only that thread's default), and this
    // thread's subscriber would miss it: a second, silent dispatcher keeps
    // interest computed over every dispatcher.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let _guard = tracing::subscriber::set_default(subscriber);
    let ep = endpoint(
        &up.url(),
        &format!("failure_threshold = 1\ncooldown_ms = 100\nheaders = {{ Authorization = {{ env = \"{var}\" }}, \"X-Source\" = \"wardcall\" }}"),
    );
    assert!(!format!("{ep:?}").contains("SECRET"), "{ep:?}");
    let first = send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await;
    let Outcome::Failed { error, .. } = &first else { panic!("{first:?}") };
    await_cooldown(&db).await;
    assert!(matches!(send(&db.pool, &ep, "engine-a", Uuid::new_v4(), 1).await, Outcome::Success { .. }));
    let closed = endpoint("http://127.0.0.1:9/api", &format!("headers = {{ Authorization = {{ env = \"{var}\" }} }}"));
    let Outcome::Failed { error: transport, .. } = send(&db.pool, &closed, "engine-a", Uuid::new_v4(), 1).await else { panic!("expected a failure") };
    drop(_guard);
    std::env::remove_var(&var);
    let seen = up.seen();
    assert!(seen.iter().all(|s| s.authorization.as_deref() == Some(SECRET)), "the secret header is sent: {seen:?}");
    let log = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("circuit breaker opened") && log.contains("circuit breaker closed"), "the transitions are logged: {log}");
    let audit: String = sqlx::query_scalar("SELECT coalesce(string_agg(action || ' ' || actor || ' ' || detail::text, E'\\n'), '') FROM wardcall.audit_log")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let rows: String = sqlx::query_scalar("SELECT string_agg(to_jsonb(r)::text, E'\\n') FROM wardcall.http_requests r").fetch_one(&db.pool).await.unwrap();
    for (what, text) in [("logs", &log), ("audit", &audit), ("error", error), ("transport error", &transport), ("request rows", &rows)] {
        assert!(!text.contains("SECRET") && !text.contains("sk-live"), "the secret reached the {what}: {text}");
        assert!(!text.contains("PATIENT-MARKER") && !text.contains("booking-17"), "the body or the path reached the {what}: {text}");
    }
}

pub async fn endpoint_config_is_checked_and_a_missing_secret_stops_start() {
    // An endpoint that no step names is fine.
    let c = Config::parse("[[endpoints]]\nname = \"tasks\"\nurl = \"https://tasks.example.org/api\"\n", "t.toml").unwrap();
    c.validate("t.toml").unwrap();
    // A literal secret is refused at load, naming the key.
    let c = Config::parse("[[endpoints]]\nname = \"tasks\"\nurl = \"https://x.example\"\nheaders = { Authorization = \"Bearer abc\" }\n", "t.toml").unwrap();
    let e = c.validate("t.toml").unwrap_err().to_string();
    assert!(e.contains("endpoints[0].headers.Authorization") && !e.contains("abc"), "{e}");
    let e = Config::parse("[[endpoints]]\nname = \"tasks\"\nurl = \"https://x.example\"\ntimeout = 5\n", "t.toml").unwrap_err().to_string();
    assert!(e.contains("endpoints[0]") && e.contains("timeout"), "{e}");
    // The binary refuses to start when a header's variable is unset, naming the key and the variable.
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("wardcall-it-endpoint-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("endpoints.toml");
    std::fs::write(
        &path,
        format!(
            "database_url = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[[endpoints]]\nname = \"tasks\"\nurl = \"https://x.example\"\nheaders = {{ Authorization = {{ env = \"WARDCALL_IT_UNSET_TOKEN\" }} }}\n",
            db.url()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
        .args(["--config", path.to_str().unwrap(), "serve"])
        .env_remove("WARDCALL_IT_UNSET_TOKEN")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve must refuse to start: {stderr}");
    assert!(
        stderr.contains("endpoints.toml") && stderr.contains("endpoints[0].headers.Authorization") && stderr.contains("WARDCALL_IT_UNSET_TOKEN"),
        "{stderr}"
    );
    assert!(!stderr.contains("engine started"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn script_workflow() -> String {
    "[engine]\nlease_ms = 2000\nsweep_ms = 100\npoll_ms = 50\n\n[[workflows]]\nname = \"bookings\"\nevent = \"booking.due\"\nkind = \"script\"\nmax_attempts = 2\nretry_base_ms = 10\nretry_max_ms = 20\n".into()
}

fn cli(db: &TestDb, args: &[&str]) -> (bool, String, String) {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_wardcall")).args(args).env("DATABASE_URL", db.url()).env_remove("WARDCALL_CONFIG").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

pub async fn dead_letter_is_listed_and_retried_from_api_and_cli() {
    let db = TestDb::new().await;
    let app = start_app(&db, config(&script_workflow())).await;
    db.exec(r#"SELECT wardcall.emit('booking.due', '{"patient": "PATIENT-MARKER-0042", "steps":[{"op":"step"},{"op":"fail","times":-1,"error":"endpoint tasks answered HTTP 503"}]}')"#).await;
    await_true(&db, "the run to fail", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'failed'").await;
    let run: Uuid = sqlx::query_scalar("SELECT id FROM wardcall.runs").fetch_one(&db.pool).await.unwrap();
    // The view lists it: the step it failed at, its attempts, the last error, when.
    let (workflow, event, step, attempts, last_error, failed): (String, String, String, i32, String, bool) =
        sqlx::query_as("SELECT workflow, event, step, attempts, last_error, failed_at IS NOT NULL FROM wardcall.dead_letters WHERE run_id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((workflow.as_str(), event.as_str(), step.as_str(), attempts, failed), ("bookings", "booking.due", "op:1", 2, true));
    assert!(last_error.contains("HTTP 503"), "{last_error}");
    // `wardcall status` counts it and shows it, without the payload.
    let (ok, stdout, stderr) = cli(&db, &["status"]);
    assert!(ok, "{stdout}{stderr}");
    let line = stdout.lines().find(|l| l.contains("dead")).unwrap_or_else(|| panic!("no dead letter line: {stdout}"));
    assert!(line.split_whitespace().any(|w| w == "1"), "{line}");
    assert!(stdout.contains(&run.to_string()) && stdout.contains("op:1"), "{stdout}");
    assert!(!stdout.contains("PATIENT-MARKER"), "{stdout}");
    let (_, json_out, _) = cli(&db, &["status", "--json"]);
    let v: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(v["dead_letters"]["count"], 1);
    assert_eq!(v["dead_letters"]["newest"][0]["run_id"], run.to_string());
    assert!(!json_out.contains("PATIENT-MARKER"));

    // The API retries it (behind the bearer token): it runs again from its failed step.
    let http = reqwest::Client::new();
    let url = format!("http://{}/api/runs/{run}/retry", app.http_addr.unwrap());
    let refused = http.post(&url).header("content-type", "application/json").send().await.unwrap();
    assert_eq!(refused.status(), 401, "the API needs the token");
    let r = http.post(&url).header("content-type", "application/json").bearer_auth(API_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, json!({"retried": true, "step": "op:1"}));
    await_true(
        &db,
        "the retried run to run and fail again",
        Duration::from_secs(10),
        &format!("SELECT count(*) = 2 FROM wardcall.audit_log WHERE entity_id = '{run}' AND action = 'run.failed'"),
    )
    .await;
    let first_step_runs = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM wardcall.audit_log WHERE entity_id = '{run}' AND action = 'run.step_completed' AND detail->>'from_step' = 'start'"
        ))
        .await;
    assert_eq!(first_step_runs, 1, "the step before the failed one does not run again");
    let (from, to, actor, detail): (String, String, String, Value) =
        sqlx::query_as(&format!("SELECT from_state, to_state, actor, detail FROM wardcall.audit_log WHERE entity_id = '{run}' AND action = 'run.retried'"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((from.as_str(), to.as_str(), actor.as_str()), ("failed", "pending", "api"));
    assert_eq!(detail["step"], "op:1");
    // A run that has not failed cannot be retried.
    db.exec(r#"SELECT wardcall.emit('booking.due', '{"steps":[{"op":"wait","signal":"never","timeout_ms":60000}]}')"#).await;
    await_true(&db, "the second run to wait", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'waiting'").await;
    let waiting: Uuid = sqlx::query_scalar("SELECT id FROM wardcall.runs WHERE status = 'waiting'").fetch_one(&db.pool).await.unwrap();
    let r = http
        .post(format!("http://{}/api/runs/{waiting}/retry", app.http_addr.unwrap()))
        .header("content-type", "application/json")
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let r = http
        .post(format!("http://{}/api/runs/{}/retry", app.http_addr.unwrap(), Uuid::new_v4()))
        .header("content-type", "application/json")
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    app.stop(Duration::from_secs(2)).await;

    // The CLI retries it (no engine runs now: the run stays pending at its failed step).
    let (ok, stdout, stderr) = cli(&db, &["retry", &run.to_string()]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("op:1"), "{stdout}");
    let (status, step, attempt, due_now): (String, String, i32, bool) =
        sqlx::query_as("SELECT status, step, step_attempt, due_at <= clock_timestamp() FROM wardcall.runs WHERE id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), step.as_str(), attempt, due_now), ("pending", "op:1", 0, true));
    let actors: Vec<String> =
        sqlx::query_scalar(&format!("SELECT actor FROM wardcall.audit_log WHERE entity_id = '{run}' AND action = 'run.retried' ORDER BY id"))
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(actors, vec!["api", "cli"]);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.dead_letters").await, 0, "a retried run is no dead letter");
    let (ok, _, stderr) = cli(&db, &["retry", &run.to_string()]);
    assert!(!ok && stderr.contains("has not failed"), "{stderr}");
}

/// The runtime side of `Decision::WaitForBreaker`: the step is put off
/// without counting an attempt (a `Sleep` would reset the count, a failure
/// would add one).
pub async fn waiting_for_the_breaker_costs_no_attempt() {
    use wardcall::store::runs as store;
    let db = TestDb::new().await;
    db.exec(
        "INSERT INTO wardcall.runs (workflow, event, input, step, status, step_attempt) VALUES ('bookings', 'booking.due', '{}', 'post_task', 'pending', 2)",
    )
    .await;
    let run = store::claim_due(&mut db.pool.acquire().await.unwrap(), "engine-a", 10, 5000).await.unwrap().pop().expect("claimed");
    let retry = RetryConfig { max_attempts: 5, base_ms: 100, max_ms: 1000 };
    let Decision::WaitForBreaker { delay_ms } = decide(Outcome::BreakerOpen { retry_in_ms: 400 }, &retry, run.step_attempt + 1) else {
        panic!("expected a wait")
    };
    assert!(store::defer_step(&db.pool, &run, delay_ms, "circuit breaker of endpoint 'tasks' is open", "engine:engine-a").await.unwrap());
    let (status, step, attempt, due_in_ms): (String, String, i32, f64) =
        sqlx::query_as("SELECT status, step, step_attempt, extract(epoch FROM due_at - clock_timestamp())::float8 * 1000 FROM wardcall.runs WHERE id = $1")
            .bind(run.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), step.as_str(), attempt), ("sleeping", "post_task", 2), "the attempt count is kept");
    assert!((200.0..=400.0).contains(&due_in_ms), "{due_in_ms}");
    let audited = db.scalar_i64(&format!("SELECT count(*) FROM wardcall.audit_log WHERE entity_id = '{}' AND action = 'run.deferred'", run.id)).await;
    assert_eq!(audited, 1);
    // A lost lease writes nothing.
    assert!(!store::defer_step(&db.pool, &run, 10, "x", "engine:engine-a").await.unwrap());
}

/// Migration 0009 adds the audit entity `http_endpoint` to whatever list the
/// CHECK holds when it runs (other migrations add theirs), and running its
/// block again changes nothing.
pub async fn audit_entity_widening_keeps_other_migrations_values() {
    let db = TestDb::new().await;
    let migration = include_str!("../../migrations/0009_outbound_http.sql");
    // The table and its CHECK were renamed by migration 0018 (the name
    // `wardcall.audit_log` is now the view of the whole trail): the block runs
    // against them under their names of today.
    let block = migration[migration.find("DO $$").expect("the widening block")..]
        .replace("wardcall.audit_log", "wardcall.audit_records")
        .replace("audit_log_entity_check", "audit_records_entity_check");
    let block = block.as_str();
    let allowed = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'wardcall.audit_records'::regclass AND conname = 'audit_records_entity_check'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let def = allowed(&db).await;
    assert!(def.contains("'http_endpoint'") && def.contains("'notification_attempt'"), "{def}");
    // Another migration (applied later) replaced the list with its own, keeping ours.
    db.exec(
        "ALTER TABLE wardcall.audit_records DROP CONSTRAINT audit_records_entity_check;
         ALTER TABLE wardcall.audit_records ADD CONSTRAINT audit_records_entity_check
               CHECK (entity IN ('run','alert','notification_attempt','source','message')) NOT VALID",
    )
    .await;
    db.exec(block).await;
    let def = allowed(&db).await;
    assert!(def.contains("'http_endpoint'") && def.contains("'message'") && def.contains("'source'"), "{def}");
    db.exec(block).await;
    assert_eq!(allowed(&db).await, def, "idempotent");
    db.exec("INSERT INTO wardcall.audit_records (entity, entity_id, action, actor) VALUES ('message', 'm', 'x', 'test'), ('http_endpoint', 'e', 'x', 'test')")
        .await;
    let refused =
        sqlx::query("INSERT INTO wardcall.audit_records (entity, entity_id, action, actor) VALUES ('nonsense', 'e', 'x', 'test')").execute(&db.pool).await;
    assert!(refused.is_err(), "the CHECK still refuses unknown entities");
}
