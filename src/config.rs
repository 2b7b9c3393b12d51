//! Configuration: one TOML file (optional), validated completely before wardcall
//! starts. Every error names the file, the key and what is wrong; wardcall refuses
//! to start rather than guess.
//!
//! Secrets never live in the file: the Twilio auth token comes from an
//! environment variable (default `TWILIO_AUTH_TOKEN`) or a file named in the config.
//! The reference of every key is in README.md ("Configuration reference").

pub use crate::workflows::model::{CancelOn, OnDuplicate};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("config error in {file}: {key}: {problem}")]
pub struct ConfigError {
    /// The file the key comes from (or `<defaults>`/`<environment>`).
    pub file: String,
    /// Dotted key path, e.g. `people[1].phone`.
    pub key: String,
    /// What is wrong and, where possible, what is expected instead.
    pub problem: String,
}

/// The whole configuration. All fields have documented defaults, so an absent
/// config file is a valid (empty) configuration.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `postgres://…` URL of an existing server. When absent (and `DATABASE_URL`
    /// is unset) wardcall runs its own embedded cluster in `data_dir`.
    pub database_url: Option<String>,
    /// Directory of the embedded cluster. Default `.wardcall` (relative to the
    /// current directory).
    pub data_dir: Option<PathBuf>,
    /// Database name inside the embedded cluster. Default `wardcall`.
    pub database: Option<String>,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub providers: ProvidersConfig,
    #[serde(default)]
    pub people: Vec<Person>,
    #[serde(default)]
    pub policies: Vec<Policy>,
    #[serde(default)]
    pub sources: Vec<Source>,
    #[serde(default)]
    pub workflows: Vec<Workflow>,
    /// The team's HTTP endpoints that `http` steps name (`[[endpoints]]`,
    /// see [`crate::outbound`]). Default: none. An endpoint no step names is fine.
    #[serde(default)]
    pub endpoints: Vec<crate::outbound::EndpointConfig>,
    /// True when this configuration was read from a file (or text).
    #[serde(skip)]
    pub from_file: bool,
    /// The file this configuration was read from, for error messages
    /// (`<defaults>` when none was read).
    #[serde(skip)]
    pub file: Option<String>,
    /// Not a config key: set by `wardcall migrate --prune` / `serve --prune`.
    /// Only then are the capture triggers of sources absent from this config
    /// (installed by another config) removed; otherwise they are kept and
    /// named in a warning.
    #[serde(skip)]
    pub prune_sources: bool,
}

/// Default `data_dir` of the embedded cluster (relative to the current directory).
pub const DEFAULT_DATA_DIR: &str = ".wardcall";
/// Default database name inside the embedded cluster.
pub const DEFAULT_DATABASE: &str = "wardcall";
/// Default environment variable holding the Twilio auth token.
pub const DEFAULT_TWILIO_TOKEN_ENV: &str = "TWILIO_AUTH_TOKEN";

/// Allowed ranges of the numeric keys, checked at load (inclusive bounds).
/// README.md "Configuration reference" documents them.
pub mod limits {
    /// `engine.workers`: concurrent steps of one process.
    pub const WORKERS: (usize, usize) = (1, 1024);
    /// `engine.lease_ms`.
    pub const LEASE_MS: (u64, u64) = (500, 600_000);
    /// `engine.sweep_ms`: at most 1 s, the bound on a lost NOTIFY's delay.
    pub const SWEEP_MS: (u64, u64) = (10, 1000);
    /// `engine.poll_ms`.
    pub const POLL_MS: (u64, u64) = (10, 10_000);
    /// `engine.pool_size`: also checked at start against the server's
    /// `max_connections` (minus its reserved connections, minus one for the listener).
    pub const POOL_SIZE: (u32, u32) = (2, 1000);
    /// `engine.webhook_pool_size`: also counted in the start-up check against `max_connections`.
    pub const WEBHOOK_POOL_SIZE: (u32, u32) = (1, 100);
    /// `engine.team_read_pool_size`: also counted in the start-up check against `max_connections`.
    pub const TEAM_READ_POOL_SIZE: (u32, u32) = (1, 100);
    /// `workflows[].max_attempts`.
    pub const MAX_ATTEMPTS: (u32, u32) = (1, 1000);
    /// `workflows[].retry_base_ms`.
    pub const RETRY_BASE_MS: (u64, u64) = (1, 3_600_000);
    /// `workflows[].retry_max_ms` (and at least `retry_base_ms`).
    pub const RETRY_MAX_MS: (u64, u64) = (1, 86_400_000);
    /// `providers.twilio.gather_timeout_seconds`.
    pub const GATHER_TIMEOUT_SECONDS: (u32, u32) = (1, 60);
    /// `policies[].repeat`.
    pub const REPEAT: (u32, u32) = (1, 100);
    /// `policies[].steps[].ack_timeout_seconds`.
    pub const ACK_TIMEOUT_SECONDS: (f64, f64) = (0.1, 86_400.0);
}

