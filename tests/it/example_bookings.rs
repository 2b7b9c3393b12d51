//! The bookings example (SCENARIOS.md §2) on its own schema
//! (`examples/bookings/`): the nine follow-up spellings, write-back within a
//! second, the POST at `scheduled_at` to a real local HTTP server, retries,
//! the dead letter, reschedule and cancel, and the circuit breaker.

use crate::harness::*;
use std::time::Duration;
use wardcall::app::App;
use wardcall::devtools::team_endpoint::{Behaviour, TeamEndpoint};

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        example_bookings::follow_ups_are_scheduled_posted_at_their_time_and_done,
        example_bookings::reschedule_moves_the_task_and_cancel_cancels_it,
        example_bookings::endpoint_down_dead_letters_opens_the_breaker_and_recovers,
    ]
}

const FOLLOW_UPS: [&str; 9] =
    ["follow_up", "FOLLOW-UP", "Auto-Follow-Up", "followup", "auto_follow_up", "auto_followup", "Manual_Followup", "manual_follow_up", "scheduled_call"];

struct Bookings {
    db: TestDb,
    app: App,
    endpoint: TeamEndpoint,
}

/// The example's schema and config, its endpoint pointed at a local server.
async fn bookings(behaviour: Behaviour, configure: impl FnOnce(&mut wardcall::config::Config)) -> Bookings {
    let example = wardcall::devtools::demo::example("bookings").expect("the bookings example");
    let db = TestDb::new().await;
    db.exec(example.schema).await;
    let endpoint = TeamEndpoint::start(behaviour).await.unwrap();
    let mut cfg = example.parse_config().unwrap();
    cfg.endpoints[0].url = format!("{}/bookings", endpoint.base_url());
    cfg.engine.poll_ms = 50;
    cfg.engine.sweep_ms = 100;
    configure(&mut cfg);
    cfg.validate(example.config_file).unwrap();
    let app = start_app(&db, std::sync::Arc::new(cfg)).await;
    Bookings { db, app, endpoint }
}

impl Bookings {
    async fn stop(self) {
        self.app.stop(Duration::from_secs(2)).await;
    }

