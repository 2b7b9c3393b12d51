//! The workflow model as the config writes it (DESIGN.md, "The workflow
//! model"): a workflow is an ordered list of steps over the team's own tables,
//! with a key, a rule for a second event with the same key, the events that
//! cancel it, and hooks.
//!
//! ```toml
//! [[workflows]]
//! name = "follow-up"
//! event = "booking.saved"
//! when = "payload->>'task_status' = 'pending'"     # SQL over `payload` (jsonb)
//! key = "{id}"                                     # one live run per booking
//! on_duplicate = "replace"                         # or "skip" (the default)
//! cancel_on = [{ event = "booking.cancelled" }]    # matched by the same key
//!
//! [[workflows.steps]]
//! sql = "UPDATE lead_bookings SET task_status = 'scheduled' WHERE id = ($1->>'id')::uuid RETURNING task_name"
//! keep = "booking"                                 # the returned row, as variable `booking`
//!
//! [[workflows.steps]]
//! sleep_until = "{scheduled_at}"
//! ```
//!
//! Binding, everywhere: SQL gets `$1` = the event payload (jsonb) and `$2` =
//! the run's variables (jsonb object `{name: kept value}`); a template's
//! `{field}` is a top-level field of the payload and `{name.field…}` a field
//! of variable `name` (`{event.field…}` reaches into the payload). Every name
//! is checked when the config loads; every SQL text against the real schema
//! when wardcall starts.

use crate::config::EscalationWorkflow;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// What a second event with the key of a live run does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDuplicate {
    /// The event starts nothing; the live run goes on (audited on the outbox row).
    #[default]
    Skip,
    /// The live run is cancelled (without its `on_cancel` hook: it is being
    /// replaced, not called off) and a new run starts from the new event:
    /// a rescheduled booking moves its timer.
    Replace,
}

/// An event that cancels the live run with the same key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CancelOn {
    /// Event name.
    pub event: String,
    /// Template over the cancelling event's payload giving the key. Default:
    /// the workflow's own `key` template.
    pub key: Option<String>,
}

/// What a `wait` step does when its timeout passes first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Go on with the next step; the kept variable (if any) is `null`.
    #[default]
    Continue,
    /// The run fails (its `on_failure` hook runs).
    Fail,
    /// The run ends now as completed (its `on_complete` hook runs).
    Complete,
}

/// A `wait` step: for a named signal (sent with `wardcall.send_signal`, the
/// API or the CLI) or for an event whose key matches the run's key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WaitStep {
    /// Signal name (exclusive with `event`).
    pub signal: Option<String>,
    /// Event name (exclusive with `signal`); the event's key is computed with
    /// `key` (default: the workflow's `key` template) over its payload.
    pub event: Option<String>,
    /// Template over the awaited event's payload giving its key.
    pub key: Option<String>,
    /// Longest wait, as a duration (`"30s"`, `"2h"`, `"1h 30m"`).
    pub timeout: String,
    /// What the timeout does. Default `continue`.
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

/// An `emit` step: a new event in the outbox, committed with the step.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmitStep {
    /// Event name.
    pub event: String,
    /// The payload: a table whose string values are templates (rendered over
    /// the payload and variables; a string that is exactly one placeholder
    /// keeps the value's JSON type). Default `{}`.
    #[serde(default)]
    pub payload: BTreeMap<String, toml::Value>,
}

/// A `notify` step: a one-way message to recipients on a channel, its
/// delivery recorded in the notification log (`wardcall.message_log`).
///
/// ```toml
/// notify = { channel = "sms", people = ["nurse-avery"], recipients = "SELECT …", message = "Task {id} is at 75 % of its SLA." }
/// ```
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyStep {
    /// The channel. Default `sms` (the only one-way channel today).
    #[serde(default = "default_notify_channel")]
    pub channel: crate::notify::Channel,
    /// `[[people]]` ids.
    #[serde(default)]
    pub people: Vec<String>,
    /// A recipients query over the team's tables (`id`, `name`, `voice`,
    /// `sms`; `$1` payload, `$2` variables), run when the step runs.
    pub recipients: Option<String>,
    /// The message template.
    pub message: String,
}

fn default_notify_channel() -> crate::notify::Channel {
    crate::notify::Channel::Sms
}

impl NotifyStep {
    /// The step's recipients as a [`crate::notify::recipients::RecipientsSpec`].
    pub fn who(&self) -> crate::notify::recipients::RecipientsSpec {
        crate::notify::recipients::RecipientsSpec { notify: self.people.clone(), recipients: self.recipients.clone() }
    }
}

