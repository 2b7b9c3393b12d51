//! The emulator's Messages API: Twilio's Message resource contract
//! (<https://www.twilio.com/docs/messaging/api/message-resource>) from
//! Twilio's side.
//!
//! - `POST …/Messages.json` (create): `To`, `From` (E.164), `Body` (1 to
//!   1,600 characters, else 400/21617; empty: 400/21602), optional
//!   `StatusCallback`; answers 201 with the message resource, status `queued`.
//! - `GET …/Messages/{Sid}.json` (fetch) and `GET …/Messages.json` (list,
//!   filters `To`, `From`, `PageSize`; newest first; envelope key `messages`).
//! - Delivery, by the recipient's [`SmsPersona`]: status callbacks `queued`,
//!   `sent`, then `delivered` (or `undelivered` / `failed` with `ErrorCode`),
//!   signed with `X-Twilio-Signature` and an `I-Twilio-Idempotency-Token`.
//! - Replies: [`SmsPersona::Reply`] answers a delivered message after a
//!   delay with an inbound message posted (signed) to the messaging webhook of
//!   the number it was sent from ([`super::EmulatorHandle::set_messaging_webhook`]),
//!   with Twilio's parameters (`MessageSid`, `SmsSid`, `AccountSid`, `From`,
//!   `To`, `Body`, `NumMedia`, `SmsStatus=received`, `ApiVersion`).
//!   [`super::EmulatorHandle::send_inbound`] sends any text the same way.
//! - Fault modes: [`super::EmulatorHandle::set_message_create_refusal`] refuses
//!   creates with a Twilio error (e.g. 21610, the recipient opted out);
//!   [`super::EmulatorHandle::set_create_response_delay`] answers creates late
//!   (the message is sent at once); [`super::EmulatorHandle::set_status_callbacks_lost`]
//!   loses the status callbacks of messages to a number too.

use super::*;

/// How a text message's recipient behaves. Deserialises from e.g.
/// `{"behaviour": "reply", "delay_ms": 500, "body": "1"}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "behaviour", rename_all = "snake_case")]
pub enum SmsPersona {
    /// The message is delivered (`queued` → `sent` → `delivered`); no reply.
    Deliver,
    /// Delivered, then `delay_ms` later the recipient replies `body`.
    Reply { delay_ms: u64, body: String },
    /// The carrier could not deliver it: `undelivered`, ErrorCode 30003
    /// (unreachable destination handset).
    Undelivered,
    /// Twilio could not send it: `failed`, ErrorCode 30008 (unknown error).
    Fail,
}

/// A message the API accepted, as the emulator saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmulatedMessage {
    /// `SM` + 32 lowercase hex digits.
    pub sid: String,
    pub to: String,
    pub from: String,
    /// The text as received.
    pub body: String,
    /// Current status (`queued`, `sent`, `delivered`, `undelivered`, `failed`).
    pub status: String,
    pub received_at: Instant,
}

pub(super) struct MessageRecord {
    message: EmulatedMessage,
    date_created: jiff::Timestamp,
    error_code: Option<u32>,
}

/// The emulator's messaging state.
#[derive(Default)]
pub(super) struct MessageBook {
    pub(super) personas: HashMap<String, SmsPersona>,
    /// "A message comes in" webhook URL by Twilio number.
    pub(super) webhooks: HashMap<String, String>,
    /// Fault mode: refuse creates with (HTTP status, Twilio code).
    pub(super) create_refusal: Option<(u16, u32)>,
    records: Vec<MessageRecord>,
}

/// Time between a message's status changes.
const DELIVERY_STEP: Duration = Duration::from_millis(100);

pub(super) fn routes(router: Router<Arc<Inner>>) -> Router<Arc<Inner>> {
    router
        .route("/2010-04-01/Accounts/{account_sid}/Messages.json", post(create_message).get(list_messages))
        .route("/2010-04-01/Accounts/{account_sid}/Messages/{message_sid}", axum::routing::get(fetch_message))
}

