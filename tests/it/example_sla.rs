//! The SLA monitor example (SCENARIOS.md §3, workflow 3, `examples/sla/`) on
//! its own schema: an SMS warning at 75 % and a breach at 100 % of the SLA to
//! the assigned nurse, each written into the team's notification_log;
//! resolving the task first cancels what is left.

use crate::harness::*;
use std::time::Duration;
use wardcall::app::App;
use wardcall::devtools::twilio_emulator::EmulatorHandle;

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![example_sla::warning_at_75_breach_at_100_and_resolve_cancels]
}

const JORDAN: &str = "e0000000-0000-4000-8000-000000000001";
const SAM: &str = "e0000000-0000-4000-8000-000000000002";

async fn sla() -> (TestDb, App, EmulatorHandle) {
    let example = wardcall::devtools::demo::example("sla").expect("the sla example");
    let db = TestDb::new().await;
    db.exec(example.schema).await;
    db.exec(example.seed).await;
    let emulator = no_answer_emulator().await;
    let mut cfg = example.parse_config().unwrap();
    let t = cfg.providers.twilio.as_mut().unwrap();
    t.api_base = emulator.base_url();
    t.account_sid = ACCOUNT_SID.into();
    cfg.engine.poll_ms = 50;
    cfg.validate(example.config_file).unwrap();
    let app = start_app(&db, std::sync::Arc::new(cfg)).await;
    (db, app, emulator)
}

async fn create(db: &TestDb, nurse: &str, sla_minutes: f64) -> uuid::Uuid {
    sqlx::query_scalar(
        "INSERT INTO escalation_tasks (patient_id, action_type, sla_minutes, assigned_to) VALUES ('P-1', 'CALL_PATIENT', $1, $2::uuid) RETURNING id",
    )
    .bind(sla_minutes)
    .bind(nurse)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// (type, seconds from the task's creation to sent_at) of the task's notifications.
async fn log(db: &TestDb, task: uuid::Uuid) -> Vec<(String, f64)> {
    sqlx::query_as(
        "SELECT n.type, extract(epoch FROM n.sent_at - t.created_at)::float8 FROM notification_log n JOIN escalation_tasks t ON t.id = n.task_id
          WHERE n.task_id = $1 ORDER BY n.sent_at",
    )
    .bind(task)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

pub async fn warning_at_75_breach_at_100_and_resolve_cancels() {
    let (db, app, emulator) = sla().await;
    // 0.05 minutes = 3 s: warning at 2.25 s, breach at 3 s.
    let left = create(&db, JORDAN, 0.05).await;
    let resolved_after_warning = create(&db, SAM, 0.05).await;
    let resolved_at_once = create(&db, SAM, 0.05).await;
    db.exec(&format!("UPDATE escalation_tasks SET status = 'RESOLVED', resolved_at = now() WHERE id = '{resolved_at_once}'")).await;
    await_true(&db, "the warnings", Duration::from_secs(10), "SELECT count(*) = 2 FROM notification_log WHERE type = 'SLA_WARNING'").await;
    db.exec(&format!("UPDATE escalation_tasks SET status = 'RESOLVED', resolved_at = now() WHERE id = '{resolved_after_warning}'")).await;
    await_true(&db, "the breach", Duration::from_secs(10), "SELECT count(*) = 1 FROM notification_log WHERE type = 'SLA_BREACH'").await;
    // Every run has ended (the left one after its breach, the others
    // cancelled): nothing more can fire.
    await_true(
        &db,
        "every run to end",
        Duration::from_secs(10),
        "SELECT count(*) = 0 FROM wardcall.runs WHERE status IN ('pending','running','sleeping','waiting')",
    )
    .await;
    let l = log(&db, left).await;
    assert_eq!(l.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(), vec!["SLA_WARNING", "SLA_BREACH"]);
    assert!((2.25..3.25).contains(&l[0].1), "warning at {} s (75 % of 3 s is 2.25 s)", l[0].1);
    assert!((3.0..4.0).contains(&l[1].1), "breach at {} s (100 % is 3 s)", l[1].1);
    assert_eq!(log(&db, resolved_after_warning).await.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(), vec!["SLA_WARNING"]);
    assert!(log(&db, resolved_at_once).await.is_empty(), "resolving first cancels both");
    let priority: String = sqlx::query_scalar("SELECT priority FROM escalation_tasks WHERE id = $1").bind(left).fetch_one(&db.pool).await.unwrap();
    assert_eq!(priority, "URGENT");
    // Each notification is an SMS to the assigned nurse, delivered.
    let texts = emulator.messages();
    let to_jordan: Vec<_> = texts.iter().filter(|m| m.to == "+13855550301").collect();
    let to_sam: Vec<_> = texts.iter().filter(|m| m.to == "+13855550302").collect();
    assert_eq!((to_jordan.len(), to_sam.len()), (2, 1), "{texts:?}");
    assert!(to_jordan[0].body.starts_with("SLA warning") && to_jordan[1].body.starts_with("URGENT"), "{to_jordan:?}");
    await_true(&db, "delivery recorded", Duration::from_secs(5), "SELECT count(*) = 3 FROM wardcall.message_log WHERE delivered").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM wardcall.runs WHERE status = 'cancelled'").await, 2);
    app.stop(Duration::from_secs(2)).await;
    emulator.shutdown().await;
}
