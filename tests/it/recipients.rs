//! Recipients from the team's own tables (issue 8, item 2): a tier's
//! `recipients` query runs when the tier runs (no restart for a roster
//! change), inactive people and bad numbers are skipped, an empty tier goes
//! on at once, a policy with nobody is an alarm, a takeover calls the list
//! that was recorded, and a wrong query is refused at start naming its key.

use crate::escalation::{calls_to, start_with, Hospital, NURSE_A, NURSE_B, SEIZURE_INSERT};
use crate::harness::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use wardcall::config::Config;
use wardcall::devtools::twilio_emulator::Persona;
use wardcall::notify::recipients::RecipientsSpec;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        recipients::sql_recipients_change_between_alerts_without_a_restart,
        recipients::deactivated_recipient_is_skipped_and_a_bad_number_is_audited_without_it,
        recipients::empty_tier_goes_on_to_the_next_at_once_and_is_audited,
        recipients::policy_with_nobody_is_an_alarm_in_status_until_someone_comes_on_shift,
        recipients::chain_query_reaches_the_third_coordinator_and_stops_on_a_cycle,
        recipients::takeover_calls_the_recorded_list_not_a_requeried_one,
        recipients::wrong_column_in_a_recipients_query_is_refused_naming_the_key,
        recipients::a_tier_naming_nobody_is_refused_at_load,
        recipients::failing_query_still_calls_the_tiers_static_people,
    ]
}

/// The hospital team's roster, as such a team keeps it: staff with a phone and
/// an active flag, and shifts.
pub const ROSTER: &str = "
CREATE TABLE staff (id text PRIMARY KEY, full_name text NOT NULL, mobile text, active boolean NOT NULL DEFAULT true);
CREATE TABLE shifts (staff_id text NOT NULL REFERENCES staff, starts_at timestamptz NOT NULL, ends_at timestamptz NOT NULL);
INSERT INTO staff VALUES ('s1', 'Sam Okoye', '+13855550101', true), ('s2', 'Rene Laurent', '+13855550105', true);";

/// \"Whoever is on shift now\", as one query.
pub const ON_SHIFT_NOW: &str = "SELECT s.id, s.full_name AS name, s.mobile AS voice, s.mobile AS sms
  FROM shifts sh JOIN staff s ON s.id = sh.staff_id
 WHERE s.active AND now() >= sh.starts_at AND now() < sh.ends_at
 ORDER BY s.id";

const ON_SHIFT: &str = "INSERT INTO shifts VALUES ($ID, now() - interval '1 hour', now() + interval '8 hours')";

fn on_shift(id: &str) -> String {
    ON_SHIFT.replace("$ID", &format!("'{id}'"))
}

/// The hospital, with tier 0 = whoever is on shift now (SQL) and tier 1 = nurse B (static).
async fn roster_hospital(a: Persona, b: Persona, ack_timeout: f64, configure: impl FnOnce(&mut Config)) -> Hospital {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    db.exec(ROSTER).await;
    start_with(db, a, b, |cfg| {
        for s in &mut cfg.policies[0].steps {
            s.ack_timeout_seconds = ack_timeout;
        }
        cfg.policies[0].steps[0].who = RecipientsSpec { notify: vec![], recipients: Some(ON_SHIFT_NOW.into()) };
        configure(cfg);
    })
    .await
}

fn answers() -> Persona {
    Persona::Answer { ring_ms: 100, think_ms: 100, digits: "1".into() }
}

async fn audit_details(db: &TestDb, action: &str) -> Vec<Value> {
    sqlx::query_scalar("SELECT detail FROM wardcall.audit_log WHERE action = $1 ORDER BY id").bind(action).fetch_all(&db.pool).await.unwrap()
}

