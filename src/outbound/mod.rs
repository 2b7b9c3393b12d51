//! Outgoing HTTP requests to the team's endpoints: what an `http` step calls.
//!
//! - [`EndpointConfig`] (`[[endpoints]]`) names a base URL, headers (secrets
//!   from the environment or a file, resolved at start by
//!   [`Endpoints::resolve`], never printable), a timeout and the settings of
//!   its circuit breaker; [`HttpStepConfig`] is what one `http` step says.
//! - [`perform`] sends one rendered [`Request`]: it checks the endpoint's
//!   breaker, commits an intent row (`wardcall.http_requests`) before the
//!   request, sends it with an `Idempotency-Key` header stable per run and
//!   step, records the outcome, the counts and the breaker, and returns an
//!   [`Outcome`].
//! - The **circuit breaker** of each named endpoint lives in PostgreSQL
//!   (`wardcall.http_endpoints`), so every engine shares it: after
//!   `failure_threshold` consecutive failures (transport errors, timeouts, 5xx,
//!   429) it opens for `cooldown_ms`; meanwhile callers get
//!   [`Outcome::BreakerOpen`] and nothing is sent; then exactly one caller (of
//!   all engines) claims the probe with a row lock and a lease, so a crashed
//!   prober does not wedge it; the probe's answer closes the breaker, its
//!   failure re-opens it. Transitions are audited (entity `http_endpoint`)
//!   and logged.
//! - Counts per endpoint (attempts, successes, failures, breaker openings)
//!   are read from the view `wardcall.http_endpoint_stats` ([`store::endpoint_stats`]).
//!
//! Nothing of a request's URL, headers or bodies is logged, audited or kept:
//! they may carry patient data or secrets. Error texts name the endpoint,
//! the status or the transport failure only.
//!
//! The `Idempotency-Key` header follows the IETF draft
//! "The Idempotency-Key HTTP Header Field"
//! (<https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/>).

pub mod config;

pub use config::{check_endpoints, EndpointConfig, HeaderSource, HttpStepConfig, Method, RetryConfig, StatusSet};

use crate::config::ConfigError;
use crate::store::outbound as store;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The header carrying the idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// Largest response body read, in bytes (1 MiB); a larger body is dropped
/// (the outcome keeps `Value::Null`).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// How much longer than the request's timeout a probe's claim lasts before
/// another caller may probe instead (the prober may have crashed).
pub const PROBE_LEASE_MARGIN_MS: i64 = 5000;

/// A secret read at start (a header value). `Debug` prints `<redacted>` and
/// there is no `Display`: it cannot end up in a log line or an error text.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<Arc<str>>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// An endpoint resolved at start: base URL, headers with their secrets, and
/// the breaker's settings. `Debug` shows header names, never their values.
#[derive(Clone)]
pub struct Endpoint {
    /// The `[[endpoints]]` name: the breaker's and the counts' key.
    pub name: String,
    /// The base URL.
    pub url: url::Url,
    /// Timeout of a request unless the step overrides it.
    pub timeout: Duration,
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// Milliseconds an open breaker stays open.
    pub cooldown_ms: i64,
    /// Success statuses unless the step overrides them.
    pub success: StatusSet,
    /// Every configured header; secret values are marked sensitive (their
    /// `Debug` prints `Sensitive`).
    headers: HeaderMap,
    client: reqwest::Client,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("headers", &self.headers.keys().map(|k| k.as_str()).collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("failure_threshold", &self.failure_threshold)
            .field("cooldown_ms", &self.cooldown_ms)
            .finish()
    }
}

