//! Twilio's webhooks, by its published contract: call-progress status
//! callbacks (`/webhooks/twilio/status`), the asynchronous answering-machine
//! verdict (`amd`), `<Gather>` keypad input (`gather`), message status
//! callbacks (`sms-status`), each with `?attempt=<uuid>`, and inbound text
//! messages (`sms`, the number's "A message comes in" webhook).
//!
//! Every request is verified with `X-Twilio-Signature` (HMAC-SHA1 over the
//! public URL and the sorted POST parameters,
//! <https://www.twilio.com/docs/usage/webhooks/webhooks-security>) before
//! anything in it is read: a missing or wrong signature gets 403 and changes
//! nothing. The URL is `http.public_url` + path and query, with or without
//! the connection-override fragment wardcall put on it
//! ([`super::callback`]). A verified request is translated into the domain's
//! events ([`crate::notify::acknowledgement`], where their meaning lives) and
//! the answer rendered as TwiML. Handling is idempotent (Twilio's
//! `I-Twilio-Idempotency-Token`) and monotonic. A callback that cannot be
//! recorded within [`WEBHOOK_DEADLINE`] gets 503, and Twilio retries it.

use super::callback::signed_url_candidates;
use super::{signature, twiml};
use crate::http::WEBHOOK_DEADLINE;
use crate::notify::acknowledgement::{self, CallEventError, Delivery, KeypressReply};
use crate::runtime::Services;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use uuid::Uuid;

/// Twilio's routes (`POST /webhooks/twilio/{kind}`), for
/// [`crate::providers::webhook_routes`].
pub fn routes(services: &Services) -> Router {
    Router::new().route("/webhooks/twilio/{kind}", post(webhook)).with_state(services.clone())
}

