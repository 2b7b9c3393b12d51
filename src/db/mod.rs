//! Database access: the connection (embedded cluster or `database_url`) and
//! wardcall's own schema migrations.

pub mod batches;
pub mod deadline;
pub mod embedded;
pub mod migrate;

use crate::config::{Config, EngineConfig};
use anyhow::Context;
use embedded::EmbeddedCluster;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// An open database: the pool, how to open more connections (the listener needs
/// its own), and the embedded cluster when wardcall runs one.
#[derive(Clone)]
pub struct Database {
    /// Connection pool for all short transactions.
    pub pool: PgPool,
    /// Options for dedicated connections (LISTEN).
    pub connect_options: PgConnectOptions,
    /// The embedded cluster, when no `database_url` was configured.
    pub embedded: Option<Arc<EmbeddedCluster>>,
}

impl Database {
    /// Opens the configured database: `database_url` (or `DATABASE_URL`, already
    /// folded into the config by [`Config::load`]) when set, else the embedded
    /// cluster in `data_dir` (default `.wardcall`), database `database` (default
    /// `wardcall`), created if missing. `pool_size` connections at most.
    ///
    /// Errors: no server binaries (the message names the package and the
    /// `database_url` alternative), the cluster does not start, or the server
    /// cannot be reached.
    pub async fn open(config: &Config, pool_size: u32) -> anyhow::Result<Database> {
        let (connect_options, embedded) = match &config.database_url {
            Some(url) => {
                let opts = PgConnectOptions::from_str(url).context("database_url is not a valid PostgreSQL URL")?;
                (opts, None)
            }
            None => {
                let dir = config.data_dir.clone().unwrap_or_else(|| crate::config::DEFAULT_DATA_DIR.into());
                let cluster = EmbeddedCluster::start(&dir).await?;
                let name = config.database.clone().unwrap_or_else(|| crate::config::DEFAULT_DATABASE.into());
                cluster.ensure_database(&name).await?;
                (cluster.connect_options(&name), Some(Arc::new(cluster)))
            }
        };
        let settings = EngineConfig { pool_size, ..config.engine.clone() };
        let pool = connect_pool_with(connect_options.clone(), &settings).await?;
        Ok(Database { pool, connect_options, embedded })
    }

    /// `e` in words, with PostgreSQL's own reason when the pool only says it
    /// timed out (see [`explain_error`]).
    pub async fn explain(&self, e: &sqlx::Error) -> String {
        explain_error(&self.connect_options, e, Duration::from_secs(3)).await
    }

    /// As [`Database::explain`], for an `anyhow` error that may wrap a `sqlx::Error`.
    pub async fn explain_any(&self, e: &anyhow::Error) -> String {
        match e.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::PoolTimedOut) => self.explain(&sqlx::Error::PoolTimedOut).await,
            _ => crate::capture::error_text(e),
        }
    }

    /// Closes the pool and stops the embedded cluster, if any.
    pub async fn shutdown(self) {
        // Bounded: a connection still held on a half-open socket (a hard
        // failover; `deadline`) would hold the close until the kernel gives up.
        if tokio::time::timeout(SHUTDOWN_CLOSE_MAX, self.pool.close()).await.is_err() {
            tracing::warn!(
                waited_ms = SHUTDOWN_CLOSE_MAX.as_millis() as u64,
                "closing the pool: connections still busy (a database gone silent?); leaving them"
            );
        }
        if let Some(c) = self.embedded {
            if let Err(e) = c.stop().await {
                tracing::warn!(error = %e, "stopping the embedded PostgreSQL cluster failed");
            }
        }
    }
}

/// The longest [`Database::shutdown`] waits for the pool's connections to
/// come back and close.
pub const SHUTDOWN_CLOSE_MAX: Duration = Duration::from_secs(10);

/// The engine's session settings on `options`: `statement_timeout` and
/// `lock_timeout` from `settings` (milliseconds) and `random_page_cost`
/// (`engine.random_page_cost`), sent as startup options so that they hold on
/// every connection, including ones reopened after a failover (PostgreSQL
/// manual, 19.11.1 "Statement Behavior", 20.7.2 "Planner Cost Constants";
/// 55.2.1 startup `options`). Statements that need longer set their own `SET
/// LOCAL` (migrations, write-backs).
pub fn session_options(options: PgConnectOptions, settings: &EngineConfig) -> PgConnectOptions {
    options.options([
        ("statement_timeout", settings.statement_timeout_ms.to_string()),
        ("lock_timeout", settings.lock_timeout_ms.to_string()),
        ("random_page_cost", settings.random_page_cost.to_string()),
    ])
}

/// A pool over `options` with at most `size` connections and the default
/// timeouts of [`EngineConfig`] (see [`connect_pool_with`]).
pub async fn connect_pool(options: PgConnectOptions, size: u32) -> anyhow::Result<PgPool> {
    connect_pool_with(options, &EngineConfig { pool_size: size, ..EngineConfig::default() }).await
}

