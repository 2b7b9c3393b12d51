//! The HTTP server: provider webhooks and a small JSON API.
//!
//! **Webhooks.** Each provider serves its own under `/webhooks/<provider>/`
//! ([`crate::providers::webhook_routes`]; Twilio's in
//! `crate::providers::twilio::webhooks`): verified before anything in them is
//! read (403 otherwise, nothing changed), translated into the domain's events
//! and applied by [`crate::notify::acknowledgement`]. A callback that cannot
//! be recorded (database unavailable, or no answer from it within
//! [`WEBHOOK_DEADLINE`]) gets 503, and the provider retries it.
//!
//! **API.** `GET /api/status`, `POST /api/events/{event}` (body
//! `{"payload": {...}, "dedup_key": "..."}`), `POST /api/runs/{id}/signals/{name}`
//! (body: JSON payload), `POST /api/runs/{id}/cancel`, `POST /api/runs/{id}/retry`
//! (a dead letter back to `pending`). Every request needs
//! `Authorization: Bearer <token>` when a token is configured
//! (`WARDCALL_API_TOKEN` or `http.api_token_file`; scheme name
//! case-insensitive, token compared in constant time; 401 otherwise). Every
//! POST needs `Content-Type: application/json` (415 otherwise), so that a
//! browser cannot send one cross-site without a CORS preflight, which is
//! never granted (no CORS headers are ever sent). Without a token the API is
//! served only on `http.api_listen` (a loopback address), never on the public
//! listener. Malformed JSON gets 400/422 with the reason; a NUL character
//! (`\u0000`, which PostgreSQL cannot store in text or jsonb) gets 400; an
//! event no workflow listens to gets 422 naming the known events.
//!
//! **Limits** ([`HttpLimits`], from `[http]`): request headers must arrive
//! within `header_read_timeout_ms` (an idle connection is closed after it too),
//! a body within `body_read_timeout_ms`, bodies above `max_body_bytes` get 413,
//! and connections beyond `max_connections` are closed as soon as they are
//! accepted.
//!
//! `GET /healthz` is served on every listener.

use crate::config::{Config, HttpConfig};
use crate::runtime::Engine;
use crate::store::runs as store;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Environment variable holding the bearer token of the JSON API. Takes
/// precedence over `http.api_token_file`.
pub const API_TOKEN_ENV: &str = "WARDCALL_API_TOKEN";

/// Shortest accepted API token, in characters.
pub const MIN_API_TOKEN_CHARS: usize = 16;

/// How long a webhook may wait for the database before it answers 503 (and
/// Twilio retries, per the callback URL's connection overrides, whose read
/// timeout is longer than this).
pub const WEBHOOK_DEADLINE: Duration = Duration::from_secs(5);

/// The JSON API's bearer token. Never printed (`Debug` shows `<redacted>`).
#[derive(Clone)]
pub struct ApiToken(Arc<str>);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

