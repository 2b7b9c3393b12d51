//! The one interface every way of reaching a person is sent through:
//! [`ChannelSender`], implemented once per (provider, channel) in the
//! provider's folder (`crate::providers::twilio::{voice, sms}` today) and
//! registered in [`crate::providers::Providers`]. The escalation and the
//! `notify` step ask for the sender of a [`Channel`] and never see a
//! provider's client, payload or error type; the intent, the reconciliation
//! of an ambiguous send and the recording of its result are the same for
//! every channel ([`crate::notify::delivery`]).

use super::Channel;
use futures_util::future::BoxFuture;

/// One message to deliver, its intent committed (the
/// `wardcall.notification_attempts` row `attempt_id`, DESIGN.md invariant 2).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The attempt; it names the webhooks of this send (callback URLs).
    pub attempt_id: uuid::Uuid,
    /// The recipient's id (logs and audit only).
    pub person_id: String,
    /// The address on the channel: an E.164 number for voice and SMS.
    /// Personal data: never logged unredacted.
    pub to: String,
    /// What to deliver.
    pub content: Content,
    /// Whether the send serves a critical run (an escalation, or a workflow
    /// marked `critical`): it may take the provider's places kept for
    /// critical sends (e.g. [`crate::providers::twilio::client::RequestPriority`]).
    pub critical: bool,
}

/// What a send delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A call that reads `message` aloud and waits for a keypress (DTMF 1
    /// acknowledges, 2 declines); the phone rings for at most
    /// `ring_timeout_seconds` (whole seconds).
    Spoken { message: String, ring_timeout_seconds: u32 },
    /// A text message; `body` is already fitted to the channel's length
    /// (never refused for it, DESIGN.md invariant 10).
    Text { body: String },
}

impl Content {
    /// The text a provider's record of this send must carry to be matched to
    /// it when reconciling (a text's body; `None` for a call).
    pub fn matching_body(&self) -> Option<&str> {
        match self {
            Content::Spoken { .. } => None,
            Content::Text { body } => Some(body),
        }
    }
}

/// A send the provider accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The provider's id of the send (Twilio: a CallSid `CA…` or MessageSid `SM…`).
    pub provider_id: String,
    /// A status worth recording at once (a text already `queued`/`sent`),
    /// else `None` (the attempt becomes `requested`; callbacks move it on).
    pub status: Option<String>,
}

/// Why a send did not go out, as the engine must treat it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// The provider definitively refused this send (an invalid number, an
    /// opted-out recipient, a geographic permission): nothing went out and
    /// sending it again cannot help. The attempt fails; the policy goes on.
    #[error("refused: {0}")]
    Refused(String),
    /// The provider is unavailable, refused our credentials, or answered in a
    /// way that leaves the outcome unknown (a timeout after sending): the
    /// intent stays, the step retries, and the send is reconciled with the
    /// provider ([`ChannelSender::sent_to`]) before it is sent again. A
    /// provider outage is never mistaken for a person who did not answer.
    #[error("unavailable or outcome unknown: {0}")]
    Unavailable(String),
}

/// The result of [`ChannelSender::send`].
#[derive(Debug, Clone)]
pub struct SendOutcome {
    pub result: Result<Sent, SendError>,
    /// The provider refused the alert's own text for its content and the
    /// send above carried the channel's short fallback text instead; the
    /// refusal, for the audit log (no patient data).
    pub content_refused: Option<String>,
}

/// A send as the provider reports it (reconciliation, the call sweeper).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderRecord {
    /// The provider's id of the send.
    pub provider_id: String,
    /// The provider's status, in its own words (Twilio: `ringing`, `delivered`…).
    pub status: String,
    /// When the provider created it, milliseconds since the Unix epoch (UTC),
    /// if it says (Twilio: whole seconds).
    pub created_ms: Option<i64>,
    /// The text it carried, for a text message (never logged).
    pub body: Option<String>,
    /// The answering-machine verdict of a call, if detection ran.
    pub answered_by: Option<String>,
    /// The provider's error code of a failed send, as text.
    pub error_code: Option<String>,
    /// Whether no further status can follow.
    pub is_final: bool,
}

/// Sends on one channel through one provider. Implementations translate
/// [`Outgoing`] into the provider's request, by its published contract, and
/// its answers into [`SendOutcome`]; they hold no database handle and know
/// nothing of alerts or runs. Every method runs outside any transaction.
pub trait ChannelSender: Send + Sync {
    /// The channel this sender reaches people on.
    fn channel(&self) -> Channel;
    /// The provider's name as stored in `notification_attempts.provider`
    /// (e.g. `twilio`).
    fn provider(&self) -> &'static str;
    /// Sends one message. `public_url`: the base of wardcall's webhooks,
    /// without trailing slash, for the callbacks of this send.
    fn send<'a>(&'a self, out: &'a Outgoing, public_url: &'a str) -> BoxFuture<'a, SendOutcome>;
    /// The provider's newest sends to `to` (at most `limit`), newest first,
    /// to decide whether an ambiguous send went out.
    ///
    /// Errors: the provider cannot be asked (its reason, no number in it).
    fn sent_to<'a>(&'a self, to: &'a str, limit: u32) -> BoxFuture<'a, Result<Vec<ProviderRecord>, String>>;
    /// The provider's current record of one send.
    ///
    /// Errors: the provider cannot be asked, or does not know the id.
    fn fetch<'a>(&'a self, provider_id: &'a str) -> BoxFuture<'a, Result<ProviderRecord, String>>;
    /// The longest text this channel carries, in characters (Unicode scalar
    /// values); a longer text is shortened, never refused (DESIGN.md
    /// invariant 10). Twilio SMS: 1,600. A call's text is fitted by its
    /// sender (Twilio: the inline TwiML limit).
    fn max_text_chars(&self) -> usize;
    /// Ends a send still in progress (hangs up a call). A text cannot be
    /// recalled: `Ok(())` without a request.
    ///
    /// Errors: the provider refused or cannot be asked.
    fn end<'a>(&'a self, provider_id: &'a str) -> BoxFuture<'a, Result<(), String>>;
}
