//! `wardcall demo [<name>]`: the shipped examples, end to end, offline.
//!
//! Each example is a folder `examples/<name>/` holding the team's schema
//! (`schema.sql`, exactly the team's tables), the rows the demo needs
//! (`seed.sql`) and wardcall's config (`wardcall.toml`); those files are
//! written once and used by the demo, the tests and the benchmarks. The demo
//! creates a fresh database `wardcall_demo` on the embedded cluster (or on
//! `database_url`), loads the schema and the seed, and runs the example's
//! scenario against the in-process Twilio emulator.
//!
//! Adding an example is a folder plus one line in [`EXAMPLES`]
//! (`example!(name)`, for a module `src/demo/<name>.rs` with `ABOUT` and `run`).

pub mod bookings;
pub mod homecare;
pub mod hospital;
pub mod sla;

use crate::config::Config;
use crate::db::{connect_pool, embedded::EmbeddedCluster, Database};
use anyhow::Context;
use futures_util::future::LocalBoxFuture;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a scenario gets: the user's base config (for `database_url`), the
/// demo database with the example's schema and seed loaded, and its pool.
pub struct DemoContext {
    pub base: Config,
    pub db: Database,
    pub pool: PgPool,
    pub example: &'static Example,
}

/// A scenario: runs the example against `ctx` and prints what happened.
pub type Scenario = for<'a> fn(&'a DemoContext) -> LocalBoxFuture<'a, anyhow::Result<()>>;

/// One shipped example.
pub struct Example {
    /// Folder name under `examples/` and the argument of `wardcall demo`.
    pub name: &'static str,
    /// Printed before the scenario runs (what it shows, what differs from production).
    pub about: &'static str,
    /// The team's schema (`examples/<name>/schema.sql`).
    pub schema: &'static str,
    /// The demo's rows (`examples/<name>/seed.sql`).
    pub seed: &'static str,
    /// wardcall's config (`examples/<name>/wardcall.toml`).
    pub config: &'static str,
    /// `examples/<name>/wardcall.toml`, for error messages.
    pub config_file: &'static str,
    pub run: Scenario,
}

impl Example {
    /// The example's config, parsed (not yet validated: callers point it at an emulator first).
    ///
    /// Errors: the shipped file does not parse (a bug, caught by the tests).
    pub fn parse_config(&self) -> Result<Config, crate::config::ConfigError> {
        Config::parse(self.config, self.config_file)
    }
}

/// Registers the example `examples/$name/` run by `src/demo/$name.rs`.
macro_rules! example {
    ($name:ident) => {
        Example {
            name: stringify!($name),
            about: $name::ABOUT,
            schema: include_str!(concat!("../../../examples/", stringify!($name), "/schema.sql")),
            seed: include_str!(concat!("../../../examples/", stringify!($name), "/seed.sql")),
            config: include_str!(concat!("../../../examples/", stringify!($name), "/wardcall.toml")),
            config_file: concat!("examples/", stringify!($name), "/wardcall.toml"),
            run: $name::run,
        }
    };
}

/// Every shipped example; the first is what `wardcall demo` runs without a name.
pub static EXAMPLES: &[Example] = &[example!(hospital), example!(homecare), example!(bookings), example!(sla)];

/// The example called `name`, if there is one.
pub fn example(name: &str) -> Option<&'static Example> {
    EXAMPLES.iter().find(|e| e.name == name)
}

/// The hospital scenario's configuration (`examples/hospital/wardcall.toml`).
pub const HOSPITAL_CONFIG: &str = include_str!("../../../examples/hospital/wardcall.toml");
/// The hospital team's schema and the demo's rows (`examples/hospital/schema.sql`
/// then `seed.sql`), as the tests and benchmarks load them.
pub const HOSPITAL_SCHEMA: &str = concat!(include_str!("../../../examples/hospital/schema.sql"), include_str!("../../../examples/hospital/seed.sql"));
/// Demo Twilio auth token (the emulator's; not a secret).
pub const DEMO_AUTH_TOKEN: &str = "demo-auth-token-not-a-secret";
const DEMO_DB: &str = "wardcall_demo";

