//! SQL of the durable runtime: claiming runs under a lease with a fencing token,
//! committing step transitions only while the token still matches, resolving
//! waits, retries, cancellation and signals.
//!
//! Lock order, everywhere: the run row first, then the alert row, then
//! notification attempts. Webhooks and workers follow it, so they cannot deadlock.

use crate::store::alerts;
use crate::store::audit::{self, Entity};
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

/// Statuses in which a run is not finished (and may be claimed when due).
pub const LIVE_STATUSES: &str = "('pending','running','sleeping','waiting')";

/// A run claimed by this engine: it holds the lease until its next commit.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub id: Uuid,
    pub workflow: String,
    pub event: String,
    pub input: Value,
    pub state: Value,
    pub step: String,
    /// Failed attempts of the current step so far (0 on first try).
    pub step_attempt: i32,
    /// Incremented on every claim (and by a step run inside a claim,
    /// `commit_fired_in_claim`); every commit checks it.
    pub fencing_token: i64,
    /// Set while a wait is unresolved (the run was claimed at its deadline or on a signal).
    pub wait_signal: Option<String>,
    /// The resolved outcome of the last wait, until the next step commits.
    pub wait_outcome: Option<Value>,
    /// Status before this claim (`pending`, `sleeping`, `waiting`, or `running` for a takeover).
    pub previous_status: String,
    /// The number of the last transition `state` and `step` include: the
    /// run row's checkpoint (`runs.step_seq`) with the step log folded in
    /// (`wardcall.run_steps`, migration 0017). The next transition is
    /// `step_seq + 1`.
    pub step_seq: i64,
}

impl ClaimedRun {
    fn from_row(r: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok(ClaimedRun {
            id: r.try_get("id")?,
            workflow: r.try_get("workflow")?,
            event: r.try_get("event")?,
            input: r.try_get("input")?,
            state: r.try_get("state")?,
            step: r.try_get("step")?,
            step_attempt: r.try_get("step_attempt")?,
            fencing_token: r.try_get("fencing_token")?,
            wait_signal: r.try_get("wait_signal")?,
            wait_outcome: r.try_get("wait_outcome")?,
            previous_status: r.try_get("previous_status")?,
            step_seq: r.try_get("step_seq")?,
        })
    }
}

/// The two CTEs that lease the runs of a CTE `due` (columns `id`,
/// `previous_status`) to the engine named by parameter `owner` for `lease_ms`
/// milliseconds (a parameter), each with its next fencing token, and audit
/// each lease (`run.claimed`, or `run.lease_taken_over` from `running`):
/// `claimed` returns the leased runs as [`ClaimedRun::from_row`] reads them.
/// Shared by [`claim_due`] and [`claim_locked`].
///
/// A run taken over from `running` may have step-log rows after its
/// checkpoint (its owner died or let go mid-way): they are folded into its
/// row here (`wardcall.step_log_fold`, migration 0017), as the `continue`
/// transitions they record would have written it. Only then: every other
/// writer of a run's state checkpoints it, and the gate keeps the function
/// from being called for the others (`OFFSET 0` keeps the subquery whole, so
/// that the gate is a one-time filter above the function's scan; flattened,
/// it became a join filter applied after calling the function for every
/// claimed run).
fn lease_ctes(owner: &str, lease_ms: &str) -> String {
    format!(
        "claimed AS (
             UPDATE wardcall.runs r
                SET status = 'running', lease_owner = {owner}, fencing_token = r.fencing_token + 1,
                    due_at = clock_timestamp() + {lease_ms} * interval '1 millisecond', updated_at = clock_timestamp(),
                    state = coalesce(f.state, r.state), step = coalesce(f.step, r.step), step_seq = coalesce(f.seq, r.step_seq),
                    step_attempt = CASE WHEN f.seq IS NULL THEN r.step_attempt ELSE 0 END,
                    wait_outcome = CASE WHEN f.seq IS NULL THEN r.wait_outcome END,
                    last_error = CASE WHEN f.seq IS NULL THEN r.last_error END
               FROM due LEFT JOIN LATERAL (SELECT * FROM wardcall.step_log_fold(due.id) WHERE due.previous_status = 'running' OFFSET 0) f ON true
              WHERE r.id = due.id
             RETURNING r.id, r.workflow, r.event, r.input, r.state, r.step, r.step_attempt, r.fencing_token,
                       r.wait_signal, r.wait_outcome, r.critical, r.step_seq, due.previous_status),
         audited AS (
             INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT 'run', id::text,
                    CASE WHEN previous_status = 'running' THEN 'run.lease_taken_over' ELSE 'run.claimed' END,
                    previous_status, 'running', 'engine:' || {owner},
                    jsonb_build_object('step', step, 'fencing_token', fencing_token)
               FROM claimed)"
    )
}

/// Claims up to `limit` due runs (pending, sleeping, waiting past deadline or
/// signalled, or running with a lapsed lease) with `FOR UPDATE SKIP LOCKED`,
/// giving each a lease of `lease_ms` milliseconds and a new fencing token, and
/// audits each claim, in one statement.
///
/// Order: due `critical` runs first (oldest `due_at` first), then the other due
/// runs (oldest first) up to the remaining limit, so that a flood of other work
/// never delays a critical alert's claim (DESIGN.md invariant 10). Each half is
/// an index range scan on `runs_claim (critical, due_at)` (migration 0003).
pub async fn claim_due(conn: &mut PgConnection, owner: &str, limit: i64, lease_ms: i64) -> Result<Vec<ClaimedRun>, sqlx::Error> {
    static STATEMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH crit AS (
             SELECT id, status AS previous_status FROM wardcall.runs
              WHERE critical AND status IN ('pending','running','sleeping','waiting') AND due_at <= now()
              ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED),
         rest AS (
             SELECT id, status AS previous_status FROM wardcall.runs
              WHERE NOT critical AND status IN ('pending','running','sleeping','waiting') AND due_at <= now()
              ORDER BY due_at LIMIT greatest($2 - (SELECT count(*) FROM crit), 0) FOR UPDATE SKIP LOCKED),
         due AS (SELECT * FROM crit UNION ALL SELECT * FROM rest),
         {}
         SELECT * FROM claimed ORDER BY critical DESC",
            lease_ctes("$1", "$3")
        )
    });
    let rows = sqlx::query(&STATEMENT).bind(owner).bind(limit).bind(lease_ms).fetch_all(conn).await?;
    rows.iter().map(ClaimedRun::from_row).collect()
}

/// The first statement of a claim that may run steps inside it
/// (`Engine::claim_and_start`): locks up to `critical_limit` due critical
/// runs (oldest due first), then other due runs up to `limit` in all, with
/// `FOR UPDATE SKIP LOCKED`, and reads them without changing them. Each is
/// returned as it is: `fencing_token` its current token, `previous_status`
/// its status, with its `runs.critical` flag; critical runs first. A run
/// left `running` is returned with its step log folded in (as
/// [`claim_locked`] will write it; see `lease_ctes`).
///
/// The columns come from the locking scans themselves, so each row is the
/// version the lock holds: a run that another claim advanced and committed
/// after this statement's snapshot is read as that claim left it (a
/// `SELECT … FOR UPDATE` returns the newest version it locked, PostgreSQL 15
/// manual, 13.2.1 "Read Committed Isolation Level"), never as it was before.
///
/// The caller's transaction then either runs a run's step and writes its
/// transition ([`commit_fired_in_claim`]) or leases it ([`claim_locked`]);
/// what it does neither with stays as it was at commit.
pub async fn lock_due(conn: &mut PgConnection, critical_limit: i64, limit: i64) -> Result<Vec<(ClaimedRun, bool)>, sqlx::Error> {
    let rows = sqlx::query(
        "WITH crit AS (
             SELECT id, workflow, event, input, state, step, step_attempt, fencing_token, wait_signal, wait_outcome,
                    status AS previous_status, critical, due_at, step_seq
               FROM wardcall.runs
              WHERE critical AND status IN ('pending','running','sleeping','waiting') AND due_at <= now()
              ORDER BY due_at LIMIT least($1, $2) FOR UPDATE SKIP LOCKED),
         rest AS (
             SELECT id, workflow, event, input, state, step, step_attempt, fencing_token, wait_signal, wait_outcome,
                    status AS previous_status, critical, due_at, step_seq
               FROM wardcall.runs
              WHERE NOT critical AND status IN ('pending','running','sleeping','waiting') AND due_at <= now()
              ORDER BY due_at LIMIT greatest($2 - (SELECT count(*) FROM crit), 0) FOR UPDATE SKIP LOCKED),
         locked AS (SELECT *, 0 AS half FROM crit UNION ALL SELECT *, 1 FROM rest)
         SELECT l.id, l.workflow, l.event, l.input, coalesce(f.state, l.state) AS state, coalesce(f.step, l.step) AS step,
                CASE WHEN f.seq IS NULL THEN l.step_attempt ELSE 0 END AS step_attempt, l.fencing_token, l.wait_signal,
                CASE WHEN f.seq IS NULL THEN l.wait_outcome END AS wait_outcome, l.previous_status, l.critical,
                coalesce(f.seq, l.step_seq) AS step_seq
           FROM locked l LEFT JOIN LATERAL (SELECT * FROM wardcall.step_log_fold(l.id) WHERE l.previous_status = 'running' OFFSET 0) f ON true
          ORDER BY l.half, l.due_at",
    )
    .bind(critical_limit)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(|r| Ok((ClaimedRun::from_row(r)?, r.try_get("critical")?))).collect()
}

/// Claims runs locked by [`lock_due`] in the caller's transaction, as
/// [`claim_due`] claims: each gets a lease of `lease_ms` milliseconds held by
/// `owner` and its next fencing token, audited `run.claimed` (or
/// `run.lease_taken_over` when it was `running`), in one statement.
/// Returns them claimed, in the order of `runs`.
pub async fn claim_locked(conn: &mut PgConnection, runs: &[&ClaimedRun], owner: &str, lease_ms: i64) -> Result<Vec<ClaimedRun>, sqlx::Error> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = runs.iter().map(|r| r.id).collect();
    let previous: Vec<&str> = runs.iter().map(|r| r.previous_status.as_str()).collect();
    static STATEMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH due AS (SELECT * FROM unnest($1::uuid[], $2::text[]) AS t(id, previous_status)),
         {}
         SELECT * FROM claimed",
            lease_ctes("$3", "$4")
        )
    });
    let rows = sqlx::query(&STATEMENT).bind(&ids).bind(&previous).bind(owner).bind(lease_ms).fetch_all(conn).await?;
    let mut by_id: std::collections::HashMap<Uuid, ClaimedRun> =
        rows.iter().map(ClaimedRun::from_row).map(|r| r.map(|r| (r.id, r))).collect::<Result<_, _>>()?;
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

