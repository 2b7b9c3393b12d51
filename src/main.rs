//! The `wardcall` command line. See README.md for every command.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use wardcall::app::{App, StartOptions};
use wardcall::config::Config;
use wardcall::db::Database;

#[derive(Parser)]
#[command(name = "wardcall", version, about = "Postgres-native alert escalation engine for care teams")]
struct Cli {
    /// Configuration file (TOML). Without it, documented defaults and the embedded database.
    #[arg(long, global = true, env = "WARDCALL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine and the webhook/API server until Ctrl-C or SIGTERM.
    Serve {
        /// Remove the capture triggers of sources that are not in this config
        /// (installed by another config). Without it they are kept, with a warning.
        #[arg(long)]
        prune: bool,
    },
    /// Apply wardcall's migrations and install the sources' capture triggers, then exit.
    Migrate {
        /// Remove the capture triggers of sources that are not in this config
        /// (installed by another config), printing each. Without it they are kept.
        #[arg(long)]
        prune: bool,
    },
    /// Run a shipped example (a folder under examples/) end to end on the
    /// embedded database and the in-process Twilio emulator, and print what
    /// happened. Without a name: the hospital.
    Demo {
        /// The example: a folder under examples/ (hospital, the default; homecare).
        name: Option<String>,
    },
    /// Emit an event (as `wardcall.emit` does from SQL).
    Emit {
        /// Event name, e.g. `alert.critical`.
        event: String,
        /// Payload: a JSON object.
        payload: String,
        /// A repeated dedup key never starts a second run.
        #[arg(long)]
        dedup_key: Option<String>,
    },
    /// Show runs by status and the outbox backlog.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a live run (and its open alert).
    Cancel {
        /// Run id (UUID).
        run: uuid::Uuid,
    },
    /// Retry a dead letter: a failed run goes back to pending at the step it failed at.
    Retry {
        /// Run id (UUID), as `wardcall status` or `wardcall.dead_letters` lists it.
        run: uuid::Uuid,
    },
    /// Send a named signal to a run.
    Signal {
        run: uuid::Uuid,
        name: String,
        /// JSON payload (default `{}`).
        payload: Option<String>,
    },
    /// Run a benchmark scenario on the embedded cluster with the in-process
    /// Twilio emulator and print its figures (see BENCHMARKS.md).
    Bench(wardcall::devtools::bench::BenchArgs),
    /// Run a provider emulator (offline development and tests).
    Emulate {
        #[command(subcommand)]
        provider: EmulateCommand,
    },
}

#[derive(Subcommand)]
enum EmulateCommand {
    /// The Twilio Voice REST API and its webhooks.
    Twilio(wardcall::devtools::twilio_emulator::cli::EmulateArgs),
}