fn message_json(inner: &Inner, r: &MessageRecord) -> Value {
    let m = &r.message;
    json!({
        "account_sid": inner.account_sid,
        "api_version": API_VERSION,
        "body": m.body,
        "date_created": rfc2822(r.date_created),
        "date_sent": null,
        "date_updated": rfc2822(r.date_created),
        "direction": "outbound-api",
        "error_code": r.error_code,
        "error_message": null,
        "from": m.from,
        "messaging_service_sid": null,
        "num_media": "0",
        "num_segments": m.body.chars().count().max(1).div_ceil(153).to_string(),
        "price": null,
        "price_unit": "USD",
        "sid": m.sid,
        "status": m.status,
        "to": m.to,
        "uri": format!("/{API_VERSION}/Accounts/{}/Messages/{}.json", inner.account_sid, m.sid),
    })
}

fn check_account(inner: &Inner, account: Result<&str, ()>, uri: &Uri) -> Result<(), ApiError> {
    match account {
        Ok(a) if a == inner.account_sid => Ok(()),
        _ => Err(not_found(uri.path())),
    }
}

async fn create_message(
    State(inner): State<Arc<Inner>>,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    inner.authenticate(&headers)?;
    check_account(&inner, path.as_ref().map(|Path(a)| a.as_str()).map_err(|_| ()), &uri)?;
    let Ok(params) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body) else {
        return Err(bad_request(21200, "The request body is not valid form encoding"));
    };
    let to = first(&params, "To").ok_or_else(|| bad_request(21604, "A 'To' phone number is required."))?;
    if !is_e164(to) {
        return Err(bad_request(21211, format!("Invalid 'To' Phone Number: {to}")));
    }
    let from = first(&params, "From").ok_or_else(|| bad_request(21603, "A 'From' phone number is required."))?;
    if !is_e164(from) {
        return Err(bad_request(21212, format!("Invalid From Number: {from}")));
    }
    let text = first(&params, "Body").ok_or_else(|| bad_request(21602, "Message body is required."))?;
    if text.chars().count() > crate::providers::twilio::messages::MAX_BODY_CHARS {
        return Err(bad_request(21617, "The concatenated message body exceeds the 1600 character limit."));
    }
    let callback = match first(&params, "StatusCallback") {
        Some(url) if !is_absolute_http_url(url) => return Err(bad_request(21609, "Invalid 'StatusCallback'")),
        other => other.map(str::to_string),
    };
    let (persona, record_json, sid) = {
        let mut book = lock(&inner.messages);
        if let Some((status, code)) = book.create_refusal {
            return Err(twilio_error(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST), code, "Message refused (emulator fault mode)"));
        }
        let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
        let record = MessageRecord {
            message: EmulatedMessage {
                sid: sid.clone(),
                to: to.to_string(),
                from: from.to_string(),
                body: text.to_string(),
                status: "queued".into(),
                received_at: Instant::now(),
            },
            date_created: jiff::Timestamp::now(),
            error_code: None,
        };
        let json = message_json(&inner, &record);
        book.records.push(record);
        (book.personas.get(to).cloned().unwrap_or(SmsPersona::Deliver), json, sid)
    };
    inner.emit(EmulatorEvent::MessageCreated { sid: sid.clone(), to: to.to_string() });
    let task = deliver(inner.clone(), sid, persona, callback);
    {
        let mut tasks = lock(&inner.tasks);
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }
    let faults = lock(&inner.state).faults.clone();
    if !faults.create_response_delay.is_zero() {
        sleep(faults.create_response_delay).await;
    }
    Ok((StatusCode::CREATED, Json(record_json)).into_response())
}

