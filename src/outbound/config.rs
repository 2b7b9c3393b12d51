//! Configuration of outgoing HTTP: the named endpoints (`[[endpoints]]`) and
//! what one `http` step says ([`HttpStepConfig`]). Checked when the config
//! loads; secrets are resolved at start ([`super::Endpoints::resolve`]).

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// Allowed ranges of the numeric keys (inclusive), checked at load. README.md
/// ("Outgoing HTTP") documents them.
pub mod limits {
    /// `endpoints[].timeout_ms` and a step's `timeout_ms`.
    pub const TIMEOUT_MS: (u64, u64) = (100, 300_000);
    /// `endpoints[].failure_threshold`.
    pub const FAILURE_THRESHOLD: (u32, u32) = (1, 1000);
    /// `endpoints[].cooldown_ms`.
    pub const COOLDOWN_MS: (u64, u64) = (100, 86_400_000);
    /// A step's `retry.max_attempts`.
    pub const MAX_ATTEMPTS: (u32, u32) = (1, 1000);
    /// A step's `retry.base_ms`.
    pub const BASE_MS: (u64, u64) = (1, 3_600_000);
    /// A step's `retry.max_ms` (and at least `retry.base_ms`).
    pub const MAX_MS: (u64, u64) = (1, 86_400_000);
}

/// Default `endpoints[].timeout_ms`: 10 s for the whole request (connect,
/// send, response).
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Default `endpoints[].failure_threshold`: consecutive failures that open the breaker.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
/// Default `endpoints[].cooldown_ms`: how long an open breaker stays open.
pub const DEFAULT_COOLDOWN_MS: u64 = 30_000;
/// Default `retry.max_attempts` of an `http` step (the first try included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default `retry.base_ms`: the delay after the first failure, before jitter.
pub const DEFAULT_BASE_MS: u64 = 1000;
/// Default `retry.max_ms`: the longest delay, before jitter.
pub const DEFAULT_MAX_MS: u64 = 60_000;

/// Headers an endpoint may not set: wardcall sets them itself
/// (`Idempotency-Key`, `Content-Type` with a JSON body) or the HTTP client does.
pub const RESERVED_HEADERS: &[&str] = &["idempotency-key", "content-type", "content-length", "host", "transfer-encoding", "connection"];

/// Headers whose value is always a secret: a literal value for them is
/// refused at load (it would put a secret in the config file).
pub const SECRET_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"];

/// A named endpoint of the team (`[[endpoints]]`): a base URL, headers, a
/// timeout and the settings of its circuit breaker, shared by every step
/// that names it.
///
/// ```toml
/// [[endpoints]]
/// name = "tasks"
/// url = "https://tasks.example.org/api"
/// headers = { Authorization = { env = "TASKS_TOKEN" }, "X-Source" = "wardcall" }
/// ```
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Unique name (letters, digits, `-`, `_`): what steps name, and the
    /// breaker's and the counts' key in the database.
    pub name: String,
    /// Base URL, `http://` or `https://` with a host; a step's `path` is
    /// appended to it.
    pub url: String,
    /// Headers sent with every request: a literal string for a header that is
    /// no secret, `{ env = "VAR" }` or `{ file = "path" }` (first line) for a
    /// secret. Default: none.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderSource>,
    /// Milliseconds a request may take (connect, send, whole response),
    /// 100..=300000. Default 10000. A step may override it.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive failures (transport errors, timeouts, 5xx, 429) that open
    /// the breaker, 1..=1000. Default 5.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Milliseconds an open breaker stays open before one probe request is
    /// let through, 100..=86400000. Default 30000.
    #[serde(default = "default_cooldown_ms")]
    pub cooldown_ms: u64,
    /// Statuses that count as success. Default `["200-299"]`. Items are a
    /// status (`204`) or a range (`"200-299"`). A step may override it.
    #[serde(default)]
    pub success: StatusSet,
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_failure_threshold() -> u32 {
    DEFAULT_FAILURE_THRESHOLD
}
fn default_cooldown_ms() -> u64 {
    DEFAULT_COOLDOWN_MS
}

/// Where a header's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderSource {
    /// A literal value in the config: for headers that are no secret.
    Literal(String),
    /// The value of an environment variable, read at start (a secret).
    Env(String),
    /// The first line of a file, read at start (a secret).
    File(PathBuf),
}