/// The TwiML that answers a keypress: a short spoken answer and a hang-up,
/// or the alert read again with a new `<Gather>` (a webhook's TwiML may be
/// 64 kB, Twilio error 11750: the message fits).
pub fn keypress_twiml(services: &Services, attempt: Uuid, reply: &KeypressReply) -> String {
    match reply {
        KeypressReply::Acknowledged => twiml::say_and_hangup("Thank you. The alert is acknowledged. Goodbye."),
        KeypressReply::AlreadyAcknowledged => twiml::say_and_hangup("This alert was already acknowledged. Goodbye."),
        KeypressReply::Cancelled => twiml::say_and_hangup("This alert was cancelled. Goodbye."),
        KeypressReply::NoLongerOpen => twiml::say_and_hangup("This alert is no longer open. Goodbye."),
        KeypressReply::Declined => twiml::say_and_hangup("Understood. Escalating to the next person. Goodbye."),
        KeypressReply::Goodbye => twiml::say_and_hangup("Goodbye."),
        KeypressReply::ReadAgain { message } => {
            let gather_timeout = services.providers.twilio.as_ref().map(|t| t.config.gather_timeout_seconds).unwrap_or(10);
            let action = super::callback_url(&services.public_url, "gather", attempt);
            // (An alert whose message is not written yet reads the fallback.)
            let message = if message.is_empty() { twiml::FALLBACK_MESSAGE } else { message.as_str() };
            twiml::say_and_gather_within(message, &action, gather_timeout, 60_000)
                .unwrap_or_else(|| twiml::say_and_gather(twiml::FALLBACK_MESSAGE, &action, gather_timeout))
        }
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
/// [`crate::notify::acknowledgement`], where their meaning lives.
async fn webhook(
    State(services): State<Services>,
    Path(kind): Path<String>,
    Query(q): Query<AttemptQuery>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(twilio) = services.providers.twilio.as_ref() else {
        return (StatusCode::NOT_FOUND, "Twilio is not configured").into_response();
    };
    // 1. Verify the signature before reading anything. The fragment of the
    //    callback URL (connection overrides) never reaches the server; the
    //    signature may cover it (see crate::providers::twilio::callback).
    let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let url = format!("{}{}", services.public_url, uri.path_and_query().map(|p| p.as_str()).unwrap_or(uri.path()));
    let sig = headers.get("x-twilio-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
    let valid = signed_url_candidates(&url).iter().fold(false, |ok, candidate| ok | signature::verify_signature(&twilio.auth_token, candidate, &params, sig));
    if sig.is_empty() || !valid {
        tracing::warn!(path = %uri.path(), "rejected a Twilio webhook with a missing or wrong signature");
        return (StatusCode::FORBIDDEN, "invalid X-Twilio-Signature").into_response();
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if kind == "sms" {
        return inbound_message(&services, get("From").unwrap_or(""), get("MessageSid").unwrap_or(""), get("Body").unwrap_or("")).await;
    }
    let Some(attempt) = q.attempt.as_deref().and_then(|a| a.parse::<Uuid>().ok()) else {
        return (StatusCode::BAD_REQUEST, "missing or malformed attempt parameter").into_response();
    };
    let delivery = Delivery {
        provider: "twilio",
        idempotency_token: headers.get("i-twilio-idempotency-token").and_then(|v| v.to_str().ok()).filter(|t| !t.is_empty()),
        webhook: true,
    };
    let actor = "webhook:twilio";
    let handled = async {
        match kind.as_str() {
            "status" => acknowledgement::apply_status(&services, delivery, attempt, get("CallSid"), get("CallStatus").unwrap_or(""), get("AnsweredBy"), actor)
                .await
                .map(|_| Some(twiml_response(EMPTY_TWIML.to_string()))),
            "amd" => acknowledgement::apply_amd(&services, delivery, attempt, get("CallSid"), get("AnsweredBy").unwrap_or("unknown"), actor)
                .await
                .map(|_| Some(twiml_response(EMPTY_TWIML.to_string()))),
            "sms-status" => acknowledgement::apply_message_status(
                &services,
                delivery,
                attempt,
                get("MessageSid").or(get("SmsSid")),
                get("MessageStatus").or(get("SmsStatus")).unwrap_or(""),
                get("ErrorCode"),
                actor,
            )
            .await
            .map(|_| Some(twiml_response(EMPTY_TWIML.to_string()))),
            "gather" => acknowledgement::apply_keypress(&services, delivery, attempt, get("CallSid"), get("Digits").unwrap_or(""))
                .await
                .map(|reply| Some(twiml_response(keypress_twiml(&services, attempt, &reply)))),
            _ => Ok(None),
        }
    };
    // A webhook that cannot be recorded in time is answered 503 (its
    // transaction, if any, is rolled back when the future is dropped), and
    // Twilio retries it as the callback URL's connection overrides ask.
    // (`within_on` marks the webhooks' pool suspect before the handler's
    // connections are dropped, so that one left half-open by a failover is
    // closed, not waited on: `crate::db::deadline`.)
    let reason = match crate::db::deadline::within_on(&services.pool, WEBHOOK_DEADLINE, handled).await {
        Ok(Some(r)) => return r,
        Ok(None) => return (StatusCode::NOT_FOUND, "unknown webhook").into_response(),
        Err(CallEventError::UnknownAttempt) => return (StatusCode::NOT_FOUND, "unknown attempt").into_response(),
        Err(CallEventError::Db(e)) => crate::capture::db_message(&e),
    };
    tracing::error!(error = %reason, kind = %kind, attempt = %attempt,
        "Twilio webhook not recorded: answering 503; Twilio retries it as the callback URL's connection overrides ask (up to 5 times within 15 s)");
    (StatusCode::SERVICE_UNAVAILABLE, "database unavailable; retry").into_response()
}

/// An inbound text message (Twilio's "A message comes in" webhook, already
/// verified): handed to [`acknowledgement::apply_reply`]. Answers an empty TwiML
/// document (no reply text is sent), 400 without `From`/`MessageSid`, 503 when
/// it cannot be recorded in time (Twilio retries).
async fn inbound_message(services: &Services, from: &str, message_sid: &str, body: &str) -> Response {
    if from.is_empty() || message_sid.is_empty() {
        return (StatusCode::BAD_REQUEST, "missing From or MessageSid").into_response();
    }
    let reason = match crate::db::deadline::within_on(
        &services.pool,
        WEBHOOK_DEADLINE,
        acknowledgement::apply_reply(
            services,
            // Inbound messages are replayed by their MessageSid (they carry no idempotency token).
            Delivery { provider: "twilio-sms", idempotency_token: Some(message_sid), webhook: true },
            from,
            body,
            super::messages::is_reserved_keyword(body),
            "webhook:twilio",
        ),
    )
    .await
    {
        Ok(outcome) => {
            tracing::info!(?outcome, "inbound text message handled");
            return twiml_response(EMPTY_TWIML.to_string());
        }
        Err(CallEventError::UnknownAttempt) => return twiml_response(EMPTY_TWIML.to_string()),
        Err(CallEventError::Db(e)) => crate::capture::db_message(&e),
    };
    tracing::error!(error = %reason, "inbound text message not recorded: answering 503 so that Twilio retries it");
    (StatusCode::SERVICE_UNAVAILABLE, "database unavailable; retry").into_response()
}

/// An empty TwiML document: the answer to status and AMD callbacks.
const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>";
