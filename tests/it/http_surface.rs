//! The HTTP surface (issue 7, items 5, 6, 7 and the HTTP parts of 12): who may
//! use the API, bounded connections and bodies, refused input, and keypresses
//! that survive a brief database outage.

use crate::escalation::{hospital, NURSE_A, SEIZURE_INSERT};
use crate::harness::*;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wardcall::app::{App, StartOptions};
use wardcall::config::Config;
use wardcall::devtools::twilio_emulator::{CallbackKind, EmulatorEvent, Persona};
use wardcall::providers::twilio::callback::CONNECTION_OVERRIDES;
use wardcall::providers::twilio::signature::compute_signature;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        http_surface::api_needs_a_token_or_its_own_loopback_listener,
        http_surface::api_refuses_cross_site_requests,
        http_surface::unknown_event_and_nul_bytes_are_refused,
        http_surface::emit_cli_refuses_an_unknown_event,
        http_surface::api_listener_config_is_checked_at_load,
        http_surface::ipv6_any_listener_accepts_ipv4_clients,
        http_surface::idle_connections_are_bounded_and_webhooks_get_through,
        http_surface::oversized_bodies_get_413,
        http_surface::webhook_answers_503_within_its_deadline_when_no_connection_is_free,
        http_surface::keypress_survives_a_database_outage,
    ]
}

fn script_config() -> String {
    "[[workflows]]\nname = \"tasks\"\nevent = \"task.created\"\nkind = \"script\"\n".to_string()
}

async fn start_with(db: &TestDb, config: Arc<Config>, api_token: Option<&str>, api_listener: bool) -> App {
    App::start(
        db.database(),
        config,
        StartOptions {
            twilio_auth_token: Some(AUTH_TOKEN.into()),
            http_listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            api_token: api_token.map(str::to_string),
            api_listener: if api_listener { Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()) } else { None },
            ..Default::default()
        },
    )
    .await
    .expect("app starts")
}

fn json_post(http: &reqwest::Client, url: String) -> reqwest::RequestBuilder {
    http.post(url).header("content-type", "application/json")
}

