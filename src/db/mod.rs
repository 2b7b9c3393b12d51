//! Database access: the connection (embedded cluster or `database_url`) and
//! wardcall's own schema migrations.

pub mod embedded;
pub mod migrate;

use crate::config::Config;
use anyhow::Context;
use embedded::EmbeddedCluster;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
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
        let pool = connect_pool(connect_options.clone(), pool_size).await?;
        Ok(Database { pool, connect_options, embedded })
    }

    /// Closes the pool and stops the embedded cluster, if any.
    pub async fn shutdown(self) {
        self.pool.close().await;
        if let Some(c) = self.embedded {
            if let Err(e) = c.stop().await {
                tracing::warn!(error = %e, "stopping the embedded PostgreSQL cluster failed");
            }
        }
    }
}

/// A pool over `options` with at most `size` connections; waits up to 10 s for the server.
///
/// sqlx's statement logging (every statement's text at debug, slow ones at warn)
/// is turned off: statement texts can carry patient data (seed SQL, a team's
/// literal values), and wardcall logs its own failures without them
/// ([`crate::capture::db_message`]).
pub async fn connect_pool(options: PgConnectOptions, size: u32) -> anyhow::Result<PgPool> {
    let options = sqlx::ConnectOptions::disable_statement_logging(options.application_name("wardcall"));
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("cannot connect to PostgreSQL")
}
