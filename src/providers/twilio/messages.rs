//! Twilio Programmable Messaging REST client: send a text message, fetch it,
//! list the messages sent to a number; Twilio's body limit and reserved keywords.
//!
//! Follows Twilio's Message resource reference
//! (<https://www.twilio.com/docs/messaging/api/message-resource>): "Create a
//! Message" (`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, form
//! `To`, `From`, `Body`, `StatusCallback`), "Fetch a Message"
//! (`GET …/Messages/{MessageSid}.json`) and "Read multiple Message resources"
//! (`GET …/Messages.json?To=…&PageSize=…`, newest first). Authentication,
//! errors and logging are those of [`crate::providers::twilio::client`]: a refusal is a
//! [`TwilioError`] (`is_retryable` for transport failures, 429 and 5xx; a 4xx
//! is a refusal of that message), and neither numbers nor bodies are logged.
//!
//! Status values (<https://www.twilio.com/docs/messaging/api/message-resource#message-status-values>):
//! `queued`, `sending`, `sent`, `delivered`, `undelivered`, `failed` (and
//! `accepted`, `scheduled`, `read`, `canceled`, `receiving`, `received`).

use super::client::{api_error, error_code, TwilioClient, TwilioError};
use serde::Deserialize;

/// Twilio's limit on a message `Body`, in characters (error 21617, "The
/// concatenated message body exceeds the 1600 character limit").
pub const MAX_BODY_CHARS: usize = 1600;

/// Twilio's default opt-out, opt-in and help keywords, handled by Twilio
/// itself on long codes and toll-free numbers ("Twilio support for opt-out
/// keywords (SMS STOP filtering)",
/// <https://help.twilio.com/articles/223134027-Twilio-support-for-opt-out-keywords-SMS-STOP-filtering>;
/// OPTOUT and REVOKE were added to the defaults in 2025). wardcall never
/// treats them as commands: they are ignored (and audited as a keyword).
pub const RESERVED_KEYWORDS: &[&str] =
    &["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE", "START", "YES", "UNSTOP", "SUBSCRIBE", "HELP", "INFO"];

/// Whether `body` (trimmed, any case) is one of Twilio's reserved keywords.
/// Twilio reacts only to single-word replies, so "stop please" is not one.
pub fn is_reserved_keyword(body: &str) -> bool {
    let word = body.trim();
    RESERVED_KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(word))
}

/// Parameters of "Create a Message".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateMessageRequest {
    /// Recipient, E.164, sent as `To`.
    pub to: String,
    /// Sender: a Twilio number of the account, E.164, sent as `From`.
    pub from: String,
    /// Text, sent as `Body`; at most [`MAX_BODY_CHARS`] characters (build
    /// it with [`fit_body`]).
    pub body: String,
    /// Absolute URL that receives the message's status webhooks
    /// (`StatusCallback`, always POST): `queued`, `sent`, `delivered`,
    /// `undelivered`, `failed`, with `MessageSid`, `MessageStatus` and, on
    /// failure, `ErrorCode`.
    pub status_callback: String,
}

/// The form parameters of "Create a Message", in sending order: `To`,
/// `From`, `Body`, `StatusCallback`.
pub fn create_message_form(req: &CreateMessageRequest) -> Vec<(&'static str, String)> {
    vec![("To", req.to.clone()), ("From", req.from.clone()), ("Body", req.body.clone()), ("StatusCallback", req.status_callback.clone())]
}

/// A message as Twilio reports it (the fields wardcall reads; others are
/// ignored). `body` holds the alert's text: never log it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct MessageResource {
    /// `SM` (or `MM`) followed by 32 hex digits.
    pub sid: String,
    /// See the module documentation.
    pub status: String,
    /// The recipient, E.164.
    pub to: String,
    /// The sender, E.164.
    #[serde(default)]
    pub from: Option<String>,
    /// The text as sent.
    #[serde(default)]
    pub body: Option<String>,
    /// RFC 2822 in UTC, e.g. `Wed, 25 Nov 2026 18:01:26 +0000` (whole seconds).
    #[serde(default)]
    pub date_created: Option<String>,
    /// Twilio's error code when the message failed or was undelivered (e.g.
    /// 30003 unreachable handset, 30005 unknown destination, 30006 landline).
    #[serde(default)]
    pub error_code: Option<i64>,
}

impl MessageResource {
    /// `date_created` as an instant, if present and well formed.
    pub fn created_at(&self) -> Option<jiff::Timestamp> {
        let text = self.date_created.as_deref()?;
        jiff::fmt::rfc2822::parse(text).ok().map(|z| z.timestamp())
    }
}

