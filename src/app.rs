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
}

/// A running wardcall.
pub struct App {
    pub engine: Arc<Engine>,
    /// Where the HTTP server listens, if it runs.
    pub http_addr: Option<SocketAddr>,
    tasks: EngineTasks,
    http: Option<(JoinHandle<std::io::Result<()>>, tokio::sync::oneshot::Sender<()>)>,
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
        let providers = Providers::from_config(&config, options.twilio_auth_token)
            .with_context(|| format!("config error in {}", config.file_name()))?;
        prepare_database(&db, &config, "engine").await?;
        let listener = if options.no_http {
            None
        } else {
            Some(match options.http_listener {
                Some(l) => l,
                None => tokio::net::TcpListener::bind(&config.http.listen)
                    .await
                    .with_context(|| format!("http.listen: cannot bind {}", config.http.listen))?,
            })
        };
        let http_addr = listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let public_url = match (&config.http.public_url, http_addr) {
            (Some(u), _) => u.clone(),
            (None, Some(a)) => format!("http://{a}"),
            (None, None) => format!("http://{}", config.http.listen),
        };
        let engine = Engine::new(db, config, providers, public_url);
        let http = listener.map(|l| {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let handle = tokio::spawn(crate::http::serve(engine.clone(), l, async move {
                let _ = rx.await;
            }));
            (handle, tx)
        });
        let tasks = engine.spawn();
        tracing::info!(engine = %engine.engine_id, http = ?http_addr, "wardcall engine started");
        Ok(App { engine, http_addr, tasks, http })
    }

    /// Graceful stop: no new claims, steps in flight get `grace` to finish,
    /// leases still held are released, the HTTP server stops. The database
    /// (and an embedded cluster) stays up; see [`Database::shutdown`].
    pub async fn stop(self, grace: Duration) {
        self.tasks.stop(grace).await;
        if let Some((handle, tx)) = self.http {
            let _ = tx.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
        }
    }
}