impl Endpoint {
    /// The endpoint's URL with `path` (a rendered step path, e.g.
    /// `/tasks/42?x=1`) appended after exactly one `/`. Placeholder values
    /// rendered into a path should be encoded with [`path_segment`].
    ///
    /// Errors: the result is not a URL, or leaves the endpoint (another
    /// scheme, host or port, or outside the base path through `..`).
    pub fn url_for(&self, path: &str) -> Result<url::Url, String> {
        if path.is_empty() {
            return Ok(self.url.clone());
        }
        let text = format!("{}/{}", self.url.as_str().trim_end_matches('/'), path.trim_start_matches('/'));
        let u = url::Url::parse(&text).map_err(|e| format!("endpoint '{}': the rendered path does not make a URL: {e}", self.name))?;
        let base_path = self.url.path().trim_end_matches('/');
        if u.scheme() != self.url.scheme()
            || u.host() != self.url.host()
            || u.port_or_known_default() != self.url.port_or_known_default()
            || !u.path().starts_with(base_path)
        {
            return Err(format!("endpoint '{}': the rendered path leaves the endpoint's URL", self.name));
        }
        Ok(u)
    }
}

/// The resolved endpoints of a config, by name, sharing one HTTP client
/// (rustls, no redirects: a 3xx is an answer, and a redirect must not carry
/// the endpoint's secret headers elsewhere).
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    by_name: HashMap<String, Arc<Endpoint>>,
}

impl Endpoints {
    /// Resolves `endpoints` (`[[endpoints]]` of the config in `file`): reads
    /// each secret header from its environment variable or file.
    ///
    /// Errors: a [`ConfigError`] naming the file, the key
    /// (`endpoints[0].headers.Authorization`) and the variable or file that
    /// is unset, empty or unreadable — never a value.
    pub fn resolve(endpoints: &[EndpointConfig], file: &str) -> Result<Endpoints, ConfigError> {
        Self::resolve_with(endpoints, file, &|var| std::env::var(var).ok())
    }

    /// [`Endpoints::resolve`] with `env` instead of the process environment (tests).
    pub fn resolve_with(endpoints: &[EndpointConfig], file: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Endpoints, ConfigError> {
        let err = |key: String, problem: String| ConfigError { file: file.into(), key, problem };
        if endpoints.is_empty() {
            return Ok(Endpoints::default());
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("wardcall/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| err("endpoints".into(), format!("cannot build the HTTP client: {e}")))?;
        let mut by_name = HashMap::new();
        for (i, e) in endpoints.iter().enumerate() {
            let url = url::Url::parse(&e.url).map_err(|p| err(format!("endpoints[{i}].url"), p.to_string()))?;
            let mut headers = HeaderMap::new();
            for (name, source) in &e.headers {
                let key = format!("endpoints[{i}].headers.{name}");
                let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| err(key.clone(), "is not a valid HTTP header name".into()))?;
                let (text, secret) = match source {
                    HeaderSource::Literal(v) => (v.clone(), false),
                    HeaderSource::Env(var) => match env(var) {
                        Some(v) if !v.trim().is_empty() => (v.trim().to_string(), true),
                        Some(_) => return Err(err(key, format!("the environment variable {var} is empty"))),
                        None => {
                            return Err(err(key, format!("the environment variable {var} is not set (header secrets come from the environment or a file)")))
                        }
                    },
                    HeaderSource::File(path) => {
                        let text = std::fs::read_to_string(path).map_err(|e| err(key.clone(), format!("cannot read {}: {}", path.display(), e.kind())))?;
                        let first = text.lines().next().unwrap_or("").trim().to_string();
                        if first.is_empty() {
                            return Err(err(key, format!("{} is empty", path.display())));
                        }
                        (first, true)
                    }
                };
                let secret_text = Secret::new(text);
                let mut value = HeaderValue::from_str(secret_text.expose())
                    .map_err(|_| err(key, "the value is not a valid HTTP header value (visible ASCII, no line breaks)".into()))?;
                value.set_sensitive(secret);
                headers.insert(header, value);
            }
            by_name.insert(
                e.name.clone(),
                Arc::new(Endpoint {
                    name: e.name.clone(),
                    url,
                    timeout: Duration::from_millis(e.timeout_ms),
                    failure_threshold: e.failure_threshold,
                    cooldown_ms: e.cooldown_ms as i64,
                    success: e.success.clone(),
                    headers,
                    client: client.clone(),
                }),
            );
        }
        Ok(Endpoints { by_name })
    }

    /// The endpoint named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.by_name.get(name)
    }
}

/// A rendered request, ready for [`perform`].
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    /// The full URL ([`Endpoint::url_for`]).
    pub url: url::Url,
    /// Extra headers (not secrets: they are not marked sensitive). The
    /// endpoint's headers and `Idempotency-Key` are added by [`perform`].
    pub headers: Vec<(String, String)>,
    /// The JSON body (sent with `Content-Type: application/json`), if any.
    pub body: Option<Value>,
    /// Overrides the endpoint's timeout.
    pub timeout_ms: Option<u64>,
    /// Overrides the endpoint's success statuses.
    pub success: Option<StatusSet>,
}