/// When live runs are due, in milliseconds from now, read with the
/// database's clock: `(next, next_ahead)`. `next` is the earliest due time
/// of any live run (negative: overdue), `next_ahead` the earliest still in
/// the future (what the scheduler must wake for while overdue runs are held
/// by another transaction); `None` when there is no such run. Four index
/// lookups on `runs_claim` (one per `critical` value and bound).
///
/// Errors: a database error.
pub async fn next_due_in_ms(conn: &mut PgConnection) -> Result<(Option<f64>, Option<f64>), sqlx::Error> {
    sqlx::query_as(
        "WITH t AS (SELECT clock_timestamp() AS now)
         SELECT (extract(epoch FROM least(
                    (SELECT min(due_at) FROM wardcall.runs WHERE critical AND status IN ('pending','running','sleeping','waiting')),
                    (SELECT min(due_at) FROM wardcall.runs WHERE NOT critical AND status IN ('pending','running','sleeping','waiting')))
                 - t.now) * 1000)::float8,
                (extract(epoch FROM least(
                    (SELECT min(due_at) FROM wardcall.runs WHERE critical AND status IN ('pending','running','sleeping','waiting') AND due_at > t.now),
                    (SELECT min(due_at) FROM wardcall.runs WHERE NOT critical AND status IN ('pending','running','sleeping','waiting') AND due_at > t.now))
                 - t.now) * 1000)::float8
           FROM t",
    )
    .fetch_one(conn)
    .await
}

/// Extends the lease; false when the run is no longer ours (token moved on,
/// cancelled, or finished).
pub async fn renew_lease(conn: &mut PgConnection, id: Uuid, token: i64, lease_ms: i64) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE wardcall.runs SET due_at = clock_timestamp() + $3 * interval '1 millisecond'
          WHERE id = $1 AND fencing_token = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(token)
    .bind(lease_ms)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Locks the run row if this engine still holds it with `token`. The first
/// statement of every fenced transaction; `false` means the lease was lost.
pub async fn lock_fenced(conn: &mut PgConnection, id: Uuid, token: i64) -> Result<bool, sqlx::Error> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM wardcall.runs WHERE id = $1 AND fencing_token = $2 AND status = 'running' FOR UPDATE")
        .bind(id)
        .bind(token)
        .fetch_optional(conn)
        .await?;
    Ok(found.is_some())
}

/// Folds the run's step log into its row (`wardcall.fold_step_log`,
/// migration 0017): state, step and `step_seq` as the `continue`
/// transitions logged after its checkpoint would have written them, with
/// `step_attempt` 0 and no wait outcome or last error. Returns the run's step
/// after the fold, or `None` when the log had nothing after the checkpoint
/// (nothing written). Call it holding the run's row lock ([`lock_fenced`],
/// [`lock_row`]), before a write that changes the run's status or state
/// without writing its whole state.
///
/// Errors: a database error.
pub async fn fold_step_log(conn: &mut PgConnection, id: Uuid) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT wardcall.fold_step_log($1)").bind(id).fetch_one(conn).await
}

/// Whether this execution (fencing `token`) still holds the run, without a
/// lock: checked before a request leaves that must not follow a cancel.
pub async fn holds(pool: &PgPool, id: Uuid, token: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM wardcall.runs WHERE id = $1 AND fencing_token = $2 AND status = 'running')")
        .bind(id)
        .bind(token)
        .fetch_one(pool)
        .await
}

/// Extends the lease of a run this execution (fencing `token`) still holds,
/// as [`renew_lease`] does, on a pooled connection: `false` when the run is
/// no longer its own (taken over after its lease lapsed, cancelled or
/// finished). Checked, and the lease made good for `lease_ms` milliseconds
/// again, before a request leaves that must not follow a takeover or a
/// cancel (a dispatched first tier whose step came late, or whose dispatch
/// took long to commit).
///
/// Errors: a database error.
pub async fn renew_if_held(pool: &PgPool, id: Uuid, token: i64, lease_ms: i64) -> Result<bool, sqlx::Error> {
    renew_lease(&mut *pool.acquire().await?, id, token, lease_ms).await
}

/// Whether a critical run is due now (the dispatcher then leases no other
/// run, so that the scheduler claims the critical one first).
pub async fn critical_run_due(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM wardcall.runs
                         WHERE critical AND status IN ('pending','running','sleeping','waiting') AND due_at <= now())",
    )
    .fetch_one(conn)
    .await
}

/// The runs a dispatch creates ([`create_runs`], [`claim_into_runs`]), one
/// per index of every slice.
#[derive(Debug, Clone, Copy)]
pub struct NewRuns<'a> {
    pub workflows: &'a [String],
    /// The outbox row each run comes from (one run per workflow and event).
    pub event_ids: &'a [i64],
    pub events: &'a [String],
    pub inputs: &'a [Value],
    /// Created leased to the dispatching engine (`running`, token 1) rather
    /// than `pending`.
    pub leased: &'a [bool],
    pub criticals: &'a [bool],
    /// The run's key (`runs.key`, one live run per workflow and key), if any.
    pub keys: &'a [Option<String>],
}

/// Creates a dispatch batch's runs in one statement, audited `run.created`
/// (actor `engine:<engine_id>`): a leased run is `running` under
/// `engine_id` with a lease of `lease_ms` milliseconds, the others `pending`
/// and due now. A run whose (workflow, outbox row) exists already is not
/// created again. Returns, in creation order, the leased runs as claimed
/// (`Some`) and a `None` per pending run.
pub async fn create_runs(conn: &mut PgConnection, runs: &NewRuns<'_>, engine_id: &str, lease_ms: i64) -> Result<Vec<Option<ClaimedRun>>, sqlx::Error> {
    static STATEMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH input AS (SELECT * FROM {NEW_RUNS_INPUT}),
             {NEW_RUNS_CREATED_AND_AUDITED}
             SELECT *, 'pending'::text AS previous_status FROM created"
        )
    });
    let rows = bind_new_runs(sqlx::query(STATEMENT.as_str()), runs, engine_id, lease_ms).fetch_all(conn).await?;
    leased_runs(&rows)
}

/// The rows of `NewRuns`, as the statements that create runs read them
/// (`$1`, `$2`, `$3`, `$4`, `$5`, `$8`, `$9`: [`bind_new_runs`]), in order.
const NEW_RUNS_INPUT: &str = "unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[], $5::bool[], $8::bool[], $9::text[])
                 WITH ORDINALITY AS t(workflow, event_id, event, input, take, critical, key, ord)";

/// The CTE `created` of [`NEW_RUNS_CREATED_AND_AUDITED`] alone, for a
/// statement that audits its runs with other records in one ordered insert
/// ([`claim_into_runs`] with first tiers); a macro, so that both are
/// literals joined at compile time.
macro_rules! new_runs_created {
    () => {
        "created AS (
             INSERT INTO wardcall.runs (workflow, event_id, event, input, step, status, lease_owner, fencing_token, due_at, critical, key)
             SELECT workflow, event_id, event, input, 'start',
                    CASE WHEN take THEN 'running' ELSE 'pending' END,
                    CASE WHEN take THEN $6 END,
                    CASE WHEN take THEN 1 ELSE 0 END,
                    CASE WHEN take THEN clock_timestamp() + $7 * interval '1 millisecond' ELSE clock_timestamp() END,
                    critical, key
               FROM input ORDER BY ord
             ON CONFLICT DO NOTHING
             RETURNING id, workflow, event_id, event, input, state, step, step_attempt, fencing_token, wait_signal, wait_outcome, status, step_seq)"
    };
}

/// The runs of the rows of `input` ([`NEW_RUNS_INPUT`]'s columns) created
/// in order (`ON CONFLICT DO NOTHING`: a (workflow, outbox row) that has its
/// run, or a key a live run holds, creates nothing) and audited
/// `run.created`: leased to `$6` for `$7` ms, or pending. The CTEs
/// `created` and `audited` of [`create_runs`] and [`claim_into_runs`].
const NEW_RUNS_CREATED_AND_AUDITED: &str = concat!(
    new_runs_created!(),
    ",
         audited AS (
             INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT 'run', id::text, 'run.created', NULL, status, 'engine:' || $6,
                    jsonb_build_object('workflow', workflow, 'event', event)
               FROM created)"
);

/// Binds `runs`, `engine_id` and `lease_ms` as `$1`..`$9` of a statement
/// that creates runs ([`NEW_RUNS_INPUT`], [`NEW_RUNS_CREATED_AND_AUDITED`]).
fn bind_new_runs<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    runs: &NewRuns<'q>,
    engine_id: &'q str,
    lease_ms: i64,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(runs.workflows)
        .bind(runs.event_ids)
        .bind(runs.events)
        .bind(runs.inputs)
        .bind(runs.leased)
        .bind(engine_id)
        .bind(lease_ms)
        .bind(runs.criticals)
        .bind(runs.keys)
}