/// Logs to stderr at `default` level unless `RUST_LOG` says otherwise. sqlx's
/// statement log (target `sqlx::query`, which prints statement texts that may
/// carry patient data) stays off whatever `RUST_LOG` says; wardcall's pools
/// disable it at the source too (`db::connect_pool`).
fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
        .add_directive("sqlx::query=off".parse().expect("static directive"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Database errors redacted: their messages quote the values they reject.
            eprintln!("wardcall: {}", wardcall::capture::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn open(cli_config: Option<&std::path::Path>) -> anyhow::Result<(Arc<Config>, Database)> {
    open_with(cli_config, false, false).await
}

/// Loads the config (`prune`: see `--prune`), resolves the provider secrets
/// when `needs_secrets` (before the database is touched), then opens the database.
async fn open_with(cli_config: Option<&std::path::Path>, prune: bool, needs_secrets: bool) -> anyhow::Result<(Arc<Config>, Database)> {
    let mut config = Config::load(cli_config)?;
    config.prune_sources = prune;
    if needs_secrets {
        wardcall::providers::Providers::from_config(&config, None).with_context(|| format!("config error in {}", config.file_name()))?;
    }
    let config = Arc::new(config);
    let db = Database::open(&config, config.engine.pool_size).await?;
    Ok((config, db))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo { name } => {
            init_tracing("warn");
            wardcall::devtools::demo::run(cli.config.as_deref(), name.as_deref()).await
        }
        Command::Bench(args) => {
            init_tracing("warn");
            wardcall::devtools::bench::run(args).await
        }
        Command::Emulate { provider: EmulateCommand::Twilio(args) } => {
            init_tracing("info");
            wardcall::devtools::twilio_emulator::cli::run_cli(args).await
        }
        Command::Serve { prune } => {
            init_tracing("info");
            let (config, db) = open_with(cli.config.as_deref(), prune, true).await?;
            let app = match App::start(db.clone(), config, StartOptions::default()).await {
                Ok(app) => app,
                Err(e) => {
                    db.shutdown().await;
                    return Err(e);
                }
            };
            wait_for_shutdown_signal().await;
            tracing::info!("shutting down: finishing steps in flight, releasing leases");
            app.stop(Duration::from_secs(10)).await;
            db.shutdown().await;
            Ok(())
        }
        Command::Migrate { prune } => {
            init_tracing("info");
            let (config, db) = open_with(cli.config.as_deref(), prune, false).await?;
            let r = wardcall::app::prepare_database_report(&db, &config, "cli").await;
            db.shutdown().await;
            let report = r?;
            println!("migrations applied; {} source trigger(s) installed", config.sources.len());
            for name in &report.removed {
                println!("removed the capture trigger of source '{name}' (not in this config; --prune)");
            }
            if !report.kept.is_empty() {
                println!("kept the capture triggers of source(s) not in this config: {} (pass --prune to remove them)", report.kept.join(", "));
            }
            Ok(())
        }
        Command::Emit { event, payload, dedup_key } => {
            init_tracing("warn");
            let payload: serde_json::Value = serde_json::from_str(&payload).context("payload is not valid JSON")?;
            anyhow::ensure!(payload.is_object(), "payload must be a JSON object");
            let config = Arc::new(Config::load(cli.config.as_deref())?);
            // Refused before the database is opened: an event no workflow listens
            // to would be consumed without a run; NUL cannot be stored.
            wardcall::http::check_event(&config, &event, &payload, dedup_key.as_deref())?;
            let db = Database::open(&config, config.engine.pool_size).await?;
            let r = async {
                wardcall::app::prepare_database(&db, &config, "cli").await?;
                let id = {
                    let mut conn = db.pool.acquire().await?;
                    wardcall::store::outbox::emit(&mut conn, &event, &payload, dedup_key.as_deref()).await?
                };
                match id {
                    Some(id) => {
                        tracing::info!(event = %event, outbox_id = id, "CLI: event emitted");
                        println!("emitted {event} as outbox row {id}")
                    }
                    None => println!("duplicate dedup key: nothing emitted"),
                }
                anyhow::Ok(())
            }
            .await;
            db.shutdown().await;
            r
        }
        Command::Status { json } => {
            init_tracing("warn");
            let (config, db) = open(cli.config.as_deref()).await?;
            let r = async {
                // Migrate only: installing triggers here would hide a missing one.
                wardcall::db::migrate::migrate(&db.pool).await?;
                let c = wardcall::store::runs::status_counts(&db.pool).await?;
                let problems = wardcall::status::problems(&db.pool, &config).await?;
                let dead = wardcall::store::runs::dead_letter_count(&db.pool).await?;
                let newest = wardcall::store::runs::newest_dead_letters(&db.pool, 5).await?;
                let endpoints = wardcall::store::outbound::endpoint_stats(&db.pool).await?;
                if json {
                    let mut v = serde_json::to_value(&c)?;
                    v["healthy"] = serde_json::json!(problems.is_empty());
                    v["problems"] = serde_json::json!(problems);
                    v["dead_letters"] = serde_json::json!({"count": dead, "newest": newest});
                    v["endpoints"] = serde_json::json!(endpoints);
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    if problems.is_empty() {
                        println!("health    ok");
                    } else {
                        for p in &problems {
                            println!("health    UNHEALTHY: {p}");
                        }
                    }
                    println!("runs      pending {:>6}  running {:>6}  sleeping {:>6}  waiting {:>6}", c.pending, c.running, c.sleeping, c.waiting);
                    println!("          completed {:>4}  failed {:>7}  cancelled {:>5}", c.completed, c.failed, c.cancelled);
                    match c.outbox_oldest_seconds {
                        Some(s) => println!("outbox    backlog {:>6}  oldest {:.1} s", c.outbox_backlog, s),
                        None => println!("outbox    backlog {:>6}", c.outbox_backlog),
                    }
                    println!("          unrouted {:>5}  (events no workflow listens to)", c.outbox_unrouted);
                    println!("dead      letters {:>6}  (failed runs; `wardcall retry <run-id>` puts one back)", dead);
                    for d in &newest {
                        println!(
                            "          {}  {}  event {}  step {}  attempts {}  failed {}  {}",
                            d.run_id,
                            d.workflow,
                            d.event,
                            d.step,
                            d.attempts,
                            d.failed_at.as_deref().unwrap_or("-"),
                            d.last_error.as_deref().unwrap_or("").chars().take(160).collect::<String>()
                        );
                    }
                    for e in &endpoints {
                        let open = match e.open_for_ms {
                            Some(ms) => format!(" for {:.1} s", ms as f64 / 1000.0),
                            None => String::new(),
                        };
                        println!(
                            "endpoint  {}  breaker {}{}  attempts {}  successes {}  failures {}  openings {}",
                            e.endpoint, e.state, open, e.attempts, e.successes, e.failures, e.breaker_openings
                        );
                    }
                }
                anyhow::Ok(())
            }
            .await;
            db.shutdown().await;
            r
        }
        Command::Cancel { run } => {
            init_tracing("warn");
            let (config, db) = open(cli.config.as_deref()).await?;
            let r = wardcall::workflows::cancel_run(&db.pool, &config, run, "cli", "cancelled from the command line").await;
            db.shutdown().await;
            if r? {
                println!("run {run} cancelled");
                Ok(())
            } else {
                anyhow::bail!("run {run} is not live (or does not exist)")
            }
        }
        Command::Retry { run } => {
            init_tracing("warn");
            let (_config, db) = open(cli.config.as_deref()).await?;
            let r = wardcall::runtime::dead_letters::retry(&db.pool, run, "cli").await;
            db.shutdown().await;
            match r? {
                wardcall::store::runs::RetryResult::Retried { step, .. } => {
                    println!("run {run} retried: pending again at step {step}");
                    Ok(())
                }
                wardcall::store::runs::RetryResult::NotFailed { status } => {
                    anyhow::bail!("run {run} has not failed (it is {status}); only a dead letter can be retried")
                }
                wardcall::store::runs::RetryResult::NotFound => anyhow::bail!("no run {run}"),
            }
        }
        Command::Signal { run, name, payload } => {
            init_tracing("warn");
            let payload: serde_json::Value = match payload {
                Some(p) => serde_json::from_str(&p).context("payload is not valid JSON")?,
                None => serde_json::json!({}),
            };
            let (_config, db) = open(cli.config.as_deref()).await?;
            let r = async {
                let mut conn = db.pool.acquire().await?;
                let id = wardcall::store::runs::send_signal(&mut conn, run, &name, &payload).await?;
                println!("signal {name} sent to run {run} (signal {id})");
                anyhow::Ok(())
            }
            .await;
            db.shutdown().await;
            r
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn wait_for_shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
