//! Twilio Programmable Voice REST client: place an alert call, end it.
//!
//! Follows Twilio's Call resource reference
//! (<https://www.twilio.com/docs/voice/api/call-resource>): "Create a Call"
//! (`POST /2010-04-01/Accounts/{AccountSid}/Calls.json`) and "Update a Call"
//! (`POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`), HTTP
//! Basic authentication with the Account SID and Auth Token, form-encoded
//! request bodies, and Twilio's JSON error body
//! (`{"code", "message", "more_info", "status"}`,
//! <https://www.twilio.com/docs/usage/twilios-response#response-formats-exceptions>).
//!
//! Logging: only call SIDs, HTTP statuses and Twilio error codes are logged.
//! Phone numbers, TwiML (which holds patient-related alert text) and the
//! Auth Token never are; Twilio's error messages can quote the phone number,
//! so long digit runs are redacted from [`TwilioError`]'s `Display`.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// Twilio's limit on the inline `Twiml` parameter, in characters (error
/// 32018, "Twiml size exceeded maximum allowed value of 4000 characters").
pub const MAX_INLINE_TWIML_CHARS: usize = 4000;

/// Timeout applied to each REST request (connect + send + full response).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response body read from the API; Twilio's are a few kB.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Call-progress events requested on every call (`StatusCallbackEvent`).
/// `answered` is reported with `CallStatus=in-progress`; the final event is
/// reported as `completed`, `busy`, `no-answer`, `failed` or `canceled`.
pub const STATUS_CALLBACK_EVENTS: [&str; 4] = ["initiated", "ringing", "answered", "completed"];

/// A Twilio Voice REST client bound to one account.
///
/// Cheap to clone (`reqwest::Client` is reference-counted). `Debug` never
/// prints the Auth Token.
#[derive(Clone)]
pub struct TwilioClient {
    http: reqwest::Client,
    api_base: String,
    account_sid: String,
    auth_token: String,
    request_timeout: Duration,
    /// Requests to the account at once ([`TwilioClient::with_max_concurrent_requests`]).
    concurrency: Arc<tokio::sync::Semaphore>,
    /// The places of those that [`RequestPriority::Ordinary`] requests may
    /// hold: all but the ones reserved for critical sends.
    ordinary: Arc<tokio::sync::Semaphore>,
}

/// Which places of the account's request limiter a request may take
/// ([`TwilioClient::with_max_concurrent_requests`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestPriority {
    /// A critical run's send (an escalation's call or text, a `critical`
    /// workflow's notification): any free place, including the reserved
    /// ones, so that a flood of other work never holds it (DESIGN.md
    /// invariant 10).
    Critical,
    /// Everything else: at most the unreserved places.
    Ordinary,
}

/// Places of the request limiter that only [`RequestPriority::Critical`]
/// requests take: a fifth of the limit (10 of the default 50).
pub fn reserved_for_critical(limit: usize) -> usize {
    limit.max(1) / 5
}

/// Default of the most REST requests a client sends to its account at once:
/// half of Twilio's default per-account concurrency of 100
/// (<https://www.twilio.com/docs/api/errors/20429>), leaving room for the
/// account's other users.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 50;

impl std::fmt::Debug for TwilioClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioClient").field("api_base", &self.api_base).field("account_sid", &self.account_sid).field("auth_token", &"<redacted>").finish()
    }
}

/// Parameters of an outbound alert call ("Create a Call").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateCallRequest {
    /// Callee, E.164 (`+` and 8–15 digits), sent as `To`.
    pub to: String,
    /// Caller ID: a Twilio number or verified caller ID of the account, E.164,
    /// sent as `From`.
    pub from: String,
    /// Inline TwiML executed when the call is answered, sent as `Twiml`; at
    /// most [`MAX_INLINE_TWIML_CHARS`] characters (else Twilio answers 400,
    /// code 32018). See [`crate::providers::twilio::twiml::say_and_gather`].
    pub twiml: String,
    /// Absolute URL that receives call-progress webhooks (`StatusCallback`,
    /// requested with `StatusCallbackMethod=POST` for the events in
    /// [`STATUS_CALLBACK_EVENTS`]).
    pub status_callback: String,
    /// Seconds to let the phone ring before giving up with `no-answer`
    /// (`Timeout`; Twilio's default is 60, maximum 600).
    pub ring_timeout_seconds: u32,
    /// Answering-machine detection: sends `MachineDetection=Enable` and
    /// `AsyncAmd=true`, so the TwiML starts at once while detection runs and
    /// the verdict (`AnsweredBy`: `human`, `machine_start`, `fax`,
    /// `unknown`) is posted to `async_amd_status_callback`.
    pub machine_detection: bool,
    /// Absolute URL for the asynchronous AMD verdict
    /// (`AsyncAmdStatusCallback`, method `POST`). Required when
    /// `machine_detection` is true.
    pub async_amd_status_callback: Option<String>,
}

