//! An in-process Twilio Voice emulator that honours the same contract as
//! Twilio, from Twilio's side.
//!
//! It serves the subset of the REST API the engine uses —
//! `POST /2010-04-01/Accounts/{AccountSid}/Calls.json` (create),
//! `POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` with
//! `Status=completed|canceled` (end) and `GET` of the same (fetch) — with
//! HTTP Basic authentication and Twilio-shaped JSON errors. Each accepted
//! call is then played out on a tokio task according to the callee's
//! [`Persona`]: call-progress webhooks to `StatusCallback`, the asynchronous
//! answering-machine verdict to `AsyncAmdStatusCallback`, and execution of
//! the call's TwiML (`<Say>`, `<Gather>` with key presses posted to its
//! `action`, `<Pause>`, `<Redirect>`, `<Hangup>`), every webhook signed with
//! `X-Twilio-Signature` exactly as Twilio signs it.
//!
//! Used by tests, the demo and benchmarks (bind `127.0.0.1:0`), and by the
//! `wardcall emulate twilio` command.
//!
//! Timeline of a call (all delays are the persona's, in milliseconds, or the
//! request's/TwiML's, in seconds):
//!
//! 1. `initiated` callback immediately after the API answered 201 `queued`.
//! 2. `busy` / `failed` at once for [`Persona::Busy`] / [`Persona::Fail`];
//!    otherwise `ringing`.
//! 3. No answer within the request's `Timeout` (default 60 s, max 600 s):
//!    `no-answer`. Otherwise, after `ring_ms`, `answered` (reported as
//!    `CallStatus=in-progress`).
//! 4. With `MachineDetection` and `AsyncAmd=true`: the AMD callback
//!    (`AnsweredBy=human`, or `machine_start` / `machine_end_beep` for
//!    [`Persona::Machine`]), sent before the TwiML starts so that tests see
//!    a fixed order (on Twilio it arrives a few seconds into the TwiML).
//! 5. TwiML execution. `<Say>` takes no time (the text is recorded in
//!    [`EmulatedCall::spoken`]); a `<Gather>` waits `think_ms` and presses
//!    the persona's next digits, or waits its `timeout` when the callee
//!    presses nothing.
//! 6. The final callback — always sent, as on Twilio — with `completed`
//!    (or `busy`, `no-answer`, `failed`, `canceled`) and `CallDuration`.
//!
//! Simplifications (not observable by an engine that uses
//! [`crate::providers::twilio::client`]): no call queueing or CPS limits; live
//! redirection of a call with `Url`/`Twiml` updates is refused with 400;
//! `<Play>`, `<Dial>` and other verbs are skipped; `<Say>` is instantaneous;
//! AMD takes no time.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::providers::twilio::callback::ConnectionOverrides;
use crate::providers::twilio::client::MAX_INLINE_TWIML_CHARS;
use crate::providers::twilio::signature::{compute_signature, SIGNATURE_HEADER};
use crate::providers::twilio::twiml::{parse_document, Element};

pub mod cli;
mod messages;
pub use messages::{EmulatedMessage, SmsPersona};

/// How long the emulator waits for the engine to answer a webhook (Twilio's
/// default is 15 s).
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest TwiML the emulator accepts from a webhook (Twilio error 11750).
const MAX_TWIML_RESPONSE_BYTES: usize = 64 * 1024;
/// Bound on TwiML documents fetched for one call (`<Redirect>` loops).
const MAX_DOCUMENTS_PER_CALL: usize = 100;
/// Longest single wait the emulator will honour (`<Pause>`, `timeout`).
const MAX_WAIT: Duration = Duration::from_secs(3600);
const API_VERSION: &str = "2010-04-01";

/// How the callee behaves. Deserialises from e.g.
/// `{"behaviour": "answer", "ring_ms": 2000, "think_ms": 1500, "digits": "1"}`
/// or `{"behaviour": "no_answer"}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "behaviour", rename_all = "snake_case")]
pub enum Persona {
    /// Rings `ring_ms` milliseconds, answers as a human, and at each
    /// `<Gather>` waits `think_ms` milliseconds then presses its next
    /// digits (up to the Gather's `numDigits`, or through its `finishOnKey`),
    /// which are posted to the Gather `action` as one request; the TwiML
    /// returned is executed in turn. Once `digits` is used up, the callee
    /// presses nothing more and hangs up when the TwiML ends.
    /// If `ring_ms` exceeds the request's `Timeout`, the call is `no-answer`.
    Answer { ring_ms: u64, think_ms: u64, digits: String },
    /// Rings until the request's `Timeout` (seconds) expires: `no-answer`.
    NoAnswer,
    /// `busy` right after `initiated`.
    Busy,
    /// `failed` right after `initiated`.
    Fail,
    /// Voicemail: answers after `ring_ms`, AMD reports `machine_start`
    /// (`machine_end_beep` with `MachineDetection=DetectMessageEnd`), never
    /// presses a key, and hangs up `hangup_ms` after answering (or earlier,
    /// if the TwiML ends first): `completed`.
    Machine { ring_ms: u64, hangup_ms: u64 },
    /// Answers as a human after `ring_ms` but never presses a key: every
    /// `<Gather>` times out, and the call completes when the TwiML ends.
    SilentHuman { ring_ms: u64 },
}

/// Emulator settings.
#[derive(Clone, serde::Deserialize)]
pub struct EmulatorConfig {
    /// The only account accepted (HTTP Basic user name and path segment).
    pub account_sid: String,
    /// The account's Auth Token: HTTP Basic password, and the key that
    /// signs every webhook.
    pub auth_token: String,
    /// Callee behaviour by destination (`To`, E.164).
    #[serde(default)]
    pub personas: HashMap<String, Persona>,
    /// Behaviour for destinations not in `personas`.
    pub default_persona: Persona,
}

impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("account_sid", &self.account_sid)
            .field("auth_token", &"<redacted>")
            .field("personas", &self.personas.len())
            .field("default_persona", &self.default_persona)
            .finish()
    }
}

/// What a webhook sent by the emulator was for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallbackKind {
    /// A call-progress webhook to `StatusCallback`, with this `CallStatus`
    /// (`initiated`, `ringing`, `in-progress`, `completed`, `busy`,
    /// `no-answer`, `failed`, `canceled`).
    Status { call_status: String },
    /// The asynchronous AMD verdict to `AsyncAmdStatusCallback`, with this
    /// `AnsweredBy`.
    Amd { answered_by: String },
    /// A `<Gather>` result posted to its `action`, with these `Digits`.
    Gather { digits: String },
    /// TwiML fetched from the call's `Url` or a `<Redirect>`.
    TwimlFetch,
}

/// Something the emulator did, for tests and dashboards.
#[derive(Clone, Debug)]
pub enum EmulatorEvent {
    /// The API accepted a call (HTTP 201). `received_at`: when its
    /// create request had arrived (headers and body read, before the
    /// emulator's authentication and validation).
    CallCreated { sid: String, to: String, received_at: Instant },
    /// A webhook try was made (one event per try: a retry asked for by the
    /// URL's connection overrides is another event). `status` is the
    /// engine's HTTP status, or `None` if the request failed (connect error,
    /// read timeout: 15 s, or the override's `rt`). Non-2xx answers that are
    /// not retried are recorded and the call carries on, as on Twilio (which
    /// logs a debugger warning); a failed TwiML fetch ends the call.
    CallbackSent { sid: String, kind: CallbackKind, status: Option<u16> },
    /// The call reached its final status and the final webhook was sent.
    CallEnded { sid: String, final_status: String },
    /// The Messages API accepted a message (HTTP 201).
    MessageCreated { sid: String, to: String },
    /// A message status callback was sent (`message_status`: `queued`,
    /// `sent`, `delivered`, …); `status` is the engine's HTTP status.
    MessageCallbackSent { sid: String, message_status: String, status: Option<u16> },
    /// An inbound message (a reply) was posted to a messaging webhook.
    InboundMessageSent { sid: String, status: Option<u16> },
}

/// A call accepted by the API, as the emulator saw and played it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmulatedCall {
    /// `CA` + 32 lowercase hex digits.
    pub sid: String,
    pub to: String,
    pub from: String,
    /// Every form parameter of the create request, in order (repeats kept).
    pub params: Vec<(String, String)>,
    /// When the create request had arrived (headers and body read, before
    /// authentication and validation).
    pub received_at: Instant,
    /// Current call resource status (`queued`, `ringing`, `in-progress`, or
    /// the final status).
    pub status: String,
    /// Set once the call has ended.
    pub final_status: Option<String>,
    /// AMD verdict, when machine detection was requested and the call was
    /// answered.
    pub answered_by: Option<String>,
    /// Every key the callee pressed, in order.
    pub digits_pressed: String,
    /// Text of every `<Say>` executed, in order (unescaped).
    pub spoken: Vec<String>,
}

/// The emulator. See [`TwilioEmulator::start`].
pub struct TwilioEmulator;

impl TwilioEmulator {
    /// Serves the emulated API on `listener` (tests bind `127.0.0.1:0`) until
    /// [`EmulatorHandle::shutdown`] or the handle is dropped.
    ///
    /// Errors if the listener has no local address, the account SID or
    /// Auth Token is empty, or the webhook HTTP client cannot be built.
    pub async fn start(config: EmulatorConfig, listener: tokio::net::TcpListener) -> anyhow::Result<EmulatorHandle> {
        anyhow::ensure!(!config.account_sid.is_empty() && !config.auth_token.is_empty(), "the emulator needs an account SID and an auth token");
        let addr = listener.local_addr()?;
        let http = reqwest::Client::builder().timeout(WEBHOOK_TIMEOUT).build()?;
        let (events, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            account_sid: config.account_sid,
            auth_token: config.auth_token,
            http,
            events,
            state: Mutex::new(CallBook {
                personas: config.personas,
                default_persona: config.default_persona,
                faults: Faults::default(),
                calls: Vec::new(),
                by_sid: HashMap::new(),
            }),
            messages: Mutex::new(messages::MessageBook::default()),
            tasks: Mutex::new(JoinSet::new()),
            concurrency: RequestConcurrency::default(),
        });
        let app = router(inner.clone());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = shutdown_rx.await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "Twilio emulator server stopped");
            }
        });
        tracing::info!(%addr, "Twilio emulator listening");
        Ok(EmulatorHandle { inner, addr, server: Some(server), shutdown_tx: Some(shutdown_tx) })
    }
}

/// Controls a running emulator. Dropping it stops the server and every
/// call simulation.
pub struct EmulatorHandle {
    inner: Arc<Inner>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
    shutdown_tx: Option<oneshot::Sender<()>>,
}

