//! SQL of `wardcall.alerts` as the escalation uses it: opening an alert once
//! per run, its status under the row lock, the "nobody to call" alarm
//! (`nobody_since`), and the end of a policy. The webhook side
//! (acknowledgement) is in `crate::notify::acknowledgement`.
//!
//! Every state change is audited in the same transaction, only if it happened.

use crate::store::audit::{self, Entity};
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// An alert as the escalation reads it under its row lock.
#[derive(Debug, Clone)]
pub struct LockedAlert {
    pub id: Uuid,
    /// `open`, `acknowledged`, `unacknowledged`, `cancelled`.
    pub status: String,
    /// Whether the "nobody to call" alarm is raised.
    pub nobody_alarm: bool,
    /// Whether this transaction opened it (then no attempt of the run can
    /// exist yet: they are recorded with their alert's id, after it).
    pub opened_now: bool,
    /// Whether the alert has no message yet: it was opened by its run's
    /// dispatch ([`crate::store::runs::claim_into_runs`]) and the execution
    /// that would have written it ([`write_message`]) did not; the caller
    /// writes it ([`write_message`]) before any send.
    pub message_missing: bool,
}

/// A row of [`fence_and_open`]'s statement: fenced, the alert opened now,
/// the existing alert's id, status, alarm and whether it lacks its message.
type FenceAndOpenRow = (bool, Option<Uuid>, Option<Uuid>, Option<String>, Option<bool>, Option<bool>);

/// Fences the run and opens its alert, in one statement: locks the run row
/// if this execution still holds it with fencing `token` (as
/// [`crate::store::runs::lock_fenced`]), then opens the alert of `run` (once:
/// a later tier or a takeover finds it) with `message` (the rendered text;
/// patient data, never logged), audited `alert.opened`, or locks the
/// existing one (`FOR UPDATE`; [`LockedAlert::message_missing`] when it was
/// opened by its dispatch and has no message yet). Returns `None`, having
/// changed nothing, when the lease was lost.
///
/// One round trip for what took three (fence, insert, lock): the first
/// tier's call waits for it.
///
/// Errors: a database error.
pub async fn fence_and_open(
    conn: &mut PgConnection,
    run: Uuid,
    token: i64,
    workflow: &str,
    policy: &str,
    message: &str,
    actor: &str,
) -> Result<Option<LockedAlert>, sqlx::Error> {
    // `fence` is referenced twice, so it is evaluated once, first; `old`
    // reads the statement's snapshot, so it finds an alert committed by an
    // earlier execution, never the one `ins` adds.
    let row: FenceAndOpenRow = sqlx::query_as(
        "WITH fence AS (
             SELECT id FROM wardcall.runs WHERE id = $1 AND fencing_token = $6 AND status = 'running' FOR UPDATE),
         ins AS (
             INSERT INTO wardcall.alerts (run_id, workflow, policy, message, status)
             SELECT $1, $2, $3, $4, 'open' FROM fence
             ON CONFLICT (run_id) DO NOTHING RETURNING id),
         aud AS (
             INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT 'alert', ins.id::text, 'alert.opened', NULL, 'open', $5, jsonb_build_object('run_id', $1::uuid, 'policy', $3::text) FROM ins),
         old AS (
             SELECT a.id, a.status, a.nobody_since IS NOT NULL AS nobody_alarm, a.message IS NULL AS message_missing FROM wardcall.alerts a
              WHERE a.run_id = $1 AND EXISTS (SELECT 1 FROM fence) FOR UPDATE)
         SELECT EXISTS (SELECT 1 FROM fence), (SELECT id FROM ins), old.id, old.status, old.nobody_alarm, old.message_missing
           FROM (SELECT) one LEFT JOIN old ON true",
    )
    .bind(run)
    .bind(workflow)
    .bind(policy)
    .bind(message)
    .bind(actor)
    .bind(token)
    .fetch_one(&mut *conn)
    .await?;
    Ok(match row {
        (false, ..) => None,
        (true, Some(id), ..) => Some(LockedAlert { id, status: "open".into(), nobody_alarm: false, opened_now: true, message_missing: false }),
        (true, None, Some(id), Some(status), nobody_alarm, missing) => {
            Some(LockedAlert { id, status, nobody_alarm: nobody_alarm.unwrap_or(false), opened_now: false, message_missing: missing.unwrap_or(false) })
        }
        // Fenced, nothing inserted and nothing found: the alert was deleted
        // by hand between the two; refuse rather than guess.
        (true, None, ..) => return Err(sqlx::Error::RowNotFound),
    })
}