/// Runtime tuning. Durations are in milliseconds unless the key says otherwise.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Concurrent steps this process executes. Default 128 (a run waiting
    /// for its group commit holds no connection; non-critical steps' own
    /// commit transactions hold at most half of `pool_size`).
    pub workers: usize,
    /// Lease on a claimed run, in milliseconds. Default 5000. Renewed every third of it.
    pub lease_ms: u64,
    /// Outbox sweep interval in milliseconds, at most 1000. Default 500.
    pub sweep_ms: u64,
    /// Idle poll interval for due runs in milliseconds. Default 250.
    pub poll_ms: u64,
    /// Connections in this process's pool. Default 20.
    pub pool_size: u32,
    /// Connections of the provider webhooks' own pool, besides `pool_size`.
    /// Default 4.
    pub webhook_pool_size: u32,
    /// Connections of the pool that runs an escalation's lookups
    /// (`crate::db::TeamReadPool`), besides `pool_size`. Default 4.
    pub team_read_pool_size: u32,
    /// Longest wait for a pooled connection (or a new one), in milliseconds,
    /// 100..=600000. Default 5000. On expiry the error carries PostgreSQL's own
    /// reason when the server refused the connection.
    pub acquire_timeout_ms: u64,
    /// `statement_timeout` of the engine's connections, in milliseconds,
    /// 100..=3600000. Default 10000. (PostgreSQL manual, 19.11.1 "Statement Behavior".)
    pub statement_timeout_ms: u64,
    /// `lock_timeout` of the engine's connections, in milliseconds,
    /// 10..=600000. Default 2000. (PostgreSQL manual, 19.11.1 "Statement Behavior".)
    pub lock_timeout_ms: u64,
    /// `random_page_cost` of the engine's connections (the planner's cost of
    /// a page read out of order, relative to one read in sequence), 0.1..=100.
    /// Default 1.1, PostgreSQL's advice for solid-state storage (its own
    /// default, 4, assumes spinning disks). With 4, and 1,000,000 runs in
    /// `wardcall.runs`, a run's first tier and its claim were planned again at
    /// every execution (about 1 ms each) instead of keeping their prepared
    /// plan (BENCHMARKS.md, "Issue 9, tenth session"). Set 4 on spinning
    /// disks. (PostgreSQL manual, 20.7.2 "Planner Cost Constants".)
    pub random_page_cost: f64,
    /// The longest the engine waits for PostgreSQL to answer a phase of one
    /// unit of its work (a dispatch, a claim, a group commit, a batch of
    /// first tiers or send records, a lease renewal, a wait's resolution, a
    /// step's commit with its work, a step's own transactions and reads:
    /// `runtime::Services::bounded`), in milliseconds, 1000..=7200000 and
    /// above `statement_timeout_ms`. Default 20000. A live server answers
    /// first (its `statement_timeout` cancels a slow statement; a batch of
    /// many statements on a very loaded server could take longer); past it the
    /// connection is presumed half-open (a hard failover) and is closed, and
    /// the work fails like any database error ([`crate::db::deadline`]).
    pub database_deadline_ms: u64,
    /// Listener heartbeat, in milliseconds, 100..=60000. Default 2000: after this
    /// long without traffic the listener sends `SELECT 1`, and a reply must come
    /// within this long, else the connection is dropped, reopened and the outbox drained.
    pub heartbeat_ms: u64,
}

impl EngineConfig {
    /// `database_deadline_ms` as a duration ([`crate::db::deadline`]).
    pub fn database_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.database_deadline_ms)
    }
}

/// Default of `engine.workers`: runs one process executes at once. Chosen
/// with `wardcall bench steps|timers|burst --workers N` (BENCHMARKS.md,
/// "Issue 9"): a run waiting for its group commit holds a worker's place but
/// no connection, so more runs in flight make larger batches.
pub const DEFAULT_WORKERS: usize = 128;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: DEFAULT_WORKERS,
            lease_ms: 5000,
            sweep_ms: 500,
            poll_ms: 250,
            pool_size: 20,
            webhook_pool_size: 4,
            team_read_pool_size: 4,
            acquire_timeout_ms: 5000,
            statement_timeout_ms: 10_000,
            lock_timeout_ms: 2000,
            heartbeat_ms: 2000,
            random_page_cost: 1.1,
            database_deadline_ms: 20_000,
        }
    }
}

/// The HTTP server that receives provider webhooks and serves the API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address, e.g. `0.0.0.0:8080`. Default `127.0.0.1:8080`; port 0 picks a free port.
    pub listen: String,
    /// The public base URL providers reach this server at (e.g. `https://wardcall.example.org`).
    /// Twilio signs the exact URL it calls, so this must be what Twilio sees.
    /// Default: `http://` + the listen address.
    pub public_url: Option<String>,
    /// A separate listener for the JSON API (`/api/*`), e.g. `127.0.0.1:8081`.
    /// Must be a loopback address and never published by a proxy. When set,
    /// the API is served only there. Default: none.
    pub api_listen: Option<String>,
    /// File holding the API's bearer token (first line, at least 16
    /// characters). `WARDCALL_API_TOKEN` takes precedence. Without a token
    /// and without `api_listen` the API is not served at all. Default: none.
    pub api_token_file: Option<PathBuf>,
    /// Milliseconds a client has to send a request's headers (an idle
    /// connection is closed after this too). Default 10000; 100..=120000.
    pub header_read_timeout_ms: u64,
    /// Milliseconds a client has to send a request's body. Default 10000; 100..=120000.
    pub body_read_timeout_ms: u64,
    /// Connections served at once per listener; more are closed on accept.
    /// Default 1024; 1..=65536 (keep it below the file descriptor limit).
    pub max_connections: usize,
    /// Largest request body in bytes (413 beyond). Default 65536; 1024..=16777216.
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            api_listen: None,
            api_token_file: None,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            max_connections: 1024,
            max_body_bytes: 64 * 1024,
        }
    }
}