impl Request {
    /// The request a step describes, from its rendered `path` and `body`.
    ///
    /// Errors: the path leaves the endpoint or makes no URL ([`Endpoint::url_for`]).
    pub fn new(endpoint: &Endpoint, step: &HttpStepConfig, rendered_path: &str, rendered_body: Option<Value>) -> Result<Request, String> {
        Ok(Request {
            method: step.method,
            url: endpoint.url_for(rendered_path)?,
            headers: Vec::new(),
            body: rendered_body,
            timeout_ms: step.timeout_ms,
            success: step.success.clone(),
        })
    }
}

/// Who sends a request: the run, the step and the attempt, and the
/// idempotency key (stable per run and step: [`idempotency_key`]).
#[derive(Debug, Clone)]
pub struct RequestKey<'a> {
    /// The run (`None` outside a run, e.g. a tool).
    pub run_id: Option<Uuid>,
    /// The step's key within the run's workflow.
    pub step: &'a str,
    /// 1 for the first try; the runtime's `step_attempt + 1`.
    pub attempt: i32,
    /// Sent as `Idempotency-Key`: the same on every attempt of the step.
    pub idempotency_key: &'a str,
}

/// The idempotency key of `step` in `run`: `<run id>.<step, percent-encoded>`,
/// the same on every attempt and after a crash, different for every step
/// and run, and a valid header value.
pub fn idempotency_key(run_id: Uuid, step: &str) -> String {
    let step: String = url::form_urlencoded::byte_serialize(step.as_bytes()).collect();
    format!("{run_id}.{step}")
}

/// `value` as one URL path segment: every byte but the unreserved characters
/// of RFC 3986 §2.3 (`A-Z a-z 0-9 - . _ ~`) percent-encoded, so that a value
/// rendered into a step's `path` can neither add a segment (`/`), a query
/// (`?`), a fragment (`#`) nor climb: `.` and `..` as a whole value are
/// encoded as `%2E` and `%2E%2E`, which URL parsers treat as dot segments
/// too, so [`Endpoint::url_for`] still refuses a path that leaves the endpoint.
pub fn path_segment(value: &str) -> String {
    if value == "." || value == ".." {
        return "%2E".repeat(value.len());
    }
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What [`perform`] reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A success status; `body` is the parsed JSON response, or `Null` when
    /// it is empty, not JSON or over [`MAX_RESPONSE_BYTES`].
    Success { status: u16, body: Value },
    /// Sent, and it failed. `retryable`: a transport error, a timeout, 5xx or
    /// 429 (these also count for the breaker); other statuses are not
    /// retryable and do not count. `status` when an answer came;
    /// `retry_after_ms` from a `Retry-After: <seconds>` header of a 429/503.
    /// `error` names the endpoint and the status or the transport failure,
    /// never a URL, a header or a body.
    Failed { error: String, retryable: bool, status: Option<u16>, retry_after_ms: Option<i64> },
    /// The endpoint's breaker is open (or another caller is probing it):
    /// nothing was sent and nothing recorded. Ask again in `retry_in_ms`.
    BreakerOpen { retry_in_ms: i64 },
}