/// Locks an alert and returns its status.
pub async fn lock_status(conn: &mut PgConnection, alert: Uuid) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT status FROM wardcall.alerts WHERE id = $1 FOR UPDATE").bind(alert).fetch_one(conn).await
}

/// The alert's rendered message (patient data: never logged); empty while
/// it has none yet (opened by its dispatch, [`LockedAlert::message_missing`]).
pub async fn message(pool: &PgPool, alert: Uuid) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT coalesce(message, '') FROM wardcall.alerts WHERE id = $1").bind(alert).fetch_one(pool).await
}

/// Writes the rendered `message` (patient data: never logged) of an alert
/// opened without one by its run's dispatch
/// ([`crate::store::runs::claim_into_runs`]); an alert that has its message
/// keeps it. One autocommit statement, committed asynchronously
/// (`synchronous_commit` off for it, PostgreSQL manual 30.4): the step's own
/// commit, synchronous, follows and makes it durable; lost in a crash
/// before that, the execution taking the run over writes it
/// ([`fence_and_open`]). Not audited: the message is the alert's content,
/// not a change of its state (`alert.opened` is audited with the opening).
///
/// Errors: a database error.
pub async fn write_message(pool: &PgPool, alert: Uuid, message: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH async_commit AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS setting)
         UPDATE wardcall.alerts SET message = $2 FROM async_commit WHERE id = $1 AND message IS NULL",
    )
    .bind(alert)
    .bind(message)
    .execute(pool)
    .await?;
    Ok(())
}

/// [`write_message`] inside the caller's transaction (the general path of a
/// tier, after [`fence_and_open`] found [`LockedAlert::message_missing`]),
/// committed with it.
///
/// Errors: a database error.
pub async fn write_message_in(conn: &mut PgConnection, alert: Uuid, message: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE wardcall.alerts SET message = $2 WHERE id = $1 AND message IS NULL").bind(alert).bind(message).execute(conn).await?;
    Ok(())
}

/// Raises the "nobody to call" alarm (`nobody_since`, listed by `wardcall
/// status`) of a locked alert, audited `alert.nobody_to_call` with `detail`.
/// Returns whether it was raised now (false: already raised).
pub async fn raise_nobody_alarm(conn: &mut PgConnection, alert: Uuid, detail: Value, actor: &str) -> Result<bool, sqlx::Error> {
    let first = sqlx::query("UPDATE wardcall.alerts SET nobody_since = clock_timestamp() WHERE id = $1 AND nobody_since IS NULL")
        .bind(alert)
        .execute(&mut *conn)
        .await?
        .rows_affected()
        > 0;
    if first {
        audit::record(conn, Entity::Alert, &alert.to_string(), "alert.nobody_to_call", Some("open"), Some("open"), actor, detail).await?;
    }
    Ok(first)
}

/// Clears the alarm (someone can be called again), audited
/// `alert.recipients_found`. Returns whether it was raised.
pub async fn clear_nobody_alarm(conn: &mut PgConnection, alert: Uuid, actor: &str) -> Result<bool, sqlx::Error> {
    let cleared =
        sqlx::query("UPDATE wardcall.alerts SET nobody_since = NULL WHERE id = $1 AND nobody_since IS NOT NULL").bind(alert).execute(&mut *conn).await?;
    if cleared.rows_affected() > 0 {
        audit::record(conn, Entity::Alert, &alert.to_string(), "alert.recipients_found", None, None, actor, json!({})).await?;
    }
    Ok(cleared.rows_affected() > 0)
}

