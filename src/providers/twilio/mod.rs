//! Twilio Programmable Voice and Messaging: the REST clients wardcall places calls
//! and sends text messages with ([`client`], [`messages`]), the
//! webhook signature scheme and TwiML generation. The emulator of the same
//! contract from the other side is tooling: `crate::devtools::twilio_emulator`.
//!
//! Contracts followed: Twilio REST API "Call resource" (create and update,
//! `/2010-04-01/Accounts/{AccountSid}/Calls.json`), "Webhooks security"
//! (`X-Twilio-Signature`), TwiML `<Say>`, `<Gather>`, `<Hangup>`, and
//! "Answering Machine Detection" (async AMD).

pub mod callback;
pub mod channels;
pub mod client;
pub mod messages;
pub mod signature;
pub mod twiml;
pub mod webhooks;

/// The URL of one of wardcall's Twilio webhooks for a notification attempt:
/// `{public_url}/webhooks/twilio/{kind}?attempt={attempt}#{CONNECTION_OVERRIDES}`,
/// where `kind` is `status`, `amd` or `gather`. The attempt id in the URL lets
/// a callback name the attempt even when the create-call response was lost;
/// the fragment asks Twilio to retry a callback wardcall could not record
/// ([`callback::CONNECTION_OVERRIDES`]).
pub fn callback_url(public_url: &str, kind: &str, attempt: uuid::Uuid) -> String {
    format!("{}/webhooks/twilio/{kind}?attempt={attempt}#{}", public_url.trim_end_matches('/'), callback::CONNECTION_OVERRIDES)
}

/// The URL Twilio posts inbound text messages to (the "A message comes in"
/// webhook of the sending number, set in the Twilio console or on the
/// IncomingPhoneNumber resource's `SmsUrl`, method POST):
/// `{public_url}/webhooks/twilio/sms`.
pub fn inbound_sms_url(public_url: &str) -> String {
    format!("{}/webhooks/twilio/sms", public_url.trim_end_matches('/'))
}
