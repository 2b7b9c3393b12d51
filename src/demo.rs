//! `wardcall demo`: the hospital scenario end to end, offline.
//!
//! On the embedded cluster (or `database_url`), in a freshly created database
//! `wardcall_demo`, with the in-process Twilio emulator:
//! 1. a row in a demo table is captured and its run advances through a step, a
//!    durable sleep and a wait for a signal;
//! 2. the hospital's own INSERT of a critical seizure alert rings the first
//!    nurse (who does not answer), escalates to the backup (who answers and
//!    presses 1), and writes the outcome back into the `alerts` row.
//!
//! Demo timeouts are shorter than production defaults (8 s per step instead of
//! 30 s), and it says so.

use crate::app::{App, StartOptions};
use crate::config::{Config, Source, Workflow};
use crate::db::{connect_pool, embedded::EmbeddedCluster, Database};
use crate::twilio::emulator::{EmulatorConfig, EmulatorEvent, Persona, TwilioEmulator};
use anyhow::Context;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The hospital scenario's configuration (also shipped as `examples/hospital.toml`).
pub const HOSPITAL_CONFIG: &str = include_str!("../examples/hospital.toml");
/// The hospital team's schema and demo data (`examples/hospital_schema.sql`).
pub const HOSPITAL_SCHEMA: &str = include_str!("../examples/hospital_schema.sql");
/// Demo Twilio auth token (the emulator's; not a secret).
pub const DEMO_AUTH_TOKEN: &str = "demo-auth-token-not-a-secret";
const DEMO_DB: &str = "wardcall_demo";
const ACK_TIMEOUT_SECONDS: f64 = 8.0;

/// Runs the demo. `config_path` may give `data_dir` or `database_url`; all else
/// is the demo's own.
///
/// Errors: the database cannot be started or reached, or the scenario does not
/// reach its expected end within 60 s (the error says which stage).
pub async fn run(config_path: Option<&Path>) -> anyhow::Result<()> {
    let base = Config::load(config_path)?;
    println!("wardcall demo: the hospital scenario, offline (embedded PostgreSQL, in-process Twilio emulator)");
    println!("note: demo timeouts are shorter than production defaults: {ACK_TIMEOUT_SECONDS} s per escalation step instead of 30 s.\n");

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
    let result = scenario(&base, db.clone(), &pool).await;
    db.shutdown().await;
    result
}

async fn scenario(base: &Config, db: Database, pool: &PgPool) -> anyhow::Result<()> {
    // The team's schema and the demo table.
    sqlx::raw_sql(HOSPITAL_SCHEMA).execute(pool).await?;
    sqlx::raw_sql("CREATE TABLE demo_tasks (id bigserial PRIMARY KEY, title text NOT NULL, steps jsonb NOT NULL)").execute(pool).await?;

    // The Twilio emulator: the first nurse never answers, the backup presses 1.
    let mut config = Config::parse(HOSPITAL_CONFIG, "examples/hospital.toml")?;
    let twilio = config.providers.twilio.as_mut().expect("hospital config has Twilio");
    let mut personas = HashMap::new();
    personas.insert("+13855550101".to_string(), Persona::NoAnswer);
    personas.insert("+13855550102".to_string(), Persona::Answer { ring_ms: 1500, think_ms: 1200, digits: "1".into() });
    let emulator = TwilioEmulator::start(
        EmulatorConfig { account_sid: twilio.account_sid.clone(), auth_token: DEMO_AUTH_TOKEN.into(), personas, default_persona: Persona::NoAnswer },
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    )
    .await?;
    twilio.api_base = emulator.base_url();
    for policy in &mut config.policies {
        for step in &mut policy.steps {
            step.ack_timeout_seconds = ACK_TIMEOUT_SECONDS;
        }
    }
    config.sources.push(Source {
        name: "demo_tasks".into(),
        table: "public.demo_tasks".into(),
        operations: vec![crate::config::Operation::Insert],
        condition: None,
        event: "demo.task".into(),
        payload: None,
    });
    config.workflows.push(Workflow { max_attempts: 3, retry_base_ms: 200, retry_max_ms: 1000, ..Workflow::script("demo-script", "demo.task") });
    config.database_url = base.database_url.clone();
    config.validate("examples/hospital.toml")?;
    let config = Arc::new(config);
    let app = App::start(
        db,
        config,
        StartOptions {
            twilio_auth_token: Some(DEMO_AUTH_TOKEN.into()),
            http_listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
            ..Default::default()
        },
    )
    .await?;
    let outcome = async {
        part_one(pool).await?;
        part_two(pool, &emulator).await
    }
    .await;
    app.stop(Duration::from_secs(5)).await;
    emulator.shutdown().await;
    outcome
}