/// Plays a message's delivery: status callbacks, then the persona's reply.
async fn deliver(inner: Arc<Inner>, sid: String, persona: SmsPersona, callback: Option<String>) {
    let (final_status, error_code) = match &persona {
        SmsPersona::Undelivered => ("undelivered", Some(30003)),
        SmsPersona::Fail => ("failed", Some(30008)),
        _ => ("delivered", None),
    };
    let steps: &[&str] = if final_status == "failed" { &["queued"] } else { &["queued", "sent"] };
    for status in steps.iter().copied().chain([final_status]) {
        sleep(DELIVERY_STEP).await;
        let (to, from) = {
            let mut book = lock(&inner.messages);
            let Some(r) = book.records.iter_mut().find(|r| r.message.sid == sid) else { return };
            r.message.status = status.to_string();
            if status == final_status {
                r.error_code = error_code;
            }
            (r.message.to.clone(), r.message.from.clone())
        };
        let lost = lock(&inner.state).faults.lost_status_callbacks.contains(&to);
        if let (Some(url), false) = (&callback, lost) {
            let mut params = vec![
                ("MessageSid".to_string(), sid.clone()),
                ("SmsSid".to_string(), sid.clone()),
                ("AccountSid".to_string(), inner.account_sid.clone()),
                ("From".to_string(), from),
                ("To".to_string(), to),
                ("MessageStatus".to_string(), status.to_string()),
                ("SmsStatus".to_string(), status.to_string()),
                ("ApiVersion".to_string(), API_VERSION.to_string()),
            ];
            if let (true, Some(code)) = (status == final_status, error_code) {
                params.push(("ErrorCode".to_string(), code.to_string()));
            }
            let http_status = post_signed(&inner, url, &params).await;
            inner.emit(EmulatorEvent::MessageCallbackSent { sid: sid.clone(), message_status: status.to_string(), status: http_status });
        }
    }
    if let SmsPersona::Reply { delay_ms, body } = persona {
        sleep(Duration::from_millis(delay_ms)).await;
        let (to, from) = {
            let book = lock(&inner.messages);
            let Some(r) = book.records.iter().find(|r| r.message.sid == sid) else { return };
            (r.message.to.clone(), r.message.from.clone())
        };
        // The recipient answers: from their number, to ours.
        send_inbound(&inner, &to, &from, &body).await;
    }
}

/// Posts an inbound message from `from` to the Twilio number `to`, at `to`'s
/// messaging webhook; returns the engine's HTTP status (`None`: no webhook
/// configured for `to`, or no answer).
pub(super) async fn send_inbound(inner: &Arc<Inner>, from: &str, to: &str, body: &str) -> Option<u16> {
    let url = lock(&inner.messages).webhooks.get(to).cloned()?;
    let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
    let params = vec![
        ("ToCountry".to_string(), "US".to_string()),
        ("SmsMessageSid".to_string(), sid.clone()),
        ("NumMedia".to_string(), "0".to_string()),
        ("SmsSid".to_string(), sid.clone()),
        ("SmsStatus".to_string(), "received".to_string()),
        ("Body".to_string(), body.to_string()),
        ("To".to_string(), to.to_string()),
        ("NumSegments".to_string(), "1".to_string()),
        ("MessageSid".to_string(), sid.clone()),
        ("AccountSid".to_string(), inner.account_sid.clone()),
        ("From".to_string(), from.to_string()),
        ("ApiVersion".to_string(), API_VERSION.to_string()),
    ];
    let status = post_signed(inner, &url, &params).await;
    inner.emit(EmulatorEvent::InboundMessageSent { sid, status });
    status
}