/// An instant for `sleep_until`: a template rendering an RFC 3339 timestamp
/// (`"{scheduled_at}"`), or a SQL query returning one `timestamptz`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum InstantSpec {
    /// A template, e.g. `"{scheduled_at}"`.
    Template(String),
    /// `{ sql = "SELECT …" }`: first column of the first row, a timestamptz.
    Sql {
        /// Read-only query with `$1` payload and `$2` variables.
        sql: String,
    },
}

/// One step of a workflow: exactly one of `sql`, `sleep`, `sleep_until`,
/// `wait`, `emit`, `escalate` (and, from their modules, `http` and `notify`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// A label for the audit log and errors. Default: `<kind>` and its index.
    pub name: Option<String>,
    /// Keep the step's result as this variable: the row a `sql` step returns,
    /// the payload of the event or signal a `wait` received.
    pub keep: Option<String>,
    /// A statement over the team's tables, run in the same transaction as the
    /// step's commit (so it takes effect exactly once).
    pub sql: Option<String>,
    /// A durable sleep: `"500ms"`, `"30s"`, `"2h 30m"`.
    pub sleep: Option<String>,
    /// A durable sleep until an instant.
    pub sleep_until: Option<InstantSpec>,
    /// Wait for a signal or an event with the run's key.
    pub wait: Option<WaitStep>,
    /// Emit an event.
    pub emit: Option<EmitStep>,
    /// Run an escalation policy: call recipients tier by tier until someone
    /// acknowledges (see `escalation.rs`).
    pub escalate: Option<Box<EscalationWorkflow>>,
    /// An outgoing HTTP request to a named endpoint, retried with backoff
    /// behind the endpoint's circuit breaker ([`crate::outbound`]); `keep`
    /// keeps the response (`{"status": …, "body": …}`).
    pub http: Option<crate::outbound::HttpStepConfig>,
    /// A one-way message to recipients.
    pub notify: Option<NotifyStep>,
}

/// A step's kind, borrowed from its config.
#[derive(Debug, Clone, Copy)]
pub enum StepKind<'a> {
    Sql(&'a str),
    Sleep(&'a str),
    SleepUntil(&'a InstantSpec),
    Wait(&'a WaitStep),
    Emit(&'a EmitStep),
    Escalate(&'a EscalationWorkflow),
    Http(&'a crate::outbound::HttpStepConfig),
    Notify(&'a NotifyStep),
}

impl StepConfig {
    /// The step's kind. Errors: none or several kinds set (a sentence for a config error).
    pub fn kind(&self) -> Result<StepKind<'_>, String> {
        let mut kinds = Vec::new();
        if let Some(s) = &self.sql {
            kinds.push(("sql", StepKind::Sql(s)));
        }
        if let Some(s) = &self.sleep {
            kinds.push(("sleep", StepKind::Sleep(s)));
        }
        if let Some(s) = &self.sleep_until {
            kinds.push(("sleep_until", StepKind::SleepUntil(s)));
        }
        if let Some(s) = &self.wait {
            kinds.push(("wait", StepKind::Wait(s)));
        }
        if let Some(s) = &self.emit {
            kinds.push(("emit", StepKind::Emit(s)));
        }
        if let Some(s) = &self.escalate {
            kinds.push(("escalate", StepKind::Escalate(s)));
        }
        if let Some(s) = &self.http {
            kinds.push(("http", StepKind::Http(s)));
        }
        if let Some(s) = &self.notify {
            kinds.push(("notify", StepKind::Notify(s)));
        }
        match kinds.as_slice() {
            [(_, k)] => Ok(*k),
            [] => Err(format!("a step needs exactly one of {}", STEP_KINDS.join(", "))),
            many => Err(format!("a step has exactly one kind; this one has {}", many.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" and "))),
        }
    }

    /// The kind's name (`sql`, `sleep`, …), `?` when invalid.
    pub fn kind_name(&self) -> &'static str {
        match self.kind() {
            Ok(StepKind::Sql(_)) => "sql",
            Ok(StepKind::Sleep(_)) => "sleep",
            Ok(StepKind::SleepUntil(_)) => "sleep_until",
            Ok(StepKind::Wait(_)) => "wait",
            Ok(StepKind::Emit(_)) => "emit",
            Ok(StepKind::Escalate(_)) => "escalate",
            Ok(StepKind::Http(_)) => "http",
            Ok(StepKind::Notify(_)) => "notify",
            Err(_) => "?",
        }
    }
}

/// The step kinds a config may use.
pub const STEP_KINDS: &[&str] = &["sql", "sleep", "sleep_until", "wait", "emit", "escalate", "http", "notify"];

/// The lists of steps of a workflow: its main list and its hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Main,
    OnComplete,
    OnFailure,
    OnCancel,
}

impl Phase {
    /// The phase's name in step addresses and config keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Main => "steps",
            Phase::OnComplete => "on_complete",
            Phase::OnFailure => "on_failure",
            Phase::OnCancel => "on_cancel",
        }
    }

    fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "steps" => Phase::Main,
            "on_complete" => Phase::OnComplete,
            "on_failure" => Phase::OnFailure,
            "on_cancel" => Phase::OnCancel,
            _ => return None,
        })
    }
}

