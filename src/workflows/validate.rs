//! Checks of one workflow at config load (before anything touches the
//! database): step kinds, names, durations, templates, and that every
//! variable a template or SQL text reads is kept by an earlier step. The SQL
//! itself is checked against the real schema when wardcall starts
//! (`capture::check_config_against_schema`).
//!
//! Errors are `(key, problem)`: the dotted config key
//! (`workflows[0].steps[2].sql`) and a sentence.

use super::model::{parse_duration_ms, sql_parameter_count, sql_variable_refs, OnDuplicate, Phase, StepKind};
use crate::config::{Config, EscalationWorkflow, Workflow, WorkflowKind};
use crate::template::Template;
use std::collections::BTreeSet;

type Problem = (String, String);

fn identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks `w`, the `index`-th workflow of `config`.
pub fn workflow(config: &Config, index: usize, w: &Workflow) -> Result<(), Problem> {
    let at = |k: &str| format!("workflows[{index}].{k}");
    let escalation_fields =
        [("policy", w.policy.is_some()), ("message", w.message.is_some()), ("lookups", !w.lookups.is_empty()), ("write_back", !w.write_back.is_empty())];
    match w.kind {
        WorkflowKind::Escalation => {
            if w.policy.is_none() {
                return Err((at("policy"), "a workflow of kind 'escalation' needs a policy".into()));
            }
            if w.message.is_none() {
                return Err((at("message"), "a workflow of kind 'escalation' needs a message".into()));
            }
            if w.steps.len() != 1 || w.steps[0].escalate.is_none() || w.steps[0].escalate.as_ref().map(|e| &e.policy) != w.policy.as_ref() {
                return Err((
                    at("steps"),
                    "kind = \"escalation\" is the shorthand for one escalate step: write either policy and message here, or steps without kind".into(),
                ));
            }
        }
        WorkflowKind::Steps | WorkflowKind::Script => {
            if let Some((field, _)) = escalation_fields.iter().find(|(_, set)| *set) {
                return Err((at(field), "is a key of kind = \"escalation\" only; in a list of steps, write it inside an escalate step".into()));
            }
        }
    }
    if w.kind == WorkflowKind::Script {
        if let Some((phase, _, _)) = w.all_steps().next() {
            return Err((at(phase.as_str()), "a script workflow takes its steps from the event payload; remove kind = \"script\" to list steps".into()));
        }
    } else if w.steps.is_empty() {
        return Err((at("steps"), "a workflow needs at least one step ([[workflows.steps]])".into()));
    }
    if let Some(when) = &w.when {
        if when.trim().is_empty() {
            return Err((at("when"), "is empty (remove it to start a run for every event)".into()));
        }
        if when.contains(';') {
            return Err((at("when"), "is one SQL boolean expression over payload; it may not contain ';'".into()));
        }
    }
    if let Some(key) = &w.key {
        let t = Template::parse(key).map_err(|p| (at("key"), p))?;
        if t.fields().next().is_none() {
            return Err((at("key"), "has no placeholder: every event would have the same key (e.g. \"{id}\")".into()));
        }
        let from_variables: Option<String> = t.fields().find(|f| f.contains('.') && !f.starts_with("event.")).map(str::to_string);
        if let Some(f) = from_variables {
            return Err((at("key"), format!("{{{f}}}: a key is computed from the event payload only (use {{field}} or {{event.field.sub}})")));
        }
    }
    if w.on_duplicate == OnDuplicate::Replace && w.key.is_none() {
        return Err((at("on_duplicate"), "'replace' needs a key: which live run would a new event replace?".into()));
    }
    for (j, c) in w.cancel_on.iter().enumerate() {
        let k = format!("workflows[{index}].cancel_on[{j}]");
        if c.event.trim().is_empty() {
            return Err((format!("{k}.event"), "must not be empty".into()));
        }
        if w.key.is_none() {
            return Err((k, "cancel_on matches runs by key, and this workflow has no key".into()));
        }
        if c.event == w.event && w.when.is_none() {
            return Err((
                format!("{k}.event"),
                format!(
                    "'{}' also starts this workflow: every run would be cancelled by the next one (use on_duplicate = \"replace\", or a when condition)",
                    c.event
                ),
            ));
        }
        if let Some(key) = &c.key {
            event_key(&format!("{k}.key"), key)?;
        }
    }
    let escalates = w.all_steps().filter(|(_, _, s)| s.escalate.is_some()).count();
    if escalates > 1 {
        return Err((at("steps"), "at most one escalate step per workflow (a run has one alert)".into()));
    }
    // Variables kept by the main steps, in order; hooks may read any of them.
    let mut kept: BTreeSet<String> = BTreeSet::new();
    for phase in [Phase::Main, Phase::OnComplete, Phase::OnFailure, Phase::OnCancel] {
        let mut known = kept.clone();
        if phase != Phase::Main {
            known.extend(w.steps.iter().filter_map(|s| s.keep.clone()));
        }
        if matches!(phase, Phase::OnFailure | Phase::OnCancel) {
            known.insert("ending".into());
        }
        for (j, step) in w.phase_steps(phase).iter().enumerate() {
            let key = w.step_key(index, phase, j);
            step_config(config, w, &key, step, &known)?;
            if let Some(k) = &step.keep {
                known.insert(k.clone());
            }
        }
        if phase == Phase::Main {
            kept = known;
        }
    }
    Ok(())
}

