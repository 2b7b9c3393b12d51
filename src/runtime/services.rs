//! [`Services`]: what the engine lends to the steps of a run, to the webhook
//! handlers and to the workflows' background tasks. It is the narrow context
//! of DESIGN.md's layout principles: the database pool, the config, the
//! providers, who is acting, where webhooks come back, and the engine's
//! wake-ups; never the engine's loops, leases or health.

use crate::config::Config;
use crate::providers::Providers;
use sqlx::PgPool;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{watch, Notify};

/// The engine's services, cheap to clone (every field is shared).
#[derive(Clone)]
pub struct Services {
    /// The pool this work takes connections from (short transactions only):
    /// the engine's pool, or in the webhook handlers' copy
    /// ([`Services::for_webhooks`]) the webhooks' own.
    pub pool: PgPool,
    /// The webhooks' own pool, `engine.webhook_pool_size` connections opened
    /// on first use (application name `wardcall-webhooks`).
    pub webhook_pool: PgPool,
    /// The pool of the team's read-only lookups,
    /// `engine.team_read_pool_size` connections whose sessions are read-only
    /// with 2 s / 1 s statement and lock timeouts ([`crate::db::TeamReadPool`]).
    pub team_reads: crate::db::TeamReadPool,
    /// The loaded, checked config.
    pub config: Arc<Config>,
    /// The providers built from the config, with their secrets.
    pub providers: Arc<Providers>,
    /// Unique per process: `<hostname-ish>-<12 hex digits>`; lease owner.
    pub engine_id: Arc<str>,
    /// Public base URL of this engine's webhooks, without trailing slash.
    pub public_url: Arc<str>,
    /// State the workflows' side keeps once per engine, created on first use
    /// ([`Services::shared`]); the runtime never looks inside.
    pub(super) extensions: Arc<std::sync::Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>>,
    pub(super) wake_scheduler: Arc<Notify>,
    pub(super) call_sweeper: Arc<Notify>,
    pub(super) shutdown: watch::Receiver<bool>,
}

impl Services {
    /// A copy whose [`Services::pool`] is the webhooks' own pool, for the
    /// provider webhooks' handlers. A status callback that waits for a row
    /// lock (a call's first callback waits for its attempt while the worker
    /// records the send) then holds one of the webhooks' connections, not
    /// one the workers need; and during a burst's thousands of callbacks the
    /// workers keep their pool (BENCHMARKS.md, "Issue 9, fourth session").
    pub fn for_webhooks(&self) -> Services {
        Services { pool: self.webhook_pool.clone(), ..self.clone() }
    }

    /// This engine's one value of type `T`, made by `init` on first use and
    /// shared by every copy of these services (the webhooks' too), e.g. the
    /// record committer of `crate::notify::delivery`.
    pub fn shared<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        let mut map = self.extensions.lock().unwrap_or_else(|p| p.into_inner());
        let value = map.entry(TypeId::of::<T>()).or_insert_with(|| Arc::new(init()) as Arc<dyn Any + Send + Sync>).clone();
        drop(map);
        value.downcast::<T>().unwrap_or_else(|_| unreachable!("an extension is stored under its own type id"))
    }

    /// Runs `work` (database work only, on connections of [`Services::pool`]:
    /// a step's transaction, its reads; never a provider request) for at most
    /// `engine.database_deadline_ms`. Past it the pool is marked suspect and
    /// `work` is dropped: its connections, checked as they go back to the
    /// pool, are closed if they stay silent ([`crate::db::deadline::within_on`]).
    /// After a hard failover this is what keeps a step from waiting on a
    /// half-open connection for the kernel's retransmission timeout (about
    /// 15 minutes) while its lease is renewed: the step fails instead, is
    /// retried on a live connection, and the alert goes on (ARCHITECTURE.md,
    /// "PostgreSQL high availability").
    ///
    /// Errors: `work`'s own, or [`crate::db::deadline::NoReply`] (as
    /// `sqlx::Error::Io`, converted to `E`).
    pub async fn bounded<T, E: From<sqlx::Error>>(&self, work: impl std::future::Future<Output = Result<T, E>>) -> Result<T, E> {
        crate::db::deadline::within_on(&self.pool, self.config.engine.database_deadline(), work).await
    }

    /// The audit actor of this engine: `engine:<engine_id>`.
    pub fn actor(&self) -> String {
        format!("engine:{}", self.engine_id)
    }

    /// Wakes this engine's scheduler (a signal was delivered, a run became due).
    pub fn wake(&self) {
        self.wake_scheduler.notify_one();
    }

    /// Wakes the call sweeper (an alert closed: its calls may need ending).
    pub fn wake_call_sweeper(&self) {
        self.call_sweeper.notify_one();
    }

    /// Resolves when the call sweeper is woken (or at once if a wake-up is pending).
    pub async fn call_sweeper_woken(&self) {
        self.call_sweeper.notified().await
    }

    /// A receiver that turns `true` when the engine stops.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }
}
