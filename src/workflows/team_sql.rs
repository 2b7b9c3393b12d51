//! The one place where the team's own SQL runs: a workflow's `sql` steps,
//! `sleep_until` instants, the escalation's lookups ([`run_lookup`]) and the
//! write-backs of every hook ([`write_back`]).
//!
//! Binding: `$1` = the event payload, `$2` = the run's variables, both jsonb;
//! only the parameters a statement uses are bound
//! ([`super::model::sql_parameter_count`]).

use crate::db::deadline::{is_no_reply, past_statement_timeout, within, HeldConnection};
use crate::db::TeamReadPool;
use crate::store::audit::{self, Entity};
use serde_json::{json, Value};
use sqlx::{Executor, PgConnection, Row};
use uuid::Uuid;

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

/// Opens a read-only transaction whose statements are bounded: at most
/// `statement_timeout_ms` each, at most `lock_timeout_ms` waiting for a lock
/// (PostgreSQL manual 20.11.1). One round trip: `BEGIN READ ONLY` and both
/// `SET LOCAL` go as one simple query. The caller bounds each statement on
/// it [`within`] [`past_statement_timeout`]`(statement_timeout_ms)` and
/// releases it ([`HeldConnection::release`], [`HeldConnection::settle`]:
/// the transaction is rolled back as the pool takes it back); dropped
/// unreleased (no reply in time) it is closed.
///
/// Errors: the pool cannot give a connection, the server refuses, or
/// [`crate::db::deadline::NoReply`].
pub async fn begin_bounded_read_only(pool: &sqlx::PgPool, statement_timeout_ms: u64, lock_timeout_ms: u64) -> Result<HeldConnection, sqlx::Error> {
    let mut conn = HeldConnection::acquire(pool).await?;
    let begin = format!("BEGIN READ ONLY; SET LOCAL statement_timeout = '{statement_timeout_ms}ms'; SET LOCAL lock_timeout = '{lock_timeout_ms}ms'");
    within(past_statement_timeout(statement_timeout_ms), conn.begin(Some(begin))).await?;
    Ok(conn)
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
    // The previous timeouts are kept in `wardcall.saved_*` (read in the FROM
    // subquery, before the new ones are set) and put back after: cheaper than
    // reading `pg_settings`, which builds every setting's row.
    sqlx::query(
        "SELECT set_config('wardcall.write_back', 'on', true), set_config('statement_timeout', $1, true), set_config('lock_timeout', $2, true)
           FROM (SELECT set_config('wardcall.saved_statement_timeout', current_setting('statement_timeout'), true),
                        set_config('wardcall.saved_lock_timeout', current_setting('lock_timeout'), true)) saved",
    )
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
                set_config('statement_timeout', current_setting('wardcall.saved_statement_timeout'), true),
                set_config('lock_timeout', current_setting('wardcall.saved_lock_timeout'), true)",
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
/// Errors: PostgreSQL's, or [`crate::db::deadline::NoReply`].
pub async fn query_instant(pool: &sqlx::PgPool, sql: &str, payload: &Value, vars: &Value) -> Result<Option<i64>, sqlx::Error> {
    use sqlx::Row;
    let mut tx = begin_bounded_read_only(pool, STEP_STATEMENT_TIMEOUT_MS, STEP_LOCK_TIMEOUT_MS).await?;
    let wrapped = wrap_for_instant(sql);
    let row = within(past_statement_timeout(STEP_STATEMENT_TIMEOUT_MS), bind(&wrapped, payload, vars).fetch_optional(&mut *tx)).await;
    // Rolled back as the pool takes the connection back.
    let row = tx.settle(row)?;
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

/// Longest a step's lookups may run (ms) before they render without their
/// values (`statement_timeout`, PostgreSQL manual 20.11.1): one lookup
/// alone, or all of a step's lookups together when they go as one statement
/// ([`run_lookups`]; after such a timeout each gets
/// [`LOOKUP_RETRY_STATEMENT_TIMEOUT_MS`] alone). It bounds how long lookups
/// can delay a call: about this plus a fraction of a second per lookup. The
/// session default of the [`TeamReadPool`]'s connections.
pub const LOOKUP_STATEMENT_TIMEOUT_MS: u64 = crate::db::TEAM_READ_STATEMENT_TIMEOUT_MS;
/// Longest a lookup may wait for a lock (ms), e.g. behind a team's
/// `ALTER TABLE` (`lock_timeout`; the [`TeamReadPool`]'s session default).
pub const LOOKUP_LOCK_TIMEOUT_MS: u64 = crate::db::TEAM_READ_LOCK_TIMEOUT_MS;

/// What a lookup found.
pub enum LookupOutcome {
    /// One row, its first column as text.
    Value(String),
    /// No row, or NULL.
    Empty,
    /// More than one row (a config fault).
    Ambiguous,
    /// The first column is not text (a config fault).
    NotText,
}

/// Runs an escalation's lookup: `$1` = the event payload, alone on a
/// [`TeamReadPool`] connection (its own implicit read-only transaction, with
/// [`LOOKUP_STATEMENT_TIMEOUT_MS`] and [`LOOKUP_LOCK_TIMEOUT_MS`]: one round
/// trip), reading at most two rows.
///
/// Errors: the statement failed or timed out (the caller renders without
/// the value and audits the SQLSTATE), no connection in time
/// (`PoolTimedOut`), or [`crate::db::deadline::NoReply`].
pub async fn run_lookup(pool: &TeamReadPool, sql: &str, input: &Value) -> Result<LookupOutcome, sqlx::Error> {
    let mut conn = HeldConnection::acquire(pool.pool()).await?;
    let outcome = within(past_statement_timeout(LOOKUP_STATEMENT_TIMEOUT_MS), fetch_lookup(&mut conn, sql, input)).await;
    conn.settle(outcome)
}

/// As [`run_lookup`] with other bounds: in its own read-only transaction
/// whose `SET LOCAL` timeouts override the pool's session defaults.
async fn run_lookup_bounded(
    pool: &TeamReadPool,
    sql: &str,
    input: &Value,
    statement_timeout_ms: u64,
    lock_timeout_ms: u64,
) -> Result<LookupOutcome, sqlx::Error> {
    let mut tx = begin_bounded_read_only(pool.pool(), statement_timeout_ms, lock_timeout_ms).await?;
    let outcome = within(past_statement_timeout(statement_timeout_ms), fetch_lookup(&mut tx, sql, input)).await;
    tx.settle(outcome) // rolled back when the pool takes the connection back (see `run_lookups`)
}

/// A lookup run again after the lookups' shared statement timed out gets
/// this long (ms, `statement_timeout`), so that the slow one fails fast the
/// second time and the call waits at most a fraction of a second more.
pub const LOOKUP_RETRY_STATEMENT_TIMEOUT_MS: u64 = 250;
/// Lock wait (ms, `lock_timeout`) of a lookup run again after a timeout.
pub const LOOKUP_RETRY_LOCK_TIMEOUT_MS: u64 = 100;

/// Runs an escalation's lookups (`sqls`, in order, each with `$1` = the
/// event payload) on one [`TeamReadPool`] connection, whose sessions are
/// read-only and bounded by [`LOOKUP_STATEMENT_TIMEOUT_MS`] and
/// [`LOOKUP_LOCK_TIMEOUT_MS`]. Two or more go as one statement
/// ([`lookups_statement`]) in its own implicit transaction: one round trip
/// for all. If that statement fails, the lookups run one by one so that
/// each gets its own outcome: each alone with the usual bounds after an
/// error (which comes at once), in one transaction with
/// [`LOOKUP_RETRY_STATEMENT_TIMEOUT_MS`] and [`LOOKUP_RETRY_LOCK_TIMEOUT_MS`]
/// after a timeout, so that a slow lookup delays the call by its timeout
/// once, plus a fraction of a second, while the fast ones still render
/// (DESIGN.md invariant 10). Returns one outcome per lookup, in order.
pub async fn run_lookups(pool: &TeamReadPool, sqls: &[&str], input: &Value) -> Vec<Result<LookupOutcome, sqlx::Error>> {
    if sqls.is_empty() {
        return Vec::new(); // no connection, no round trip: nothing to read
    }
    if sqls.len() < 2 {
        return run_lookups_alone(pool, sqls, input).await;
    }
    let together = async {
        let mut conn = HeldConnection::acquire(pool.pool()).await?;
        let row = within(past_statement_timeout(LOOKUP_STATEMENT_TIMEOUT_MS), sqlx::query(&lookups_statement(sqls)).bind(input).fetch_one(&mut *conn)).await;
        conn.settle(row)
    };
    match together.await {
        Ok(row) => {
            let mut out = Vec::with_capacity(sqls.len());
            for (i, sql) in sqls.iter().enumerate() {
                out.push(match row.try_get::<Vec<Option<String>>, _>(i) {
                    Ok(values) => Ok(match values.as_slice() {
                        [] | [None] => LookupOutcome::Empty,
                        [Some(v)] => LookupOutcome::Value(v.clone()),
                        _ => LookupOutcome::Ambiguous,
                    }),
                    // Not an array of text: a column that is not text (a
                    // config fault), or one that is text alone but not in an
                    // array (a domain over text: `ARRAY(…)` of it is an array
                    // of the domain). Run alone, it gets its own outcome.
                    Err(_) => run_lookup(pool, sql, input).await,
                });
            }
            out
        }
        // No connection within the pool's acquire timeout: the call must not
        // wait for one again per lookup; every value renders empty.
        Err(sqlx::Error::PoolTimedOut) => {
            tracing::warn!(lookups = sqls.len(), "lookups: no database connection in time; the message renders without their values");
            sqls.iter().map(|_| Err(sqlx::Error::PoolTimedOut)).collect()
        }
        // Nor after no reply at all (a half-open connection after a failover).
        Err(e) if is_no_reply(&e) => {
            tracing::warn!(lookups = sqls.len(), error = %e, "lookups: no reply from the database in time; the message renders without their values");
            let ms = past_statement_timeout(LOOKUP_STATEMENT_TIMEOUT_MS);
            sqls.iter().map(|_| Err(crate::db::deadline::no_reply(ms))).collect()
        }
        Err(e) => {
            let sqlstate = e.as_database_error().and_then(|d| d.code()).map(|c| c.to_string());
            let timed_out = matches!(sqlstate.as_deref(), Some("57014" | "55P03"));
            tracing::debug!(sqlstate = ?sqlstate, timed_out, "lookups: the shared statement failed; running them one by one");
            if timed_out {
                run_lookups_in_turn(pool, sqls, input, LOOKUP_RETRY_STATEMENT_TIMEOUT_MS, LOOKUP_RETRY_LOCK_TIMEOUT_MS).await
            } else {
                run_lookups_alone(pool, sqls, input).await
            }
        }
    }
}

/// The one statement that runs several lookups: each lookup as a subquery
/// whose first column (renamed by a column alias, whatever its name) is
/// gathered into an array of at most two values, one column per lookup, in
/// order. An empty array is no row; two values are more than one row; a
/// column that is not a text array is run again alone ([`run_lookup`]: a
/// domain over text is text alone, its array is not).
pub fn lookups_statement(sqls: &[&str]) -> String {
    let columns: Vec<String> = sqls
        .iter()
        .enumerate()
        .map(|(i, sql)| {
            format!("ARRAY(SELECT wardcall_value FROM ({}\n) AS wardcall_lookup(wardcall_value) LIMIT 2) AS lookup_{i}", sql.trim().trim_end_matches(';'))
        })
        .collect();
    format!("SELECT {}", columns.join(",\n       "))
}

/// Runs the lookups in order on one [`TeamReadPool`] connection, each alone
/// in its own implicit transaction with the pool's bounds: one round trip
/// each, and a lookup that fails is its own outcome without touching the
/// others. After no reply (a half-open connection) the connection is closed
/// and the lookups after it run each on its own connection ([`run_lookup`]).
async fn run_lookups_alone(pool: &TeamReadPool, sqls: &[&str], input: &Value) -> Vec<Result<LookupOutcome, sqlx::Error>> {
    let mut out = Vec::with_capacity(sqls.len());
    match HeldConnection::acquire(pool.pool()).await {
        Ok(mut conn) => {
            let mut answered = true;
            for sql in sqls {
                let outcome = within(past_statement_timeout(LOOKUP_STATEMENT_TIMEOUT_MS), fetch_lookup(&mut conn, sql, input)).await;
                answered = !matches!(&outcome, Err(e) if is_no_reply(e));
                out.push(outcome);
                if !answered {
                    crate::db::deadline::mark_suspect(pool.pool());
                    break; // dropped unreleased below: closed
                }
            }
            if answered {
                conn.release();
            }
        }
        // No connection in time: every lookup renders without its value
        // (waiting again per lookup would only delay the call).
        Err(e @ sqlx::Error::PoolTimedOut) => {
            tracing::warn!(lookups = sqls.len(), "lookups: no database connection in time; the message renders without their values");
            out.push(Err(e));
            while out.len() < sqls.len() {
                out.push(Err(sqlx::Error::PoolTimedOut));
            }
        }
        Err(e) => {
            tracing::debug!(error = %crate::capture::db_message(&e), "lookups: no connection; running them one by one");
        }
    }
    for sql in &sqls[out.len()..] {
        out.push(run_lookup(pool, sql, input).await);
    }
    out
}

/// Runs the lookups in order in one read-only transaction on a
/// [`TeamReadPool`] connection, bounded by `statement_timeout_ms` and
/// `lock_timeout_ms` (`SET LOCAL`): one round trip each. A lookup that
/// fails aborts that transaction: its error is its outcome (it is not run
/// again), and the lookups after it run one by one, each in its own
/// transaction with the same bounds.
async fn run_lookups_in_turn(
    pool: &TeamReadPool,
    sqls: &[&str],
    input: &Value,
    statement_timeout_ms: u64,
    lock_timeout_ms: u64,
) -> Vec<Result<LookupOutcome, sqlx::Error>> {
    let mut out = Vec::with_capacity(sqls.len());
    match begin_bounded_read_only(pool.pool(), statement_timeout_ms, lock_timeout_ms).await {
        Ok(mut tx) => {
            let mut answered = true;
            for sql in sqls {
                let outcome = within(past_statement_timeout(statement_timeout_ms), fetch_lookup(&mut tx, sql, input)).await;
                let failed = outcome.is_err();
                answered = !matches!(&outcome, Err(e) if is_no_reply(e));
                out.push(outcome);
                if failed {
                    break; // the transaction is aborted; released, it is rolled back
                }
            }
            // Released, not awaited: the `ROLLBACK` is queued on the connection
            // and sent when the pool takes it back, off the call's path (a
            // connection that did not answer is closed instead).
            if answered {
                tx.release();
            } else {
                crate::db::deadline::mark_suspect(pool.pool());
            }
        }
        Err(e) => {
            tracing::debug!(error = %crate::capture::db_message(&e), "lookups: a shared transaction could not begin; running them one by one");
        }
    }
    for sql in &sqls[out.len()..] {
        out.push(run_lookup_bounded(pool, sql, input, statement_timeout_ms, lock_timeout_ms).await);
    }
    out
}

/// Runs one lookup on `conn`, reading at most two rows.
async fn fetch_lookup(conn: &mut PgConnection, sql: &str, input: &Value) -> Result<LookupOutcome, sqlx::Error> {
    use futures_util::TryStreamExt;
    let mut rows = Vec::new();
    {
        let mut stream = sqlx::query(sql).bind(input).fetch(&mut *conn);
        while let Some(row) = stream.try_next().await? {
            rows.push(row);
            if rows.len() > 1 {
                break;
            }
        }
    }
    Ok(match rows.as_slice() {
        [] => LookupOutcome::Empty,
        [row] => match row.try_get::<Option<String>, _>(0) {
            Ok(Some(v)) => LookupOutcome::Value(v),
            Ok(None) => LookupOutcome::Empty,
            Err(_) => LookupOutcome::NotText,
        },
        _ => LookupOutcome::Ambiguous,
    })
}

/// Lock wait allowed to a write-back inside a batch of send records before
/// it and the batch's later write-backs are deferred ([`write_back_attempts`]):
/// the batch holds its attempts' rows, which a nurse's keypress waits for.
pub const BATCHED_WRITE_BACK_LOCK_TIMEOUT: &str = "200ms";
/// Run time allowed to a write-back inside a batch before it is deferred.
pub const BATCHED_WRITE_BACK_STATEMENT_TIMEOUT: &str = "1s";
/// Time (ms) the write-backs of one batch may take in all: the write-backs
/// not started by then are deferred, so that a batch holds its attempts'
/// rows (which status callbacks and keypresses wait for) about this long
/// at most, plus one statement.
pub const BATCHED_WRITE_BACKS_BUDGET_MS: u128 = 250;

/// [`write_back`] for the records of a batch of sends, inside the batch's
/// transaction: the attempts' details in one statement, the settings set
/// once for all (`wardcall.write_back` on, `lock_timeout`
/// [`BATCHED_WRITE_BACK_LOCK_TIMEOUT`], `statement_timeout`
/// [`BATCHED_WRITE_BACK_STATEMENT_TIMEOUT`]) and put back after the last,
/// and each team statement in a savepoint of its own (two round trips a
/// write-back). A statement that fails is rolled back to its savepoint,
/// logged and audited `write_back.failed` (as [`write_back`] does); the
/// others and the records are kept. One that times out (SQLSTATE 55P03 or
/// 57014: a team's lock, a slow statement) is rolled back too, and it and
/// every later one are left out, so that the batch holds its attempts' rows
/// no longer; so are those not started within [`BATCHED_WRITE_BACKS_BUDGET_MS`].
/// Returns how many (the last ones of `items`), which the caller keeps in
/// the same transaction (`store::write_backs::keep`) and runs after the
/// commit, each alone with [`write_back`]'s own timeouts, and only while the
/// call has not moved on (`attempts::lock_if_unsettled`).
/// The team's deferred triggers fire at the commit, with the settings put back.
///
/// Errors: the database's, for the statements around the team's.
pub async fn write_back_attempts(
    conn: &mut PgConnection,
    items: &[crate::store::write_backs::AttemptWriteBack<'_>],
    actor: &str,
) -> Result<usize, sqlx::Error> {
    if items.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = items.iter().map(|i| i.attempt).collect();
    let details = crate::store::attempts::details_many(conn, &ids).await?;
    // The settings go with the first savepoint (one round trip).
    let settings = format!(
        "SELECT set_config('wardcall.write_back', 'on', true), set_config('lock_timeout', '{BATCHED_WRITE_BACK_LOCK_TIMEOUT}', true),
                set_config('statement_timeout', '{BATCHED_WRITE_BACK_STATEMENT_TIMEOUT}', true);
         SAVEPOINT wardcall_write_back"
    );
    let mut in_savepoint = false;
    let mut deferred = 0;
    let started = std::time::Instant::now();
    for (i, item) in items.iter().enumerate() {
        if started.elapsed().as_millis() > BATCHED_WRITE_BACKS_BUDGET_MS {
            deferred = items.len() - i;
            tracing::warn!(deferred, "the write-backs of a batch of send records took their budget; the rest are kept and run alone after the commit");
            break;
        }
        conn.execute(match (i, in_savepoint) {
            (0, _) => settings.as_str(),
            (_, true) => "RELEASE SAVEPOINT wardcall_write_back; SAVEPOINT wardcall_write_back",
            (_, false) => "SAVEPOINT wardcall_write_back",
        })
        .await?;
        in_savepoint = true;
        let subject = details.get(&item.attempt).cloned().unwrap_or(Value::Null);
        if let Err(e) = sqlx::query(item.statement).bind(item.payload).bind(&subject).execute(&mut *conn).await {
            conn.execute("ROLLBACK TO SAVEPOINT wardcall_write_back; RELEASE SAVEPOINT wardcall_write_back").await?;
            in_savepoint = false;
            let sqlstate = e.as_database_error().and_then(|d| d.code()).map(|c| c.to_string());
            if matches!(sqlstate.as_deref(), Some("55P03" | "57014")) {
                deferred = items.len() - i;
                tracing::warn!(hook = item.hook, deferred, sqlstate = ?sqlstate, "a write-back in a batch of send records timed out; it and the batch's later ones are kept and run alone after the commit");
                break;
            }
            let msg = crate::capture::db_message(&e);
            tracing::error!(hook = item.hook, error = %msg, "write-back statement failed; the state change is kept");
            audit::record(
                conn,
                Entity::NotificationAttempt,
                &item.attempt.to_string(),
                "write_back.failed",
                None,
                None,
                actor,
                json!({"hook": item.hook, "error": msg}),
            )
            .await?;
        }
    }
    let restore = "SELECT set_config('wardcall.write_back', 'off', true),
                          set_config('lock_timeout', current_setting('wardcall.saved_lock_timeout'), true),
                          set_config('statement_timeout', current_setting('wardcall.saved_statement_timeout'), true)";
    if in_savepoint {
        conn.execute(format!("RELEASE SAVEPOINT wardcall_write_back; {restore}").as_str()).await?;
    } else {
        conn.execute(restore).await?;
    }
    Ok(deferred)
}

/// Whose details a write-back statement receives as `$2`.
#[derive(Debug, Clone, Copy)]
pub enum WriteBackSubject {
    /// `wardcall.attempt_details(id)`.
    Attempt(Uuid),
    /// `wardcall.alert_details(id)`.
    Alert(Uuid),
}

/// Runs one write-back statement in a savepoint: `$1` = the event payload,
/// `$2` = the subject's details. A failing statement is rolled back to the
/// savepoint, logged and audited; it never undoes the state change around it.
/// On success the savepoint is released and the settings are put back before
/// this returns, so the transaction can go on, and the team's `DEFERRABLE
/// INITIALLY DEFERRED` triggers, which fire at its commit, run with
/// `wardcall.write_back` off: the rows they write are captured (only the
/// write-back statement, with what its immediate triggers write, is skipped).
///
/// Errors: the database's, for the statements around the team's (the
/// team's own error is audited, not returned).
pub async fn write_back(
    conn: &mut PgConnection,
    sql: Option<&str>,
    hook: &str,
    payload: &Value,
    subject: WriteBackSubject,
    actor: &str,
) -> Result<(), sqlx::Error> {
    let Some(sql) = sql else { return Ok(()) };
    let details = match subject {
        // The recipient's id and name (`person_id`, `person_name`) come with the attempt's details.
        WriteBackSubject::Attempt(id) => crate::store::attempts::details_expression(id),
        WriteBackSubject::Alert(id) => crate::store::alerts::details_expression(id),
    };
    // The capture triggers skip rows written while `wardcall.write_back` is on,
    // so a write-back never re-triggers a page; the timeouts keep a team's
    // long-held row lock from stalling webhooks and workers. The savepoint,
    // then the subject's details and the settings in one `SELECT`, go in one
    // round trip (a text without parameters goes by the simple query
    // protocol, which takes several statements; the `SELECT` is the only
    // one that returns a row).
    let opening = format!(
        "SAVEPOINT wardcall_write_back;
         SELECT {details}, set_config('wardcall.write_back', 'on', true), set_config('lock_timeout', '2s', true), set_config('statement_timeout', '5s', true)
           FROM (SELECT set_config('wardcall.saved_statement_timeout', current_setting('statement_timeout'), true),
                        set_config('wardcall.saved_lock_timeout', current_setting('lock_timeout'), true)) saved"
    );
    let rows = conn.fetch_all(opening.as_str()).await?;
    let details: Value = rows.first().ok_or(sqlx::Error::RowNotFound)?.try_get(0)?;
    let outcome = sqlx::query(sql).bind(payload).bind(&details).execute(&mut *conn).await;
    match outcome {
        Ok(_) => {
            // Release the savepoint and put the settings back, in one round
            // trip, before anything else runs (the commit's deferred triggers too).
            conn.execute(
                "RELEASE SAVEPOINT wardcall_write_back;
                 SELECT set_config('wardcall.write_back', 'off', true),
                        set_config('lock_timeout', current_setting('wardcall.saved_lock_timeout'), true),
                        set_config('statement_timeout', current_setting('wardcall.saved_statement_timeout'), true)",
            )
            .await?;
        }
        Err(e) => {
            let msg = crate::capture::db_message(&e);
            // Rolling back to the savepoint also undoes the settings made after it
            // (PostgreSQL reverts `SET LOCAL` with the subtransaction).
            conn.execute("ROLLBACK TO SAVEPOINT wardcall_write_back").await?;
            tracing::error!(hook, error = %msg, "write-back statement failed; the state change is kept");
            let (entity, id) = match subject {
                WriteBackSubject::Attempt(id) => (Entity::NotificationAttempt, id),
                WriteBackSubject::Alert(id) => (Entity::Alert, id),
            };
            audit::record(conn, entity, &id.to_string(), "write_back.failed", None, None, actor, json!({"hook": hook, "error": msg})).await?;
        }
    }
    Ok(())
}
