//! The SQL of wardcall's own tables (the `wardcall` schema; migrations in
//! `src/db/migrations`), one module per group of tables. Everything else asks
//! these functions; SQL over the *team's* tables (lookups, write-backs,
//! recipients queries, `sql` steps) is the team's configuration and runs
//! through `crate::workflows::team_sql` and `crate::notify::recipients`.
//!
//! - [`runs`]: runs, leases and fencing tokens, waits, signals, the outbox
//!   claim and the dispatcher's bookkeeping.
//! - [`alerts`]: alerts, their status and the "nobody to call" alarm.
//! - [`attempts`]: notification attempts on every channel (intents, results,
//!   reconciliation).
//! - [`audit`]: the append-only audit log.
//! - [`sources`]: the capture triggers installed on the team's tables.
//! - [`webhooks`]: receipts of providers' webhooks (replays).
//! - [`outbox`]: events emitted by the API, the CLI and `emit` steps.
//! - [`outbound`]: outgoing HTTP intents, outcomes and circuit breakers.
//! - [`write_backs`]: write-backs left out of a batch of send records, kept
//!   until they are written.
//!
//! Lock order, everywhere: the run row first, then the alert row, then
//! notification attempts.

pub mod alerts;
pub mod attempts;
pub mod audit;
pub mod outbound;
pub mod outbox;
pub mod runs;
pub mod sources;
pub mod webhooks;
pub mod write_backs;