impl HttpConfig {
    /// Checks `api_listen` (a loopback address), `api_token_file` (readable,
    /// a valid token) and the limits. Errors: `(key, problem)`.
    fn validate_api_and_limits(&self) -> Result<(), (String, String)> {
        if let Some(a) = &self.api_listen {
            match a.parse::<std::net::SocketAddr>() {
                Ok(addr) if addr.ip().is_loopback() => {}
                Ok(_) => {
                    return Err((
                        "http.api_listen".into(),
                        format!("'{a}' is not a loopback address (127.0.0.1:… or [::1]:…); the API listener must never be reachable from outside"),
                    ))
                }
                Err(_) => return Err(("http.api_listen".into(), format!("'{a}' is not an address like 127.0.0.1:8081"))),
            }
        }
        if let Some(p) = &self.api_token_file {
            crate::http::read_token_file(p).map_err(|problem| ("http.api_token_file".to_string(), problem))?;
        }
        let ms = |key: &str, v: u64| {
            if (100..=120_000).contains(&v) {
                Ok(())
            } else {
                Err((format!("http.{key}"), format!("{v} is out of range 100..=120000")))
            }
        };
        ms("header_read_timeout_ms", self.header_read_timeout_ms)?;
        ms("body_read_timeout_ms", self.body_read_timeout_ms)?;
        if !(1..=65_536).contains(&self.max_connections) {
            return Err(("http.max_connections".into(), format!("{} is out of range 1..=65536", self.max_connections)));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err(("http.max_body_bytes".into(), format!("{} is out of range 1024..=16777216", self.max_body_bytes)));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProvidersConfig {
    pub twilio: Option<TwilioConfig>,
}

/// Twilio Programmable Voice account.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioConfig {
    /// Account SID, `AC` + 32 hex digits.
    pub account_sid: String,
    /// Caller ID for outgoing calls (E.164): a Twilio number of the account.
    pub from: String,
    /// REST API base. Default `https://api.twilio.com`; point it at `wardcall emulate twilio` offline.
    #[serde(default = "default_twilio_api_base")]
    pub api_base: String,
    /// Environment variable holding the auth token. Default `TWILIO_AUTH_TOKEN`
    /// ([`DEFAULT_TWILIO_TOKEN_ENV`]). The token is resolved before wardcall
    /// touches the database; a missing one stops `serve` naming the variable.
    pub auth_token_env: Option<String>,
    /// File holding the auth token (first line). Takes precedence over `auth_token_env`.
    pub auth_token_file: Option<PathBuf>,
    /// Enable answering-machine detection (voicemail is never an acknowledgement). Default true.
    #[serde(default = "yes")]
    pub machine_detection: bool,
    /// Seconds the callee has to press a key after the message starts. Default 10.
    #[serde(default = "default_gather_timeout")]
    pub gather_timeout_seconds: u32,
    /// Seconds a REST request to Twilio may take (connect, send, whole
    /// response) before it counts as an ambiguous failure that is reconciled
    /// with Twilio's call list before any call is placed again. Default 10.
    #[serde(default = "default_twilio_request_timeout")]
    pub request_timeout_seconds: f64,
    /// Most REST requests this process sends to the account at once; the
    /// others wait their turn in wardcall instead of being refused by Twilio
    /// with 429 / 20429 (the account's concurrency limit, 100 by default:
    /// <https://www.twilio.com/docs/api/errors/20429>). Default 50, 1–1000.
    /// With several engines, keep their sum under the account's limit.
    #[serde(default = "default_twilio_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
}

fn default_twilio_max_concurrent_requests() -> usize {
    crate::providers::twilio::client::DEFAULT_MAX_CONCURRENT_REQUESTS
}

fn default_twilio_request_timeout() -> f64 {
    10.0
}

fn default_twilio_api_base() -> String {
    "https://api.twilio.com".into()
}
fn yes() -> bool {
    true
}
fn default_gather_timeout() -> u32 {
    10
}

/// Someone who can be called.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Person {
    /// Identifier used in policies and in `acknowledged_by`.
    pub id: String,
    /// Display name (never logged).
    pub name: String,
    /// E.164 phone number, e.g. `+13855550101` (never logged in full).
    pub phone: String,
}

/// An escalation policy: ordered steps, repeated `repeat` times.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub id: String,
    /// How many times the whole list of steps runs before the alert is marked
    /// unacknowledged. Default 1.
    #[serde(default = "one")]
    pub repeat: u32,
    pub steps: Vec<PolicyStep>,
}

fn one() -> u32 {
    1
}

/// One escalation step (a tier): call its recipients at once, wait for an
/// acknowledgement. Who is called: `notify` (`[[people]]` ids) and/or
/// `recipients` (a SQL query over the team's tables, run when the tier runs;
/// see [`crate::notify::recipients`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyStep {
    /// Who to call in parallel: keys `notify` and `recipients`.
    #[serde(flatten)]
    pub who: crate::notify::recipients::RecipientsSpec,
    /// Seconds to wait for an acknowledgement before escalating. Default 30.
    /// May be fractional (demo and tests use short timeouts).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_seconds: f64,
    /// When a person's call fails (busy, no answer, failed, voicemail, or
    /// ended without a key), text them the alert at once (to the same
    /// number), acknowledgeable by replying `1`. The step still waits its
    /// `ack_timeout_seconds` while a text can be answered. Default false.
    #[serde(default)]
    pub sms_fallback: bool,
}