/// Where a run is: `runs.step` is `<phase>:<index>` or
/// `<phase>:<index>/<sub-step>` (a step with inner states, such as
/// `escalate`'s `call` and `await`, or `wait`'s `resume`). A new run is at
/// `start`, which is `steps:0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepAddress {
    pub phase: Phase,
    pub index: usize,
    /// The inner state, empty on first entry.
    pub sub: String,
}

impl StepAddress {
    /// Parses `runs.step`. `None` for an address of another model.
    pub fn parse(step: &str) -> Option<StepAddress> {
        if step == "start" {
            return Some(StepAddress { phase: Phase::Main, index: 0, sub: String::new() });
        }
        // Escalation runs written before the workflow model (migration 0006)
        // are at `call` or `await`: the escalate step of the shorthand, index 0.
        if step == "call" || step == "await" {
            return Some(StepAddress { phase: Phase::Main, index: 0, sub: step.to_string() });
        }
        let (head, sub) = step.split_once('/').unwrap_or((step, ""));
        let (phase, index) = head.split_once(':')?;
        Some(StepAddress { phase: Phase::parse(phase)?, index: index.parse().ok()?, sub: sub.to_string() })
    }

    /// The first step of `phase`.
    pub fn first(phase: Phase) -> StepAddress {
        StepAddress { phase, index: 0, sub: String::new() }
    }

    /// The address as stored in `runs.step`.
    pub fn render(&self) -> String {
        if self.sub.is_empty() {
            format!("{}:{}", self.phase.as_str(), self.index)
        } else {
            format!("{}:{}/{}", self.phase.as_str(), self.index, self.sub)
        }
    }

    /// The same step with inner state `sub`.
    pub fn with_sub(&self, sub: &str) -> StepAddress {
        StepAddress { phase: self.phase, index: self.index, sub: sub.to_string() }
    }

    /// The next step of the same phase.
    pub fn next(&self) -> StepAddress {
        StepAddress { phase: self.phase, index: self.index + 1, sub: String::new() }
    }
}

/// Parses a duration of the config (`"500ms"`, `"30s"`, `"2h 30m"`, `"1.5s"`)
/// into milliseconds. Errors: not a duration, or negative (a sentence).
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let d: jiff::SignedDuration = text.trim().parse().map_err(|e| format!("'{text}' is not a duration like \"30s\", \"500ms\" or \"2h 30m\" ({e})"))?;
    if d.is_negative() {
        return Err(format!("'{text}' is negative"));
    }
    Ok(d.as_millis().min(i64::MAX as i128) as i64)
}

