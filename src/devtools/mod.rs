//! Tooling that stands in for the outside world, or drives wardcall from it:
//! the demo, the benchmarks and the tests use it. The engine (every module
//! outside `devtools`) never imports it; `tests/it/layout.rs` checks that.
//!
//! - [`demo`]: `wardcall demo [name]`, and the shipped examples' fixtures
//!   (schema, seed, config), written once and used by the demo, the benchmarks
//!   and the tests ([`demo::EXAMPLES`]).
//! - [`bench`]: `wardcall bench <scenario>` (figures in BENCHMARKS.md).
//! - [`twilio_emulator`]: Twilio's Voice and Messaging APIs from the other side
//!   (`wardcall emulate twilio`).
//! - [`team_endpoint`]: a team's HTTP endpoint (the `http` step's target).

pub mod bench;
pub mod demo;
pub mod team_endpoint;
pub mod twilio_emulator;