/// A pool of `settings.pool_size` connections (`application_name = wardcall`),
/// with [`session_options`], an acquire timeout of `settings.acquire_timeout_ms`
/// and one connection opened at once.
///
/// sqlx's statement logging (every statement's text at debug, slow ones at warn)
/// is turned off: statement texts can carry patient data (seed SQL, a team's
/// literal values), and wardcall logs its own failures without them
/// ([`crate::capture::db_message`]).
///
/// Errors: the server cannot be reached or refuses the connection within the
/// acquire timeout; the message carries PostgreSQL's own reason (e.g. `password
/// authentication failed for user "…"`, `database "…" does not exist`, `too many
/// connections for role "…"`), not only "pool timed out".
pub async fn connect_pool_with(options: PgConnectOptions, settings: &EngineConfig) -> anyhow::Result<PgPool> {
    let options = sqlx::ConnectOptions::disable_statement_logging(session_options(options.application_name("wardcall"), settings));
    let acquire = Duration::from_millis(settings.acquire_timeout_ms);
    let (pool_options, clock) = pool_options();
    let result = pool_options.max_connections(settings.pool_size).min_connections(1).acquire_timeout(acquire).connect_with(options.clone()).await;
    match result {
        Ok(pool) => {
            deadline::register(&pool, clock);
            Ok(pool)
        }
        Err(e) => {
            let why = explain_error(&options, &e, acquire.min(Duration::from_secs(5))).await;
            Err(anyhow::anyhow!("cannot connect to PostgreSQL: {why}"))
        }
    }
}

