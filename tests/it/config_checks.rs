//! Issue 7, items 11 and 12: the config is checked completely before start,
//! and nothing is dropped silently.

use crate::harness::*;
use serde_json::Value;
use std::time::Duration;
use wardcall::config::Config;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        config_checks::wrong_sql_in_lookups_and_write_backs_fails_before_any_trigger,
        config_checks::bad_values_and_unknown_keys_are_refused_at_load,
        config_checks::pool_size_beyond_the_server_is_refused_at_start,
        config_checks::synchronous_commit_off_is_refused_at_start,
        config_checks::missing_provider_secret_stops_serve_before_the_database_is_touched,
        config_checks::readme_defaults_match_the_code,
        config_checks::unrouted_outbox_rows_are_kept_counted_and_shown,
        config_checks::run_of_a_removed_workflow_fails_visibly,
        config_checks::sources_of_another_config_are_removed_only_with_prune,
    ]
}

const SCHEMA: &str = "
CREATE TABLE rooms (room_id bigint PRIMARY KEY, room_name text NOT NULL, floor integer NOT NULL);
CREATE TABLE pages (id bigserial PRIMARY KEY, room_id bigint NOT NULL, note text, called_at timestamptz);
CREATE TABLE tasks (id bigserial PRIMARY KEY, kind text NOT NULL, steps jsonb NOT NULL DEFAULT '[]');";

/// A config with a source, a script workflow and an escalation workflow
/// whose lookup and write-back are `lookup` and `write_back` (TOML lines).
fn escalation_config(lookup: &str, write_back: &str) -> String {
    format!(
        r#"
[providers.twilio]
account_sid = "{ACCOUNT_SID}"
from = "+13855550100"
api_base = "http://127.0.0.1:9"

[[people]]
id = "n1"
name = "Nurse One"
phone = "+13855550101"

[[policies]]
id = "p"
[[policies.steps]]
notify = ["n1"]

[[sources]]
name = "pages"
table = "pages"
event = "page.created"

[[workflows]]
name = "script"
event = "task.created"
kind = "script"

[[workflows]]
name = "page"
event = "page.created"
kind = "escalation"
policy = "p"
message = "Room {{room_name}}. Press 1."

[workflows.lookups]
{lookup}

[workflows.write_back]
{write_back}
"#
    )
}

async fn capture_triggers(db: &TestDb) -> i64 {
    db.scalar_i64("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'wardcall_capture_%'").await
}

