//! The HTTP server: provider webhooks and a small JSON API.
//!
//! Twilio webhooks (`/webhooks/twilio/{status,amd,gather}?attempt=<uuid>`) are
//! verified with `X-Twilio-Signature` over the public URL (`http.public_url` +
//! path and query) and the POST parameters before anything in them is read;
//! a missing or wrong signature gets 403 and changes nothing. Handling is
//! idempotent and monotonic: a late or repeated callback never moves an
//! attempt or an alert backwards.
//!
//! API: `GET /healthz`, `GET /api/status`, `POST /api/events/{event}` (body
//! `{"payload": {...}, "dedup_key": "..."}`), `POST /api/runs/{id}/signals/{name}`
//! (body: JSON payload), `POST /api/runs/{id}/cancel`. Malformed JSON gets 400/422
//! with the reason.

use crate::audit::{self, Entity};
use crate::runtime::{store, Engine};
use crate::twilio::{signature, twiml};
use crate::workflows::escalation::{write_back, WriteBackSubject, CALL_UPDATE_SIGNAL};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use uuid::Uuid;

/// Environment variable holding the bearer token of the JSON API.
pub const API_TOKEN_ENV: &str = "WARDCALL_API_TOKEN";

/// Builds the router over an engine. The JSON API (`/api/*`) can emit events
/// (which place real calls) and cancel runs: with `WARDCALL_API_TOKEN` set it
/// requires `Authorization: Bearer <token>`; without it, it answers loopback
/// peers only (403 otherwise). Webhooks are public and verified by signature.
pub fn router(engine: Arc<Engine>) -> Router {
    let token: Arc<Option<String>> = Arc::new(std::env::var(API_TOKEN_ENV).ok().filter(|t| !t.is_empty()));
    let api = Router::new()
        .route("/api/status", get(api_status))
        .route("/api/events/{event}", post(api_emit))
        .route("/api/runs/{id}/signals/{name}", post(api_signal))
        .route("/api/runs/{id}/cancel", post(api_cancel))
        .route_layer(axum::middleware::from_fn(move |peer: axum::extract::ConnectInfo<std::net::SocketAddr>, req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move { api_guard(&token, peer.0, req, next).await }
        }));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(api)
        .route("/webhooks/twilio/{kind}", post(twilio_webhook))
        .with_state(engine)
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

async fn api_guard(token: &Option<String>, peer: std::net::SocketAddr, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let allowed = match token {
        Some(expected) => req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), expected.as_bytes())),
        None => peer.ip().is_loopback(),
    };
    if allowed {
        next.run(req).await
    } else {
        ApiError(StatusCode::FORBIDDEN, format!("the API needs a bearer token ({API_TOKEN_ENV}) or a loopback client")).into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves `router(engine)` on `listener` until `shutdown` resolves.
pub async fn serve(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(engine).into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "database error in an HTTP handler");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, "database unavailable".into())
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))
}

async fn api_status(State(engine): State<Arc<Engine>>) -> Result<Json<Value>, ApiError> {
    let counts = store::status_counts(&engine.db.pool).await?;
    Ok(Json(json!({"engine_id": engine.engine_id, "runs": counts})))
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
    let id: Option<i64> = sqlx::query_scalar("SELECT wardcall.emit($1, $2, $3)")
        .bind(&event)
        .bind(&payload)
        .bind(&b.dedup_key)
        .fetch_one(&engine.db.pool)
        .await?;
    Ok(match id {
        Some(id) => (StatusCode::ACCEPTED, Json(json!({"outbox_id": id}))).into_response(),
        None => (StatusCode::OK, Json(json!({"duplicate": true}))).into_response(),
    })
}

async fn api_signal(State(engine): State<Arc<Engine>>, Path((id, name)): Path<(String, String)>, body: Bytes) -> Result<Response, ApiError> {
    let run: Uuid = id.parse().map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("'{id}' is not a run id (UUID)")))?;
    let payload = parse_json(&body)?;
    let mut conn = engine.db.pool.acquire().await?;
    match store::send_signal(&mut conn, run, &name, &payload).await {
        Ok(signal_id) => {
            engine.wake();
            Ok((StatusCode::ACCEPTED, Json(json!({"signal_id": signal_id}))).into_response())
        }
        Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("P0002") => Err(ApiError(StatusCode::NOT_FOUND, format!("no run {run}"))),
        Err(e) => Err(e.into()),
    }
}

