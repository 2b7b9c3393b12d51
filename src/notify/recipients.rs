//! Recipients: who a step reaches, named in the config as static `[[people]]`
//! and/or as a SQL query over the team's own tables (a zone's coordinator, a
//! backup chain, whoever is on shift now), resolved when the step runs.
//!
//! - [`RecipientsSpec`]: the config keys (`notify = ["person-id", …]`,
//!   `recipients = """SELECT …"""`), flattened into whatever names recipients
//!   (an escalation policy's tier today; the `notify` step of the workflow model).
//! - [`resolve`]: runs the query (read-only, bounded by
//!   [`RECIPIENTS_STATEMENT_TIMEOUT_MS`] and [`RECIPIENTS_LOCK_TIMEOUT_MS`]) and
//!   returns the people in order, static people first.
//! - [`check_query`]: the check at start (`capture::check_config_against_database`):
//!   the query is parsed and described against the real schema, never run.
//! - [`recorded`] / [`record`]: the list a step resolved, kept in the run's
//!   state under `recipients.<position>` so that an engine taking the run over
//!   after a crash reaches the same people (ARCHITECTURE.md, "Re-call rule").
//!
//! The query's contract: `$1` = the event payload (jsonb), `$2` = the run's
//! variables (jsonb object, `{}` when there are none); one row per recipient
//! with the columns `id` (text, required), `name` (text), `voice` (text, E.164,
//! may be NULL), `sms` (text, E.164, may be NULL), in any order and no others.
//! Numbers may carry spaces, dashes, dots and parentheses (`+1 (385) 555-0101`),
//! which are removed; a number that is still not E.164 is skipped for its
//! channel (reported in [`Resolved::skipped`], never with the number).
//!
//! Names and numbers are personal data: never logged, never in the audit log
//! ([`Resolved::audit_detail`] carries ids and counts only).

use super::{Channel, Recipient};
use crate::config::{is_e164, Config};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::Row;

/// Longest a recipients query may run (ms) (`statement_timeout`, PostgreSQL
/// manual 19.11.1 "Statement Behavior").
pub const RECIPIENTS_STATEMENT_TIMEOUT_MS: u64 = 2_000;
/// Longest a recipients query may wait for a lock (ms), e.g. behind a team's
/// `ALTER TABLE` (`lock_timeout`).
pub const RECIPIENTS_LOCK_TIMEOUT_MS: u64 = 1_000;
/// Rows read from a recipients query at most; further rows are ignored and
/// reported ([`Resolved::truncated`]): a query that returns a whole staff
/// table is a config fault, not a page to everyone.
pub const MAX_RECIPIENTS: usize = 100;
/// The columns a recipients query returns, in no particular order.
pub const COLUMNS: [&str; 4] = ["id", "name", "voice", "sms"];

/// Who to reach, as written in the config. Flattened into a policy tier:
///
/// ```toml
/// [[policies.steps]]
/// notify = ["nurse-avery"]                  # [[people]] ids (optional)
/// recipients = """SELECT … AS id, … AS name, … AS voice, … AS sms FROM …"""  # optional
/// ```
///
/// At least one of the two must be given (checked at load); both may be.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct RecipientsSpec {
    /// `[[people]]` ids, reached in this order, before the query's rows.
    #[serde(default)]
    pub notify: Vec<String>,
    /// A SQL query over the team's tables (see the module's contract), run
    /// when the step runs.
    #[serde(default)]
    pub recipients: Option<String>,
}

impl RecipientsSpec {
    /// True when the spec names nobody at all (neither people nor a query).
    pub fn is_empty(&self) -> bool {
        self.notify.is_empty() && self.recipients.is_none()
    }
}

/// Why a row (or one of its channels) was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The row's `id` is NULL or empty: the row is skipped.
    NoId,
    /// The number on `channel` is not E.164: that channel is skipped.
    InvalidNumber,
    /// The `id` was already listed (by `notify` or an earlier row): skipped.
    Duplicate,
    /// A `notify` id is not in `[[people]]` (the config changed under a run;
    /// a config naming one is refused at load).
    UnknownPerson,
}

/// One row, or one row's channel, that was not used. Carries no number and no name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The row's id, when it has one.
    pub id: Option<String>,
    /// The channel skipped (`None`: the whole row).
    pub channel: Option<Channel>,
    pub reason: SkipReason,
}

/// The outcome of [`resolve`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolved {
    /// The recipients, static people first (in `notify` order), then the
    /// query's rows in its order; ids unique. A recipient may have no
    /// address on a channel (e.g. no voice number).
    pub recipients: Vec<Recipient>,
    /// Rows or channels left out, for the audit log.
    pub skipped: Vec<Skipped>,
    /// The query returned more than [`MAX_RECIPIENTS`] rows; the rest were ignored.
    pub truncated: bool,
}