/// The call resource Twilio returned from "Create a Call" (HTTP 201).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CreatedCall {
    /// Call SID: `CA` followed by 32 hex digits.
    pub sid: String,
    /// Initial status, normally `queued`.
    pub status: String,
}

/// A call as Twilio reports it (the fields of the Call resource wardcall
/// reads; others are ignored).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CallResource {
    /// `CA` followed by 32 hex digits.
    pub sid: String,
    /// `queued`, `initiated`, `ringing`, `in-progress`, `completed`, `busy`,
    /// `no-answer`, `failed` or `canceled`.
    pub status: String,
    /// The callee, E.164.
    pub to: String,
    /// RFC 2822 in UTC, e.g. `Wed, 25 Nov 2026 18:01:26 +0000` (whole seconds).
    pub date_created: Option<String>,
    /// The AMD verdict (`human`, `machine_start`, …) when detection ran.
    pub answered_by: Option<String>,
}

impl CallResource {
    /// `date_created` as an instant, if present and well formed.
    pub fn created_at(&self) -> Option<jiff::Timestamp> {
        let text = self.date_created.as_deref()?;
        jiff::fmt::rfc2822::parse(text).ok().map(|z| z.timestamp())
    }

    /// Whether the call has ended (no further status can follow).
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "busy" | "no-answer" | "failed" | "canceled")
    }
}

/// A failed Twilio REST request.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum TwilioError {
    /// Twilio answered with a non-success HTTP status. Fields come from
    /// Twilio's JSON error body
    /// (`{"code":21211,"message":"…","more_info":"https://www.twilio.com/docs/errors/21211","status":400}`);
    /// `code` and `more_info` are `None` when the body was not that JSON
    /// (for example an HTML error page from a proxy), and `message` then
    /// holds the start of the body.
    #[error("Twilio API error: HTTP {http_status}, code {}: {}", fmt_code(.code), redact_phone_numbers(.message))]
    Api {
        /// HTTP status, e.g. 400, 401, 404, 429, 500.
        http_status: u16,
        /// Twilio error code, e.g. 20003 (authentication), 20404 (not found),
        /// 21211 (invalid `To`), 21205 (missing URL/TwiML), 20429 (rate limit).
        code: Option<i64>,
        /// Twilio's message. May quote phone numbers: log it via `Display`
        /// (which redacts them), not directly.
        message: String,
        /// Link to Twilio's page about the error code.
        more_info: Option<String>,
    },
    /// The request did not complete: DNS, connect, TLS, timeout
    /// ([`REQUEST_TIMEOUT`]) or a broken connection.
    ///
    /// For `create_call` this is ambiguous when the failure happened after
    /// the request was sent (a timeout waiting for the response): Twilio may
    /// have placed the call, and a retry can ring the phone twice.
    #[error("Twilio request failed: {0}")]
    Transport(String),
    /// Twilio answered with success but the body was not the expected JSON.
    /// For `create_call` the call was most likely placed.
    #[error("unexpected Twilio response: {0}")]
    Decode(String),
    /// The request was refused before anything was sent: an unusable
    /// `api_base`, or `machine_detection` without
    /// `async_amd_status_callback`. Retrying will not help.
    #[error("invalid Twilio request: {0}")]
    InvalidRequest(String),
}

fn fmt_code(code: &Option<i64>) -> String {
    code.map_or_else(|| "none".to_string(), |c| c.to_string())
}

