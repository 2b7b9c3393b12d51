//! The step contract between the runtime and the workflows: what a step gets
//! ([`StepContext`]), what it answers ([`Transition`], [`StepError`]), the
//! work it hands to the commit transaction ([`CommitWork`]), and the
//! [`WorkflowHost`] through which the runtime asks the workflows (which it
//! does not know) to run a step, how to retry it and where a failed or
//! cancelled run goes. The runtime imports no workflow module.

use super::Services;
use crate::config::{Config, Workflow};
use crate::store::runs::ClaimedRun;
use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::PgConnection;
use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// What a step asks the runtime to do next.
#[derive(Debug, Clone)]
pub enum Transition {
    /// Commit and go on with `step` at once, keeping the lease.
    Next { step: String },
    /// Sleep `delay_ms` milliseconds (a row with a due time), then run `step`.
    Sleep { step: String, delay_ms: i64 },
    /// Sleep until `epoch_ms` (milliseconds since the Unix epoch, UTC), then run `step`.
    SleepUntil { step: String, epoch_ms: i64 },
    /// Wait for signal `signal` at most `timeout_ms` milliseconds, then run
    /// `step` with the outcome in [`StepContext::wait_outcome`].
    Wait { step: String, signal: String, timeout_ms: i64 },
    /// The run is finished.
    Complete,
    /// The run is finished in the `failed` state with this error (no retry).
    Fail { error: String },
    /// The run is finished in the `cancelled` state (after its `on_cancel` hook).
    Cancelled,
    /// Run the same step again after `delay_ms` milliseconds without counting
    /// an attempt (e.g. a circuit breaker is open: nothing was tried).
    Defer { delay_ms: i64 },
}

/// Work a step hands to the runtime to execute inside the transaction that
/// commits the step (after the run is locked with its fencing token, before
/// the transition is written), so that it takes effect exactly once with the
/// step's completion. It may update the run's state (a kept variable).
pub trait CommitWork: Send + Sync + std::fmt::Debug {
    /// Executes the work on `conn` (inside the commit transaction).
    /// Errors: the step's error; the runtime rolls the transaction back.
    fn apply<'a>(&'a self, conn: &'a mut PgConnection, input: &'a Value, state: &'a mut Value) -> BoxFuture<'a, Result<(), StepError>>;
}

/// Why a step did not produce a transition.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Worth retrying with backoff (database hiccup, provider 5xx, timeout).
    #[error("{0:#}")]
    Retryable(anyhow::Error),
    /// Retrying cannot help; the run fails at once, keeping the error.
    #[error("{0:#}")]
    Permanent(anyhow::Error),
    /// This engine no longer holds the run; nothing more may be written.
    #[error("lease lost")]
    LeaseLost,
    /// Worth retrying after exactly `delay_ms` milliseconds (the step chose
    /// it: its own backoff, or a provider's `Retry-After`); counts an attempt
    /// against [`RetryRule::max_attempts`].
    #[error("{error}")]
    RetryIn { error: String, delay_ms: i64 },
}

impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> Self {
        StepError::Retryable(e.into())
    }
}

/// Everything a step may use: the engine's [`Services`] (pool, config,
/// providers, actor, wake-ups), the claimed run, its workflow and state.
pub struct StepContext<'a> {
    pub services: &'a Services,
    pub run: &'a ClaimedRun,
    pub workflow: &'a Workflow,
    /// The run's state; committed with the step's transition.
    pub state: &'a mut Value,
    pub lease_lost: &'a Arc<AtomicBool>,
    /// Work to execute in the commit transaction of this step.
    pub in_commit: Vec<Box<dyn CommitWork>>,
    /// The place this execution holds: a worker slot, which a step that has
    /// placed its sends gives up while it records them ([`WorkerSlot::leave_for_records`]).
    pub slot: &'a WorkerSlot,
    /// What the dispatcher read ahead for a new run's first step
    /// ([`WorkflowHost::prefetch_first_step`]), given to the first step the
    /// run's first execution runs; `None` otherwise (a later step, a retry,
    /// a takeover, a run started by the scheduler).
    pub prefetched: Option<Prefetch>,
    /// The first tier the run's dispatch opened
    /// ([`WorkflowHost::first_tier_at_dispatch`]: the alert, without its
    /// message, and the tier's intents, committed), given to the first step
    /// of the run's first execution; `None` otherwise. A step given one must
    /// place those intents' sends and write the alert's message
    /// (`crate::store::alerts::write_message`).
    pub first_tier_opened: Option<DispatchedTier>,
    /// The state's changes as the step made them through
    /// [`StepContext::record_set`], when its workflow records them
    /// ([`WorkflowHost::records_state_changes`]): the runtime logs them as
    /// the step's patch instead of comparing the whole state with its
    /// snapshot. `None`: the runtime compares.
    pub recorded: Option<Vec<Value>>,
    /// Set when the step saved its state mid-way ([`StepContext::save_state`]):
    /// its transition then writes the whole state (a checkpoint), not a
    /// step-log patch against the state before the step.
    pub state_saved: &'a AtomicBool,
}