/// The rows of a statement that created runs: the leased ones as claimed
/// (`Some`), `None` per pending run, in creation order.
fn leased_runs(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<Option<ClaimedRun>>, sqlx::Error> {
    rows.iter()
        .map(|row| {
            let status: String = row.try_get("status")?;
            Ok(if status == "running" { Some(ClaimedRun::from_row(row)?) } else { None })
        })
        .collect()
}

/// A whole dispatch of critical events in one autocommit statement: takes
/// the dispatch lock (`pg_advisory_xact_lock(lock_key)`, the one every
/// dispatch batch takes, so that a batch with an event that cancels or
/// signals by key either sees these runs or is seen by them), claims the
/// outbox rows of `runs.event_ids` that are still unprocessed and not held
/// by another dispatcher (`FOR UPDATE SKIP LOCKED`; the lock is taken before
/// any row is), marks them processed by `engine_id`, and creates the runs
/// of `runs` whose outbox row it claimed, as [`create_runs`] does (leased to
/// `engine_id` for `lease_ms` milliseconds or pending, audited
/// `run.created`, in `runs`' order; a run whose (workflow, outbox row)
/// exists, or whose key a live run holds, is not created). Without first
/// tiers it commits asynchronously (`set_config('synchronous_commit', 'off',
/// true)`, PostgreSQL manual 30.4), as a dispatch batch does: its runs'
/// first effects follow a commit that writes.
///
/// With `tiers` (one per run of `runs`; `None` for a run without), the
/// same statement also opens the alert of each created run that has a tier
/// (without its message: `message` NULL until the step writes it,
/// [`alerts::write_message`]; audited `alert.opened`) and records an intent
/// at generation 0 for each of the tier's recipients, fenced by the run's
/// token (audited `attempt.intent`: person id, channel and position, never
/// the address), as [`alerts::open_first_tiers`] would, and commits
/// synchronously: the intents are durable when it returns (DESIGN.md
/// invariant 2: before their sends). The audit records go in one ordered
/// insert: every `run.created` first, then run by run its `alert.opened`
/// and its intents in recipient order.
///
/// Returns, in creation order, the leased runs created as claimed (`Some`,
/// with the first tier opened for it, if any) and a `None` per pending run.
///
/// Errors: a database error (nothing written); `lock_timeout` (55P03)
/// while another dispatch holds the lock for too long.
pub async fn claim_into_runs(
    conn: &mut PgConnection,
    runs: &NewRuns<'_>,
    tiers: &[Option<alerts::TierIntents>],
    engine_id: &str,
    lease_ms: i64,
    lock_key: i64,
) -> Result<Vec<Option<DispatchedRun>>, sqlx::Error> {
    if tiers.iter().any(Option::is_some) {
        return claim_into_runs_opening(conn, runs, tiers, engine_id, lease_ms, lock_key).await;
    }
    static STATEMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH {DIRECT_CLAIM_CTES},
             async_commit AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS setting),
             input AS (SELECT * FROM {NEW_RUNS_INPUT} WHERE t.event_id IN (SELECT id FROM claimed)),
             {NEW_RUNS_CREATED_AND_AUDITED}
             SELECT created.*, 'pending'::text AS previous_status FROM created, async_commit"
        )
    });
    let rows = bind_new_runs(sqlx::query(STATEMENT.as_str()), runs, engine_id, lease_ms).bind(lock_key).fetch_all(conn).await?;
    Ok(leased_runs(&rows)?.into_iter().map(|run| run.map(|run| DispatchedRun { run, first_tier: None })).collect())
}

/// The CTEs of [`claim_into_runs`]' statements that take the dispatch lock
/// (`$10`) before any outbox row is locked (`dispatch_lock`, materialized
/// and joined), then lock the rows of `$2` still unprocessed and not held
/// by another dispatcher (`picked`) and mark them processed by `$6`
/// (`claimed`).
const DIRECT_CLAIM_CTES: &str = "dispatch_lock AS MATERIALIZED (SELECT pg_advisory_xact_lock($10) IS NULL AS none),
             picked AS MATERIALIZED (
                 SELECT o.id FROM wardcall.outbox o, dispatch_lock
                  WHERE o.id = ANY($2::bigint[]) AND o.processed_at IS NULL AND NOT dispatch_lock.none
                  ORDER BY o.id FOR UPDATE OF o SKIP LOCKED),
             claimed AS (
                 UPDATE wardcall.outbox o SET processed_at = clock_timestamp(), processed_by = $6
                   FROM picked WHERE o.id = picked.id
                 RETURNING o.id)";

/// A run created by [`claim_into_runs`], leased to the dispatching engine.
#[derive(Debug)]
pub struct DispatchedRun {
    pub run: ClaimedRun,
    /// Its first tier, opened by the dispatch: always
    /// [`alerts::OpenedWithIntents::Opened`] (the alert's id and, per
    /// recipient, `(person id, attempt id)`); `None` when the dispatch had
    /// no tier for it.
    pub first_tier: Option<alerts::OpenedWithIntents>,
}

/// A row of [`claim_into_runs_opening`] past the run's columns: the alert
/// opened, and the intents as (person ids, attempt ids) in recipient order.
type OpeningColumns = (Option<Uuid>, Option<Vec<String>>, Option<Vec<Uuid>>);

/// [`claim_into_runs`] with first tiers: one statement, committed
/// synchronously.
async fn claim_into_runs_opening(
    conn: &mut PgConnection,
    runs: &NewRuns<'_>,
    tiers: &[Option<alerts::TierIntents>],
    engine_id: &str,
    lease_ms: i64,
    lock_key: i64,
) -> Result<Vec<Option<DispatchedRun>>, sqlx::Error> {
    static STATEMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH {DIRECT_CLAIM_CTES},
             input AS (SELECT * FROM {NEW_RUNS_INPUT} WHERE t.event_id IN (SELECT id FROM claimed)),
             {created},
             made AS MATERIALIZED (
                 SELECT c.*, input.ord FROM created c JOIN input ON input.workflow = c.workflow AND input.event_id = c.event_id),
             tier AS MATERIALIZED (
                 SELECT * FROM unnest($11::bigint[], $12::text[], $13::int[], $14::int[], $15::text[], $16::text[], $17::bigint[])
                     AS t(ord, policy, cycle, step_index, channel, provider, reconcile_ms)),
             opening AS MATERIALIZED (
                 SELECT made.id AS run_id, made.workflow, made.fencing_token, tier.* FROM made JOIN tier ON tier.ord = made.ord
                  WHERE made.status = 'running'),
             alert AS (
                 INSERT INTO wardcall.alerts (run_id, workflow, policy, message, status)
                 SELECT run_id, workflow, policy, NULL, 'open' FROM opening ORDER BY ord
                 ON CONFLICT (run_id) DO NOTHING RETURNING id, run_id),
             people AS MATERIALIZED (
                 SELECT * FROM unnest($18::bigint[], $19::text[], $20::text[], $21::text[])
                     WITH ORDINALITY AS p(tier, person_id, person_name, destination, pord)),
             intents AS (
                 INSERT INTO wardcall.notification_attempts
                     (alert_id, run_id, step_key, cycle, step_index, person_id, person_name, generation, channel, destination, provider, status,
                      fencing_token, reconcile_after)
                 SELECT alert.id, o.run_id, '', o.cycle, o.step_index, p.person_id, p.person_name, 0, o.channel, p.destination, o.provider,
                        'intent', o.fencing_token, clock_timestamp() + o.reconcile_ms * interval '1 millisecond'
                   FROM people p JOIN opening o ON o.ord = p.tier JOIN alert ON alert.run_id = o.run_id
                  ORDER BY p.pord
                 RETURNING id, run_id, person_id),
             audited AS (
                 INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
                 SELECT e.entity, e.entity_id, e.action, NULL, e.to_state, 'engine:' || $6, e.detail FROM (
                     SELECT 0 AS section, made.ord, 0::bigint AS within, 'run'::text AS entity, made.id::text AS entity_id,
                            'run.created'::text AS action, made.status AS to_state,
                            jsonb_build_object('workflow', made.workflow, 'event', made.event) AS detail
                       FROM made
                     UNION ALL
                     SELECT 1, o.ord, 0, 'alert', alert.id::text, 'alert.opened', 'open', jsonb_build_object('run_id', o.run_id, 'policy', o.policy)
                       FROM alert JOIN opening o ON o.run_id = alert.run_id
                     UNION ALL
                     SELECT 1, o.ord, p.pord, 'notification_attempt', n.id::text, 'attempt.intent', 'intent',
                            jsonb_build_object('person_id', n.person_id, 'channel', o.channel, 'cycle', o.cycle, 'step_index', o.step_index,
                                               'generation', 0)
                       FROM intents n JOIN opening o ON o.run_id = n.run_id JOIN people p ON p.tier = o.ord AND p.person_id = n.person_id) e
                  ORDER BY e.section, e.ord, e.within)
             SELECT made.*, 'pending'::text AS previous_status, alert.id AS alert_id,
                    (SELECT array_agg(n.person_id ORDER BY p.pord) FROM intents n JOIN people p ON p.tier = made.ord AND p.person_id = n.person_id
                      WHERE n.run_id = made.id) AS intent_people,
                    (SELECT array_agg(n.id ORDER BY p.pord) FROM intents n JOIN people p ON p.tier = made.ord AND p.person_id = n.person_id
                      WHERE n.run_id = made.id) AS intent_ids
               FROM made LEFT JOIN alert ON alert.run_id = made.id
              ORDER BY made.ord",
            created = new_runs_created!()
        )
    });
    let (mut tier_of, mut policies, mut cycles, mut step_indexes, mut channels, mut providers, mut reconcile_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, t) in tiers.iter().enumerate().filter_map(|(i, t)| Some((i, t.as_ref()?))) {
        tier_of.push(i as i64 + 1);
        policies.push(t.policy.as_str());
        cycles.push(t.position.0);
        step_indexes.push(t.position.1);
        channels.push(t.channel.as_str());
        providers.push(t.provider.as_str());
        reconcile_ms.push(t.reconcile_after_ms);
    }
    let people = alerts::RecipientColumns::of(tiers.iter().enumerate().filter_map(|(i, t)| Some((i as i64 + 1, t.as_ref()?.recipients.as_slice()))));
    let rows = bind_new_runs(sqlx::query(STATEMENT.as_str()), runs, engine_id, lease_ms)
        .bind(lock_key)
        .bind(&tier_of)
        .bind(&policies)
        .bind(&cycles)
        .bind(&step_indexes)
        .bind(&channels)
        .bind(&providers)
        .bind(&reconcile_ms)
        .bind(&people.tier)
        .bind(&people.person_ids)
        .bind(&people.names)
        .bind(&people.destinations)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|row| {
            let status: String = row.try_get("status")?;
            if status != "running" {
                return Ok(None);
            }
            let run = ClaimedRun::from_row(row)?;
            let (alert, people, ids): OpeningColumns = (row.try_get("alert_id")?, row.try_get("intent_people")?, row.try_get("intent_ids")?);
            let first_tier = alert.map(|alert| alerts::OpenedWithIntents::Opened {
                alert,
                intents: people.unwrap_or_default().into_iter().zip(ids.unwrap_or_default()).collect(),
            });
            Ok(Some(DispatchedRun { run, first_tier }))
        })
        .collect()
}

/// Locks a run row (`FOR UPDATE`) without a fencing check: the first
/// statement of a webhook's transaction (the workers' lock order).
pub async fn lock_row(conn: &mut PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1 FROM wardcall.runs WHERE id = $1 FOR UPDATE").bind(id).execute(conn).await?;
    Ok(())
}