/// The variables a SQL text reads from `$2`, for the unknown-variable check
/// at load: `$2->'name'`, `$2->>'name'`, `$2 #> '{name,…}'`,
/// `$2 #>> '{name,…}'` (the path's first element) and `$2['name']` (jsonb
/// subscripting, PostgreSQL 14+), with or without spaces.
pub fn sql_variable_refs(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = sql.as_bytes();
    let mut i = 0;
    while let Some(pos) = sql[i..].find("$2") {
        let mut j = i + pos + 2;
        i = j;
        if bytes.get(j).is_some_and(|b| b.is_ascii_digit()) {
            continue; // $20…
        }
        while bytes.get(j).is_some_and(|b| b.is_ascii_whitespace()) {
            j += 1;
        }
        let path = if sql[j..].starts_with("#>") {
            j += 2;
            true
        } else if sql[j..].starts_with("->") {
            j += 2;
            false
        } else if sql[j..].starts_with('[') {
            j += 1;
            false
        } else {
            continue;
        };
        if bytes.get(j) == Some(&b'>') {
            j += 1;
        }
        while bytes.get(j).is_some_and(|b| b.is_ascii_whitespace()) {
            j += 1;
        }
        if bytes.get(j) != Some(&b'\'') {
            continue;
        }
        let Some(end) = sql[j + 1..].find('\'') else { continue };
        let literal = &sql[j + 1..j + 1 + end];
        let name = if path {
            // A text array: '{name,inner}' or '{"name",inner}'.
            let inner = literal.trim().trim_start_matches('{').trim_end_matches('}');
            inner.split(',').next().unwrap_or("").trim().trim_matches('"').to_string()
        } else {
            literal.to_string()
        };
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// How many positional parameters (`$1`, `$2`, …) a SQL text uses: the
/// highest number found. Bound parameters must match it exactly.
pub fn sql_parameter_count(sql: &str) -> usize {
    let bytes = sql.as_bytes();
    let mut max = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let start = i + 1;
            let mut j = start;
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                j += 1;
            }
            if j > start && !(i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_')) {
                max = max.max(sql[start..j].parse().unwrap_or(0));
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    max
}

/// Renders an `emit` payload: each string value is a template; a string that
/// is exactly one placeholder keeps the JSON type of the value it names.
pub fn render_json_template(value: &toml::Value, render: &dyn Fn(&str) -> Value) -> Value {
    match value {
        toml::Value::String(s) => render(s),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Boolean(b) => Value::from(*b),
        toml::Value::Datetime(d) => Value::from(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(|v| render_json_template(v, render)).collect()),
        toml::Value::Table(t) => Value::Object(t.iter().map(|(k, v)| (k.clone(), render_json_template(v, render))).collect()),
    }
}

/// Renders a JSON template (an `http` body): each string value is a
/// template; a string that is exactly one placeholder keeps its JSON type.
pub fn render_json_value(value: &Value, render: &dyn Fn(&str) -> Value) -> Value {
    match value {
        Value::String(s) => render(s),
        Value::Array(a) => Value::Array(a.iter().map(|v| render_json_value(v, render)).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), render_json_value(v, render))).collect()),
        other => other.clone(),
    }
}

/// Every template string inside a JSON value (for the checks at load).
pub fn json_value_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|v| json_value_strings(v, out)),
        Value::Object(m) => m.values().for_each(|v| json_value_strings(v, out)),
        _ => {}
    }
}

/// Every template string inside a JSON template (for the checks at load).
pub fn json_template_strings(value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::String(s) => out.push(s.clone()),
        toml::Value::Array(a) => a.iter().for_each(|v| json_template_strings(v, out)),
        toml::Value::Table(t) => t.values().for_each(|v| json_template_strings(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30s").unwrap(), 30_000);
        assert_eq!(parse_duration_ms("500ms").unwrap(), 500);
        assert_eq!(parse_duration_ms("2h 30m").unwrap(), 9_000_000);
        assert_eq!(parse_duration_ms("1.5s").unwrap(), 1_500);
        assert!(parse_duration_ms("soon").is_err());
        assert!(parse_duration_ms("-5s").is_err());
    }

    #[test]
    fn variable_refs_and_parameters() {
        let sql = "UPDATE t SET a = $2->>'pick', b = ($2 -> 'nurse')->>'id' WHERE id = ($1->>'id')::uuid AND x = '$2'";
        assert_eq!(sql_variable_refs(sql), vec!["pick".to_string(), "nurse".to_string()]);
        let sql = "SELECT $2 #>> '{slot,start}', $2#>'{\"who\"}', $2['when'], $2 [ 'x' ]";
        assert_eq!(sql_variable_refs(sql), ["slot", "who", "when", "x"]);
        assert_eq!(sql_parameter_count(sql), 2);
        assert_eq!(sql_parameter_count("SELECT 1"), 0);
        assert_eq!(sql_parameter_count("SELECT $1::int, $$x$$"), 1);
        assert_eq!(sql_parameter_count("SELECT $3"), 3);
    }

    #[test]
    fn addresses() {
        let a = StepAddress::parse("start").unwrap();
        assert_eq!(a.render(), "steps:0");
        let b = StepAddress::parse("on_cancel:2/call").unwrap();
        assert_eq!((b.phase, b.index, b.sub.as_str()), (Phase::OnCancel, 2, "call"));
        assert_eq!(b.next().render(), "on_cancel:3");
        assert!(StepAddress::parse("op:1").is_none());
        assert_eq!(StepAddress::parse("await").unwrap().render(), "steps:0/await", "a run from before the workflow model");
    }
}
