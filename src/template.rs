//! Message templates: `{name}` placeholders over the event payload and lookups.
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
    /// a stray `}`, or a placeholder that is not `[A-Za-z0-9_]+`.
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
                            Some(ch) if ch.is_ascii_alphanumeric() || ch == '_' => name.push(ch),
                            Some(ch) => return Err(format!("placeholder {{{name}{ch}… may hold only letters, digits and '_'")),
                            None => return Err(format!("placeholder {{{name} is not closed")),
                        }
                    }
                    if name.is_empty() {
                        return Err("empty placeholder {}".into());
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
    fn rejects_unclosed() {
        assert!(Template::parse("hello {name").is_err());
        assert!(Template::parse("hello }").is_err());
        assert!(Template::parse("hello {a b}").is_err());
    }
}