/// One signed webhook POST (the signature covers the URL as configured,
/// fragment included; the request goes to the URL without it), retried up
/// to three times on a connect failure or a 5xx, as Twilio retries per the
/// URL's connection overrides.
async fn post_signed(inner: &Inner, url: &str, params: &[(String, String)]) -> Option<u16> {
    let request_url = url.split_once('#').map_or(url, |(u, _)| u);
    let signature = compute_signature(&inner.auth_token, url, params);
    let token = uuid::Uuid::new_v4().to_string();
    let mut last = None;
    for attempt in 0..4u32 {
        if attempt > 0 {
            sleep(Duration::from_millis(250 << attempt)).await;
        }
        let result = inner
            .http
            .post(request_url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(SIGNATURE_HEADER, &signature)
            .header("I-Twilio-Idempotency-Token", &token)
            .header(header::USER_AGENT, "TwilioProxy/1.1")
            .body(serde_urlencoded::to_string(params).unwrap_or_default())
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_server_error() => last = Some(r.status().as_u16()),
            Ok(r) => return Some(r.status().as_u16()),
            Err(e) if e.is_connect() => last = None,
            Err(_) => return None,
        }
    }
    last
}

async fn fetch_message(
    State(inner): State<Arc<Inner>>,
    path: Result<Path<(String, String)>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    inner.authenticate(&headers)?;
    let Ok(Path((account, segment))) = path else { return Err(not_found(uri.path())) };
    check_account(&inner, Ok(account.as_str()), &uri)?;
    let sid = segment.strip_suffix(".json").unwrap_or(&segment);
    let book = lock(&inner.messages);
    let r = book.records.iter().find(|r| r.message.sid == sid).ok_or_else(|| not_found(uri.path()))?;
    Ok(Json(message_json(&inner, r)).into_response())
}

async fn list_messages(State(inner): State<Arc<Inner>>, path: Result<Path<String>, PathRejection>, uri: Uri, headers: HeaderMap) -> Result<Response, ApiError> {
    inner.authenticate(&headers)?;
    check_account(&inner, path.as_ref().map(|Path(a)| a.as_str()).map_err(|_| ()), &uri)?;
    let query: Vec<(String, String)> = serde_urlencoded::from_str(uri.query().unwrap_or("")).unwrap_or_default();
    let page_size = match first(&query, "PageSize") {
        None => 50,
        Some(n) => match n.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => return Err(bad_request(20001, "PageSize must be between 1 and 1000")),
        },
    };
    let (to, from) = (first(&query, "To"), first(&query, "From"));
    let book = lock(&inner.messages);
    let mut matching: Vec<&MessageRecord> =
        book.records.iter().filter(|r| to.map_or(true, |t| r.message.to == t)).filter(|r| from.map_or(true, |f| r.message.from == f)).collect();
    matching.sort_by_key(|r| std::cmp::Reverse(r.date_created));
    let messages: Vec<Value> = matching.into_iter().take(page_size).map(|r| message_json(&inner, r)).collect();
    let page_uri = format!("/{API_VERSION}/Accounts/{}/Messages.json?PageSize={page_size}&Page=0", inner.account_sid);
    Ok(Json(json!({
        "end": messages.len().saturating_sub(1),
        "first_page_uri": page_uri,
        "next_page_uri": null,
        "page": 0,
        "page_size": page_size,
        "previous_page_uri": null,
        "start": 0,
        "uri": page_uri,
        "messages": messages,
    }))
    .into_response())
}