/// Locks a run row like [`lock_row`] and reads its workflow name and input
/// (the event payload) in the same round trip.
pub async fn lock_row_reading(conn: &mut PgConnection, id: Uuid) -> Result<(String, Value), sqlx::Error> {
    sqlx::query_as("SELECT workflow, input FROM wardcall.runs WHERE id = $1 FOR UPDATE").bind(id).fetch_one(conn).await
}

/// Saves a run's state mid-step (inside a fenced transaction, after
/// [`lock_fenced`]): e.g. the recipients a tier resolved, recorded with the
/// intents so that an engine taking the run over calls the same people.
/// The step log is folded into the row first ([`fold_step_log`]), so that
/// the row's `step_seq` and `step` match the state written.
pub async fn save_state(conn: &mut PgConnection, id: Uuid, state: &Value) -> Result<(), sqlx::Error> {
    fold_step_log(&mut *conn, id).await?;
    sqlx::query("UPDATE wardcall.runs SET state = $2 WHERE id = $1").bind(id).bind(state).execute(conn).await?;
    Ok(())
}

/// The outcome of resolving a wait after a claim.
#[derive(Debug)]
pub enum WaitResolution {
    /// A signal (kept from before, or arrived) resolved it: `{"signal": name, "payload": …}`.
    Resolved(Value),
    /// Nothing arrived and the deadline has not passed: the run is parked again.
    Parked,
    /// The lease was lost meanwhile.
    LeaseLost,
}

/// Resolves the wait of a claimed run in one transaction: the oldest unconsumed
/// signal of that name wins; else, if the deadline passed, the timeout wins;
/// else the run goes back to waiting. Exactly one outcome commits: the run row
/// is locked first, as `wardcall.send_signal` locks it, so a racing signal is
/// either seen here or finds the run waiting again (and makes it due).
pub async fn resolve_wait(conn: &mut PgConnection, run: &ClaimedRun, actor: &str) -> Result<WaitResolution, sqlx::Error> {
    let signal = run.wait_signal.as_deref().unwrap_or_default();
    let mut tx = sqlx::Connection::begin(conn).await?;
    if !lock_fenced(&mut tx, run.id, run.fencing_token).await? {
        return Ok(WaitResolution::LeaseLost);
    }
    let found: Option<(i64, Value)> = sqlx::query_as(
        "SELECT id, payload FROM wardcall.signals WHERE run_id = $1 AND name = $2 AND consumed_at IS NULL
          ORDER BY id LIMIT 1 FOR UPDATE",
    )
    .bind(run.id)
    .bind(signal)
    .fetch_optional(&mut *tx)
    .await?;
    let outcome = if let Some((signal_id, payload)) = found {
        sqlx::query("UPDATE wardcall.signals SET consumed_at = clock_timestamp() WHERE id = $1").bind(signal_id).execute(&mut *tx).await?;
        json!({"signal": signal, "payload": payload, "signal_id": signal_id})
    } else {
        let expired: bool = sqlx::query_scalar("SELECT coalesce(wait_deadline <= clock_timestamp(), true) FROM wardcall.runs WHERE id = $1")
            .bind(run.id)
            .fetch_one(&mut *tx)
            .await?;
        if !expired {
            sqlx::query(
                "UPDATE wardcall.runs SET status = 'waiting', due_at = wait_deadline, lease_owner = NULL,
                        updated_at = clock_timestamp() WHERE id = $1",
            )
            .bind(run.id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(WaitResolution::Parked);
        }
        json!({"timeout": true, "signal": signal})
    };
    sqlx::query("UPDATE wardcall.runs SET wait_signal = NULL, wait_outcome = $2 WHERE id = $1").bind(run.id).bind(&outcome).execute(&mut *tx).await?;
    let action = if outcome.get("timeout").is_some() { "run.wait_timed_out" } else { "run.signal_received" };
    audit::record(&mut tx, Entity::Run, &run.id.to_string(), action, Some("waiting"), Some("running"), actor, json!({"signal": signal, "step": run.step}))
        .await?;
    tx.commit().await?;
    Ok(WaitResolution::Resolved(outcome))
}

/// What a committed transition leaves the run as.
#[derive(Debug, Clone)]
pub enum Parking {
    /// Keep the lease and go on with `step` at once.
    Continue,
    /// Sleep until the due time.
    Sleep {
        due_at_epoch_ms: Option<i64>,
        delay_ms: i64,
    },
    /// Wait for `signal` until `timeout_ms` from now.
    Wait {
        signal: String,
        timeout_ms: i64,
    },
    Complete,
    /// Fail the run (a dead letter, `wardcall.dead_letters`): this attempt
    /// counts in `step_attempt`, and `error` is kept in `last_error`.
    Fail {
        error: String,
    },
    /// Finished as `cancelled` (after an `on_cancel` hook).
    Cancelled,
    /// Run the same step again after `delay_ms`, without counting an attempt.
    Defer {
        delay_ms: i64,
    },
}

/// Commits a step's transition if the lease still holds: new state and step,
/// and the run's new status, audited, in one statement ([`commit_transitions`]
/// with one run). Returns `Ok(None)` when the lease was lost (nothing was
/// written), else whether the run is due immediately (a kept signal).
pub async fn commit_transition(
    pool: &PgPool,
    run: &ClaimedRun,
    state: &Value,
    next_step: &str,
    parking: &Parking,
    actor: &str,
) -> Result<Option<bool>, sqlx::Error> {
    let one = TransitionCommit {
        id: run.id,
        fencing_token: run.fencing_token,
        step: run.step.clone(),
        state: std::sync::Arc::new(state.clone()),
        next_step: next_step.to_string(),
        parking: parking.clone(),
        actor: actor.to_string(),
        seq: run.step_seq + 1,
        patch: None,
    };
    Ok(commit_transitions(&mut *pool.acquire().await?, std::slice::from_ref(&one)).await?.pop().flatten())
}

/// Writes a step's transition inside the caller's transaction, which has
/// already locked the run with [`lock_fenced`] (so the token matched): a
/// checkpoint of the whole state, numbered `run.step_seq + 1`.
/// Returns whether the run is due immediately (a kept signal).
pub async fn write_transition(
    tx: &mut PgConnection,
    run: &ClaimedRun,
    state: &Value,
    next_step: &str,
    parking: &Parking,
    actor: &str,
) -> Result<bool, sqlx::Error> {
    let mut due_now = false;
    let seq = run.step_seq + 1;
    if matches!(parking, Parking::Fail { .. } | Parking::Cancelled | Parking::Defer { .. }) {
        // These keep some of the row's columns (attempts, error, outcome,
        // step): the steps logged since the checkpoint go into it first.
        fold_step_log(&mut *tx, run.id).await?;
    }
    let (status, detail) = match parking {
        Parking::Continue => {
            sqlx::query(
                "UPDATE wardcall.runs SET state = $2, step = $3, step_attempt = 0, wait_outcome = NULL,
                        last_error = NULL, updated_at = clock_timestamp(), step_seq = $4 WHERE id = $1",
            )
            .bind(run.id)
            .bind(state)
            .bind(next_step)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            ("running", json!({"from_step": run.step, "to_step": next_step}))
        }
        Parking::Sleep { due_at_epoch_ms, delay_ms } => {
            sqlx::query(
                "UPDATE wardcall.runs SET state = $2, step = $3, step_attempt = 0, wait_outcome = NULL, last_error = NULL,
                        status = 'sleeping', lease_owner = NULL, updated_at = clock_timestamp(),
                        due_at = CASE WHEN $4::bigint IS NOT NULL THEN to_timestamp($4::bigint / 1000.0)
                                      ELSE clock_timestamp() + $5 * interval '1 millisecond' END,
                        step_seq = $6 WHERE id = $1",
            )
            .bind(run.id)
            .bind(state)
            .bind(next_step)
            .bind(due_at_epoch_ms)
            .bind(delay_ms)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            ("sleeping", json!({"from_step": run.step, "to_step": next_step, "delay_ms": delay_ms, "due_at_epoch_ms": due_at_epoch_ms}))
        }
        Parking::Wait { signal, timeout_ms } => {
            // A new statement after the lock: it sees every signal committed so far.
            due_now = sqlx::query_scalar(
                "UPDATE wardcall.runs SET state = $2, step = $3, step_attempt = 0, wait_outcome = NULL, last_error = NULL,
                        status = 'waiting', lease_owner = NULL, updated_at = clock_timestamp(),
                        wait_signal = $4, wait_deadline = clock_timestamp() + $5 * interval '1 millisecond',
                        due_at = CASE WHEN EXISTS (SELECT 1 FROM wardcall.signals s
                                                    WHERE s.run_id = $1 AND s.name = $4 AND s.consumed_at IS NULL)
                                      THEN clock_timestamp()
                                      ELSE clock_timestamp() + $5 * interval '1 millisecond' END,
                        step_seq = $6 WHERE id = $1 RETURNING due_at <= clock_timestamp()",
            )
            .bind(run.id)
            .bind(state)
            .bind(next_step)
            .bind(signal)
            .bind(timeout_ms)
            .bind(seq)
            .fetch_one(&mut *tx)
            .await?;
            ("waiting", json!({"from_step": run.step, "to_step": next_step, "signal": signal, "timeout_ms": timeout_ms}))
        }
        Parking::Complete => {
            sqlx::query(
                "UPDATE wardcall.runs SET state = $2, step = $3, status = 'completed', lease_owner = NULL, step_attempt = 0, last_error = NULL,
                        wait_outcome = NULL, finished_at = clock_timestamp(), updated_at = clock_timestamp(), step_seq = $4 WHERE id = $1",
            )
            .bind(run.id)
            .bind(state)
            .bind(next_step)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            ("completed", json!({"step": run.step}))
        }
        Parking::Fail { error } => {
            sqlx::query(
                "UPDATE wardcall.runs SET state = $2, step = $3, status = 'failed', lease_owner = NULL, last_error = $4,
                        step_attempt = step_attempt + 1, finished_at = clock_timestamp(), updated_at = clock_timestamp(), step_seq = $5 WHERE id = $1",
            )
            .bind(run.id)
            .bind(state)
            .bind(next_step)
            .bind(error)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            ("failed", json!({"step": run.step, "error": error}))
        }
        Parking::Cancelled => {
            sqlx::query(
                "UPDATE wardcall.runs SET state = $2, step = $3, status = 'cancelled', lease_owner = NULL, key = NULL,
                        wait_outcome = NULL, finished_at = clock_timestamp(), updated_at = clock_timestamp(), step_seq = $4 WHERE id = $1",
            )
            .bind(run.id)
            .bind(state)
            .bind(next_step)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            ("cancelled", json!({"step": run.step}))
        }
        Parking::Defer { delay_ms } => {
            sqlx::query(
                "UPDATE wardcall.runs SET state = $2, status = 'sleeping', lease_owner = NULL, updated_at = clock_timestamp(),
                        due_at = clock_timestamp() + $3 * interval '1 millisecond', step_seq = $4 WHERE id = $1",
            )
            .bind(run.id)
            .bind(state)
            .bind(delay_ms)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            ("sleeping", json!({"step": run.step, "deferred_ms": delay_ms}))
        }
    };
    let action = match parking {
        Parking::Continue => "run.step_completed",
        Parking::Sleep { .. } => "run.sleeping",
        Parking::Wait { .. } => "run.waiting",
        Parking::Complete => "run.completed",
        Parking::Fail { .. } => "run.failed",
        Parking::Cancelled => "run.cancelled",
        Parking::Defer { .. } => "run.deferred",
    };
    audit::record(&mut *tx, Entity::Run, &run.id.to_string(), action, Some("running"), Some(status), actor, detail).await?;
    Ok(due_now)
}

/// One step transition of a run, to be committed with others in one
/// statement by [`commit_transitions`].
#[derive(Debug, Clone)]
pub struct TransitionCommit {
    /// The run.
    pub id: Uuid,
    /// The fencing token of this engine's claim; the transition commits only
    /// while the run still carries it (and is `running`).
    pub fencing_token: i64,
    /// The step that ran (`runs.step` when it ran; the audit detail names it).
    pub step: String,
    /// The run's new state (shared, not copied, between the worker that
    /// waits for the commit and the batch that writes it).
    pub state: std::sync::Arc<Value>,
    /// The step the run goes on with.
    pub next_step: String,
    /// What the run becomes.
    pub parking: Parking,
    /// The audit actor (`engine:<id>`).
    pub actor: String,
    /// The transition's number: the run's `step_seq` + 1 ([`ClaimedRun::step_seq`]).
    pub seq: i64,
    /// For a `continue` of a run this engine leases: the state's changes
    /// (`runtime::state_patch::diff`), appended to the step log
    /// (`wardcall.run_steps`) instead of rewriting the run's row; `state` is
    /// then not written. `None`: the whole state is written (a checkpoint).
    pub patch: Option<Value>,
}

/// The kind (as the batched statement names it), new status, audit action and
/// audit detail of a transition; the same as [`write_transition`] writes.
fn transition_row(t: &TransitionCommit) -> (&'static str, &'static str, &'static str, Value) {
    let (step, next) = (&t.step, &t.next_step);
    match &t.parking {
        Parking::Continue => ("continue", "running", "run.step_completed", json!({"from_step": step, "to_step": next})),
        Parking::Sleep { due_at_epoch_ms, delay_ms } => {
            ("sleep", "sleeping", "run.sleeping", json!({"from_step": step, "to_step": next, "delay_ms": delay_ms, "due_at_epoch_ms": due_at_epoch_ms}))
        }
        Parking::Wait { signal, timeout_ms } => {
            ("wait", "waiting", "run.waiting", json!({"from_step": step, "to_step": next, "signal": signal, "timeout_ms": timeout_ms}))
        }
        Parking::Complete => ("complete", "completed", "run.completed", json!({"step": step})),
        Parking::Fail { error } => ("fail", "failed", "run.failed", json!({"step": step, "error": error})),
        Parking::Cancelled => ("cancelled", "cancelled", "run.cancelled", json!({"step": step})),
        Parking::Defer { delay_ms } => ("defer", "sleeping", "run.deferred", json!({"step": step, "deferred_ms": delay_ms})),
    }
}

/// Commits the transitions of many runs (a group commit) with per-run
/// fencing, in one statement (two, in one transaction, when a run parks on a
/// `wait`): each run whose fencing token still matches and that is still
/// `running` is locked (in id order, so that two batches cannot deadlock),
/// updated exactly as [`write_transition`] would, and audited; a run whose
/// token moved on (its lease was lost) is neither written nor audited, and
/// the others still commit. The batch is atomic: on an error (or a crash)
/// nothing of it is written.
///
/// Returns, in the order of `batch`: `None` for a run whose lease was lost,
/// else `Some(due_now)` (a `wait` whose signal had already arrived: the run
/// is due at once).
///
/// A `wait`'s kept signal is looked for by a second statement after the
/// first has locked the runs, so that it sees every signal committed before
/// (`wardcall.send_signal` locks the run row too): a signal either is seen
/// here or finds the run `waiting` and makes it due itself.
///
/// A run whose row another transaction holds (a webhook's, a cancel's) is
/// waited for; [`commit_transitions_skip_locked`] does not wait.
pub async fn commit_transitions(conn: &mut PgConnection, batch: &[TransitionCommit]) -> Result<Vec<Option<bool>>, sqlx::Error> {
    Ok(commit_batch(conn, batch, false)
        .await?
        .into_iter()
        .map(|o| match o {
            GroupOutcome::Committed { due_now } => Some(due_now),
            _ => None,
        })
        .collect())
}

/// What a group commit did with one run's transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupOutcome {
    /// Written and audited; `due_now`: a `wait` whose signal had already arrived.
    Committed { due_now: bool },
    /// The run's fencing token moved on (or it is no longer `running`): nothing written.
    LeaseLost,
    /// Another transaction held the run's row: nothing written, not waited
    /// for; commit it on its own ([`commit_transitions`]).
    Busy,
}