impl TwilioClient {
    /// Sends a text message ("Create a Message"):
    /// `POST {api_base}/2010-04-01/Accounts/{AccountSid}/Messages.json` with
    /// the form of [`create_message_form`]. Returns the message resource
    /// (status `queued`, or `accepted` through a Messaging Service) on HTTP 201.
    ///
    /// A transport failure or timeout after the request was sent is
    /// ambiguous: Twilio may have accepted the message; reconcile with
    /// [`TwilioClient::list_messages_to`] before sending it again.
    ///
    /// Errors: [`TwilioError::Api`] for Twilio's refusals (400/21211 invalid
    /// `To`, 400/21610 the recipient replied STOP, 400/21614 not a mobile
    /// number, 400/21617 body too long, 401/20003, 429/20429, 5xx);
    /// [`TwilioError::Transport`]; [`TwilioError::Decode`] if a success body
    /// lacks `sid`/`status`/`to`.
    pub async fn create_message(&self, req: &CreateMessageRequest) -> Result<MessageResource, TwilioError> {
        self.create_message_as(req, super::client::RequestPriority::Critical).await
    }

    /// [`TwilioClient::create_message`] with the request limiter's
    /// `priority` (a text for a run that is not critical is
    /// [`super::client::RequestPriority::Ordinary`]).
    ///
    /// Errors: as [`TwilioClient::create_message`].
    pub async fn create_message_as(&self, req: &CreateMessageRequest, priority: super::client::RequestPriority) -> Result<MessageResource, TwilioError> {
        let url = self.endpoint(&["Messages.json"])?;
        let (status, body) = self.post_form(url, &create_message_form(req), priority).await?;
        if !(200..300).contains(&status) {
            let err = api_error(status, &body);
            tracing::warn!(http_status = status, code = ?error_code(&err), "Twilio refused to create a message");
            return Err(err);
        }
        let message: MessageResource = serde_json::from_slice(&body).map_err(|e| TwilioError::Decode(format!("message resource (HTTP {status}): {e}")))?;
        tracing::debug!(message_sid = %message.sid, status = %message.status, "Twilio message created");
        Ok(message)
    }

    /// One message ("Fetch a Message": `GET …/Messages/{MessageSid}.json`).
    ///
    /// Errors: [`TwilioError::Api`] (404/20404 unknown SID, 401, 429, 5xx),
    /// [`TwilioError::Transport`], [`TwilioError::Decode`].
    pub async fn fetch_message(&self, message_sid: &str) -> Result<MessageResource, TwilioError> {
        let url = self.endpoint(&["Messages", &format!("{message_sid}.json")])?;
        let (status, body) = self.get(url).await?;
        if !(200..300).contains(&status) {
            return Err(api_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| TwilioError::Decode(format!("message resource (HTTP {status}): {e}")))
    }

    /// The most recent messages sent to `to` (E.164), newest first: "Read
    /// multiple Message resources" (`GET …/Messages.json?To={to}&PageSize={n}`),
    /// first page only. Used to reconcile an ambiguous create before a
    /// message is sent again.
    ///
    /// Errors: [`TwilioError::Api`] (401, 429, 5xx), [`TwilioError::Transport`],
    /// [`TwilioError::Decode`] when the page lacks `messages`.
    pub async fn list_messages_to(&self, to: &str, page_size: u32) -> Result<Vec<MessageResource>, TwilioError> {
        let mut url = self.endpoint(&["Messages.json"])?;
        url.query_pairs_mut().append_pair("To", to).append_pair("PageSize", &page_size.clamp(1, 1000).to_string());
        let (status, body) = self.get(url).await?;
        if !(200..300).contains(&status) {
            return Err(api_error(status, &body));
        }
        #[derive(Deserialize)]
        struct Page {
            messages: Vec<MessageResource>,
        }
        let page: Page = serde_json::from_slice(&body).map_err(|e| TwilioError::Decode(format!("message page (HTTP {status}): {e}")))?;
        Ok(page.messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_keywords_are_recognised_alone() {
        for k in ["STOP", " stop ", "Help", "unsubscribe", "YES", "info"] {
            assert!(is_reserved_keyword(k), "{k}");
        }
        for k in ["1", "stop please", "ok"] {
            assert!(!is_reserved_keyword(k), "{k}");
        }
    }

    #[test]
    fn form_has_twilio_parameters() {
        let req = CreateMessageRequest { to: "+15551230001".into(), from: "+15557654321".into(), body: "hi".into(), status_callback: "https://w/s".into() };
        assert_eq!(
            serde_urlencoded::to_string(create_message_form(&req)).unwrap(),
            "To=%2B15551230001&From=%2B15557654321&Body=hi&StatusCallback=https%3A%2F%2Fw%2Fs"
        );
    }
}
