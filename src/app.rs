//! Assembly of a running wardcall: database, migrations, capture triggers,
//! providers, the HTTP server and the engine. Used by `wardcall serve`, the
//! demo and the integration tests, so that all three run the same code.

use crate::config::Config;
use crate::db::Database;
use crate::providers::Providers;
use crate::runtime::{Engine, EngineTasks};
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Options for embedding wardcall (tests, the demo); `serve` uses the defaults.
#[derive(Default)]
pub struct StartOptions {
    /// Twilio auth token, instead of reading it from the environment or a file.
    pub twilio_auth_token: Option<String>,
    /// An already bound HTTP listener (tests bind port 0), instead of `http.listen`.
    pub http_listener: Option<tokio::net::TcpListener>,
    /// Skip the HTTP server entirely.
    pub no_http: bool,
    /// The JSON API's bearer token, instead of `WARDCALL_API_TOKEN` or
    /// `http.api_token_file` (at least 16 characters).
    pub api_token: Option<String>,
    /// An already bound listener for the JSON API, instead of `http.api_listen`.
    pub api_listener: Option<tokio::net::TcpListener>,
}

/// A running wardcall.
pub struct App {
    pub engine: Arc<Engine>,
    /// Where the HTTP server (webhooks; the API too when a token is set and
    /// there is no API listener) listens, if it runs.
    pub http_addr: Option<SocketAddr>,
    /// Where the API's own listener (`http.api_listen`) listens, if it runs.
    pub api_addr: Option<SocketAddr>,
    tasks: EngineTasks,
    http: Vec<JoinHandle<std::io::Result<()>>>,
    http_stop: tokio::sync::watch::Sender<bool>,
}

/// Binds `addr` (a config value under `key`) with [`crate::http::bind`].
fn bind(addr: &str, key: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let parsed: SocketAddr = addr.parse().with_context(|| format!("{key}: '{addr}' is not an address"))?;
    crate::http::bind(parsed).with_context(|| format!("{key}: cannot bind {addr}"))
}

/// Applies migrations, checks every SQL text of the config against the real
/// schema ([`crate::capture::check_config_against_database`]: nothing is
/// installed when one is wrong), then installs the capture triggers of
/// `config`'s sources (removing those of other configs only with
/// `config.prune_sources`).
pub async fn prepare_database(db: &Database, config: &Config, actor: &str) -> anyhow::Result<()> {
    prepare_database_report(db, config, actor).await.map(|_| ())
}

/// [`prepare_database`], returning what happened to the installed sources
/// (`wardcall migrate` prints it).
pub async fn prepare_database_report(db: &Database, config: &Config, actor: &str) -> anyhow::Result<crate::capture::SourcesReport> {
    crate::db::migrate::migrate(&db.pool).await?;
    crate::capture::check_config_against_database(db, config).await?;
    crate::capture::install_sources(&db.pool, &config.sources, config.prune_sources, actor).await
}

impl App {
    /// Starts everything on an open database: migrations, triggers, providers,
    /// HTTP (unless `no_http`), engine tasks.
    ///
    /// Errors: a migration or trigger installation fails (naming the source),
    /// a provider secret is missing, or the HTTP address cannot be bound.
    pub async fn start(db: Database, config: Arc<Config>, options: StartOptions) -> anyhow::Result<App> {
        // Secrets first: a missing one must stop start before any trigger is installed.
        let providers = Providers::from_config(&config, options.twilio_auth_token).with_context(|| format!("config error in {}", config.file_name()))?;
        let api_token = match options.api_token {
            Some(t) => Some(crate::http::ApiToken::new(&t).map_err(|e| anyhow::anyhow!("API token: {e}"))?),
            None => crate::http::api_token_from(&config.http)?,
        };
        prepare_database(&db, &config, "engine").await?;
        let (listener, api_listener) = if options.no_http {
            (None, None)
        } else {
            let listener = match options.http_listener {
                Some(l) => l,
                None => bind(&config.http.listen, "http.listen")?,
            };
            let api_listener = match (options.api_listener, &config.http.api_listen) {
                (Some(l), _) => Some(l),
                (None, Some(a)) => Some(bind(a, "http.api_listen")?),
                (None, None) => None,
            };
            (Some(listener), api_listener)
        };
        let http_addr = listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let api_addr = api_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let public_url = match (&config.http.public_url, http_addr) {
            (Some(u), _) => u.clone(),
            (None, Some(a)) => format!("http://{a}"),
            (None, None) => format!("http://{}", config.http.listen),
        };
        let engine = Engine::new(db, config, providers, public_url, Arc::new(crate::workflows::Host));
        // The API: on its own listener when there is one; else on the public
        // listener only behind a token; else not at all (ARCHITECTURE.md).
        let limits = crate::http::HttpLimits::from_config(&engine.config.http);
        let (http_stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut http = Vec::new();
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Some(l) = listener {
            let mut router = crate::http::webhook_router(engine.clone());
            if api_listener.is_none() {
                match &api_token {
                    Some(t) => router = router.merge(crate::http::api_router(engine.clone(), Some(t.clone()))),
                    None => tracing::info!("the JSON API is not served: set WARDCALL_API_TOKEN or http.api_token_file, or http.api_listen (loopback)"),
                }
            }
            http.push(tokio::spawn(crate::http::serve(l, router, limits.clone(), stopped(stop_rx.clone()))));
        }
        if let Some(l) = api_listener {
            let router = crate::http::api_listener_router(engine.clone(), api_token.clone());
            http.push(tokio::spawn(crate::http::serve(l, router, limits, stopped(stop_rx))));
        }
        let tasks = engine.spawn();
        tracing::info!(engine = %engine.engine_id, http = ?http_addr, api = ?api_addr, api_token = api_token.is_some(), "wardcall engine started");
        Ok(App { engine, http_addr, api_addr, tasks, http, http_stop })
    }

    /// Graceful stop: no new claims, steps in flight get `grace` to finish,
    /// leases still held are released, the HTTP server stops. The database
    /// (and an embedded cluster) stays up; see [`Database::shutdown`].
    pub async fn stop(self, grace: Duration) {
        let webhook_pool = self.engine.services.webhook_pool.clone();
        let team_reads = self.engine.services.team_reads.pool().clone();
        self.tasks.stop(grace).await;
        let _ = self.http_stop.send(true);
        for handle in self.http {
            let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
        }
        // Bounded: a webhook waiting on a connection that a hard failover
        // left half-open would otherwise hold the close (src/db/deadline.rs).
        let _ = tokio::time::timeout(grace, webhook_pool.close()).await;
        let _ = tokio::time::timeout(grace, team_reads.close()).await;
    }
}