async fn api_cancel(State(engine): State<Arc<Engine>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let run: Uuid = id.parse().map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("'{id}' is not a run id (UUID)")))?;
    if store::cancel_run(&engine.db.pool, run, "api", "cancelled through the API").await? {
        Ok((StatusCode::OK, Json(json!({"cancelled": true}))).into_response())
    } else {
        Err(ApiError(StatusCode::CONFLICT, format!("run {run} is not live (or does not exist)")))
    }
}

#[derive(Deserialize)]
struct AttemptQuery {
    attempt: Option<String>,
}

fn twiml_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
}

/// Rank of a provider call status: updates only ever move forward.
fn status_rank(s: &str) -> i32 {
    match s {
        "intent" => 0,
        "requested" => 1,
        "initiated" => 2,
        "ringing" => 3,
        "in-progress" => 4,
        "completed" | "busy" | "no-answer" | "failed" | "canceled" | "unknown" => 5,
        _ => -1,
    }
}

async fn twilio_webhook(
    State(engine): State<Arc<Engine>>,
    Path(kind): Path<String>,
    Query(q): Query<AttemptQuery>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(twilio) = engine.providers.twilio.as_ref() else {
        return (StatusCode::NOT_FOUND, "Twilio is not configured").into_response();
    };
    // 1. Verify the signature before reading anything.
    let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let url = format!("{}{}", engine.public_url, uri.path_and_query().map(|p| p.as_str()).unwrap_or(uri.path()));
    let sig = headers.get("x-twilio-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
    if sig.is_empty() || !signature::verify_signature(&twilio.auth_token, &url, &params, sig) {
        tracing::warn!(path = %uri.path(), "rejected a Twilio webhook with a missing or wrong signature");
        return (StatusCode::FORBIDDEN, "invalid X-Twilio-Signature").into_response();
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let Some(attempt) = q.attempt.as_deref().and_then(|a| a.parse::<Uuid>().ok()) else {
        return (StatusCode::BAD_REQUEST, "missing or malformed attempt parameter").into_response();
    };
    let result = match kind.as_str() {
        "status" => handle_status(&engine, attempt, get("CallSid"), get("CallStatus").unwrap_or("")).await.map(|_| twiml_response(EMPTY_TWIML.to_string())),
        "amd" => handle_amd(&engine, attempt, get("CallSid"), get("AnsweredBy").unwrap_or("unknown")).await.map(|_| twiml_response(EMPTY_TWIML.to_string())),
        "gather" => handle_gather(&engine, attempt, get("CallSid"), get("Digits").unwrap_or("")).await.map(twiml_response),
        _ => return (StatusCode::NOT_FOUND, "unknown webhook").into_response(),
    };
    match result {
        Ok(r) => r,
        Err(WebhookError::UnknownAttempt) => (StatusCode::NOT_FOUND, "unknown attempt").into_response(),
        Err(WebhookError::Db(e)) => {
            tracing::error!(error = %e, kind = %kind, "webhook could not be recorded; Twilio may retry");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum WebhookError {
    #[error("unknown attempt")]
    UnknownAttempt,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    run_id: Uuid,
    alert_id: Uuid,
    person_id: String,
    status: String,
    provider_id: Option<String>,
    answered_by: Option<String>,
}

/// Opens the webhook transaction: locks the run row first, then the attempt
/// (the lock order the workers use). Records the CallSid if the attempt had none
/// (a call whose create response was lost: the callback names it).
async fn lock_attempt(
    tx: &mut sqlx::PgConnection,
    attempt: Uuid,
    call_sid: Option<&str>,
) -> Result<AttemptRow, WebhookError> {
    let run_id: Option<Uuid> = sqlx::query_scalar("SELECT run_id FROM wardcall.notification_attempts WHERE id = $1")
        .bind(attempt)
        .fetch_optional(&mut *tx)
        .await?;
    let run_id = run_id.ok_or(WebhookError::UnknownAttempt)?;
    sqlx::query("SELECT 1 FROM wardcall.runs WHERE id = $1 FOR UPDATE").bind(run_id).execute(&mut *tx).await?;
    let row: AttemptRow = sqlx::query_as(
        "SELECT run_id, alert_id, person_id, status, provider_id, answered_by FROM wardcall.notification_attempts WHERE id = $1 FOR UPDATE",
    )
    .bind(attempt)
    .fetch_one(&mut *tx)
    .await?;
    if row.provider_id.is_none() {
        if let Some(sid) = call_sid {
            sqlx::query("UPDATE wardcall.notification_attempts SET provider_id = $2 WHERE id = $1 AND provider_id IS NULL")
                .bind(attempt)
                .bind(sid)
                .execute(&mut *tx)
                .await?;
        }
    }
    Ok(row)
}

async fn signal_run(tx: &mut sqlx::PgConnection, run: Uuid, payload: Value) -> Result<(), sqlx::Error> {
    store::send_signal(tx, run, CALL_UPDATE_SIGNAL, &payload).await.map(|_| ())
}

/// The escalation settings of a run's workflow (for its write-back hooks) and
/// the run's input (the event payload, write-back's `$1`).
async fn run_settings_and_input(
    engine: &Engine,
    tx: &mut sqlx::PgConnection,
    run: Uuid,
) -> Result<Option<(crate::config::EscalationWorkflow, Value)>, sqlx::Error> {
    let (workflow, input): (String, Value) = sqlx::query_as("SELECT workflow, input FROM wardcall.runs WHERE id = $1")
        .bind(run)
        .fetch_one(&mut *tx)
        .await?;
    Ok(match engine.config.workflow(&workflow).map(|w| &w.kind) {
        Some(crate::config::WorkflowKind::Escalation(e)) => Some(((**e).clone(), input)),
        _ => None,
    })
}

async fn handle_status(engine: &Arc<Engine>, attempt: Uuid, call_sid: Option<&str>, call_status: &str) -> Result<(), WebhookError> {
    let new_rank = status_rank(call_status);
    let mut tx = engine.db.pool.begin().await?;
    let row = lock_attempt(&mut tx, attempt, call_sid).await?;
    if new_rank <= status_rank(&row.status) || new_rank < 0 {
        tx.commit().await?; // late, repeated or unknown status: nothing moves backwards
        return Ok(());
    }
    let column = match call_status {
        "initiated" => "initiated_at",
        "ringing" => "ringing_at",
        "in-progress" => "answered_at",
        _ => "ended_at",
    };
    sqlx::query(&format!(
        "UPDATE wardcall.notification_attempts SET status = $2, {column} = coalesce({column}, clock_timestamp()),
                updated_at = clock_timestamp() WHERE id = $1"
    ))
    .bind(attempt)
    .bind(call_status)
    .execute(&mut *tx)
    .await?;
    audit::record(&mut tx, Entity::NotificationAttempt, &attempt.to_string(), "attempt.status", Some(&row.status), Some(call_status), "webhook:twilio", json!({"call_sid": call_sid}))
        .await?;
    if let Some((settings, input)) = run_settings_and_input(engine, &mut tx, row.run_id).await? {
        write_back(&mut tx, settings.write_back.on_call_status.as_deref(), "on_call_status", &input, WriteBackSubject::Attempt(attempt), "webhook:twilio").await?;
    }
    signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "status": call_status})).await?;
    tx.commit().await?;
    engine.wake();
    Ok(())
}

async fn handle_amd(engine: &Arc<Engine>, attempt: Uuid, call_sid: Option<&str>, answered_by: &str) -> Result<(), WebhookError> {
    let mut tx = engine.db.pool.begin().await?;
    let row = lock_attempt(&mut tx, attempt, call_sid).await?;
    if row.answered_by.is_some() {
        tx.commit().await?;
        return Ok(());
    }
    sqlx::query("UPDATE wardcall.notification_attempts SET answered_by = $2, updated_at = clock_timestamp() WHERE id = $1")
        .bind(attempt)
        .bind(answered_by)
        .execute(&mut *tx)
        .await?;
    audit::record(&mut tx, Entity::NotificationAttempt, &attempt.to_string(), "attempt.answered_by", None, None, "webhook:twilio", json!({"answered_by": answered_by}))
        .await?;
    signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "answered_by": answered_by})).await?;
    tx.commit().await?;
    engine.wake();
    Ok(())
}