impl ApiToken {
    /// A token of at least [`MIN_API_TOKEN_CHARS`] characters, without
    /// whitespace or control characters (it travels in an HTTP header).
    ///
    /// Errors: the problem, without the token.
    pub fn new(token: &str) -> Result<ApiToken, String> {
        let token = token.trim();
        if token.chars().count() < MIN_API_TOKEN_CHARS {
            return Err(format!("the API token must be at least {MIN_API_TOKEN_CHARS} characters long"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the API token must be printable ASCII without spaces".into());
        }
        Ok(ApiToken(token.into()))
    }

    /// Compares `given` with the token in time independent of where they
    /// differ and of their lengths (both are hashed with SHA-1 first and the
    /// digests compared byte by byte).
    pub fn matches(&self, given: &str) -> bool {
        use sha1::{Digest, Sha1};
        let a = Sha1::digest(self.0.as_bytes());
        let b = Sha1::digest(given.as_bytes());
        a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Reads an API token file: its first line, trimmed.
///
/// Errors: the file cannot be read, or the token is too short or malformed
/// (the message never contains the token).
pub fn read_token_file(path: &std::path::Path) -> Result<ApiToken, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    ApiToken::new(text.lines().next().unwrap_or(""))
}

/// The API token from `WARDCALL_API_TOKEN` (when set and not empty) or from
/// `http.api_token_file`; `None` when neither is set.
///
/// Errors: the token is too short or malformed, or the file cannot be read.
pub fn api_token_from(config: &HttpConfig) -> anyhow::Result<Option<ApiToken>> {
    if let Ok(t) = std::env::var(API_TOKEN_ENV) {
        if !t.trim().is_empty() {
            return ApiToken::new(&t).map(Some).map_err(|e| anyhow::anyhow!("{API_TOKEN_ENV}: {e}"));
        }
    }
    match &config.api_token_file {
        Some(p) => read_token_file(p).map(Some).map_err(|e| anyhow::anyhow!("http.api_token_file: {e}")),
        None => Ok(None),
    }
}

/// Resource limits of every listener. Durations in milliseconds in the config.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Time for a client to send a request's headers; also how long an idle
    /// (keep-alive or silent) connection is kept.
    pub header_read_timeout: Duration,
    /// Time for a client to send a request's body.
    pub body_read_timeout: Duration,
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
}

impl HttpLimits {
    /// The limits set in `[http]`.
    pub fn from_config(c: &HttpConfig) -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_millis(c.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(c.body_read_timeout_ms),
            max_connections: c.max_connections,
            max_body_bytes: c.max_body_bytes,
        }
    }
}

/// The public listener's routes: `/healthz` and the Twilio webhooks.
pub fn webhook_router(engine: Arc<Engine>) -> Router {
    let webhooks = crate::providers::webhook_routes(&engine.services);
    Router::new().route("/healthz", get(healthz)).with_state(engine).merge(webhooks)
}

/// What the API's own listener (`http.api_listen`) serves: the JSON API and `/healthz`.
pub fn api_listener_router(engine: Arc<Engine>, token: Option<ApiToken>) -> Router {
    api_router(engine.clone(), token).merge(Router::new().route("/healthz", get(healthz)).with_state(engine))
}

/// `GET /healthz`: 200 `{"status":"ok"}` when the engine is healthy, else 503
/// `{"status":"unhealthy","problems":["listener: …","source alerts: trigger … is missing on …"]}`
/// (see [`Engine::health_report`]: listener down, scheduler or dispatcher
/// stalled, a configured source's capture trigger missing or disabled, the
/// database unreachable). Public, like a load balancer's probe; it names no
/// patient data.
async fn healthz(State(engine): State<Arc<Engine>>) -> Response {
    let report = engine.health_report().await;
    if report.healthy {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unhealthy", "problems": report.problems}))).into_response()
    }
}

/// The JSON API (`/api/*`), guarded by `token` when one is given (see the
/// module documentation).
pub fn api_router(engine: Arc<Engine>, token: Option<ApiToken>) -> Router {
    let token = Arc::new(token);
    Router::new()
        .route("/api/status", get(api_status))
        .route("/api/events/{event}", post(api_emit))
        .route("/api/runs/{id}/signals/{name}", post(api_signal))
        .route("/api/runs/{id}/cancel", post(api_cancel))
        .route("/api/runs/{id}/retry", post(api_retry))
        .route_layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move { api_guard(token.as_ref().as_ref(), req, next).await }
        }))
        .with_state(engine)
}

async fn api_guard(token: Option<&ApiToken>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if let Some(expected) = token {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
        if !given.is_some_and(|g| expected.matches(g)) {
            tracing::warn!(path = %req.uri().path(), "API request refused: missing or wrong bearer token");
            let mut r = ApiError(StatusCode::UNAUTHORIZED, "the API needs Authorization: Bearer <token>".into()).into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    if req.method() == Method::POST && !is_json_content_type(req.headers()) {
        return ApiError(StatusCode::UNSUPPORTED_MEDIA_TYPE, "API requests must have Content-Type: application/json".into()).into_response();
    }
    next.run(req).await
}

/// The token of an `Authorization: Bearer <token>` header value. The scheme
/// name is case-insensitive (RFC 9110 §11.1, RFC 6750 §2.1).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim()).filter(|t| !t.is_empty())
}

fn is_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// Binds a TCP listener on `addr`. An IPv6 address (`[::]:8080`) gets a
/// dual-stack socket (`IPV6_V6ONLY` off), so IPv4 clients reach it too.
///
/// Errors: the address is in use or cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Serves `router` on `listener` under `limits` until `shutdown` resolves;
/// then stops accepting and lets each connection finish its request in flight.
///
/// HTTP/1.1 only (what Twilio's webhooks use). Errors only if the listener's
/// address cannot be read; accept errors (file descriptors exhausted, …) are
/// logged and retried after 100 ms.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let local = listener.local_addr()?;
    let router = router
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(limits.body_read_timeout));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut refused = 0u64;
    let mut last_refusal_log: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, listener = %local, "HTTP accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream); // over the cap: closed at once
            refused += 1;
            if last_refusal_log.map_or(true, |t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(listener = %local, max_connections = limits.max_connections, refused, "HTTP connection cap reached; closing new connections");
                last_refusal_log = Some(Instant::now());
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let _permit = permit;
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while connections.join_next().await.is_some() {} }).await;
    connections.abort_all();
    Ok(())
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %crate::capture::db_message(&e), "database error in an HTTP handler");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, "database unavailable".into())
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))
}