fn default_ack_timeout() -> f64 {
    30.0
}

/// Database operation a source captures.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    Insert,
    Update,
}

/// Capture from one of the team's own tables.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Unique name (letters, digits, `_`); names the trigger.
    pub name: String,
    /// Table, optionally schema-qualified: `alerts` or `public.alerts`.
    pub table: String,
    /// Operations captured. Default `["INSERT"]`.
    #[serde(default = "default_operations")]
    pub operations: Vec<Operation>,
    /// SQL boolean over `NEW` (and `OLD` for UPDATE). Default: every row.
    pub condition: Option<String>,
    /// Event name written to the outbox.
    pub event: String,
    /// SQL expression over `NEW`/`OLD` giving the jsonb payload. Default `to_jsonb(NEW)`.
    pub payload: Option<String>,
}

fn default_operations() -> Vec<Operation> {
    vec![Operation::Insert]
}

/// What runs when an event arrives: a list of steps (the workflow model,
/// [`crate::workflows::model`]), or one of the two shorthands: `kind =
/// "escalation"` (one `escalate` step from this table's `policy`, `message`,
/// `lookups` and `write_back`) and `kind = "script"` (steps from the event
/// payload, for tests and for checking a deployment end to end).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Unique name; stored in `wardcall.runs.workflow`.
    pub name: String,
    /// Event that starts a run.
    pub event: String,
    /// `steps` (the default), `escalation` or `script`.
    #[serde(default)]
    pub kind: WorkflowKind,
    /// `kind = "escalation"` only: the escalation policy id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `kind = "escalation"` only: the spoken message template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `kind = "escalation"` only: values looked up for the message.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub lookups: HashMap<String, String>,
    /// `kind = "escalation"` only: write-back statements.
    #[serde(default, skip_serializing_if = "WriteBack::is_empty")]
    pub write_back: WriteBack,
    /// SQL boolean over `payload` (the event's jsonb payload): an event for
    /// which it is false starts nothing. Evaluated when the event is
    /// dispatched. Default: every event.
    pub when: Option<String>,
    /// Template over the payload giving the run's key (e.g. `"{id}"`): at most
    /// one live run per key. Default: no key.
    pub key: Option<String>,
    /// What a second event with the key of a live run does. Default `skip`.
    #[serde(default)]
    pub on_duplicate: crate::workflows::model::OnDuplicate,
    /// Events that cancel the live run with the same key (its `on_cancel` runs).
    #[serde(default)]
    pub cancel_on: Vec<crate::workflows::model::CancelOn>,
    /// The steps, in order.
    #[serde(default)]
    pub steps: Vec<crate::workflows::model::StepConfig>,
    /// Steps run once after the last step.
    #[serde(default)]
    pub on_complete: Vec<crate::workflows::model::StepConfig>,
    /// Steps run once when a step has failed for good (after its last retry:
    /// the dead letter); the run then ends `failed` with the error kept.
    #[serde(default)]
    pub on_failure: Vec<crate::workflows::model::StepConfig>,
    /// Steps run once when the run is cancelled (`cancel_on`, API, CLI).
    #[serde(default)]
    pub on_cancel: Vec<crate::workflows::model::StepConfig>,
    /// Claimed and dispatched before any other work (DESIGN.md invariant 10).
    /// Default: true when the workflow escalates (it pages people), else false.
    #[serde(default)]
    pub critical: bool,
    /// Retries of a failing step before the run is dead-lettered (status `failed`). Default 5.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles each attempt, with jitter. Default 1000.
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    /// Longest retry delay in milliseconds. Default 300000 (5 min).
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
}

fn default_max_attempts() -> u32 {
    5
}
fn default_retry_base_ms() -> u64 {
    1000
}
fn default_retry_max_ms() -> u64 {
    300_000
}

/// The forms a workflow is written in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowKind {
    /// A list of steps (`[[workflows.steps]]`).
    #[default]
    Steps,
    /// Shorthand for one `escalate` step: call people by an escalation policy
    /// until someone acknowledges.
    Escalation,
    /// A scripted sequence of runtime primitives read from the event payload's
    /// `steps` array (step, sleep, wait, fail): used by the demo's first part,
    /// by operators to test a deployment, and by the test suite.
    Script,
}

impl Workflow {
    /// A `script` workflow named `name` bound to `event`, with default retries.
    pub fn script(name: &str, event: &str) -> Workflow {
        Workflow {
            name: name.into(),
            event: event.into(),
            kind: WorkflowKind::Script,
            policy: None,
            message: None,
            lookups: HashMap::new(),
            write_back: WriteBack::default(),
            when: None,
            key: None,
            on_duplicate: Default::default(),
            cancel_on: Vec::new(),
            steps: Vec::new(),
            on_complete: Vec::new(),
            on_failure: Vec::new(),
            on_cancel: Vec::new(),
            critical: false,
            max_attempts: default_max_attempts(),
            retry_base_ms: default_retry_base_ms(),
            retry_max_ms: default_retry_max_ms(),
        }
    }