impl EmulatorHandle {
    /// The API base URL to give the client, e.g. `"http://127.0.0.1:43123"`
    /// (an unspecified bind address is reported as loopback).
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The bound socket address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the behaviour of callee `number` (E.164) for calls created from
    /// now on; calls in progress keep theirs.
    pub fn set_persona(&self, number: &str, persona: Persona) {
        lock(&self.inner.state).personas.insert(number.to_string(), persona);
    }

    /// Fault mode: answer every create-call request `delay` late (the call is
    /// accepted and starts at once). `Duration::ZERO` turns it off.
    pub fn set_create_response_delay(&self, delay: Duration) {
        lock(&self.inner.state).faults.create_response_delay = delay;
    }

    /// Fault mode: the account's REST API concurrency limit. Twilio answers a
    /// request beyond the account's concurrent requests (100 by default) with
    /// HTTP 429 and error 20429 ("Too Many Requests"; not processed, safe to
    /// retry: <https://www.twilio.com/docs/api/errors/20429>). `None` (the
    /// default) accepts any number at once.
    pub fn set_concurrency_limit(&self, limit: Option<usize>) {
        lock(&self.inner.state).faults.concurrency_limit = limit;
    }

    /// Fault mode: the account's voice geographic permissions do not allow
    /// calls to `number` (E.164): a create-call request to it is refused
    /// with HTTP 400 and error 21215 ("Account not authorized to call …",
    /// <https://www.twilio.com/docs/api/errors/21215>), a refusal that no
    /// retry heals (`denied = false` allows it again).
    pub fn set_geo_permission_denied(&self, number: &str, denied: bool) {
        let mut book = lock(&self.inner.state);
        if denied {
            book.faults.geo_permission_denied.insert(number.to_string());
        } else {
            book.faults.geo_permission_denied.remove(number);
        }
    }

    /// The most REST requests of the account this emulator was answering at
    /// once, and how many it refused with 429 / 20429 under
    /// [`EmulatorHandle::set_concurrency_limit`].
    pub fn request_concurrency(&self) -> (usize, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.inner.concurrency.peak.load(Relaxed), self.inner.concurrency.refused.load(Relaxed))
    }

    /// Fault mode: refuse inline TwiML longer than `limit` characters with
    /// Twilio's 400 / 32018 (`None`: Twilio's own 4,000).
    pub fn set_twiml_limit(&self, limit: Option<usize>) {
        lock(&self.inner.state).faults.twiml_limit = limit;
    }

    /// Fault mode: status callbacks of calls and text messages to `number` (E.164) are lost
    /// from now on (`lost = true`) or delivered again (`false`). The calls
    /// themselves go on, and can be fetched through the API.
    pub fn set_status_callbacks_lost(&self, number: &str, lost: bool) {
        let mut book = lock(&self.inner.state);
        if lost {
            book.faults.lost_status_callbacks.insert(number.to_string());
        } else {
            book.faults.lost_status_callbacks.remove(number);
        }
    }

    /// Sets how the recipient of text messages to `number` (E.164) behaves,
    /// for messages created from now on ([`SmsPersona::Deliver`] by default).
    pub fn set_sms_persona(&self, number: &str, persona: SmsPersona) {
        lock(&self.inner.messages).personas.insert(number.to_string(), persona);
    }

    /// Sets the "A message comes in" webhook of the account's number
    /// `twilio_number` (E.164): where replies to messages sent from it are
    /// posted (e.g. `{public_url}/webhooks/twilio/sms`).
    pub fn set_messaging_webhook(&self, twilio_number: &str, url: &str) {
        lock(&self.inner.messages).webhooks.insert(twilio_number.to_string(), url.to_string());
    }

    /// Fault mode: refuse every create-message request with HTTP `status`
    /// and Twilio error `code` (e.g. 400 / 21610, the recipient replied
    /// STOP; 503 / 20500 an outage); `None` turns it off.
    pub fn set_message_create_refusal(&self, refusal: Option<(u16, u32)>) {
        lock(&self.inner.messages).create_refusal = refusal;
    }

    /// Every text message the Messages API accepted, in arrival order.
    pub fn messages(&self) -> Vec<EmulatedMessage> {
        messages::all(&self.inner)
    }

    /// Posts an inbound text `body` from `from` to the account's number `to`
    /// at `to`'s messaging webhook, signed as Twilio signs it. Returns the
    /// engine's HTTP status, or `None` (no webhook set for `to`, no answer).
    pub async fn send_inbound(&self, from: &str, to: &str, body: &str) -> Option<u16> {
        messages::send_inbound(&self.inner, from, to, body).await
    }

    /// Every call the API accepted, in arrival order, as of now.
    pub fn calls(&self) -> Vec<EmulatedCall> {
        lock(&self.inner.state).calls.iter().map(|r| r.call.clone()).collect()
    }

    /// A receiver of every [`EmulatorEvent`] from now on (buffer of 4096;
    /// a slower receiver gets `RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<EmulatorEvent> {
        self.inner.events.subscribe()
    }

    /// Stops every call simulation (no further webhooks), then the server;
    /// waits up to 5 s for open requests to finish.
    pub async fn shutdown(mut self) {
        let mut tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        tasks.shutdown().await;
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        if let Some(mut server) = self.server.take() {
            if tokio::time::timeout(Duration::from_secs(5), &mut server).await.is_err() {
                server.abort();
            }
        }
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        lock(&self.inner.tasks).abort_all();
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

struct Inner {
    account_sid: String,
    auth_token: String,
    http: reqwest::Client,
    events: broadcast::Sender<EmulatorEvent>,
    state: Mutex<CallBook>,
    messages: Mutex<messages::MessageBook>,
    tasks: Mutex<JoinSet<()>>,
    /// REST requests of the account being answered right now, the most seen
    /// at once, and those refused with 429 / 20429 ([`Faults::concurrency_limit`]).
    concurrency: RequestConcurrency,
}

/// Counts of the account's concurrent REST requests.
#[derive(Default)]
struct RequestConcurrency {
    in_flight: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicU64,
}

struct CallBook {
    personas: HashMap<String, Persona>,
    default_persona: Persona,
    faults: Faults,
    calls: Vec<CallRecord>,
    by_sid: HashMap<String, usize>,
}

struct CallRecord {
    call: EmulatedCall,
    date_created: jiff::Timestamp,
    date_updated: jiff::Timestamp,
    start_time: Option<jiff::Timestamp>,
    end_time: Option<jiff::Timestamp>,
    answered_at: Option<Instant>,
    duration_secs: Option<u64>,
    /// Set to `true` when the API ended the call.
    hangup: watch::Sender<bool>,
}

/// Provider faults a test can switch on (none by default). They model what
/// the real service does when it is slow or strict, never something the
/// published contract forbids.
#[derive(Clone, Debug, Default)]
struct Faults {
    /// Extra time before the create-call response is sent. The call itself
    /// is accepted (and starts) at once, as when Twilio's answer is delayed
    /// in transit: a client whose timeout is shorter sees an ambiguous
    /// failure for a call that exists.
    create_response_delay: Duration,
    /// A stricter limit on inline `Twiml` (characters) than Twilio's 4,000,
    /// refused with the same error (400, code 32018).
    twiml_limit: Option<usize>,
    /// Destinations whose status callbacks are lost (never delivered), as
    /// when they were sent to an engine that was down.
    lost_status_callbacks: std::collections::HashSet<String>,
    /// The account's REST API concurrency limit: a request beyond it is
    /// refused with 429 / 20429, as Twilio does.
    concurrency_limit: Option<usize>,
    /// Destinations the account's voice geographic permissions do not allow:
    /// a create-call request to one is refused with 400 / 21215.
    geo_permission_denied: std::collections::HashSet<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CallBook {
    fn get_mut(&mut self, sid: &str) -> Option<&mut CallRecord> {
        let i = *self.by_sid.get(sid)?;
        self.calls.get_mut(i)
    }
}

impl CallRecord {
    /// Records the final status unless one is set; returns the final status.
    fn finish(&mut self, status: &str) -> String {
        if self.call.final_status.is_none() {
            let now = jiff::Timestamp::now();
            self.call.status = status.to_string();
            self.call.final_status = Some(status.to_string());
            self.end_time = Some(now);
            self.date_updated = now;
            self.duration_secs = self.answered_at.map(|t| t.elapsed().as_secs_f64().ceil() as u64);
        }
        self.call.final_status.clone().unwrap_or_default()
    }
}

impl Inner {
    fn emit(&self, event: EmulatorEvent) {
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    /// Applies `f` to a live call; `false` if the call has ended.
    fn update_live(&self, sid: &str, f: impl FnOnce(&mut CallRecord)) -> bool {
        let mut book = lock(&self.state);
        match book.get_mut(sid) {
            Some(rec) if rec.call.final_status.is_none() => {
                f(rec);
                rec.date_updated = jiff::Timestamp::now();
                true
            }
            _ => false,
        }
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let credentials = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, encoded) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("basic").then(|| encoded.trim())
            })
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
            .and_then(|raw| String::from_utf8(raw).ok());
        let ok = credentials.as_deref().and_then(|c| c.split_once(':')).is_some_and(|(user, password)| {
            constant_time_eq(user.as_bytes(), self.account_sid.as_bytes()) & constant_time_eq(password.as_bytes(), self.auth_token.as_bytes())
        });
        if ok {
            Ok(())
        } else {
            Err(twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate"))
        }
    }

    fn call_json(&self, rec: &CallRecord) -> Value {
        let sid = &rec.call.sid;
        let base = format!("/{API_VERSION}/Accounts/{}/Calls/{sid}", self.account_sid);
        json!({
            "account_sid": self.account_sid,
            "annotation": null,
            "answered_by": rec.call.answered_by,
            "api_version": API_VERSION,
            "caller_name": null,
            "date_created": rfc2822(rec.date_created),
            "date_updated": rfc2822(rec.date_updated),
            "direction": "outbound-api",
            "duration": rec.duration_secs.map(|d| d.to_string()),
            "end_time": rec.end_time.map(rfc2822),
            "forwarded_from": null,
            "from": rec.call.from,
            "from_formatted": rec.call.from,
            "group_sid": null,
            "parent_call_sid": null,
            "phone_number_sid": null,
            "price": null,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": sid,
            "start_time": rec.start_time.map(rfc2822),
            "status": rec.call.status,
            "subresource_uris": {
                "notifications": format!("{base}/Notifications.json"),
                "recordings": format!("{base}/Recordings.json"),
                "payments": format!("{base}/Payments.json"),
                "events": format!("{base}/Events.json"),
                "siprec": format!("{base}/Siprec.json"),
                "streams": format!("{base}/Streams.json"),
                "transcriptions": format!("{base}/Transcriptions.json"),
                "user_defined_message_subscriptions": format!("{base}/UserDefinedMessageSubscriptions.json"),
                "user_defined_messages": format!("{base}/UserDefinedMessages.json"),
            },
            "to": rec.call.to,
            "to_formatted": rec.call.to,
            "trunk_sid": null,
            "uri": format!("{base}.json"),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// RFC 2822 in UTC as Twilio writes it: `Tue, 05 Mar 2024 05:34:45 +0000`.
fn rfc2822(ts: jiff::Timestamp) -> String {
    ts.to_zoned(jiff::tz::TimeZone::UTC).strftime("%a, %d %b %Y %H:%M:%S %z").to_string()
}

/// `+`, then 8 to 15 digits, the first not zero.
pub(crate) fn is_e164(number: &str) -> bool {
    number.strip_prefix('+').is_some_and(|digits| (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0'))
}

fn is_absolute_http_url(candidate: &str) -> bool {
    url::Url::parse(candidate).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

// ---------------------------------------------------------------------------
// REST API
// ---------------------------------------------------------------------------

/// A refusal, rendered as Twilio's JSON error body:
/// `{"code":…,"message":…,"more_info":"https://www.twilio.com/docs/errors/…","status":…}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "code": self.code,
            "message": self.message,
            "more_info": format!("https://www.twilio.com/docs/errors/{}", self.code),
            "status": self.status.as_u16(),
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"Twilio API\""));
        }
        response
    }
}

fn twilio_error(status: StatusCode, code: u32, message: impl Into<String>) -> ApiError {
    ApiError { status, code, message: message.into() }
}

fn not_found(path: &str) -> ApiError {
    twilio_error(StatusCode::NOT_FOUND, 20404, format!("The requested resource {path} was not found"))
}

fn bad_request(code: u32, message: impl Into<String>) -> ApiError {
    twilio_error(StatusCode::BAD_REQUEST, code, message)
}

fn router(inner: Arc<Inner>) -> Router {
    let router = Router::new()
        .route("/2010-04-01/Accounts/{account_sid}/Calls.json", post(create_call).get(list_calls))
        .route("/2010-04-01/Accounts/{account_sid}/Calls", post(create_call))
        .route("/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}", post(update_call).get(fetch_call));
    messages::routes(router)
        .fallback(|uri: Uri| async move { not_found(uri.path()) })
        .method_not_allowed_fallback(|| async { twilio_error(StatusCode::METHOD_NOT_ALLOWED, 20004, "Method not allowed") })
        .layer(axum::middleware::from_fn_with_state(inner.clone(), limit_concurrency))
        .with_state(inner)
}

/// Counts the account's requests in flight and, under the concurrency-limit
/// fault, refuses one beyond the limit with 429 / 20429 before it is
/// processed (<https://www.twilio.com/docs/api/errors/20429>).
async fn limit_concurrency(State(inner): State<Arc<Inner>>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use std::sync::atomic::Ordering::SeqCst;
    let c = &inner.concurrency;
    let now = c.in_flight.fetch_add(1, SeqCst) + 1;
    struct Leave<'a>(&'a std::sync::atomic::AtomicUsize);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, SeqCst);
        }
    }
    let _leave = Leave(&c.in_flight);
    let limit = lock(&inner.state).faults.concurrency_limit;
    if limit.is_some_and(|limit| now > limit) {
        c.refused.fetch_add(1, SeqCst);
        return twilio_error(StatusCode::TOO_MANY_REQUESTS, 20429, "Too Many Requests").into_response();
    }
    c.peak.fetch_max(now, SeqCst);
    next.run(request).await
}