impl TwilioError {
    /// Whether the same request may succeed if retried later: transport
    /// failures, HTTP 429 (rate limited, Twilio code 20429) and HTTP 5xx.
    /// 4xx validation and authentication errors are permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            TwilioError::Transport(_) => true,
            TwilioError::Api { http_status, .. } => *http_status == 429 || (500..=599).contains(http_status),
            TwilioError::Decode(_) | TwilioError::InvalidRequest(_) => false,
        }
    }
}

/// Twilio error codes by which a request is refused for its content (the
/// TwiML or the text in it), not for the callee or the account: 32018 (TwiML
/// longer than 4,000 characters), 12100 (document parse failure), 12200
/// (schema validation) and 13520 (`<Say>`: invalid text), from Twilio's error
/// dictionary (<https://www.twilio.com/docs/api/errors>).
pub const CONTENT_REFUSAL_CODES: [i64; 4] = [32018, 12100, 12200, 13520];

impl TwilioError {
    /// Twilio refused the request for its content (HTTP 400 with one of
    /// [`CONTENT_REFUSAL_CODES`]): nothing was placed, and the same request
    /// with a shorter, plainer message may succeed at once.
    pub fn is_content_refusal(&self) -> bool {
        matches!(self, TwilioError::Api { http_status: 400, code: Some(c), .. } if CONTENT_REFUSAL_CODES.contains(c))
    }
}

/// Twilio's JSON error body.
#[derive(Deserialize)]
struct ApiErrorBody {
    code: Option<i64>,
    message: Option<String>,
    more_info: Option<String>,
}