/// [`commit_transitions`] without waiting for row locks: a run whose row
/// another transaction holds (e.g. a webhook's, which locks the run first)
/// is left out as [`GroupOutcome::Busy`], so that one run's lock wait does
/// not hold the whole batch (`FOR UPDATE SKIP LOCKED`; a run is busy when its
/// token still matched in the statement's snapshot but its row was locked).
/// A batch of a worker's logged `continue`s only (each with its patch) goes
/// through [`STEP_LOG_STATEMENT`], 7 arrays and one insert instead of 16
/// arrays and the update's, audit's and append's CTEs: the same outcomes,
/// about 7 % more steps a second in `bench steps` (BENCHMARKS.md, "Issue 9,
/// fifteenth session").
pub async fn commit_transitions_skip_locked(conn: &mut PgConnection, batch: &[TransitionCommit]) -> Result<Vec<GroupOutcome>, sqlx::Error> {
    commit_batch(conn, batch, true).await
}

/// The 16 arrays of a group commit's statement ([`group_commit_statement`]),
/// one element per transition, and the runs that park on a `wait`.
struct GroupArrays<'a> {
    ids: Vec<Uuid>,
    tokens: Vec<i64>,
    states: Vec<Option<&'a Value>>,
    next_steps: Vec<&'a str>,
    kinds: Vec<&'static str>,
    due_epochs: Vec<Option<i64>>,
    delays: Vec<i64>,
    signals: Vec<Option<&'a str>>,
    errors: Vec<Option<&'a str>>,
    actions: Vec<&'static str>,
    statuses: Vec<&'static str>,
    details: Vec<Value>,
    actors: Vec<&'a str>,
    held: Vec<&'a str>,
    seqs: Vec<i64>,
    patches: Vec<Option<&'a Value>>,
    waits: Vec<Uuid>,
}

impl<'a> GroupArrays<'a> {
    /// `held[i]`: the status `batch[i]`'s run must have to be written.
    fn new(batch: &'a [TransitionCommit], held: &[&'a str]) -> GroupArrays<'a> {
        let n = batch.len();
        let mut a = GroupArrays {
            ids: Vec::with_capacity(n),
            tokens: Vec::with_capacity(n),
            states: Vec::with_capacity(n),
            next_steps: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
            due_epochs: Vec::with_capacity(n),
            delays: Vec::with_capacity(n),
            signals: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            actions: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            details: Vec::with_capacity(n),
            actors: Vec::with_capacity(n),
            held: held.to_vec(),
            seqs: Vec::with_capacity(n),
            patches: Vec::with_capacity(n),
            waits: Vec::new(),
        };
        for (t, held) in batch.iter().zip(held) {
            let (kind, status, action, detail) = transition_row(t);
            // Only a worker's own lease appends to the step log (a step run
            // inside a claim leases the run in its transition).
            let patch = t.patch.as_ref().filter(|_| kind == "continue" && *held == "running");
            let (due_epoch, delay, signal, error) = match &t.parking {
                Parking::Sleep { due_at_epoch_ms, delay_ms } => (*due_at_epoch_ms, (*delay_ms).max(0), None, None),
                Parking::Wait { signal, timeout_ms } => (None, (*timeout_ms).max(0), Some(signal.as_str()), None),
                Parking::Defer { delay_ms } => (None, (*delay_ms).max(0), None, None),
                Parking::Fail { error } => (None, 0, None, Some(error.as_str())),
                _ => (None, 0, None, None),
            };
            if kind == "wait" {
                a.waits.push(t.id);
            }
            a.ids.push(t.id);
            a.tokens.push(t.fencing_token);
            a.states.push(if patch.is_some() { None } else { Some(&*t.state) });
            a.seqs.push(t.seq);
            a.patches.push(patch);
            a.next_steps.push(t.next_step.as_str());
            a.kinds.push(kind);
            a.due_epochs.push(due_epoch);
            a.delays.push(delay);
            a.signals.push(signal);
            a.errors.push(error);
            a.actions.push(action);
            a.statuses.push(status);
            a.details.push(detail);
            a.actors.push(t.actor.as_str());
        }
        a
    }

    fn query<'q>(&'q self, sql: &'q str) -> sqlx::query::QueryAs<'q, sqlx::Postgres, (Uuid, bool), sqlx::postgres::PgArguments> {
        sqlx::query_as::<_, (Uuid, bool)>(sql)
            .bind(&self.ids)
            .bind(&self.tokens)
            .bind(&self.states)
            .bind(&self.next_steps)
            .bind(&self.kinds)
            .bind(&self.due_epochs)
            .bind(&self.delays)
            .bind(&self.signals)
            .bind(&self.errors)
            .bind(&self.actions)
            .bind(&self.statuses)
            .bind(&self.details)
            .bind(&self.actors)
            .bind(&self.held)
            .bind(&self.seqs)
            .bind(&self.patches)
    }
}