    /// The settings of the workflow's `escalate` step (the first one), if it escalates.
    pub fn escalation(&self) -> Option<&EscalationWorkflow> {
        self.all_steps().find_map(|(_, _, s)| s.escalate.as_deref())
    }

    /// The same, mutable (tests and tooling adjust a loaded config).
    pub fn escalation_mut(&mut self) -> Option<&mut EscalationWorkflow> {
        self.steps
            .iter_mut()
            .chain(self.on_complete.iter_mut())
            .chain(self.on_failure.iter_mut())
            .chain(self.on_cancel.iter_mut())
            .find_map(|s| s.escalate.as_deref_mut())
    }

    /// Every step with its phase and index.
    pub fn all_steps(&self) -> impl Iterator<Item = (crate::workflows::model::Phase, usize, &crate::workflows::model::StepConfig)> {
        use crate::workflows::model::Phase;
        [(Phase::Main, &self.steps), (Phase::OnComplete, &self.on_complete), (Phase::OnFailure, &self.on_failure), (Phase::OnCancel, &self.on_cancel)]
            .into_iter()
            .flat_map(|(phase, list)| list.iter().enumerate().map(move |(i, s)| (phase, i, s)))
    }

    /// The steps of `phase`.
    pub fn phase_steps(&self, phase: crate::workflows::model::Phase) -> &[crate::workflows::model::StepConfig] {
        use crate::workflows::model::Phase;
        match phase {
            Phase::Main => &self.steps,
            Phase::OnComplete => &self.on_complete,
            Phase::OnFailure => &self.on_failure,
            Phase::OnCancel => &self.on_cancel,
        }
    }

    /// The config key of a step, for errors: `workflows[i].steps[j]`, or
    /// `workflows[i]` for the escalation shorthand's step.
    pub fn step_key(&self, index: usize, phase: crate::workflows::model::Phase, j: usize) -> String {
        if self.kind == WorkflowKind::Escalation {
            format!("workflows[{index}]")
        } else {
            format!("workflows[{index}].{}[{j}]", phase.as_str())
        }
    }

    /// Turns the `escalation` shorthand into its one `escalate` step.
    fn normalize(&mut self) {
        if self.kind == WorkflowKind::Escalation && self.steps.is_empty() {
            let esc = EscalationWorkflow {
                policy: self.policy.clone().unwrap_or_default(),
                message: self.message.clone().unwrap_or_default(),
                lookups: std::mem::take(&mut self.lookups),
                write_back: std::mem::take(&mut self.write_back),
            };
            self.steps.push(crate::workflows::model::StepConfig { escalate: Some(Box::new(esc)), ..Default::default() });
        }
    }
}

/// Settings of an escalation workflow.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationWorkflow {
    /// Escalation policy id.
    pub policy: String,
    /// Spoken message. `{name}` is replaced by the payload's field `name` or a
    /// lookup's result; `{{` and `}}` are literal braces. Unknown names render empty.
    pub message: String,
    /// Extra values looked up in the team's tables. Each is a SQL query taking
    /// the event payload as `$1` (jsonb) and returning one text column (first row).
    #[serde(default)]
    pub lookups: HashMap<String, String>,
    /// SQL run at points of the alert's life, each with `$1` = event payload (jsonb)
    /// and `$2` = details (jsonb: phone_number, call_status, call_id, message,
    /// initiated_at, answered_at, acknowledged_at, acknowledged_by, person_id).
    #[serde(default)]
    pub write_back: WriteBack,
}

/// Write-back statements into the team's own tables. Each runs in a savepoint:
/// a failing statement is audited and logged but never undoes the state change.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WriteBack {
    pub on_call_placed: Option<String>,
    pub on_call_status: Option<String>,
    pub on_acknowledged: Option<String>,
    pub on_escalated: Option<String>,
    pub on_unacknowledged: Option<String>,
    /// Runs when the alert's run is cancelled (API, CLI, SQL); `$2` is the
    /// alert's details (`alert_status = 'cancelled'`).
    pub on_cancelled: Option<String>,
}

impl WriteBack {
    /// True when no hook is set.
    pub fn is_empty(&self) -> bool {
        self.hooks().iter().all(|(_, s)| s.is_none())
    }

    /// Every hook as (key, statement), for the checks at load and against
    /// the schema at start. The exhaustive destructuring makes a new hook
    /// field a compile error here until it is listed (and so checked).
    pub fn hooks(&self) -> Vec<(&'static str, Option<&str>)> {
        let WriteBack { on_call_placed, on_call_status, on_acknowledged, on_escalated, on_unacknowledged, on_cancelled } = self;
        vec![
            ("on_call_placed", on_call_placed.as_deref()),
            ("on_call_status", on_call_status.as_deref()),
            ("on_acknowledged", on_acknowledged.as_deref()),
            ("on_escalated", on_escalated.as_deref()),
            ("on_unacknowledged", on_unacknowledged.as_deref()),
            ("on_cancelled", on_cancelled.as_deref()),
        ]
    }
}