impl TwilioClient {
    /// Creates a client for one Twilio account.
    ///
    /// * `http` — shared `reqwest` client; a per-request timeout of
    ///   [`REQUEST_TIMEOUT`] is applied on top of its own settings.
    /// * `api_base` — scheme and host of the REST API, e.g.
    ///   `"https://api.twilio.com"` or an emulator's `"http://127.0.0.1:PORT"`;
    ///   a trailing slash is tolerated.
    /// * `account_sid` / `auth_token` — HTTP Basic credentials
    ///   (`AccountSid:AuthToken`); the SID also goes in the request path.
    pub fn new(http: reqwest::Client, api_base: &str, account_sid: &str, auth_token: &str) -> Self {
        TwilioClient {
            http,
            api_base: api_base.trim_end_matches('/').to_string(),
            account_sid: account_sid.to_string(),
            auth_token: auth_token.to_string(),
            request_timeout: REQUEST_TIMEOUT,
            concurrency: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_CONCURRENT_REQUESTS)),
            ordinary: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_CONCURRENT_REQUESTS - reserved_for_critical(DEFAULT_MAX_CONCURRENT_REQUESTS))),
        }
    }

    /// Sends at most `limit` (≥ 1) requests to the account at once
    /// ([`DEFAULT_MAX_CONCURRENT_REQUESTS`] by default); the others wait for
    /// a free place before they are sent, so that a burst of alerts queues
    /// here instead of being refused by Twilio with 429 / 20429 (the
    /// account's concurrency limit, <https://www.twilio.com/docs/api/errors/20429>).
    /// The wait is not part of the request's timeout: a request that has not
    /// left is never ambiguous. [`reserved_for_critical`] of the places are
    /// kept for [`RequestPriority::Critical`] requests: ordinary requests
    /// (other runs' texts, reconciliation, hang-ups) never hold them.
    pub fn with_max_concurrent_requests(mut self, limit: usize) -> Self {
        let limit = limit.max(1);
        self.concurrency = Arc::new(tokio::sync::Semaphore::new(limit));
        self.ordinary = Arc::new(tokio::sync::Semaphore::new(limit - reserved_for_critical(limit)));
        self
    }

    /// Replaces the per-request timeout ([`REQUEST_TIMEOUT`] by default):
    /// connect, send and the whole response must fit in it.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The most recent calls to `to` (E.164), newest first: "Read multiple
    /// Call resources" (`GET …/Calls.json?To={to}&PageSize={page_size}`,
    /// <https://www.twilio.com/docs/voice/api/call-resource#read-multiple-call-resources>),
    /// first page only. Used to reconcile an ambiguous create-call (a
    /// timeout after the request was sent) before a call is placed again.
    ///
    /// Errors: [`TwilioError::Api`] (401, 429, 5xx), [`TwilioError::Transport`],
    /// [`TwilioError::Decode`] when the page lacks `calls`.
    pub async fn list_calls_to(&self, to: &str, page_size: u32) -> Result<Vec<CallResource>, TwilioError> {
        let mut url = self.endpoint(&["Calls.json"])?;
        url.query_pairs_mut().append_pair("To", to).append_pair("PageSize", &page_size.clamp(1, 1000).to_string());
        let (status, body) = self.get(url).await?;
        if !(200..300).contains(&status) {
            return Err(api_error(status, &body));
        }
        #[derive(Deserialize)]
        struct Page {
            calls: Vec<CallResource>,
        }
        let page: Page = serde_json::from_slice(&body).map_err(|e| TwilioError::Decode(format!("call page (HTTP {status}): {e}")))?;
        Ok(page.calls)
    }

    /// One call ("Fetch a Call": `GET …/Calls/{CallSid}.json`). Used to
    /// reconcile an attempt whose final status callback never arrived.
    ///
    /// Errors: [`TwilioError::Api`] (404/20404 unknown SID, 401, 429, 5xx),
    /// [`TwilioError::Transport`], [`TwilioError::Decode`].
    pub async fn fetch_call(&self, call_sid: &str) -> Result<CallResource, TwilioError> {
        let url = self.endpoint(&["Calls", &format!("{call_sid}.json")])?;
        let (status, body) = self.get(url).await?;
        if !(200..300).contains(&status) {
            return Err(api_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| TwilioError::Decode(format!("call resource (HTTP {status}): {e}")))
    }

    pub(crate) async fn get(&self, url: url::Url) -> Result<(u16, Vec<u8>), TwilioError> {
        self.send(self.http.get(url), RequestPriority::Ordinary).await
    }

    /// Sends an API request with the account's credentials, JSON accepted and
    /// the request timeout; returns the status and the (capped) body.
    async fn send(&self, request: reqwest::RequestBuilder, priority: RequestPriority) -> Result<(u16, Vec<u8>), TwilioError> {
        // Held until the body is read. The semaphores are never closed; were
        // one closed, nothing was sent, which the error says. An ordinary
        // request takes an unreserved place first, then a place.
        let closed = |_| TwilioError::Transport("not sent: the request limiter was closed".into());
        let _unreserved = match priority {
            RequestPriority::Ordinary => Some(self.ordinary.acquire().await.map_err(closed)?),
            RequestPriority::Critical => None,
        };
        let _place = self.concurrency.acquire().await.map_err(closed)?;
        let response = request
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status().as_u16();
        let body = read_capped(response).await?;
        Ok((status, body))
    }

    /// The Account SID this client acts for.
    pub fn account_sid(&self) -> &str {
        &self.account_sid
    }

    /// Places an outbound call ("Create a Call").
    ///
    /// `POST {api_base}/2010-04-01/Accounts/{AccountSid}/Calls.json`, form
    /// body built by [`create_call_form`]. Returns the new call's SID and
    /// status (`queued`) on HTTP 201.
    ///
    /// Errors: [`TwilioError::Api`] for Twilio's refusals (401/20003 bad
    /// credentials, 400/21211 invalid `To`, 400/21213 missing `From`,
    /// 400/21205 missing TwiML, 400/32018 TwiML too long, 429/20429 rate
    /// limited, 5xx); [`TwilioError::Transport`]; [`TwilioError::Decode`] if
    /// a success body lacks `sid`/`status`; [`TwilioError::InvalidRequest`]
    /// if `machine_detection` is set without `async_amd_status_callback`.
    pub async fn create_call(&self, req: &CreateCallRequest) -> Result<CreatedCall, TwilioError> {
        self.create_call_as(req, RequestPriority::Critical).await
    }

    /// [`TwilioClient::create_call`] with the request limiter's `priority`
    /// (a call for a run that is not critical is [`RequestPriority::Ordinary`]).
    ///
    /// Errors: as [`TwilioClient::create_call`].
    pub async fn create_call_as(&self, req: &CreateCallRequest, priority: RequestPriority) -> Result<CreatedCall, TwilioError> {
        let form = create_call_form(req)?;
        let url = self.endpoint(&["Calls.json"])?;
        let (status, body) = self.post_form(url, &form, priority).await?;
        if !(200..300).contains(&status) {
            let err = api_error(status, &body);
            tracing::warn!(http_status = status, code = ?error_code(&err), "Twilio refused to create call");
            return Err(err);
        }
        let call: CreatedCall = serde_json::from_slice(&body).map_err(|e| TwilioError::Decode(format!("call resource (HTTP {status}): {e}")))?;
        tracing::debug!(call_sid = %call.sid, status = %call.status, "Twilio call created");
        Ok(call)
    }

    /// Ends a call, whatever state it is in ("Update a Call" with
    /// `Status=completed`).
    ///
    /// `POST {api_base}/2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`
    /// with `Status=completed`. Twilio documents that `canceled` only hangs
    /// up calls that are `queued` or `ringing` and leaves answered calls
    /// alone, while `completed` "will attempt to hang up a call even if it's
    /// already in progress" — so `completed` is the one value that stops a
    /// queued, ringing *or* answered call. A call stopped before it was
    /// answered then reports `canceled` to its status callback; an answered
    /// one reports `completed`.
    ///
    /// A call that has already ended is not an error: Twilio refuses the
    /// update with HTTP 400, code 21220 ("Call is not in-progress"), which is
    /// mapped to `Ok(())`.
    ///
    /// Errors: [`TwilioError::Api`] (401/20003, 404/20404 unknown call SID,
    /// 429, 5xx), [`TwilioError::Transport`].
    pub async fn end_call(&self, call_sid: &str) -> Result<(), TwilioError> {
        let url = self.endpoint(&["Calls", &format!("{call_sid}.json")])?;
        let form = [("Status", "completed".to_string())];
        let (status, body) = self.post_form(url, &form, RequestPriority::Ordinary).await?;
        if (200..300).contains(&status) {
            tracing::debug!(call_sid, "Twilio call ended");
            return Ok(());
        }
        let err = api_error(status, &body);
        if let TwilioError::Api { http_status: 400, code: Some(21220), .. } = err {
            tracing::debug!(call_sid, "Twilio call had already ended");
            return Ok(());
        }
        tracing::warn!(call_sid, http_status = status, code = ?error_code(&err), "Twilio refused to end call");
        Err(err)
    }

    /// `{api_base}/2010-04-01/Accounts/{AccountSid}/{segments…}`, each
    /// segment percent-encoded so that an odd SID cannot change the path.
    pub(crate) fn endpoint(&self, segments: &[&str]) -> Result<url::Url, TwilioError> {
        let mut url = url::Url::parse(&self.api_base).map_err(|e| TwilioError::InvalidRequest(format!("api_base is not an absolute URL: {e}")))?;
        {
            let mut path = url.path_segments_mut().map_err(|()| TwilioError::InvalidRequest("api_base cannot be a base URL".to_string()))?;
            path.pop_if_empty().extend(["2010-04-01", "Accounts", self.account_sid.as_str()]).extend(segments);
        }
        Ok(url)
    }

    pub(crate) async fn post_form(&self, url: url::Url, form: &[(&str, String)], priority: RequestPriority) -> Result<(u16, Vec<u8>), TwilioError> {
        let body = serde_urlencoded::to_string(form).map_err(|e| TwilioError::InvalidRequest(format!("form encoding: {e}")))?;
        let request = self.http.post(url).header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(body);
        self.send(request, priority).await
    }
}