impl Resolved {
    /// The recipients that have an address on `channel`.
    pub fn reachable(&self, channel: Channel) -> Vec<&Recipient> {
        self.recipients.iter().filter(|r| r.address(channel).is_some()).collect()
    }

    /// What the audit log may say: counts, ids and reasons, never names or numbers.
    pub fn audit_detail(&self) -> Value {
        json!({
            "recipients": self.recipients.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            "skipped": self.skipped,
            "truncated": self.truncated,
        })
    }
}

/// Why [`resolve`] could not run the query. (The static part of the spec can
/// still be had from [`static_people`]: callers fall back to it, towards a human.)
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The query failed or timed out. The text is redacted (`capture::db_message`).
    #[error("recipients query failed: {}", crate::capture::db_message(.0))]
    Database(#[from] sqlx::Error),
}

impl ResolveError {
    /// The SQLSTATE of the database error, for the audit log.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            ResolveError::Database(e) => e.as_database_error().and_then(|d| d.code()).map(|c| c.to_string()),
        }
    }
}

/// The static people of `spec` (`notify`), as recipients (voice and SMS on
/// the person's `phone`), in order, each once. An id not in `[[people]]` is
/// skipped ([`SkipReason::UnknownPerson`]), never an error: the others are
/// still reached.
pub fn static_people(config: &Config, spec: &RecipientsSpec) -> Resolved {
    let mut out = Resolved::default();
    for id in &spec.notify {
        let Some(p) = config.person(id) else {
            out.skipped.push(Skipped { id: Some(id.clone()), channel: None, reason: SkipReason::UnknownPerson });
            continue;
        };
        if out.recipients.iter().any(|r| &r.id == id) {
            continue;
        }
        out.recipients.push(Recipient { id: p.id.clone(), name: p.name.clone(), voice: Some(p.phone.clone()), sms: Some(p.phone.clone()) });
    }
    out
}

/// Resolves `spec` now: the static people, then the query's rows (if any),
/// the query run with `$1` = `payload` and `$2` = `vars` in its own read-only
/// transaction with [`RECIPIENTS_STATEMENT_TIMEOUT_MS`] and
/// [`RECIPIENTS_LOCK_TIMEOUT_MS`] (rolled back: nothing it does is kept).
///
/// Errors: [`ResolveError::Database`] when the query fails or times out (a
/// column of the wrong type, checked at start, can only appear after a schema
/// change). A `notify` id not in the config is skipped (see [`static_people`]).
pub async fn resolve(pool: &sqlx::PgPool, config: &Config, spec: &RecipientsSpec, payload: &Value, vars: &Value) -> Result<Resolved, ResolveError> {
    use futures_util::TryStreamExt;
    let mut out = static_people(config, spec);
    let Some(sql) = spec.recipients.as_deref() else { return Ok(out) };
    let vars = if vars.is_object() { vars.clone() } else { json!({}) };
    let mut tx = crate::workflows::team_sql::begin_bounded_read_only(pool, RECIPIENTS_STATEMENT_TIMEOUT_MS, RECIPIENTS_LOCK_TIMEOUT_MS).await?;
    let read = async {
        let mut rows = Vec::new();
        let mut stream = sqlx::query(sql).bind(payload).bind(&vars).fetch(&mut *tx);
        while let Some(row) = stream.try_next().await? {
            if rows.len() == MAX_RECIPIENTS {
                return Ok((rows, true));
            }
            rows.push(row);
        }
        Ok::<_, sqlx::Error>((rows, false))
    };
    let read = crate::db::deadline::within(crate::db::deadline::past_statement_timeout(RECIPIENTS_STATEMENT_TIMEOUT_MS), read).await;
    // Rolled back as the pool takes the connection back (closed if it did not answer).
    let (rows, truncated) = tx.settle(read)?;
    out.truncated |= truncated;
    for row in rows {
        let text = |c: &str| -> Result<Option<String>, sqlx::Error> { Ok(row.try_get::<Option<String>, _>(c)?.filter(|s| !s.trim().is_empty())) };
        let Some(id) = text("id")?.map(|s| s.trim().to_string()) else {
            out.skipped.push(Skipped { id: None, channel: None, reason: SkipReason::NoId });
            continue;
        };
        if out.recipients.iter().any(|r| r.id == id) {
            out.skipped.push(Skipped { id: Some(id), channel: None, reason: SkipReason::Duplicate });
            continue;
        }
        let mut number = |channel: Channel| -> Result<Option<String>, sqlx::Error> {
            let Some(raw) = text(channel.as_str())? else { return Ok(None) };
            let n = normalise_number(&raw);
            if is_e164(&n) {
                Ok(Some(n))
            } else {
                out.skipped.push(Skipped { id: Some(id.clone()), channel: Some(channel), reason: SkipReason::InvalidNumber });
                Ok(None)
            }
        };
        let voice = number(Channel::Voice)?;
        let sms = number(Channel::Sms)?;
        let name = text("name")?.unwrap_or_else(|| id.clone());
        out.recipients.push(Recipient { id, name, voice, sms });
    }
    Ok(out)
}