impl StepContext<'_> {
    /// Saves the state as it is now in the run's row, inside the step's
    /// fenced transaction `tx` (after `store::runs::lock_fenced`), e.g. the
    /// recipients a tier resolved, recorded with its intents so that an
    /// engine taking the run over calls the same people
    /// (`store::runs::save_state`). The step's transition will then
    /// checkpoint the whole state.
    ///
    /// Errors: a database error.
    pub async fn save_state(&self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        self.state_saved.store(true, std::sync::atomic::Ordering::Relaxed);
        crate::store::runs::save_state(tx, self.run.id, self.state).await
    }

    /// Sets the member at `path` of the run's state to `value` (`[]`: the
    /// whole state; objects on the way created or replaced) and records the
    /// change ([`crate::runtime::state_patch::set_member`]). A step of a
    /// workflow that records its changes must change its state through this
    /// alone (checked in debug builds: the recorded operations, replayed on
    /// the state before the step, must give the state after it).
    pub fn record_set(&mut self, path: &[&str], value: Value) {
        let op = crate::runtime::state_patch::set_member(self.state, path, value);
        if let Some(ops) = &mut self.recorded {
            ops.push(op);
        }
    }

    /// The outcome of the wait that preceded this step, if any:
    /// `{"signal": name, "payload": …}` or `{"timeout": true, "signal": name}`.
    pub fn wait_outcome(&self) -> Option<&Value> {
        self.run.wait_outcome.as_ref()
    }

    /// Fails fast when the lease renewal found the run taken over.
    pub fn check_lease(&self) -> Result<(), StepError> {
        if self.lease_lost.load(Ordering::SeqCst) {
            Err(StepError::LeaseLost)
        } else {
            Ok(())
        }
    }
}

/// A first tier opened by a run's dispatch ([`StepContext::first_tier_opened`]).
#[derive(Debug)]
pub struct DispatchedTier {
    /// Always `Opened`: the alert and, per recipient, (person id, attempt id).
    pub opened: crate::store::alerts::OpenedWithIntents,
    /// When the dispatch's statement was sent, on this process's monotonic
    /// clock: no later than the instant the run's lease was set, so that the
    /// time since tells how much of the lease may be left, however long the
    /// statement took to commit.
    pub sent_at: std::time::Instant,
}

/// A read started for a run's first step before the run's creation
/// committed ([`WorkflowHost::prefetch_first_step`]), running on a task of its
/// own; the step takes its value ([`Prefetch::take`]). Dropped untaken (its
/// run was not created, or not started here), the task runs to its end,
/// which the read's own bounds keep short: aborted mid-statement, it would
/// close its pooled connection, and a storm of repeated alarms would keep
/// the small pool reopening connections.
pub struct Prefetch(tokio::task::JoinHandle<Box<dyn Any + Send>>);

impl Prefetch {
    /// Starts `read` on a task of its own.
    pub fn spawn(read: BoxFuture<'static, Box<dyn Any + Send>>) -> Prefetch {
        Prefetch(tokio::spawn(read))
    }

    /// Waits for the read and returns its value if it is a `T`; `None` if
    /// it is of another type or its task failed (the step then reads for
    /// itself).
    pub async fn take<T: 'static>(self) -> Option<T> {
        self.0.await.ok()?.downcast::<T>().ok().map(|value| *value)
    }
}

impl std::fmt::Debug for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prefetch")
    }
}

/// How a failing step is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryRule {
    /// Attempts before the step fails for good (`u32::MAX`: never).
    pub max_attempts: u32,
    /// Upper bound of the delay between attempts, in milliseconds, below the
    /// workflow's `retry_max_ms`.
    pub cap_ms: Option<i64>,
}

