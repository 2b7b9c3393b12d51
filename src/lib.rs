//! wardcall: a Postgres-native alert escalation engine for care teams.
//!
//! A critical row commits in the team's own table; a trigger writes an outbox
//! row in the same transaction; the engine turns it into a durable run that
//! calls people by an escalation policy until someone presses 1, writes the
//! outcome back into the team's row and keeps an append-only audit trail.
//! See ARCHITECTURE.md for the map of this crate.

pub mod app;
pub mod capture;
pub mod config;
pub mod db;
pub mod devtools;
pub mod http;
pub mod notify;
pub mod outbound;
pub mod providers;
pub mod runtime;
pub mod status;
pub mod store;
pub mod template;
pub mod workflows;