/// Where in `value` a NUL character (`\u0000`) is, in a key or a string, as a
/// path like `payload.note` or `payload.items[2]`; `None` if there is none.
/// PostgreSQL cannot store NUL in `text` or `jsonb` (error 22P05), so such
/// input is refused before it reaches the database.
pub fn find_nul(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path.to_string()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| find_nul(v, &format!("{path}[{i}]"))),
        Value::Object(map) => {
            map.iter().find_map(|(k, v)| if k.contains('\0') { Some(format!("{path} (a key)")) } else { find_nul(v, &format!("{path}.{k}")) })
        }
        _ => None,
    }
}

/// Why an event cannot be emitted (API: 400 or 422; `wardcall emit`: exit 1).
#[derive(Debug, thiserror::Error)]
pub enum EventRefusal {
    /// The name or the payload contains a NUL character.
    #[error("{0} contains a NUL character (\\u0000), which PostgreSQL cannot store")]
    Nul(String),
    /// No workflow of the configuration listens to the event.
    #[error("no workflow listens to event '{event}'; known events: {known}")]
    Unknown { event: String, known: String },
}

/// Checks an event before it is written to the outbox: no NUL in `event`,
/// `payload` or `dedup_key`, and a workflow of `config` bound to `event`
/// (otherwise its outbox row would start nothing).
pub fn check_event(config: &Config, event: &str, payload: &Value, dedup_key: Option<&str>) -> Result<(), EventRefusal> {
    if event.contains('\0') {
        return Err(EventRefusal::Nul("the event name".into()));
    }
    if let Some(path) = find_nul(payload, "payload") {
        return Err(EventRefusal::Nul(path));
    }
    if dedup_key.is_some_and(|k| k.contains('\0')) {
        return Err(EventRefusal::Nul("dedup_key".into()));
    }
    if !config.workflows.iter().any(|w| w.event == event) {
        let mut known: Vec<&str> = config.workflows.iter().map(|w| w.event.as_str()).collect();
        known.sort_unstable();
        known.dedup();
        let known = if known.is_empty() { "none (no workflow is configured)".to_string() } else { known.join(", ") };
        return Err(EventRefusal::Unknown { event: event.chars().take(100).collect(), known });
    }
    Ok(())
}

async fn api_status(State(engine): State<Arc<Engine>>) -> Result<Json<Value>, ApiError> {
    let counts = store::status_counts(&engine.db.pool).await?;
    let dead = store::dead_letter_count(&engine.db.pool).await?;
    let newest = store::newest_dead_letters(&engine.db.pool, 5).await?;
    let endpoints = crate::store::outbound::endpoint_stats(&engine.db.pool).await?;
    Ok(Json(json!({"engine_id": engine.engine_id, "runs": counts, "dead_letters": {"count": dead, "newest": newest}, "endpoints": endpoints})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmitBody {
    #[serde(default)]
    payload: Value,
    dedup_key: Option<String>,
}

async fn api_emit(State(engine): State<Arc<Engine>>, Path(event): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    let b: EmitBody = serde_json::from_value(v).map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("invalid body: {e}")))?;
    let payload = if b.payload.is_null() { json!({}) } else { b.payload };
    if !payload.is_object() {
        return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, "payload must be a JSON object".into()));
    }
    match check_event(&engine.config, &event, &payload, b.dedup_key.as_deref()) {
        Ok(()) => {}
        Err(r @ EventRefusal::Nul(_)) => return Err(ApiError(StatusCode::BAD_REQUEST, r.to_string())),
        Err(r @ EventRefusal::Unknown { .. }) => {
            tracing::warn!("API: refused an event that no workflow listens to");
            return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, r.to_string()));
        }
    }
    let id = {
        let mut conn = engine.db.pool.acquire().await?;
        crate::store::outbox::emit(&mut conn, &event, &payload, b.dedup_key.as_deref()).await?
    };
    Ok(match id {
        Some(id) => {
            tracing::info!(event = %event, outbox_id = id, "API: event emitted");
            (StatusCode::ACCEPTED, Json(json!({"outbox_id": id}))).into_response()
        }
        None => {
            tracing::info!(event = %event, "API: event with a repeated dedup key ignored");
            (StatusCode::OK, Json(json!({"duplicate": true}))).into_response()
        }
    })
}