/// The alerts row for printing: values that are patient or staff data (the
/// phone number, the spoken message, which names the patient) replaced by
/// `"<n characters, not printed>"`; ids, statuses and times kept. Keeps the
/// demo's output, which people paste into issues and chats, free of the seed's
/// personal data (ARCHITECTURE.md, "No patient data on error paths").
fn redact_row(mut row: Value) -> Value {
    fn walk(v: &mut Value) {
        if let Value::Object(map) = v {
            for (key, value) in map.iter_mut() {
                let shown = key == "id" || key.ends_with("_id") || key.ends_with("_at") || key.ends_with("_by") || key.ends_with("status");
                match value {
                    Value::Object(_) => walk(value),
                    Value::String(text) if !shown => {
                        *value = Value::String(format!("<{} characters, not printed>", text.chars().count()));
                    }
                    _ => {}
                }
            }
        }
    }
    walk(&mut row);
    row
}

async fn await_value<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
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

async fn part_one(pool: &PgPool) -> anyhow::Result<()> {
    println!("── 1. Capture and the durable runtime ──────────────────────────────");
    let steps = serde_json::json!([
        {"op": "step", "name": "prepare"},
        {"op": "sleep", "ms": 400},
        {"op": "wait", "signal": "go", "timeout_ms": 10000},
        {"op": "step", "name": "finish"}
    ]);
    sqlx::query("INSERT INTO demo_tasks (title, steps) VALUES ('demo task', $1)").bind(&steps).execute(pool).await?;
    println!("INSERT INTO demo_tasks … committed");
    let run: uuid::Uuid = await_value("the demo run to wait", Duration::from_secs(30), || async {
        Ok(sqlx::query_scalar("SELECT id FROM wardcall.runs WHERE workflow = 'demo-script' AND status = 'waiting'").fetch_optional(pool).await?)
    })
    .await?;
    let mut conn = pool.acquire().await?;
    crate::runtime::store::send_signal(&mut conn, run, "go", &serde_json::json!({"from": "demo"})).await?;
    drop(conn);
    await_value("the demo run to complete", Duration::from_secs(30), || async {
        Ok(sqlx::query_scalar::<_, String>("SELECT status FROM wardcall.runs WHERE id = $1 AND status IN ('completed','failed')")
            .bind(run)
            .fetch_optional(pool)
            .await?)
    })
    .await?;
    let rows: Vec<(f64, String, Option<String>, Value)> = sqlx::query_as(
        "SELECT extract(epoch FROM l.at - o.created_at)::float8 * 1000, l.action, l.to_state, l.detail
           FROM wardcall.audit_log l, wardcall.runs r JOIN wardcall.outbox o ON o.id = r.event_id
          WHERE r.id = $1 AND l.entity = 'run' AND l.entity_id = r.id::text ORDER BY l.id",
    )
    .bind(run)
    .fetch_all(pool)
    .await?;
    println!("{:>9}  captured into wardcall.outbox by the trigger (same transaction)", "0 ms");
    for (ms, action, to, detail) in rows {
        let extra = match action.as_str() {
            "run.step_completed" => format!("step {} → {}", detail["from_step"].as_str().unwrap_or(""), detail["to_step"].as_str().unwrap_or("")),
            "run.sleeping" => format!("durable sleep of {} ms", detail["delay_ms"]),
            "run.waiting" => format!("waiting for signal '{}'", detail["signal"].as_str().unwrap_or("")),
            "run.signal_received" => "signal 'go' received".into(),
            _ => to.unwrap_or_default(),
        };
        println!("{:>6.0} ms  {:<22} {}", ms, action, extra);
    }
    println!();
    Ok(())
}