impl Config {
    /// Loads and validates `path`, or the defaults when `path` is `None`.
    /// `DATABASE_URL` in the environment overrides an absent `database_url`.
    ///
    /// Errors: the file cannot be read, is not TOML, has an unknown key or a bad
    /// value — each as a [`ConfigError`] naming file, key and problem.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (file, mut config) = match path {
            None => ("<defaults>".to_string(), Config::default()),
            Some(p) => {
                let file = p.display().to_string();
                let text =
                    std::fs::read_to_string(p).map_err(|e| ConfigError { file: file.clone(), key: "(file)".into(), problem: format!("cannot read: {e}") })?;
                (file.clone(), Config::parse(&text, &file)?)
            }
        };
        if config.database_url.is_none() {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                if !url.trim().is_empty() {
                    config.database_url = Some(url);
                }
            }
        }
        config.validate(&file)?;
        Ok(config)
    }

    /// Parses TOML text without reading the environment (then call [`Config::validate`]).
    ///
    /// Errors name the key path (e.g. `engine.workers (line 3)`), found with
    /// `serde_path_to_error`, because `toml`'s own error gives only a position;
    /// an unknown key (`workflows[0].colour`) is refused everywhere. The
    /// `escalation` shorthand is turned into its `escalate` step here.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let key = match (path.as_str(), line) {
                ("." | "", Some(l)) => format!("line {l}"),
                ("." | "", None) => "(document)".into(),
                (p, Some(l)) => format!("{p} (line {l})"),
                (p, None) => p.to_string(),
            };
            ConfigError { file: file.into(), key, problem: inner.message().to_string() }
        })?;
        config.from_file = true;
        config.file = Some(file.to_string());
        for w in &mut config.workflows {
            w.normalize();
        }
        Ok(config)
    }

    /// The file this configuration came from, for messages (`<defaults>` if none).
    pub fn file_name(&self) -> &str {
        self.file.as_deref().unwrap_or("<defaults>")
    }

    /// Checks every cross-reference and value. Errors name `file` and the key.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |key: String, problem: String| ConfigError { file: file.into(), key, problem };
        if let Some(url) = &self.database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(err("database_url".into(), "must start with postgres:// or postgresql://".into()));
            }
        }
        let e = &self.engine;
        let range = |key: &str, v: u64, (lo, hi): (u64, u64)| {
            if v < lo || v > hi {
                Err(err(key.into(), format!("{v} is out of range {lo}..={hi}")))
            } else {
                Ok(())
            }
        };
        range("engine.workers", e.workers as u64, (limits::WORKERS.0 as u64, limits::WORKERS.1 as u64))?;
        range("engine.lease_ms", e.lease_ms, limits::LEASE_MS)?;
        range("engine.sweep_ms", e.sweep_ms, limits::SWEEP_MS)?;
        range("engine.poll_ms", e.poll_ms, limits::POLL_MS)?;
        range("engine.pool_size", e.pool_size as u64, (limits::POOL_SIZE.0 as u64, limits::POOL_SIZE.1 as u64))?;
        range("engine.webhook_pool_size", e.webhook_pool_size as u64, (limits::WEBHOOK_POOL_SIZE.0 as u64, limits::WEBHOOK_POOL_SIZE.1 as u64))?;
        range("engine.team_read_pool_size", e.team_read_pool_size as u64, (limits::TEAM_READ_POOL_SIZE.0 as u64, limits::TEAM_READ_POOL_SIZE.1 as u64))?;
        if !(0.1..=100.0).contains(&e.random_page_cost) {
            return Err(err("engine.random_page_cost".into(), format!("{} is out of range 0.1..=100", e.random_page_cost)));
        }
        for (key, v, lo, hi) in [
            ("engine.acquire_timeout_ms", e.acquire_timeout_ms, 100, 600_000),
            ("engine.statement_timeout_ms", e.statement_timeout_ms, 100, 3_600_000),
            ("engine.lock_timeout_ms", e.lock_timeout_ms, 10, 600_000),
            ("engine.heartbeat_ms", e.heartbeat_ms, 100, 60_000),
            ("engine.database_deadline_ms", e.database_deadline_ms, 1000, 7_200_000),
        ] {
            range(key, v, (lo, hi))?;
        }
        if e.database_deadline_ms <= e.statement_timeout_ms {
            return Err(err(
                "engine.database_deadline_ms".into(),
                format!(
                    "{} must be above engine.statement_timeout_ms ({}): a live server's own timeout must answer before the engine gives a connection up as dead",
                    e.database_deadline_ms, e.statement_timeout_ms
                ),
            ));
        }
        let listen = match self.http.listen.parse::<std::net::SocketAddr>() {
            Ok(a) => a,
            Err(_) => return Err(err("http.listen".into(), format!("'{}' is not an address like 127.0.0.1:8080", self.http.listen))),
        };
        if let Err(problem) = self.http.validate_api_and_limits() {
            return Err(err(problem.0, problem.1));
        }
        if let Some(u) = &self.http.public_url {
            match url::Url::parse(u) {
                Ok(p) if (p.scheme() == "http" || p.scheme() == "https") && p.host().is_some() => {}
                _ => return Err(err("http.public_url".into(), format!("'{u}' is not an absolute http(s) URL"))),
            }
        } else if !listen.ip().is_loopback() {
            return Err(err(
                "http.listen".into(),
                format!(
                    "{listen} is not a loopback address and http.public_url is not set: provider callbacks would be sent to http://{listen}; \
                     set http.public_url to the URL providers reach this server at"
                ),
            ));
        }
        if let Some(t) = &self.providers.twilio {
            if !is_twilio_sid(&t.account_sid, "AC") {
                return Err(err("providers.twilio.account_sid".into(), "must be AC followed by 32 hex digits".into()));
            }
            if !is_e164(&t.from) {
                return Err(err("providers.twilio.from".into(), format!("{} is not an E.164 number (+ then 8 to 15 digits)", redact_phone(&t.from))));
            }
            match url::Url::parse(&t.api_base) {
                Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {}
                Ok(u) => {
                    return Err(err(
                        "providers.twilio.api_base".into(),
                        format!("'{}' is not an http(s) URL with a host (scheme '{}')", t.api_base, u.scheme()),
                    ))
                }
                Err(e) => return Err(err("providers.twilio.api_base".into(), format!("'{}' is not a URL: {e}", t.api_base))),
            }
            range(
                "providers.twilio.gather_timeout_seconds",
                t.gather_timeout_seconds as u64,
                (limits::GATHER_TIMEOUT_SECONDS.0 as u64, limits::GATHER_TIMEOUT_SECONDS.1 as u64),
            )?;
            if let Some(var) = &t.auth_token_env {
                if var.is_empty() || var.contains('=') || var.contains('\0') {
                    return Err(err("providers.twilio.auth_token_env".into(), "is not an environment variable name".into()));
                }
            }
            if !(0.5..=60.0).contains(&t.request_timeout_seconds) {
                return Err(err("providers.twilio.request_timeout_seconds".into(), "must be 0.5..=60".into()));
            }
            range("providers.twilio.max_concurrent_requests", t.max_concurrent_requests as u64, (1, 1000))?;
        }
        crate::outbound::check_endpoints(&self.endpoints).map_err(|(key, problem)| err(key, problem))?;
        let mut people = HashSet::new();
        for (i, p) in self.people.iter().enumerate() {
            if !is_identifier_like(&p.id) {
                return Err(err(format!("people[{i}].id"), format!("'{}' must be letters, digits, '-' or '_'", p.id)));
            }
            if !people.insert(p.id.as_str()) {
                return Err(err(format!("people[{i}].id"), format!("duplicate person id '{}'", p.id)));
            }
            if !is_e164(&p.phone) {
                return Err(err(
                    format!("people[{i}].phone"),
                    format!("{} is not an E.164 number (expected + then 8 to 15 digits, e.g. +13855550101)", redact_phone(&p.phone)),
                ));
            }
        }
        let mut policies = HashSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            if !policies.insert(p.id.as_str()) {
                return Err(err(format!("policies[{i}].id"), format!("duplicate policy id '{}'", p.id)));
            }
            if p.steps.is_empty() {
                return Err(err(format!("policies[{i}].steps"), "a policy needs at least one step".into()));
            }
            range(&format!("policies[{i}].repeat"), p.repeat as u64, (limits::REPEAT.0 as u64, limits::REPEAT.1 as u64))?;
            for (j, s) in p.steps.iter().enumerate() {
                if s.who.is_empty() {
                    return Err(err(
                        format!("policies[{i}].steps[{j}]"),
                        "names nobody: give notify = [\"person-id\", …] and/or recipients = \"SELECT … AS id, … AS name, … AS voice, … AS sms …\"".into(),
                    ));
                }
                if s.who.recipients.as_deref().is_some_and(|q| q.trim().is_empty()) {
                    return Err(err(format!("policies[{i}].steps[{j}].recipients"), "is an empty SQL statement".into()));
                }
                for who in &s.who.notify {
                    if !people.contains(who.as_str()) {
                        return Err(err(format!("policies[{i}].steps[{j}].notify"), format!("unknown person '{who}'")));
                    }
                }
                let (lo, hi) = limits::ACK_TIMEOUT_SECONDS;
                if !(s.ack_timeout_seconds.is_finite() && s.ack_timeout_seconds >= lo && s.ack_timeout_seconds <= hi) {
                    return Err(err(format!("policies[{i}].steps[{j}].ack_timeout_seconds"), format!("must be {lo}..={hi}")));
                }
            }
        }
        let mut sources = HashSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            if !is_sql_identifier(&s.name) {
                return Err(err(format!("sources[{i}].name"), format!("'{}' must be lower-case letters, digits and '_'", s.name)));
            }
            if !sources.insert(s.name.as_str()) {
                return Err(err(format!("sources[{i}].name"), format!("duplicate source '{}'", s.name)));
            }
            if split_table_name(&s.table).is_none() {
                return Err(err(format!("sources[{i}].table"), format!("'{}' is not a table name like alerts or public.alerts", s.table)));
            }
            if s.operations.is_empty() {
                return Err(err(format!("sources[{i}].operations"), "must list INSERT and/or UPDATE".into()));
            }
            if s.event.trim().is_empty() {
                return Err(err(format!("sources[{i}].event"), "must not be empty".into()));
            }
        }
        let mut workflows = HashSet::new();
        for (i, w) in self.workflows.iter().enumerate() {
            if !is_identifier_like(&w.name) {
                return Err(err(format!("workflows[{i}].name"), format!("'{}' must be letters, digits, '-' or '_'", w.name)));
            }
            if !workflows.insert(w.name.as_str()) {
                return Err(err(format!("workflows[{i}].name"), format!("duplicate workflow '{}'", w.name)));
            }
            if w.event.trim().is_empty() {
                return Err(err(format!("workflows[{i}].event"), "must not be empty".into()));
            }
            range(&format!("workflows[{i}].max_attempts"), w.max_attempts as u64, (limits::MAX_ATTEMPTS.0 as u64, limits::MAX_ATTEMPTS.1 as u64))?;
            range(&format!("workflows[{i}].retry_base_ms"), w.retry_base_ms, limits::RETRY_BASE_MS)?;
            range(&format!("workflows[{i}].retry_max_ms"), w.retry_max_ms, (w.retry_base_ms.max(limits::RETRY_MAX_MS.0), limits::RETRY_MAX_MS.1))?;
            crate::workflows::validate::workflow(self, i, w).map_err(|(key, problem)| err(key, problem))?;
        }
        for (i, s) in self.sources.iter().enumerate() {
            if !self.consumes_event(&s.event) {
                return Err(err(format!("sources[{i}].event"), format!("no workflow is bound to event '{}': its rows would be captured and dropped", s.event)));
            }
        }
        Ok(())
    }

    /// Whether any workflow starts on, is cancelled by, or waits for `event`.
    pub fn consumes_event(&self, event: &str) -> bool {
        self.workflows.iter().any(|w| {
            w.event == event
                || w.cancel_on.iter().any(|c| c.event == event)
                || w.all_steps().any(|(_, _, s)| s.wait.as_ref().and_then(|x| x.event.as_deref()) == Some(event))
        })
    }

    /// The person with this id.
    pub fn person(&self, id: &str) -> Option<&Person> {
        self.people.iter().find(|p| p.id == id)
    }

    /// The policy with this id.
    pub fn policy(&self, id: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.id == id)
    }

    /// The workflow with this name.
    pub fn workflow(&self, name: &str) -> Option<&Workflow> {
        self.workflows.iter().find(|w| w.name == name)
    }
}

