//! The hospital example (SCENARIOS.md §1) as shipped (`examples/hospital/`):
//! the same INSERT and write-back as before the workflow model, plus the SMS
//! fallback when a call fails, acknowledgement by SMS reply (`acknowledged_by`
//! naming the channel), and resolving at the bedside stopping the calls.

use crate::escalation::{start_with, NURSE_A, SEIZURE_INSERT};
use crate::harness::*;
use serde_json::Value;
use std::time::Duration;
use wardcall::devtools::twilio_emulator::{Persona, SmsPersona};

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![example_hospital::busy_nurse_is_texted_and_acknowledges_by_reply, example_hospital::resolved_at_the_bedside_stops_the_calls]
}

/// The hospital's Twilio number in the shipped config.
const HOSPITAL_NUMBER: &str = "+13855550100";

fn shipped_tiers(cfg: &mut wardcall::config::Config) {
    // As shipped: SMS fallback on every tier (the voice tests turn it off).
    for s in &mut cfg.policies[0].steps {
        s.sms_fallback = true;
    }
}

pub async fn busy_nurse_is_texted_and_acknowledges_by_reply() {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let h = start_with(db, Persona::Busy, Persona::NoAnswer, shipped_tiers).await;
    h.emulator.set_sms_persona(NURSE_A, SmsPersona::Reply { delay_ms: 300, body: " 1 ".into() });
    h.emulator.set_messaging_webhook(HOSPITAL_NUMBER, &wardcall::providers::twilio::inbound_sms_url(&h.app.engine.public_url));
    h.db.exec(SEIZURE_INSERT).await;
    await_true(&h.db, "the alert to be acknowledged", Duration::from_secs(20), "SELECT count(*) = 1 FROM alerts WHERE status = 'acknowledged'").await;
    let (by, meta): (String, Value) = sqlx::query_as("SELECT acknowledged_by, metadata FROM alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(by, "nurse_sms", "acknowledged_by names the channel");
    assert_eq!(meta["call"]["call_status"], "replied");
    assert!(meta["call"]["call_id"].as_str().is_some_and(|s| s.starts_with("CA")), "the call's id is kept: {meta}");
    assert!(meta["call"]["message_id"].as_str().is_some_and(|s| s.starts_with("SM")), "{meta}");
    // The backup was never called: the text reached a human first.
    assert!(h.emulator.calls().iter().all(|c| c.to == NURSE_A), "only nurse A was called");
    let texts = h.emulator.messages();
    assert_eq!(texts.len(), 1);
    assert!(texts[0].body.contains("Seizure Activity Detected") && texts[0].body.ends_with("Reply 1 to acknowledge."), "{}", texts[0].body);
    h.app.stop(Duration::from_secs(2)).await;
}

pub async fn resolved_at_the_bedside_stops_the_calls() {
    let db = TestDb::new().await;
    db.exec(wardcall::devtools::demo::HOSPITAL_SCHEMA).await;
    let h = start_with(db, Persona::NoAnswer, Persona::NoAnswer, shipped_tiers).await;
    h.db.exec(SEIZURE_INSERT).await;
    await_some("nurse A's phone to ring", Duration::from_secs(10), || async { (!h.emulator.calls().is_empty()).then_some(()) }).await;
    h.db.exec("UPDATE alerts SET status = 'resolved'").await;
    await_true(&h.db, "the run to be cancelled", Duration::from_secs(10), "SELECT count(*) = 1 FROM wardcall.runs WHERE status = 'cancelled'").await;
    await_true(
        &h.db,
        "the call to be ended",
        Duration::from_secs(10),
        "SELECT count(*) = 0 FROM wardcall.notification_attempts WHERE status IN ('requested','initiated','ringing','in-progress')",
    )
    .await;
    let status: String = sqlx::query_scalar("SELECT status FROM alerts").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(status, "resolved", "the team's row is left as the team wrote it");
    assert_eq!(h.emulator.calls().len(), 1, "nobody else was called");
    assert!(h.emulator.messages().is_empty(), "no text after the alert was resolved");
    h.app.stop(Duration::from_secs(2)).await;
}