/// How the rows a group commit's statement returned map to its batch.
fn group_outcomes(batch: &[TransitionCommit], rows: Vec<(Uuid, bool)>, due_now: &[Uuid]) -> Vec<GroupOutcome> {
    let found: std::collections::HashMap<Uuid, bool> = rows.into_iter().collect();
    batch
        .iter()
        .map(|t| match found.get(&t.id) {
            Some(true) => GroupOutcome::Committed { due_now: due_now.contains(&t.id) },
            Some(false) => GroupOutcome::Busy,
            None => GroupOutcome::LeaseLost,
        })
        .collect()
}

async fn commit_batch(conn: &mut PgConnection, batch: &[TransitionCommit], skip_locked: bool) -> Result<Vec<GroupOutcome>, sqlx::Error> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    if skip_locked && batch.iter().all(|t| t.patch.is_some() && matches!(t.parking, Parking::Continue)) {
        let ids: Vec<Uuid> = batch.iter().map(|t| t.id).collect();
        let rows = sqlx::query_as::<_, (Uuid, bool)>(STEP_LOG_STATEMENT)
            .bind(&ids)
            .bind(batch.iter().map(|t| t.fencing_token).collect::<Vec<i64>>())
            .bind(batch.iter().map(|t| t.seq).collect::<Vec<i64>>())
            .bind(batch.iter().map(|t| t.step.as_str()).collect::<Vec<&str>>())
            .bind(batch.iter().map(|t| t.next_step.as_str()).collect::<Vec<&str>>())
            .bind(batch.iter().map(|t| t.patch.as_ref()).collect::<Vec<Option<&Value>>>())
            .bind(batch.iter().map(|t| t.actor.as_str()).collect::<Vec<&str>>())
            .fetch_all(&mut *conn)
            .await?;
        return Ok(group_outcomes(batch, rows, &[]));
    }
    let arrays = GroupArrays::new(batch, &vec!["running"; batch.len()]);
    let sql = group_commit_statement(skip_locked);
    let query = arrays.query(&sql);
    let (rows, due_now): (Vec<(Uuid, bool)>, Vec<Uuid>) = if arrays.waits.is_empty() {
        (query.fetch_all(&mut *conn).await?, Vec::new())
    } else {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let rows = query.fetch_all(&mut *tx).await?;
        // A new statement after the lock: it sees every signal committed so far.
        // (No `status = 'waiting'` test: these runs were just written
        // waiting by this transaction, which holds their rows. With it, a
        // generic plan made on stale statistics scanned every waiting run
        // through `runs_status`, 0.3 ms per commit at 350 waiting runs.)
        let due_now = sqlx::query_scalar(
            "UPDATE wardcall.runs r SET due_at = clock_timestamp()
              WHERE r.id = ANY($1)
                AND EXISTS (SELECT 1 FROM wardcall.signals s WHERE s.run_id = r.id AND s.name = r.wait_signal AND s.consumed_at IS NULL)
             RETURNING r.id",
        )
        .bind(rows.iter().filter(|(id, written)| *written && arrays.waits.contains(id)).map(|(id, _)| *id).collect::<Vec<Uuid>>())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        (rows, due_now)
    };
    Ok(group_outcomes(batch, rows, &due_now))
}

/// Writes, in the caller's transaction, the transitions of steps that ran
/// inside a claim (`Engine::claim_and_start`): runs locked by [`lock_due`]
/// and never leased, `held[i]` the status `batch[i]`'s run was due in (its
/// fencing token unchanged). The same statement as a group commit
/// ([`group_commit_statement`]): each run written exactly as
/// [`write_transition`] would and audited with `from_state` = its `held`
/// status. A batch holds no `wait` (a wait's kept signal needs a statement
/// of its own: such a step is run by a worker instead).
///
/// Returns, in the order of `batch`, [`GroupOutcome::Committed`] for each run
/// written, or [`GroupOutcome::LeaseLost`] for one whose token or status no
/// longer matched (none should: the caller holds their rows).
pub async fn commit_fired_in_claim(conn: &mut PgConnection, batch: &[TransitionCommit], held: &[&str]) -> Result<Vec<GroupOutcome>, sqlx::Error> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    debug_assert!(batch.iter().all(|t| !matches!(t.parking, Parking::Wait { .. })), "a wait is not run inside a claim");
    let arrays = GroupArrays::new(batch, held);
    let sql = group_commit_statement(false);
    let rows = arrays.query(&sql).fetch_all(conn).await?;
    Ok(group_outcomes(batch, rows, &[]))
}

/// A worker's batch of `continue`s only: each appended to the step log
/// under its run's row lock, fenced as [`group_commit_statement`]'s
/// `appended`, with the same result rows (busy runs `false`, a lost lease no
/// row); 7 arrays: `id uuid[]`, `token bigint[]`, `seq bigint[]`, `step
/// text[]`, `next_step text[]`, `patch jsonb[]`, `actor text[]`. Its fence
/// (`locked`, the busy runs) and its append repeat [`group_commit_statement`]'s:
/// change them together.
pub const STEP_LOG_STATEMENT: &str = "WITH input AS MATERIALIZED (
         SELECT t.*, 'running'::text AS held
           FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::text[])
             AS t(id, token, seq, step, next_step, patch, actor)),
     locked AS (
         SELECT r.id FROM wardcall.runs r JOIN input i ON i.id = r.id
          WHERE r.id = ANY($1::uuid[]) AND r.fencing_token = i.token AND r.status = i.held
          ORDER BY r.id FOR UPDATE OF r SKIP LOCKED),
     appended AS (
         INSERT INTO wardcall.run_steps (run_id, seq, step, next_step, patch, fencing_token, actor)
         SELECT i.id, i.seq, i.step, i.next_step, i.patch, i.token, i.actor
           FROM input i JOIN locked l ON l.id = i.id
         ON CONFLICT DO NOTHING
         RETURNING run_id AS id)
     SELECT id, true FROM appended
     UNION ALL
     SELECT r.id, false FROM wardcall.runs r JOIN input i ON i.id = r.id
      WHERE r.id = ANY($1::uuid[]) AND r.fencing_token = i.token AND r.status = i.held
        AND r.id NOT IN (SELECT id FROM locked)";

/// The text of a group commit's statement ([`commit_transitions`], and with
/// `skip_locked` [`commit_transitions_skip_locked`]; [`commit_fired_in_claim`]),
/// for `EXPLAIN`. It takes the batch as 16 arrays of one element per run, in
/// this order: `id uuid[]`, `token bigint[]`, `state jsonb[]`, `next_step
/// text[]`, `kind text[]` (`continue`, `sleep`, `wait`, `complete`, `fail`,
/// `cancelled`, `defer`), `due_epoch_ms bigint[]` (UTC milliseconds, or
/// NULL), `delay_ms bigint[]`, `signal text[]`, `error text[]`, `action
/// text[]` (the audit action), `to_status text[]`, `detail jsonb[]` (the
/// audit detail), `actor text[]`, `held text[]` (the status the run must
/// still have, also the audit row's `from_state`: `running` for a worker's
/// step, the status it was due in for a step run inside a claim, whose
/// transition also takes the run's next fencing token, so that a second
/// writer holding the same token is fenced out), `seq bigint[]` (the
/// transition's number, [`TransitionCommit::seq`]) and `patch jsonb[]` (a
/// `continue`'s state changes, or NULL); it returns
/// `(id, written)` per run found with its token and status: `written` false
/// when another transaction held its row (only with `skip_locked`).
///
/// The batch's runs are found by primary key (`r.id = ANY($1)`), never through
/// their status: `r.status = i.held` compares with a column of the
/// materialized input, a join clause that cannot become a restriction on
/// `runs_status` (the unique primary key wins the join).
/// Written as `r.status = 'running'`, the planner's estimate of running rows
/// (often "about one", from statistics taken while few ran) made it scan every
/// running run's entry in `runs_status` and filter by id: 13 ms instead of
/// 0.5 ms for 30 runs among 10,000 running (BENCHMARKS.md, "Issue 9, fourth
/// session"). The update joins the input to the locked rows in a subquery
/// kept whole (`OFFSET 0`) before it tests the input's `patch`: tested
/// inside the join, the planner's "one row" estimate for `patch IS NULL`
/// made it rescan the batch once per row in a nested loop (40 ms instead
/// of 9 ms for 250 timers fired in a claim, BENCHMARKS.md, "Issue 9,
/// fourteenth session"); the busy runs are those not in `locked` by a
/// hashed `NOT IN`, for the same reason.
///
/// A transition with a patch (a worker's `continue`) is appended to the step
/// log (`appended`; a batch of nothing else goes through
/// [`STEP_LOG_STATEMENT`], whose fence and append repeat these: change them
/// together) under the same row lock instead of updating the run: one
/// narrow row, and the run's row (its state, up to kilobytes, TOASTed) is
/// not rewritten. That row, with its actor and the next id of the audit
/// trail, is also the step's audit record (`run.step_completed` in the view
/// `wardcall.audit_log`, migration 0018): only the other transitions add a
/// row to `wardcall.audit_records`. Every other transition writes the whole
/// state and its seq.
/// A transition that keeps some of the row's columns (`defer`, `fail`,
/// `cancelled`: the step, its attempts, the wait outcome, the last error)
/// after steps logged since the checkpoint (`r.step_seq < i.seq - 1`) takes
/// them as those logged `continue`s left them (the next step, no attempt,
/// no outcome, no error), not from the row's stale checkpoint.
/// An append whose number is taken (which the row lock rules out) is
/// reported as a lost lease, not as the batch's error: the run is left to
/// the lapse of its lease and a claim that folds its log.
pub fn group_commit_statement(skip_locked: bool) -> String {
    format!(
        "WITH input AS MATERIALIZED (
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::jsonb[], $4::text[], $5::text[], $6::bigint[], $7::bigint[],
                                  $8::text[], $9::text[], $10::text[], $11::text[], $12::jsonb[], $13::text[], $14::text[],
                                  $15::bigint[], $16::jsonb[])
                 AS t(id, token, state, next_step, kind, due_epoch_ms, delay_ms, signal, error, action, to_status, detail, actor, held,
                      seq, patch)),
         locked AS (
             SELECT r.id FROM wardcall.runs r JOIN input i ON i.id = r.id
              WHERE r.id = ANY($1::uuid[]) AND r.fencing_token = i.token AND r.status = i.held
              ORDER BY r.id FOR UPDATE OF r{lock}),
         updated AS (
             UPDATE wardcall.runs r SET
                    state = i.state,
                    fencing_token = CASE WHEN i.held = 'running' THEN r.fencing_token ELSE r.fencing_token + 1 END,
                    step = CASE WHEN i.kind = 'defer' AND r.step_seq >= i.seq - 1 THEN r.step ELSE i.next_step END,
                    step_attempt = CASE WHEN i.kind IN ('continue','sleep','wait','complete') THEN 0
                                        WHEN r.step_seq < i.seq - 1 THEN CASE WHEN i.kind = 'fail' THEN 1 ELSE 0 END
                                        WHEN i.kind = 'fail' THEN r.step_attempt + 1 ELSE r.step_attempt END,
                    wait_outcome = CASE WHEN i.kind IN ('fail','defer') AND r.step_seq >= i.seq - 1 THEN r.wait_outcome END,
                    last_error = CASE WHEN i.kind IN ('continue','sleep','wait','complete') THEN NULL
                                      WHEN i.kind = 'fail' THEN i.error
                                      WHEN r.step_seq < i.seq - 1 THEN NULL ELSE r.last_error END,
                    status = i.to_status,
                    lease_owner = CASE WHEN i.kind = 'continue' THEN r.lease_owner END,
                    key = CASE WHEN i.kind = 'cancelled' THEN NULL ELSE r.key END,
                    wait_signal = CASE WHEN i.kind = 'wait' THEN i.signal ELSE r.wait_signal END,
                    wait_deadline = CASE WHEN i.kind = 'wait' THEN clock_timestamp() + i.delay_ms * interval '1 millisecond'
                                         ELSE r.wait_deadline END,
                    due_at = CASE WHEN i.kind = 'sleep' AND i.due_epoch_ms IS NOT NULL THEN to_timestamp(i.due_epoch_ms / 1000.0)
                                  WHEN i.kind IN ('sleep','wait','defer') THEN clock_timestamp() + i.delay_ms * interval '1 millisecond'
                                  ELSE r.due_at END,
                    finished_at = CASE WHEN i.kind IN ('complete','fail','cancelled') THEN clock_timestamp() ELSE r.finished_at END,
                    updated_at = clock_timestamp(),
                    step_seq = i.seq
               FROM (SELECT i.* FROM input i JOIN locked l ON l.id = i.id OFFSET 0) i
              WHERE r.id = i.id AND r.fencing_token = i.token AND r.status = i.held AND i.patch IS NULL
             RETURNING r.id),
         appended AS (
             INSERT INTO wardcall.run_steps (run_id, seq, step, next_step, patch, fencing_token, actor)
             SELECT i.id, i.seq, i.detail->>'from_step', i.next_step, i.patch, i.token, i.actor
               FROM input i JOIN locked l ON l.id = i.id
              WHERE i.patch IS NOT NULL
             ON CONFLICT DO NOTHING
             RETURNING run_id AS id),
         written AS (SELECT id FROM updated UNION ALL SELECT id FROM appended),
         audited AS (
             INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT 'run', i.id::text, i.action, i.held, i.to_status, i.actor, i.detail
               FROM input i JOIN updated u ON u.id = i.id)
         SELECT id, true FROM written{busy}",
        lock = if skip_locked { " SKIP LOCKED" } else { "" },
        busy = if skip_locked {
            "
         UNION ALL
         SELECT r.id, false FROM wardcall.runs r JOIN input i ON i.id = r.id
          WHERE r.id = ANY($1::uuid[]) AND r.fencing_token = i.token AND r.status = i.held
            AND r.id NOT IN (SELECT id FROM locked)"
        } else {
            ""
        },
    )
}

