//! Review of issue 9's burst changes (workers 16 → 128 with a pool of 20,
//! the progress-callback fast path, the shared step state, the Twilio
//! request limiter): a flood of non-critical work whose steps hold a pooled
//! connection must neither hold a critical alert's call behind it nor let
//! the flood's own leases lapse (a step run twice).

use crate::harness::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wardcall::config::Config;
use wardcall::devtools::twilio_emulator::EmulatorEvent;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![review_burst::critical_alert_is_not_held_behind_slow_sql_work_at_default_workers,]
}

/// A non-critical workflow whose one `sql` step holds its connection for
/// `ms` (the team's statement runs in the step's commit transaction).
fn slow_sql_workflow(ms: u64) -> wardcall::config::Workflow {
    let toml = format!(
        r#"
[[workflows]]
name = "slow"
event = "slow"

[[workflows.steps]]
sql = "SELECT 1 AS slept FROM pg_sleep({})"
"#,
        ms as f64 / 1000.0
    );
    let c = Config::parse(&toml, "slow.toml").unwrap_or_else(|e| panic!("{e}"));
    c.workflows.into_iter().next().unwrap()
}

/// True of `sql` (a boolean) on the test's own connections, within `timeout`.
async fn await_on(probe: &sqlx::PgPool, what: &str, timeout: Duration, sql: &str) {
    let probe = probe.clone();
    await_some(what, timeout, || {
        let (probe, sql) = (probe.clone(), sql.to_string());
        async move { sqlx::query_scalar::<_, bool>(&sql).fetch_one(&probe).await.unwrap_or_else(|e| panic!("{sql}: {e}")).then_some(()) }
    })
    .await
}

async fn count_on(probe: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql).fetch_one(probe).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// At the engine's defaults (`engine.workers`, `engine.pool_size`,
/// `engine.lease_ms`, `engine.acquire_timeout_ms`), a flood of 300
/// non-critical runs whose `sql` step takes 1 s: a critical alert inserted
/// (by the team's application, on its own connection) as the flood starts is
/// called within 3 s (about 1 s; held behind the flood, 5 s or more). With 16 workers, the previous default, the flood's
/// steps hold at most 16 of the 20 pooled connections and the alert's
/// dispatch and step never wait for one; with 128, the alert's every
/// statement queues behind the flood's (the pool is first come, first
/// served), about 5 s each: the dispatch meets `engine.acquire_timeout_ms`.
/// No step of the flood may lose its lease meanwhile (renewals wait for a
/// pooled connection too) or fail for a connection that did not come in time.
pub async fn critical_alert_is_not_held_behind_slow_sql_work_at_default_workers() {
    const FLOOD: i64 = 300;
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    // The test's (and the team's application's) connections, apart from the engine's pool.
    let probe = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_with(db.options.clone()).await.unwrap();
    let emulator = no_answer_emulator().await;
    let mut cfg = crate::escalation::hospital_config(&emulator.base_url(), 600.0, 1);
    let defaults = wardcall::config::EngineConfig::default();
    // `REVIEW_WORKERS=16` runs the same flood at the previous default.
    let workers = std::env::var("REVIEW_WORKERS").ok().and_then(|w| w.parse().ok()).unwrap_or(defaults.workers);
    cfg.engine.workers = workers;
    cfg.engine.pool_size = defaults.pool_size;
    cfg.engine.lease_ms = defaults.lease_ms;
    cfg.engine.acquire_timeout_ms = defaults.acquire_timeout_ms;
    cfg.workflows.push(slow_sql_workflow(1000));
    cfg.validate("hospital.toml").unwrap();
    let app = start_app(&db, Arc::new(cfg)).await;
    sqlx::query("SELECT count(wardcall.emit('slow', '{}'::jsonb)) FROM generate_series(1, $1)").bind(FLOOD).execute(&probe).await.unwrap();
    await_on(
        &probe,
        "the flood to be under way",
        Duration::from_secs(60),
        &format!("SELECT count(*) FILTER (WHERE status = 'running') >= {} FROM wardcall.runs WHERE workflow = 'slow'", workers * 3 / 4),
    )
    .await;
    let mut events = emulator.subscribe();
    sqlx::raw_sql(crate::escalation::SEIZURE_INSERT).execute(&probe).await.unwrap();
    let inserted = Instant::now();
    let called_at = loop {
        match tokio::time::timeout(Duration::from_secs(60), events.recv()).await.expect("the critical alert is called").unwrap() {
            EmulatorEvent::CallCreated { received_at, .. } => break received_at,
            _ => continue,
        }
    };
    let first_call = called_at.saturating_duration_since(inserted);
    let completed = "SELECT count(*) FROM wardcall.runs WHERE workflow = 'slow' AND status = 'completed'";
    let unfinished = FLOOD - count_on(&probe, completed).await;
    await_on(&probe, "the flood to drain", Duration::from_secs(180), &format!("SELECT ({completed}) = {FLOOD}")).await;
    let run_actions = |action: &str| {
        format!(
            "SELECT count(*) FROM wardcall.audit_log a JOIN wardcall.runs r ON a.entity = 'run' AND a.entity_id = r.id::text
              WHERE a.action = '{action}'"
        )
    };
    let taken_over = count_on(&probe, &run_actions("run.lease_taken_over")).await;
    let retried = count_on(&probe, &run_actions("run.retry_scheduled")).await;
    app.stop(Duration::from_secs(2)).await;
    emulator.shutdown().await;
    eprintln!(
        "workers {workers}: critical first call after {first_call:?} (flood unfinished then: {unfinished} of {FLOOD}); leases taken over {taken_over}; steps retried {retried}"
    );
    // About 1 s here and 1.15 s on a loaded CI machine; held behind the
    // flood's connections it is 5 s or more (the acquire timeout).
    assert!(first_call < Duration::from_secs(3), "the critical alert was called {first_call:?} after its insert: held behind the flood's connections");
    assert_eq!((taken_over, retried), (0, 0), "leases lapsed (a step ran again) or steps failed waiting for a connection");
}
