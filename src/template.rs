//! Message templates: `{name}` placeholders over the event payload and lookups,
//! and `{variable.field…}` placeholders over a run's variables (`{event.…}`
//! reaches into the payload).
//!
//! `{{` and `}}` are literal braces. A placeholder that has no value renders as
//! the empty string (a missing patient name must never stop a call). Values are
//! plain text; escaping for TwiML happens where the TwiML is built.

use serde_json::Value;
use std::collections::HashMap;

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Field(String),
}

impl Template {
    /// Parses `text`. Errors (as a sentence for a config error): an unclosed `{`,
    /// a stray `}`, or a placeholder that is not `[A-Za-z0-9_]+` segments
    /// joined by `.`.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut buf = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    buf.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    buf.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(ch) if ch.is_ascii_alphanumeric() || ch == '_' || ch == '.' => name.push(ch),
                            Some(ch) => return Err(format!("placeholder {{{name}{ch}… may hold only letters, digits and '_'")),
                            None => return Err(format!("placeholder {{{name} is not closed")),
                        }
                    }
                    if name.is_empty() {
                        return Err("empty placeholder {}".into());
                    }
                    if name.split('.').any(str::is_empty) {
                        return Err(format!("placeholder {{{name}}} has an empty segment"));
                    }
                    if !buf.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut buf)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' => return Err("a '}' without '{' (write '}}' for a literal brace)".into()),
                c => buf.push(c),
            }
        }
        if !buf.is_empty() {
            parts.push(Part::Text(buf));
        }
        Ok(Template { parts })
    }

    /// The placeholders' names, in order (`room_name`, `booking.task_name`).
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Text(_) => None,
        })
    }

    /// The placeholder's name when the template is exactly one placeholder.
    pub fn single_field(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Field(f)] => Some(f),
            _ => None,
        }
    }

    /// Renders with the run's variables: `{name.field…}` is a field of
    /// variable `name` (`{event.field…}` of the payload); `{name}` as in
    /// [`Template::render`]. Values render as in [`Template::render`].
    pub fn render_with(&self, payload: &Value, lookups: &HashMap<String, String>, vars: &Value) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(name) if name.contains('.') && !lookups.contains_key(name) => push_value(&mut out, lookup_path(payload, vars, name)),
                Part::Field(name) => match lookups.get(name) {
                    Some(v) => out.push_str(v),
                    None => push_value(&mut out, payload.get(name).or_else(|| vars.get(name))),
                },
            }
        }
        out
    }

    /// Renders with `lookups` first, then the payload's top-level fields.
    /// Strings render as they are, numbers and booleans as JSON, null/absent as "".
    pub fn render(&self, payload: &Value, lookups: &HashMap<String, String>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(name) => {
                    if let Some(v) = lookups.get(name) {
                        out.push_str(v);
                    } else {
                        match payload.get(name) {
                            Some(Value::String(s)) => out.push_str(s),
                            Some(Value::Null) | None => {}
                            Some(other) => out.push_str(&other.to_string()),
                        }
                    }
                }
            }
        }
        out
    }
}

/// The value a placeholder names: `event.a.b` in the payload, `v.a` in
/// variable `v`, a plain name in the payload then the variables.
pub fn lookup_path<'a>(payload: &'a Value, vars: &'a Value, name: &str) -> Option<&'a Value> {
    let mut segments = name.split('.');
    let first = segments.next()?;
    let mut v = if first == "event" {
        payload
    } else if name.contains('.') {
        vars.get(first)?
    } else {
        return payload.get(first).or_else(|| vars.get(first));
    };
    for s in segments {
        v = match v {
            Value::Object(m) => m.get(s)?,
            Value::Array(a) => a.get(s.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

fn push_value(out: &mut String, v: Option<&Value>) {
    match v {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Null) | None => {}
        Some(other) => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_fields_lookups_and_braces() {
        let t = Template::parse("{{x}} {room_name}, {title}. {missing}!").unwrap();
        let mut l = HashMap::new();
        l.insert("room_name".to_string(), "Room 2".to_string());
        assert_eq!(t.render(&json!({"title": "Seizure"}), &l), "{x} Room 2, Seizure. !");
    }

    #[test]
    fn renders_variables_and_event_paths() {
        let t = Template::parse("followup-{id}-{booking.n} {event.meta.room} {nurse.name}").unwrap();
        let vars = json!({"booking": {"n": 7}, "nurse": {"name": "Avery"}});
        assert_eq!(t.render_with(&json!({"id": "b1", "meta": {"room": "R2"}}), &HashMap::new(), &vars), "followup-b1-7 R2 Avery");
        assert_eq!(t.fields().collect::<Vec<_>>(), vec!["id", "booking.n", "event.meta.room", "nurse.name"]);
        assert!(Template::parse("{a..b}").is_err());
    }

    #[test]
    fn rejects_unclosed() {
        assert!(Template::parse("hello {name").is_err());
        assert!(Template::parse("hello }").is_err());
        assert!(Template::parse("hello {a b}").is_err());
    }
}