pub async fn wrong_sql_in_lookups_and_write_backs_fails_before_any_trigger() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let good_lookup = r#"room_name = "SELECT room_name FROM rooms WHERE room_id = ($1->>'room_id')::bigint""#;
    let good_write_back = r#"on_call_placed = "UPDATE pages SET called_at = now() WHERE id = ($1->>'id')::bigint AND $2 IS NOT NULL""#;
    // The good config passes and installs its trigger.
    wardcall::app::prepare_database(&db.database(), &config(&escalation_config(good_lookup, good_write_back)), "test").await.expect("a correct config");
    assert_eq!(capture_triggers(&db).await, 1);
    db.exec("DROP TRIGGER wardcall_capture_pages_insert ON pages").await;

    let cases = [
        (
            r#"room_name = "SELECT room_nmae FROM rooms WHERE room_id = ($1->>'room_id')::bigint""#,
            good_write_back,
            "workflows[1].lookups.room_name",
            "room_nmae",
        ),
        (
            good_lookup,
            r#"on_acknowledged = "UPDATE pages SET acked = now() WHERE id = ($1->>'id')::bigint""#,
            "workflows[1].write_back.on_acknowledged",
            "acked",
        ),
        (r#"room_name = "SELECT room_name, floor FROM rooms""#, good_write_back, "workflows[1].lookups.room_name", "exactly one text column"),
        (r#"room_name = "SELECT floor FROM rooms""#, good_write_back, "workflows[1].lookups.room_name", "INT4"),
        (r#"room_name = "SELECT room_name FROM rooms WHERE room_id = $2""#, good_write_back, "workflows[1].lookups.room_name", "$2"),
        (good_lookup, r#"on_escalated = "UPDATE pages SET note = 'x' WHERE id = $3""#, "workflows[1].write_back.on_escalated", "$3"),
        (good_lookup, r#"on_call_status = "UPDATE nowhere SET x = 1""#, "workflows[1].write_back.on_call_status", "nowhere"),
    ];
    for (i, (lookup, write_back, key, reason)) in cases.iter().enumerate() {
        let cfg = config(&escalation_config(lookup, write_back));
        let err = wardcall::app::prepare_database(&db.database(), &cfg, "test").await.expect_err(&format!("case {i} must be refused"));
        let msg = format!("{err:#}");
        assert!(msg.contains("test.toml"), "case {i}: file not named: {msg}");
        assert!(msg.contains(key), "case {i}: key {key} not named: {msg}");
        assert!(msg.contains(reason), "case {i}: reason '{reason}' missing: {msg}");
        // Checked before anything is installed; nothing ran.
        assert_eq!(capture_triggers(&db).await, 0, "case {i}: a trigger was installed by a refused config");
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM pages WHERE called_at IS NOT NULL").await, 0);
    // The condition and payload of a source get the same treatment, with their key.
    let cfg = config(
        &escalation_config(good_lookup, good_write_back)
            .replace("event = \"page.created\"\n\n[[workflows]]", "event = \"page.created\"\npayload = \"jsonb_build_object('n', NEW.nte)\"\n\n[[workflows]]"),
    );
    let msg = format!("{:#}", wardcall::app::prepare_database(&db.database(), &cfg, "test").await.expect_err("bad payload"));
    assert!(msg.contains("sources[0].payload") && msg.contains("nte") && msg.contains("test.toml"), "{msg}");
}

pub async fn bad_values_and_unknown_keys_are_refused_at_load() {
    let base = escalation_config(r#"room_name = "SELECT 'x'""#, "");
    let cases: Vec<(String, &str, &str)> = vec![
        // Unknown keys under every workflow kind.
        (base.replace("kind = \"script\"", "kind = \"script\"\ncolour = \"red\""), "workflows[0].colour", "unknown field"),
        (base.replace("policy = \"p\"", "policy = \"p\"\npolcy = \"q\""), "polcy", "unknown"),
        (base.replace("[workflows.write_back]", "[workflows.write_back]\non_cancel = \"SELECT 1\""), "on_cancel", "unknown"),
        (format!("[http]\nlistne = \"127.0.0.1:1\"\n{base}"), "listne", "unknown"),
        // Out of range.
        ("[engine]\npool_size = 4000000000\n".into(), "engine.pool_size", "range"),
        ("[engine]\npool_size = 0\n".into(), "engine.pool_size", "range"),
        ("[engine]\nworkers = 0\n".into(), "engine.workers", "range"),
        ("[engine]\nlease_ms = 0\n".into(), "engine.lease_ms", "range"),
        ("[engine]\nsweep_ms = 0\n".into(), "engine.sweep_ms", "range"),
        ("[engine]\npoll_ms = 0\n".into(), "engine.poll_ms", "range"),
        ("[engine]\nrandom_page_cost = 0.0\n".into(), "engine.random_page_cost", "range"),
        ("[engine]\nrandom_page_cost = nan\n".into(), "engine.random_page_cost", "range"),
        ("[engine]\ndatabase_deadline_ms = 999\n".into(), "engine.database_deadline_ms", "range"),
        ("[engine]\nstatement_timeout_ms = 30000\n".into(), "engine.database_deadline_ms", "above engine.statement_timeout_ms"),
        (base.replace("kind = \"script\"", "kind = \"script\"\nmax_attempts = 0"), "workflows[0].max_attempts", "range"),
        (base.replace("kind = \"script\"", "kind = \"script\"\nretry_base_ms = 0"), "workflows[0].retry_base_ms", "range"),
        (base.replace("kind = \"script\"", "kind = \"script\"\nretry_base_ms = 5000\nretry_max_ms = 10"), "workflows[0].retry_max_ms", "range"),
        (base.replace("api_base = \"http://127.0.0.1:9\"", "gather_timeout_seconds = 0"), "providers.twilio.gather_timeout_seconds", "range"),
        // Provider and HTTP addresses.
        (base.replace("http://127.0.0.1:9", "ftp://api.twilio.com"), "providers.twilio.api_base", "http(s)"),
        (base.replace("http://127.0.0.1:9", "api.twilio.com"), "providers.twilio.api_base", "not a URL"),
        (format!("[http]\nlisten = \"0.0.0.0:8080\"\n{base}"), "http.listen", "http.public_url"),
        (format!("[http]\nlisten = \"[::]:8080\"\n{base}"), "http.listen", "http.public_url"),
        // Type errors name the key, not only the line.
        ("[engine]\nworkers = \"many\"\n".into(), "engine.workers", "invalid type"),
        (base.replace("[[people]]\nid = \"n1\"", "[[people]]\nid = 7"), "people[0].id", "invalid type"),
        (
            base.replace("[[policies.steps]]\nnotify = [\"n1\"]", "[[policies.steps]]\nnotify = [\"n1\"]\nack_timeout_seconds = \"soon\""),
            "policies[0].steps[0].ack_timeout_seconds",
            "invalid type",
        ),
        (base.replace(r#"room_name = "SELECT 'x'""#, "room_name = 3"), "workflows[1].lookups.room_name", "invalid type"),
    ];
    // Every case is tried; the failures are reported together.
    let mut failures = Vec::new();
    for (i, (text, key, problem)) in cases.iter().enumerate() {
        let result = Config::parse(text, "bad.toml").and_then(|c| c.validate("bad.toml"));
        match result {
            Ok(()) => failures.push(format!("case {i} ({key}) was accepted")),
            Err(e) => {
                let msg = e.to_string();
                if !(msg.contains("bad.toml") && msg.contains(key) && msg.contains(problem)) {
                    failures.push(format!("case {i}: expected bad.toml, '{key}' and '{problem}' in: {msg}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A public listen address is fine once the public URL is given.
    let ok = format!("[http]\nlisten = \"0.0.0.0:8080\"\npublic_url = \"https://wardcall.example.org\"\n{base}");
    Config::parse(&ok, "ok.toml").unwrap().validate("ok.toml").unwrap();
}

pub async fn pool_size_beyond_the_server_is_refused_at_start() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let max: i64 = db.scalar_i64("SELECT current_setting('max_connections')::bigint").await;
    assert!(max < 1000, "the test needs a server with max_connections below 1000");
    let cfg = config(&format!("[engine]\npool_size = 1000\n{}", escalation_config("", "")));
    let msg = format!("{:#}", wardcall::app::prepare_database(&db.database(), &cfg, "test").await.expect_err("pool too big"));
    assert!(msg.contains("test.toml") && msg.contains("engine.pool_size") && msg.contains("max_connections"), "{msg}");
    assert_eq!(capture_triggers(&db).await, 0);
}

/// A database (or role, or server) with `synchronous_commit = off` would
/// acknowledge a call's intent before it is on disk: wardcall refuses to
/// start on it, naming the setting, before any trigger is installed.
pub async fn synchronous_commit_off_is_refused_at_start() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    db.exec(&format!("ALTER DATABASE \"{}\" SET synchronous_commit = off", db.name)).await;
    let cfg = config(&escalation_config("", ""));
    let msg = format!("{:#}", wardcall::app::prepare_database(&db.database(), &cfg, "test").await.expect_err("synchronous_commit off"));
    assert!(msg.contains("test.toml") && msg.contains("synchronous_commit") && msg.contains("is off"), "{msg}");
    assert_eq!(capture_triggers(&db).await, 0);
}

pub async fn missing_provider_secret_stops_serve_before_the_database_is_touched() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let dir = std::env::temp_dir().join(format!("wardcall-it-secret-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("nosecret.toml");
    let text = format!(
        "database_url = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n{}",
        db.url(),
        escalation_config("", "").replace("api_base", "auth_token_env = \"WARDCALL_IT_NO_SUCH_TOKEN\"\napi_base")
    );
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
        .args(["--config", path.to_str().unwrap(), "serve"])
        .env_remove("WARDCALL_IT_NO_SUCH_TOKEN")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve must refuse to start: {stderr}");
    assert!(stderr.contains("nosecret.toml") && stderr.contains("WARDCALL_IT_NO_SUCH_TOKEN"), "{stderr}");
    assert_eq!(capture_triggers(&db).await, 0, "a trigger was installed before the secret was found missing");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every default in README.md's configuration tables equals the code's
/// (serde defaults and `Default`), every documented key exists, and every
/// key of `engine`, `http` and the top level is documented.
pub async fn readme_defaults_match_the_code() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("\n## Configuration reference").nth(1).expect("README has a configuration reference");
    let section = section.split("\n## ").next().unwrap();
    // One of everything, with only the required keys: the rest are defaults.
    let minimal = escalation_config(r#"room_name = "SELECT 'x'""#, "").replace("api_base = \"http://127.0.0.1:9\"", "")
        + "\n[[endpoints]]\nname = \"tasks\"\nurl = \"https://tasks.example.org\"\n";
    let parsed = serde_json::to_value(Config::parse(&minimal, "minimal.toml").unwrap()).unwrap();
    let effective = |key: &str| -> Option<Value> {
        match key {
            "data_dir" => Some(Value::from(wardcall::config::DEFAULT_DATA_DIR)),
            "database" => Some(Value::from(wardcall::config::DEFAULT_DATABASE)),
            "providers.twilio.auth_token_env" => Some(Value::from(wardcall::config::DEFAULT_TWILIO_TOKEN_ENV)),
            _ => None,
        }
    };
    let mut documented = Vec::new();
    let mut compared = 0;
    let mut columns: Option<(usize, usize)> = None;
    for line in section.lines().map(str::trim) {
        if !line.starts_with('|') {
            columns = None;
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let Some((k, d)) = columns else {
            let k = cells.iter().position(|c| *c == "key");
            let d = cells.iter().position(|c| *c == "default");
            columns = Some((k.unwrap_or(usize::MAX), d.unwrap_or(usize::MAX)));
            continue;
        };
        if k == usize::MAX || d == usize::MAX || cells[0].starts_with("---") {
            continue;
        }
        let key = cells[k].trim_matches('`').to_string();
        let mut value = &parsed;
        for part in key.split('.') {
            let (name, array) = match part.strip_suffix("[]") {
                Some(n) => (n, true),
                None => (part, false),
            };
            value = value.get(name).unwrap_or_else(|| panic!("README documents `{key}`, which the config does not have"));
            if array {
                value = &value[0];
            }
        }
        let actual = if value.is_null() { effective(&key).unwrap_or(Value::Null) } else { value.clone() };
        let doc = cells[d];
        let literal = if let Some(inner) = doc.strip_prefix('`').and_then(|r| r.strip_suffix('`')).filter(|i| !i.contains('`')) {
            Some(serde_json::from_str::<Value>(inner).unwrap_or_else(|_| Value::from(inner)))
        } else if doc == "true" || doc == "false" || doc.parse::<f64>().is_ok() {
            Some(serde_json::from_str::<Value>(doc).unwrap())
        } else {
            None
        };
        if let Some(lit) = literal {
            let same = match (lit.as_f64(), actual.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => lit == actual,
            };
            assert!(same, "README gives `{key}` the default {doc}, the code {actual}");
            compared += 1;
        }
        documented.push(key);
    }
    assert!(compared >= 15, "only {compared} defaults found in README.md's tables");
    // Every key the code gives a (non-null) default is documented: a key the
    // minimal config leaves out but the parsed config has a value for.
    let raw: toml::Value = toml::from_str(&minimal).unwrap();
    let mut defaulted = Vec::new();
    defaulted_keys(&parsed, Some(&raw), "", &mut defaulted);
    defaulted.sort();
    defaulted.dedup();
    assert!(defaulted.len() >= 15, "only {} defaulted keys found: {defaulted:?}", defaulted.len());
    for key in defaulted {
        assert!(documented.contains(&key), "`{key}` has a default in the code but README.md's configuration tables do not document it");
    }
}

/// Dotted paths (arrays as `name[]`) of the keys of `parsed` that are absent
/// from `raw` (the TOML that was parsed) and have a non-null value: the
/// defaults the code filled in.
fn defaulted_keys(parsed: &Value, raw: Option<&toml::Value>, path: &str, out: &mut Vec<String>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match parsed {
        Value::Object(map) => {
            for (k, v) in map {
                defaulted_keys(v, raw.and_then(|r| r.get(k)), &join(k), out);
            }
        }
        Value::Array(items) if raw.is_none() && !items.is_empty() => out.push(path.to_string()),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                defaulted_keys(item, raw.and_then(|r| r.get(i)), &format!("{path}[]"), out);
            }
        }
        Value::Null => {}
        _ if raw.is_none() => out.push(path.to_string()),
        _ => {}
    }
}

pub async fn unrouted_outbox_rows_are_kept_counted_and_shown() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    // The engine runs as a child process, so that its log can be read.
    let dir = std::env::temp_dir().join(format!("wardcall-it-unrouted-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_path = dir.join("engine.toml");
    let text = escalation_config("", "").replace("[[sources]]\nname = \"pages\"\ntable = \"pages\"\nevent = \"page.created\"\n", "");
    std::fs::write(&cfg_path, format!("database_url = \"{}\"\n[engine]\nsweep_ms = 100\n[http]\nlisten = \"127.0.0.1:0\"\n{text}", db.url())).unwrap();
    let log = dir.join("engine.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
        .args(["--config", cfg_path.to_str().unwrap(), "serve"])
        .env("RUST_LOG", "warn")
        .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn wardcall serve");
    // A source installed by another config (kept: no --prune) and an emit,
    // both with events no workflow here listens to.
    db.exec(
        "CREATE FUNCTION other_capture() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO wardcall.outbox (source, event, payload) VALUES ('other', 'room.cleaned', to_jsonb(NEW)); RETURN NULL; END $$;
         CREATE TRIGGER other_capture AFTER INSERT ON rooms FOR EACH ROW EXECUTE FUNCTION other_capture();",
    )
    .await;
    db.exec("INSERT INTO rooms VALUES (1, 'Room Secret-Name', 2)").await;
    db.exec("SELECT wardcall.emit('nobody.listens', '{\"patient\": \"Jane Secret\"}')").await;
    await_true(
        &db,
        "both rows to be marked unrouted",
        Duration::from_secs(10),
        "SELECT count(*) = 2 FROM wardcall.outbox WHERE unrouted_at IS NOT NULL AND processed_at IS NOT NULL",
    )
    .await;
    // Kept (not deleted), no run, counted by status.
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 2);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.runs").await, 0);
    let counts = wardcall::store::runs::status_counts(&db.pool).await.unwrap();
    assert_eq!(counts.outbox_unrouted, 2);
    assert_eq!(counts.outbox_backlog, 0);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    // Logged once per row, at warn, by event name, never with the payload.
    let logged = std::fs::read_to_string(&log).unwrap();
    let warnings: Vec<&str> = logged.lines().filter(|l| l.contains("WARN") && l.contains("unrouted")).collect();
    assert_eq!(warnings.len(), 2, "one warning per unrouted row: {logged}");
    assert!(warnings.iter().any(|l| l.contains("nobody.listens")) && warnings.iter().any(|l| l.contains("room.cleaned")), "{logged}");
    assert!(!logged.contains("Secret"), "patient data reached the log: {logged}");
    let _ = std::fs::remove_dir_all(&dir);
    // `wardcall status` shows them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
        .args(["status"])
        .env("DATABASE_URL", db.url())
        .env_remove("WARDCALL_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.contains("unrouted")).unwrap_or_else(|| panic!("no unrouted line: {stdout}"));
    assert!(line.split_whitespace().any(|w| w == "2"), "{line}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
        .args(["status", "--json"])
        .env("DATABASE_URL", db.url())
        .env_remove("WARDCALL_CONFIG")
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["outbox_unrouted"], 2);
}

pub async fn run_of_a_removed_workflow_fails_visibly() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    // A run of workflow 'gone', created under a config that had it.
    db.exec("INSERT INTO wardcall.runs (workflow, event, input, step, status) VALUES ('gone', 'gone.event', '{}', 'start', 'pending')").await;
    let mut cfg = (*config(&escalation_config("", ""))).clone();
    cfg.engine.poll_ms = 50;
    let app = start_app(&db, std::sync::Arc::new(cfg)).await;
    await_true(&db, "the run of the removed workflow to fail", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'failed'").await;
    let (error, finished): (Option<String>, bool) =
        sqlx::query_as("SELECT last_error, finished_at IS NOT NULL FROM wardcall.runs").fetch_one(&db.pool).await.unwrap();
    let error = error.unwrap_or_default();
    assert!(error.contains("'gone'") && error.contains("not in this engine's config"), "{error}");
    assert!(finished);
    let audited: Option<String> = sqlx::query_scalar("SELECT detail->>'error' FROM wardcall.audit_log WHERE entity = 'run' AND action = 'run.failed'")
        .fetch_optional(&db.pool)
        .await
        .unwrap();
    assert!(audited.is_some_and(|e| e.contains("'gone'")), "the failure is audited with its reason");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.retry_scheduled'").await, 0, "no retry loop");
    app.stop(Duration::from_secs(2)).await;
}

pub async fn sources_of_another_config_are_removed_only_with_prune() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let dir = std::env::temp_dir().join(format!("wardcall-it-prune-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let with_source = dir.join("with.toml");
    let without_source = dir.join("without.toml");
    let head = format!("database_url = \"{}\"\n", db.url());
    std::fs::write(&with_source, format!("{head}{}", escalation_config("", ""))).unwrap();
    std::fs::write(&without_source, format!("{head}[[workflows]]\nname = \"script\"\nevent = \"task.created\"\nkind = \"script\"\n")).unwrap();
    let migrate = |path: &std::path::Path, prune: bool| {
        let mut args = vec!["--config", path.to_str().unwrap(), "migrate"];
        if prune {
            args.push("--prune");
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wardcall")).args(&args).env("RUST_LOG", "info").output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{text}");
        (String::from_utf8_lossy(&out.stdout).to_string(), text)
    };
    migrate(&with_source, false);
    assert_eq!(capture_triggers(&db).await, 1);
    // Another config without the source: the trigger stays, and both the
    // output and the log name it.
    let (stdout, all) = migrate(&without_source, false);
    assert_eq!(capture_triggers(&db).await, 1, "a trigger was removed without --prune");
    assert!(stdout.contains("kept") && stdout.contains("pages") && stdout.contains("--prune"), "{stdout}");
    assert!(all.contains("WARN") && all.contains("pages"), "no warning names the kept source: {all}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'source.removed'").await, 0);
    db.exec("INSERT INTO pages (room_id) VALUES (1)").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.outbox").await, 1, "capture continues");
    // With --prune it is removed, said on stdout and audited.
    let (stdout, _) = migrate(&without_source, true);
    assert!(stdout.contains("removed") && stdout.contains("'pages'"), "{stdout}");
    assert_eq!(capture_triggers(&db).await, 0);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'source.removed' AND entity_id = 'pages'").await, 1);
    let _ = std::fs::remove_dir_all(&dir);
}