/// Sends `request` to `endpoint` once, under the endpoint's breaker.
///
/// 1. Admission: a closed breaker admits at once (one statement that records
///    the intent and counts the attempt); an open one returns
///    [`Outcome::BreakerOpen`] without sending or recording anything; at the
///    end of the cool-down one caller (of all engines) claims the probe.
/// 2. The intent row (`wardcall.http_requests`: run, step, attempt, endpoint,
///    method, idempotency key, engine) is committed before the request.
/// 3. The request: `method` to `request.url` with the endpoint's headers,
///    `request.headers`, `Idempotency-Key: <key.idempotency_key>`, the JSON
///    body, within `request.timeout_ms` (else the endpoint's timeout), no
///    redirects followed.
/// 4. The outcome, latency, counts and breaker are recorded
///    ([`store::record_outcome`]; transitions audited with actor
///    `engine:<engine_id>` and logged). A failure to record the outcome is
///    logged and the outcome still returned: the request was sent, and the
///    idempotency key covers a repetition.
///
/// Each database statement is bounded by `database_deadline`
/// (`engine.database_deadline_ms`, [`crate::db::deadline::within_on`]):
/// after a hard failover a half-open connection fails the admission (the
/// step is retried) or the outcome's record (logged, as above) instead of
/// holding the step for the kernel's retransmission timeout.
///
/// Errors: only a database error before anything was sent (admission or the
/// intent): the caller retries the step as for any database error.
pub async fn perform(
    pool: &PgPool,
    database_deadline: Duration,
    endpoint: &Endpoint,
    request: &Request,
    key: &RequestKey<'_>,
    engine_id: &str,
) -> Result<Outcome, sqlx::Error> {
    use crate::db::deadline::within_on;
    let actor = format!("engine:{engine_id}");
    let timeout = request.timeout_ms.map(Duration::from_millis).unwrap_or(endpoint.timeout);
    let intent = store::Intent {
        id: Uuid::new_v4(),
        run_id: key.run_id,
        step: key.step,
        attempt: key.attempt,
        endpoint: &endpoint.name,
        method: request.method.as_str(),
        idempotency_key: key.idempotency_key,
        engine: engine_id,
    };
    let mut probe = false;
    let mut admitted = false;
    // The breaker may close between the fast look and the claim: look again.
    for _ in 0..3 {
        if within_on(pool, database_deadline, store::record_intent_if_closed(pool, &intent)).await? {
            admitted = true;
            break;
        }
        match within_on(pool, database_deadline, store::claim_probe(pool, &intent, timeout.as_millis() as i64 + PROBE_LEASE_MARGIN_MS, &actor)).await? {
            store::Admission::Closed => continue,
            store::Admission::Probe => {
                tracing::info!(endpoint = %endpoint.name, request = %intent.id, "circuit breaker half-open: sending the probe request");
                probe = true;
                admitted = true;
                break;
            }
            store::Admission::Refused { retry_in_ms } => return Ok(Outcome::BreakerOpen { retry_in_ms: retry_in_ms.max(1) }),
        }
    }
    if !admitted {
        return Ok(Outcome::BreakerOpen { retry_in_ms: 100 });
    }

    let started = Instant::now();
    let mut builder = endpoint.client.request(request.method.to_reqwest(), request.url.clone()).timeout(timeout).headers(endpoint.headers.clone());
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder = builder.header(IDEMPOTENCY_HEADER, key.idempotency_key);
    if let Some(body) = &request.body {
        builder = builder.json(body);
    }
    let success = request.success.as_ref().unwrap_or(&endpoint.success);
    let sent = builder.send().await;
    let (outcome, breaker_failure) = match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            if success.contains(status) {
                let body = read_json(response, started, timeout).await;
                (Outcome::Success { status, body }, false)
            } else {
                let retryable = status == 429 || (500..=599).contains(&status);
                let retry_after_ms = if retryable { retry_after_ms(response.headers()) } else { None };
                let reason = reqwest::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
                let error = format!("endpoint '{}' answered HTTP {status} {reason}", endpoint.name).trim_end().to_string();
                (Outcome::Failed { error, retryable, status: Some(status), retry_after_ms }, retryable)
            }
        }
        Err(e) => (Outcome::Failed { error: transport_error(&endpoint.name, &e, timeout), retryable: true, status: None, retry_after_ms: None }, true),
    };
    let latency_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
    let (ok, status, error, retryable) = match &outcome {
        Outcome::Success { status, .. } => (true, Some(*status), None, false),
        Outcome::Failed { error, retryable, status, .. } => (false, *status, Some(error.as_str()), *retryable),
        Outcome::BreakerOpen { .. } => unreachable!("a sent request has an answer or an error"),
    };
    let finished = store::Finished {
        id: intent.id,
        endpoint: &endpoint.name,
        probe,
        success: ok,
        retryable,
        breaker_failure,
        status,
        latency_ms,
        error,
        failure_threshold: endpoint.failure_threshold,
        cooldown_ms: endpoint.cooldown_ms,
    };
    match within_on(pool, database_deadline, store::record_outcome(pool, &finished, &actor)).await {
        Ok(Some(store::BreakerChange::Opened { consecutive_failures })) => tracing::warn!(
            endpoint = %endpoint.name, consecutive_failures, cooldown_ms = endpoint.cooldown_ms,
            "circuit breaker opened: requests to this endpoint wait for the cool-down"
        ),
        Ok(Some(store::BreakerChange::Reopened)) => {
            tracing::warn!(endpoint = %endpoint.name, cooldown_ms = endpoint.cooldown_ms, "circuit breaker re-opened: the probe request failed")
        }
        Ok(Some(store::BreakerChange::Closed)) => tracing::info!(endpoint = %endpoint.name, "circuit breaker closed: the probe request was answered"),
        Ok(None) => {}
        Err(e) => tracing::error!(endpoint = %endpoint.name, request = %intent.id, error = %crate::capture::db_message(&e),
            "could not record an HTTP request's outcome (the request was sent; its intent row stays)"),
    }
    tracing::debug!(endpoint = %endpoint.name, request = %intent.id, status = ?status, latency_ms, ok, "HTTP request finished");
    Ok(outcome)
}