impl Serialize for HeaderSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            HeaderSource::Literal(v) => s.serialize_str(v),
            HeaderSource::Env(v) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("env", v)?;
                m.end()
            }
            HeaderSource::File(p) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("file", p)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for HeaderSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HeaderSource;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, { env = \"VAR\" } or { file = \"path\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HeaderSource, E> {
                Ok(HeaderSource::Literal(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HeaderSource, A::Error> {
                let mut found: Option<HeaderSource> = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    let source = match key.as_str() {
                        "env" => HeaderSource::Env(value),
                        "file" => HeaderSource::File(PathBuf::from(value)),
                        other => return Err(de::Error::unknown_field(other, &["env", "file"])),
                    };
                    if found.is_some() {
                        return Err(de::Error::custom("give either env or file, not both"));
                    }
                    found = Some(source);
                }
                found.ok_or_else(|| de::Error::custom("expected { env = \"VAR\" } or { file = \"path\" }"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A set of HTTP statuses: single statuses and inclusive ranges. In TOML, a
/// list whose items are a status (`204`) or a range string (`"200-299"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet(Vec<(u16, u16)>);

impl Default for StatusSet {
    /// 200..=299.
    fn default() -> Self {
        StatusSet(vec![(200, 299)])
    }
}

impl StatusSet {
    /// A set of these inclusive ranges.
    pub fn new(ranges: Vec<(u16, u16)>) -> StatusSet {
        StatusSet(ranges)
    }

    /// Whether `status` is in the set.
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }

    /// Checks every range lies within 100..=599 and is not empty; the problem otherwise.
    pub fn check(&self) -> Result<(), String> {
        if self.0.is_empty() {
            return Err("lists no status".into());
        }
        for (lo, hi) in &self.0 {
            if *lo < 100 || *hi > 599 || lo > hi {
                return Err(format!("{lo}-{hi} is not a status or range within 100-599"));
            }
        }
        Ok(())
    }
}

impl Serialize for StatusSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let items: Vec<String> = self.0.iter().map(|(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") }).collect();
        items.serialize(s)
    }
}

impl<'de> Deserialize<'de> for StatusSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Item {
            One(u16),
            Range(String),
        }
        let items = Vec::<Item>::deserialize(d)?;
        let mut ranges = Vec::new();
        for item in items {
            ranges.push(match item {
                Item::One(s) => (s, s),
                Item::Range(r) => {
                    let parse = |t: &str| t.trim().parse::<u16>().map_err(|_| de::Error::custom(format!("'{r}' is not a status or a range like \"200-299\"")));
                    match r.split_once('-') {
                        Some((lo, hi)) => (parse(lo)?, parse(hi)?),
                        None => {
                            let s = parse(&r)?;
                            (s, s)
                        }
                    }
                }
            });
        }
        Ok(StatusSet(ranges))
    }
}

/// The HTTP methods an `http` step may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    /// The method's name, e.g. `POST`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    /// The `reqwest` method.
    pub fn to_reqwest(self) -> reqwest::Method {
        match self {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            Method::Patch => reqwest::Method::PATCH,
            Method::Delete => reqwest::Method::DELETE,
        }
    }
}

/// Retry of an `http` step: at most `max_attempts` requests (the first
/// included), waiting [`super::backoff_ms`] between them: `base_ms` doubled
/// per failed attempt, capped at `max_ms`, with jitter (half fixed, half
/// random). A wait for an open breaker is not an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Requests at most, the first included, 1..=1000. Default 5.
    pub max_attempts: u32,
    /// Delay after the first failure in milliseconds, before jitter, 1..=3600000. Default 1000.
    pub base_ms: u64,
    /// Longest delay in milliseconds, before jitter, `base_ms`..=86400000. Default 60000.
    pub max_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { max_attempts: DEFAULT_MAX_ATTEMPTS, base_ms: DEFAULT_BASE_MS, max_ms: DEFAULT_MAX_MS }
    }
}

/// What one `http` step says. Templates (`path`, the string values of
/// `body`) are rendered by the workflow, which then builds a
/// [`super::Request`] (see [`super::Request::new`]).
///
/// ```toml
/// http = { endpoint = "tasks", method = "POST", path = "/tasks/{booking_id}", body = { name = "followup-{booking_id}" } }
/// ```
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpStepConfig {
    /// The `[[endpoints]]` name.
    pub endpoint: String,
    /// `GET`, `POST`, `PUT`, `PATCH` or `DELETE`. Default `POST`.
    #[serde(default = "default_method")]
    pub method: Method,
    /// Appended to the endpoint's URL (a template with `{placeholders}`). Default empty.
    #[serde(default)]
    pub path: String,
    /// The JSON body: a table (a JSON object) whose string values may hold
    /// `{placeholders}`. Default: no body.
    pub body: Option<serde_json::Map<String, serde_json::Value>>,
    /// Statuses that count as success, instead of the endpoint's.
    pub success: Option<StatusSet>,
    /// Milliseconds the request may take, instead of the endpoint's `timeout_ms`.
    pub timeout_ms: Option<u64>,
    /// Attempts and backoff. Defaults: 5 attempts, 1000 ms doubling to 60000 ms.
    #[serde(default)]
    pub retry: RetryConfig,
}