/// A key template computed over an event's payload: a template whose
/// placeholders read the payload only (a run's variables are not there).
fn event_key(key: &str, text: &str) -> Result<(), Problem> {
    let t = Template::parse(text).map_err(|p| (key.to_string(), p))?;
    if let Some(f) = t.fields().find(|f| f.contains('.') && !f.starts_with("event.")) {
        return Err((key.to_string(), format!("{{{f}}}: a key is computed from the event's payload only (use {{field}} or {{event.field.sub}})")));
    }
    if t.fields().next().is_none() {
        return Err((key.to_string(), "has no placeholder: every event would have the same key".into()));
    }
    Ok(())
}

fn check_template(key: &str, text: &str, known: &BTreeSet<String>) -> Result<Template, Problem> {
    let t = Template::parse(text).map_err(|p| (key.to_string(), p))?;
    for f in t.fields() {
        if let Some((var, _)) = f.split_once('.') {
            if var != "event" && !known.contains(var) {
                return Err((key.to_string(), unknown_variable(var, f, known)));
            }
        }
    }
    Ok(t)
}

fn unknown_variable(var: &str, used: &str, known: &BTreeSet<String>) -> String {
    let list = if known.is_empty() {
        "none is kept before this step".to_string()
    } else {
        format!("kept before this step: {}", known.iter().cloned().collect::<Vec<_>>().join(", "))
    };
    format!("{used} reads variable '{var}', which no earlier step keeps ({list}; the payload is {{event.…}})")
}

fn check_sql(key: &str, sql: &str, known: &BTreeSet<String>) -> Result<(), Problem> {
    if sql.trim().is_empty() {
        return Err((key.into(), "is an empty SQL statement".into()));
    }
    let n = sql_parameter_count(sql);
    if n > 2 {
        return Err((key.into(), format!("uses ${n}, but only $1 (the event payload) and $2 (the run's variables), both jsonb, are bound")));
    }
    for var in sql_variable_refs(sql) {
        if !known.contains(&var) {
            return Err((key.into(), unknown_variable(&var, &format!("$2->'{var}'"), known)));
        }
    }
    Ok(())
}