/// Runs the example `name` (the hospital when `None`). `config_path` may give
/// `data_dir` or `database_url`; all else is the example's own.
///
/// Errors: an unknown name (the known ones are listed), the database cannot be
/// started or reached, or the scenario does not reach its expected end (the
/// error says which stage).
pub async fn run(config_path: Option<&Path>, name: Option<&str>) -> anyhow::Result<()> {
    let example = match name {
        None => &EXAMPLES[0],
        Some(n) => example(n)
            .ok_or_else(|| anyhow::anyhow!("no example named '{n}'; the examples are: {}", EXAMPLES.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")))?,
    };
    let base = Config::load(config_path)?;
    println!("wardcall demo: the {} scenario, offline (embedded PostgreSQL, in-process Twilio emulator)", example.name);
    println!("{}\n", example.about);

    // The database: a fresh `wardcall_demo` on the embedded cluster or on database_url.
    let (server, embedded) = match &base.database_url {
        Some(url) => (PgConnectOptions::from_str(url).context("database_url")?, None),
        None => {
            let dir = base.data_dir.clone().unwrap_or_else(|| ".wardcall".into());
            let cluster = EmbeddedCluster::start(&dir).await?;
            if let Some(requested) = cluster.relocated_from() {
                println!(
                    "note: the `postgres` account cannot reach {}, so the demo's PostgreSQL cluster is in {}.\n",
                    requested.display(),
                    cluster.data_dir().display()
                );
            }
            (cluster.connect_options("postgres"), Some(Arc::new(cluster)))
        }
    };
    let admin = connect_pool(server.clone(), 2).await?;
    {
        // Creating a database can take longer than the engine's statement
        // timeout on a busy machine (it copies a template and checkpoints).
        let mut conn = admin.acquire().await?;
        sqlx::raw_sql("SET statement_timeout = 0").execute(&mut *conn).await?;
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {DEMO_DB} WITH (FORCE)")).execute(&mut *conn).await?;
        sqlx::raw_sql(&format!("CREATE DATABASE {DEMO_DB}")).execute(&mut *conn).await?;
    }
    admin.close().await;
    let options = server.database(DEMO_DB);
    let pool = connect_pool(options.clone(), 12).await?;
    let db = Database { pool: pool.clone(), connect_options: options, embedded };
    let result = async {
        // The team's schema and the demo's rows.
        sqlx::raw_sql(example.schema).execute(&pool).await.with_context(|| format!("loading examples/{}/schema.sql", example.name))?;
        sqlx::raw_sql(example.seed).execute(&pool).await.with_context(|| format!("loading examples/{}/seed.sql", example.name))?;
        let ctx = DemoContext { base, db: db.clone(), pool: pool.clone(), example };
        (example.run)(&ctx).await
    }
    .await;
    db.shutdown().await;
    result
}

/// Polls `probe` every 25 ms until it gives a value, for at most `timeout`.
///
/// Errors: `probe`'s error, or the timeout (naming `what`).
pub async fn await_value<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "demo: timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A row for printing: values that are personal data replaced by
/// `"<n characters, not printed>"`; ids, statuses and times kept. Keeps the
/// demo's output, which people paste into issues and chats, free of the seed's
/// personal data (ARCHITECTURE.md, "No patient data on error paths").
pub fn redact_row(mut row: serde_json::Value) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value) {
        if let serde_json::Value::Object(map) = v {
            for (key, value) in map.iter_mut() {
                let shown = key == "id" || key.ends_with("_id") || key.ends_with("_at") || key.ends_with("_by") || key.ends_with("status");
                match value {
                    serde_json::Value::Object(_) => walk(value),
                    serde_json::Value::String(text) if !shown => {
                        *value = serde_json::Value::String(format!("<{} characters, not printed>", text.chars().count()));
                    }
                    _ => {}
                }
            }
        }
    }
    walk(&mut row);
    row
}