/// What the runtime asks of the workflows. Implemented by
/// `crate::workflows::Host`; given to [`super::Engine::new`].
pub trait WorkflowHost: Send + Sync {
    /// Runs the current step of `ctx.run`.
    fn run_step<'a, 'c: 'a>(&'a self, ctx: &'a mut StepContext<'c>) -> BoxFuture<'a, Result<Transition, StepError>>;
    /// Whether runs of `w` are claimed and dispatched before other work.
    fn is_critical(&self, w: &Workflow) -> bool;
    /// Whether `run`'s current step (`run.step`) may run inside the claim's
    /// transaction instead of on a worker under a lease: true only for a
    /// step that performs no I/O (no provider, HTTP or lookup; its future
    /// never waits on anything but the CPU) and whose [`CommitWork`], if any,
    /// is a short write to wardcall's own tables (an `emit`), never a team's
    /// statement. The runtime then runs it while the claim holds the run's
    /// row, and commits its transition (if it parks or ends the run) with
    /// the claim, so the run takes one row version instead of two (DESIGN.md
    /// invariant 3 forbids locks held across I/O, which such a step has none of).
    fn runs_in_claim(&self, w: &Workflow, run: &ClaimedRun) -> bool;
    /// How `step` (a `runs.step` value) of `w` is retried.
    fn retry_rule(&self, w: &Workflow, step: &str) -> RetryRule;
    /// Where a run of `w` goes when `step` failed for good (a hook's first
    /// step), or `None` (the run ends `failed`).
    fn failure_hook(&self, w: &Workflow, step: &str) -> Option<String>;
    /// Cancels a live run inside the caller's transaction (`cancel_on`,
    /// `replace`). Returns false when it was not live.
    fn cancel_run_in<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        config: &'a Config,
        run: Uuid,
        actor: &'a str,
        reason: &'a str,
        replaced: bool,
    ) -> BoxFuture<'a, Result<bool, sqlx::Error>>;
    /// What `event` does to live runs of `w` with a matching key: for each
    /// key template (rendered over the event's payload), cancel them
    /// (`cancel_on`) or deliver the event as [`event_signal`] (a `wait`).
    fn keyed_routes(&self, w: &Workflow, event: &str) -> Vec<(String, KeyedRoute)>;
    /// Tasks the workflows run beside the engine's own for its lifetime
    /// (e.g. the call sweeper).
    fn background_tasks(&self, services: Services) -> Vec<BoxFuture<'static, ()>>;
    /// The reads a new run of `w` over the event payload `input` starts its
    /// first step with, if that step only needs the payload for them (an
    /// escalation's lookups), as a future the dispatcher starts as soon as
    /// the event is claimed, so that they run while the run's creation
    /// commits; its value reaches the step as [`StepContext::prefetched`].
    /// The future must only read (on the team-read pool) and be bounded: its
    /// value may go unused (the dispatch fails, a run is not created), and a
    /// step that gets none reads for itself. `None`: nothing to read ahead.
    fn prefetch_first_step(&self, services: &Services, w: &Workflow, input: &Value) -> Option<BoxFuture<'static, Box<dyn Any + Send>>>;
    /// The first tier a new run of `w` has its dispatch record, in the
    /// statement that creates the run (`crate::store::runs::claim_into_runs`),
    /// when that tier is fixed by the config alone: an escalation whose
    /// first step calls people of the config (no query: DESIGN.md invariant
    /// 7) by voice. The dispatch then opens the run's alert without its
    /// message and commits the tier's intents with the run, and the first
    /// step gets them as [`StepContext::first_tier_opened`]: it renders the
    /// message while the intents commit, places the calls and writes the
    /// message. Asked of direct dispatches only (every workflow of the event
    /// critical). `None` (the default): the step opens its tier itself.
    fn first_tier_at_dispatch(&self, _services: &Services, _w: &Workflow) -> Option<crate::store::alerts::TierIntents> {
        None
    }
    /// Whether `run`'s current step of `w` changes the run's state only
    /// through [`StepContext::record_set`], so that its recorded changes are
    /// its step-log patch and the runtime need not compare the whole state
    /// (a walk of it per step). Default: false.
    fn records_state_changes(&self, _w: &Workflow, _run: &ClaimedRun) -> bool {
        false
    }
}

