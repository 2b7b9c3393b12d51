//! Twilio Programmable Voice: the REST client wardcall places calls with, the
//! webhook signature scheme, TwiML generation, and an emulator of the same
//! contract from the other side (for tests, the demo and offline development).
//!
//! Contracts followed: Twilio REST API "Call resource" (create and update,
//! `/2010-04-01/Accounts/{AccountSid}/Calls.json`), "Webhooks security"
//! (`X-Twilio-Signature`), TwiML `<Say>`, `<Gather>`, `<Hangup>`, and
//! "Answering Machine Detection" (async AMD).

pub mod callback;
pub mod client;
pub mod emulate_cli;
pub mod emulator;
pub mod signature;
pub mod twiml;
