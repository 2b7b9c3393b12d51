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

use crate::runtime::{store, Engine};
use crate::twilio::signature;
use crate::workflows::call_events::{self, CallEventError, Delivery};
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
    if crate::workflows::cancel_run(&engine.db.pool, &engine.config, run, "api", "cancelled through the API").await? {
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

/// Twilio's webhooks: verified, parsed, and handed to
/// [`crate::workflows::call_events`], where their meaning lives.
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
    let delivery = Delivery {
        provider: "twilio",
        idempotency_token: headers.get("i-twilio-idempotency-token").and_then(|v| v.to_str().ok()).filter(|t| !t.is_empty()),
    };
    let actor = "webhook:twilio";
    let result = match kind.as_str() {
        "status" => call_events::apply_status(&engine, delivery, attempt, get("CallSid"), get("CallStatus").unwrap_or(""), get("AnsweredBy"), actor)
            .await
            .map(|_| twiml_response(EMPTY_TWIML.to_string())),
        "amd" => call_events::apply_amd(&engine, delivery, attempt, get("CallSid"), get("AnsweredBy").unwrap_or("unknown"), actor)
            .await
            .map(|_| twiml_response(EMPTY_TWIML.to_string())),
        "gather" => call_events::apply_keypress(&engine, delivery, attempt, get("CallSid"), get("Digits").unwrap_or("")).await.map(twiml_response),
        _ => return (StatusCode::NOT_FOUND, "unknown webhook").into_response(),
    };
    match result {
        Ok(r) => r,
        Err(CallEventError::UnknownAttempt) => (StatusCode::NOT_FOUND, "unknown attempt").into_response(),
        Err(CallEventError::Db(e)) => {
            tracing::error!(error = %crate::capture::db_message(&e), kind = %kind, "webhook could not be recorded; Twilio may retry");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

/// An empty TwiML document: the answer to status and AMD callbacks.
const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>";