/// Every message the API accepted, in arrival order.
pub(super) fn all(inner: &Inner) -> Vec<EmulatedMessage> {
    lock(&inner.messages).records.iter().map(|r| r.message.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::super::{EmulatorConfig, Persona, TwilioEmulator};
    use super::SmsPersona;
    use crate::providers::twilio::client::{TwilioClient, TwilioError};
    use crate::providers::twilio::messages::CreateMessageRequest;
    use crate::providers::twilio::signature::verify_signature;
    use axum::extract::State;
    use axum::http::{HeaderMap, Uri};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
    const TOKEN: &str = "emulator-test-auth-token";
    const FROM: &str = "+15005550006";
    const NURSE: &str = "+15551230001";

    type Hits = Arc<Mutex<Vec<(String, Vec<(String, String)>, bool)>>>;

    /// An engine stand-in recording every webhook (path, params, signature valid).
    async fn receiver() -> (String, Hits) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits: Hits = Arc::default();
        let state = (base.clone(), hits.clone());
        let app = axum::Router::new()
            .fallback(|State((base, hits)): State<(String, Hits)>, uri: Uri, headers: HeaderMap, body: axum::body::Bytes| async move {
                let url = format!("{base}{}", uri.path_and_query().map_or("/", |p| p.as_str()));
                let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap();
                let sig = headers.get("x-twilio-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
                let ok = verify_signature(TOKEN, &url, &params, sig);
                hits.lock().unwrap().push((uri.path().to_string(), params, ok));
                "<Response/>"
            })
            .with_state(state);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (base, hits)
    }

    #[tokio::test]
    async fn messages_contract_delivery_and_reply() {
        let emu = TwilioEmulator::start(
            EmulatorConfig { account_sid: ACCOUNT.into(), auth_token: TOKEN.into(), personas: Default::default(), default_persona: Persona::NoAnswer },
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        )
        .await
        .unwrap();
        let (base, hits) = receiver().await;
        emu.set_sms_persona(NURSE, SmsPersona::Reply { delay_ms: 10, body: "1".into() });
        emu.set_messaging_webhook(FROM, &format!("{base}/sms"));
        let client = TwilioClient::new(reqwest::Client::new(), &emu.base_url(), ACCOUNT, TOKEN);
        let req = CreateMessageRequest { to: NURSE.into(), from: FROM.into(), body: "Alert.".into(), status_callback: format!("{base}/status?attempt=1") };
        let created = client.create_message(&req).await.unwrap();
        assert!(created.sid.starts_with("SM") && created.sid.len() == 34, "{}", created.sid);
        assert_eq!(created.status, "queued");
        // Delivery callbacks, then the reply to the messaging webhook, all signed.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hits.lock().unwrap().len() < 4 {
            assert!(std::time::Instant::now() < deadline, "webhooks: {:?}", hits.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let hits = hits.lock().unwrap().clone();
        assert!(hits.iter().all(|h| h.2), "every webhook is signed");
        let get = |p: &[(String, String)], k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
        let statuses: Vec<String> = hits.iter().filter(|h| h.0 == "/status").map(|h| get(&h.1, "MessageStatus")).collect();
        assert_eq!(statuses, ["queued", "sent", "delivered"]);
        let reply = hits.iter().find(|h| h.0 == "/sms").expect("a reply");
        assert_eq!((get(&reply.1, "From"), get(&reply.1, "To"), get(&reply.1, "Body")), (NURSE.to_string(), FROM.to_string(), "1".to_string()));
        // Fetch and list.
        let fetched = client.fetch_message(&created.sid).await.unwrap();
        assert_eq!(fetched.status, "delivered");
        assert_eq!(fetched.body.as_deref(), Some("Alert."));
        let listed = client.list_messages_to(NURSE, 20).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(client.list_messages_to("+15551230002", 20).await.unwrap().is_empty());
        // Refusals are typed: too long, invalid number, a fault mode, an outage.
        let long = CreateMessageRequest { body: "x".repeat(1601), ..req.clone() };
        assert!(matches!(client.create_message(&long).await, Err(TwilioError::Api { http_status: 400, code: Some(21617), .. })));
        let bad_to = CreateMessageRequest { to: "12345".into(), ..req.clone() };
        assert!(matches!(client.create_message(&bad_to).await, Err(TwilioError::Api { http_status: 400, code: Some(21211), .. })));
        emu.set_message_create_refusal(Some((400, 21610)));
        let e = client.create_message(&req).await.unwrap_err();
        assert!(matches!(e, TwilioError::Api { code: Some(21610), .. }) && !e.is_retryable());
        emu.set_message_create_refusal(Some((503, 20500)));
        assert!(client.create_message(&req).await.unwrap_err().is_retryable());
        assert!(matches!(client.fetch_message("SM0").await, Err(TwilioError::Api { http_status: 404, .. })));
        emu.shutdown().await;
    }
}