/// Records a failed attempt of the current step: schedules a retry `delay_ms`
/// from now (status `pending`) or, when `attempt >= max_attempts`, marks the
/// run `failed` keeping the error (the dead letter) — or, when `hook` names
/// a step (the workflow's `on_failure`), moves the run there (status
/// `pending`, due now, `state.ending = {"status": "failed", "error": …}`,
/// the error kept in `last_error`); the run ends `failed` after the hook.
/// Returns `None` when the lease was lost, else whether the step failed for good.
pub async fn record_step_failure(
    pool: &PgPool,
    run: &ClaimedRun,
    error: &str,
    max_attempts: u32,
    delay_ms: i64,
    hook: Option<&str>,
    actor: &str,
) -> Result<Option<bool>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !lock_fenced(&mut tx, run.id, run.fencing_token).await? {
        return Ok(None);
    }
    // The steps this lease went on with since the checkpoint, into the row
    // first: the failure is the step after them.
    fold_step_log(&mut tx, run.id).await?;
    let attempt = run.step_attempt + 1;
    let dead = attempt as u32 >= max_attempts;
    if let (true, Some(hook)) = (dead, hook) {
        sqlx::query(
            "UPDATE wardcall.runs SET status = 'pending', step = $4, step_attempt = 0, last_error = $3, lease_owner = NULL,
                    wait_signal = NULL, wait_outcome = NULL, due_at = clock_timestamp(), updated_at = clock_timestamp(),
                    state = jsonb_set(CASE WHEN jsonb_typeof(state) = 'object' THEN state ELSE '{}' END, '{ending}',
                                      jsonb_build_object('status', 'failed', 'error', $3::text, 'step', $5::text, 'attempts', $2::int))
              WHERE id = $1",
        )
        .bind(run.id)
        .bind(attempt)
        .bind(error)
        .bind(hook)
        .bind(&run.step)
        .execute(&mut *tx)
        .await?;
        audit::record(
            &mut tx,
            Entity::Run,
            &run.id.to_string(),
            "run.failing",
            Some("running"),
            Some("pending"),
            actor,
            json!({"step": run.step, "attempt": attempt, "error": error, "hook": hook}),
        )
        .await?;
        tx.commit().await?;
        return Ok(Some(true));
    }
    if dead {
        sqlx::query(
            "UPDATE wardcall.runs SET status = 'failed', step_attempt = $2, last_error = $3, lease_owner = NULL,
                    finished_at = clock_timestamp(), updated_at = clock_timestamp() WHERE id = $1",
        )
        .bind(run.id)
        .bind(attempt)
        .bind(error)
        .execute(&mut *tx)
        .await?;
    } else {
        sqlx::query(
            "UPDATE wardcall.runs SET status = 'pending', step_attempt = $2, last_error = $3, lease_owner = NULL,
                    due_at = clock_timestamp() + $4 * interval '1 millisecond', updated_at = clock_timestamp()
              WHERE id = $1",
        )
        .bind(run.id)
        .bind(attempt)
        .bind(error)
        .bind(delay_ms)
        .execute(&mut *tx)
        .await?;
    }
    let (action, to) = if dead { ("run.failed", "failed") } else { ("run.retry_scheduled", "pending") };
    audit::record(
        &mut tx,
        Entity::Run,
        &run.id.to_string(),
        action,
        Some("running"),
        Some(to),
        actor,
        json!({"step": run.step, "attempt": attempt, "max_attempts": max_attempts, "error": error, "retry_in_ms": if dead { None } else { Some(delay_ms) }}),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(dead))
}

/// Puts the run's current step off for `delay_ms` without counting an
/// attempt: status `sleeping` at the same step, `step_attempt` and the state
/// kept, the lease released, audited `run.deferred` with `reason`. For a step
/// that could not even try, e.g. an `http` step whose endpoint's circuit
/// breaker is open ([`crate::outbound::Decision::WaitForBreaker`]): unlike a
/// `Sleep` transition it does not reset `step_attempt`, and unlike
/// [`record_step_failure`] it does not count one. Returns false when the lease
/// was lost (nothing was written).
pub async fn defer_step(pool: &PgPool, run: &ClaimedRun, delay_ms: i64, reason: &str, actor: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !lock_fenced(&mut tx, run.id, run.fencing_token).await? {
        return Ok(false);
    }
    fold_step_log(&mut tx, run.id).await?;
    sqlx::query(
        "UPDATE wardcall.runs SET status = 'sleeping', lease_owner = NULL, updated_at = clock_timestamp(),
                due_at = clock_timestamp() + $2 * interval '1 millisecond' WHERE id = $1",
    )
    .bind(run.id)
    .bind(delay_ms.max(0))
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Entity::Run,
        &run.id.to_string(),
        "run.deferred",
        Some("running"),
        Some("sleeping"),
        actor,
        json!({"step": run.step, "attempt": run.step_attempt, "delay_ms": delay_ms, "reason": reason}),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// A run cancelled by [`cancel_run_in`].
#[derive(Debug, Clone)]
pub struct CancelledRun {
    pub workflow: String,
    /// The event payload (write-back's `$1`).
    pub input: Value,
    /// The alert that was open and is now `cancelled`, if any.
    pub alert: Option<Uuid>,
}

/// Cancels a live run (any status but completed/failed/cancelled) inside the
/// caller's transaction: bumps the fencing token so a worker executing it can
/// no longer commit, frees its key, and cancels its open alert, if any, all
/// audited. When `hook_for(workflow, step)` names a step (the workflow's
/// `on_cancel` hook), the run is not finished but moved there (status
/// `pending`, due now, `state.ending = {"status": "cancelled"}`) and ends
/// `cancelled` after the hook. `replaced`: the run is being replaced by a new
/// event with its key (audited `run.replaced`).
///
/// Returns `None` when the run was not live. The calls of the alert are ended
/// by the engines' call sweeper (ARCHITECTURE.md, "Cancel hangs up").
pub async fn cancel_run_in(
    tx: &mut PgConnection,
    id: Uuid,
    actor: &str,
    reason: &str,
    replaced: bool,
    hook_for: &(dyn Fn(&str, &str) -> Option<String> + Sync),
) -> Result<Option<CancelledRun>, sqlx::Error> {
    let previous: Option<(String, String, Value, String)> = sqlx::query_as(
        "SELECT status, workflow, input, step FROM wardcall.runs WHERE id = $1 AND status IN ('pending','running','sleeping','waiting') FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((previous, workflow, input, step)) = previous else {
        return Ok(None);
    };
    // A run cancelled mid-way through steps its worker logged: the row
    // first catches up with them (the hook reads the state; a later claim
    // must not fold them over the hook's step).
    let step = fold_step_log(&mut *tx, id).await?.unwrap_or(step);
    let hook = hook_for(&workflow, &step);
    match &hook {
        None => {
            sqlx::query(
                "UPDATE wardcall.runs SET status = 'cancelled', fencing_token = fencing_token + 1, lease_owner = NULL, key = NULL,
                        finished_at = clock_timestamp(), updated_at = clock_timestamp(), last_error = $2 WHERE id = $1",
            )
            .bind(id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        }
        Some(hook) => {
            sqlx::query(
                "UPDATE wardcall.runs SET status = 'pending', step = $3, step_attempt = 0, fencing_token = fencing_token + 1, lease_owner = NULL,
                        key = NULL, wait_signal = NULL, wait_outcome = NULL, due_at = clock_timestamp(), updated_at = clock_timestamp(),
                        last_error = $2, state = jsonb_set(CASE WHEN jsonb_typeof(state) = 'object' THEN state ELSE '{}' END,
                                                           '{ending}', '{\"status\": \"cancelled\"}')
                  WHERE id = $1",
            )
            .bind(id)
            .bind(reason)
            .bind(hook)
            .execute(&mut *tx)
            .await?;
            sqlx::query("SELECT pg_notify('wardcall_wake', '')").execute(&mut *tx).await?;
        }
    }
    let (action, to) = match (&hook, replaced) {
        (_, true) => ("run.replaced", "cancelled"),
        (Some(_), false) => ("run.cancelled", "pending"),
        (None, false) => ("run.cancelled", "cancelled"),
    };
    audit::record(&mut *tx, Entity::Run, &id.to_string(), action, Some(&previous), Some(to), actor, json!({"reason": reason, "hook": hook})).await?;
    let alert: Option<Uuid> = sqlx::query_scalar(
        "UPDATE wardcall.alerts SET status = 'cancelled', updated_at = clock_timestamp()
          WHERE run_id = $1 AND status = 'open' RETURNING id",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(alert) = alert {
        audit::record(&mut *tx, Entity::Alert, &alert.to_string(), "alert.cancelled", Some("open"), Some("cancelled"), actor, json!({"reason": reason}))
            .await?;
        // Wakes the engines' call sweepers, which end the alert's calls.
        sqlx::query("SELECT pg_notify('wardcall_wake', '')").execute(&mut *tx).await?;
    }
    Ok(Some(CancelledRun { workflow, input, alert }))
}

/// The live runs of `workflow` with key `key` created by an event older than
/// `before_event` (`runs.event_id`), locked in id order.
pub async fn live_runs_with_key(tx: &mut PgConnection, workflow: &str, key: &str, before_event: i64) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM wardcall.runs WHERE workflow = $1 AND key = $2 AND event_id < $3
            AND status IN ('pending','running','sleeping','waiting') ORDER BY id FOR UPDATE",
    )
    .bind(workflow)
    .bind(key)
    .bind(before_event)
    .fetch_all(&mut *tx)
    .await
}