/// Reads a success response's body as JSON within what is left of the
/// timeout: `Null` when it is empty, not JSON, too large or too slow.
async fn read_json(mut response: reqwest::Response, started: Instant, timeout: Duration) -> Value {
    let read = async {
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.ok()? {
            if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return None;
            }
            bytes.extend_from_slice(&chunk);
        }
        Some(bytes)
    };
    let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(100));
    match tokio::time::timeout(left, read).await {
        Ok(Some(bytes)) if !bytes.is_empty() => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// `Retry-After` in its delay-seconds form (RFC 9110 §10.2.3), in milliseconds, at most a day.
fn retry_after_ms(headers: &HeaderMap) -> Option<i64> {
    let secs: i64 = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    (0..=86_400).contains(&secs).then_some(secs * 1000)
}

/// A transport failure's text without the URL (reqwest's `Display` names it,
/// and it may carry patient data): the endpoint's name, then the causes.
fn transport_error(endpoint: &str, e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("endpoint '{endpoint}': no response within {} ms", timeout.as_millis());
    }
    let mut text = format!("endpoint '{endpoint}': request failed");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let c = cause.to_string();
        if !c.is_empty() && !text.ends_with(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}

/// What an `http` step does with an [`Outcome`] (see [`decide`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The request succeeded: go on (keep `status`/`body` as the step's result).
    Done { status: u16, body: Value },
    /// A retryable failure with attempts left: run the step again in
    /// `delay_ms`, counting this attempt.
    Retry { delay_ms: i64, error: String },
    /// The breaker is open: run the step again in `delay_ms` *without*
    /// counting an attempt (nothing was sent).
    WaitForBreaker { delay_ms: i64 },
    /// A non-retryable failure, or the last attempt failed: the run fails
    /// with `error` (a dead letter; `on_failure` runs).
    Fail { error: String },
}