/// True when `s` is an E.164 number: `+`, a non-zero digit, 7 to 14 more digits
/// (ITU-T E.164: at most 15 digits).
pub fn is_e164(s: &str) -> bool {
    let Some(d) = s.strip_prefix('+') else { return false };
    (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
}

/// A phone number for log lines: country code prefix and last two digits only
/// (`+1*******01`). Never log a full number.
pub fn redact_phone(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 4 {
        return "*".repeat(chars.len());
    }
    let keep_head = 2.min(chars.len());
    let keep_tail = 2;
    let mut out: String = chars[..keep_head].iter().collect();
    out.push_str(&"*".repeat(chars.len() - keep_head - keep_tail));
    out.extend(&chars[chars.len() - keep_tail..]);
    out
}

fn is_twilio_sid(s: &str, prefix: &str) -> bool {
    s.len() == 34 && s.starts_with(prefix) && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_identifier_like(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Lower-case SQL identifier without quoting needs: `[a-z_][a-z0-9_]*`, ≤ 40 bytes
/// (it becomes part of trigger names, limited to 63 bytes by PostgreSQL).
pub fn is_sql_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Splits `schema.table` or `table` (default schema `public`) into its parts.
/// Each part must be a plain identifier `[A-Za-z_][A-Za-z0-9_]*`; `None` otherwise.
pub fn split_table_name(s: &str) -> Option<(String, String)> {
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    match s.split_once('.') {
        Some((schema, table)) if ok(schema) && ok(table) => Some((schema.into(), table.into())),
        None if ok(s) => Some(("public".into(), s.into())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164() {
        assert!(is_e164("+13855550101"));
        assert!(!is_e164("13855550101"));
        assert!(!is_e164("+1 385 555 0101"));
        assert!(!is_e164("+0385555010"));
        assert!(!is_e164("+1234567"));
        assert!(!is_e164("+1234567890123456"));
    }

    #[test]
    fn redaction_hides_the_middle() {
        assert_eq!(redact_phone("+13855550101"), "+1********01");
    }

    #[test]
    fn a_source_without_a_workflow_is_refused() {
        let c = Config::parse("[[sources]]\nname = \"a\"\ntable = \"alerts\"\nevent = \"alert.critcal\"\n", "x.toml").unwrap();
        let e = c.validate("x.toml").unwrap_err().to_string();
        assert!(e.contains("sources[0].event") && e.contains("alert.critcal"), "{e}");
    }

    #[test]
    fn a_tier_names_people_or_a_query() {
        let base = "[providers.twilio]\naccount_sid = \"AC00000000000000000000000000000001\"\nfrom = \"+13855550100\"\n\
                    [[policies]]\nid = \"p\"\n[[policies.steps]]\n";
        let c = Config::parse(&format!("{base}recipients = \"SELECT 1\"\n"), "x.toml").unwrap();
        c.validate("x.toml").unwrap();
        assert_eq!(c.policies[0].steps[0].who.recipients.as_deref(), Some("SELECT 1"));
        let e = Config::parse(&format!("{base}recipients = \"  \"\n"), "x.toml").unwrap().validate("x.toml").unwrap_err().to_string();
        assert!(e.contains("policies[0].steps[0].recipients") && e.contains("empty"), "{e}");
        let e = Config::parse(&format!("{base}ack_timeout_seconds = 5\n"), "x.toml").unwrap().validate("x.toml").unwrap_err().to_string();
        assert!(e.contains("policies[0].steps[0]") && e.contains("names nobody"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[engine]\nworkerz = 3\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("x.toml"), "{e}");
        assert!(e.to_string().contains("workerz"), "{e}");
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