/// The policy ran out without an acknowledgement: `open` →
/// `unacknowledged`, audited with `detail` (reason, cycles).
pub async fn mark_unacknowledged(conn: &mut PgConnection, alert: Uuid, detail: Value, actor: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE wardcall.alerts SET status = 'unacknowledged', updated_at = clock_timestamp() WHERE id = $1").bind(alert).execute(&mut *conn).await?;
    audit::record(conn, Entity::Alert, &alert.to_string(), "alert.unacknowledged", Some("open"), Some("unacknowledged"), actor, detail).await
}

/// Audits a step of an open alert's escalation that changes no column
/// (`alert.escalated`, `alert.step_ended`, `alert.tier_empty`,
/// `alert.recipients_resolved`) with `detail` (positions, counts, ids; never
/// names or numbers).
pub async fn audit_open(conn: &mut PgConnection, alert: Uuid, action: &str, detail: Value, actor: &str) -> Result<(), sqlx::Error> {
    audit::record(conn, Entity::Alert, &alert.to_string(), action, Some("open"), Some("open"), actor, detail).await
}

/// Open alerts whose policy yielded nobody to call, per policy: (policy id,
/// alerts, seconds since the oldest was found with nobody). For `wardcall status`.
pub async fn with_nobody_to_call(pool: &PgPool) -> Result<Vec<(String, i64, f64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT policy, count(*), extract(epoch FROM clock_timestamp() - min(nobody_since))::float8
           FROM wardcall.alerts WHERE status = 'open' AND nobody_since IS NOT NULL GROUP BY policy ORDER BY policy",
    )
    .fetch_all(pool)
    .await
}

/// Locks an alert and returns its status and message (patient data: never logged).
pub async fn lock_status_and_message(conn: &mut PgConnection, alert: Uuid) -> Result<(String, String), sqlx::Error> {
    sqlx::query_as("SELECT status, coalesce(message, '') FROM wardcall.alerts WHERE id = $1 FOR UPDATE").bind(alert).fetch_one(conn).await
}

/// The alert's message, if the alert exists.
pub async fn message_if_any(pool: &PgPool, alert: Option<Uuid>) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT coalesce(message, '') FROM wardcall.alerts WHERE id = $1").bind(alert).fetch_optional(pool).await
}

/// Acknowledges a locked alert by `person_id` through `channel` (`voice`,
/// `sms`), audited `alert.acknowledged` from `previous` by `person:<id>`
/// with `detail`.
pub async fn acknowledge(conn: &mut PgConnection, alert: Uuid, previous: &str, person_id: &str, channel: &str, detail: Value) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE wardcall.alerts SET status = 'acknowledged', acknowledged_at = clock_timestamp(), acknowledged_by = $2, acknowledged_via = $3,
                updated_at = clock_timestamp() WHERE id = $1",
    )
    .bind(alert)
    .bind(person_id)
    .bind(channel)
    .execute(&mut *conn)
    .await?;
    audit::record(conn, Entity::Alert, &alert.to_string(), "alert.acknowledged", Some(previous), Some("acknowledged"), &format!("person:{person_id}"), detail)
        .await
}

/// What a write-back statement gets as `$2` for an alert: the SQL function
/// `wardcall.alert_details` (status, times, who acknowledged and how,
/// attempts). An SQL expression, with the id as a literal (see
/// [`crate::store::attempts::details_expression`]).
pub fn details_expression(alert: Uuid) -> String {
    format!("wardcall.alert_details('{alert}'::uuid)")
}

/// One recipient of a fresh alert's first intents (see [`open_first_tiers`]).
#[derive(Debug, Clone)]
pub struct FirstIntent {
    pub person_id: String,
    /// The recipient's display name (for write-backs; never logged).
    pub person_name: String,
    /// The address called (E.164 for voice; never logged).
    pub destination: String,
}

/// A new run's first escalation tier as its dispatch records it, in the
/// statement that creates the run ([`crate::store::runs::claim_into_runs`]):
/// the alert opened without its message (written by the step once rendered,
/// [`write_message`]) and one intent per recipient, all fixed by the config
/// (a tier of the config's people; never one resolved by a query, which
/// reads the team's tables when the step runs: DESIGN.md invariant 7).
#[derive(Debug, Clone)]
pub struct TierIntents {
    pub policy: String,
    /// (cycle, step index) of the policy: `(0, 0)`.
    pub position: (i32, i32),
    /// `voice` or `sms`.
    pub channel: String,
    /// The provider the sends go through (`twilio`).
    pub provider: String,
    /// When an intent without a final status is fetched from the provider:
    /// milliseconds after the dispatch.
    pub reconcile_after_ms: i64,
    /// Each person at most once; at least one.
    pub recipients: Vec<FirstIntent>,
}