/// A connection idle at least this long is pinged before it is handed out
/// ([`pool_options`]).
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The options of wardcall's pools: a connection idle for
/// [`PING_AFTER_IDLE`] or longer is pinged (one round trip) before it is
/// handed out, and replaced if the server is gone (a restart, a failover, an
/// idle-session timeout); one reused sooner is not. sqlx's default pings on
/// every acquire: during a burst that was a round trip before every
/// statement of every step and webhook, each waking a backend (sqlx's ping
/// of a connection as it is released stays, and closes a broken one)
/// (BENCHMARKS.md, "Issue 9, ninth session"). A connection that broke
/// within the last second fails its next statement instead, which is then
/// retried like any other database error (a step's retry, the provider's
/// webhook retry); sqlx closes the connection.
///
/// While the pool is suspect (a deadline passed on one of its connections,
/// the listener's connection went silent: [`deadline::mark_suspect`]), a
/// connection is pinged within a bound before it is handed out, however
/// recently used ([`deadline::check_on_acquire`]), and as it is given back
/// ([`deadline::check_on_release`]: sqlx's own ping on release has no
/// bound); one that does not answer is closed. Returns the options and the
/// pool's [`deadline::SuspectClock`], to [`deadline::register`] with the
/// pool once made.
pub fn pool_options() -> (PgPoolOptions, Arc<deadline::SuspectClock>) {
    let clock = Arc::new(deadline::SuspectClock::default());
    let (on_acquire, on_release) = (clock.clone(), clock.clone());
    let options = PgPoolOptions::new()
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            let clock = on_acquire.clone();
            Box::pin(async move {
                if clock.suspect() {
                    return deadline::check_on_acquire(conn).await;
                }
                if meta.idle_for >= PING_AFTER_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .after_release(move |conn, _| {
            let clock = on_release.clone();
            Box::pin(async move { deadline::check_on_release(&clock, conn).await })
        });
    (options, clock)
}

/// The webhooks' own pool ([`crate::runtime::Services::for_webhooks`]):
/// `settings.webhook_pool_size` connections with the options of `pool` and
/// the session settings of `settings` ([`session_options`]: the config's
/// statement and lock timeouts, whatever `pool` was opened with) under the
/// application name `wardcall-webhooks`, opened on first use and kept.
/// Never fails: a connection that cannot be opened is the first webhook's
/// error.
pub fn webhook_pool(pool: &PgPool, settings: &EngineConfig) -> PgPool {
    let options = session_options((*pool.connect_options()).clone().application_name("wardcall-webhooks"), settings);
    let (pool_options, clock) = pool_options();
    let webhooks = pool_options
        .max_connections(settings.webhook_pool_size)
        .min_connections(0)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .connect_lazy_with(options);
    deadline::register(&webhooks, clock);
    webhooks
}

/// Longest a statement on a [`TeamReadPool`] connection may run (ms): its
/// sessions' `statement_timeout` (PostgreSQL manual 19.11.1 "Statement
/// Behavior"). An escalation's lookups are bounded by it.
pub const TEAM_READ_STATEMENT_TIMEOUT_MS: u64 = 2_000;
/// Longest a statement on a [`TeamReadPool`] connection may wait for a lock
/// (ms), e.g. behind a team's `ALTER TABLE`: its sessions' `lock_timeout`.
pub const TEAM_READ_LOCK_TIMEOUT_MS: u64 = 1_000;

/// The pool that runs the team's read-only queries on the alert's way to its
/// first call: an escalation's lookups (`crate::workflows::team_sql::run_lookups`).
/// (A tier's recipients query stays on the engine's pool, in its own
/// read-only transaction: lookups queued behind a slow one must not make a
/// roster's query wait out its connection and skip the nurse on shift.)
/// `engine.team_read_pool_size` connections, opened on first use and kept,
/// application name `wardcall-team-reads`, whose sessions are read-only and
/// bounded by default: `default_transaction_read_only = on`,
/// `statement_timeout` = [`TEAM_READ_STATEMENT_TIMEOUT_MS`], `lock_timeout` =
/// [`TEAM_READ_LOCK_TIMEOUT_MS`] (startup options, so a connection reopened
/// after a failover has them too; PostgreSQL manual 19.11.1). A statement
/// therefore runs alone, in its own implicit read-only transaction: one round
/// trip, where a `BEGIN READ ONLY; SET LOCAL …` first cost a second one on
/// every alert (BENCHMARKS.md, "Issue 9, thirteenth session"); a statement
/// that writes fails with SQLSTATE 25006 and writes nothing. Work that needs
/// other bounds begins its own transaction with `SET LOCAL` on it.
///
/// Separate from the engine's pool also so that a slow team query (a lock
/// behind a migration) holds one of these, not a connection the workers'
/// commits need. The type is the proof that a connection has these defaults.
///
/// The team's statement commits its implicit transaction, so a setting it
/// changes for the session (`set_config(…, false)`, a function's `SET`)
/// would outlive it: every connection given back is reset (`RESET ALL`,
/// PostgreSQL manual, "RESET": back to the start-up values above) before
/// another statement runs on it, off the call's path. A connection that
/// does not answer within [`deadline::REPLY_MARGIN`] is closed.
#[derive(Clone, Debug)]
pub struct TeamReadPool(PgPool);

impl TeamReadPool {
    /// The pool over the options of `pool` (same server, user and database)
    /// with `settings.team_read_pool_size` connections, `settings.acquire_timeout_ms`
    /// and `settings.random_page_cost`. Never fails: a connection that cannot
    /// be opened is the first query's error.
    pub fn new(pool: &PgPool, settings: &EngineConfig) -> TeamReadPool {
        let options = (*pool.connect_options()).clone().application_name("wardcall-team-reads").options([
            ("default_transaction_read_only", "on".to_string()),
            ("statement_timeout", TEAM_READ_STATEMENT_TIMEOUT_MS.to_string()),
            ("lock_timeout", TEAM_READ_LOCK_TIMEOUT_MS.to_string()),
            ("random_page_cost", settings.random_page_cost.to_string()),
        ]);
        let (pool_options, clock) = pool_options();
        let on_release = clock.clone();
        let reads = pool_options
            // Replaces `pool_options`' own hook, which it runs first.
            .after_release(move |conn, _| {
                let clock = on_release.clone();
                Box::pin(async move {
                    if !deadline::check_on_release(&clock, conn).await? {
                        return Ok(false);
                    }
                    reset_session(conn).await
                })
            })
            .max_connections(settings.team_read_pool_size)
            .min_connections(0)
            .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
            .connect_lazy_with(options);
        deadline::register(&reads, clock);
        TeamReadPool(reads)
    }

    /// The underlying pool (for [`deadline::HeldConnection::acquire`],
    /// [`deadline::mark_suspect`], closing).
    pub fn pool(&self) -> &PgPool {
        &self.0
    }
}

/// Puts back the start-up values of every setting of `conn`'s session
/// (`RESET ALL`), within [`deadline::REPLY_MARGIN`]:
/// [`TeamReadPool`]'s release hook. `Ok(true)`: keep the connection.
///
/// Errors: the server's, or [`deadline::NoReply`] (the connection is then closed).
async fn reset_session(conn: &mut sqlx::PgConnection) -> Result<bool, sqlx::Error> {
    let reset = sqlx::Executor::execute(&mut *conn, "RESET ALL");
    match tokio::time::timeout(deadline::REPLY_MARGIN, reset).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(deadline::no_reply(deadline::REPLY_MARGIN)),
    }
}

/// Describes `e` with PostgreSQL's own reason. The pool's `PoolTimedOut` says
/// only that no connection came in time (sqlx retries refusals it deems
/// transient, such as SQLSTATE 53300 "too many connections", until its
/// deadline); then one direct connection attempt, bounded by `timeout`, learns
/// why: its error is returned, or, when it succeeds, that every pooled
/// connection was busy. Other errors are returned as they are. The text holds
/// no secret (sqlx never prints the password).
pub async fn explain_error(options: &PgConnectOptions, e: &sqlx::Error, timeout: Duration) -> String {
    if !matches!(e, sqlx::Error::PoolTimedOut) {
        // Redacted: PostgreSQL quotes the values it rejects.
        return crate::capture::db_message(e);
    }
    match tokio::time::timeout(timeout, options.connect()).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            "pool timed out: every pooled connection stayed busy (the server accepts new connections)".into()
        }
        Ok(Err(direct)) => format!("pool timed out; PostgreSQL refused a connection: {}", crate::capture::db_message(&direct)),
        Err(_) => format!("pool timed out; the server did not answer a connection attempt within {} ms", timeout.as_millis()),
    }
}
