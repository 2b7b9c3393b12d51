//! `wardcall demo bookings`: the bookings scenario (SCENARIOS.md §2,
//! `examples/bookings/`), end to end, offline.
//!
//! The sales platform inserts four bookings: two follow-ups (different
//! spellings), one booking of another type (ignored) and a follow-up the team
//! then cancels; one follow-up is rescheduled. wardcall writes `task_name`
//! and `scheduled` back at once, and at each `scheduled_at` POSTs the task to
//! the team's execution endpoint — here a real local HTTP server that fails
//! its first two requests, so the retries with backoff show — then `done`.

use super::{await_value, DemoContext};
use crate::app::{App, StartOptions};
use crate::devtools::team_endpoint::{Behaviour, TeamEndpoint};
use futures_util::future::LocalBoxFuture;
use std::sync::Arc;
use std::time::Duration;

/// Printed before the scenario.
pub const ABOUT: &str = "note: the team's endpoint is a local HTTP server that answers 503 to its first two requests; retries start at 0.5 s.";

/// Runs the scenario on the demo database (schema loaded).
pub fn run(ctx: &DemoContext) -> LocalBoxFuture<'_, anyhow::Result<()>> {
    Box::pin(scenario(ctx))
}

const INSERT: &str = "INSERT INTO lead_bookings (tenant_id, lead_id, booking_type, scheduled_at)
VALUES ('a0000000-0000-4000-8000-000000000001', gen_random_uuid(), $1, now() + $2 * interval '1 second') RETURNING id";

async fn scenario(ctx: &DemoContext) -> anyhow::Result<()> {
    let pool = &ctx.pool;
    let endpoint = TeamEndpoint::start(Behaviour::FailNext { n: 2, status: 503 }).await?;
    let mut config = ctx.example.parse_config()?;
    config.endpoints[0].url = format!("{}/api", endpoint.base_url());
    for step in config.workflows.iter_mut().flat_map(|w| w.steps.iter_mut()) {
        if let Some(http) = step.http.as_mut() {
            http.retry.base_ms = 500;
        }
    }
    config.database_url = ctx.base.database_url.clone();
    config.validate(ctx.example.config_file)?;
    let app = App::start(
        ctx.db.clone(),
        Arc::new(config),
        StartOptions { http_listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?), ..Default::default() },
    )
    .await?;
    let outcome = async {
        println!("── The platform inserts bookings ───────────────────────────────────");
        let mut ids = Vec::new();
        for (kind, due_s) in [("Follow-Up", 3.0), ("auto_followup", 4.0), ("demo_call", 3.0), ("scheduled_call", 5.0)] {
            let id: uuid::Uuid = sqlx::query_scalar(INSERT).bind(kind).bind(due_s).fetch_one(pool).await?;
            println!("booking {id}: booking_type = '{kind}', scheduled_at = now() + {due_s} s");
            ids.push(id);
        }
        await_value("the follow-ups to be scheduled", Duration::from_secs(5), || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM lead_bookings WHERE task_status = 'scheduled'").fetch_one(pool).await?;
            Ok((n == 3).then_some(()))
        })
        .await?;
        print_rows(pool, "\nwritten back at once (demo_call is not a follow-up):").await?;

        println!("\n── The team reschedules one and cancels another ────────────────────");
        println!("UPDATE lead_bookings SET scheduled_at = now() + interval '6 seconds' WHERE id = '{}';", ids[1]);
        sqlx::query("UPDATE lead_bookings SET scheduled_at = now() + interval '6 seconds' WHERE id = $1").bind(ids[1]).execute(pool).await?;
        println!("UPDATE lead_bookings SET task_status = 'cancelled' WHERE id = '{}';", ids[3]);
        sqlx::query("UPDATE lead_bookings SET task_status = 'cancelled' WHERE id = $1").bind(ids[3]).execute(pool).await?;

        await_value("both follow-ups to be done", Duration::from_secs(30), || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM lead_bookings WHERE task_status = 'done'").fetch_one(pool).await?;
            Ok((n == 2).then_some(()))
        })
        .await?;
        println!("\n── What the team's endpoint received ───────────────────────────────");
        for r in endpoint.received() {
            let due = r.body["scheduled_at"].as_str().and_then(|s| s.parse::<jiff::Timestamp>().ok());
            let late = due.map(|d| format!("{:+} ms after scheduled_at", r.at.as_millisecond() - d.as_millisecond())).unwrap_or_default();
            println!("{} {} → {}  ({late}; Idempotency-Key {})", r.method, r.path, r.status, r.idempotency_key.as_deref().unwrap_or("-"));
        }
        print_rows(pool, "\nthe bookings now:").await?;
        let stats: (String, i64, i64, i64) =
            sqlx::query_as("SELECT state, attempts, successes, failures FROM wardcall.http_endpoint_stats WHERE endpoint = 'executor'").fetch_one(pool).await?;
        println!("\nendpoint 'executor': breaker {}, {} requests, {} succeeded, {} failed (wardcall.http_endpoint_stats)", stats.0, stats.1, stats.2, stats.3);
        println!("\ndemo finished: every task posted once at its time (retried through two failures); every step is in wardcall.audit_log.");
        anyhow::Ok(())
    }
    .await;
    app.stop(Duration::from_secs(5)).await;
    outcome
}

async fn print_rows(pool: &sqlx::PgPool, title: &str) -> anyhow::Result<()> {
    println!("{title}");
    let rows: Vec<(uuid::Uuid, String, String, Option<String>)> =
        sqlx::query_as("SELECT id, booking_type, task_status, task_name FROM lead_bookings ORDER BY created_at, id").fetch_all(pool).await?;
    for (id, kind, status, name) in rows {
        println!("  {id}  {kind:<15} {status:<10} {}", name.unwrap_or_else(|| "-".into()));
    }
    Ok(())
}
