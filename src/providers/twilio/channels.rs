//! Twilio's two channels behind [`ChannelSender`]: [`TwilioVoice`]
//! (Programmable Voice, "Create a Call" with inline TwiML that reads the
//! message and gathers one digit) and [`TwilioSms`] (Programmable Messaging,
//! "Create a Message"). They translate an [`Outgoing`] into Twilio's request
//! and Twilio's answers into a [`SendOutcome`]; the intent, reconciliation and
//! recording are the engine's ([`crate::notify::delivery`]).
//!
//! Contracts: <https://www.twilio.com/docs/voice/api/call-resource>,
//! <https://www.twilio.com/docs/messaging/api/message-resource>.

use super::client::{CallResource, CreateCallRequest, RequestPriority, TwilioClient, TwilioError, MAX_INLINE_TWIML_CHARS};
use super::messages::{CreateMessageRequest, MessageResource};
use super::{callback_url, twiml};
use crate::config::TwilioConfig;
use crate::notify::acknowledgement::message_status_rank;
use crate::notify::channel::{ChannelSender, Content, Outgoing, ProviderRecord, SendError, SendOutcome, Sent};
use crate::notify::Channel;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;

/// How a failed Twilio request is treated: a transient failure, a refusal
/// of our credentials (401/403) or an unreadable success body (the send most
/// likely went out) is [`SendError::Unavailable`]; any other refusal is
/// definitive for this send ([`SendError::Refused`]).
fn classify(e: &TwilioError) -> SendError {
    if e.is_retryable() || matches!(e, TwilioError::Api { http_status: 401 | 403, .. } | TwilioError::Decode(_)) {
        SendError::Unavailable(e.to_string())
    } else {
        SendError::Refused(e.to_string())
    }
}

fn millis(t: Option<jiff::Timestamp>) -> Option<i64> {
    t.map(|t| t.as_millisecond())
}

fn call_record(c: &CallResource) -> ProviderRecord {
    ProviderRecord {
        provider_id: c.sid.clone(),
        status: c.status.clone(),
        created_ms: millis(c.created_at()),
        body: None,
        answered_by: c.answered_by.clone(),
        error_code: None,
        is_final: c.is_final(),
    }
}

fn message_record(m: &MessageResource) -> ProviderRecord {
    ProviderRecord {
        provider_id: m.sid.clone(),
        status: m.status.clone(),
        created_ms: millis(m.created_at()),
        body: m.body.clone(),
        answered_by: None,
        error_code: m.error_code.map(|c| c.to_string()),
        is_final: crate::notify::acknowledgement::FAILED_MESSAGE_STATUSES.contains(&m.status.as_str()) || m.status == "delivered",
    }
}

/// The senders of a Twilio account: voice and SMS.
pub fn senders(t: &super::super::TwilioProvider) -> Vec<std::sync::Arc<dyn ChannelSender>> {
    vec![
        std::sync::Arc::new(TwilioVoice { client: t.client.clone(), config: t.config.clone() }),
        std::sync::Arc::new(TwilioSms { client: t.client.clone(), config: t.config.clone() }),
    ]
}

/// Twilio Programmable Voice: a call that reads the message (shortened to
/// Twilio's inline TwiML limit, keeping its start and the keypad
/// instruction) and gathers one digit, with status and AMD callbacks.
pub struct TwilioVoice {
    pub client: TwilioClient,
    pub config: TwilioConfig,
}

impl ChannelSender for TwilioVoice {
    fn channel(&self) -> Channel {
        Channel::Voice
    }