/// Removes the formatting people put in phone numbers (spaces, `-`, `.`, `(`, `)`).
pub fn normalise_number(raw: &str) -> String {
    raw.chars().filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')' | '\t')).collect()
}

/// Checks a recipients query against the real schema without running it: it
/// is parsed and described (extended protocol Parse/Describe) with `$1`, `$2`
/// as jsonb; it may use at most those two parameters and must return exactly
/// the [`COLUMNS`] (any order), each of a text type.
///
/// Errors: the problem in words (PostgreSQL's reason through
/// `capture::db_message`, or which column is missing, extra or of which type);
/// the caller adds the file and key.
pub async fn check_query(conn: &mut sqlx::PgConnection, sql: &str) -> Result<(), String> {
    use sqlx::{Executor, Postgres, Statement, TypeInfo};
    let jsonb = <sqlx::types::JsonValue as sqlx::Type<Postgres>>::type_info();
    let statement = match conn.prepare_with(sql, &[jsonb.clone(), jsonb]).await {
        Ok(s) => s,
        Err(e) => return Err(format!("PostgreSQL refused it: {}", crate::capture::db_message(&e))),
    };
    let n = match statement.parameters() {
        Some(sqlx::Either::Left(types)) => types.len(),
        Some(sqlx::Either::Right(n)) => n,
        None => 0,
    };
    if n > 2 {
        return Err(format!("uses ${n}, but only $1 (the event payload) and $2 (the run's variables), both jsonb, are bound"));
    }
    let columns = statement.columns();
    let names: Vec<&str> = columns.iter().map(sqlx::Column::name).collect();
    for want in COLUMNS {
        if !names.contains(&want) {
            return Err(format!(
                "must return the columns id, name, voice, sms (text); column '{want}' is missing (it returns: {})",
                if names.is_empty() { "no columns".to_string() } else { names.join(", ") }
            ));
        }
    }
    for c in columns {
        let name = sqlx::Column::name(c);
        if !COLUMNS.contains(&name) {
            return Err(format!("returns column '{name}', which is not one of id, name, voice, sms (alias or remove it)"));
        }
        if names.iter().filter(|n| **n == name).count() > 1 {
            return Err(format!("returns column '{name}' more than once"));
        }
        let ty = sqlx::Column::type_info(c);
        if !<String as sqlx::Type<Postgres>>::compatible(ty) {
            return Err(format!("column '{name}' is of type {}, expected text (cast it with ::text)", ty.name()));
        }
    }
    Ok(())
}

/// The list recorded in `state` for `position` (e.g. `"0.1"`: cycle 0, tier 1),
/// if the step resolved it before.
pub fn recorded(state: &Value, position: &str) -> Option<Vec<Recipient>> {
    state.get("recipients")?.get(position).and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// Records `list` in `state` under `recipients.<position>` (the caller
/// commits the state with the step's intents, so a takeover sees it).
pub fn record(state: &mut Value, position: &str, list: &[Recipient]) {
    if !state.is_object() {
        *state = json!({});
    }
    let map = state.as_object_mut().expect("an object");
    let entry = map.entry("recipients").or_insert_with(|| json!({}));
    if !entry.is_object() {
        *entry = json!({});
    }
    entry[position] = serde_json::to_value(list).expect("recipients serialize");
}

/// Forgets the lists recorded for positions starting with `prefix` (e.g.
/// `"1."`: every tier of cycle 1), so that they are resolved again.
pub fn forget(state: &mut Value, prefix: &str) {
    if let Some(map) = state.get_mut("recipients").and_then(Value::as_object_mut) {
        map.retain(|k, _| !k.starts_with(prefix));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_lose_their_formatting() {
        assert_eq!(normalise_number("+1 (385) 555-0101"), "+13855550101");
        assert!(!is_e164(&normalise_number("385-555-0101")));
    }

    #[test]
    fn record_and_forget_by_position() {
        let mut state = json!({"cycle": 0});
        let r = Recipient { id: "a".into(), name: "A".into(), voice: Some("+13855550101".into()), sms: None };
        record(&mut state, "0.0", std::slice::from_ref(&r));
        record(&mut state, "1.0", &[]);
        assert_eq!(recorded(&state, "0.0"), Some(vec![r]));
        assert_eq!(recorded(&state, "1.0"), Some(vec![]));
        forget(&mut state, "1.");
        assert_eq!(recorded(&state, "1.0"), None);
        assert!(recorded(&state, "0.0").is_some());
    }

    #[test]
    fn spec_keys_parse() {
        let s: RecipientsSpec = toml::from_str("notify = [\"a\"]\nrecipients = \"SELECT 1\"").unwrap();
        assert_eq!(s.notify, vec!["a".to_string()]);
        assert!(!s.is_empty());
        assert!(RecipientsSpec::default().is_empty());
    }
}