/// What an event does to a live run with its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyedRoute {
    /// Cancel the run (its `on_cancel` hook runs).
    Cancel,
    /// Deliver the event to it as a signal (kept until it waits for it).
    Signal,
}

/// The signal name under which an event awaited by a run (matched by key)
/// is delivered to it.
pub fn event_signal(event: &str) -> String {
    format!("event:{event}")
}

/// Recording places per worker slot: how many executions may record their
/// sends without a worker slot, as a multiple of `engine.workers`. A burst's
/// records wait for the record committer (`crate::notify::delivery`, one
/// batch at a time) while its next runs take the freed worker slots; with
/// as many recording places as workers, 1,000 alerts were requested after
/// 5.3–6.5 s instead of 3.3–3.6 s (the workers waited for recording
/// places), so the backlog must hold a burst (BENCHMARKS.md, "Issue 9,
/// eighth session").
pub const RECORDING_PLACES_PER_WORKER: usize = 8;

/// Where a run's execution stands in the engine's concurrency limits: on one
/// of the `engine.workers` worker slots, or, once its step has placed its
/// sends, on a recording place, so that its worker slot starts
/// the next run while the sends are recorded ([`WorkerSlot::leave_for_records`]).
/// A step that runs inside a claim holds neither ([`WorkerSlot::none`]).
/// The execution keeps whichever it holds until it parks, ends or loses its
/// lease, or its transition goes on to a next step, which runs on a worker
/// slot again; the engine's shutdown waits for both kinds.
pub struct WorkerSlot {
    held: std::sync::Mutex<Held>,
    places: Option<Arc<RecordPlaces>>,
}

enum Held {
    Worker(#[allow(dead_code)] OwnedSemaphorePermit),
    Recording(#[allow(dead_code)] OwnedSemaphorePermit),
    Nothing,
}

/// The engine's worker slots, its recording places
/// ([`RECORDING_PLACES_PER_WORKER`] per worker slot) and the scheduler's
/// wake-up when a worker slot frees.
pub(crate) struct RecordPlaces {
    pub(crate) workers: Arc<Semaphore>,
    pub(crate) recording: Arc<Semaphore>,
    pub(crate) slot_freed: Arc<Notify>,
}

impl WorkerSlot {
    /// An execution on the worker slot `permit`.
    pub(crate) fn worker(permit: OwnedSemaphorePermit, places: Arc<RecordPlaces>) -> WorkerSlot {
        WorkerSlot { held: std::sync::Mutex::new(Held::Worker(permit)), places: Some(places) }
    }

    /// No slot: a step run inside a claim (it places no sends), or a test.
    pub fn none() -> WorkerSlot {
        WorkerSlot { held: std::sync::Mutex::new(Held::Nothing), places: None }
    }

    /// Called by a step whose sends are placed (the requests answered) and
    /// that only records their results from here: trades the worker slot for
    /// a recording place (waiting while every recording place is taken, so
    /// at most [`RECORDING_PLACES_PER_WORKER`] × `engine.workers` executions
    /// record at once besides the workers), and wakes the scheduler to start
    /// the next run on the freed slot. Does nothing on a second call or
    /// without a slot.
    pub async fn leave_for_records(&self) {
        let Some(places) = &self.places else { return };
        if !matches!(*self.held.lock().unwrap_or_else(|p| p.into_inner()), Held::Worker(_)) {
            return;
        }
        if let Ok(recording) = places.recording.clone().acquire_owned().await {
            let worker = std::mem::replace(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()), Held::Recording(recording));
            drop(worker);
            places.slot_freed.notify_one();
        }
    }

    /// Before the run's next step (its transition went on with `Next`): an
    /// execution on a recording place gives it back, then waits for a worker
    /// slot (holding nothing meanwhile, so no cycle with executions waiting
    /// for a recording place), so that steps only ever run on worker slots.
    pub(crate) async fn rejoin_workers(&self) {
        let Some(places) = &self.places else { return };
        if !matches!(*self.held.lock().unwrap_or_else(|p| p.into_inner()), Held::Recording(_)) {
            return;
        }
        drop(std::mem::replace(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()), Held::Nothing));
        if let Ok(worker) = places.workers.clone().acquire_owned().await {
            *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Held::Worker(worker);
        }
    }
}