/// The recipients of a batch of first tiers as the statements that record
/// their intents bind them ([`open_first_tiers`],
/// [`crate::store::runs::claim_into_runs`]): one entry per recipient, in
/// order, with the number of its tier in the batch (from 1).
pub(crate) struct RecipientColumns<'a> {
    pub(crate) tier: Vec<i64>,
    pub(crate) person_ids: Vec<&'a str>,
    pub(crate) names: Vec<&'a str>,
    pub(crate) destinations: Vec<&'a str>,
}

impl<'a> RecipientColumns<'a> {
    /// The columns of `tiers`: (tier number, its recipients) each.
    pub(crate) fn of(tiers: impl Iterator<Item = (i64, &'a [FirstIntent])>) -> RecipientColumns<'a> {
        let mut out = RecipientColumns { tier: Vec::new(), person_ids: Vec::new(), names: Vec::new(), destinations: Vec::new() };
        for (tier, recipients) in tiers {
            for r in recipients {
                out.tier.push(tier);
                out.person_ids.push(r.person_id.as_str());
                out.names.push(r.person_name.as_str());
                out.destinations.push(r.destination.as_str());
            }
        }
        out
    }
}

/// A run's first escalation tier to record (see [`open_first_tiers`]):
/// owned, so that it can wait in a batch.
#[derive(Debug, Clone)]
pub struct FirstTier {
    pub run: Uuid,
    /// The fencing token the run's execution holds.
    pub token: i64,
    pub workflow: String,
    pub policy: String,
    /// The rendered message (patient data; never logged).
    pub message: String,
    /// (cycle, step index) of the policy, `(0, 0)` for a first tier.
    pub position: (i32, i32),
    /// `voice` or `sms`.
    pub channel: String,
    /// The provider the sends go through (`twilio`).
    pub provider: String,
    /// When an intent without a final status is fetched from the provider:
    /// milliseconds from now.
    pub reconcile_after_ms: i64,
    /// Each person at most once.
    pub recipients: Vec<FirstIntent>,
    /// The audit actor (`engine:<id>`).
    pub actor: String,
}

/// How [`open_first_tiers`] locks the runs' rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunLocks {
    /// A run whose row another transaction holds is left out, as
    /// [`OpenedWithIntents::Busy`]: a batch never waits for one run.
    SkipLocked,
    /// Waits for each row (up to the session's `lock_timeout`).
    Wait,
}

/// A row of [`open_first_tiers`]'s statement: the tier's position in the
/// batch (from 1), fenced, busy, the alert opened, one recipient's person id
/// and intent (absent when none was recorded).
type OpenedRow = (i64, bool, bool, Option<Uuid>, Option<String>, Option<Uuid>);

/// What [`open_first_tiers`] did for one run (and, always `Opened`, what a
/// dispatch did: [`crate::store::runs::DispatchedRun::first_tier`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenedWithIntents {
    /// The lease was lost: nothing was written.
    LeaseLost,
    /// The run already has its alert (a takeover or a retry): nothing was
    /// written; the caller takes the general path ([`fence_and_open`]).
    AlertExists,
    /// The run's row was held by another transaction (only with
    /// [`RunLocks::SkipLocked`]): nothing was written; open it alone.
    Busy,
    /// The alert is open with one intent per recipient: `(person_id,
    /// attempt id)`, every one of them.
    Opened { alert: Uuid, intents: Vec<(String, Uuid)> },
}