/// The form parameters of "Create a Call" for `req`, in sending order.
///
/// `To`, `From`, `Twiml`, `StatusCallback`, `StatusCallbackMethod=POST`,
/// `StatusCallbackEvent` once per event of [`STATUS_CALLBACK_EVENTS`]
/// (repeated parameters, as Twilio's helper libraries send list
/// parameters), `Timeout`, and with machine detection `MachineDetection=Enable`,
/// `AsyncAmd=true`, `AsyncAmdStatusCallback`, `AsyncAmdStatusCallbackMethod=POST`.
pub fn create_call_form(req: &CreateCallRequest) -> Result<Vec<(&'static str, String)>, TwilioError> {
    let mut form: Vec<(&'static str, String)> = vec![
        ("To", req.to.clone()),
        ("From", req.from.clone()),
        ("Twiml", req.twiml.clone()),
        ("StatusCallback", req.status_callback.clone()),
        ("StatusCallbackMethod", "POST".to_string()),
    ];
    form.extend(STATUS_CALLBACK_EVENTS.iter().map(|e| ("StatusCallbackEvent", e.to_string())));
    form.push(("Timeout", req.ring_timeout_seconds.to_string()));
    if req.machine_detection {
        let Some(amd_callback) = &req.async_amd_status_callback else {
            return Err(TwilioError::InvalidRequest("machine_detection requires async_amd_status_callback".to_string()));
        };
        form.extend([
            ("MachineDetection", "Enable".to_string()),
            ("AsyncAmd", "true".to_string()),
            ("AsyncAmdStatusCallback", amd_callback.clone()),
            ("AsyncAmdStatusCallbackMethod", "POST".to_string()),
        ]);
    }
    Ok(form)
}