fn default_method() -> Method {
    Method::Post
}

impl HttpStepConfig {
    /// Checks the step against the configured endpoints. `key` is the step's
    /// key path (e.g. `workflows[0].steps[2].http`). Errors: `(key, problem)`,
    /// the key naming the offending field.
    pub fn check(&self, key: &str, endpoints: &[EndpointConfig]) -> Result<(), (String, String)> {
        if !endpoints.iter().any(|e| e.name == self.endpoint) {
            let mut known: Vec<&str> = endpoints.iter().map(|e| e.name.as_str()).collect();
            known.sort_unstable();
            let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            return Err((format!("{key}.endpoint"), format!("unknown endpoint '{}' (known: {known})", self.endpoint)));
        }
        if self.path.contains(['\r', '\n', '#']) {
            return Err((format!("{key}.path"), "must not contain a line break or '#'".into()));
        }
        if let Some(s) = &self.success {
            s.check().map_err(|p| (format!("{key}.success"), p))?;
        }
        if let Some(t) = self.timeout_ms {
            range(&format!("{key}.timeout_ms"), t, limits::TIMEOUT_MS)?;
        }
        let r = &self.retry;
        range(&format!("{key}.retry.max_attempts"), r.max_attempts as u64, (limits::MAX_ATTEMPTS.0 as u64, limits::MAX_ATTEMPTS.1 as u64))?;
        range(&format!("{key}.retry.base_ms"), r.base_ms, limits::BASE_MS)?;
        range(&format!("{key}.retry.max_ms"), r.max_ms, (r.base_ms.max(limits::MAX_MS.0), limits::MAX_MS.1))?;
        Ok(())
    }
}

fn range(key: &str, v: u64, (lo, hi): (u64, u64)) -> Result<(), (String, String)> {
    if v < lo || v > hi {
        Err((key.to_string(), format!("{v} is out of range {lo}..={hi}")))
    } else {
        Ok(())
    }
}