/// The runtime contract of an `http` step: maps the outcome of attempt
/// number `attempt` (1 = the first request) to what the step does next.
/// A retryable failure waits [`backoff_ms`]`(retry, attempt)`, or the
/// endpoint's `Retry-After` when that is longer (capped at `retry.max_ms`),
/// while `attempt < retry.max_attempts`; then the run fails. A non-retryable
/// failure fails at once. An open breaker waits its `retry_in_ms` and costs
/// no attempt.
pub fn decide(outcome: Outcome, retry: &RetryConfig, attempt: i32) -> Decision {
    match outcome {
        Outcome::Success { status, body } => Decision::Done { status, body },
        Outcome::BreakerOpen { retry_in_ms } => Decision::WaitForBreaker { delay_ms: retry_in_ms.max(1) },
        Outcome::Failed { error, retryable: true, retry_after_ms, .. } if (attempt.max(1) as u32) < retry.max_attempts => {
            let after = retry_after_ms.unwrap_or(0).min(retry.max_ms.min(i64::MAX as u64) as i64);
            Decision::Retry { delay_ms: backoff_ms(retry, attempt).max(after), error }
        }
        Outcome::Failed { error, retryable: true, .. } => Decision::Fail { error: format!("{error} (after {} attempts)", attempt.max(1)) },
        Outcome::Failed { error, .. } => Decision::Fail { error },
    }
}