pub async fn sql_recipients_change_between_alerts_without_a_restart() {
    let h = roster_hospital(answers(), Persona::NoAnswer, 10.0, |cfg| {
        let esc = cfg.workflows[0].escalation_mut().expect("an escalation");
        // The hooks get the recipient's id and name.
        esc.write_back.on_call_placed = Some(
            "UPDATE alerts SET metadata = metadata || jsonb_build_object('called', coalesce(metadata->'called', '[]'::jsonb)
                 || jsonb_build_array(jsonb_build_object('person_id', $2->>'person_id', 'person_name', $2->>'person_name')))
              WHERE id = ($1->>'id')::uuid"
                .into(),
        );
    })
    .await;
    h.db.exec(&on_shift("s1")).await;
    h.db.exec(SEIZURE_INSERT).await;
    crate::escalation::await_alert_status(&h.db, "acknowledged", Duration::from_secs(20)).await;
    assert_eq!(calls_to(&h, NURSE_A), 1, "s1 on shift was called on her number");
    let called: Value = sqlx::query_scalar("SELECT metadata->'called' FROM alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(called, json!([{"person_id": "s1", "person_name": "Sam Okoye"}]), "the write-back got the recipient's id and name");
    let name: String = sqlx::query_scalar("SELECT person_name FROM wardcall.notification_attempts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(name, "Sam Okoye", "the name is kept on the attempt row");

    // The team changes s1's number and puts s2 on shift; no restart.
    h.db.exec("UPDATE staff SET mobile = '+1 385 555 0111' WHERE id = 's1'").await;
    h.db.exec(&on_shift("s2")).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_some("the second alert to call both people on shift", Duration::from_secs(15), || async {
        (calls_to(&h, "+13855550111") == 1 && calls_to(&h, "+13855550105") == 1).then_some(())
    })
    .await;
    assert_eq!(calls_to(&h, NURSE_A), 1, "the old number was not called again");
    // Names never reach the audit log.
    let leaked =
        h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE detail::text ~ '(Sam Okoye|Rene Laurent|13855550111|13855550105|13855550101)'").await;
    assert_eq!(leaked, 0, "no names or numbers in the audit log");
    h.stop().await;
}

pub async fn deactivated_recipient_is_skipped_and_a_bad_number_is_audited_without_it() {
    let h = roster_hospital(answers(), answers(), 10.0, |_| {}).await;
    h.db.exec("INSERT INTO staff VALUES ('s3', 'Jo Park', '555-0101 ext 9', true)").await;
    h.db.exec(&on_shift("s1")).await;
    h.db.exec(&on_shift("s2")).await;
    h.db.exec(&on_shift("s3")).await;
    h.db.exec("UPDATE staff SET active = false WHERE id = 's1'").await;
    h.db.exec(SEIZURE_INSERT).await;
    await_some("s2 to be called", Duration::from_secs(15), || async { (calls_to(&h, "+13855550105") == 1).then_some(()) }).await;
    // Tier 0 placed exactly one call: s2 (s1 inactive, s3's number is not E.164).
    let tier0: Vec<String> =
        sqlx::query_scalar("SELECT person_id FROM wardcall.notification_attempts WHERE step_index = 0").fetch_all(&h.db.pool).await.unwrap();
    assert_eq!(tier0, vec!["s2".to_string()]);
    assert_eq!(calls_to(&h, NURSE_A), 0, "the deactivated person was not called");
    let resolved = audit_details(&h.db, "alert.recipients_resolved").await;
    assert_eq!(resolved[0]["recipients"], json!(["s2", "s3"]));
    assert_eq!(
        resolved[0]["skipped"],
        json!([{"id": "s3", "channel": "voice", "reason": "invalid_number"}, {"id": "s3", "channel": "sms", "reason": "invalid_number"}])
    );
    let leaked = h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE detail::text ~ '(555-0101|Jo Park)'").await;
    assert_eq!(leaked, 0, "the skipped number is not in the audit log");
    h.stop().await;
}

pub async fn empty_tier_goes_on_to_the_next_at_once_and_is_audited() {
    // Nobody on shift: tier 0 is empty, nurse B (tier 1) is called at once,
    // not after tier 0's 30 s.
    let h = roster_hospital(Persona::NoAnswer, answers(), 30.0, |_| {}).await;
    let t0 = Instant::now();
    h.db.exec(SEIZURE_INSERT).await;
    crate::escalation::await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    assert!(t0.elapsed() < Duration::from_secs(10), "the empty tier did not wait out its timeout: {:?}", t0.elapsed());
    assert_eq!(calls_to(&h, NURSE_B), 1);
    let empty = audit_details(&h.db, "alert.tier_empty").await;
    assert_eq!(empty, vec![json!({"cycle": 0, "step_index": 0, "listed_without_voice": 0})]);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.alerts WHERE nobody_since IS NOT NULL").await, 0, "not an alarm: tier 1 had someone");
    h.stop().await;
}

pub async fn policy_with_nobody_is_an_alarm_in_status_until_someone_comes_on_shift() {
    let h = roster_hospital(answers(), Persona::NoAnswer, 10.0, |cfg| {
        cfg.policies[0].steps[1].who = RecipientsSpec { notify: vec![], recipients: Some(ON_SHIFT_NOW.into()) };
    })
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    await_true(
        &h.db,
        "the nobody-to-call alarm",
        Duration::from_secs(10),
        "SELECT count(*) = 1 FROM wardcall.alerts WHERE status = 'open' AND nobody_since IS NOT NULL",
    )
    .await;
    let cfg = h.app.engine.config.clone();
    let problems = wardcall::status::problems(&h.db.pool, &cfg).await.unwrap();
    assert!(problems.iter().any(|p| p.contains("policy critical-care") && p.contains("nobody to call")), "{problems:?}");
    // `wardcall status` (another process) shows it too.
    let dir = std::env::temp_dir().join(format!("wardcall-it-nobody-{}-{}", std::process::id(), h.db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wardcall.toml");
    std::fs::write(&file, format!("database_url = \"{}\"\n", h.db.url())).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wardcall"))
        .arg("--config")
        .arg(&file)
        .arg("status")
        .env_remove("DATABASE_URL")
        .env_remove("WARDCALL_CONFIG")
        .output()
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("UNHEALTHY: policy critical-care: 1 open alert(s) with nobody to call"), "{stdout}");
    tokio::time::sleep(Duration::from_millis(5_500)).await; // at least one more round
    assert_eq!(audit_details(&h.db, "alert.nobody_to_call").await.len(), 1, "audited once, however many retries");
    assert_eq!(audit_details(&h.db, "alert.tier_empty").await.len(), 2, "each empty tier audited in the first round only");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.alerts WHERE status = 'open'").await, 1, "still open: never silence");
    // Still open, never silently given up: someone comes on shift and is called.
    h.db.exec(&on_shift("s1")).await;
    crate::escalation::await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    assert_eq!(calls_to(&h, NURSE_A), 1);
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.alerts WHERE nobody_since IS NOT NULL").await, 0, "the alarm is cleared");
    assert_eq!(audit_details(&h.db, "alert.recipients_found").await.len(), 1);
    let problems = wardcall::status::problems(&h.db.pool, &cfg).await.unwrap();
    assert!(!problems.iter().any(|p| p.contains("nobody to call")), "{problems:?}");
    h.stop().await;
}

/// The recursive chain over `backup_coordinator_id`, to any depth, cycles
/// cut, as one query (README: "Recipients from your tables").
pub const CHAIN: &str = "
WITH RECURSIVE chain (id, depth, path) AS (
    SELECT co.id, 0, ARRAY[co.id]
      FROM clients cl JOIN coordinators co ON co.zone_id = cl.zone_id
     WHERE cl.id = ($1->>'client_id')::uuid
  UNION ALL
    SELECT b.id, chain.depth + 1, chain.path || b.id
      FROM chain JOIN coordinators cur ON cur.id = chain.id
      JOIN coordinators b ON b.id = cur.backup_coordinator_id
     WHERE b.id <> ALL (chain.path)
)
SELECT co.id::text AS id, u.full_name AS name, co.phone_number AS voice, co.phone_number AS sms
  FROM chain JOIN coordinators co ON co.id = chain.id LEFT JOIN users u ON u.id = co.user_id
 WHERE co.is_active
 ORDER BY chain.depth";

pub async fn chain_query_reaches_the_third_coordinator_and_stops_on_a_cycle() {
    let db = TestDb::new().await;
    let example = wardcall::devtools::demo::example("homecare").unwrap();
    db.exec(example.schema).await;
    db.exec(example.seed).await;
    let cfg = example.parse_config().unwrap();
    let north = json!({"client_id": "d0000000-0000-4000-8000-000000000001"});
    let spec = RecipientsSpec { notify: vec![], recipients: Some(CHAIN.into()) };
    let got = wardcall::notify::recipients::resolve(&db.pool, &cfg, &spec, &north, &json!({})).await.unwrap();
    let ids: Vec<&str> = got.recipients.iter().map(|r| r.id.as_str()).collect();
    // Casey → Devon → Emery → (Casey again: the cycle is cut).
    assert_eq!(ids, ["c0000000-0000-4000-8000-000000000001", "c0000000-0000-4000-8000-000000000002", "c0000000-0000-4000-8000-000000000003"]);
    assert_eq!(got.recipients[2].voice.as_deref(), Some("+13855550203"));
    // The example's tiers: tier 2 reaches the third coordinator; a fourth tier would find nobody.
    let tier2 = &cfg.policies[0].steps[2].who;
    let got = wardcall::notify::recipients::resolve(&db.pool, &cfg, tier2, &north, &json!({})).await.unwrap();
    assert_eq!(got.recipients.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["c0000000-0000-4000-8000-000000000003"]);
    let tier3 = RecipientsSpec { notify: vec![], recipients: tier2.recipients.as_ref().map(|q| q.replace("OFFSET 2", "OFFSET 3")) };
    let got = wardcall::notify::recipients::resolve(&db.pool, &cfg, &tier3, &north, &json!({})).await.unwrap();
    assert!(got.recipients.is_empty(), "the cycle back to the first coordinator is cut");
    // Ten deep, no cycle: the chain follows to any depth.
    db.exec(
        "INSERT INTO users (id, full_name) SELECT ('e0000000-0000-4000-8000-0000000000' || lpad(i::text, 2, '0'))::uuid, 'u' || i FROM generate_series(1, 10) i;
         INSERT INTO coordinators (id, user_id, zone_id, phone_number)
           SELECT ('f0000000-0000-4000-8000-0000000000' || lpad(i::text, 2, '0'))::uuid, ('e0000000-0000-4000-8000-0000000000' || lpad(i::text, 2, '0'))::uuid,
                  CASE WHEN i = 1 THEN 'a0000000-0000-4000-8000-0000000000ee' ELSE 'a0000000-0000-4000-8000-0000000000ef' END::uuid,
                  '+138555503' || lpad(i::text, 2, '0') FROM generate_series(1, 10) i;
         UPDATE coordinators SET backup_coordinator_id = ('f0000000-0000-4000-8000-0000000000' || lpad((substr(id::text, 35)::int + 1)::text, 2, '0'))::uuid
          WHERE id::text LIKE 'f%' AND substr(id::text, 35)::int < 10;
         INSERT INTO zones (id, name) VALUES ('a0000000-0000-4000-8000-0000000000ee', 'Deep');
         INSERT INTO clients (id, full_name, zone_id) VALUES ('d0000000-0000-4000-8000-0000000000ee', 'x', 'a0000000-0000-4000-8000-0000000000ee');",
    )
    .await;
    let deep = json!({"client_id": "d0000000-0000-4000-8000-0000000000ee"});
    let got = wardcall::notify::recipients::resolve(&db.pool, &cfg, &spec, &deep, &json!({})).await.unwrap();
    assert_eq!(got.recipients.len(), 10);
    assert_eq!(got.recipients[9].voice.as_deref(), Some("+13855550310"));
}

pub async fn takeover_calls_the_recorded_list_not_a_requeried_one() {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    db.exec(ROSTER).await;
    // Now s2 is on shift, but the crashed engine had resolved tier 0 to s1.
    db.exec(&on_shift("s2")).await;
    let mut cfg = crate::escalation::hospital_config("http://127.0.0.1:9", 10.0, 1);
    cfg.policies[0].steps[0].who = RecipientsSpec { notify: vec![], recipients: Some(ON_SHIFT_NOW.into()) };
    wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap();
    db.exec(SEIZURE_INSERT).await; // (no engine yet: the outbox keeps it)
    sqlx::query(
        "INSERT INTO wardcall.runs (workflow, event_id, event, input, state, step, status, lease_owner, fencing_token, due_at)
         SELECT 'critical-alert-call', o.id, o.event, o.payload, $1, 'start', 'running', 'crashed-engine', 1, clock_timestamp() - interval '1 second'
           FROM wardcall.outbox o",
    )
    .bind(json!({"message": "Critical alert.", "cycle": 0, "step_index": 0,
                 "recipients": {"0.0": [{"id": "s1", "name": "Sam Okoye", "voice": NURSE_A, "sms": NURSE_A}]}}))
    .execute(&db.pool)
    .await
    .unwrap();
    db.exec("UPDATE wardcall.outbox SET processed_at = clock_timestamp(), processed_by = 'crashed-engine'").await;
    let h = start_with(db, answers(), Persona::NoAnswer, |c| {
        let api = c.providers.twilio.as_ref().unwrap().api_base.clone();
        let mut fresh = cfg.clone();
        fresh.providers.twilio.as_mut().unwrap().api_base = api;
        *c = fresh;
    })
    .await;
    crate::escalation::await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    assert_eq!(calls_to(&h, NURSE_A), 1, "the recorded recipient was called");
    assert_eq!(calls_to(&h, "+13855550105"), 0, "the roster was not queried again for this tier");
    h.stop().await;
}

pub async fn wrong_column_in_a_recipients_query_is_refused_naming_the_key() {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    db.exec(ROSTER).await;
    for (query, expected) in [
        ("SELECT id, full_name AS name, telephone AS voice, mobile AS sms FROM staff", "telephone"),
        ("SELECT id, full_name AS name, mobile AS voice FROM staff", "'sms' is missing"),
        ("SELECT id, full_name AS name, mobile AS voice, mobile AS sms, active FROM staff", "'active'"),
        ("SELECT 1 AS id, full_name AS name, mobile AS voice, mobile AS sms FROM staff", "type INT4"),
        ("SELECT id, full_name AS name, mobile AS voice, mobile AS sms FROM staff WHERE id = $3", "$3"),
    ] {
        let mut cfg = crate::escalation::hospital_config("http://127.0.0.1:9", 10.0, 1);
        cfg.policies[0].steps[1].who = RecipientsSpec { notify: vec![], recipients: Some(query.into()) };
        let e = wardcall::app::prepare_database(&db.database(), &cfg, "test").await.unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("policies[0].steps[1].recipients") && text.contains(expected), "{query}: {text}");
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'wardcall_capture%'").await, 0, "nothing installed");
}

pub async fn a_tier_naming_nobody_is_refused_at_load() {
    let text = wardcall::devtools::demo::HOSPITAL_CONFIG.replace("notify = [\"nurse-blake\"]\n", "");
    let e = Config::parse(&text, "hospital.toml").unwrap().validate("hospital.toml").unwrap_err().to_string();
    assert!(e.contains("policies[0].steps[1]") && e.contains("names nobody"), "{e}");
    let text = wardcall::devtools::demo::HOSPITAL_CONFIG.replace("notify = [\"nurse-blake\"]", "recipients = \"SELECT 1\"\nrecipientz = \"x\"");
    let e = Config::parse(&text, "hospital.toml").unwrap_err().to_string();
    assert!(e.contains("recipientz"), "{e}");
}

pub async fn failing_query_still_calls_the_tiers_static_people() {
    // The query fails when it runs (division by zero: no shifts at all); the
    // tier's `notify` person is still called, and the failure is audited by SQLSTATE.
    let h = roster_hospital(answers(), Persona::NoAnswer, 10.0, |cfg| {
        cfg.policies[0].steps[0].who = RecipientsSpec {
            notify: vec!["nurse-avery".into()],
            recipients: Some("SELECT id, full_name AS name, mobile AS voice, mobile AS sms FROM staff WHERE 1 / (SELECT count(*) FROM shifts)::int = 1".into()),
        };
    })
    .await;
    h.db.exec(SEIZURE_INSERT).await;
    crate::escalation::await_alert_status(&h.db, "acknowledged", Duration::from_secs(15)).await;
    assert_eq!(calls_to(&h, NURSE_A), 1);
    let resolved = audit_details(&h.db, "alert.recipients_resolved").await;
    assert_eq!(resolved[0]["query_failed"]["sqlstate"], json!("22012"), "{resolved:?}");
    assert_eq!(resolved[0]["recipients"], json!(["nurse-avery"]));
    h.stop().await;
}