/// The first escalation tiers of many runs, in one autocommit statement on
/// `conn` (outside a transaction: committed when it returns):
/// fences each run (its fencing `token`, as
/// [`crate::store::runs::lock_fenced`]; the rows locked in id order), opens
/// its alert with its `message` (audited `alert.opened`) and records an
/// intent at generation 0 for each of its `recipients` at its `position` on
/// its `channel` through its `provider`, to be reconciled
/// `reconcile_after_ms` milliseconds from now (audited `attempt.intent`,
/// person id, channel and position, never the address). The audit rows go
/// run by run, each alert's before its intents, in recipient order. For a
/// run nothing is written unless it is fenced and has no alert yet. The
/// intents are committed when it returns (DESIGN.md invariant 2: before
/// their sends). Returns one outcome per tier, in order; a run's second
/// tier in the same batch is left out as [`OpenedWithIntents::Busy`].
///
/// One round trip and one commit for the whole batch, where the general
/// path takes four round trips a run (begin, fence and alert, intents,
/// commit): the first call of every alert waits for it.
///
/// Errors: a database error, for the whole batch (e.g. a unique violation:
/// the same person twice in one tier's `recipients`): nothing was written.
pub async fn open_first_tiers(conn: &mut PgConnection, tiers: &[FirstTier], locks: RunLocks) -> Result<Vec<OpenedWithIntents>, sqlx::Error> {
    if tiers.is_empty() {
        return Ok(Vec::new());
    }
    // A run twice in one batch (no caller does that) would be fenced by one
    // of its tokens for both: its later tiers are left out, as `Busy`.
    let mut seen = std::collections::HashSet::new();
    let repeated: Vec<bool> = tiers.iter().map(|t| !seen.insert(t.run)).collect();
    if repeated.contains(&true) {
        let firsts: Vec<FirstTier> = tiers.iter().zip(&repeated).filter(|(_, r)| !**r).map(|(t, _)| t.clone()).collect();
        let mut outcomes = Box::pin(open_first_tiers(conn, &firsts, locks)).await?.into_iter();
        return Ok(repeated.iter().map(|r| if *r { OpenedWithIntents::Busy } else { outcomes.next().unwrap_or(OpenedWithIntents::Busy) }).collect());
    }
    let column = |f: fn(&FirstTier) -> &str| -> Vec<&str> { tiers.iter().map(f).collect() };
    let people = RecipientColumns::of(tiers.iter().enumerate().map(|(i, t)| (i as i64 + 1, t.recipients.as_slice())));
    // A run skipped as locked is busy only if it still looked fenced;
    // waiting, an unfenced run is a lost lease.
    let (lock_clause, busy) = match locks {
        RunLocks::SkipLocked => (
            "FOR UPDATE OF r SKIP LOCKED",
            "EXISTS (SELECT 1 FROM wardcall.runs r WHERE r.id = req.run_id AND r.fencing_token = req.token AND r.status = 'running')",
        ),
        RunLocks::Wait => ("FOR UPDATE OF r", "false"),
    };
    let rows: Vec<OpenedRow> = sqlx::query_as(&format!(
        "WITH req AS MATERIALIZED (
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::int[], $7::int[], $8::text[], $9::text[],
                                  $10::bigint[], $11::text[])
                 WITH ORDINALITY AS t(run_id, token, workflow, policy, message, cycle, step_index, channel, provider, reconcile_ms, actor, ord)),
         fence AS MATERIALIZED (
             SELECT r.id FROM wardcall.runs r
              WHERE r.id = ANY($1::uuid[]) AND r.status = 'running'
                AND r.fencing_token = (SELECT req.token FROM req WHERE req.run_id = r.id LIMIT 1)
              ORDER BY r.id {lock_clause}),
         alert AS (
             INSERT INTO wardcall.alerts (run_id, workflow, policy, message, status)
             SELECT req.run_id, req.workflow, req.policy, req.message, 'open' FROM req JOIN fence ON fence.id = req.run_id ORDER BY req.ord
             ON CONFLICT (run_id) DO NOTHING RETURNING id, run_id),
         people AS MATERIALIZED (
             SELECT * FROM unnest($12::bigint[], $13::text[], $14::text[], $15::text[]) WITH ORDINALITY AS p(tier, person_id, person_name, destination, ord)),
         intents AS (
             INSERT INTO wardcall.notification_attempts
                 (alert_id, run_id, step_key, cycle, step_index, person_id, person_name, generation, channel, destination, provider, status,
                  fencing_token, reconcile_after)
             SELECT alert.id, req.run_id, '', req.cycle, req.step_index, p.person_id, p.person_name, 0, req.channel, p.destination, req.provider,
                    'intent', req.token, clock_timestamp() + req.reconcile_ms * interval '1 millisecond'
               FROM people p JOIN req ON req.ord = p.tier JOIN alert ON alert.run_id = req.run_id
              ORDER BY p.ord
             RETURNING id, run_id, person_id),
         audited AS (
             INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
             SELECT e.entity, e.entity_id, e.action, NULL, e.to_state, e.actor, e.detail FROM (
                 SELECT req.ord, 0::bigint AS within, 'alert'::text AS entity, alert.id::text AS entity_id, 'alert.opened'::text AS action,
                        'open'::text AS to_state, req.actor, jsonb_build_object('run_id', req.run_id, 'policy', req.policy) AS detail
                   FROM alert JOIN req ON req.run_id = alert.run_id
                 UNION ALL
                 SELECT req.ord, p.ord, 'notification_attempt', i.id::text, 'attempt.intent', 'intent', req.actor,
                        jsonb_build_object('person_id', i.person_id, 'channel', req.channel, 'cycle', req.cycle, 'step_index', req.step_index,
                                           'generation', 0)
                   FROM intents i JOIN req ON req.run_id = i.run_id JOIN people p ON p.tier = req.ord AND p.person_id = i.person_id) e
              ORDER BY e.ord, e.within)
         SELECT req.ord, fence.id IS NOT NULL, fence.id IS NULL AND {busy}, alert.id, i.person_id, i.id
           FROM req LEFT JOIN fence ON fence.id = req.run_id LEFT JOIN alert ON alert.run_id = req.run_id
                    LEFT JOIN intents i ON i.run_id = req.run_id
          ORDER BY req.ord, (SELECT p.ord FROM people p WHERE p.tier = req.ord AND p.person_id = i.person_id)"
    ))
    .bind(tiers.iter().map(|t| t.run).collect::<Vec<_>>())
    .bind(tiers.iter().map(|t| t.token).collect::<Vec<_>>())
    .bind(column(|t| &t.workflow))
    .bind(column(|t| &t.policy))
    .bind(column(|t| &t.message))
    .bind(tiers.iter().map(|t| t.position.0).collect::<Vec<_>>())
    .bind(tiers.iter().map(|t| t.position.1).collect::<Vec<_>>())
    .bind(column(|t| &t.channel))
    .bind(column(|t| &t.provider))
    .bind(tiers.iter().map(|t| t.reconcile_after_ms).collect::<Vec<_>>())
    .bind(column(|t| &t.actor))
    .bind(&people.tier)
    .bind(&people.person_ids)
    .bind(&people.names)
    .bind(&people.destinations)
    .fetch_all(conn)
    .await?;
    let mut out: Vec<Option<OpenedWithIntents>> = vec![None; tiers.len()];
    for (ord, fenced, busy, alert, person, intent) in rows {
        let Some(slot) = usize::try_from(ord - 1).ok().and_then(|i| out.get_mut(i)) else { return Err(sqlx::Error::RowNotFound) };
        let outcome = slot.get_or_insert_with(|| match (fenced, busy, alert) {
            (false, true, _) => OpenedWithIntents::Busy,
            (false, false, _) => OpenedWithIntents::LeaseLost,
            (true, _, None) => OpenedWithIntents::AlertExists,
            (true, _, Some(alert)) => OpenedWithIntents::Opened { alert, intents: Vec::new() },
        });
        if let (OpenedWithIntents::Opened { intents, .. }, Some(person), Some(intent)) = (outcome, person, intent) {
            intents.push((person, intent));
        }
    }
    out.into_iter().map(|o| o.ok_or(sqlx::Error::RowNotFound)).collect()
}

/// One run's first tier ([`open_first_tiers`] with [`RunLocks::Wait`]).
///
/// Errors: a database error (e.g. a unique violation: the same person twice
/// in `recipients`).
pub async fn open_with_intents(conn: &mut PgConnection, tier: &FirstTier) -> Result<OpenedWithIntents, sqlx::Error> {
    open_first_tiers(conn, std::slice::from_ref(tier), RunLocks::Wait).await?.pop().ok_or(sqlx::Error::RowNotFound)
}