/// The delay before attempt `attempt + 1` after `attempt` failed attempts
/// (1 = after the first), in milliseconds: `base_ms × 2^(attempt-1)` capped
/// at `max_ms`, then "equal jitter": half of it fixed, half uniformly random
/// (so concurrent runs spread out, and a delay is never below half the
/// schedule). Attempts below 1 count as 1.
pub fn backoff_ms(retry: &RetryConfig, attempt: i32) -> i64 {
    let exp = (attempt.max(1) - 1).min(40) as u32;
    let raw = retry.base_ms.saturating_mul(1u64.checked_shl(exp).unwrap_or(u64::MAX)).min(retry.max_ms);
    let half = raw / 2;
    let jitter = if raw - half > 0 { rand::random_range(0..=raw - half) } else { 0 };
    (half + jitter).min(i64::MAX as u64) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_bounds() {
        let r = RetryConfig { max_attempts: 10, base_ms: 100, max_ms: 1000 };
        for _ in 0..200 {
            let a = backoff_ms(&r, 1);
            assert!((50..=100).contains(&a), "{a}");
            let b = backoff_ms(&r, 3);
            assert!((200..=400).contains(&b), "{b}");
            let c = backoff_ms(&r, 30);
            assert!((500..=1000).contains(&c), "{c}");
            assert!((50..=100).contains(&backoff_ms(&r, 0)));
        }
        let big = RetryConfig { max_attempts: 10, base_ms: 3_600_000, max_ms: 86_400_000 };
        assert!(backoff_ms(&big, i32::MAX) <= 86_400_000);
    }

    #[test]
    fn decisions_follow_the_contract() {
        let r = RetryConfig { max_attempts: 3, base_ms: 100, max_ms: 5000 };
        let failed = |retryable, retry_after_ms| Outcome::Failed { error: "e".into(), retryable, status: Some(503), retry_after_ms };
        assert!(matches!(decide(failed(true, None), &r, 1), Decision::Retry { delay_ms, .. } if (50..=100).contains(&delay_ms)));
        assert!(matches!(decide(failed(true, Some(2000)), &r, 2), Decision::Retry { delay_ms: 2000, .. }));
        assert!(matches!(decide(failed(true, Some(90_000)), &r, 2), Decision::Retry { delay_ms: 5000, .. }));
        assert!(matches!(decide(failed(true, None), &r, 3), Decision::Fail { error } if error.contains("after 3 attempts")));
        assert_eq!(decide(failed(false, None), &r, 1), Decision::Fail { error: "e".into() });
        assert_eq!(decide(Outcome::BreakerOpen { retry_in_ms: 700 }, &r, 3), Decision::WaitForBreaker { delay_ms: 700 });
        assert_eq!(decide(Outcome::Success { status: 200, body: Value::Null }, &r, 1), Decision::Done { status: 200, body: Value::Null });
    }

    #[test]
    fn idempotency_keys_are_stable_distinct_and_header_safe() {
        let run = Uuid::new_v4();
        assert_eq!(idempotency_key(run, "notify"), idempotency_key(run, "notify"));
        assert_ne!(idempotency_key(run, "a b"), idempotency_key(run, "a+b"));
        assert!(HeaderValue::from_str(&idempotency_key(run, "ünïcode\nstep")).is_ok());
    }

    fn endpoint_config(headers: &str) -> Vec<EndpointConfig> {
        #[derive(serde::Deserialize)]
        struct W {
            endpoints: Vec<EndpointConfig>,
        }
        toml::from_str::<W>(&format!("[[endpoints]]\nname = \"tasks\"\nurl = \"http://127.0.0.1:9/api/\"\nheaders = {{ {headers} }}\n")).unwrap().endpoints
    }

    #[test]
    fn secrets_are_resolved_and_never_printed() {
        let eps = endpoint_config("Authorization = { env = \"TASKS_TOKEN\" }, \"X-Source\" = \"wardcall\"");
        let e = Endpoints::resolve_with(&eps, "x.toml", &|v| (v == "TASKS_TOKEN").then(|| "Bearer s3cr3t-value".to_string())).unwrap();
        let ep = e.get("tasks").unwrap();
        assert_eq!(ep.headers["authorization"].to_str().unwrap(), "Bearer s3cr3t-value");
        assert!(ep.headers["authorization"].is_sensitive());
        assert!(!format!("{ep:?} {e:?}").contains("s3cr3t"));
        assert_eq!(format!("{:?}", Secret::new("s3cr3t")), "Secret(<redacted>)");
        let missing = Endpoints::resolve_with(&eps, "x.toml", &|_| None).unwrap_err().to_string();
        assert!(missing.contains("x.toml") && missing.contains("endpoints[0].headers.Authorization") && missing.contains("TASKS_TOKEN"), "{missing}");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(path_segment("booking-17_a.b~"), "booking-17_a.b~");
        assert_eq!(path_segment("a/b?c#d e"), "a%2Fb%3Fc%23d%20e");
        assert_eq!(path_segment("é"), "%C3%A9");
    }

    #[test]
    fn paths_stay_under_the_endpoint() {
        let e = Endpoints::resolve_with(&endpoint_config(""), "x.toml", &|_| None).unwrap();
        let ep = e.get("tasks").unwrap();
        assert_eq!(ep.url_for("/tasks/42").unwrap().as_str(), "http://127.0.0.1:9/api/tasks/42");
        assert_eq!(ep.url_for("tasks?x=1").unwrap().as_str(), "http://127.0.0.1:9/api/tasks?x=1");
        assert_eq!(ep.url_for("").unwrap().as_str(), "http://127.0.0.1:9/api/");
        assert!(ep.url_for("/../admin").is_err());
        assert!(ep.url_for("@evil.example/x").is_err() || ep.url_for("@evil.example/x").unwrap().host_str() == Some("127.0.0.1"));
    }
}
