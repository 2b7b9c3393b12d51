//! Smoke runs of every `wardcall bench` scenario with tiny sizes, through the
//! same code path as the command (`wardcall::devtools::bench::run_scenario`), on the
//! harness's server. They check that each scenario still runs and yields sane
//! figures; the figures themselves are not judged (BENCHMARKS.md is).

use std::time::Instant;
use wardcall::devtools::bench::{run_scenario, BenchOptions, Scenario, ScenarioReport, Sizes};

pub fn tests() -> Vec<libtest_mimic::Trial> {
    trials![
        bench_smoke::latency,
        bench_smoke::burst,
        bench_smoke::throughput,
        bench_smoke::steps,
        bench_smoke::timers,
        bench_smoke::scale,
        bench_smoke::resources,
        bench_smoke::flood,
        bench_smoke::bookings,
        bench_smoke::floor,
    ]
}

fn options() -> BenchOptions {
    BenchOptions {
        server: crate::harness::init().admin.clone(),
        database_prefix: format!("wardcall_it_bench_{}", std::process::id()),
        drop_databases: true,
        pool_size: None,
    }
}

async fn smoke(scenario: Scenario, sizes: Sizes) -> ScenarioReport {
    let t = Instant::now();
    let report = run_scenario(&options(), scenario, &sizes).await.unwrap_or_else(|e| panic!("bench {}: {e:#}", scenario.name()));
    eprint!("{}", wardcall::devtools::bench::render_table(&report));
    eprintln!("smoke {} took {:?}", scenario.name(), t.elapsed());
    report
}

fn get(r: &ScenarioReport, metric: &str) -> f64 {
    r.figure(metric).unwrap_or_else(|| panic!("{}: no figure {metric}", r.scenario))
}

/// A latency (or rate) figure that must be a positive finite number.
fn positive(r: &ScenarioReport, metric: &str) -> f64 {
    let v = get(r, metric);
    assert!(v.is_finite() && v > 0.0, "{}: {metric} = {v}", r.scenario);
    v
}

fn check_latencies(r: &ScenarioReport, prefix: &str, n: u64) {
    assert_eq!(get(r, &format!("{prefix}alerts")), n as f64);
    let p50 = positive(r, &format!("{prefix}p50"));
    let p99 = positive(r, &format!("{prefix}p99"));
    let max = positive(r, &format!("{prefix}max"));
    assert!(p50 <= p99 && p99 <= max, "{}: p50 {p50} p99 {p99} max {max}", r.scenario);
    assert!(max < 60_000.0, "{}: max {max} ms", r.scenario);
}

pub async fn latency() {
    let r = smoke(Scenario::Latency, Sizes { n: Some(20), ..Sizes::default() }).await;
    check_latencies(&r, "", 20);
    positive(&r, "stage_p50_trigger_to_run_created");
}

pub async fn burst() {
    let r = smoke(Scenario::Burst, Sizes { n: Some(20), ..Sizes::default() }).await;
    assert_eq!(get(&r, "alerts"), 20.0);
    let first = positive(&r, "first_call");
    let last = positive(&r, "last_call");
    assert!(first <= last);
}

pub async fn throughput() {
    let r = smoke(Scenario::Throughput, Sizes { n: Some(10), ..Sizes::default() }).await;
    for w in [1, 2, 4] {
        positive(&r, &format!("events_per_s_workers_{w}"));
        positive(&r, &format!("events_per_s_db_clock_workers_{w}"));
    }
}

pub async fn steps() {
    let r = smoke(Scenario::Steps, Sizes { n: Some(100), ..Sizes::default() }).await;
    assert_eq!(get(&r, "steps_completed"), 100.0);
    positive(&r, "steps_per_s");
}

pub async fn timers() {
    let r = smoke(Scenario::Timers, Sizes { n: Some(200), spread_s: 2.0, ..Sizes::default() }).await;
    for mode in ["instant", "spread"] {
        assert_eq!(get(&r, &format!("{mode}_fired")), 200.0, "{mode}");
        let p50 = get(&r, &format!("{mode}_lateness_p50"));
        let p99 = get(&r, &format!("{mode}_lateness_p99"));
        assert!(p50.is_finite() && p50 >= 0.0 && p50 <= p99, "{mode}: p50 {p50} p99 {p99}");
        assert!(get(&r, &format!("{mode}_lateness_min")) >= 0.0, "{mode}: a timer fired early");
    }
}

pub async fn scale() {
    let r = smoke(Scenario::Scale, Sizes { n: Some(2000), alerts: Some(20), ..Sizes::default() }).await;
    assert_eq!(get(&r, "sleeping_runs"), 2000.0);
    // Each database's rounds, pooled.
    let alerts = 20 * wardcall::devtools::bench::SCALE_ROUNDS;
    check_latencies(&r, "baseline_", alerts);
    check_latencies(&r, "scaled_", alerts);
    positive(&r, "p50_ratio");
    positive(&r, "p99_ratio");
    positive(&r, "baseline_stage_p50_run_created_to_intent");
    positive(&r, "scaled_stage_p50_run_created_to_intent");
}

pub async fn resources() {
    let r = smoke(Scenario::Resources, Sizes { n: Some(20), ..Sizes::default() }).await;
    let rest = positive(&r, "rss_at_rest");
    let peak = positive(&r, "rss_peak");
    assert!(rest < 4096.0 && peak < 4096.0, "rss {rest} / {peak} MB");
    let conns = positive(&r, "connections_peak");
    assert!(conns <= get(&r, "connections_limit"), "{conns} connections");
}

pub async fn flood() {
    let r = smoke(Scenario::Flood, Sizes { n: Some(300), ..Sizes::default() }).await;
    assert_eq!(get(&r, "flood_events"), 300.0);
    let call = positive(&r, "critical_first_call");
    let drain = positive(&r, "flood_drain");
    assert!(call < drain * 1000.0, "first call {call} ms, drain {drain} s");
    assert!(get(&r, "flood_unfinished_at_call") >= 0.0);
}

pub async fn bookings() {
    let r = smoke(Scenario::Bookings, Sizes { n: Some(20), spread_s: 2.0, ..Sizes::default() }).await;
    for mode in ["instant", "spread"] {
        assert_eq!(get(&r, &format!("{mode}_posted")), 20.0, "every booking posted once");
        let p50 = get(&r, &format!("{mode}_lateness_p50"));
        let p99 = get(&r, &format!("{mode}_lateness_p99"));
        assert!(p50.is_finite() && p50 <= p99 && p99 < 60_000.0, "{mode}: p50 {p50} p99 {p99}");
    }
}

pub async fn floor() {
    let r = smoke(Scenario::Floor, Sizes { n: Some(20), ..Sizes::default() }).await;
    assert_eq!(get(&r, "events"), 20.0);
    let (p50, p99, max) = (positive(&r, "p50"), positive(&r, "p99"), positive(&r, "max"));
    assert!(p50 <= p99 && p99 <= max && max < 60_000.0, "p50 {p50} p99 {p99} max {max}");
    // The listener may be woken before the client sees its own commit
    // return: that stage is about 0 and may come out negative.
    assert!(get(&r, "stage_p50_commit_to_woken").is_finite());
    for stage in ["woken_to_intent_committed", "intent_committed_to_request"] {
        positive(&r, &format!("stage_p50_{stage}"));
    }
}
