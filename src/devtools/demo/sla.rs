//! `wardcall demo sla`: the SLA monitor of the care-transition platform
//! (SCENARIOS.md §3, workflow 3, `examples/sla/`), end to end, offline.
//!
//! Two tasks are created with a 0.2-minute (12 s) SLA, assigned to two nurses.
//! The first is left alone: its nurse gets the SMS warning at 75 % (9 s) and
//! the breach SMS at 100 % (12 s), each written into the team's
//! `notification_log`. The second is resolved after its warning: its breach
//! never comes.

use super::{await_value, DemoContext, DEMO_AUTH_TOKEN};
use crate::app::{App, StartOptions};
use crate::devtools::twilio_emulator::{EmulatorConfig, Persona, TwilioEmulator};
use anyhow::Context;
use futures_util::future::LocalBoxFuture;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Printed before the scenario.
pub const ABOUT: &str = "note: the demo's SLA is 0.2 minutes (12 s), so that warning and breach come within seconds.";

/// Runs the scenario on the demo database (schema and seed loaded).
pub fn run(ctx: &DemoContext) -> LocalBoxFuture<'_, anyhow::Result<()>> {
    Box::pin(scenario(ctx))
}

const CREATE: &str = "INSERT INTO escalation_tasks (patient_id, action_type, sla_minutes, assigned_to)
VALUES ($1, $2, 0.2, $3::uuid) RETURNING id";

async fn scenario(ctx: &DemoContext) -> anyhow::Result<()> {
    let pool = &ctx.pool;
    let mut config = ctx.example.parse_config()?;
    let twilio = config.providers.twilio.as_mut().context("the sla config has no Twilio provider")?;
    let emulator = TwilioEmulator::start(
        EmulatorConfig {
            account_sid: twilio.account_sid.clone(),
            auth_token: DEMO_AUTH_TOKEN.into(),
            personas: HashMap::new(),
            default_persona: Persona::NoAnswer,
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    )
    .await?;
    twilio.api_base = emulator.base_url();
    config.database_url = ctx.base.database_url.clone();
    config.validate(ctx.example.config_file)?;
    let app = App::start(
        ctx.db.clone(),
        Arc::new(config),
        StartOptions {
            twilio_auth_token: Some(DEMO_AUTH_TOKEN.into()),
            http_listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
            ..Default::default()
        },
    )
    .await?;
    let outcome = async {
        println!("── Two tasks are created with a 12 s SLA ───────────────────────────");
        let left: uuid::Uuid =
            sqlx::query_scalar(CREATE).bind("P-CT-001").bind("CALL_PATIENT").bind("e0000000-0000-4000-8000-000000000001").fetch_one(pool).await?;
        let resolved: uuid::Uuid =
            sqlx::query_scalar(CREATE).bind("P-CT-002").bind("MED_REVIEW").bind("e0000000-0000-4000-8000-000000000002").fetch_one(pool).await?;
        println!("task {left}: CALL_PATIENT, left open");
        println!("task {resolved}: MED_REVIEW, resolved after its warning");
        await_value("the second task's warning", Duration::from_secs(30), || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM notification_log WHERE task_id = $1 AND type = 'SLA_WARNING'").bind(resolved).fetch_one(pool).await?;
            Ok((n == 1).then_some(()))
        })
        .await?;
        println!("\nUPDATE escalation_tasks SET status = 'RESOLVED', resolved_at = now() WHERE id = '{resolved}';");
        sqlx::query("UPDATE escalation_tasks SET status = 'RESOLVED', resolved_at = now() WHERE id = $1").bind(resolved).execute(pool).await?;
        await_value("the first task's breach", Duration::from_secs(30), || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM notification_log WHERE task_id = $1 AND type = 'SLA_BREACH'").bind(left).fetch_one(pool).await?;
            Ok((n == 1).then_some(()))
        })
        .await?;
        // Past the second task's breach time: nothing more comes.
        tokio::time::sleep(Duration::from_secs(4)).await;
        println!("\nthe team's notification_log (seconds after the task was created):");
        let rows: Vec<(uuid::Uuid, String, String, f64)> = sqlx::query_as(
            "SELECT n.task_id, n.type, n.status, extract(epoch FROM n.sent_at - t.created_at)::float8
               FROM notification_log n JOIN escalation_tasks t ON t.id = n.task_id ORDER BY n.sent_at",
        )
        .fetch_all(pool)
        .await?;
        for (task, kind, status, s) in &rows {
            println!("  {s:>6.1} s  task {task}  {kind:<12} {status}");
        }
        println!("\ntexts the Twilio emulator accepted (numbers and names not printed):");
        for m in emulator.messages() {
            println!("  to {}: {} characters, {}", crate::config::redact_phone(&m.to), m.body.chars().count(), m.status);
        }
        let tasks: Vec<(uuid::Uuid, String, String)> =
            sqlx::query_as("SELECT id, status, priority FROM escalation_tasks ORDER BY created_at").fetch_all(pool).await?;
        println!("\nthe tasks now:");
        for (id, status, priority) in tasks {
            println!("  {id}  {status:<9} priority {priority}");
        }
        anyhow::ensure!(rows.len() == 3, "demo: expected 3 notifications (warning and breach, then one warning), found {}", rows.len());
        println!("\ndemo finished: warned at 75 %, breached at 100 %, and the resolved task's breach was cancelled.");
        anyhow::Ok(())
    }
    .await;
    app.stop(Duration::from_secs(5)).await;
    emulator.shutdown().await;
    outcome
}