async fn part_two(pool: &PgPool, emulator: &crate::twilio::emulator::EmulatorHandle) -> anyhow::Result<()> {
    println!("── 2. A critical alert reaches a nurse's phone ─────────────────────");
    let mut events = emulator.subscribe();
    // The patient is chosen by the statement, so that no patient identifier is printed.
    let insert = "INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title, description)
VALUES ((SELECT min(patient_id) FROM patients), (SELECT room_id FROM rooms WHERE room_name = 'Room 2' LIMIT 1),
        'critical', 'active', 'seizure_detected',
        'Seizure Activity Detected', 'Immediate response required')";
    println!("{insert};");
    sqlx::query(insert).execute(pool).await?;
    let committed = Instant::now();
    let first_call = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await {
                Ok(EmulatorEvent::CallCreated { received_at, .. }) => return Ok::<_, anyhow::Error>(received_at),
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => anyhow::bail!("emulator stopped: {e}"),
            }
        }
    })
    .await
    .context("demo: no call request reached the emulator within 30 s")??;
    let latency_ms = first_call.saturating_duration_since(committed).as_secs_f64() * 1000.0;
    let status: String = await_value("the alert to be acknowledged", Duration::from_secs(60), || async {
        Ok(sqlx::query_scalar("SELECT status FROM wardcall.alerts WHERE status <> 'open'").fetch_optional(pool).await?)
    })
    .await?;
    // Let the acknowledging call's last callbacks land before printing.
    let _ = await_value("the calls to end", Duration::from_secs(10), || async {
        let open: i64 = sqlx::query_scalar("SELECT count(*) FROM wardcall.notification_attempts WHERE ended_at IS NULL").fetch_one(pool).await?;
        Ok((open == 0).then_some(()))
    })
    .await;

    println!("\ntimeline (from the commit of the INSERT):");
    println!("{:>9}  commit → first call request at the Twilio emulator: {:.1} ms (measured in this client)", "", latency_ms);
    type TimelineRow = (f64, String, Option<String>, Value, Option<String>);
    let rows: Vec<TimelineRow> = sqlx::query_as(
        "WITH a AS (SELECT al.id, al.created_at FROM wardcall.alerts al),
              t0 AS (SELECT min(created_at) AS at FROM wardcall.outbox WHERE source = 'critical_alerts')
         SELECT extract(epoch FROM l.at - t0.at)::float8 * 1000, l.action, l.to_state, l.detail, n.person_id
           FROM wardcall.audit_log l CROSS JOIN t0
           LEFT JOIN wardcall.notification_attempts n ON l.entity = 'notification_attempt' AND n.id::text = l.entity_id
          WHERE l.entity IN ('alert','notification_attempt') ORDER BY l.id",
    )
    .fetch_all(pool)
    .await?;
    for (ms, action, to, detail, person) in rows {
        let who = person.map(|p| format!("[{p}] ")).unwrap_or_default();
        let what = match action.as_str() {
            "alert.opened" => "alert opened".to_string(),
            "attempt.intent" => "call intent recorded".into(),
            "attempt.requested" => format!("call requested ({})", detail["call_sid"].as_str().unwrap_or("")),
            "attempt.status" => format!("call {}", to.unwrap_or_default()),
            "attempt.answered_by" => format!("answered by {}", detail["answered_by"].as_str().unwrap_or("")),
            "alert.step_ended" => format!("no acknowledgement ({}): escalating", detail["reason"].as_str().unwrap_or("")),
            "alert.escalated" => "escalated to the next step".into(),
            "alert.acknowledged" => "ACKNOWLEDGED (pressed 1)".into(),
            "alert.unacknowledged" => "UNACKNOWLEDGED after the whole policy".into(),
            other => other.to_string(),
        };
        println!("{:>6.0} ms  {who}{what}", ms);
    }
    let row: Value = sqlx::query_scalar(
        "SELECT jsonb_build_object('id', id, 'status', status, 'acknowledged_at', acknowledged_at,
                'acknowledged_by', acknowledged_by, 'metadata', metadata) FROM alerts LIMIT 1",
    )
    .fetch_one(pool)
    .await?;
    println!("\nthe alerts row after write-back (patient data shown only as its length):\n{}", serde_json::to_string_pretty(&redact_row(row))?);
    let (calls, answered): (i64, i64) = sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE answered) FROM wardcall.call_log").fetch_one(pool).await?;
    println!("\nwardcall.call_log: {calls} call(s), {answered} answered by a human");
    anyhow::ensure!(status == "acknowledged", "demo: the alert ended {status}, expected acknowledged");
    println!("\ndemo finished: alert acknowledged by the backup nurse; every step is in wardcall.audit_log.");
    Ok(())
}