fn first<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

fn parse_method(value: Option<&str>, name: &str) -> Result<Method, ApiError> {
    match value.map(str::to_ascii_uppercase).as_deref() {
        None | Some("POST") => Ok(Method::POST),
        Some("GET") => Ok(Method::GET),
        Some(_) => Err(bad_request(21200, format!("{name} must be GET or POST"))),
    }
}

/// Which call-progress events to report. `completed` (the final status) is
/// always reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Events {
    initiated: bool,
    ringing: bool,
    answered: bool,
}

/// `StatusCallbackEvent`: repeated parameters and/or space-separated values
/// (a form-encoded `+` decodes to a space). Unknown names are refused with
/// code 21626.
fn parse_events(params: &[(String, String)]) -> Result<Events, String> {
    let mut events = Events::default();
    for (_, value) in params.iter().filter(|(k, _)| k == "StatusCallbackEvent") {
        for name in value.split_ascii_whitespace() {
            match name {
                "initiated" => events.initiated = true,
                "ringing" => events.ringing = true,
                "answered" => events.answered = true,
                "completed" => {}
                other => return Err(other.to_string()),
            }
        }
    }
    Ok(events)
}

#[derive(Clone, Debug)]
struct Hook {
    url: String,
    method: Method,
}

enum Start {
    Twiml(Element),
    Url(Hook),
}

async fn create_call(
    State(inner): State<Arc<Inner>>,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // The request has arrived (its body read): what a benchmark times as
    // the create-call request, before the emulator's own checks.
    let received_at = Instant::now();
    inner.authenticate(&headers)?;
    match path {
        Ok(Path(account)) if account == inner.account_sid => {}
        _ => return Err(not_found(uri.path())),
    }
    let Ok(params) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body) else {
        return Err(bad_request(21200, "The request body is not valid form encoding"));
    };
    let valid = validate_create(&params)?;
    let faults = lock(&inner.state).faults.clone();
    if faults.geo_permission_denied.contains(&valid.to) {
        return Err(bad_request(
            21215,
            format!(
                "Account not authorized to call {}. Perhaps you need to enable some international permissions: https://www.twilio.com/console/voice/calls/geo-permissions/low-risk",
                valid.to
            ),
        ));
    }
    if let (Some(limit), Some(twiml)) = (faults.twiml_limit, first(&params, "Twiml")) {
        if twiml.chars().count() > limit {
            return Err(bad_request(32018, format!("Twiml size exceeded maximum allowed value of {limit} characters")));
        }
    }
    let response = accept_call(&inner, params, valid, received_at);
    if !faults.create_response_delay.is_zero() {
        sleep(faults.create_response_delay).await;
    }
    Ok(response)
}

struct ValidCreate {
    to: String,
    from: String,
    start: Start,
    status_callback: Option<Hook>,
    events: Events,
    ring_timeout: Duration,
    machine_detection: Option<String>,
    async_amd: bool,
    amd_callback: Option<Hook>,
}

/// Twilio's checks, in Twilio's order of parameters.
fn validate_create(params: &[(String, String)]) -> Result<ValidCreate, ApiError> {
    let to = first(params, "To").ok_or_else(|| bad_request(21201, "No 'To' number is specified"))?;
    if !is_e164(to) {
        return Err(bad_request(21211, format!("Invalid 'To' Phone Number: {to}")));
    }
    let from = first(params, "From").ok_or_else(|| bad_request(21213, "No 'From' number is specified"))?;
    if !is_e164(from) {
        return Err(bad_request(21212, format!("Invalid 'From' Phone Number: {from}")));
    }
    let start = match (first(params, "Url"), first(params, "Twiml")) {
        (Some(url), _) => {
            if !is_absolute_http_url(url) {
                return Err(bad_request(21205, format!("Url is not a valid URL: {url}")));
            }
            Start::Url(Hook { url: url.to_string(), method: parse_method(first(params, "Method"), "Method")? })
        }
        (None, Some(twiml)) => {
            if twiml.chars().count() > MAX_INLINE_TWIML_CHARS {
                return Err(bad_request(32018, "Twiml size exceeded maximum allowed value of 4000 characters"));
            }
            let doc = parse_document(twiml).map_err(|e| bad_request(12100, format!("Document parse failure: {e}")))?;
            if doc.name != "Response" {
                return Err(bad_request(12100, "Document parse failure: the root element must be <Response>"));
            }
            Start::Twiml(doc)
        }
        (None, None) => return Err(bad_request(21205, "Url parameter is required.")),
    };
    let status_callback = match first(params, "StatusCallback") {
        Some(url) if !is_absolute_http_url(url) => {
            return Err(bad_request(21609, "Invalid 'StatusCallback'"));
        }
        Some(url) => Some(Hook { url: url.to_string(), method: parse_method(first(params, "StatusCallbackMethod"), "StatusCallbackMethod")? }),
        None => None,
    };
    let events = parse_events(params).map_err(|bad| bad_request(21626, format!("Invalid 'StatusCallbackEvent': {bad}")))?;
    let ring_timeout = match first(params, "Timeout") {
        None => Duration::from_secs(60),
        Some(t) => match t.trim().parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs.min(600)),
            Err(_) => return Err(bad_request(21200, "Timeout must be an integer")),
        },
    };
    let machine_detection = match first(params, "MachineDetection") {
        None => None,
        Some(m @ ("Enable" | "DetectMessageEnd")) => Some(m.to_string()),
        Some(_) => return Err(bad_request(21200, "MachineDetection must be Enable or DetectMessageEnd")),
    };
    let async_amd = first(params, "AsyncAmd").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let amd_callback = match first(params, "AsyncAmdStatusCallback") {
        Some(url) if !is_absolute_http_url(url) => {
            return Err(bad_request(21200, "Invalid 'AsyncAmdStatusCallback'"));
        }
        Some(url) => Some(Hook { url: url.to_string(), method: parse_method(first(params, "AsyncAmdStatusCallbackMethod"), "AsyncAmdStatusCallbackMethod")? }),
        None => None,
    };
    Ok(ValidCreate { to: to.to_string(), from: from.to_string(), start, status_callback, events, ring_timeout, machine_detection, async_amd, amd_callback })
}

fn accept_call(inner: &Arc<Inner>, params: Vec<(String, String)>, v: ValidCreate, received_at: Instant) -> Response {
    let sid = format!("CA{}", uuid::Uuid::new_v4().simple());
    let now = jiff::Timestamp::now();
    let (hangup_tx, hangup_rx) = watch::channel(false);
    let (persona, json) = {
        let mut book = lock(&inner.state);
        let persona = book.personas.get(&v.to).cloned().unwrap_or_else(|| book.default_persona.clone());
        let record = CallRecord {
            call: EmulatedCall {
                sid: sid.clone(),
                to: v.to.clone(),
                from: v.from.clone(),
                params,
                received_at,
                status: "queued".to_string(),
                final_status: None,
                answered_by: None,
                digits_pressed: String::new(),
                spoken: Vec::new(),
            },
            date_created: now,
            date_updated: now,
            start_time: None,
            end_time: None,
            answered_at: None,
            duration_secs: None,
            hangup: hangup_tx,
        };
        let json = inner.call_json(&record);
        let index = book.calls.len();
        book.calls.push(record);
        book.by_sid.insert(sid.clone(), index);
        (persona, json)
    };
    tracing::debug!(call_sid = %sid, "emulator accepted call");
    inner.emit(EmulatorEvent::CallCreated { sid: sid.clone(), to: v.to.clone(), received_at });
    let remaining_digits = match &persona {
        Persona::Answer { digits, .. } => digits.chars().collect(),
        _ => VecDeque::new(),
    };
    let ctx = CallCtx {
        inner: inner.clone(),
        sid,
        to: v.to,
        from: v.from,
        persona,
        start: Some(v.start),
        status_callback: v.status_callback,
        events: v.events,
        ring_timeout: v.ring_timeout,
        machine_detection: v.machine_detection,
        async_amd: v.async_amd,
        amd_callback: v.amd_callback,
        sequence: 0,
        remaining_digits,
    };
    {
        let mut tasks = lock(&inner.tasks);
        // Reap finished simulations so a long-running emulator stays small.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(run_call(ctx, hangup_rx));
    }
    (StatusCode::CREATED, Json(json)).into_response()
}

