//! wardcall's integration tests: one binary, against a real PostgreSQL.
//! `cargo test` runs them (with the unit tests). The harness starts one
//! embedded cluster (or uses `DATABASE_URL`), builds a migrated template
//! database, and gives each test a fresh clone.

macro_rules! trials {
    ($($module:ident :: $name:ident),* $(,)?) => {
        vec![$(
            libtest_mimic::Trial::test(concat!(stringify!($module), "::", stringify!($name)), || {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
                rt.block_on(crate::$module::$name());
                Ok(())
            }),
        )*]
    };
}

mod batching;
mod bench_smoke;
mod callbacks;
mod capture_runtime;
mod config_checks;
mod escalation;
mod example_bookings;
mod example_homecare;
mod example_hospital;
mod example_sla;
mod fail_safe;
mod harness;
mod http_surface;
mod layout;
mod outbound;
mod privacy_cluster;
mod recipients;
mod review_alert_path;
mod review_burst;
mod review_layout;
mod runtime_resilience;
mod sms;
mod workflow_hardening;
mod workflow_model;

use libtest_mimic::{Arguments, Trial};

fn main() {
    let args = Arguments::from_args();
    let tests = all_tests();
    let listing = args.list;
    if !listing {
        harness::init();
    }
    let conclusion = libtest_mimic::run(&args, tests);
    if !listing {
        harness::finish();
    }
    conclusion.exit();
}

fn all_tests() -> Vec<Trial> {
    let mut t = Vec::new();
    t.extend(capture_runtime::tests());
    t.extend(escalation::tests());
    t.extend(bench_smoke::tests());
    t.extend(fail_safe::tests());
    t.extend(privacy_cluster::tests());
    t.extend(config_checks::tests());
    t.extend(runtime_resilience::tests());
    t.extend(http_surface::tests());
    t.extend(workflow_model::tests());
    t.extend(workflow_hardening::tests());
    t.extend(sms::tests());
    t.extend(recipients::tests());
    t.extend(example_homecare::tests());
    t.extend(example_bookings::tests());
    t.extend(example_sla::tests());
    t.extend(example_hospital::tests());
    t.extend(outbound::tests());
    t.extend(layout::tests());
    t.extend(review_layout::tests());
    t.extend(batching::tests());
    t.extend(callbacks::tests());
    t.extend(review_burst::tests());
    t.extend(review_alert_path::tests());
    t
}
