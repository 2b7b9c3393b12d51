//! `wardcall demo` (or `wardcall demo hospital`): the hospital scenario
//! (SCENARIOS.md §1, `examples/hospital/`), end to end, offline.
//!
//! With the in-process Twilio emulator, on the demo database:
//! 1. a row in a demo table is captured and its run advances through a step, a
//!    durable sleep and a wait for a signal;
//! 2. the hospital's own INSERT of a critical seizure alert rings the first
//!    nurse (who does not answer), escalates to the backup (who answers and
//!    presses 1), and writes the outcome back into the `alerts` row.
//!
//! Demo timeouts are shorter than production defaults (8 s per step instead of
//! 30 s), and it says so.

use super::{await_value, redact_row, DemoContext, DEMO_AUTH_TOKEN};
use crate::app::{App, StartOptions};
use crate::config::{Source, Workflow};
use crate::devtools::twilio_emulator::{EmulatorConfig, EmulatorEvent, Persona, TwilioEmulator};
use anyhow::Context;
use futures_util::future::LocalBoxFuture;
use serde_json::Value;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ACK_TIMEOUT_SECONDS: f64 = 8.0;

/// Printed before the scenario.
pub const ABOUT: &str = "note: demo timeouts are shorter than production defaults: 8 s per escalation step instead of 30 s.";

/// Runs the scenario on the demo database (schema and seed loaded).
pub fn run(ctx: &DemoContext) -> LocalBoxFuture<'_, anyhow::Result<()>> {
    Box::pin(scenario(ctx))
}

async fn scenario(ctx: &DemoContext) -> anyhow::Result<()> {
    let (base, pool) = (&ctx.base, &ctx.pool);
    // The demo table of part 1.
    sqlx::raw_sql("CREATE TABLE demo_tasks (id bigserial PRIMARY KEY, title text NOT NULL, steps jsonb NOT NULL)").execute(pool).await?;

    // The Twilio emulator: the first nurse never answers, the backup presses 1.
    let mut config = ctx.example.parse_config()?;
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
    config.validate(ctx.example.config_file)?;
    let config = Arc::new(config);
    let app = App::start(
        ctx.db.clone(),
        config,
        StartOptions {
            twilio_auth_token: Some(DEMO_AUTH_TOKEN.into()),
            http_listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
            ..Default::default()
        },
    )
    .await?;
    let public_url = app.engine.public_url.clone();
    let outcome = async {
        part_one(pool).await?;
        part_two(pool, &emulator).await?;
        part_three(pool, &emulator, &public_url).await
    }
    .await;
    app.stop(Duration::from_secs(5)).await;
    emulator.shutdown().await;
    outcome
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
    crate::store::runs::send_signal(&mut conn, run, "go", &serde_json::json!({"from": "demo"})).await?;
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

async fn part_two(pool: &PgPool, emulator: &crate::devtools::twilio_emulator::EmulatorHandle) -> anyhow::Result<()> {
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
    println!("\nalert acknowledged by the backup nurse; every step is in wardcall.audit_log.");
    Ok(())
}

/// A second alert: nurse A's line is busy, so the alert follows as a text,
/// and A acknowledges by replying 1.
async fn part_three(pool: &PgPool, emulator: &crate::devtools::twilio_emulator::EmulatorHandle, public_url: &str) -> anyhow::Result<()> {
    println!("\n── 3. The line is busy: the alert follows by SMS, a reply of 1 acknowledges ─");
    emulator.set_persona("+13855550101", Persona::Busy);
    emulator.set_sms_persona("+13855550101", crate::devtools::twilio_emulator::SmsPersona::Reply { delay_ms: 1500, body: "1".into() });
    emulator.set_messaging_webhook("+13855550100", &crate::providers::twilio::inbound_sms_url(public_url));
    let insert = "INSERT INTO alerts (patient_id, room_id, severity, status, alert_type, title, description)
VALUES ((SELECT max(patient_id) FROM patients), (SELECT room_id FROM rooms WHERE room_name = 'Room 3' LIMIT 1),
        'critical', 'active', 'fall_detected', 'Fall Detected', 'Patient on the floor')";
    println!("{insert};");
    let id: uuid::Uuid = sqlx::query_scalar(&format!("{insert} RETURNING id")).fetch_one(pool).await?;
    await_value("the second alert to be acknowledged by text", Duration::from_secs(60), || async {
        let s: String = sqlx::query_scalar("SELECT status FROM alerts WHERE id = $1").bind(id).fetch_one(pool).await?;
        Ok((s == "acknowledged").then_some(()))
    })
    .await?;
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT n.channel, n.person_id, n.status FROM wardcall.notification_attempts n JOIN wardcall.alerts a ON a.id = n.alert_id
          WHERE a.run_id = (SELECT r.id FROM wardcall.runs r WHERE r.input->>'id' = $1::text) ORDER BY n.created_at",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    for (channel, person, status) in rows {
        println!("  [{person}] {channel}: {status}");
    }
    let row: Value = sqlx::query_scalar(
        "SELECT jsonb_build_object('id', id, 'status', status, 'acknowledged_at', acknowledged_at,
                'acknowledged_by', acknowledged_by, 'metadata', metadata) FROM alerts WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await?;
    println!("\nthe alerts row after write-back (patient data shown only as its length):\n{}", serde_json::to_string_pretty(&redact_row(row))?);
    println!("\ndemo finished: the first alert acknowledged by phone, the second by text; every step is in wardcall.audit_log.");
    Ok(())
}
