//! Issue 7, items 10 and 13: no patient data on error paths (wardcall's log, the
//! audit log, the embedded cluster's server log, the demo's debug output), and
//! the embedded cluster works wherever the repository is cloned (a mode-700
//! directory, as `/root` is, run as root).

use crate::harness::{await_some, TestDb};
use serde_json::json;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wardcall::db::embedded::{relocation_key, RELOCATION_BASE};
use wardcall::workflows::team_sql::{write_back, WriteBackSubject};

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        privacy_cluster::write_back_failure_leaves_no_value_in_logs_or_audit,
        privacy_cluster::redacted_errors_keep_what_an_operator_needs,
        privacy_cluster::demo_debug_log_prints_no_seed_data,
        privacy_cluster::demo_runs_from_a_private_directory_as_root,
    ]
}

/// A `tracing` writer collecting everything into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_uppercase()
}

/// Every file of the embedded cluster's `log/` directory, concatenated.
fn server_log_text(data_dir: &Path) -> String {
    let mut text = String::new();
    if let Ok(entries) = std::fs::read_dir(data_dir.join("log")) {
        for entry in entries.flatten() {
            if let Ok(bytes) = std::fs::read(entry.path()) {
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    text
}

/// A write-back that violates a foreign key with a patient-like value, and one
/// whose cast fails on it (PostgreSQL quotes that value in the primary message):
/// neither value reaches the audit log, wardcall's log output, or the embedded
/// cluster's server log; the SQLSTATE, constraint and hook name do.
pub async fn write_back_failure_leaves_no_value_in_logs_or_audit() {
    let db = TestDb::new().await;
    let patient = format!("P-ZQX-{}", unique_suffix());
    let room = format!("ROOM-QZX-{}", unique_suffix());
    db.exec(
        "CREATE TABLE wb_patients (patient_id text PRIMARY KEY);
         CREATE TABLE wb_alerts (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                                 patient_id text REFERENCES wb_patients, room uuid);
         INSERT INTO wardcall.runs (id, workflow, event, input, step, status)
              VALUES ('00000000-0000-0000-0000-0000000000a1', 'w', 'e', '{}', 'call', 'completed');
         INSERT INTO wardcall.alerts (id, run_id, workflow, policy, message, status)
              VALUES ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-0000000000a1',
                      'w', 'p', 'm', 'open');",
    )
    .await;
    let alert = uuid::Uuid::parse_str("00000000-0000-0000-0000-0000000000b1").unwrap();
    let payload = json!({"patient": patient, "room": room});

    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_ansi(false).with_writer(move || writer.clone()).finish();
    let marker = format!("wardcall-privacy-marker-{}", unique_suffix());
    {
        // The test's future runs on this thread (block_on), so this subscriber
        // sees everything write_back logs.
        let _guard = tracing::subscriber::set_default(subscriber);
        let mut conn = db.pool.acquire().await.unwrap();
        sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
        write_back(
            &mut conn,
            Some("INSERT INTO wb_alerts (patient_id) VALUES ($1->>'patient')"),
            "on_acknowledged",
            &payload,
            WriteBackSubject::Alert(alert),
            "test",
        )
        .await
        .expect("a failing write-back is kept out of the transaction");
        write_back(
            &mut conn,
            Some("INSERT INTO wb_alerts (room) VALUES (($1->>'room')::uuid)"),
            "on_call_placed",
            &payload,
            WriteBackSubject::Alert(alert),
            "test",
        )
        .await
        .expect("a failing write-back is kept out of the transaction");
        sqlx::query("COMMIT").execute(&mut *conn).await.unwrap();
        // Same connection, so it reaches the server log after both errors.
        sqlx::raw_sql(&format!("DO $$ BEGIN RAISE LOG '{marker}'; END $$")).execute(&mut *conn).await.unwrap();
    }

    let audit: Vec<String> =
        sqlx::query_scalar("SELECT detail::text FROM wardcall.audit_log WHERE action = 'write_back.failed' ORDER BY id").fetch_all(&db.pool).await.unwrap();
    assert_eq!(audit.len(), 2, "{audit:?}");
    let all_audit = audit.join("\n");
    for value in [&patient, &room] {
        assert!(!all_audit.contains(value.as_str()), "audit log holds {value}: {all_audit}");
    }
    assert!(audit[0].contains("on_acknowledged") && audit[0].contains("23503"), "{}", audit[0]);
    assert!(audit[0].contains("wb_alerts_patient_id_fkey"), "constraint named: {}", audit[0]);
    assert!(audit[1].contains("on_call_placed") && audit[1].contains("22P02"), "{}", audit[1]);

    let log = captured.text();
    assert!(log.contains("23503") && log.contains("on_acknowledged"), "the failure is logged: {log}");
    for value in [&patient, &room] {
        assert!(!log.contains(value.as_str()), "wardcall's log holds {value}:\n{log}");
    }

    let server = crate::harness::init();
    if let Some(cluster) = &server.cluster {
        let dir = cluster.data_dir().to_path_buf();
        let text = await_some("the marker in the server log", Duration::from_secs(20), || {
            let dir = dir.clone();
            let marker = marker.clone();
            async move {
                let text = server_log_text(&dir);
                text.contains(&marker).then_some(text)
            }
        })
        .await;
        for value in [&patient, &room] {
            assert!(!text.contains(value.as_str()), "the server log holds {value}");
        }
    } else {
        eprintln!("DATABASE_URL set: the embedded cluster's server log is not checked");
    }
}

/// `db_message` drops values (a failed cast quotes its input in the primary
/// message) but keeps the server's message for errors about the SQL text
/// (a config's wrong column); `error_text` keeps anyhow context above a database
/// error and redacts the error itself.
pub async fn redacted_errors_keep_what_an_operator_needs() {
    let db = TestDb::new().await;
    let value = format!("P-QZX-{}", unique_suffix());
    let cast = sqlx::query("SELECT $1::text::uuid").bind(&value).execute(&db.pool).await.unwrap_err();
    let text = wardcall::capture::db_message(&cast);
    assert!(!text.contains(&value), "{text}");
    assert!(text.contains("SQLSTATE 22P02 (invalid_text_representation)"), "{text}");
    let wrapped = anyhow::Error::new(cast).context("lookup 'room_name'");
    let chain = wardcall::capture::error_text(&wrapped);
    assert!(chain.starts_with("lookup 'room_name': SQLSTATE 22P02"), "{chain}");
    assert!(!chain.contains(&value), "{chain}");
    let column = sqlx::query("SELECT nope FROM wardcall.runs").execute(&db.pool).await.unwrap_err();
    let text = wardcall::capture::db_message(&column);
    assert!(text.contains("42703") && text.contains("column \"nope\" does not exist"), "{text}");
}

/// Patient and staff data of the demo's seed and config.
const SEED_DATA: [&str; 8] = ["Dana Vale", "Rowan Ellis", "P-DHE-001", "P-DHE-002", "+13855550101", "+13855550102", "3855550101", "3855550102"];

/// Personal data in the home-care example's seed.
const HOMECARE_SEED_DATA: [&str; 9] =
    ["Casey Lindqvist", "Devon Achebe", "Emery Santos", "Finley Okafor", "Gale Moreau", "Harper Nilsen", "3855550201", "3855550202", "3855550204"];

/// `RUST_LOG=debug wardcall demo` and `wardcall demo homecare` (here on the
/// test server through DATABASE_URL, one after the other: both use the
/// database `wardcall_demo`) print no seed name, patient id, phone number or
/// outcome text on stdout or stderr.
pub async fn demo_debug_log_prints_no_seed_data() {
    let db = TestDb::new().await;
    for (args, expected, seed) in
        [(&["demo"][..], "alert acknowledged", &SEED_DATA[..]), (&["demo", "homecare"][..], "resolved by the team", &HOMECARE_SEED_DATA[..])]
    {
        let out = tokio::time::timeout(
            Duration::from_secs(240),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
                .args(args)
                .env("DATABASE_URL", db.url())
                .env("RUST_LOG", "debug")
                .env_remove("WARDCALL_CONFIG")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the demo finishes within 240 s")
        .expect("the demo runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
        assert!(stdout.contains(expected), "{stdout}");
        assert!(stderr.contains("DEBUG"), "debug logging was on: {stderr}");
        for value in seed {
            for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
                if let Some(at) = text.find(value) {
                    let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
                    let line = text[from..].lines().next().unwrap_or("");
                    panic!("{args:?}'s {name} prints seed data {value:?}: {line}");
                }
            }
        }
    }
}

/// Removes a relocated cluster and its sibling files.
fn remove_relocated(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    for suffix in [".wardcall.lock", ".wardcall.users", ".wardcall.requested", ".wardcall-initdb"] {
        let mut name = dir.file_name().unwrap().to_os_string();
        name.push(suffix);
        let _ = std::fs::remove_file(dir.with_file_name(name));
    }
}

/// Run as root from a mode-700 directory (the repository cloned under /root), the
/// demo's embedded cluster is placed where the `postgres` account can reach it,
/// under /var/lib/wardcall/relocated, keyed by the requested path, mode 0700 and
/// owned by that account; the log says so naming both paths; the demo exits 0
/// with the alert acknowledged and the cluster is stopped afterwards.
pub async fn demo_runs_from_a_private_directory_as_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: nothing to relocate; skipped");
        return;
    }
    let Ok(Some(postgres)) = nix::unistd::User::from_name("postgres") else {
        eprintln!("no postgres account; skipped");
        return;
    };
    let base = std::env::temp_dir().join(format!("wardcall-private-{}-{}", std::process::id(), unique_suffix()));
    std::fs::create_dir(&base).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();
    let base = std::fs::canonicalize(&base).unwrap();
    let requested = base.join(".wardcall");
    let relocated = PathBuf::from(RELOCATION_BASE).join(relocation_key(&requested));
    remove_relocated(&relocated);

    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
            .arg("demo")
            .current_dir(&base)
            .env_remove("DATABASE_URL")
            .env_remove("WARDCALL_CONFIG")
            .env("RUST_LOG", "info")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo finishes within 300 s")
    .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let checks = || {
        assert!(out.status.success(), "demo failed ({}):\n{stdout}\n{stderr}", out.status);
        assert!(stdout.contains("alert acknowledged"), "{stdout}");
        assert!(stdout.contains(&format!("so the demo's PostgreSQL cluster is in {}", relocated.display())), "{stdout}");
        let line = stderr.lines().find(|l| l.contains("placing the cluster in")).unwrap_or_else(|| panic!("no relocation log line:\n{stderr}"));
        assert!(line.contains(" INFO ") || line.contains("INFO"), "{line}");
        assert!(line.contains(&requested.display().to_string()), "names the requested path: {line}");
        assert!(line.contains(&relocated.display().to_string()), "names the cluster's path: {line}");
        let meta = std::fs::metadata(&relocated).expect("the relocated cluster exists");
        assert_eq!(meta.uid(), postgres.uid.as_raw(), "owned by the server's account");
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert!(!relocated.join("postmaster.pid").exists(), "the demo stopped its cluster");
        assert!(!requested.exists(), "nothing was created in the unreachable directory");
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(checks));
    remove_relocated(&relocated);
    let _ = std::fs::remove_dir_all(&base);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