/// Sends a named signal to a run through `wardcall.send_signal` (kept if the
/// run is not waiting for it yet; wakes it if it is). Returns the signal id.
///
/// Errors: the run does not exist (SQLSTATE `P0002`), or a database error.
pub async fn send_signal(conn: &mut PgConnection, run: Uuid, name: &str, payload: &Value) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT wardcall.send_signal($1, $2, $3)").bind(run).bind(name).bind(payload).fetch_one(conn).await
}

/// Releases the leases this engine holds (graceful shutdown): the runs become
/// due at once, so another engine takes them over without waiting for expiry.
pub async fn release_leases(conn: &mut PgConnection, owner: &str) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE wardcall.runs SET due_at = clock_timestamp(), lease_owner = NULL
          WHERE lease_owner = $1 AND status = 'running'",
    )
    .bind(owner)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// Counts for `wardcall status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusCounts {
    pub pending: i64,
    pub running: i64,
    pub sleeping: i64,
    pub waiting: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Outbox rows not yet turned into runs.
    pub outbox_backlog: i64,
    /// Seconds the oldest unprocessed outbox row has waited.
    pub outbox_oldest_seconds: Option<f64>,
    /// Outbox rows whose event no workflow listened to when dispatched
    /// (`wardcall.outbox.unrouted_at` set; kept, never deleted).
    pub outbox_unrouted: i64,
}

/// Reads the run and outbox counts.
pub async fn status_counts(pool: &PgPool) -> Result<StatusCounts, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT status, count(*) FROM wardcall.runs GROUP BY status").fetch_all(pool).await?;
    let get = |s: &str| rows.iter().find(|(k, _)| k == s).map(|(_, n)| *n).unwrap_or(0);
    let (backlog, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM clock_timestamp() - min(created_at))::float8
           FROM wardcall.outbox WHERE processed_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok(StatusCounts {
        pending: get("pending"),
        running: get("running"),
        sleeping: get("sleeping"),
        waiting: get("waiting"),
        completed: get("completed"),
        failed: get("failed"),
        cancelled: get("cancelled"),
        outbox_backlog: backlog,
        outbox_oldest_seconds: oldest,
        outbox_unrouted: sqlx::query_scalar("SELECT count(*) FROM wardcall.outbox WHERE unrouted_at IS NOT NULL").fetch_one(pool).await?,
    })
}

/// Configured sources whose capture is not in place, for `/healthz` and
/// `wardcall status`: `(source, problem)` pairs, e.g. `("alerts", "trigger
/// wardcall_capture_alerts_insert is missing on public.alerts")`. A source is
/// broken when `wardcall.sources` has no row for it, its table is gone, or one
/// of its recorded triggers is absent from `pg_trigger` or disabled
/// (`tgenabled = 'D'`; PostgreSQL manual, 52.56 "pg_trigger").
pub async fn capture_problems(pool: &PgPool, sources: &[String]) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT n, 'not installed (no row in wardcall.sources)' FROM unnest($1::text[]) n
          WHERE NOT EXISTS (SELECT 1 FROM wardcall.sources s WHERE s.name = n)
         UNION ALL
         SELECT s.name, 'table ' || s.table_name || ' does not exist'
           FROM wardcall.sources s WHERE s.name = ANY($1) AND to_regclass(s.table_name) IS NULL
         UNION ALL
         SELECT s.name, 'trigger ' || t.trig || ' is ' ||
                CASE WHEN g.oid IS NULL THEN 'missing' ELSE 'disabled' END || ' on ' || s.table_name
           FROM wardcall.sources s CROSS JOIN LATERAL unnest(s.triggers) AS t(trig)
           LEFT JOIN pg_trigger g ON g.tgrelid = to_regclass(s.table_name) AND g.tgname = t.trig
          WHERE s.name = ANY($1) AND to_regclass(s.table_name) IS NOT NULL
            AND (g.oid IS NULL OR g.tgenabled = 'D')
         ORDER BY 1, 2",
    )
    .bind(sources)
    .fetch_all(pool)
    .await
}

/// Engine liveness as the database sees it, for `wardcall status` (which runs
/// in another process than the engines).
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineTraces {
    /// Sessions on this database with `application_name = 'wardcall-listener'`
    /// (one per engine; `pg_stat_activity`, PostgreSQL manual 27.2.3). Sessions
    /// of other roles count only for roles allowed to see them (`pg_read_all_stats`).
    pub listeners: i64,
    /// Seconds the most overdue live run has been due without being claimed.
    pub most_overdue_seconds: Option<f64>,
}

/// Reads [`EngineTraces`].
pub async fn engine_traces(pool: &PgPool) -> Result<EngineTraces, sqlx::Error> {
    let (listeners, most_overdue_seconds): (i64, Option<f64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND application_name = $1),
                (SELECT extract(epoch FROM clock_timestamp() - min(due_at))::float8 FROM wardcall.runs
                  WHERE status IN ('pending','running','sleeping','waiting') AND due_at <= clock_timestamp())",
    )
    .bind(crate::runtime::LISTENER_APPLICATION_NAME)
    .fetch_one(pool)
    .await?;
    Ok(EngineTraces { listeners, most_overdue_seconds })
}

/// A failed run, as `wardcall.dead_letters` lists it (no payload).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub run_id: Uuid,
    pub workflow: String,
    /// The event's name (never its payload).
    pub event: String,
    /// The step the run failed at (where a retry resumes).
    pub step: String,
    /// Failed attempts of that step.
    pub attempts: i32,
    /// The last error (already redacted: no values, no secrets).
    pub last_error: Option<String>,
    /// When the run failed, as RFC 3339 UTC text.
    pub failed_at: Option<String>,
}

/// The number of dead letters (failed runs).
pub async fn dead_letter_count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM wardcall.dead_letters").fetch_one(pool).await
}

/// The newest `limit` dead letters, newest first.
pub async fn newest_dead_letters(pool: &PgPool, limit: i64) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT run_id, workflow, event, step, attempts, last_error,
                to_char(failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS failed_at
           FROM wardcall.dead_letters ORDER BY failed_at DESC NULLS LAST, run_id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// What [`retry_failed_run_in`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryResult {
    /// The run is `pending` again at `step`, due now.
    Retried { step: String, previous_attempts: i32 },
    /// The run exists but has not failed (its status).
    NotFailed { status: String },
    /// No such run.
    NotFound,
}

/// Puts a failed run (a dead letter) back to `pending` at the step it failed
/// at, inside the caller's transaction: `step_attempt` 0, due now, no lease,
/// a new fencing token, `finished_at` cleared (`last_error` is kept until the
/// step succeeds). Audited `run.retried` (failed → pending) with `actor`,
/// the step, the attempts and the last error. Wakes the engines' schedulers.
pub async fn retry_failed_run_in(tx: &mut PgConnection, id: Uuid, actor: &str) -> Result<RetryResult, sqlx::Error> {
    let row: Option<(String, String, i32, Option<String>)> =
        sqlx::query_as("SELECT status, step, step_attempt, last_error FROM wardcall.runs WHERE id = $1 FOR UPDATE").bind(id).fetch_optional(&mut *tx).await?;
    let Some((status, step, attempts, last_error)) = row else { return Ok(RetryResult::NotFound) };
    if status != "failed" {
        return Ok(RetryResult::NotFailed { status });
    }
    sqlx::query(
        "UPDATE wardcall.runs SET status = 'pending', step_attempt = 0, due_at = clock_timestamp(), lease_owner = NULL,
                fencing_token = fencing_token + 1, finished_at = NULL, updated_at = clock_timestamp(),
                step = coalesce(state->'ending'->>'step', step),
                state = CASE WHEN jsonb_typeof(state) = 'object' THEN state - 'ending' ELSE state END
          WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut *tx,
        Entity::Run,
        &id.to_string(),
        "run.retried",
        Some("failed"),
        Some("pending"),
        actor,
        json!({"step": step, "attempts": attempts, "last_error": last_error}),
    )
    .await?;
    sqlx::query("SELECT pg_notify('wardcall_wake', '')").execute(&mut *tx).await?;
    Ok(RetryResult::Retried { step, previous_attempts: attempts })
}