/// Checks `[[endpoints]]` at load (no secret is read here): unique names,
/// http(s) URLs with a host and no query or fragment, header names and
/// literal values that are valid in HTTP, no literal value for a secret
/// header ([`SECRET_HEADERS`]) or a header wardcall sets ([`RESERVED_HEADERS`]),
/// variable names, and ranges. Errors: `(key, problem)`, e.g.
/// `("endpoints[0].headers.Authorization", "…")`.
pub fn check_endpoints(endpoints: &[EndpointConfig]) -> Result<(), (String, String)> {
    let mut names = std::collections::HashSet::new();
    for (i, e) in endpoints.iter().enumerate() {
        let key = |k: &str| format!("endpoints[{i}].{k}");
        if e.name.is_empty() || e.name.len() > 63 || !e.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err((key("name"), format!("'{}' must be letters, digits, '-' or '_'", e.name)));
        }
        if !names.insert(e.name.as_str()) {
            return Err((key("name"), format!("duplicate endpoint '{}'", e.name)));
        }
        match url::Url::parse(&e.url) {
            Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {
                if u.query().is_some() || u.fragment().is_some() {
                    return Err((key("url"), format!("'{}' must not have a query or a fragment", e.url)));
                }
                if !u.username().is_empty() || u.password().is_some() {
                    return Err((key("url"), "must not carry credentials: put them in a header from { env = \"VAR\" } or { file = \"path\" }".into()));
                }
            }
            _ => return Err((key("url"), format!("'{}' is not an absolute http(s) URL with a host", e.url))),
        }
        for (name, source) in &e.headers {
            let hkey = key(&format!("headers.{name}"));
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err((hkey, "is not a valid HTTP header name".into()));
            }
            let lower = name.to_ascii_lowercase();
            if RESERVED_HEADERS.contains(&lower.as_str()) {
                return Err((hkey, "is set by wardcall itself and may not be configured".into()));
            }
            match source {
                HeaderSource::Literal(v) => {
                    if SECRET_HEADERS.contains(&lower.as_str()) {
                        return Err((hkey, "holds a secret, which never belongs in the config file: use { env = \"VAR\" } or { file = \"path\" }".into()));
                    }
                    if reqwest::header::HeaderValue::from_str(v).is_err() {
                        return Err((hkey, "is not a valid HTTP header value (visible ASCII, no line breaks)".into()));
                    }
                }
                HeaderSource::Env(var) => {
                    if var.is_empty() || var.contains(['=', '\0']) {
                        return Err((hkey, format!("'{}' is not an environment variable name", var.escape_default())));
                    }
                }
                HeaderSource::File(p) => {
                    if p.as_os_str().is_empty() {
                        return Err((hkey, "names no file".into()));
                    }
                }
            }
        }
        range(&key("timeout_ms"), e.timeout_ms, limits::TIMEOUT_MS)?;
        range(&key("failure_threshold"), e.failure_threshold as u64, (limits::FAILURE_THRESHOLD.0 as u64, limits::FAILURE_THRESHOLD.1 as u64))?;
        range(&key("cooldown_ms"), e.cooldown_ms, limits::COOLDOWN_MS)?;
        e.success.check().map_err(|p| (key("success"), p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Wrap {
        endpoints: Vec<EndpointConfig>,
    }

    fn parse(text: &str) -> Vec<EndpointConfig> {
        toml::from_str::<Wrap>(text).unwrap().endpoints
    }

    #[test]
    fn defaults_and_header_sources() {
        let e = parse(
            "[[endpoints]]\nname = \"tasks\"\nurl = \"http://127.0.0.1:9/api\"\nheaders = { Authorization = { env = \"TOKEN\" }, \"X-Source\" = \"wardcall\", \"X-Key\" = { file = \"/run/k\" } }\n",
        );
        assert_eq!(e[0].timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(e[0].failure_threshold, 5);
        assert_eq!(e[0].cooldown_ms, 30_000);
        assert!(e[0].success.contains(200) && e[0].success.contains(299) && !e[0].success.contains(300));
        assert_eq!(e[0].headers["Authorization"], HeaderSource::Env("TOKEN".into()));
        assert_eq!(e[0].headers["X-Source"], HeaderSource::Literal("wardcall".into()));
        assert_eq!(e[0].headers["X-Key"], HeaderSource::File("/run/k".into()));
        check_endpoints(&e).unwrap();
        let v = serde_json::to_value(&e[0]).unwrap();
        assert_eq!(v["success"], serde_json::json!(["200-299"]));
        assert_eq!(v["headers"]["Authorization"], serde_json::json!({"env": "TOKEN"}));
    }

    #[test]
    fn a_literal_secret_header_is_refused_naming_the_key() {
        let e = parse("[[endpoints]]\nname = \"t\"\nurl = \"https://x.example\"\nheaders = { Authorization = \"Bearer abc\" }\n");
        let (key, problem) = check_endpoints(&e).unwrap_err();
        assert_eq!(key, "endpoints[0].headers.Authorization");
        assert!(problem.contains("env") && !problem.contains("abc"), "{problem}");
    }

    #[test]
    fn bad_urls_and_statuses_are_refused() {
        let e = parse("[[endpoints]]\nname = \"t\"\nurl = \"ftp://x\"\n");
        assert_eq!(check_endpoints(&e).unwrap_err().0, "endpoints[0].url");
        let e = parse("[[endpoints]]\nname = \"t\"\nurl = \"https://u:p@x.example\"\n");
        assert_eq!(check_endpoints(&e).unwrap_err().0, "endpoints[0].url");
        let e = parse("[[endpoints]]\nname = \"t\"\nurl = \"https://x.example\"\nsuccess = [204, \"300-200\"]\n");
        assert_eq!(check_endpoints(&e).unwrap_err().0, "endpoints[0].success");
        assert!(toml::from_str::<Wrap>("[[endpoints]]\nname = \"t\"\nurl = \"https://x\"\nheaders = { A = { envv = \"X\" } }\n").is_err());
    }

    #[test]
    fn step_defaults_and_checks() {
        let s: HttpStepConfig = toml::from_str("endpoint = \"tasks\"\n").unwrap();
        assert_eq!(s.method, Method::Post);
        assert!(s.body.is_none() && s.success.is_none() && s.timeout_ms.is_none() && s.path.is_empty());
        let b: HttpStepConfig = toml::from_str("endpoint = \"tasks\"\nbody = { name = \"followup-{booking_id}\", n = 2, tags = [\"a\"] }\n").unwrap();
        assert_eq!(serde_json::Value::Object(b.body.unwrap()), serde_json::json!({"name": "followup-{booking_id}", "n": 2, "tags": ["a"]}));
        assert_eq!(s.retry, RetryConfig { max_attempts: 5, base_ms: 1000, max_ms: 60_000 });
        let eps = parse("[[endpoints]]\nname = \"tasks\"\nurl = \"https://x.example\"\n");
        s.check("workflows[0].steps[1].http", &eps).unwrap();
        let bad: HttpStepConfig = toml::from_str("endpoint = \"nope\"\n").unwrap();
        assert_eq!(bad.check("w.http", &eps).unwrap_err().0, "w.http.endpoint");
        let bad: HttpStepConfig = toml::from_str("endpoint = \"tasks\"\nretry = { base_ms = 5000, max_ms = 10 }\n").unwrap();
        assert_eq!(bad.check("w.http", &eps).unwrap_err().0, "w.http.retry.max_ms");
        assert!(toml::from_str::<HttpStepConfig>("endpoint = \"tasks\"\nmethod = \"TRACE\"\n").is_err());
    }
}
