//! `wardcall status`: the problems an operator must see, read from the
//! database by a process of its own (no engine state): capture triggers,
//! listening engines, overdue runs, alerts with nobody to call, and write-backs
//! kept unwritten (`store::write_backs`). Dead
//! letters are listed beside them by the CLI (`crate::runtime::dead_letters`).
//! It gathers what the runtime, the capture and the escalation know, so it
//! sits above them; the runtime imports no workflow module.

use crate::config::Config;
use crate::runtime::{stall_after_ms, LISTENER_APPLICATION_NAME};
use crate::store::runs;

/// The problems `wardcall status` shows, seen from the database (it runs in
/// its own process): configured sources whose capture trigger is missing or
/// disabled; no engine listening (no `wardcall-listener` session on this
/// database); a live run overdue by more than [`stall_after_ms`] (no engine
/// is claiming: none runs, or its scheduler stalled); open alerts whose
/// escalation policy yielded nobody to call (`wardcall.alerts.nobody_since`);
/// write-backs kept unwritten for more than [`WRITE_BACK_OVERDUE_S`]
/// (`wardcall.pending_write_backs`: the team's rows lack a call's details).
///
/// Errors: a database error.
pub async fn problems(pool: &sqlx::PgPool, config: &Config) -> Result<Vec<String>, sqlx::Error> {
    let names: Vec<String> = config.sources.iter().map(|s| s.name.clone()).collect();
    let mut problems: Vec<String> = runs::capture_problems(pool, &names).await?.into_iter().map(|(source, p)| format!("source {source}: {p}")).collect();
    let traces = runs::engine_traces(pool).await?;
    if traces.listeners == 0 {
        problems.push(format!("listener: no engine is listening on this database (no {} session)", LISTENER_APPLICATION_NAME));
    }
    let stall = stall_after_ms(&config.engine) as f64 / 1000.0;
    if let Some(s) = traces.most_overdue_seconds.filter(|s| *s > stall) {
        problems.push(format!("scheduler: a run has been due for {s:.1} s without being claimed (limit {stall:.1} s)"));
    }
    for (policy, alerts, seconds) in crate::store::alerts::with_nobody_to_call(pool).await? {
        problems.push(format!(
            "policy {policy}: {alerts} open alert(s) with nobody to call (every tier empty) for {seconds:.0} s; retried every {} s",
            crate::workflows::escalation::NOBODY_RETRY_MS / 1000
        ));
    }
    if let (n @ 1.., Some(oldest)) = crate::store::write_backs::overdue(pool, WRITE_BACK_OVERDUE_S).await? {
        problems.push(format!(
            "write-backs: {n} kept write-back(s) not yet written into the team's rows, the oldest for {oldest:.0} s (retried by the call sweepers)"
        ));
    }
    Ok(problems)
}

/// A write-back kept unwritten longer than this (seconds) is a problem
/// [`problems`] shows: kept ones are normally written within seconds.
pub const WRITE_BACK_OVERDUE_S: f64 = 60.0;