    fn provider(&self) -> &'static str {
        "twilio"
    }

    /// A refusal for the content (Twilio codes 32018, 12100, 12200, 13520)
    /// placed nothing: the same person is called at once with
    /// [`twiml::FALLBACK_MESSAGE`]. No retry of an ambiguous failure (a
    /// timeout, a 5xx): it may have placed the call.
    fn send<'a>(&'a self, out: &'a Outgoing, public_url: &'a str) -> BoxFuture<'a, SendOutcome> {
        async move {
            let (message, ring_timeout_seconds) = match &out.content {
                Content::Spoken { message, ring_timeout_seconds } => (message.as_str(), *ring_timeout_seconds),
                Content::Text { body } => (body.as_str(), 30),
            };
            let action = callback_url(public_url, "gather", out.attempt_id);
            let gather_timeout = self.config.gather_timeout_seconds;
            let twiml = twiml::say_and_gather_within(message, &action, gather_timeout, MAX_INLINE_TWIML_CHARS)
                .unwrap_or_else(|| twiml::say_and_gather(twiml::FALLBACK_MESSAGE, &action, gather_timeout));
            let mut req = CreateCallRequest {
                to: out.to.clone(),
                from: self.config.from.clone(),
                twiml,
                status_callback: callback_url(public_url, "status", out.attempt_id),
                ring_timeout_seconds,
                machine_detection: self.config.machine_detection,
                async_amd_status_callback: self.config.machine_detection.then(|| callback_url(public_url, "amd", out.attempt_id)),
            };
            let priority = if out.critical { RequestPriority::Critical } else { RequestPriority::Ordinary };
            let mut result = self.client.create_call_as(&req, priority).await;
            let mut content_refused = None;
            if let Err(e) = &result {
                if e.is_content_refusal() {
                    content_refused = Some(e.to_string());
                    req.twiml = twiml::say_and_gather(twiml::FALLBACK_MESSAGE, &action, gather_timeout);
                    result = self.client.create_call_as(&req, priority).await;
                }
            }
            let result = result.map(|call| Sent { provider_id: call.sid, status: None }).map_err(|e| classify(&e));
            SendOutcome { result, content_refused }
        }
        .boxed()
    }

    fn sent_to<'a>(&'a self, to: &'a str, limit: u32) -> BoxFuture<'a, Result<Vec<ProviderRecord>, String>> {
        async move { self.client.list_calls_to(to, limit).await.map(|calls| calls.iter().map(call_record).collect()).map_err(|e| e.to_string()) }.boxed()
    }

    fn fetch<'a>(&'a self, provider_id: &'a str) -> BoxFuture<'a, Result<ProviderRecord, String>> {
        async move { self.client.fetch_call(provider_id).await.map(|c| call_record(&c)).map_err(|e| e.to_string()) }.boxed()
    }

    fn max_text_chars(&self) -> usize {
        MAX_INLINE_TWIML_CHARS
    }

    fn end<'a>(&'a self, provider_id: &'a str) -> BoxFuture<'a, Result<(), String>> {
        async move { self.client.end_call(provider_id).await.map_err(|e| e.to_string()) }.boxed()
    }
}

/// Twilio Programmable Messaging: one text message with a status callback.
pub struct TwilioSms {
    pub client: TwilioClient,
    pub config: TwilioConfig,
}

impl ChannelSender for TwilioSms {
    fn channel(&self) -> Channel {
        Channel::Sms
    }

    fn provider(&self) -> &'static str {
        "twilio"
    }

    fn send<'a>(&'a self, out: &'a Outgoing, public_url: &'a str) -> BoxFuture<'a, SendOutcome> {
        async move {
            let body = match &out.content {
                Content::Text { body } => body.clone(),
                Content::Spoken { message, .. } => message.clone(),
            };
            let req = CreateMessageRequest {
                to: out.to.clone(),
                from: self.config.from.clone(),
                body,
                status_callback: callback_url(public_url, "sms-status", out.attempt_id),
            };
            let result = self
                .client
                .create_message_as(&req, if out.critical { RequestPriority::Critical } else { RequestPriority::Ordinary })
                .await
                .map(|m| Sent { status: (message_status_rank(&m.status) > 0).then(|| m.status.clone()), provider_id: m.sid })
                .map_err(|e| classify(&e));
            SendOutcome { result, content_refused: None }
        }
        .boxed()
    }

    fn sent_to<'a>(&'a self, to: &'a str, limit: u32) -> BoxFuture<'a, Result<Vec<ProviderRecord>, String>> {
        async move { self.client.list_messages_to(to, limit).await.map(|ms| ms.iter().map(message_record).collect()).map_err(|e| e.to_string()) }.boxed()
    }

    fn fetch<'a>(&'a self, provider_id: &'a str) -> BoxFuture<'a, Result<ProviderRecord, String>> {
        async move { self.client.fetch_message(provider_id).await.map(|m| message_record(&m)).map_err(|e| e.to_string()) }.boxed()
    }

    fn max_text_chars(&self) -> usize {
        super::messages::MAX_BODY_CHARS
    }

    fn end<'a>(&'a self, _provider_id: &'a str) -> BoxFuture<'a, Result<(), String>> {
        async move { Ok(()) }.boxed()
    }
}
