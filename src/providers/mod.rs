//! Providers: one folder per provider (client, webhooks, signature, payload
//! builder), and the clients built from the config with their secrets
//! ([`Providers`]).

pub mod twilio;

use crate::config::{Config, TwilioConfig};
use crate::notify::channel::ChannelSender;
use crate::notify::Channel;
use crate::providers::twilio::client::TwilioClient;
use anyhow::Context;
use std::sync::Arc;

/// The configured providers.
#[derive(Default)]
pub struct Providers {
    pub twilio: Option<TwilioProvider>,
    /// One sender per (provider, channel), in registration order; the first
    /// for a channel is the one used ([`Providers::sender`]).
    pub senders: Vec<Arc<dyn ChannelSender>>,
    /// The team's HTTP endpoints (`[[endpoints]]`) with their secret headers,
    /// resolved at start; what `http` steps send through ([`crate::outbound::perform`]).
    pub endpoints: crate::outbound::Endpoints,
}

/// A Twilio account: the REST client, its settings and the auth token that
/// signs its webhooks.
pub struct TwilioProvider {
    pub client: TwilioClient,
    pub config: TwilioConfig,
    /// Secret; never logged.
    pub auth_token: String,
}

impl Providers {
    /// Builds the providers of `config`. The Twilio auth token comes from
    /// `auth_token` when given (embedding: the demo and the tests), else from
    /// `providers.twilio.auth_token_file`, else from the environment variable
    /// `providers.twilio.auth_token_env` (default `TWILIO_AUTH_TOKEN`).
    ///
    /// The `[[endpoints]]` are resolved too ([`crate::outbound::Endpoints::resolve`]).
    ///
    /// Errors: Twilio is configured but no token is found or the file is
    /// unreadable; an endpoint's secret header is unset, empty or unreadable
    /// (naming the key and the variable or file).
    pub fn from_config(config: &Config, auth_token: Option<String>) -> anyhow::Result<Providers> {
        let endpoints = crate::outbound::Endpoints::resolve(&config.endpoints, config.file_name())?;
        let Some(t) = &config.providers.twilio else { return Ok(Providers { twilio: None, senders: Vec::new(), endpoints }) };
        let token = match auth_token {
            Some(t) => t,
            None => read_twilio_token(t)?,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        let twilio = TwilioProvider {
            client: TwilioClient::new(http, &t.api_base, &t.account_sid, &token)
                .with_request_timeout(std::time::Duration::from_secs_f64(t.request_timeout_seconds))
                .with_max_concurrent_requests(t.max_concurrent_requests),
            config: t.clone(),
            auth_token: token,
        };
        // Registration: one line per provider (its channels).
        let senders = twilio::channels::senders(&twilio);
        Ok(Providers { twilio: Some(twilio), senders, endpoints })
    }

    /// The sender of `channel`: the first registered for it, or `None` when
    /// no configured provider reaches people on it.
    pub fn sender(&self, channel: Channel) -> Option<&dyn ChannelSender> {
        self.senders.iter().find(|s| s.channel() == channel).map(|s| s.as_ref())
    }
}

fn read_twilio_token(t: &TwilioConfig) -> anyhow::Result<String> {
    if let Some(path) = &t.auth_token_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("providers.twilio.auth_token_file: cannot read {}", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        anyhow::ensure!(!token.is_empty(), "providers.twilio.auth_token_file: {} is empty", path.display());
        return Ok(token);
    }
    let var = t.auth_token_env.clone().unwrap_or_else(|| crate::config::DEFAULT_TWILIO_TOKEN_ENV.into());
    match std::env::var(&var) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        _ => anyhow::bail!("providers.twilio: no auth token: set the environment variable {var} (or providers.twilio.auth_token_file)"),
    }
}

/// The webhook routes of every configured provider (one line per provider),
/// merged into the public listener by `crate::http::webhook_router`.
pub fn webhook_routes(services: &crate::runtime::Services) -> axum::Router {
    let services = &services.for_webhooks();
    let mut router = axum::Router::new();
    if services.providers.twilio.is_some() {
        router = router.merge(twilio::webhooks::routes(services));
    }
    router
}