fn step_config(config: &Config, w: &Workflow, key: &str, step: &super::model::StepConfig, known: &BTreeSet<String>) -> Result<(), Problem> {
    let kind = step.kind().map_err(|p| (key.to_string(), p))?;
    if let Some(name) = &step.name {
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') || name.is_empty() {
            return Err((format!("{key}.name"), format!("'{name}' must be letters, digits, '-' or '_'")));
        }
    }
    if let Some(k) = &step.keep {
        if !identifier(k) || k == "event" || k == "ending" {
            return Err((format!("{key}.keep"), format!("'{k}' is not a variable name (letters, digits, '_'; not 'event' or 'ending')")));
        }
        if !matches!(kind, StepKind::Sql(_) | StepKind::Wait(_) | StepKind::Http(_)) {
            return Err((
                format!("{key}.keep"),
                format!("a {} step keeps nothing (sql keeps its row, wait the payload it received, http the response)", step.kind_name()),
            ));
        }
    }
    match kind {
        StepKind::Sql(sql) => check_sql(&format!("{key}.sql"), sql, known)?,
        StepKind::Sleep(d) => {
            parse_duration_ms(d).map_err(|p| (format!("{key}.sleep"), p))?;
        }
        StepKind::SleepUntil(super::model::InstantSpec::Template(t)) => {
            check_template(&format!("{key}.sleep_until"), t, known)?;
        }
        StepKind::SleepUntil(super::model::InstantSpec::Sql { sql }) => check_sql(&format!("{key}.sleep_until.sql"), sql, known)?,
        StepKind::Wait(wait) => {
            let k = format!("{key}.wait");
            match (&wait.signal, &wait.event) {
                (Some(s), None) if !s.trim().is_empty() => {}
                (None, Some(e)) if !e.trim().is_empty() => {
                    let key_template = wait.key.as_ref().or(w.key.as_ref());
                    match key_template {
                        None => return Err((k, "waiting for an event matches it by key, and this workflow has no key (set key, or wait.key)".into())),
                        Some(t) => {
                            event_key(&format!("{k}.key"), t)?;
                        }
                    }
                }
                _ => return Err((k, "needs exactly one of signal or event".into())),
            }
            parse_duration_ms(&wait.timeout).map_err(|p| (format!("{k}.timeout"), p))?;
        }
        StepKind::Emit(emit) => {
            if emit.event.trim().is_empty() {
                return Err((format!("{key}.emit.event"), "must not be empty".into()));
            }
            let mut strings = Vec::new();
            for v in emit.payload.values() {
                super::model::json_template_strings(v, &mut strings);
            }
            for s in strings {
                check_template(&format!("{key}.emit.payload"), &s, known)?;
            }
        }
        StepKind::Escalate(esc) => escalate(config, key, w.kind == WorkflowKind::Escalation, esc, known)?,
        StepKind::Http(h) => {
            h.check(&format!("{key}.http"), &config.endpoints)?;
            check_template(&format!("{key}.http.path"), &h.path, known)?;
            if let Some(body) = &h.body {
                let mut strings = Vec::new();
                for v in body.values() {
                    super::model::json_value_strings(v, &mut strings);
                }
                for s in strings {
                    check_template(&format!("{key}.http.body"), &s, known)?;
                }
            }
        }
        StepKind::Notify(n) => {
            let k = format!("{key}.notify");
            if n.channel != crate::notify::Channel::Sms {
                return Err((
                    format!("{k}.channel"),
                    "a notify step sends one-way messages on 'sms' (voice and email one-way messages are not built yet)".into(),
                ));
            }
            if n.people.is_empty() && n.recipients.is_none() {
                return Err((k, "names nobody: give people (ids of [[people]]) or a recipients query".into()));
            }
            for p in &n.people {
                if config.person(p).is_none() {
                    return Err((format!("{k}.people"), format!("unknown person '{p}'")));
                }
            }
            if let Some(sql) = &n.recipients {
                check_sql(&format!("{k}.recipients"), sql, known)?;
            }
            if n.message.trim().is_empty() {
                return Err((format!("{k}.message"), "is empty".into()));
            }
            check_template(&format!("{k}.message"), &n.message, known)?;
            if config.providers.twilio.is_none() {
                return Err((k, "a notify step needs [providers.twilio]".into()));
            }
        }
    }
    Ok(())
}

fn escalate(config: &Config, key: &str, shorthand: bool, esc: &EscalationWorkflow, known: &BTreeSet<String>) -> Result<(), Problem> {
    let at = |k: &str| if shorthand { format!("{key}.{k}") } else { format!("{key}.escalate.{k}") };
    if config.policy(&esc.policy).is_none() {
        return Err((at("policy"), format!("unknown policy '{}'", esc.policy)));
    }
    if config.providers.twilio.is_none() {
        return Err((if shorthand { key.to_string() } else { format!("{key}.escalate") }, "an escalation needs [providers.twilio]".into()));
    }
    check_template(&at("message"), &esc.message, known)?;
    let mut names: Vec<&String> = esc.lookups.keys().collect();
    names.sort();
    for name in names {
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') || name.is_empty() {
            return Err((at(&format!("lookups.{name}")), "a lookup name must be letters, digits, '-' or '_'".into()));
        }
        if esc.lookups[name].trim().is_empty() {
            return Err((at(&format!("lookups.{name}")), "is an empty SQL statement".into()));
        }
    }
    for (hook, sql) in esc.write_back.hooks() {
        if sql.is_some_and(|s| s.trim().is_empty()) {
            return Err((at(&format!("write_back.{hook}")), "is an empty SQL statement".into()));
        }
    }
    Ok(())
}