/// "Read multiple Call resources"
/// (<https://www.twilio.com/docs/voice/api/call-resource#read-multiple-call-resources>):
/// `GET …/Calls.json` with the filters `To`, `From` and `Status`, and
/// `PageSize` (default 50, at most 1,000); most recent `date_created` first;
/// Twilio's page envelope (`calls`, `page`, `page_size`, `start`, `end`,
/// `uri`, `first_page_uri`, `next_page_uri`, `previous_page_uri`). Only the
/// first page is served: `next_page_uri` is always null.
async fn list_calls(State(inner): State<Arc<Inner>>, path: Result<Path<String>, PathRejection>, uri: Uri, headers: HeaderMap) -> Result<Response, ApiError> {
    inner.authenticate(&headers)?;
    match path {
        Ok(Path(account)) if account == inner.account_sid => {}
        _ => return Err(not_found(uri.path())),
    }
    let query: Vec<(String, String)> = serde_urlencoded::from_str(uri.query().unwrap_or("")).unwrap_or_default();
    let page_size = match first(&query, "PageSize") {
        None => 50,
        Some(n) => match n.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => return Err(bad_request(20001, "PageSize must be between 1 and 1000")),
        },
    };
    let (to, from, status) = (first(&query, "To"), first(&query, "From"), first(&query, "Status"));
    let book = lock(&inner.state);
    let mut matching: Vec<&CallRecord> = book
        .calls
        .iter()
        .filter(|r| to.map_or(true, |t| r.call.to == t))
        .filter(|r| from.map_or(true, |f| r.call.from == f))
        .filter(|r| status.map_or(true, |st| r.call.status == st))
        .collect();
    matching.sort_by_key(|r| std::cmp::Reverse(r.date_created));
    let calls: Vec<Value> = matching.into_iter().take(page_size).map(|r| inner.call_json(r)).collect();
    let path = format!("/{API_VERSION}/Accounts/{}/Calls.json", inner.account_sid);
    let page_uri = format!("{path}?PageSize={page_size}&Page=0");
    Ok(Json(json!({
        "end": calls.len().saturating_sub(1),
        "first_page_uri": page_uri,
        "next_page_uri": null,
        "page": 0,
        "page_size": page_size,
        "previous_page_uri": null,
        "start": 0,
        "uri": page_uri,
        "calls": calls,
    }))
    .into_response())
}

/// `{CallSid}.json` or `{CallSid}`.
fn call_sid_of(segment: &str) -> &str {
    segment.strip_suffix(".json").unwrap_or(segment)
}

async fn fetch_call(
    State(inner): State<Arc<Inner>>,
    path: Result<Path<(String, String)>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    inner.authenticate(&headers)?;
    let Ok(Path((account, segment))) = path else {
        return Err(not_found(uri.path()));
    };
    if account != inner.account_sid {
        return Err(not_found(uri.path()));
    }
    let book = lock(&inner.state);
    let Some(&i) = book.by_sid.get(call_sid_of(&segment)) else {
        return Err(not_found(uri.path()));
    };
    Ok(Json(inner.call_json(&book.calls[i])).into_response())
}

async fn update_call(
    State(inner): State<Arc<Inner>>,
    path: Result<Path<(String, String)>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    inner.authenticate(&headers)?;
    let Ok(Path((account, segment))) = path else {
        return Err(not_found(uri.path()));
    };
    if account != inner.account_sid {
        return Err(not_found(uri.path()));
    }
    let Ok(params) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body) else {
        return Err(bad_request(21200, "The request body is not valid form encoding"));
    };
    let sid = call_sid_of(&segment);
    let mut book = lock(&inner.state);
    let Some(rec) = book.get_mut(sid) else {
        return Err(not_found(uri.path()));
    };
    if rec.call.final_status.is_some() {
        return Err(bad_request(21220, "Call is not in-progress. Cannot redirect."));
    }
    let requested = first(&params, "Status");
    match requested {
        Some("completed") | Some("canceled") => {}
        Some(other) => return Err(bad_request(21200, format!("Status must be canceled or completed, not {other}"))),
        None if first(&params, "Url").is_some() || first(&params, "Twiml").is_some() => {
            return Err(bad_request(21200, "The emulator does not support redirecting a live call"))
        }
        None => {}
    }
    let answered = rec.call.status == "in-progress";
    let final_status = match (requested, answered) {
        // Before answer, both values hang up; Twilio reports `canceled`.
        (Some(_), false) => Some("canceled"),
        (Some("completed"), true) => Some("completed"),
        // `canceled` does not affect a call already in progress.
        _ => None,
    };
    if let Some(status) = final_status {
        rec.finish(status);
        let _ = rec.hangup.send(true);
        tracing::debug!(call_sid = %sid, status, "emulator call ended by API");
    }
    Ok(Json(inner.call_json(rec)).into_response())
}

// ---------------------------------------------------------------------------
// Call simulation
// ---------------------------------------------------------------------------

struct CallCtx {
    inner: Arc<Inner>,
    sid: String,
    to: String,
    from: String,
    persona: Persona,
    start: Option<Start>,
    status_callback: Option<Hook>,
    events: Events,
    ring_timeout: Duration,
    machine_detection: Option<String>,
    async_amd: bool,
    amd_callback: Option<Hook>,
    sequence: u32,
    remaining_digits: VecDeque<char>,
}

async fn sleep(d: Duration) {
    tokio::time::sleep(d.min(MAX_WAIT)).await;
}

async fn run_call(mut ctx: CallCtx, mut hangup: watch::Receiver<bool>) {
    let natural = tokio::select! {
        biased;
        () = async {
            if hangup.wait_for(|ended| *ended).await.is_err() {
                // The record (and its sender) outlives this task; never here.
                std::future::pending::<()>().await;
            }
        } => None,
        status = simulate(&mut ctx) => Some(status),
    };
    let final_status = {
        let mut book = lock(&ctx.inner.state);
        match book.get_mut(&ctx.sid) {
            Some(rec) => rec.finish(natural.unwrap_or("completed")),
            None => return,
        }
    };
    ctx.send_final_status(&final_status).await;
    tracing::debug!(call_sid = %ctx.sid, status = %final_status, "emulator call ended");
    ctx.inner.emit(EmulatorEvent::CallEnded { sid: ctx.sid.clone(), final_status });
}

/// Plays the call until it ends by itself; returns its final status.
async fn simulate(ctx: &mut CallCtx) -> &'static str {
    ctx.inner.update_live(&ctx.sid, |rec| {
        rec.start_time = Some(jiff::Timestamp::now());
    });
    if ctx.events.initiated {
        ctx.status_event("initiated").await;
    }
    let (ring, callee_hangup) = match ctx.persona {
        Persona::Busy => return "busy",
        Persona::Fail => return "failed",
        Persona::NoAnswer => (None, None),
        Persona::Answer { ring_ms, .. } | Persona::SilentHuman { ring_ms } => (Some(Duration::from_millis(ring_ms)), None),
        Persona::Machine { ring_ms, hangup_ms } => (Some(Duration::from_millis(ring_ms)), Some(Duration::from_millis(hangup_ms))),
    };
    ctx.inner.update_live(&ctx.sid, |rec| rec.call.status = "ringing".into());
    if ctx.events.ringing {
        ctx.status_event("ringing").await;
    }
    let ring = match ring {
        Some(ring) if ring <= ctx.ring_timeout => ring,
        _ => {
            sleep(ctx.ring_timeout).await;
            return "no-answer";
        }
    };
    sleep(ring).await;
    ctx.inner.update_live(&ctx.sid, |rec| {
        rec.call.status = "in-progress".into();
        rec.answered_at = Some(Instant::now());
    });
    let answered_at = Instant::now();
    if ctx.events.answered {
        ctx.status_event("in-progress").await;
    }
    if let Some(mode) = ctx.machine_detection.clone() {
        let answered_by = match (&ctx.persona, mode.as_str()) {
            (Persona::Machine { .. }, "DetectMessageEnd") => "machine_end_beep",
            (Persona::Machine { .. }, _) => "machine_start",
            _ => "human",
        };
        ctx.inner.update_live(&ctx.sid, |rec| rec.call.answered_by = Some(answered_by.into()));
        if ctx.async_amd {
            if let Some(hook) = ctx.amd_callback.clone() {
                let params = vec![
                    ("AccountSid".to_string(), ctx.inner.account_sid.clone()),
                    ("AnsweredBy".to_string(), answered_by.to_string()),
                    ("CallSid".to_string(), ctx.sid.clone()),
                    ("MachineDetectionDuration".to_string(), answered_at.elapsed().as_millis().to_string()),
                ];
                ctx.webhook(&hook, params, CallbackKind::Amd { answered_by: answered_by.to_string() }).await;
            }
        }
    }
    match callee_hangup {
        Some(after) => {
            let remaining = after.saturating_sub(answered_at.elapsed());
            tokio::select! {
                () = run_twiml(ctx) => {}
                () = sleep(remaining) => {}
            }
        }
        None => run_twiml(ctx).await,
    }
    "completed"
}

enum GatherOutcome {
    /// No result submitted: continue with the verb after `<Gather>`.
    FallThrough,
    /// The action answered with TwiML at this URL.
    Next(Element, String),
    /// The action could not be fetched or parsed: the call ends.
    Failed,
}

