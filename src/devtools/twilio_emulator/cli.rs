//! `wardcall emulate twilio`: the Twilio emulator as a standalone server, so
//! that a `wardcall serve` (or any Twilio client) can be exercised offline.
//!
//! Personas come from a TOML file:
//! ```toml
//! [default]
//! behaviour = "no_answer"
//! [personas."+13855550102"]
//! behaviour = "answer"
//! ring_ms = 2000
//! think_ms = 1500
//! digits = "1"
//! # Text messages: how each recipient behaves (default: delivered, no reply).
//! [sms_personas."+13855550101"]
//! behaviour = "reply"
//! delay_ms = 3000
//! body = "1"
//! # Where replies to messages sent from a Twilio number are posted.
//! [messaging_webhooks]
//! "+13855550100" = "http://127.0.0.1:8080/webhooks/twilio/sms"
//! ```

use super::{EmulatorConfig, Persona, SmsPersona, TwilioEmulator};
use anyhow::Context;
use std::collections::HashMap;
use std::path::PathBuf;

/// Arguments of `wardcall emulate twilio`.
#[derive(clap::Args, Debug)]
pub struct EmulateArgs {
    /// Listen address; port 0 picks a free port (printed at start).
    #[arg(long, default_value = "127.0.0.1:8099")]
    pub listen: String,
    /// Account SID the emulator accepts (AC + 32 hex digits).
    #[arg(long, env = "TWILIO_ACCOUNT_SID", default_value = "AC00000000000000000000000000000001")]
    pub account_sid: String,
    /// Environment variable holding the auth token (HTTP Basic password and webhook signing key).
    #[arg(long, default_value = "TWILIO_AUTH_TOKEN")]
    pub auth_token_env: String,
    /// TOML file of personas by destination number (see the module docs).
    #[arg(long)]
    pub personas: Option<PathBuf>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PersonaFile {
    default: Option<Persona>,
    #[serde(default)]
    personas: HashMap<String, Persona>,
    #[serde(default)]
    sms_personas: HashMap<String, SmsPersona>,
    #[serde(default)]
    messaging_webhooks: HashMap<String, String>,
}

/// Runs the emulator until Ctrl-C or SIGTERM.
///
/// Errors: the auth token variable is unset, the personas file is unreadable
/// or invalid (naming the file), or the address cannot be bound.
pub async fn run_cli(args: EmulateArgs) -> anyhow::Result<()> {
    let token = std::env::var(&args.auth_token_env)
        .ok()
        .filter(|t| !t.is_empty())
        .with_context(|| format!("set {} to the auth token the emulator should accept and sign with", args.auth_token_env))?;
    let file = match &args.personas {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str::<PersonaFile>(&text).map_err(|e| anyhow::anyhow!("config error in {}: {}", p.display(), e))?
        }
        None => PersonaFile::default(),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("cannot bind {}", args.listen))?;
    let handle = TwilioEmulator::start(
        EmulatorConfig {
            account_sid: args.account_sid,
            auth_token: token,
            personas: file.personas,
            default_persona: file.default.unwrap_or(Persona::Answer { ring_ms: 2000, think_ms: 1500, digits: "1".into() }),
        },
        listener,
    )
    .await?;
    for (number, persona) in &file.sms_personas {
        handle.set_sms_persona(number, persona.clone());
    }
    for (number, url) in &file.messaging_webhooks {
        handle.set_messaging_webhook(number, url);
    }
    println!("Twilio emulator listening at {}", handle.base_url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    handle.shutdown().await;
    Ok(())
}
