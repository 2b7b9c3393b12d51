//! Notify: who is reached, on which channel, and what they answered.
//!
//! - [`Recipient`]: one person to reach, from the config's `[[people]]` or a
//!   row of a recipients query over the team's own tables, with a contact per
//!   channel.
//! - [`Channel`]: the ways a recipient is reached. Each channel is sent by a
//!   provider (Twilio voice and SMS today); providers translate their webhooks
//!   into domain events and know nothing of alerts.
//! - [`acknowledgement`]: the one home of the acknowledgement rules (keypress,
//!   text reply, statuses of calls and messages).
//! - [`sms`]: the SMS channel (one-way messages, the escalation's fallback).

pub mod recipients;

use serde::{Deserialize, Serialize};

pub mod acknowledgement;
pub mod call_sweeper;
pub mod channel;
pub mod delivery;
pub mod sms;

/// The ways a recipient can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// A phone call that reads the message aloud and waits for a keypress.
    Voice,
    /// A text message (one way, or acknowledged by a reply).
    Sms,
}

impl Channel {
    /// The name stored in `wardcall.notification_attempts.channel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Voice => "voice",
            Channel::Sms => "sms",
        }
    }
}

/// One person to reach, as the step that reaches them resolved it. The list a
/// step resolved is recorded with the run's state, so that an engine taking
/// the run over after a crash reaches the same people.
///
/// Names and numbers are personal data: never logged (log `id` only, numbers
/// through [`crate::config::redact_phone`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// Stable identifier: a `[[people]]` id, or the `id` column of a
    /// recipients query (e.g. a coordinator's uuid as text). Recorded in
    /// `notification_attempts.person_id` and given to write-backs.
    pub id: String,
    /// Display name for write-backs and the dashboard (never logged).
    pub name: String,
    /// E.164 number for voice calls, if the recipient can be called.
    pub voice: Option<String>,
    /// E.164 number for text messages, if the recipient can be texted.
    pub sms: Option<String>,
}

impl Recipient {
    /// The recipient's address on `channel`, if they have one.
    pub fn address(&self, channel: Channel) -> Option<&str> {
        match channel {
            Channel::Voice => self.voice.as_deref(),
            Channel::Sms => self.sms.as_deref(),
        }
    }
}