/// Executes the call's TwiML until it hangs up or runs out of verbs.
async fn run_twiml(ctx: &mut CallCtx) {
    let (mut doc, mut doc_url) = match ctx.start.take() {
        Some(Start::Twiml(doc)) => (doc, None),
        Some(Start::Url(hook)) => {
            let params = ctx.call_params();
            match ctx.fetch_twiml(&hook, params, CallbackKind::TwimlFetch).await {
                Some(doc) => (doc, Some(hook.url)),
                None => return,
            }
        }
        None => return,
    };
    for _ in 0..MAX_DOCUMENTS_PER_CALL {
        if doc.name != "Response" {
            tracing::warn!(call_sid = %ctx.sid, "emulator: TwiML root is not <Response>; hanging up");
            return;
        }
        let verbs: Vec<Element> = doc.elements().cloned().collect();
        let mut next = None;
        for verb in &verbs {
            match verb.name.as_str() {
                "Say" => ctx.say(verb),
                "Pause" => sleep(Duration::from_secs(attr_u64(verb, "length", 1))).await,
                "Hangup" | "Reject" => return,
                "Redirect" => {
                    let Some(hook) = ctx.resolve_hook(verb.text().trim(), verb, doc_url.as_deref()) else {
                        return;
                    };
                    let params = ctx.call_params();
                    match ctx.fetch_twiml(&hook, params, CallbackKind::TwimlFetch).await {
                        Some(d) => next = Some((d, hook.url)),
                        None => return,
                    }
                    break;
                }
                "Gather" => match ctx.gather(verb, doc_url.as_deref()).await {
                    GatherOutcome::FallThrough => {}
                    GatherOutcome::Next(d, url) => {
                        next = Some((d, url));
                        break;
                    }
                    GatherOutcome::Failed => return,
                },
                other => {
                    tracing::debug!(call_sid = %ctx.sid, verb = other, "emulator skips verb");
                }
            }
        }
        match next {
            Some((d, url)) => {
                doc = d;
                doc_url = Some(url);
            }
            None => return,
        }
    }
    tracing::warn!(call_sid = %ctx.sid, "emulator: too many TwiML documents; hanging up");
}