    async fn insert(&self, booking_type: &str, status: &str, due_in_ms: i64) -> uuid::Uuid {
        sqlx::query_scalar(
            "INSERT INTO lead_bookings (tenant_id, lead_id, booking_type, scheduled_at, task_status)
             VALUES (gen_random_uuid(), gen_random_uuid(), $1, clock_timestamp() + $2 * interval '1 millisecond', $3) RETURNING id",
        )
        .bind(booking_type)
        .bind(due_in_ms)
        .bind(status)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    /// (task_status, task_name)
    async fn row(&self, id: uuid::Uuid) -> (String, Option<String>) {
        sqlx::query_as("SELECT task_status, task_name FROM lead_bookings WHERE id = $1").bind(id).fetch_one(&self.db.pool).await.unwrap()
    }

    async fn await_status(&self, id: uuid::Uuid, status: &str, timeout: Duration) {
        await_true(
            &self.db,
            &format!("booking {id} to be {status}"),
            timeout,
            &format!("SELECT task_status = '{status}' FROM lead_bookings WHERE id = '{id}'"),
        )
        .await;
    }

    fn posts_for(&self, id: uuid::Uuid) -> Vec<wardcall::devtools::team_endpoint::ReceivedRequest> {
        self.endpoint.received().into_iter().filter(|r| r.path == format!("/bookings/tasks/{id}")).collect()
    }
}

pub async fn follow_ups_are_scheduled_posted_at_their_time_and_done() {
    // The endpoint fails the first two requests: the task is retried with backoff.
    let h = bookings(Behaviour::FailNext { n: 2, status: 503 }, |c| {
        if let Some(http) = c.workflows[0].steps.iter_mut().find_map(|s| s.http.as_mut()) {
            http.retry.base_ms = 100;
        }
    })
    .await;
    let mut ids = Vec::new();
    for (i, t) in FOLLOW_UPS.iter().enumerate() {
        ids.push(h.insert(t, "pending", 2500 + 50 * i as i64).await);
    }
    let other = h.insert("demo", "pending", 2500).await;
    let not_pending = h.insert("follow_up", "done", 2500).await;
    // Within a second: every follow-up is scheduled with its task name.
    await_true(&h.db, "the nine follow-ups to be scheduled", Duration::from_secs(1), "SELECT count(*) = 9 FROM lead_bookings WHERE task_status = 'scheduled'")
        .await;
    for id in &ids {
        let (status, name) = h.row(*id).await;
        let epoch: i64 = sqlx::query_scalar("SELECT floor(extract(epoch FROM scheduled_at))::bigint FROM lead_bookings WHERE id = $1")
            .bind(id)
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
        assert_eq!((status.as_str(), name), ("scheduled", Some(format!("followup-{id}-{epoch}"))));
        assert!(h.posts_for(*id).is_empty(), "nothing is posted before scheduled_at");
    }
    assert_eq!(h.row(other).await, ("pending".to_string(), None), "another booking type schedules nothing");
    assert_eq!(h.row(not_pending).await, ("done".to_string(), None), "only pending rows schedule");
    // At scheduled_at: one successful POST per booking (after the two failures), then done.
    for id in &ids {
        h.await_status(*id, "done", Duration::from_secs(20)).await;
    }
    let total = h.endpoint.received().len();
    assert_eq!(total, 9 + 2, "nine tasks, two of whose requests failed and were retried");
    for id in &ids {
        let posts = h.posts_for(*id);
        let ok: Vec<_> = posts.iter().filter(|p| p.status == 200).collect();
        assert_eq!(ok.len(), 1, "one successful POST for {id}");
        let p = ok[0];
        assert_eq!(p.method, "POST");
        assert_eq!(p.body["booking_id"], id.to_string());
        assert!(p.body["task_name"].as_str().unwrap().starts_with("followup-"), "{}", p.body);
        // Every attempt of a task carries the same idempotency key.
        assert!(posts.iter().all(|q| q.idempotency_key == p.idempotency_key && q.idempotency_key.is_some()));
        let due: jiff::Timestamp = p.body["scheduled_at"].as_str().unwrap().parse().unwrap();
        let first = posts.iter().map(|q| q.at).min().unwrap();
        let lateness_ms = first.as_millisecond() - due.as_millisecond();
        assert!((0..1500).contains(&lateness_ms), "the first POST came {lateness_ms} ms after scheduled_at");
    }
    h.stop().await;
}

pub async fn reschedule_moves_the_task_and_cancel_cancels_it() {
    let h = bookings(Behaviour::Up, |_| {}).await;
    let moved = h.insert("follow_up", "pending", 1500).await;
    let cancelled = h.insert("follow_up", "pending", 1500).await;
    await_true(&h.db, "both to be scheduled", Duration::from_secs(1), "SELECT count(*) = 2 FROM lead_bookings WHERE task_status = 'scheduled'").await;
    let first_name = h.row(moved).await.1.unwrap();
    // Rescheduled to 3.5 s from now; the other one is cancelled by the team.
    h.db.exec(&format!("UPDATE lead_bookings SET scheduled_at = clock_timestamp() + interval '3.5 seconds' WHERE id = '{moved}'")).await;
    h.db.exec(&format!("UPDATE lead_bookings SET task_status = 'cancelled' WHERE id = '{cancelled}'")).await;
    await_true(&h.db, "the new task name", Duration::from_secs(2), &format!("SELECT task_name <> '{first_name}' FROM lead_bookings WHERE id = '{moved}'"))
        .await;
    assert_eq!(h.row(moved).await.0, "scheduled");
    // The run of the old time is cancelled (replaced): it can never fire.
    await_true(&h.db, "the old run to be replaced", Duration::from_secs(5), "SELECT count(*) = 2 FROM wardcall.runs WHERE status = 'cancelled'").await;
    assert!(h.posts_for(moved).is_empty(), "the old time fired nothing");
    h.await_status(moved, "done", Duration::from_secs(10)).await;
    let posts = h.posts_for(moved);
    assert_eq!(posts.len(), 1, "one POST, at the new time");
    let due: jiff::Timestamp = posts[0].body["scheduled_at"].as_str().unwrap().parse().unwrap();
    let new_due: f64 = sqlx::query_scalar("SELECT extract(epoch FROM scheduled_at)::float8 * 1000 FROM lead_bookings WHERE id = $1")
        .bind(moved)
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(due.as_millisecond(), new_due as i64, "the POST carries the new time");
    assert!(posts[0].at.as_millisecond() >= new_due as i64, "posted at or after the new time");
    assert_eq!(h.row(cancelled).await.0, "cancelled");
    assert!(h.posts_for(cancelled).is_empty(), "a cancelled booking posts nothing");
    assert_eq!(h.db.scalar_i64("SELECT count(*) FROM wardcall.audit_log WHERE action = 'run.replaced'").await, 1);
    h.stop().await;
}

pub async fn endpoint_down_dead_letters_opens_the_breaker_and_recovers() {
    let h = bookings(Behaviour::Down, |c| {
        c.endpoints[0].failure_threshold = 3;
        c.endpoints[0].cooldown_ms = 1500;
        if let Some(http) = c.workflows[0].steps.iter_mut().find_map(|s| s.http.as_mut()) {
            http.retry.max_attempts = 3;
            http.retry.base_ms = 100;
            http.retry.max_ms = 200;
        }
    })
    .await;
    let id = h.insert("followup", "pending", 100).await;
    // Three failed attempts: the run is a dead letter and the row is failed.
    h.await_status(id, "failed", Duration::from_secs(15)).await;
    assert_eq!(h.posts_for(id).len(), 3);
    // The row is written failed by the on_failure hook's first step; the run
    // itself ends failed (a dead letter) when the hook has run.
    await_true(
        &h.db,
        "the run to be a dead letter",
        Duration::from_secs(5),
        &format!("SELECT count(*) = 1 FROM wardcall.dead_letters WHERE run_id = (SELECT id FROM wardcall.runs WHERE input->>'id' = '{id}')"),
    )
    .await;
    let breaker: String = sqlx::query_scalar("SELECT state FROM wardcall.http_endpoints WHERE name = 'executor'").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(breaker, "open", "three consecutive failures opened the breaker");
    // While it is open, a new task waits: nothing is sent, no attempt is spent.
    let second = h.insert("follow_up", "pending", 0).await;
    h.await_status(second, "scheduled", Duration::from_secs(2)).await;
    // Its http step was tried and put off by the open breaker.
    await_true(
        &h.db,
        "the second task's http step to be deferred",
        Duration::from_secs(5),
        &format!("SELECT EXISTS (SELECT 1 FROM wardcall.audit_log a JOIN wardcall.runs r ON a.entity_id = r.id::text WHERE a.action = 'run.deferred' AND r.input->>'id' = '{second}')"),
    )
    .await;
    assert!(h.posts_for(second).is_empty(), "nothing sent while the breaker is open");
    // The endpoint recovers: after the cool-down one probe closes the breaker and the task is done.
    h.endpoint.set_behaviour(Behaviour::Up);
    h.await_status(second, "done", Duration::from_secs(15)).await;
    assert_eq!(h.posts_for(second).len(), 1);
    let breaker: String = sqlx::query_scalar("SELECT state FROM wardcall.http_endpoints WHERE name = 'executor'").fetch_one(&h.db.pool).await.unwrap();
    assert_eq!(breaker, "closed");
    h.stop().await;
}
