//! Tooling that stands in for the outside world in the demo, the benchmarks
//! and the tests. The engine never imports it.
//!
//! - [`team_endpoint`]: a team's HTTP endpoint (the `http` step's target).

pub mod team_endpoint;