/// Keypad input: 1 acknowledges (a human only), 2 asks to escalate now, any
/// other key replays the message. Returns the TwiML to continue the call with.
async fn handle_gather(engine: &Arc<Engine>, attempt: Uuid, call_sid: Option<&str>, digits: &str) -> Result<String, WebhookError> {
    let mut tx = engine.db.pool.begin().await?;
    let row = lock_attempt(&mut tx, attempt, call_sid).await?;
    let (alert_status, message): (String, String) = sqlx::query_as("SELECT status, message FROM wardcall.alerts WHERE id = $1 FOR UPDATE")
        .bind(row.alert_id)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("UPDATE wardcall.notification_attempts SET digits = coalesce(digits, '') || $2, updated_at = clock_timestamp() WHERE id = $1")
        .bind(attempt)
        .bind(digits)
        .execute(&mut *tx)
        .await?;
    let machine = row.answered_by.as_deref().is_some_and(|a| a.starts_with("machine") || a == "fax");
    let key = digits.chars().next();
    let reply = if machine {
        twiml::say_and_hangup("Goodbye.")
    } else if key == Some('1') {
        // An alert the policy gave up on is still acknowledged by a human's 1.
        if alert_status == "open" || alert_status == "unacknowledged" {
            sqlx::query(
                "UPDATE wardcall.alerts SET status = 'acknowledged', acknowledged_at = clock_timestamp(), acknowledged_by = $2,
                        updated_at = clock_timestamp() WHERE id = $1",
            )
            .bind(row.alert_id)
            .bind(&row.person_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE wardcall.notification_attempts SET acknowledged_at = clock_timestamp(),
                        answered_at = coalesce(answered_at, clock_timestamp()), updated_at = clock_timestamp() WHERE id = $1",
            )
            .bind(attempt)
            .execute(&mut *tx)
            .await?;
            audit::record(&mut tx, Entity::Alert, &row.alert_id.to_string(), "alert.acknowledged", Some(&alert_status), Some("acknowledged"), &format!("person:{}", row.person_id), json!({"attempt": attempt, "channel": "voice", "digits": digits}))
                .await?;
            if let Some((settings, input)) = run_settings_and_input(engine, &mut tx, row.run_id).await? {
                write_back(&mut tx, settings.write_back.on_acknowledged.as_deref(), "on_acknowledged", &input, WriteBackSubject::Attempt(attempt), "webhook:twilio").await?;
            }
            signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "acknowledged": true})).await?;
            tracing::info!(attempt = %attempt, person = %row.person_id, "alert acknowledged by keypress");
            twiml::say_and_hangup("Thank you. The alert is acknowledged. Goodbye.")
        } else if alert_status == "acknowledged" {
            twiml::say_and_hangup("This alert was already acknowledged. Goodbye.")
        } else {
            twiml::say_and_hangup("This alert was cancelled. Goodbye.")
        }
    } else if key == Some('2') && alert_status == "open" {
        sqlx::query("UPDATE wardcall.notification_attempts SET declined_at = coalesce(declined_at, clock_timestamp()), updated_at = clock_timestamp() WHERE id = $1")
            .bind(attempt)
            .execute(&mut *tx)
            .await?;
        audit::record(&mut tx, Entity::NotificationAttempt, &attempt.to_string(), "attempt.declined", None, None, &format!("person:{}", row.person_id), json!({"digits": digits}))
            .await?;
        signal_run(&mut tx, row.run_id, json!({"attempt": attempt, "declined": true})).await?;
        twiml::say_and_hangup("Understood. Escalating to the next person. Goodbye.")
    } else if alert_status == "open" {
        let base = &engine.public_url;
        let gather_timeout = engine.providers.twilio.as_ref().map(|t| t.config.gather_timeout_seconds).unwrap_or(10);
        twiml::say_and_gather(&message, &format!("{base}/webhooks/twilio/gather?attempt={attempt}"), gather_timeout)
    } else if alert_status == "acknowledged" {
        twiml::say_and_hangup("This alert was already acknowledged. Goodbye.")
    } else {
        twiml::say_and_hangup("This alert is no longer open. Goodbye.")
    };
    tx.commit().await?;
    engine.wake();
    Ok(reply)
}

/// An empty TwiML document: the answer to status and AMD callbacks.
const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>";