pub async fn api_needs_a_token_or_its_own_loopback_listener() {
    let db = TestDb::new().await;
    let http = reqwest::Client::new();

    // 1. No token, no API listener: the API is not served on the public
    //    listener at all, although the test connects from loopback (as a
    //    reverse proxy on the same host would).
    let app = start_with(&db, config(&script_config()), None, false).await;
    let base = format!("http://{}", app.http_addr.unwrap());
    let r = http.get(format!("{base}/api/status")).send().await.unwrap();
    assert_eq!(r.status(), 404, "the API must not be open to loopback clients (a same-host proxy)");
    let r = json_post(&http, format!("{base}/api/events/task.created")).body(r#"{"payload": {}}"#).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Served (its verdict, 200 or 503, is the engine's health; see runtime_resilience).
    let health = http.get(format!("{base}/healthz")).send().await.unwrap().status();
    assert!(health == 200 || health == 503, "{health}");
    app.stop(Duration::from_secs(2)).await;

    // 2. A token: required on every API request; the scheme is case-insensitive.
    let app = start_with(&db, config(&script_config()), Some(API_TOKEN), false).await;
    let base = format!("http://{}", app.http_addr.unwrap());
    let r = http.get(format!("{base}/api/status")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers().get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"));
    let r = http.get(format!("{base}/api/status")).header("authorization", "Bearer wrong-token-but-long-enough").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(format!("{base}/api/status")).header("authorization", format!("Bearer {API_TOKEN}x")).send().await.unwrap();
    assert_eq!(r.status(), 401, "a longer token is not a match");
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = http.get(format!("{base}/api/status")).header("authorization", format!("{scheme} {API_TOKEN}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "scheme {scheme}");
    }
    let r = json_post(&http, format!("{base}/api/events/task.created"))
        .header("authorization", format!("bearer {API_TOKEN}"))
        .body(r#"{"payload": {"steps": []}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    app.stop(Duration::from_secs(2)).await;

    // 3. Its own (loopback) listener, no token: served there only.
    let app = start_with(&db, config(&script_config()), None, true).await;
    let public = format!("http://{}", app.http_addr.unwrap());
    let api = format!("http://{}", app.api_addr.expect("the API listener runs"));
    assert_eq!(http.get(format!("{public}/api/status")).send().await.unwrap().status(), 404);
    assert_eq!(http.get(format!("{api}/api/status")).send().await.unwrap().status(), 200);
    // Served (its verdict, 200 or 503, is the engine's health; see runtime_resilience).
    let health = http.get(format!("{api}/healthz")).send().await.unwrap().status();
    assert!(health == 200 || health == 503, "{health}");
    let r = http.post(format!("{api}/webhooks/twilio/status?attempt=00000000-0000-0000-0000-000000000000")).send().await.unwrap();
    assert_eq!(r.status(), 404, "webhooks are not served on the API listener");
    app.stop(Duration::from_secs(2)).await;

    // 4. Its own listener and a token: the token is required there too.
    let app = start_with(&db, config(&script_config()), Some(API_TOKEN), true).await;
    let api = format!("http://{}", app.api_addr.unwrap());
    let public = format!("http://{}", app.http_addr.unwrap());
    assert_eq!(http.get(format!("{api}/api/status")).send().await.unwrap().status(), 401);
    let ok = http.get(format!("{api}/api/status")).header("authorization", format!("Bearer {API_TOKEN}")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let r = http.get(format!("{public}/api/status")).header("authorization", format!("Bearer {API_TOKEN}")).send().await.unwrap();
    assert_eq!(r.status(), 404, "with an API listener, the public listener never serves the API");
    app.stop(Duration::from_secs(2)).await;
}

pub async fn api_refuses_cross_site_requests() {
    let db = TestDb::new().await;
    let app = start_with(&db, config(&script_config()), Some(API_TOKEN), false).await;
    let base = format!("http://{}", app.http_addr.unwrap());
    let http = reqwest::Client::new();
    let auth = format!("Bearer {API_TOKEN}");
    // What a cross-site form or fetch without preflight can send.
    for ct in [None, Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data; boundary=x")] {
        let mut r = http.post(format!("{base}/api/events/task.created")).header("authorization", &auth).body(r#"{"payload": {"steps": []}}"#);
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 415, "content type {ct:?}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("application/json"), "{body}");
    }
    let r = http.post(format!("{base}/api/runs/00000000-0000-0000-0000-000000000000/cancel")).header("authorization", &auth).send().await.unwrap();
    assert_eq!(r.status(), 415, "a body-less POST needs the JSON content type too");
    let r = http
        .post(format!("{base}/api/events/task.created"))
        .header("authorization", &auth)
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(r#"{"payload": {"steps": []}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "the media type is case-insensitive and may carry parameters");
    // A CORS preflight is never granted, and no response carries CORS headers.
    let r = http
        .request(reqwest::Method::OPTIONS, format!("{base}/api/events/task.created"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type")
        .send()
        .await
        .unwrap();
    assert!(!r.status().is_success(), "preflight answered {}", r.status());
    assert!(r.headers().keys().all(|k| !k.as_str().starts_with("access-control-")), "{:?}", r.headers());
    let r = http.get(format!("{base}/api/status")).header("origin", "https://evil.example").header("authorization", &auth).send().await.unwrap();
    assert!(r.headers().keys().all(|k| !k.as_str().starts_with("access-control-")), "{:?}", r.headers());
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 1);
    app.stop(Duration::from_secs(2)).await;
}

pub async fn unknown_event_and_nul_bytes_are_refused() {
    let db = TestDb::new().await;
    let app = start_app(&db, config(&script_config())).await;
    let base = format!("http://{}", app.http_addr.unwrap());
    let http = reqwest::Client::new();
    let auth = format!("Bearer {API_TOKEN}");
    let post = |path: &str, body: &str| json_post(&http, format!("{base}{path}")).header("authorization", &auth).body(body.to_string());

    let r = post("/api/events/task.craeted", r#"{"payload": {"steps": []}}"#).send().await.unwrap();
    assert_eq!(r.status(), 422, "an event no workflow listens to is refused");
    let body: Value = r.json().await.unwrap();
    let e = body["error"].as_str().unwrap();
    assert!(e.contains("task.craeted") && e.contains("task.created"), "names the event and the known ones: {e}");

    let r = post("/api/events/task.created", r#"{"payload": {"steps": [], "note": "a\u0000b"}}"#).send().await.unwrap();
    assert_eq!(r.status(), 400, "NUL in the payload");
    let body: Value = r.json().await.unwrap();
    let e = body["error"].as_str().unwrap();
    assert!(e.contains("NUL") && e.contains("payload.note"), "{e}");
    let r = post("/api/events/task.created", r#"{"payload": {"steps": [], "k\u0000": 1}}"#).send().await.unwrap();
    assert_eq!(r.status(), 400, "NUL in a key");
    let r = post("/api/events/task.created", r#"{"payload": {"steps": []}, "dedup_key": "\u0000"}"#).send().await.unwrap();
    assert_eq!(r.status(), 400, "NUL in the dedup key");
    let r = post("/api/events/task%00created", r#"{"payload": {}}"#).send().await.unwrap();
    assert_eq!(r.status(), 400, "NUL in the event name");
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("event name"), "{body}");
    let r = post("/api/runs/00000000-0000-0000-0000-000000000000/signals/go", r#"{"x": "\u0000"}"#).send().await.unwrap();
    assert_eq!(r.status(), 400, "NUL in a signal payload");
    let r = post("/api/runs/00000000-0000-0000-0000-000000000000/signals/g%00o", "{}").send().await.unwrap();
    assert_eq!(r.status(), 400, "NUL in a signal name");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 0, "nothing refused reached the outbox");
    let r = post("/api/events/task.created", r#"{"payload": {"steps": []}}"#).send().await.unwrap();
    assert_eq!(r.status(), 202);
    app.stop(Duration::from_secs(2)).await;
}

pub async fn emit_cli_refuses_an_unknown_event() {
    let dir = std::env::temp_dir().join(format!("wardcall-h1-emit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("wardcall.toml");
    // No database is opened for a refused event: the URL points nowhere.
    std::fs::write(&path, format!("database_url = \"postgres://nobody@127.0.0.1:9/none\"\n{}", script_config())).unwrap();
    let run = |event: &str, payload: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
            .args(["--config", path.to_str().unwrap(), "emit", event, payload])
            .env_remove("DATABASE_URL")
            .output()
            .unwrap()
    };
    let out = run("task.craeted", "{}");
    assert!(!out.status.success(), "an unknown event must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no workflow listens to event 'task.craeted'") && stderr.contains("known events: task.created"), "{stderr}");
    let out = run("task.created", r#"{"note": "a\u0000b"}"#);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("payload.note contains a NUL"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

pub async fn api_listener_config_is_checked_at_load() {
    let dir = std::env::temp_dir().join(format!("wardcall-h1-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let short = dir.join("short-token");
    std::fs::write(&short, "abc\n").unwrap();
    let cases = [
        ("[http]\napi_listen = \"0.0.0.0:8081\"\n".to_string(), "http.api_listen", "loopback"),
        ("[http]\napi_listen = \"localhost\"\n".to_string(), "http.api_listen", "not an address"),
        (format!("[http]\napi_token_file = \"{}\"\n", short.display()), "http.api_token_file", "at least 16"),
        (format!("[http]\napi_token_file = \"{}\"\n", dir.join("missing").display()), "http.api_token_file", "cannot read"),
        ("[http]\nheader_read_timeout_ms = 0\n".to_string(), "http.header_read_timeout_ms", "out of range"),
        ("[http]\nmax_connections = 0\n".to_string(), "http.max_connections", "out of range"),
        ("[http]\nmax_body_bytes = 10\n".to_string(), "http.max_body_bytes", "out of range"),
    ];
    for (text, key, problem) in cases {
        let c = Config::parse(&text, "x.toml").unwrap();
        let e = c.validate("x.toml").expect_err(&text).to_string();
        assert!(e.contains(key) && e.contains(problem), "{text}: {e}");
        assert!(!e.contains("abc"), "the token leaked into the error: {e}");
    }
    let good = dir.join("token");
    std::fs::write(&good, "0123456789abcdef0123\n").unwrap();
    let c = Config::parse(&format!("[http]\napi_listen = \"[::1]:8081\"\napi_token_file = \"{}\"\n", good.display()), "x.toml").unwrap();
    c.validate("x.toml").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

pub async fn ipv6_any_listener_accepts_ipv4_clients() {
    // The listener wardcall binds for `http.listen = "[::]:…"` is dual-stack
    // whatever the host's default (net.ipv6.bindv6only).
    let db = TestDb::new().await;
    let mut c = Config::parse(&script_config(), "x.toml").unwrap();
    c.http.listen = "[::]:0".into();
    c.http.public_url = Some("https://wardcall.example.org".into());
    c.validate("x.toml").unwrap();
    let app = App::start(db.database(), Arc::new(c), StartOptions { twilio_auth_token: Some(AUTH_TOKEN.into()), ..Default::default() }).await.unwrap();
    let addr = app.http_addr.unwrap();
    assert!(addr.is_ipv6());
    let r = reqwest::get(format!("http://127.0.0.1:{}/healthz", addr.port())).await.expect("an IPv4 client reaches [::]");
    // Served (200 or 503 is the engine's health verdict, not the listener's).
    assert!(r.status() == 200 || r.status() == 503, "{}", r.status());
    let r = reqwest::get(format!("http://[::1]:{}/healthz", addr.port())).await.unwrap();
    assert!(r.status() == 200 || r.status() == 503, "{}", r.status());
    app.stop(Duration::from_secs(2)).await;
    // The socket option itself, independent of the host's sysctl.
    let l = wardcall::http::bind("[::]:0".parse().unwrap()).unwrap();
    assert!(!socket2::SockRef::from(&l).only_v6().unwrap(), "IPV6_V6ONLY must be off");
}

/// Signs a webhook the way Twilio does for the URL wardcall configured
/// (connection-override fragment included).
fn signed_status_webhook(http: &reqwest::Client, base: &str, attempt: uuid::Uuid) -> reqwest::RequestBuilder {
    let path = format!("/webhooks/twilio/status?attempt={attempt}");
    let params = vec![("CallSid".to_string(), "CA00000000000000000000000000000000".to_string()), ("CallStatus".to_string(), "ringing".to_string())];
    let sig = compute_signature(AUTH_TOKEN, &format!("{base}{path}#{CONNECTION_OVERRIDES}"), &params);
    http.post(format!("{base}{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(serde_urlencoded::to_string(&params).unwrap())
}

/// Reads from an idle connection until the server closes it (EOF or reset);
/// `false` if it is still open after `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => true, // a 408/400 answer, then the close
        Err(_) => false,
    }
}

pub async fn idle_connections_are_bounded_and_webhooks_get_through() {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let mut c = crate::escalation::hospital_config("http://127.0.0.1:9", 30.0, 1);
    c.http.header_read_timeout_ms = 3000;
    c.http.max_connections = 300;
    let app = start_app(&db, Arc::new(c)).await;
    let addr = app.http_addr.unwrap();
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();

    // 1. 250 idle (half-open: connected, nothing sent) connections, below the
    //    cap: a signed webhook still gets through at once.
    let mut idle = Vec::new();
    for _ in 0..250 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let t = Instant::now();
    let r = signed_status_webhook(&http, &base, uuid::Uuid::new_v4()).send().await.unwrap();
    assert_eq!(r.status(), 404, "verified and looked up (unknown attempt)");
    assert!(t.elapsed() < Duration::from_secs(2), "webhook took {:?} with 250 idle connections", t.elapsed());

    // 2. 150 more: beyond the cap (300, counting the webhook's own pooled
    //    connection), the extra ones are closed at once, long before the header timeout.
    let mut extra = Vec::new();
    for _ in 0..150 {
        extra.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut closed_at_once = 0;
    for s in &mut extra {
        if closed_within(s, Duration::from_millis(50)).await {
            closed_at_once += 1;
        }
    }
    assert!(closed_at_once >= 60, "only {closed_at_once} of 150 connections beyond the cap were closed at once");

    // 3. Every idle connection is closed once the header read timeout (3 s) passes.
    let t = Instant::now();
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(8)).await, "idle connection {i} still open after {:?}", t.elapsed());
    }
    assert!(t.elapsed() < Duration::from_secs(8));

    // 4. A half-sent request (headers never finished) is closed too, and the
    //    server is still responsive afterwards.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /webhooks/twilio/status HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    assert!(closed_within(&mut slow, Duration::from_secs(8)).await, "a slowloris connection was kept");
    let t = Instant::now();
    let r = signed_status_webhook(&http, &base, uuid::Uuid::new_v4()).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(t.elapsed() < Duration::from_secs(2));
    app.stop(Duration::from_secs(2)).await;
}

pub async fn oversized_bodies_get_413() {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let mut c = crate::escalation::hospital_config("http://127.0.0.1:9", 30.0, 1);
    c.http.body_read_timeout_ms = 1000;
    let app = start_app(&db, Arc::new(c)).await;
    let base = format!("http://{}", app.http_addr.unwrap());
    // No pooled connections: the server closes a connection after a 413, and a
    // request reusing it would fail writing its body (a race in the test, not
    // in the server).
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let big = "a".repeat(64 * 1024 + 1);
    let r = http
        .post(format!("{base}/webhooks/twilio/status?attempt={}", uuid::Uuid::new_v4()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("CallStatus={big}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "webhook");
    let r = json_post(&http, format!("{base}/api/events/alert.critical"))
        .header("authorization", format!("Bearer {API_TOKEN}"))
        .body(format!("{{\"payload\": {{\"x\": \"{big}\"}}}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "API");
    // Chunked, without a length: refused as it streams.
    let mut s = tokio::net::TcpStream::connect(app.http_addr.unwrap()).await.unwrap();
    let head = format!(
        "POST /webhooks/twilio/status?attempt={} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n",
        uuid::Uuid::new_v4()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("400\r\n{}\r\n", "a".repeat(1024));
    for _ in 0..80 {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break; // the server may close as soon as it has refused
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut reply = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut reply)).await.expect("an answer").unwrap_or(0);
    let status_line = String::from_utf8_lossy(&reply[..n]).to_string();
    assert!(status_line.starts_with("HTTP/1.1 413"), "chunked webhook body: {status_line:?}");
    // A body that never finishes arriving is cut off by the body read timeout.
    let mut s = tokio::net::TcpStream::connect(app.http_addr.unwrap()).await.unwrap();
    s.write_all(
        b"POST /webhooks/twilio/status?attempt=x HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nCall",
    )
    .await
    .unwrap();
    let t = Instant::now();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await.expect("closed after the body read timeout");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 0);
    app.stop(Duration::from_secs(2)).await;
}

pub async fn webhook_answers_503_within_its_deadline_when_no_connection_is_free() {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let c = crate::escalation::hospital_config("http://127.0.0.1:9", 30.0, 1);
    // The app on a pool of 3 connections and the webhooks' own 4, which the
    // test then holds: no connection is free for the webhook.
    let pool = wardcall::db::connect_pool(db.options.clone(), 3).await.unwrap();
    let database = wardcall::db::Database { pool: pool.clone(), connect_options: db.options.clone(), embedded: None };
    let app = App::start(
        database,
        Arc::new(c),
        StartOptions {
            twilio_auth_token: Some(AUTH_TOKEN.into()),
            http_listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let base = format!("http://{}", app.http_addr.unwrap());
    // Take every connection of the webhooks' own pool (`engine.webhook_pool_size`)
    // and of the engine's (its LISTEN connection may come from it): until
    // none is free for 2 s.
    let mut held = Vec::new();
    for pool in [&app.engine.services.webhook_pool, &pool] {
        while let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), pool.acquire()).await {
            held.push(c);
        }
    }
    assert!(held.len() >= app.engine.config.engine.webhook_pool_size as usize, "{} held", held.len());
    let t = Instant::now();
    let r = signed_status_webhook(&reqwest::Client::new(), &base, uuid::Uuid::new_v4()).send().await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status(), 503, "a webhook that cannot be recorded asks Twilio to retry");
    assert!(took < Duration::from_secs(6), "answered after {took:?}: Twilio's read timeout on wardcall's callbacks is 6 s");
    drop(held);
    // Once a connection is free again, the same webhook is handled.
    let r = signed_status_webhook(&reqwest::Client::new(), &base, uuid::Uuid::new_v4()).send().await.unwrap();
    assert_eq!(r.status(), 404, "unknown attempt, looked up");
    app.stop(Duration::from_secs(2)).await;
    pool.close().await;
}

pub async fn keypress_survives_a_database_outage() {
    let h = hospital(Persona::Answer { ring_ms: 100, think_ms: 6000, digits: "1".into() }, Persona::NoAnswer, 30.0, 1).await;
    let admin = sqlx::PgPool::connect_with(init().admin.clone()).await.unwrap();
    let mut events = h.emulator.subscribe();
    h.db.exec(SEIZURE_INSERT).await;
    // The nurse answers…
    loop {
        match tokio::time::timeout(Duration::from_secs(15), events.recv()).await.expect("the call is answered").unwrap() {
            EmulatorEvent::CallbackSent { kind: CallbackKind::Status { call_status }, .. } if call_status == "in-progress" => break,
            _ => continue,
        }
    }
    // …and while she listens (6 s before she presses), the database stops
    // accepting connections (a restart or a failover), and every open
    // connection is cut.
    let t_outage = Instant::now();
    sqlx::raw_sql(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", h.db.name)).execute(&admin).await.unwrap();
    // A connection still authenticating when the ALTER committed gets in
    // anyway: terminate until none has been seen for three checks in a row.
    let mut quiet = 0;
    let mut left = 0i64;
    while quiet < 3 {
        left = sqlx::query_scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(&h.db.name)
            .fetch_one(&admin)
            .await
            .unwrap();
        quiet = if left == 0 { quiet + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("database outage in place after {:?}; {left} sessions left", t_outage.elapsed());
    // She presses 1: the webhook cannot be recorded and is answered with a 5xx.
    let first = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("the keypress is posted").unwrap() {
            EmulatorEvent::CallbackSent { kind: CallbackKind::Gather { digits }, status, .. } => break (digits, status),
            _ => continue,
        }
    };
    eprintln!("keypress webhook {:?} after {:?}", first, t_outage.elapsed());
    assert_eq!(first.0, "1");
    assert!(first.1.map_or(true, |s| s >= 500), "the unrecorded keypress got {:?}, not a 5xx", first.1);
    // The database is back within a second or two.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::raw_sql(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", h.db.name)).execute(&admin).await.unwrap();
    // Twilio (the emulator) retries the keypress per the callback URL's
    // connection overrides, and the alert is acknowledged.
    await_true(&h.db, "the alert to be acknowledged", Duration::from_secs(20), "SELECT count(*) = 1 FROM wardcall.alerts WHERE status = 'acknowledged'").await;
    let ack_by: Option<String> = sqlx::query_scalar("SELECT acknowledged_by FROM wardcall.alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(ack_by.as_deref(), Some("nurse-avery"));
    let calls = h.emulator.calls();
    assert_eq!(calls.iter().filter(|c| c.to == NURSE_A).count(), 1, "no second call was needed");
    assert_eq!(calls[0].digits_pressed, "1", "the nurse pressed 1 once; the retry carried it");
    admin.close().await;
    h.stop().await;
}