pub(crate) fn error_code(err: &TwilioError) -> Option<i64> {
    match err {
        TwilioError::Api { code, .. } => *code,
        _ => None,
    }
}

fn transport_error(e: reqwest::Error) -> TwilioError {
    // reqwest's Display can include the URL (with the account SID, never
    // the token or numbers); strip it anyway to keep logs minimal.
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connect failed"
    } else if e.is_body() || e.is_decode() {
        "response body failed"
    } else {
        "request failed"
    };
    let detail = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
    TwilioError::Transport(if detail.is_empty() { kind.to_string() } else { format!("{kind}: {detail}") })
}

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, TwilioError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(TwilioError::Decode(format!("response body larger than {MAX_RESPONSE_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Builds [`TwilioError::Api`] from a non-success response.
pub(crate) fn api_error(http_status: u16, body: &[u8]) -> TwilioError {
    match serde_json::from_slice::<ApiErrorBody>(body) {
        Ok(parsed) if parsed.code.is_some() || parsed.message.is_some() => {
            TwilioError::Api { http_status, code: parsed.code, message: parsed.message.unwrap_or_default(), more_info: parsed.more_info }
        }
        _ => {
            let text = String::from_utf8_lossy(body);
            let mut message: String = text.chars().take(200).collect();
            if message.is_empty() {
                message = "(empty body)".to_string();
            }
            TwilioError::Api { http_status, code: None, message, more_info: None }
        }
    }
}

/// Replaces every run of 6 or more digits (optionally `+`-prefixed) with
/// `[redacted]`, so that phone numbers quoted in Twilio's messages stay out
/// of logs. Twilio error codes (5 digits) survive.
pub fn redact_phone_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let digits = run.chars().filter(char::is_ascii_digit).count();
        if digits >= 6 {
            out.push_str("[redacted]");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() || (c == '+' && run.is_empty()) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            if c == '+' {
                run.push(c);
            } else {
                out.push(c);
            }
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CreateCallRequest {
        CreateCallRequest {
            to: "+15551230001".into(),
            from: "+15557654321".into(),
            twiml: "<Response/>".into(),
            status_callback: "https://w.example/twilio/status?alert=1".into(),
            ring_timeout_seconds: 25,
            machine_detection: true,
            async_amd_status_callback: Some("https://w.example/twilio/amd".into()),
        }
    }

    #[test]
    fn form_has_twilio_parameters_with_repeated_events() {
        let form = create_call_form(&request()).unwrap();
        let encoded = serde_urlencoded::to_string(&form).unwrap();
        assert_eq!(
            encoded,
            "To=%2B15551230001&From=%2B15557654321&Twiml=%3CResponse%2F%3E\
             &StatusCallback=https%3A%2F%2Fw.example%2Ftwilio%2Fstatus%3Falert%3D1\
             &StatusCallbackMethod=POST&StatusCallbackEvent=initiated\
             &StatusCallbackEvent=ringing&StatusCallbackEvent=answered\
             &StatusCallbackEvent=completed&Timeout=25&MachineDetection=Enable\
             &AsyncAmd=true&AsyncAmdStatusCallback=https%3A%2F%2Fw.example%2Ftwilio%2Famd\
             &AsyncAmdStatusCallbackMethod=POST"
        );
        let mut no_amd = request();
        no_amd.machine_detection = false;
        let form = create_call_form(&no_amd).unwrap();
        assert!(form.iter().all(|(k, _)| !k.contains("Amd") && *k != "MachineDetection"));
        no_amd.machine_detection = true;
        no_amd.async_amd_status_callback = None;
        assert!(matches!(create_call_form(&no_amd), Err(TwilioError::InvalidRequest(_))));
    }

    #[test]
    fn endpoint_tolerates_trailing_slash_and_encodes_segments() {
        let http = reqwest::Client::new();
        for base in ["https://api.twilio.com", "https://api.twilio.com/"] {
            let c = TwilioClient::new(http.clone(), base, "AC123", "tok");
            assert_eq!(c.endpoint(&["Calls.json"]).unwrap().as_str(), "https://api.twilio.com/2010-04-01/Accounts/AC123/Calls.json");
        }
        let c = TwilioClient::new(http.clone(), "http://127.0.0.1:8080/", "AC1", "tok");
        assert_eq!(c.endpoint(&["Calls", "CA/../x?.json"]).unwrap().as_str(), "http://127.0.0.1:8080/2010-04-01/Accounts/AC1/Calls/CA%2F..%2Fx%3F.json");
        let bad = TwilioClient::new(http, "api.twilio.com", "AC1", "tok");
        assert!(matches!(bad.endpoint(&["Calls.json"]), Err(TwilioError::InvalidRequest(_))));
    }

    #[test]
    fn debug_does_not_leak_token() {
        let c = TwilioClient::new(reqwest::Client::new(), "https://x", "AC1", "s3cr3t-token");
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn api_error_parsing() {
        let body =
            br#"{"code": 21211, "message": "Invalid 'To' Phone Number: +1555123", "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}"#;
        let err = api_error(400, body);
        assert_eq!(
            err,
            TwilioError::Api {
                http_status: 400,
                code: Some(21211),
                message: "Invalid 'To' Phone Number: +1555123".into(),
                more_info: Some("https://www.twilio.com/docs/errors/21211".into()),
            }
        );
        assert!(!err.is_retryable());
        let shown = err.to_string();
        assert!(shown.contains("21211") && !shown.contains("1555123"), "{shown}");

        let err = api_error(502, b"<html>Bad gateway</html>");
        assert!(matches!(&err, TwilioError::Api { http_status: 502, code: None, message, .. } if message.contains("Bad gateway")));
        assert!(err.is_retryable());
        assert!(api_error(429, br#"{"code":20429,"message":"Too Many Requests","status":429}"#).is_retryable());
        assert!(matches!(api_error(500, b""), TwilioError::Api { code: None, ref message, .. } if message == "(empty body)"));
        assert!(TwilioError::Transport("x".into()).is_retryable());
        assert!(!TwilioError::Decode("x".into()).is_retryable());
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_phone_numbers("Invalid 'To' Phone Number: +44 7700900123, code 21211"), "Invalid 'To' Phone Number: +44 [redacted], code 21211");
        assert_eq!(redact_phone_numbers("+15551230001"), "[redacted]");
        assert_eq!(redact_phone_numbers("a+b 12345"), "a+b 12345");
        assert_eq!(redact_phone_numbers(""), "");
    }

    #[tokio::test]
    async fn connect_failure_is_a_retryable_transport_error() {
        // Bind then drop a listener to obtain a local port nobody listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = TwilioClient::new(reqwest::Client::new(), &format!("http://127.0.0.1:{port}"), "AC1", "tok");
        let err = c.create_call(&request()).await.unwrap_err();
        assert!(matches!(err, TwilioError::Transport(_)), "{err:?}");
        assert!(err.is_retryable());
        let err = c.end_call("CA1").await.unwrap_err();
        assert!(matches!(err, TwilioError::Transport(_)), "{err:?}");
    }
}
