//! Versioned migrations of schema `wardcall`, embedded in the binary.
//!
//! Each migration runs in its own transaction under a transaction-level advisory
//! lock, so several engines starting at once apply each migration exactly once
//! (PostgreSQL manual, 9.27.10 "Advisory Lock Functions").

use anyhow::Context;
use sqlx::PgPool;

/// Lock key for migrations and trigger installation ("wardcall" in ASCII).
pub const SCHEMA_LOCK_KEY: i64 = 0x7761_7264_6361_6c6c;

/// The migrations, in order: (version, name, SQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "core", include_str!("../../migrations/0001_core.sql")),
    (2, "alerts", include_str!("../../migrations/0002_alerts.sql")),
    (3, "priority", include_str!("../../migrations/0003_priority.sql")),
    (4, "unrouted", include_str!("../../migrations/0004_unrouted.sql")),
    (5, "call_reconciliation", include_str!("../../migrations/0005_call_reconciliation.sql")),
    (6, "workflow_model", include_str!("../../migrations/0006_workflow_model.sql")),
    (7, "sms", include_str!("../../migrations/0007_sms.sql")),
    (8, "recipients", include_str!("../../migrations/0008_recipients.sql")),
    (9, "outbound_http", include_str!("../../migrations/0009_outbound_http.sql")),
    (10, "dead_letter_step", include_str!("../../migrations/0010_dead_letter_step.sql")),
    (11, "function_plans", include_str!("../../migrations/0011_function_plans.sql")),
    (12, "runs_fillfactor", include_str!("../../migrations/0012_runs_fillfactor.sql")),
    (13, "runs_state_lz4", include_str!("../../migrations/0013_runs_state_lz4.sql")),
    (14, "time_ordered_ids", include_str!("../../migrations/0014_time_ordered_ids.sql")),
    (15, "pending_write_backs", include_str!("../../migrations/0015_pending_write_backs.sql")),
    (16, "live_attempts_index", include_str!("../../migrations/0016_live_attempts_index.sql")),
    (17, "step_log", include_str!("../../migrations/0017_step_log.sql")),
    (18, "step_audit", include_str!("../../migrations/0018_step_audit.sql")),
    (19, "alert_message_after_opening", include_str!("../../migrations/0019_alert_message_after_opening.sql")),
];

/// The oldest PostgreSQL server wardcall runs on, as `server_version_num`
/// (PostgreSQL 15 manual, 20.15 "Preset Options"): 14. The migrations use
/// the core `gen_random_uuid()` (13 and later), and migration 0013 has an
/// `ALTER TABLE … SET COMPRESSION` (14 and later), which PL/pgSQL parses
/// even where the server would skip it. Tested on 15.
pub const MIN_SERVER_VERSION_NUM: i32 = 140_000;

/// Refuses a server older than [`MIN_SERVER_VERSION_NUM`], before any
/// migration runs, with an error that names the version found and the one
/// needed; `version_num` and `version` are the server's
/// `server_version_num` and `server_version`.
///
/// Errors: the server is too old.
pub fn check_server_version(version_num: i32, version: &str) -> anyhow::Result<()> {
    if version_num < MIN_SERVER_VERSION_NUM {
        anyhow::bail!(
            "the database server is PostgreSQL {version}; wardcall needs PostgreSQL {} or later (database_url): nothing was changed in it",
            MIN_SERVER_VERSION_NUM / 10_000
        );
    }
    Ok(())
}

/// Applies the migrations not yet applied; returns how many it applied.
/// First refuses a server older than [`MIN_SERVER_VERSION_NUM`]
/// ([`check_server_version`]).
///
/// Errors: the server is too old; a database error, with the migration's
/// version and name.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<usize> {
    let (version_num, version): (String, String) =
        sqlx::query_as("SELECT current_setting('server_version_num'), current_setting('server_version')").fetch_one(pool).await?;
    check_server_version(version_num.parse().context("server_version_num is not a number")?, &version)?;
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS {
        let mut tx = pool.begin().await?;
        // The engine's sessions carry short statement/lock timeouts; a migration
        // may rewrite a large table, and waits for another engine's migration.
        // Bounded still: 60 s for a lock, 1 h for a statement.
        sqlx::raw_sql("SET LOCAL lock_timeout = '60s'; SET LOCAL statement_timeout = '1h'").execute(&mut *tx).await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SCHEMA_LOCK_KEY).execute(&mut *tx).await?;
        sqlx::raw_sql(
            "CREATE SCHEMA IF NOT EXISTS wardcall;
             CREATE TABLE IF NOT EXISTS wardcall.schema_migrations (
                 version integer PRIMARY KEY, name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT clock_timestamp())",
        )
        .execute(&mut *tx)
        .await?;
        let done: Option<i32> =
            sqlx::query_scalar("SELECT version FROM wardcall.schema_migrations WHERE version = $1").bind(version).fetch_optional(&mut *tx).await?;
        if done.is_some() {
            continue;
        }
        sqlx::raw_sql(sql).execute(&mut *tx).await.with_context(|| format!("migration {version} ({name}) failed"))?;
        sqlx::query("INSERT INTO wardcall.schema_migrations (version, name) VALUES ($1, $2)").bind(version).bind(name).execute(&mut *tx).await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
        applied += 1;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PostgreSQL 13 and older are refused with both versions named; 14 and
    /// later pass.
    #[test]
    fn servers_older_than_14_are_refused_by_name() {
        let e = check_server_version(130_018, "13.18").unwrap_err().to_string();
        assert!(e.contains("PostgreSQL 13.18") && e.contains("PostgreSQL 14 or later"), "{e}");
        assert!(check_server_version(90_624, "9.6.24").is_err());
        for (num, text) in [(140_000, "14.0"), (150_018, "15.18 (Debian 15.18-0+deb12u1)"), (170_002, "17.2")] {
            check_server_version(num, text).unwrap();
        }
    }
}
