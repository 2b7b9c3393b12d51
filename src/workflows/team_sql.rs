//! The one place where the team's own SQL runs for a workflow step (lookups
//! and write-backs of an escalation have theirs in `escalation.rs`).
//!
//! Binding: `$1` = the event payload, `$2` = the run's variables, both jsonb;
//! only the parameters a statement uses are bound
//! ([`super::model::sql_parameter_count`]).

use serde_json::Value;
use sqlx::PgConnection;

/// Longest a step's statement may run (ms), PostgreSQL `statement_timeout`
/// (manual 20.11.1 "Statement Behavior").
pub const STEP_STATEMENT_TIMEOUT_MS: u64 = 5_000;
/// Longest a step's statement may wait for a lock (ms), `lock_timeout`.
pub const STEP_LOCK_TIMEOUT_MS: u64 = 2_000;

fn bind<'q>(sql: &'q str, payload: &'q Value, vars: &'q Value) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let n = super::model::sql_parameter_count(sql);
    let mut q = sqlx::query(sql);
    if n >= 1 {
        q = q.bind(payload);
    }
    if n >= 2 {
        q = q.bind(vars);
    }
    q
}

/// Runs a `sql` step's statement on `conn` (inside the transaction that
/// commits the step, so its effect and the step's completion commit together,
/// exactly once). Rows it writes into captured tables do not re-trigger
/// capture (`wardcall.write_back` is on for the statement). With `keep`, the
/// statement is wrapped as `WITH wardcall_step AS (…) SELECT to_jsonb(…)` and
/// its first row is returned as a JSON object (`Value::Null` when it returned
/// none); a statement that returns more than one row keeps the first.
///
/// Errors: PostgreSQL's (the caller rolls back and decides retry or failure
/// with [`is_permanent`]).
pub async fn run_step_statement(conn: &mut PgConnection, sql: &str, keep: bool, payload: &Value, vars: &Value) -> Result<Value, sqlx::Error> {
    sqlx::query("SELECT set_config('wardcall.write_back', 'on', true), set_config('statement_timeout', $1, true), set_config('lock_timeout', $2, true)")
        .bind(format!("{STEP_STATEMENT_TIMEOUT_MS}ms"))
        .bind(format!("{STEP_LOCK_TIMEOUT_MS}ms"))
        .execute(&mut *conn)
        .await?;
    let result = if keep {
        let wrapped = wrap_for_keep(sql);
        let rows: Vec<Value> = {
            use sqlx::Row;
            bind(&wrapped, payload, vars).fetch_all(&mut *conn).await?.iter().map(|r| r.try_get::<Value, _>(0)).collect::<Result<_, _>>()?
        };
        if rows.len() > 1 {
            tracing::warn!(rows = rows.len(), "a sql step kept the first of several returned rows");
        }
        rows.into_iter().next().unwrap_or(Value::Null)
    } else {
        bind(sql, payload, vars).execute(&mut *conn).await?;
        Value::Null
    };
    sqlx::query(
        "SELECT set_config('wardcall.write_back', 'off', true),
                set_config('statement_timeout', (SELECT reset_val FROM pg_settings WHERE name = 'statement_timeout'), true),
                set_config('lock_timeout', (SELECT reset_val FROM pg_settings WHERE name = 'lock_timeout'), true)",
    )
    .execute(&mut *conn)
    .await?;
    Ok(result)
}

/// The statement a `sql` step with `keep` runs: the team's statement as a
/// common table expression, its rows as jsonb objects.
pub fn wrap_for_keep(sql: &str) -> String {
    format!("WITH wardcall_step AS ({}\n) SELECT to_jsonb(wardcall_step) FROM wardcall_step", sql.trim().trim_end_matches(';'))
}

/// The statement a `sleep_until = { sql = … }` runs: the instant as
/// milliseconds since the Unix epoch.
pub fn wrap_for_instant(sql: &str) -> String {
    format!("SELECT (extract(epoch FROM wardcall_instant.v) * 1000)::float8 FROM ({}\n) AS wardcall_instant(v) LIMIT 1", sql.trim().trim_end_matches(';'))
}

/// Runs a `sleep_until` query read-only, with the step timeouts. Returns
/// the instant in milliseconds since the Unix epoch (UTC), `None` when it
/// returned no row or NULL.
///
/// Errors: PostgreSQL's.
pub async fn query_instant(pool: &sqlx::PgPool, sql: &str, payload: &Value, vars: &Value) -> Result<Option<i64>, sqlx::Error> {
    use sqlx::Row;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $2, true), set_config('transaction_read_only', 'on', true)")
        .bind(format!("{STEP_STATEMENT_TIMEOUT_MS}ms"))
        .bind(format!("{STEP_LOCK_TIMEOUT_MS}ms"))
        .execute(&mut *tx)
        .await?;
    let wrapped = wrap_for_instant(sql);
    let row = bind(&wrapped, payload, vars).fetch_optional(&mut *tx).await?;
    tx.rollback().await?;
    Ok(match row {
        Some(r) => r.try_get::<Option<f64>, _>(0)?.map(|ms| ms as i64),
        None => None,
    })
}

/// Whether a statement's error cannot heal by retrying: a syntax or schema
/// error (class 42), a data exception (class 22, e.g. a bad cast of a
/// payload field) or an integrity violation (class 23). Other errors
/// (connection, timeout, serialization, lock) are worth a retry.
pub fn is_permanent(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c.starts_with("42") || c.starts_with("22") || c.starts_with("23"))
}