fn attr_u64(verb: &Element, name: &str, default: u64) -> u64 {
    verb.attr(name).and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

impl CallCtx {
    fn is_listening_human(&self) -> bool {
        matches!(self.persona, Persona::Answer { .. })
    }

    fn say(&self, verb: &Element) {
        let text = verb.text();
        self.inner.update_live(&self.sid, |rec| rec.call.spoken.push(text));
    }

    /// Parameters Twilio sends with every TwiML request of a live call.
    fn call_params(&self) -> Vec<(String, String)> {
        self.base_params("in-progress")
    }

    fn base_params(&self, call_status: &str) -> Vec<(String, String)> {
        [
            ("AccountSid", self.inner.account_sid.as_str()),
            ("ApiVersion", API_VERSION),
            ("CallSid", self.sid.as_str()),
            ("CallStatus", call_status),
            ("Called", self.to.as_str()),
            ("Caller", self.from.as_str()),
            ("Direction", "outbound-api"),
            ("From", self.from.as_str()),
            ("To", self.to.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn progress_params(&mut self, call_status: &str) -> Vec<(String, String)> {
        let mut params = self.base_params(call_status);
        params.push(("CallbackSource".into(), "call-progress-events".into()));
        params.push(("SequenceNumber".into(), self.sequence.to_string()));
        params.push(("Timestamp".into(), rfc2822(jiff::Timestamp::now())));
        self.sequence += 1;
        params
    }

    /// Whether the status callbacks of this call are lost (a fault mode).
    fn status_callbacks_lost(&self) -> bool {
        lock(&self.inner.state).faults.lost_status_callbacks.contains(&self.to)
    }

    async fn status_event(&mut self, call_status: &str) {
        let Some(hook) = self.status_callback.clone() else {
            return;
        };
        if self.status_callbacks_lost() {
            self.sequence += 1;
            return;
        }
        let params = self.progress_params(call_status);
        self.webhook(&hook, params, CallbackKind::Status { call_status: call_status.to_string() }).await;
    }

    async fn send_final_status(&mut self, final_status: &str) {
        let Some(hook) = self.status_callback.clone() else {
            return;
        };
        if self.status_callbacks_lost() {
            return;
        }
        let (duration, answered_by) = {
            let book = lock(&self.inner.state);
            let i = book.by_sid.get(&self.sid).copied();
            i.and_then(|i| book.calls.get(i)).map(|rec| (rec.duration_secs.unwrap_or(0), rec.call.answered_by.clone())).unwrap_or((0, None))
        };
        let mut params = self.progress_params(final_status);
        params.push(("CallDuration".into(), duration.to_string()));
        if let Some(answered_by) = answered_by {
            params.push(("AnsweredBy".into(), answered_by));
        }
        self.webhook(&hook, params, CallbackKind::Status { call_status: final_status.to_string() }).await;
    }

    /// A verb's target URL: absolute, or relative to the current document's
    /// URL (there is none for inline TwiML, and Twilio then cannot resolve
    /// it either: error 11100, the call ends).
    fn resolve_hook(&self, target: &str, verb: &Element, doc_url: Option<&str>) -> Option<Hook> {
        let method = match verb.attr("method").map(str::to_ascii_uppercase).as_deref() {
            Some("GET") => Method::GET,
            _ => Method::POST,
        };
        let url = if is_absolute_http_url(target) {
            target.to_string()
        } else {
            let base = doc_url.and_then(|u| url::Url::parse(u).ok());
            match base.and_then(|b| b.join(target).ok()) {
                Some(u) => u.to_string(),
                None => {
                    tracing::warn!(call_sid = %self.sid, "emulator: <{}> URL cannot be resolved (11100)", verb.name);
                    return None;
                }
            }
        };
        Some(Hook { url, method })
    }

    async fn gather(&mut self, verb: &Element, doc_url: Option<&str>) -> GatherOutcome {
        for nested in verb.elements() {
            match nested.name.as_str() {
                "Say" => self.say(nested),
                "Pause" => sleep(Duration::from_secs(attr_u64(nested, "length", 1))).await,
                _ => {}
            }
        }
        let timeout = Duration::from_secs(attr_u64(verb, "timeout", 5));
        let num_digits = verb.attr("numDigits").and_then(|n| n.trim().parse::<usize>().ok()).filter(|&n| n >= 1);
        let finish_key = verb.attr("finishOnKey").unwrap_or("#");
        let accepts_dtmf = verb.attr("input").unwrap_or("dtmf").split_whitespace().any(|i| i == "dtmf");

        let mut digits = String::new();
        let mut finished_on = String::new();
        if accepts_dtmf && self.is_listening_human() && !self.remaining_digits.is_empty() {
            if let Persona::Answer { think_ms, .. } = self.persona {
                sleep(Duration::from_millis(think_ms)).await;
            }
            while let Some(key) = self.remaining_digits.pop_front() {
                if !finish_key.is_empty() && finish_key.starts_with(key) {
                    finished_on.push(key);
                    break;
                }
                digits.push(key);
                if Some(digits.chars().count()) == num_digits {
                    break;
                }
            }
            let pressed = format!("{digits}{finished_on}");
            self.inner.update_live(&self.sid, |rec| rec.call.digits_pressed.push_str(&pressed));
        }
        let complete = !finished_on.is_empty() || num_digits.is_some_and(|n| digits.chars().count() >= n);
        if !complete {
            // Twilio waits `timeout` seconds for (more) input.
            sleep(timeout).await;
        }
        if digits.is_empty() && verb.attr("actionOnEmptyResult") != Some("true") {
            return GatherOutcome::FallThrough;
        }
        // Without `action`, Twilio posts to the current document's URL.
        let target = verb.attr("action").unwrap_or("");
        if target.is_empty() && doc_url.is_none() {
            tracing::warn!(call_sid = %self.sid, "emulator: <Gather> without action in inline TwiML; input dropped");
            return GatherOutcome::FallThrough;
        }
        let Some(hook) = self.resolve_hook(target, verb, doc_url) else {
            return GatherOutcome::Failed;
        };
        let mut params = self.call_params();
        params.push(("Digits".into(), digits.clone()));
        params.push(("FinishedOnKey".into(), finished_on));
        params.push(("msg".into(), "Gather End".into()));
        match self.fetch_twiml(&hook, params, CallbackKind::Gather { digits }).await {
            Some(doc) => GatherOutcome::Next(doc, hook.url),
            None => GatherOutcome::Failed,
        }
    }

    /// Requests TwiML; `None` (Twilio's "application error", the call ends)
    /// on a transport error, a non-2xx status, or a body that is not a
    /// `<Response>` document.
    async fn fetch_twiml(&self, hook: &Hook, params: Vec<(String, String)>, kind: CallbackKind) -> Option<Element> {
        let (status, body) = self.webhook(hook, params, kind).await?;
        if !(200..300).contains(&status) {
            tracing::warn!(call_sid = %self.sid, status, "emulator: TwiML request refused (11200); hanging up");
            return None;
        }
        let Some(body) = body else {
            tracing::warn!(call_sid = %self.sid, "emulator: TwiML response too large or not UTF-8; hanging up");
            return None;
        };
        match parse_document(&body) {
            Ok(doc) if doc.name == "Response" => Some(doc),
            Ok(_) | Err(_) => {
                tracing::warn!(call_sid = %self.sid, "emulator: invalid TwiML response (12100); hanging up");
                None
            }
        }
    }

    /// Sends one signed webhook, honouring the connection overrides in the
    /// URL's fragment as Twilio does (see [`crate::providers::twilio::callback`]): the request
    /// goes to the URL without its fragment, the signature covers the URL as
    /// configured (fragment included), and a failure the retry policy (`rp`)
    /// names is retried up to `rc` times within `tt`, with the same
    /// `I-Twilio-Idempotency-Token`. Twilio does not document the spacing of
    /// its retries; the emulator waits 250 ms, then doubles (at most 4 s).
    /// Every try is reported as an [`EmulatorEvent::CallbackSent`].
    ///
    /// Returns the last HTTP status and body (when it is UTF-8 and at most
    /// 64 kB), or `None` if the last try failed (connect error, timeout).
    async fn webhook(&self, hook: &Hook, params: Vec<(String, String)>, kind: CallbackKind) -> Option<(u16, Option<String>)> {
        let (request_url, overrides) = ConnectionOverrides::from_url(&hook.url);
        let idempotency_token = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let mut retries = 0u32;
        loop {
            let remaining = overrides.total_time.saturating_sub(started.elapsed());
            let read_timeout = overrides.read_timeout.min(remaining).max(Duration::from_millis(100));
            let result = self.webhook_once(hook, request_url, &params, &kind, &idempotency_token, read_timeout).await;
            let retry = match &result {
                Ok((status, _)) => ((400..500).contains(status) && overrides.retry_4xx) || ((500..600).contains(status) && overrides.retry_5xx),
                Err(WebhookFailure::Connect) => overrides.retry_connect_failure,
                Err(WebhookFailure::Timeout) => overrides.retry_read_timeout,
                Err(WebhookFailure::Other) => false,
            };
            let backoff = Duration::from_millis(250 << retries.min(4));
            if !retry || retries >= overrides.retry_count || started.elapsed() + backoff >= overrides.total_time {
                return result.ok();
            }
            tracing::info!(call_sid = %self.sid, ?kind, retry = retries + 1, "emulator: retrying a webhook (connection overrides)");
            sleep(backoff).await;
            retries += 1;
        }
    }

    /// One try of [`CallCtx::webhook`].
    async fn webhook_once(
        &self,
        hook: &Hook,
        request_url: &str,
        params: &[(String, String)],
        kind: &CallbackKind,
        idempotency_token: &str,
        read_timeout: Duration,
    ) -> Result<(u16, Option<String>), WebhookFailure> {
        let token = &self.inner.auth_token;
        let encoded = serde_urlencoded::to_string(params).unwrap_or_default();
        let request = if hook.method == Method::GET {
            let separator = if request_url.contains('?') { '&' } else { '?' };
            let full_url = format!("{request_url}{separator}{encoded}");
            // The signature covers the URL as configured: a fragment stays at the end.
            let signed_url = match hook.url.split_once('#') {
                Some((_, fragment)) => format!("{full_url}#{fragment}"),
                None => full_url.clone(),
            };
            let signature = compute_signature(token, &signed_url, &[]);
            self.inner.http.get(full_url).header(SIGNATURE_HEADER, signature)
        } else {
            let signature = compute_signature(token, &hook.url, params);
            self.inner
                .http
                .post(request_url)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(SIGNATURE_HEADER, signature)
                .body(encoded)
        };
        let result = request
            .timeout(read_timeout)
            .header(header::USER_AGENT, "TwilioProxy/1.1")
            .header(header::ACCEPT, "*/*")
            .header("I-Twilio-Idempotency-Token", idempotency_token)
            .send()
            .await;
        let outcome = match result {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let mut body = Vec::new();
                let mut too_large = false;
                loop {
                    match response.chunk().await {
                        Ok(Some(chunk)) => {
                            if body.len() + chunk.len() > MAX_TWIML_RESPONSE_BYTES {
                                too_large = true;
                                break;
                            }
                            body.extend_from_slice(&chunk);
                        }
                        Ok(None) => break,
                        Err(_) => {
                            too_large = true;
                            break;
                        }
                    }
                }
                let body = if too_large { None } else { String::from_utf8(body).ok() };
                if !(200..300).contains(&status) {
                    tracing::warn!(call_sid = %self.sid, ?kind, status, "emulator: engine answered a webhook with an error");
                }
                Ok((status, body))
            }
            Err(e) => {
                let (what, failure) = if e.is_connect() {
                    ("could not connect", WebhookFailure::Connect)
                } else if e.is_timeout() {
                    ("timed out", WebhookFailure::Timeout)
                } else {
                    ("failed", WebhookFailure::Other)
                };
                tracing::warn!(call_sid = %self.sid, ?kind, "emulator: webhook {what}");
                Err(failure)
            }
        };
        self.inner.emit(EmulatorEvent::CallbackSent { sid: self.sid.clone(), kind: kind.clone(), status: outcome.as_ref().ok().map(|(s, _)| *s) });
        outcome
    }
}

/// Why a webhook try got no HTTP answer.
#[derive(Debug)]
enum WebhookFailure {
    /// The TCP (or TLS) connection could not be made.
    Connect,
    /// No answer within the read timeout.
    Timeout,
    /// Anything else (reset mid-request, …).
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::twilio::client::{CreateCallRequest, TwilioClient, TwilioError};
    use crate::providers::twilio::signature::verify_signature;
    use crate::providers::twilio::twiml::{say_and_gather, say_and_hangup, NO_INPUT_GOODBYE};

    const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
    const TOKEN: &str = "emulator-test-auth-token";
    const FROM: &str = "+15005550006";
    const NURSE: &str = "+15551230001";
    const MESSAGE: &str = "Critical alert: bed 12, SpO2 82%. Press 1 to acknowledge.";
    const ACK: &str = "Acknowledged. Thank you.";
    const WAIT: Duration = Duration::from_secs(30);

    /// One webhook received by the test's engine stand-in.
    #[derive(Clone, Debug)]
    struct Hit {
        path: String,
        params: Vec<(String, String)>,
        signature_ok: bool,
    }

    impl Hit {
        fn get(&self, name: &str) -> Option<&str> {
            self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
        }

        /// `"/status ringing"`, `"/amd human"`, `"/gather 1"`.
        fn summary(&self) -> String {
            let detail = match self.path.as_str() {
                "/status" => self.get("CallStatus"),
                "/amd" => self.get("AnsweredBy"),
                "/gather" => self.get("Digits"),
                _ => None,
            };
            format!("{} {}", self.path, detail.unwrap_or("?"))
        }
    }

    struct Receiver {
        base: String,
        hits: Arc<Mutex<Vec<Hit>>>,
    }

    struct ReceiverState {
        base: String,
        hits: Arc<Mutex<Vec<Hit>>>,
        status_reply: StatusCode,
    }

    /// A tiny engine stand-in: verifies every signature against the URL it
    /// was reached at, records the parameters, and answers Gathers with
    /// TwiML (`Digits=2` asks again, anything else says goodbye).
    async fn receiver(status_reply: StatusCode) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(ReceiverState { base: base.clone(), hits: hits.clone(), status_reply });
        let app = Router::new().fallback(hook).with_state(state);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { base, hits }
    }

    async fn hook(State(s): State<Arc<ReceiverState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
        let url = format!("{}{}", s.base, uri.path_and_query().map_or("/", |p| p.as_str()));
        let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap();
        let signature = headers.get("x-twilio-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
        let hit = Hit { path: uri.path().to_string(), signature_ok: verify_signature(TOKEN, &url, &params, signature), params };
        lock(&s.hits).push(hit.clone());
        match hit.path.as_str() {
            "/status" => s.status_reply.into_response(),
            "/amd" => StatusCode::NO_CONTENT.into_response(),
            "/gather" => {
                let twiml =
                    if hit.get("Digits") == Some("2") { say_and_gather("Press 1 to confirm.", &format!("{}/gather", s.base), 5) } else { say_and_hangup(ACK) };
                ([(header::CONTENT_TYPE, "text/xml")], twiml).into_response()
            }
            _ => StatusCode::NOT_FOUND.into_response(),
        }
    }

    struct Rig {
        emu: EmulatorHandle,
        recv: Receiver,
        client: TwilioClient,
        events: broadcast::Receiver<EmulatorEvent>,
    }

    async fn rig_with(personas: &[(&str, Persona)], status_reply: StatusCode) -> Rig {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let emu = TwilioEmulator::start(
            EmulatorConfig {
                account_sid: ACCOUNT.into(),
                auth_token: TOKEN.into(),
                personas: personas.iter().map(|(n, p)| (n.to_string(), p.clone())).collect(),
                default_persona: Persona::Fail,
            },
            listener,
        )
        .await
        .unwrap();
        let client = TwilioClient::new(reqwest::Client::new(), &emu.base_url(), ACCOUNT, TOKEN);
        let events = emu.subscribe();
        Rig { recv: receiver(status_reply).await, emu, client, events }
    }

    async fn rig(personas: &[(&str, Persona)]) -> Rig {
        rig_with(personas, StatusCode::NO_CONTENT).await
    }

    impl Rig {
        fn alert(&self, to: &str, ring_timeout_seconds: u32) -> CreateCallRequest {
            let base = &self.recv.base;
            CreateCallRequest {
                to: to.into(),
                from: FROM.into(),
                twiml: say_and_gather(MESSAGE, &format!("{base}/gather?alert=42&attempt=1"), 5),
                status_callback: format!("{base}/status?alert=42&attempt=1"),
                ring_timeout_seconds,
                machine_detection: true,
                async_amd_status_callback: Some(format!("{base}/amd?alert=42")),
            }
        }

        /// Waits for an event matching `pred`.
        async fn until(&mut self, mut pred: impl FnMut(&EmulatorEvent) -> bool) -> EmulatorEvent {
            tokio::time::timeout(WAIT, async {
                loop {
                    let event = self.events.recv().await.expect("event stream");
                    if pred(&event) {
                        return event;
                    }
                }
            })
            .await
            .expect("timed out waiting for an emulator event")
        }

        async fn ended(&mut self, sid: &str) -> String {
            match self.until(|e| matches!(e, EmulatorEvent::CallEnded { sid: s, .. } if s == sid)).await {
                EmulatorEvent::CallEnded { final_status, .. } => final_status,
                _ => unreachable!(),
            }
        }

        fn hits(&self) -> Vec<Hit> {
            lock(&self.recv.hits).clone()
        }

        fn summaries(&self) -> Vec<String> {
            let hits = self.hits();
            assert!(hits.iter().all(|h| h.signature_ok), "a signature failed to verify: {hits:#?}");
            hits.iter().map(Hit::summary).collect()
        }
    }

    /// Twilio refuses requests beyond the account's concurrency limit with
    /// 429 / 20429; a client capped at the limit queues its burst instead.
    #[tokio::test]
    async fn concurrency_limit_refuses_beyond_it_and_a_capped_client_stays_under() {
        let rig = rig(&[(NURSE, Persona::NoAnswer)]).await;
        rig.emu.set_concurrency_limit(Some(3));
        rig.emu.set_create_response_delay(Duration::from_millis(150));
        let burst = |client: TwilioClient| {
            let request = rig.alert(NURSE, 5);
            async move {
                let calls = (0..12).map(|_| {
                    let (client, request) = (client.clone(), request.clone());
                    async move { client.create_call(&request).await }
                });
                futures_util::future::join_all(calls).await
            }
        };
        // Uncapped (beyond the limit): some are refused, retryable, 20429.
        let results = burst(rig.client.clone().with_max_concurrent_requests(12)).await;
        let refused: Vec<&TwilioError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(!refused.is_empty(), "12 requests at once beyond a limit of 3 must meet 429s");
        for e in &refused {
            assert!(matches!(e, TwilioError::Api { http_status: 429, code: Some(20429), .. }), "{e:?}");
            assert!(e.is_retryable());
        }
        let (_, refused_before) = rig.emu.request_concurrency();
        assert_eq!(refused_before as usize, refused.len());
        // Capped at the limit: every request goes through, none is refused.
        let results = burst(rig.client.clone().with_max_concurrent_requests(3)).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let (peak, refused_after) = rig.emu.request_concurrency();
        assert_eq!(refused_after, refused_before, "the capped client met a 429");
        assert!(peak <= 3, "peak {peak}");
    }

    /// The client keeps a fifth of its places for critical sends: while
    /// ordinary requests hold every other place and more wait, a critical
    /// call is sent at once, ahead of the ordinary ones queued before it.
    #[tokio::test]
    async fn critical_requests_take_the_reserved_places_ahead_of_ordinary_ones() {
        use crate::providers::twilio::client::RequestPriority;
        const CRITICAL: &str = "+15005550009";
        let rig = rig(&[(NURSE, Persona::NoAnswer), (CRITICAL, Persona::NoAnswer)]).await;
        rig.emu.set_create_response_delay(Duration::from_millis(400));
        let client = rig.client.clone().with_max_concurrent_requests(5); // 4 ordinary places, 1 reserved
        let ordinary = rig.alert(NURSE, 5);
        let flood = futures_util::future::join_all((0..8).map(|_| {
            let (client, request) = (client.clone(), ordinary.clone());
            async move { client.create_call_as(&request, RequestPriority::Ordinary).await }
        }));
        let critical = async {
            // Once the ordinary requests hold their four places (and four more wait):
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while rig.emu.calls().len() < 4 {
                assert!(tokio::time::Instant::now() < deadline, "the ordinary requests never arrived");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.create_call_as(&rig.alert(CRITICAL, 5), RequestPriority::Critical).await
        };
        let (flood, critical) = tokio::join!(flood, critical);
        assert!(flood.iter().all(Result::is_ok) && critical.is_ok());
        let calls = rig.emu.calls();
        let critical_at = calls.iter().find(|c| c.to == CRITICAL).expect("the critical call").received_at;
        let mut ordinary_at: Vec<_> = calls.iter().filter(|c| c.to == NURSE).map(|c| c.received_at).collect();
        ordinary_at.sort();
        assert_eq!(ordinary_at.len(), 8);
        assert!(critical_at < ordinary_at[4], "the critical call waited behind the ordinary ones queued before it");
    }

    #[tokio::test]
    async fn answered_call_round_trip() {
        let persona = Persona::Answer { ring_ms: 20, think_ms: 20, digits: "1".into() };
        let mut rig = rig(&[(NURSE, persona)]).await;
        let created = rig.client.create_call(&rig.alert(NURSE, 30)).await.unwrap();
        assert_eq!(created.status, "queued");
        assert_eq!(created.sid.len(), 34);
        assert!(created.sid.starts_with("CA"));
        assert!(created.sid[2..].chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));

        assert_eq!(rig.ended(&created.sid).await, "completed");
        assert_eq!(rig.summaries(), ["/status initiated", "/status ringing", "/status in-progress", "/amd human", "/gather 1", "/status completed"]);

        let hits = rig.hits();
        let statuses: Vec<&Hit> = hits.iter().filter(|h| h.path == "/status").collect();
        for (i, hit) in statuses.iter().enumerate() {
            assert_eq!(hit.get("SequenceNumber"), Some(i.to_string().as_str()));
            assert_eq!(hit.get("CallSid"), Some(created.sid.as_str()));
            assert_eq!(hit.get("AccountSid"), Some(ACCOUNT));
            assert_eq!(hit.get("From"), Some(FROM));
            assert_eq!(hit.get("To"), Some(NURSE));
            assert_eq!(hit.get("Direction"), Some("outbound-api"));
            assert_eq!(hit.get("ApiVersion"), Some("2010-04-01"));
            assert_eq!(hit.get("CallbackSource"), Some("call-progress-events"));
            assert!(hit.get("Timestamp").unwrap().ends_with(" +0000"));
        }
        let last = statuses.last().unwrap();
        assert!(last.get("CallDuration").unwrap().parse::<u64>().is_ok());
        assert_eq!(last.get("AnsweredBy"), Some("human"));
        let amd = &hits[3];
        assert_eq!(amd.get("CallSid"), Some(created.sid.as_str()));
        assert_eq!(amd.get("AccountSid"), Some(ACCOUNT));
        assert!(amd.get("MachineDetectionDuration").is_some());
        let gather = &hits[4];
        assert_eq!(gather.get("CallStatus"), Some("in-progress"));
        assert_eq!(gather.get("FinishedOnKey"), Some(""));
        assert_eq!(gather.get("From"), Some(FROM));
        assert_eq!(gather.get("To"), Some(NURSE));

        let calls = rig.emu.calls();
        assert_eq!(calls.len(), 1);
        let call = &calls[0];
        assert_eq!(call.sid, created.sid);
        assert_eq!(call.final_status.as_deref(), Some("completed"));
        assert_eq!(call.digits_pressed, "1");
        assert_eq!(call.answered_by.as_deref(), Some("human"));
        assert_eq!(call.spoken, [MESSAGE, ACK]);
        let events: Vec<&str> = call.params.iter().filter(|(k, _)| k == "StatusCallbackEvent").map(|(_, v)| v.as_str()).collect();
        assert_eq!(events, ["initiated", "ringing", "answered", "completed"]);

        // The call resource, as GET returns it.
        let url = format!("{}/2010-04-01/Accounts/{ACCOUNT}/Calls/{}.json", rig.emu.base_url(), created.sid);
        let resource: Value = reqwest::Client::new().get(&url).basic_auth(ACCOUNT, Some(TOKEN)).send().await.unwrap().json().await.unwrap();
        assert_eq!(resource["status"], "completed");
        assert_eq!(resource["direction"], "outbound-api");
        assert_eq!(resource["api_version"], "2010-04-01");
        assert_eq!(resource["answered_by"], "human");
        assert!(resource["duration"].is_string());
        assert!(resource["date_created"].as_str().unwrap().ends_with("+0000"));
        assert_eq!(resource["uri"], format!("/2010-04-01/Accounts/{ACCOUNT}/Calls/{}.json", created.sid));
        rig.emu.shutdown().await;
    }

    #[tokio::test]
    async fn second_gather_gets_the_next_digit() {
        let persona = Persona::Answer { ring_ms: 0, think_ms: 10, digits: "21".into() };
        let mut rig = rig(&[(NURSE, persona)]).await;
        let mut req = rig.alert(NURSE, 30);
        req.machine_detection = false;
        req.async_amd_status_callback = None;
        let created = rig.client.create_call(&req).await.unwrap();
        assert_eq!(rig.ended(&created.sid).await, "completed");
        assert_eq!(rig.summaries(), ["/status initiated", "/status ringing", "/status in-progress", "/gather 2", "/gather 1", "/status completed"]);
        let call = &rig.emu.calls()[0];
        assert_eq!(call.digits_pressed, "21");
        assert_eq!(call.answered_by, None);
        assert_eq!(call.spoken, [MESSAGE, "Press 1 to confirm.", ACK]);
    }

    #[tokio::test]
    async fn wrong_auth_token_is_20003() {
        let rig = rig(&[]).await;
        let bad = TwilioClient::new(reqwest::Client::new(), &format!("{}/", rig.emu.base_url()), ACCOUNT, "not-the-token");
        let err = bad.create_call(&rig.alert(NURSE, 30)).await.unwrap_err();
        match &err {
            TwilioError::Api { http_status: 401, code: Some(20003), more_info: Some(info), .. } => assert_eq!(info, "https://www.twilio.com/docs/errors/20003"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!err.is_retryable());
        let err = bad.end_call("CA00000000000000000000000000000000").await.unwrap_err();
        assert!(matches!(err, TwilioError::Api { http_status: 401, code: Some(20003), .. }));
        assert!(rig.emu.calls().is_empty());
    }

    #[tokio::test]
    async fn create_call_validation_errors() {
        let rig = rig(&[]).await;
        let expect = |result: Result<(), TwilioError>, status: u16, want: i64| match result {
            Err(TwilioError::Api { http_status, code: Some(code), .. }) if http_status == status && code == want => {}
            other => panic!("expected {status}/{want}, got {other:?}"),
        };
        let mut req = rig.alert("5551230001", 30);
        expect(rig.client.create_call(&req).await.map(drop), 400, 21211);
        req.to = "+0551230001".into();
        expect(rig.client.create_call(&req).await.map(drop), 400, 21211);
        req.to = "+1555".into();
        expect(rig.client.create_call(&req).await.map(drop), 400, 21211);
        req.to = String::new();
        expect(rig.client.create_call(&req).await.map(drop), 400, 21201);
        req.to = NURSE.into();
        req.from = String::new();
        expect(rig.client.create_call(&req).await.map(drop), 400, 21213);
        req.from = FROM.into();
        req.twiml = String::new();
        expect(rig.client.create_call(&req).await.map(drop), 400, 21205);
        req.twiml = format!("<Response><Say>{}</Say></Response>", "a".repeat(4000));
        expect(rig.client.create_call(&req).await.map(drop), 400, 32018);
        req.twiml = "<Response><Say>unclosed</Response>".into();
        expect(rig.client.create_call(&req).await.map(drop), 400, 12100);
        req.twiml = say_and_hangup("hi");
        req.status_callback = "/relative/status".into();
        expect(rig.client.create_call(&req).await.map(drop), 400, 21609);
        // Nothing was accepted.
        assert!(rig.emu.calls().is_empty());
        // Unknown call SID.
        expect(rig.client.end_call("CA00000000000000000000000000000000").await, 404, 20404);
    }

    #[tokio::test]
    async fn raw_api_edges_are_twilio_shaped() {
        let rig = rig(&[]).await;
        let http = reqwest::Client::new();
        let base = rig.emu.base_url();
        let calls_url = format!("{base}/2010-04-01/Accounts/{ACCOUNT}/Calls.json");
        let form = |extra: &[(&str, &str)]| {
            let mut f = vec![("To", NURSE.to_string()), ("From", FROM.to_string()), ("Twiml", say_and_hangup("hi"))];
            f.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
            serde_urlencoded::to_string(f).unwrap()
        };
        async fn body(r: reqwest::Response) -> (u16, Value) {
            (r.status().as_u16(), r.json().await.unwrap())
        }

        // No credentials at all.
        let r = http.post(&calls_url).body(form(&[])).send().await.unwrap();
        assert!(r.headers().contains_key("www-authenticate"));
        let (status, json) = body(r).await;
        assert_eq!((status, json["code"].as_i64()), (401, Some(20003)));
        assert_eq!(json["status"], 401);
        assert_eq!(json["more_info"], "https://www.twilio.com/docs/errors/20003");
        assert!(json["message"].is_string());

        // Another account in the path.
        let other = format!("{base}/2010-04-01/Accounts/ACffffffffffffffffffffffffffffffff/Calls.json");
        let r = http.post(&other).basic_auth(ACCOUNT, Some(TOKEN)).body(form(&[])).send().await.unwrap();
        assert_eq!(body(r).await.1["code"], 20404);

        // Unknown route and wrong method.
        let r = http.get(format!("{base}/nope")).send().await.unwrap();
        assert_eq!(body(r).await, (404, body_of(20404, 404, "/nope")));
        let r = http.delete(&calls_url).basic_auth(ACCOUNT, Some(TOKEN)).send().await.unwrap();
        let (status, json) = body(r).await;
        assert_eq!((status, json["code"].as_i64()), (405, Some(20004)));
        // The call list (Twilio's page envelope), filtered by To.
        let r = http.get(format!("{calls_url}?To=%2B15550000000&PageSize=5")).basic_auth(ACCOUNT, Some(TOKEN)).send().await.unwrap();
        let (status, json) = body(r).await;
        assert_eq!(status, 200);
        assert_eq!(json["calls"], serde_json::json!([]));
        assert_eq!(json["page_size"], 5);
        assert!(json["next_page_uri"].is_null());

        // Invalid StatusCallbackEvent.
        let r = http
            .post(&calls_url)
            .basic_auth(ACCOUNT, Some(TOKEN))
            .body(form(&[("StatusCallback", "http://127.0.0.1:9/s"), ("StatusCallbackEvent", "initiated bogus")]))
            .send()
            .await
            .unwrap();
        let (status, json) = body(r).await;
        assert_eq!((status, json["code"].as_i64()), (400, Some(21626)));

        assert!(rig.emu.calls().is_empty());
    }

    fn body_of(code: i64, status: u16, path: &str) -> Value {
        json!({
            "code": code,
            "message": format!("The requested resource {path} was not found"),
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status,
        })
    }

    #[tokio::test]
    async fn busy_persona_set_at_runtime() {
        let mut rig = rig(&[]).await;
        rig.emu.set_persona(NURSE, Persona::Busy);
        let created = rig.client.create_call(&rig.alert(NURSE, 30)).await.unwrap();
        assert_eq!(rig.ended(&created.sid).await, "busy");
        assert_eq!(rig.summaries(), ["/status initiated", "/status busy"]);
        assert_eq!(rig.hits()[1].get("CallDuration"), Some("0"));
        assert_eq!(rig.emu.calls()[0].answered_by, None);
    }

    #[tokio::test]
    async fn default_persona_fails() {
        let mut rig = rig(&[]).await;
        let created = rig.client.create_call(&rig.alert("+15559990000", 30)).await.unwrap();
        assert_eq!(rig.ended(&created.sid).await, "failed");
        assert_eq!(rig.summaries(), ["/status initiated", "/status failed"]);
    }

    #[tokio::test]
    async fn no_answer_after_the_ring_timeout() {
        let mut rig = rig(&[(NURSE, Persona::NoAnswer)]).await;
        let started = Instant::now();
        let created = rig.client.create_call(&rig.alert(NURSE, 1)).await.unwrap();
        assert_eq!(rig.ended(&created.sid).await, "no-answer");
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert_eq!(rig.summaries(), ["/status initiated", "/status ringing", "/status no-answer"]);
    }

    #[tokio::test]
    async fn answer_slower_than_timeout_is_no_answer() {
        let persona = Persona::Answer { ring_ms: 5_000, think_ms: 0, digits: "1".into() };
        let mut rig = rig(&[(NURSE, persona)]).await;
        let created = rig.client.create_call(&rig.alert(NURSE, 1)).await.unwrap();
        assert_eq!(rig.ended(&created.sid).await, "no-answer");
        assert_eq!(rig.emu.calls()[0].digits_pressed, "");
    }

    #[tokio::test]
    async fn machine_is_detected_and_never_presses() {
        let persona = Persona::Machine { ring_ms: 10, hangup_ms: 100 };
        let mut rig = rig(&[(NURSE, persona)]).await;
        let created = rig.client.create_call(&rig.alert(NURSE, 30)).await.unwrap();
        assert_eq!(rig.ended(&created.sid).await, "completed");
        assert_eq!(rig.summaries(), ["/status initiated", "/status ringing", "/status in-progress", "/amd machine_start", "/status completed"]);
        assert_eq!(rig.hits()[4].get("AnsweredBy"), Some("machine_start"));
        let call = &rig.emu.calls()[0];
        assert_eq!(call.digits_pressed, "");
        assert_eq!(call.answered_by.as_deref(), Some("machine_start"));
        assert_eq!(call.spoken, [MESSAGE]);
    }

    #[tokio::test]
    async fn silent_human_gather_times_out_and_call_completes() {
        let mut rig = rig(&[(NURSE, Persona::SilentHuman { ring_ms: 0 })]).await;
        let mut req = rig.alert(NURSE, 30);
        req.twiml = say_and_gather(MESSAGE, &format!("{}/gather", rig.recv.base), 1);
        let created = rig.client.create_call(&req).await.unwrap();
        assert_eq!(rig.ended(&created.sid).await, "completed");
        assert_eq!(rig.summaries(), ["/status initiated", "/status ringing", "/status in-progress", "/amd human", "/status completed"]);
        assert_eq!(rig.emu.calls()[0].spoken, [MESSAGE, NO_INPUT_GOODBYE]);
    }

    #[tokio::test]
    async fn end_call_cancels_a_ringing_call() {
        let mut rig = rig(&[(NURSE, Persona::NoAnswer)]).await;
        let created = rig.client.create_call(&rig.alert(NURSE, 60)).await.unwrap();
        let sid = created.sid.clone();
        rig.until(|e| {
            matches!(e, EmulatorEvent::CallbackSent { sid: s, kind: CallbackKind::Status { call_status }, .. }
                if *s == sid && call_status == "ringing")
        })
        .await;
        rig.client.end_call(&created.sid).await.unwrap();
        assert_eq!(rig.ended(&created.sid).await, "canceled");
        assert_eq!(rig.summaries(), ["/status initiated", "/status ringing", "/status canceled"]);
        // Ending it again is not an error (Twilio: 400, code 21220).
        rig.client.end_call(&created.sid).await.unwrap();
        assert_eq!(rig.emu.calls()[0].final_status.as_deref(), Some("canceled"));
    }

    #[tokio::test]
    async fn end_call_hangs_up_an_answered_call() {
        let mut rig = rig(&[(NURSE, Persona::SilentHuman { ring_ms: 0 })]).await;
        let created = rig.client.create_call(&rig.alert(NURSE, 60)).await.unwrap();
        let sid = created.sid.clone();
        rig.until(|e| matches!(e, EmulatorEvent::CallbackSent { sid: s, kind: CallbackKind::Amd { .. }, .. } if *s == sid)).await;
        // `canceled` does not touch an answered call (Twilio documents this).
        let url = format!("{}/2010-04-01/Accounts/{ACCOUNT}/Calls/{sid}.json", rig.emu.base_url());
        let r: Value = reqwest::Client::new()
            .post(&url)
            .basic_auth(ACCOUNT, Some(TOKEN))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("Status=canceled")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["status"], "in-progress");
        rig.client.end_call(&created.sid).await.unwrap();
        assert_eq!(rig.ended(&created.sid).await, "completed");
        assert_eq!(rig.summaries(), ["/status initiated", "/status ringing", "/status in-progress", "/amd human", "/status completed"]);
        assert_eq!(rig.emu.calls()[0].digits_pressed, "");
    }

    #[tokio::test]
    async fn default_events_and_rejected_callbacks() {
        let persona = Persona::Answer { ring_ms: 0, think_ms: 0, digits: String::new() };
        let mut rig = rig_with(&[(NURSE, persona)], StatusCode::INTERNAL_SERVER_ERROR).await;
        let status_url = format!("{}/status", rig.recv.base);
        let form =
            serde_urlencoded::to_string([("To", NURSE), ("From", FROM), ("Twiml", &say_and_hangup("Test call.")), ("StatusCallback", &status_url)]).unwrap();
        let r = reqwest::Client::new()
            .post(format!("{}/2010-04-01/Accounts/{ACCOUNT}/Calls.json", rig.emu.base_url()))
            .basic_auth(ACCOUNT, Some(TOKEN))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let created: Value = r.json().await.unwrap();
        let sid = created["sid"].as_str().unwrap().to_string();
        assert_eq!(created["status"], "queued");
        let rejected = rig.until(|e| matches!(e, EmulatorEvent::CallbackSent { sid: s, .. } if *s == sid)).await;
        assert!(matches!(
            rejected,
            EmulatorEvent::CallbackSent { kind: CallbackKind::Status { ref call_status }, status: Some(500), .. }
                if call_status == "completed"
        ));
        assert_eq!(rig.ended(&sid).await, "completed");
        // Without StatusCallbackEvent only the final status is reported.
        assert_eq!(rig.summaries(), ["/status completed"]);
        assert_eq!(rig.emu.calls()[0].spoken, ["Test call."]);
    }

    #[test]
    fn status_callback_events_parse() {
        let p = |list: &[&str]| -> Vec<(String, String)> { list.iter().map(|v| ("StatusCallbackEvent".to_string(), v.to_string())).collect() };
        assert_eq!(parse_events(&p(&["initiated ringing", "answered"])), Ok(Events { initiated: true, ringing: true, answered: true }));
        assert_eq!(parse_events(&p(&["completed"])), Ok(Events::default()));
        assert_eq!(parse_events(&[]), Ok(Events::default()));
        assert_eq!(parse_events(&p(&["initiated,ringing"])), Err("initiated,ringing".to_string()));
    }

    #[test]
    fn e164_and_personas() {
        for good in ["+15551230001", "+4915123456789", "+12345678", "+123456789012345"] {
            assert!(is_e164(good), "{good}");
        }
        for bad in ["15551230001", "+0551230001", "+1234567", "+1234567890123456", "+1555-123-0001", "", "+"] {
            assert!(!is_e164(bad), "{bad}");
        }
        let personas: HashMap<String, Persona> = serde_json::from_str(
            r#"{
                "+15551230001": {"behaviour": "answer", "ring_ms": 2000, "think_ms": 1500, "digits": "1"},
                "+15551230002": {"behaviour": "no_answer"},
                "+15551230003": {"behaviour": "machine", "ring_ms": 1000, "hangup_ms": 20000},
                "+15551230004": {"behaviour": "silent_human", "ring_ms": 500},
                "+15551230005": {"behaviour": "busy"},
                "+15551230006": {"behaviour": "fail"}
            }"#,
        )
        .unwrap();
        assert_eq!(personas["+15551230002"], Persona::NoAnswer);
        assert_eq!(personas["+15551230003"], Persona::Machine { ring_ms: 1000, hangup_ms: 20000 });
        assert!(serde_json::from_str::<Persona>(r#"{"behaviour": "dance"}"#).is_err());
        assert_eq!(rfc2822("2024-03-05T05:34:45Z".parse().unwrap()), "Tue, 05 Mar 2024 05:34:45 +0000");
    }
}