async fn api_signal(State(engine): State<Arc<Engine>>, Path((id, name)): Path<(String, String)>, body: Bytes) -> Result<Response, ApiError> {
    let run: Uuid = id.parse().map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("'{}' is not a run id (UUID)", id.escape_default())))?;
    if name.contains('\0') {
        return Err(ApiError(StatusCode::BAD_REQUEST, "the signal name contains a NUL character (\\u0000), which PostgreSQL cannot store".into()));
    }
    let payload = parse_json(&body)?;
    if let Some(path) = find_nul(&payload, "payload") {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("{path} contains a NUL character (\\u0000), which PostgreSQL cannot store")));
    }
    let mut conn = engine.db.pool.acquire().await?;
    match store::send_signal(&mut conn, run, &name, &payload).await {
        Ok(signal_id) => {
            tracing::info!(run = %run, signal = %name.escape_default(), signal_id, "API: signal sent");
            engine.wake();
            Ok((StatusCode::ACCEPTED, Json(json!({"signal_id": signal_id}))).into_response())
        }
        Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("P0002") => Err(ApiError(StatusCode::NOT_FOUND, format!("no run {run}"))),
        Err(e) => Err(e.into()),
    }
}

async fn api_cancel(State(engine): State<Arc<Engine>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let run: Uuid = id.parse().map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("'{}' is not a run id (UUID)", id.escape_default())))?;
    if crate::workflows::cancel_run(&engine.db.pool, &engine.config, run, "api", "cancelled through the API").await? {
        tracing::info!(run = %run, "API: run cancelled");
        Ok((StatusCode::OK, Json(json!({"cancelled": true}))).into_response())
    } else {
        Err(ApiError(StatusCode::CONFLICT, format!("run {run} is not live (or does not exist)")))
    }
}

/// `POST /api/runs/{id}/retry`: a dead letter (failed run) goes back to
/// `pending` at its failed step ([`crate::runtime::dead_letters::retry`],
/// actor `api`). 200 `{"retried": true, "step": …}`; 404 for no such run;
/// 409 when the run has not failed.
async fn api_retry(State(engine): State<Arc<Engine>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    use crate::store::runs::RetryResult;
    let run: Uuid = id.parse().map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("'{}' is not a run id (UUID)", id.escape_default())))?;
    match crate::runtime::dead_letters::retry(&engine.db.pool, run, "api").await? {
        RetryResult::Retried { step, .. } => {
            engine.wake();
            Ok((StatusCode::OK, Json(json!({"retried": true, "step": step}))).into_response())
        }
        RetryResult::NotFailed { status } => Err(ApiError(StatusCode::CONFLICT, format!("run {run} has not failed (it is {status})"))),
        RetryResult::NotFound => Err(ApiError(StatusCode::NOT_FOUND, format!("no run {run}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER   abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn tokens_match_exactly() {
        let t = ApiToken::new("0123456789abcdef").unwrap();
        assert!(t.matches("0123456789abcdef"));
        assert!(!t.matches("0123456789abcdeF"));
        assert!(!t.matches("0123456789abcdef0"));
        assert!(!t.matches(""));
        assert!(ApiToken::new("short").is_err());
        assert!(ApiToken::new("0123456789 abcdef").is_err());
        assert_eq!(format!("{t:?}"), "ApiToken(<redacted>)");
    }

    #[test]
    fn nul_is_found_with_its_path() {
        let v = json!({"a": [1, {"b": "x\0"}], "c": "ok"});
        assert_eq!(find_nul(&v, "payload").as_deref(), Some("payload.a[1].b"));
        assert_eq!(find_nul(&json!({"k\0": 1}), "payload").as_deref(), Some("payload (a key)"));
        assert_eq!(find_nul(&json!({"a": "b"}), "payload"), None);
    }
}
