//! The durable runtime: turns outbox rows into runs and executes their steps.
//!
//! Tasks of one engine process (any number of engines may share a database):
//! - **listener**: a dedicated connection, outside the pool (a one-connection
//!   pool of its own, `application_name = wardcall-listener`), LISTENing on
//!   `wardcall_outbox` and `wardcall_wake`. A notification only wakes the
//!   dispatcher or the scheduler. After `engine.heartbeat_ms` without traffic it
//!   sends `SELECT 1`, which must answer within `engine.heartbeat_ms`; a silent
//!   connection (a frozen backend, a dead network path) is thus found within two
//!   heartbeats, dropped and reopened. After every reconnect the outbox is
//!   drained (notifications sent while the connection was down are lost, by
//!   PostgreSQL's design).
//! - **dispatcher**: drains unprocessed outbox rows on start, on every wake-up
//!   and every `engine.sweep_ms` (≤ 1 s), creating one run per workflow bound
//!   to the event; rows whose event starts a critical workflow are taken first. Runs it can execute at once are created already leased to
//!   this engine (saving a claim round trip); the rest are `pending`.
//! - **scheduler**: claims due runs (`FOR UPDATE SKIP LOCKED`, lease, fencing
//!   token) up to the free worker slots, critical runs first, and executes
//!   them; it sleeps until the next due time (capped at `engine.poll_ms`) or a
//!   wake-up.
//!
//! [`Health`] records each task's last sign of life; [`Engine::health_report`]
//! (served as `/healthz`) turns it, and the capture triggers, into problems.
//!
//! A step's side effects happen outside any transaction; its transition is
//! committed only if the fencing token still matches ([`store::commit_transition`]).

pub mod dead_letters;
pub mod direct_dispatch;
mod services;
pub mod state_patch;
pub mod step;
pub use services::Services;

use crate::config::{Config, EngineConfig, Workflow};
use crate::db::deadline::{self, within, HeldConnection};
use crate::db::Database;
use crate::providers::Providers;
use crate::store::runs::{self as store, ClaimedRun, Parking, WaitResolution};
use serde_json::Value;
use sqlx::postgres::PgListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use step::{Prefetch, RecordPlaces, StepContext, StepError, Transition, WorkerSlot, WorkflowHost};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::task::JoinSet;

/// Advisory lock key that serialises outbox dispatch across engines
/// ("wardcall dispatch"; PostgreSQL manual 9.27.10 "Advisory Lock Functions").
pub const DISPATCH_LOCK_KEY: i64 = 0x7764_6973_7061_7463;

/// Channel that wakes schedulers (a run became due: a signal, new pending runs).
pub const WAKE_CHANNEL: &str = "wardcall_wake";

/// `application_name` of the listener's connection (seen in `pg_stat_activity`).
pub const LISTENER_APPLICATION_NAME: &str = "wardcall-listener";

/// Milliseconds without a loop iteration after which the scheduler or the
/// dispatcher counts as stalled: `max(5000, 10 × max(poll_ms, sweep_ms))`.
/// Both loops iterate at least every `poll_ms`/`sweep_ms` when healthy.
pub fn stall_after_ms(e: &EngineConfig) -> u64 {
    (10 * e.poll_ms.max(e.sweep_ms)).max(5000)
}

/// Last signs of life of an engine's tasks (lock-free; read by `/healthz`).
/// Instants are milliseconds since the engine was created (monotonic clock).
pub struct Health {
    epoch: Instant,
    listener_up: AtomicBool,
    listener_beat: AtomicU64,
    scheduler_beat: AtomicU64,
    dispatcher_beat: AtomicU64,
}

impl Health {
    fn new() -> Health {
        Health {
            epoch: Instant::now(),
            listener_up: AtomicBool::new(false),
            listener_beat: AtomicU64::new(0),
            scheduler_beat: AtomicU64::new(0),
            dispatcher_beat: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn beat(&self, cell: &AtomicU64) {
        cell.store(self.now_ms(), Ordering::Relaxed);
    }

    fn set_listener(&self, up: bool) {
        self.listener_up.store(up, Ordering::Relaxed);
        if up {
            self.beat(&self.listener_beat);
        }
    }

    /// Whether the listener's connection is open and answered its last heartbeat.
    pub fn listener_up(&self) -> bool {
        self.listener_up.load(Ordering::Relaxed)
    }

    /// Milliseconds since the listener last heard from the server.
    pub fn listener_silent_ms(&self) -> u64 {
        self.now_ms().saturating_sub(self.listener_beat.load(Ordering::Relaxed))
    }

    /// Milliseconds since the scheduler loop last began an iteration.
    pub fn scheduler_idle_ms(&self) -> u64 {
        self.now_ms().saturating_sub(self.scheduler_beat.load(Ordering::Relaxed))
    }

    /// Milliseconds since the dispatcher loop last began an iteration.
    pub fn dispatcher_idle_ms(&self) -> u64 {
        self.now_ms().saturating_sub(self.dispatcher_beat.load(Ordering::Relaxed))
    }
}

/// What `/healthz` answers: healthy, or the list of problems (no patient data).
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthReport {
    /// True when `problems` is empty.
    pub healthy: bool,
    /// One sentence per problem, naming the part (`listener`, `scheduler`,
    /// `dispatcher`, `source <name>`, `database`).
    pub problems: Vec<String>,
}

/// Shared state of one engine process.
pub struct Engine {
    pub db: Database,
    pub config: Arc<Config>,
    /// Unique per process: `<hostname-ish>-<uuid>`; lease owner and audit actor.
    pub engine_id: String,
    pub providers: Arc<Providers>,
    /// Public base URL of this engine's webhooks, without trailing slash.
    pub public_url: String,
    /// What steps, webhooks and the workflows' tasks get of this engine.
    pub services: Services,
    slots: Arc<Semaphore>,
    /// Wakes the scheduler to claim at once (a run became due: a signal,
    /// new pending runs, a `wait` whose signal had arrived).
    wake_scheduler: Arc<Notify>,
    /// A worker slot was freed (a run parked, finished or lost its lease):
    /// the scheduler claims once enough slots are free ([`CLAIM_COALESCE_WINDOW`]).
    slot_freed: Arc<Notify>,
    /// Where executions record their placed sends without a worker slot
    /// ([`WorkerSlot::leave_for_records`]).
    record_places: Arc<RecordPlaces>,
    /// Counts of the scheduler's claims.
    claims: ClaimStats,
    /// Claims whose commit is in flight ([`CLAIMS_IN_FLIGHT`]).
    claim_flights: Arc<Semaphore>,
    /// A claim's commit landed (its runs are leased or written).
    claim_landed: Notify,
    wake_dispatcher: Notify,
    call_sweeper: Arc<Notify>,
    shutdown: watch::Sender<bool>,
    health: Health,
    /// The workflows, behind the step contract.
    host: Arc<dyn WorkflowHost>,
    /// The events a direct dispatch serves ([`direct_dispatch`]).
    direct_routes: direct_dispatch::DirectRoutes,
    /// Step transitions on their way to the group committer.
    group: GroupCommit,
    /// Places for non-critical steps' own commit transactions (a `sql`
    /// step's statement, an `emit`: [`step::CommitWork`]), which hold a pooled
    /// connection for as long as the team's statement runs: half of
    /// `engine.pool_size` ([`commit_work_places`]). With more workers than
    /// connections, a flood of slow `sql` steps would otherwise take the
    /// whole pool (it is first come, first served), and a critical alert's
    /// dispatch and steps, the lease renewals and the webhooks would queue
    /// behind it (DESIGN.md invariants 3 and 10).
    commit_work: Arc<Semaphore>,
}

/// Non-critical steps' commit transactions with work in flight at once
/// (see `Engine::commit_work`): half of the pool, at least one.
pub fn commit_work_places(pool_size: u32) -> usize {
    (pool_size as usize / 2).max(1)
}

/// Most step transitions the group committer commits in one statement
/// ([`store::commit_transitions`]). Chosen with `wardcall bench steps` and
/// `burst` (BENCHMARKS.md, "Issue 9"): larger batches gained nothing measurable.
pub const GROUP_COMMIT_MAX: usize = 128;

/// Transitions at which a forming batch is committed at once although
/// other group commits are in flight (see [`GROUP_COMMIT_WINDOW`]).
pub const GROUP_COMMIT_MIN: usize = 32;

/// How long a batch of non-critical transitions may wait for more while
/// other group commits are in flight, before it is committed however
/// small: a batch is committed at once when no commit is in flight, else
/// when it holds [`GROUP_COMMIT_MIN`] transitions or after this window.
/// Without it, the first transitions of a cohort of runs (a claim of many
/// due timers) each took a flight of their own, and most group commits held
/// one to three transitions (BENCHMARKS.md, "Issue 9, part 2: timers in
/// bulk"). A critical run's transition is committed at once by its worker
/// when a flight is free and nothing is queued ([`Engine::commit_grouped`]).
pub const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(2);

/// Most outbox rows one dispatch transaction turns into runs.
pub const DISPATCH_BATCH_MAX: i64 = 500;

/// Fewest outbox rows the first dispatch after a wake-up takes (it takes
/// about as many as there are free workers; see `dispatcher_loop`).
pub const DISPATCH_FIRST_BATCH_MIN: i64 = 32;

/// Most runs one claim takes ([`store::lock_due`]), in one transaction; a
/// claim takes at most as many as there are free workers.
pub const CLAIM_MAX: usize = 256;

/// How long the scheduler, while due runs are waiting for free workers (its
/// last claim took all it asked for), waits after the first worker frees
/// for more to free before it claims: claims then take many runs each
/// instead of one or two (every claim is a statement and a durable commit).
/// It claims at once when [`claim_coalesce_slots`] workers are free, when
/// woken for a run that became due (a signal, new pending runs), or when a
/// critical run is due ([`store::critical_run_due`], asked when the first
/// worker frees), so that a critical alert is never held back by it
/// (DESIGN.md invariant 10). Chosen with `wardcall bench timers`
/// (BENCHMARKS.md, "Issue 9, part 2: timers in bulk").
pub const CLAIM_COALESCE_WINDOW: Duration = Duration::from_millis(5);

/// The longest the scheduler waits between claims while runs are due that
/// its last claim could not take because another transaction holds their
/// rows (it backs off 1, 2, 4 … ms up to this, or `engine.poll_ms` if
/// shorter), and never past the due time of the next run still ahead. A
/// wake (a signal, a run made due, a worker freeing) claims at once.
/// Before, it claimed every millisecond for as long as the lock was held:
/// about three hundred claims and as many due-time queries a second
/// (BENCHMARKS.md, "Issue 9, seventh session").
pub const LOCKED_DUE_POLL_MAX: Duration = Duration::from_millis(50);

/// Claims whose commit may be in flight at once: the scheduler locks the
/// next due runs and runs their steps while the last claim's transitions
/// and leases commit (on another connection, another core of PostgreSQL).
/// Chosen with `wardcall bench timers` (BENCHMARKS.md, "Issue 9, sixth session").
pub const CLAIMS_IN_FLIGHT: usize = 2;

/// How long claims run no step inside them after one that did failed (and
/// was claimed again with leases only).
pub const STEPS_IN_CLAIM_PAUSE: Duration = Duration::from_secs(1);

/// Free workers at which the scheduler claims without waiting out
/// [`CLAIM_COALESCE_WINDOW`]: a quarter of `engine.workers`, at least one,
/// at most [`CLAIM_MAX`].
pub fn claim_coalesce_slots(workers: usize) -> usize {
    (workers / 4).clamp(1, CLAIM_MAX)
}

/// Counts of an engine's claims of due runs (read with [`Engine::claim_stats`]).
#[derive(Debug, Default)]
pub struct ClaimStats {
    /// Claim transactions run ([`store::lock_due`]), empty ones included.
    pub claims: AtomicU64,
    /// Runs those claims leased to workers.
    pub runs: AtomicU64,
    /// Runs whose step ran inside the claim and whose transition was
    /// committed with it, without a lease (`WorkflowHost::runs_in_claim`).
    pub fired_in_claim: AtomicU64,
    /// Claims that took no run.
    pub empty: AtomicU64,
    /// The most runs one claim took (leased or run inside it).
    pub largest: AtomicU64,
    /// Whether the last claim ran steps inside it (the next one then looks
    /// at up to [`CLAIM_MAX`] due runs, free workers or not).
    pub fired_last: AtomicBool,
    /// Until when (ms of the engine's clock) claims run no step inside them,
    /// after one that did failed ([`STEPS_IN_CLAIM_PAUSE`]).
    steps_paused_until_ms: AtomicU64,
}

/// Group commits in flight at once, each on a connection of the pool. While
/// they are in flight, further transitions queue and form the next batch:
/// the group-commit window is the time of a commit in flight (no timer;
/// a lone transition is committed at once).
pub const GROUP_COMMITS_IN_FLIGHT: usize = 4;

/// A transition waiting for the group committer, and where its outcome goes
/// (`None`: the lease was lost or the commit failed; `Some(due_now)`: committed).
struct CommitRequest {
    item: store::TransitionCommit,
    reply: oneshot::Sender<Option<bool>>,
}

/// The group committer's queue (its task starts with the first transition)
/// and its counts.
struct GroupCommit {
    tx: mpsc::UnboundedSender<CommitRequest>,
    rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<CommitRequest>>>,
    stats: Arc<GroupCommitStats>,
    /// The commits in flight ([`GROUP_COMMITS_IN_FLIGHT`]), shared by the
    /// committer's batches and the workers' direct commits.
    flights: Arc<Semaphore>,
    /// Transitions queued and not yet taken into a batch.
    queued: Arc<AtomicU64>,
}

/// Counts of an engine's group commits (read with [`Engine::group_commit_stats`]).
#[derive(Debug, Default)]
pub struct GroupCommitStats {
    /// Batches committed (or attempted).
    pub batches: AtomicU64,
    /// Transitions in those batches.
    pub transitions: AtomicU64,
    /// Transitions not written: their run's fencing token had moved on (the
    /// lease was lost), or their batch failed.
    pub fenced_out: AtomicU64,
    /// The largest batch so far.
    pub largest: AtomicU64,
    /// Transitions whose run's row another transaction held (a webhook's):
    /// left out of their batch and committed on their own, waiting for the lock.
    pub busy: AtomicU64,
}

impl Engine {
    /// Creates the engine state (no task runs yet; see [`Engine::spawn`]).
    /// `host` is the workflows' side of the step contract
    /// (`crate::workflows::Host` in wardcall).
    pub fn new(db: Database, config: Arc<Config>, providers: Providers, public_url: String, host: Arc<dyn WorkflowHost>) -> Arc<Engine> {
        let hostname = std::env::var("HOSTNAME").unwrap_or_else(|_| "wardcall".into());
        let engine_id = format!("{}-{}", hostname, &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let workers = config.engine.workers;
        let commit_work = Arc::new(Semaphore::new(commit_work_places(config.engine.pool_size)));
        let providers = Arc::new(providers);
        let public_url = public_url.trim_end_matches('/').to_string();
        let (wake_scheduler, call_sweeper) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let slot_freed = Arc::new(Notify::new());
        let slots = Arc::new(Semaphore::new(workers));
        let shutdown = watch::channel(false).0;
        let direct_routes = direct_dispatch::DirectRoutes::of(&config, host.as_ref());
        let webhook_pool = crate::db::webhook_pool(&db.pool, &config.engine);
        let team_reads = crate::db::TeamReadPool::new(&db.pool, &config.engine);
        let services = Services {
            pool: db.pool.clone(),
            webhook_pool,
            team_reads,
            config: config.clone(),
            providers: providers.clone(),
            engine_id: engine_id.as_str().into(),
            public_url: public_url.as_str().into(),
            extensions: Default::default(),
            wake_scheduler: wake_scheduler.clone(),
            call_sweeper: call_sweeper.clone(),
            shutdown: shutdown.subscribe(),
        };
        Arc::new(Engine {
            db,
            config,
            engine_id,
            providers,
            public_url,
            services,
            slots: slots.clone(),
            wake_scheduler,
            slot_freed: slot_freed.clone(),
            record_places: Arc::new(RecordPlaces {
                workers: slots.clone(),
                recording: Arc::new(Semaphore::new(workers * step::RECORDING_PLACES_PER_WORKER)),
                slot_freed,
            }),
            claims: ClaimStats::default(),
            claim_flights: Arc::new(Semaphore::new(CLAIMS_IN_FLIGHT)),
            claim_landed: Notify::new(),
            wake_dispatcher: Notify::new(),
            call_sweeper,
            shutdown,
            health: Health::new(),
            direct_routes,
            host,
            commit_work,
            group: {
                let (tx, rx) = mpsc::unbounded_channel();
                GroupCommit {
                    tx,
                    rx: std::sync::Mutex::new(Some(rx)),
                    stats: Arc::new(GroupCommitStats::default()),
                    flights: Arc::new(Semaphore::new(GROUP_COMMITS_IN_FLIGHT)),
                    queued: Arc::new(AtomicU64::new(0)),
                }
            },
        })
    }

    /// The engine's task liveness (see [`Engine::health_report`]).
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Checks, for `/healthz`: the listener is connected and answering; the
    /// scheduler and the dispatcher iterated within [`stall_after_ms`]; every
    /// configured source's capture trigger exists and is enabled
    /// ([`store::capture_problems`]). The database check is bounded by
    /// `engine.acquire_timeout_ms` + `engine.statement_timeout_ms`; a database
    /// that cannot be asked is itself a problem (with PostgreSQL's reason).
    pub async fn health_report(&self) -> HealthReport {
        let mut problems = Vec::new();
        let h = &self.health;
        if !h.listener_up() {
            problems.push(format!(
                "listener: not connected for {} ms (LISTEN {}); new events wait for the {} ms sweep",
                h.listener_silent_ms(),
                crate::capture::OUTBOX_CHANNEL,
                self.config.engine.sweep_ms
            ));
        }
        let stall = stall_after_ms(&self.config.engine);
        if self.stopping() {
            problems.push("engine: stopping".into());
        } else {
            for (part, idle) in [("scheduler", h.scheduler_idle_ms()), ("dispatcher", h.dispatcher_idle_ms())] {
                if idle > stall {
                    problems.push(format!("{part}: stalled, no loop iteration for {idle} ms (limit {stall} ms)"));
                }
            }
        }
        let names: Vec<String> = self.config.sources.iter().map(|s| s.name.clone()).collect();
        if !names.is_empty() {
            let e = &self.config.engine;
            let bound = Duration::from_millis(e.acquire_timeout_ms + e.statement_timeout_ms);
            match tokio::time::timeout(bound, store::capture_problems(&self.db.pool, &names)).await {
                Ok(Ok(found)) => problems.extend(found.into_iter().map(|(source, p)| format!("source {source}: {p}"))),
                Ok(Err(err)) => problems.push(format!("database: cannot check the capture triggers: {}", self.db.explain(&err).await)),
                Err(_) => problems.push(format!("database: checking the capture triggers took over {} ms", bound.as_millis())),
            }
        }
        HealthReport { healthy: problems.is_empty(), problems }
    }

    /// Counts of this engine's group commits of step transitions (batches,
    /// transitions, those fenced out, the largest batch).
    pub fn group_commit_stats(&self) -> &GroupCommitStats {
        &self.group.stats
    }

    /// Counts of this engine's claims of due runs (claims, runs taken, empty
    /// claims, the largest claim).
    pub fn claim_stats(&self) -> &ClaimStats {
        &self.claims
    }

    /// Commits a step transition (no [`step::CommitWork`]) together with the
    /// transitions other workers of this engine hand in meanwhile, in one
    /// statement with per-run fencing ([`store::commit_transitions`]).
    /// `None`: the lease was lost (or the commit failed: the lease lapses and
    /// the step re-runs), nothing was written; `Some(due_now)`: committed.
    ///
    /// When no batch is forming and no commit is in flight (a critical run's
    /// transition: whenever a flight is free), the worker commits its own
    /// transition at once, crossing no task: a lone alert pays one statement
    /// and no hop, and a critical one never waits for a batch to form.
    /// Otherwise the transition joins the next batch ([`group_committer`]).
    async fn commit_grouped(&self, item: store::TransitionCommit, critical: bool) -> Option<bool> {
        let g = &self.group;
        let idle = g.flights.available_permits() == GROUP_COMMITS_IN_FLIGHT && g.queued.load(Ordering::Acquire) == 0;
        if critical || idle {
            if let Ok(_flight) = g.flights.clone().try_acquire_owned() {
                g.stats.batches.fetch_add(1, Ordering::Relaxed);
                g.stats.transitions.fetch_add(1, Ordering::Relaxed);
                g.stats.largest.fetch_max(1, Ordering::Relaxed);
                let committed = async {
                    let mut conn = HeldConnection::acquire(&self.db.pool).await?;
                    let committed = within(self.config.engine.database_deadline(), store::commit_transitions(&mut conn, std::slice::from_ref(&item))).await;
                    conn.settle(committed)
                };
                let outcome = match committed.await {
                    Ok(mut o) => o.pop().flatten(),
                    Err(e) => {
                        tracing::warn!(run = %item.id, error = %crate::capture::db_message(&e), "committing a step failed; the lease will lapse and the step re-run");
                        None
                    }
                };
                if outcome.is_none() {
                    g.stats.fenced_out.fetch_add(1, Ordering::Relaxed);
                }
                return outcome;
            }
        }
        let rx = g.rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rx) = rx {
            let deadline = self.config.engine.database_deadline();
            tokio::spawn(group_committer(self.db.pool.clone(), deadline, rx, g.stats.clone(), g.flights.clone(), g.queued.clone()));
        }
        let (reply, outcome) = oneshot::channel();
        g.queued.fetch_add(1, Ordering::AcqRel);
        if g.tx.send(CommitRequest { item, reply }).is_err() {
            g.queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        outcome.await.unwrap_or(None)
    }

    /// The audit actor of this engine: `engine:<engine_id>`.
    pub fn actor(&self) -> String {
        format!("engine:{}", self.engine_id)
    }

    fn lease_ms(&self) -> i64 {
        self.config.engine.lease_ms as i64
    }

    /// Starts the listener, dispatcher and scheduler tasks.
    pub fn spawn(self: &Arc<Self>) -> EngineTasks {
        let mut set = JoinSet::new();
        let e = self.clone();
        set.spawn(async move { e.listener_loop().await });
        let e = self.clone();
        set.spawn(async move { e.dispatcher_loop().await });
        let e = self.clone();
        set.spawn(async move { e.scheduler_loop().await });
        for task in self.host.background_tasks(self.services.clone()) {
            set.spawn(task);
        }
        EngineTasks { engine: self.clone(), set }
    }

    /// Wakes this engine's scheduler (e.g. after a webhook delivered a signal).
    pub fn wake(&self) {
        self.wake_scheduler.notify_one();
    }

    /// Wakes this engine's call sweeper (an alert closed: its calls may need
    /// ending; see `notify::call_sweeper`).
    pub fn wake_call_sweeper(&self) {
        self.call_sweeper.notify_one();
    }

    /// Resolves when the call sweeper is woken (or at once if a wake-up is pending).
    pub async fn call_sweeper_woken(&self) {
        self.call_sweeper.notified().await
    }

    /// A receiver that turns `true` when the engine stops.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Opens the listener's own connection (a one-connection pool outside the
    /// engine's pool, so a busy pool never delays it and it never takes a
    /// worker's connection) and subscribes to both channels.
    async fn open_listener(&self) -> Result<PgListener, sqlx::Error> {
        let e = &self.config.engine;
        let options = crate::db::session_options(self.db.connect_options.clone().application_name(LISTENER_APPLICATION_NAME), e);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(Duration::from_millis(e.acquire_timeout_ms))
            .test_before_acquire(false)
            .connect_lazy_with(options);
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.eager_reconnect(false);
        listener.ignore_pool_close_event(true);
        tokio::time::timeout(Duration::from_millis(e.heartbeat_ms.max(1000)), listener.listen_all([crate::capture::OUTBOX_CHANNEL, WAKE_CHANNEL]))
            .await
            .map_err(|_| sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "LISTEN did not complete in time")))??;
        Ok(listener)
    }

    async fn listener_loop(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        let heartbeat = Duration::from_millis(self.config.engine.heartbeat_ms);
        loop {
            if self.stopping() {
                return;
            }
            let opened = tokio::select! { r = self.open_listener() => r, _ = stop.changed() => return };
            let mut listener = match opened {
                Ok(l) => l,
                Err(e) => {
                    let why = self.db.explain(&e).await;
                    tracing::warn!(error = %why, "listener cannot connect; retrying in 1 s (the sweep keeps draining)");
                    tokio::select! { _ = tokio::time::sleep(Duration::from_secs(1)) => continue, _ = stop.changed() => return }
                }
            };
            tracing::debug!("listener connected");
            self.health.set_listener(true);
            // Anything committed while we were not listening: drain now.
            self.wake_dispatcher.notify_one();
            self.wake_scheduler.notify_one();
            let mut last_heard = Instant::now();
            loop {
                let quiet = heartbeat.saturating_sub(last_heard.elapsed());
                let got = tokio::select! {
                    _ = stop.changed() => return,
                    r = tokio::time::timeout(quiet, listener.try_recv()) => r,
                };
                match got {
                    Ok(Ok(Some(n))) => {
                        last_heard = Instant::now();
                        self.health.set_listener(true);
                        if n.channel() == WAKE_CHANNEL {
                            self.wake_scheduler.notify_one();
                            self.call_sweeper.notify_one();
                        } else {
                            self.wake_dispatcher.notify_one();
                        }
                    }
                    Ok(Ok(None)) => {
                        tracing::warn!("listener connection lost; reconnecting and draining the outbox");
                        break;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %crate::capture::db_message(&e), "listener error; reconnecting and draining the outbox");
                        break;
                    }
                    Err(_quiet_for_a_heartbeat) => {
                        // Nothing heard for a heartbeat: ask. A frozen backend or a
                        // dead network path answers nothing (no clean close).
                        let ping = tokio::time::timeout(heartbeat, sqlx::query("SELECT 1").execute(&mut listener)).await;
                        match ping {
                            Ok(Ok(_)) => {
                                last_heard = Instant::now();
                                self.health.set_listener(true);
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(error = %crate::capture::db_message(&e), "listener heartbeat failed; reconnecting and draining the outbox");
                                break;
                            }
                            Err(_) => {
                                tracing::warn!(
                                    heartbeat_ms = heartbeat.as_millis() as u64,
                                    "listener connection silent (no answer to a heartbeat); reconnecting and draining the outbox"
                                );
                                // The pool's connections may be as silent
                                // (a hard failover): check them as they come back.
                                deadline::mark_suspect(&self.db.pool);
                                deadline::mark_suspect(&self.services.webhook_pool);
                                deadline::mark_suspect(self.services.team_reads.pool());
                                break;
                            }
                        }
                    }
                }
            }
            self.health.set_listener(false);
            // Dropping the listener closes its connection in the background
            // (a frozen peer cannot hold this task). The sweep drains meanwhile.
            drop(listener);
            self.wake_dispatcher.notify_one();
            self.wake_scheduler.notify_one();
            tokio::select! { _ = tokio::time::sleep(Duration::from_millis(100)) => {}, _ = stop.changed() => return }
        }
    }

    async fn dispatcher_loop(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        let sweep = Duration::from_millis(self.config.engine.sweep_ms);
        let mut small_batches_until: Option<Instant> = None;
        loop {
            if self.stopping() {
                return;
            }
            // The first batch after a wake-up takes about as many events as
            // there are free workers, so that their runs start while the
            // rest of a burst is dispatched; the batches after it take up
            // to [`DISPATCH_BATCH_MAX`].
            let mut limit = (self.slots.available_permits() as i64).clamp(DISPATCH_FIRST_BATCH_MIN, DISPATCH_BATCH_MAX);
            // After a batch that got no reply in time, small batches for a
            // while: on a live but very loaded server a batch of 500 events
            // could take longer than the deadline every time and never land.
            let shrunk = small_batches_until.is_some_and(|until| Instant::now() < until);
            if shrunk {
                limit = DISPATCH_FIRST_BATCH_MIN;
            }
            // Critical events that need nothing of a batch go first, in two
            // round trips ([`direct_dispatch`]); the batch follows when
            // anything else waits, and takes whatever the direct dispatch left.
            let mut batch = true;
            if !self.direct_routes.is_empty() && !shrunk {
                self.health.beat(&self.health.dispatcher_beat);
                let direct = self.dispatch_direct().await;
                if let Err(e) = &direct {
                    let why = self.db.explain_any(e).await;
                    tracing::warn!(error = %why, "direct dispatch failed; the dispatch batch takes its events");
                }
                batch = direct_dispatch::run_batch_after(&direct);
            }
            if batch {
                loop {
                    self.health.beat(&self.health.dispatcher_beat);
                    match self.dispatch_batch(limit).await {
                        Ok(n) if n as i64 >= limit => {
                            if !shrunk {
                                limit = DISPATCH_BATCH_MAX;
                            }
                            continue;
                        }
                        Ok(_) => break,
                        Err(e) => {
                            if e.downcast_ref::<sqlx::Error>().is_some_and(deadline::is_no_reply) {
                                small_batches_until = Some(Instant::now() + deadline::SUSPECT_WINDOW);
                            }
                            let why = self.db.explain_any(&e).await;
                            tracing::warn!(error = %why, "outbox dispatch failed; the next sweep retries");
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                _ = self.wake_dispatcher.notified() => {}
                _ = tokio::time::sleep(sweep) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Turns up to `limit` unprocessed outbox rows into runs, in one transaction.
    /// Rows whose event starts a critical workflow ([`WorkflowHost::is_critical`]) are taken
    /// first (index `outbox_unprocessed_event`), then the others in id order,
    /// and their runs get the free worker slots first. Returns how many outbox
    /// rows it processed.
    ///
    /// A row whose event no workflow of this config listens to is not dropped:
    /// it is marked `unrouted_at` in the same transaction (kept in the outbox,
    /// counted by `wardcall status`) and logged once, at warn, by id, source
    /// and event name (never its payload).
    ///
    /// Committed asynchronously (`synchronous_commit = off`) unless it
    /// cancelled a run: the next commit that writes, which every run's
    /// first external effect waits for, makes it durable; a crash before
    /// that loses the whole batch, and its outbox rows are dispatched again.
    ///
    /// Bounded by `engine.database_deadline_ms` ([`crate::db::deadline`]):
    /// past it the batch's connection is closed (the server, if alive, rolls
    /// the batch back; the outbox rows stay for the next sweep). A `COMMIT`
    /// whose reply was lost may have been written: its runs, leased to this
    /// engine and not started, are claimed again when their leases lapse.
    pub async fn dispatch_batch(self: &Arc<Self>, limit: i64) -> anyhow::Result<usize> {
        let mut conn = HeldConnection::acquire(&self.db.pool).await?;
        let result = within(self.config.engine.database_deadline(), self.dispatch_on(&mut conn, limit)).await;
        if result.as_ref().is_err_and(|e| e.downcast_ref::<sqlx::Error>().is_some_and(deadline::is_no_reply)) {
            // Closed when dropped unreleased.
            deadline::mark_suspect(&self.db.pool);
        } else {
            conn.release();
        }
        result
    }

    async fn dispatch_on(self: &Arc<Self>, tx: &mut HeldConnection, limit: i64) -> anyhow::Result<usize> {
        let critical_events: Vec<String> = self.config.workflows.iter().filter(|w| self.host.is_critical(w)).map(|w| w.event.clone()).collect();
        // One dispatcher at a time, of all engines: keyed events (a create,
        // its replacement, its cancel, an awaited event) must meet the runs of
        // every older event, and an older event held in another engine's
        // uncommitted batch would be invisible. Waiting for a batch is
        // milliseconds; critical events still come first within each batch.
        // (`BEGIN` and the lock go as one simple query: one round trip. The
        // claim below is a later statement, so its snapshot is taken after
        // the lock is held and sees every earlier batch.)
        // sqlx counts the transaction as open only once the whole query
        // succeeded: if the lock wait fails (`lock_timeout` behind another
        // engine's batch, `statement_timeout`, a cancel) or this future is
        // dropped during it, the server's transaction is still there (aborted,
        // or holding the lock) and sqlx queues no `ROLLBACK`. Returned to the
        // pool, the connection would fail every later statement of whoever
        // took it (25P02), or run their autocommit statements (a run's
        // intents) inside a transaction nobody commits: `HeldConnection`
        // closes it instead (the server rolls back).
        // The dispatch commits without waiting for its WAL flush
        // (`synchronous_commit = off` for this transaction only; PostgreSQL
        // manual 30.4 "Asynchronous Commit"): 0.1–0.2 ms sooner to its
        // runs' first steps. wardcall does nothing outside the database on
        // the strength of it alone: a run's first effect, a hang-up, a
        // reply, each follows a later commit that writes (an intent, a
        // claim, DESIGN.md invariant 2), which waits for the WAL up to it,
        // the dispatch's commit included. A server crash in between loses
        // the dispatch whole (its outbox rows unprocessed again, its runs,
        // signals and audit rows never written), and the outbox is
        // dispatched again after the restart (invariant 1): no event is
        // lost, no run is doubled. A batch that cancelled a run commits
        // synchronously (below): a cancellation is seen outside wardcall at
        // once.
        tx.begin(Some(format!("BEGIN; SET LOCAL synchronous_commit = off; SELECT pg_advisory_xact_lock({DISPATCH_LOCK_KEY})"))).await?;
        let mut rows = crate::store::outbox::claim_batch(tx, limit, &self.engine_id, &critical_events).await?;
        // Critical events first (they take the free worker slots first), then by id.
        rows.sort_by_key(|(id, event, _, _)| (!critical_events.contains(event), *id));
        if rows.is_empty() {
            return Ok(0);
        }
        let actor = self.actor();
        // `when` conditions: one statement per workflow that has one.
        let mut skipped: std::collections::HashSet<(i64, &str)> = std::collections::HashSet::new();
        for w in self.config.workflows.iter().filter(|w| w.when.is_some()) {
            let ids: Vec<i64> = rows.iter().filter(|r| r.1 == w.event).map(|r| r.0).collect();
            if ids.is_empty() {
                continue;
            }
            let payloads: Vec<&Value> = rows.iter().filter(|r| r.1 == w.event).map(|r| &r.2).collect();
            let when = w.when.as_deref().unwrap_or("true");
            match when_matches(tx, when, &ids, &payloads).await? {
                Ok(matched) => skipped.extend(ids.iter().filter(|id| !matched.contains(id)).map(|id| (*id, w.name.as_str()))),
                // One payload broke the condition (a bad cast): each event is
                // evaluated alone, so the others are decided as usual. An event
                // whose evaluation fails starts its run if the workflow is
                // critical (fail towards a human), else starts nothing; either
                // way it is logged and audited, never silently dropped.
                Err(_) => {
                    let critical = self.host.is_critical(w);
                    for (id, payload) in ids.iter().zip(&payloads) {
                        match when_matches(tx, when, std::slice::from_ref(id), std::slice::from_ref(payload)).await? {
                            Ok(matched) if matched.is_empty() => {
                                skipped.insert((*id, w.name.as_str()));
                            }
                            Ok(_) => {}
                            Err(sqlstate) => {
                                tracing::error!(workflow = %w.name, outbox_id = id, sqlstate = ?sqlstate, critical, "the workflow's when condition failed on this event");
                                if !critical {
                                    skipped.insert((*id, w.name.as_str()));
                                }
                                let source = rows.iter().find(|r| r.0 == *id).map(|r| r.3.clone()).unwrap_or_default();
                                crate::store::audit::record(
                                    tx,
                                    crate::store::audit::Entity::Source,
                                    &source,
                                    "event.when_failed",
                                    None,
                                    None,
                                    &actor,
                                    serde_json::json!({"outbox_id": id, "workflow": w.name, "sqlstate": sqlstate, "run_started": critical}),
                                )
                                .await?;
                            }
                        }
                    }
                }
            }
        }
        let mut workflow_names = Vec::new();
        let mut event_ids = Vec::new();
        let mut events = Vec::new();
        let mut inputs = Vec::new();
        let mut keys: Vec<Option<String>> = Vec::new();
        let mut unrouted = Vec::new();
        let mut criticals = Vec::new();
        // (workflow, key) → index in the lists above, for events of one batch with the same key.
        let mut keyed: std::collections::HashMap<(String, String), usize> = std::collections::HashMap::new();
        let mut dropped = vec![];
        let mut replacing: Vec<(String, String, i64)> = Vec::new();
        for (id, event, payload, source) in &rows {
            let mut routed = self.config.consumes_event(event);
            let mut bound: Vec<&Workflow> = self.config.workflows.iter().filter(|w| &w.event == event).collect();
            bound.sort_by_key(|w| !self.host.is_critical(w));
            for w in bound {
                routed = true;
                if skipped.contains(&(*id, w.name.as_str())) {
                    continue;
                }
                let key = new_run_key(w.key.as_deref(), payload, &w.name, *id);
                if let Some(k) = &key {
                    if let Some(&earlier) = keyed.get(&(w.name.clone(), k.clone())) {
                        match w.on_duplicate {
                            crate::config::OnDuplicate::Skip => continue,
                            crate::config::OnDuplicate::Replace => dropped.push(earlier),
                        }
                    }
                    keyed.insert((w.name.clone(), k.clone()), workflow_names.len());
                    if w.on_duplicate == crate::config::OnDuplicate::Replace {
                        replacing.push((w.name.clone(), k.clone(), *id));
                    }
                }
                workflow_names.push(w.name.clone());
                event_ids.push(*id);
                events.push(event.clone());
                inputs.push(payload.clone());
                keys.push(key);
                criticals.push(self.host.is_critical(w));
            }
            if !routed {
                tracing::warn!(outbox_id = id, source = %source, event = %event, "no workflow listens to this event: outbox row kept as unrouted");
                unrouted.push(*id);
            }
        }
        // An event replaced by a later one of the same batch starts nothing.
        dropped.sort_unstable();
        for i in dropped.into_iter().rev() {
            for list in [&mut workflow_names, &mut events] {
                list.remove(i);
            }
            event_ids.remove(i);
            inputs.remove(i);
            keys.remove(i);
            criticals.remove(i);
        }
        // `on_duplicate = "replace"`: the live run with the key gives way.
        // Whether the batch cancelled a run: see the commit below.
        let mut cancelled = false;
        for (workflow, key, before) in &replacing {
            for run in store::live_runs_with_key(tx, workflow, key, *before).await? {
                cancelled |= self.host.cancel_run_in(tx, &self.config, run, &actor, "replaced by a newer event with the same key", true).await?;
            }
        }
        if !unrouted.is_empty() {
            crate::store::outbox::mark_unrouted(tx, &unrouted).await?;
        }
        // Take as many runs as there are free worker slots: they start leased
        // to us. Critical runs come first; other runs take no slot while a
        // critical run is due, so that the scheduler claims it first.
        let critical_due = criticals.iter().any(|c| !c) && store::critical_run_due(tx).await?;
        let mut taken = Vec::new();
        for &critical in &criticals {
            if !critical && critical_due {
                break;
            }
            match self.slots.clone().try_acquire_owned() {
                Ok(p) => taken.push(p),
                Err(_) => break,
            }
        }
        let lease_now: Vec<bool> = (0..workflow_names.len()).map(|i| i < taken.len()).collect();
        // The reads the first steps of the runs about to start need (an
        // escalation's lookups) run meanwhile, on the team-read pool, while
        // the runs' creation commits: off the way to the first call.
        let mut prefetches: Vec<Option<(usize, Prefetch)>> = (0..taken.len())
            .filter_map(|i| {
                let w = self.config.workflow(&workflow_names[i])?;
                self.host.prefetch_first_step(&self.services, w, &inputs[i]).map(|read| Some((i, Prefetch::spawn(read))))
            })
            .collect();
        let created = store::create_runs(
            tx,
            &store::NewRuns {
                workflows: &workflow_names,
                event_ids: &event_ids,
                events: &events,
                inputs: &inputs,
                leased: &lease_now,
                criticals: &criticals,
                keys: &keys,
            },
            &self.engine_id,
            self.lease_ms(),
        )
        .await?;
        // Events that cancel runs by key, or that runs wait for by key: only
        // runs created by an older event are touched.
        for (id, event, payload, _) in &rows {
            cancelled |= self.deliver_keyed_event(tx, *id, event, payload, &actor).await?;
        }
        // A cancellation is seen outside wardcall as soon as it commits (its
        // `on_cancelled` write-back in the team's own rows, the status API):
        // a batch that cancelled a run commits synchronously, so that nobody
        // acts on a cancellation a crash could still undo.
        if cancelled {
            sqlx::query("SET LOCAL synchronous_commit = on").execute(&mut **tx).await?;
        }
        let mut to_run = Vec::new();
        let mut pending = 0;
        for created_run in created {
            match created_run {
                Some(run) => to_run.push(run),
                None => pending += 1,
            }
        }
        if pending > 0 {
            sqlx::query("SELECT pg_notify($1, '')").bind(WAKE_CHANNEL).execute(&mut **tx).await?;
        }
        tx.commit().await?;
        for (run, permit) in to_run.into_iter().zip(taken) {
            // Matched by workflow and payload, what the read depended on (a
            // run not created, its event's run existing already, shifts the
            // order); the ones left over finish on their own, unused.
            let prefetch = prefetches
                .iter_mut()
                .find(|p| p.as_ref().is_some_and(|(i, _)| workflow_names[*i] == run.workflow && inputs[*i] == run.input))
                .and_then(Option::take)
                .map(|(_, p)| p);
            self.start(run, permit, prefetch, None);
        }
        if pending > 0 {
            self.wake_scheduler.notify_one();
        }
        Ok(rows.len())
    }

    /// Applies an event to the live runs it concerns by key: cancels those
    /// of workflows that list it in `cancel_on`, and delivers it as a signal
    /// ([`step::event_signal`]) to those of workflows that
    /// wait for it (kept if the run is not waiting yet, DESIGN.md invariant 4).
    /// Returns whether it cancelled a run.
    async fn deliver_keyed_event(&self, tx: &mut sqlx::PgConnection, id: i64, event: &str, payload: &Value, actor: &str) -> Result<bool, sqlx::Error> {
        let mut cancelled = false;
        for w in &self.config.workflows {
            for (template, route) in self.host.keyed_routes(w, event) {
                let Some(key) = run_key(&template, payload) else { continue };
                for run in store::live_runs_with_key(tx, &w.name, &key, id).await? {
                    match route {
                        step::KeyedRoute::Cancel => {
                            cancelled |= self.host.cancel_run_in(tx, &self.config, run, actor, &format!("cancelled by event {event}"), false).await?;
                        }
                        step::KeyedRoute::Signal => {
                            store::send_signal(tx, run, &step::event_signal(event), payload).await?;
                        }
                    }
                }
            }
        }
        Ok(cancelled)
    }

    /// Executes `run` on a task of its own, holding the worker slot `permit`
    /// until the run parks, finishes or loses its lease; then tells the
    /// scheduler the slot is free.
    fn start(
        self: &Arc<Self>,
        run: ClaimedRun,
        permit: tokio::sync::OwnedSemaphorePermit,
        prefetch: Option<Prefetch>,
        first_tier: Option<step::DispatchedTier>,
    ) {
        let e = self.clone();
        let slot = WorkerSlot::worker(permit, self.record_places.clone());
        tokio::spawn(async move {
            e.execute(run, &slot, prefetch, first_tier).await;
            drop(slot);
            e.slot_freed.notify_one();
        });
    }

    /// Claims due runs and starts them: leases at most as many as there are
    /// free workers ([`CLAIM_MAX`] at most), reserving their workers once
    /// they are chosen;
    /// after a claim that ran steps inside it, looks at up to [`CLAIM_MAX`]
    /// due runs (steps run inside a claim need no worker). The scheduler
    /// locks the runs and runs their steps ([`Engine::lock_due_runs`]); the
    /// commit and the workers' start happen on a task of their own
    /// ([`Engine::land_claim`]), [`CLAIMS_IN_FLIGHT`] at most, so that the
    /// scheduler locks the next due runs meanwhile. Returns how many due runs
    /// it asked for and how many it used (leased or run inside the claim;
    /// runs it locked and left due for want of a worker do not count).
    async fn claim_and_start(self: &Arc<Self>) -> (usize, usize) {
        let Ok(flight) = self.claim_flights.clone().acquire_owned().await else { return (0, 0) };
        let fired_last = self.claims.fired_last.load(Ordering::Relaxed);
        // Free workers counted now, after waiting for a claim to land
        // (workers may have freed meanwhile).
        let lease_max = self.slots.available_permits().min(CLAIM_MAX);
        let limit = if fired_last { CLAIM_MAX } else { lease_max };
        if limit == 0 {
            return (0, 0);
        }
        match self.lock_due_runs(limit, lease_max).await {
            Ok(mut claim) => {
                self.claims.fired_last.store(!claim.fired.is_empty(), Ordering::Relaxed);
                // The workers of the runs to lease, reserved now that their
                // number is known (the dispatcher may have taken some of the
                // free ones meanwhile: the runs it cannot start stay due).
                let reserved = self.reserve_workers(claim.leased.len());
                claim.leased.truncate(reserved.as_ref().map_or(0, |r| r.num_permits()));
                // Runs locked but neither run nor leased do not count: a
                // claim is "full" when it used all it asked for.
                let got = claim.fired.len() + claim.leased.len();
                let e = self.clone();
                tokio::spawn(async move { e.land_claim(claim, reserved, flight).await });
                (limit, got)
            }
            Err(e) => {
                let why = self.db.explain(&e).await;
                tracing::warn!(error = %why, "locking due runs failed; claiming with leases only");
                self.pause_steps_in_claims();
                let got = self.claim_with_leases_only().await;
                drop(flight);
                (limit, got)
            }
        }
    }

    /// [`store::claim_due`]: as many due runs as there are free workers now
    /// ([`CLAIM_MAX`] at most; it reserves them) leased in one statement, no step run inside
    /// it. The fallback of a claim that could not run steps inside it:
    /// whatever failed there (a step's transition that cannot be written, an
    /// emit) must not hold up the due runs, a critical alert's first among
    /// them. Returns how many it leased.
    async fn claim_with_leases_only(self: &Arc<Self>) -> usize {
        if self.stopping() {
            return 0;
        }
        // As many as are free now (the failed claim's workers are back).
        let Some(reserved) = self.reserve_workers(CLAIM_MAX) else { return 0 };
        let want = reserved.num_permits();
        let claimed = async {
            let mut conn = HeldConnection::acquire(&self.db.pool).await?;
            let claimed = within(self.config.engine.database_deadline(), store::claim_due(&mut conn, &self.engine_id, want as i64, self.lease_ms())).await;
            conn.settle(claimed)
        };
        match claimed.await {
            Ok(runs) => {
                let n = runs.len();
                self.count_claim(n, 0);
                self.start_reserved(runs, Some(reserved));
                n
            }
            Err(e) => {
                let why = self.db.explain(&e).await;
                tracing::warn!(error = %why, "claiming due runs failed");
                0
            }
        }
    }

    /// After a claim that ran steps inside it failed: the next claims, for
    /// [`STEPS_IN_CLAIM_PAUSE`], run no step inside them (each would fail
    /// the same way and be claimed twice).
    fn pause_steps_in_claims(&self) {
        self.claims.fired_last.store(false, Ordering::Relaxed);
        let until = self.health.now_ms() + STEPS_IN_CLAIM_PAUSE.as_millis() as u64;
        self.claims.steps_paused_until_ms.store(until, Ordering::Relaxed);
    }

    /// Reserves up to `n` free workers (as many as are free, when fewer:
    /// the dispatcher takes free workers concurrently); `None` when none is.
    fn reserve_workers(&self, n: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = n.min(self.slots.available_permits());
        if n == 0 {
            return None;
        }
        if let Ok(all) = self.slots.clone().try_acquire_many_owned(n as u32) {
            return Some(all);
        }
        let mut reserved: Option<tokio::sync::OwnedSemaphorePermit> = None;
        while reserved.as_ref().map_or(0, |r| r.num_permits()) < n {
            let Ok(one) = self.slots.clone().try_acquire_owned() else { break };
            match reserved.as_mut() {
                Some(r) => r.merge(one),
                None => reserved = Some(one),
            }
        }
        reserved
    }

    fn count_claim(&self, leased: usize, fired: usize) {
        let c = &self.claims;
        c.claims.fetch_add(1, Ordering::Relaxed);
        c.runs.fetch_add(leased as u64, Ordering::Relaxed);
        c.fired_in_claim.fetch_add(fired as u64, Ordering::Relaxed);
        c.largest.fetch_max((leased + fired) as u64, Ordering::Relaxed);
        if leased + fired == 0 {
            c.empty.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts `runs` on the workers `reserved` for them (one each); the
    /// reservation's surplus goes back to the pool.
    fn start_reserved(self: &Arc<Self>, runs: Vec<ClaimedRun>, mut reserved: Option<tokio::sync::OwnedSemaphorePermit>) {
        for run in runs {
            let permit = reserved.as_mut().and_then(|r| if r.num_permits() > 1 { r.split(1) } else { None }).or_else(|| reserved.take());
            match permit {
                Some(p) => self.start(run, p, None, None),
                // Not reached: a claim leases no more runs than it reserved workers for.
                None => tracing::error!(run = %run.id, "a leased run has no worker; its lease will lapse and it is claimed again"),
            }
        }
        if reserved.take().is_some() {
            self.slot_freed.notify_one();
        }
    }

    /// Commits a claim locked by [`Engine::lock_due_runs`]: the transitions
    /// of the steps run inside it ([`store::commit_fired_in_claim`]) and the
    /// leases ([`store::claim_locked`]), in its one transaction; then starts
    /// the leased runs on the `reserved` workers. If the commit fails,
    /// nothing of it is written and the due runs are claimed again with
    /// leases only ([`Engine::claim_with_leases_only`]). (A commit that got
    /// no reply within `engine.database_deadline_ms` may have been written:
    /// its leased runs then wait for their leases to lapse, and its steps
    /// run inside it stand, written once.)
    async fn land_claim(
        self: Arc<Self>,
        claim: LockedClaim,
        mut reserved: Option<tokio::sync::OwnedSemaphorePermit>,
        flight: tokio::sync::OwnedSemaphorePermit,
    ) {
        let LockedClaim { mut conn, fired, held, leased, .. } = claim;
        let deadline = self.config.engine.database_deadline();
        let landed = within(deadline, async {
            let held: Vec<&str> = held.iter().map(String::as_str).collect();
            let outcomes = store::commit_fired_in_claim(&mut conn, &fired, &held).await?;
            if let Some(i) = outcomes.iter().position(|o| !matches!(o, store::GroupOutcome::Committed { .. })) {
                // The claim holds these rows (read as locked): this cannot
                // happen short of a bug; writing nothing is safe.
                return Err(sqlx::Error::Protocol(format!("run {} run inside a claim could not be written", fired[i].id)));
            }
            let leased: Vec<&ClaimedRun> = leased.iter().collect();
            store::claim_locked(&mut conn, &leased, &self.engine_id, self.lease_ms()).await
        })
        .await;
        let landed = match landed {
            Ok(claimed) => {
                let committed = within(deadline, conn.commit()).await;
                conn.settle(committed.map(|()| claimed))
            }
            Err(e) => {
                // Rolled back before the fallback claims, which would skip
                // the rows this transaction still held (`SKIP LOCKED`): a
                // closed connection's rollback is the server's, later.
                if deadline::is_no_reply(&e) {
                    deadline::mark_suspect(&self.db.pool);
                } else if within(deadline, conn.rollback()).await.is_ok() {
                    conn.release();
                }
                Err(e)
            }
        };
        match landed {
            Ok(claimed) => {
                self.count_claim(claimed.len(), fired.len());
                self.start_reserved(claimed, reserved);
            }
            Err(e) => {
                let why = self.db.explain(&e).await;
                tracing::warn!(error = %why, "a claim that ran steps inside it failed; claiming with leases only");
                self.pause_steps_in_claims();
                if reserved.take().is_some() {
                    self.slot_freed.notify_one();
                }
                self.claim_with_leases_only().await;
            }
        }
        drop(flight);
        self.claim_landed.notify_one();
    }

    /// The first half of a claim, in one transaction: locks up to `limit`
    /// due runs ([`store::lock_due`], critical runs first); runs the step of
    /// each non-critical one whose step needs no I/O
    /// ([`WorkflowHost::runs_in_claim`]) and keeps its transition if the
    /// step parks or ends the run, to be committed with the claim
    /// ([`Engine::land_claim`]): one row version and one audit row for a
    /// fired timer instead of a claim and a transition; chooses the runs to
    /// lease, at most `lease_max` (critical first, then oldest due first).
    /// A step run here that goes on to another step, waits, fails or panics
    /// is discarded (it had no effect) and its run leased, so that a worker
    /// runs it as usual. The runs neither run nor leased stay as they were.
    /// The commit is atomic: after a crash or an error nothing of it is
    /// written and every run is due as before.
    ///
    /// Errors: a database error (the transaction is rolled back; on no
    /// reply within `engine.database_deadline_ms`, its connection is closed
    /// and the server rolls it back).
    async fn lock_due_runs(self: &Arc<Self>, limit: usize, lease_max: usize) -> Result<LockedClaim, sqlx::Error> {
        let deadline = self.config.engine.database_deadline();
        let mut conn = HeldConnection::acquire(&self.db.pool).await?;
        within(deadline, conn.begin(None)).await?;
        let mut claim = LockedClaim { conn, fired: Vec::new(), held: Vec::new(), leased: Vec::new() };
        match within(deadline, self.lock_into(&mut claim, limit, lease_max)).await {
            Ok(()) => Ok(claim),
            Err(e) => {
                // Rolled back at once (a closed connection's rollback is the
                // server's, later), unless the server is not answering.
                if deadline::is_no_reply(&e) {
                    deadline::mark_suspect(&self.db.pool);
                } else if within(deadline, claim.conn.rollback()).await.is_ok() {
                    claim.conn.release();
                }
                Err(e)
            }
        }
    }

    /// The body of [`Engine::lock_due_runs`], in `claim`'s transaction.
    async fn lock_into(self: &Arc<Self>, claim: &mut LockedClaim, limit: usize, lease_max: usize) -> Result<(), sqlx::Error> {
        let actor = self.actor();
        // Critical runs only as many as can be leased: one locked and left
        // would be skipped by every other claim until this one lands.
        let due = store::lock_due(&mut claim.conn, lease_max as i64, limit as i64).await?;
        // A claim that leases a critical run runs no step inside it: the
        // critical run's worker starts as soon as its lease commits.
        let run_steps = self.health.now_ms() >= self.claims.steps_paused_until_ms.load(Ordering::Relaxed) && !due.iter().any(|(_, critical)| *critical);
        for (run, critical) in due {
            let in_claim = if critical || !run_steps { None } else { self.run_in_claim(&mut claim.conn, &run, &actor).await? };
            match in_claim {
                Some(transition) => {
                    claim.fired.push(transition);
                    claim.held.push(run.previous_status);
                }
                // More than the free workers are left due, untouched.
                None if claim.leased.len() < lease_max => claim.leased.push(run),
                None => {}
            }
        }
        Ok(())
    }

    /// Runs `run`'s step inside the claim's transaction `tx` when the
    /// workflows say it needs no I/O ([`WorkflowHost::runs_in_claim`]) and it
    /// was not left `running` by a lost lease (a takeover is leased and
    /// audited as such). Returns its transition when the step parks or ends
    /// the run (its [`step::CommitWork`] applied in a savepoint of `tx`),
    /// `None` when a worker should run it instead (nothing of it written).
    async fn run_in_claim(&self, tx: &mut sqlx::PgConnection, run: &ClaimedRun, actor: &str) -> Result<Option<store::TransitionCommit>, sqlx::Error> {
        if run.previous_status == "running" {
            return Ok(None);
        }
        let Some(workflow) = self.config.workflow(&run.workflow) else { return Ok(None) };
        if !self.host.runs_in_claim(workflow, run) {
            return Ok(None);
        }
        let lost = Arc::new(AtomicBool::new(false));
        let saved = AtomicBool::new(false);
        let mut state = run.state.clone();
        let (result, in_commit) = {
            use futures_util::FutureExt;
            let no_slot = WorkerSlot::none();
            let mut ctx = StepContext {
                services: &self.services,
                run,
                workflow,
                state: &mut state,
                lease_lost: &lost,
                in_commit: Vec::new(),
                slot: &no_slot,
                prefetched: None,
                first_tier_opened: None,
                recorded: None,
                state_saved: &saved,
            };
            let r = std::panic::AssertUnwindSafe(self.host.run_step(&mut ctx)).catch_unwind().await;
            (r, std::mem::take(&mut ctx.in_commit))
        };
        let (next_step, parking) = match result {
            Ok(Ok(
                transition
                @ (Transition::Sleep { .. } | Transition::SleepUntil { .. } | Transition::Complete | Transition::Fail { .. } | Transition::Cancelled),
            )) => parking_of(transition, &run.step),
            _ => return Ok(None),
        };
        if !in_commit.is_empty() {
            use futures_util::FutureExt;
            use sqlx::Connection;
            let mut savepoint = tx.begin().await?;
            for work in &in_commit {
                let applied = std::panic::AssertUnwindSafe(work.apply(&mut savepoint, &run.input, &mut state)).catch_unwind().await;
                if !matches!(applied, Ok(Ok(()))) {
                    // The worker runs the step again and meets the error there.
                    savepoint.rollback().await?;
                    return Ok(None);
                }
            }
            savepoint.commit().await?;
        }
        Ok(Some(store::TransitionCommit {
            id: run.id,
            fencing_token: run.fencing_token,
            step: run.step.clone(),
            state: Arc::new(state),
            next_step,
            parking,
            actor: actor.to_string(),
            seq: run.step_seq + 1,
            patch: None,
        }))
    }

    /// While due runs wait for workers: returns when the scheduler should
    /// claim again, i.e. when [`claim_coalesce_slots`] workers are free, or
    /// [`CLAIM_COALESCE_WINDOW`] after the first worker freed, or at once when
    /// woken for a newly due run or when a critical run is due (asked once,
    /// when the first worker frees), or after `poll` with no worker freed.
    async fn await_free_workers(&self, poll: Duration, stop: &mut watch::Receiver<bool>) {
        let enough = claim_coalesce_slots(self.config.engine.workers);
        if self.slots.available_permits() == 0 {
            tokio::select! {
                _ = self.wake_scheduler.notified() => return,
                _ = self.slot_freed.notified() => {}
                _ = tokio::time::sleep(poll) => return,
                _ = stop.changed() => return,
            }
        }
        if self.slots.available_permits() >= enough {
            return;
        }
        // A critical run due now is claimed with the workers free now.
        let due = async {
            let mut conn = HeldConnection::acquire(&self.db.pool).await?;
            let due = within(self.config.engine.database_deadline(), store::critical_run_due(&mut conn)).await;
            conn.settle(due)
        };
        match due.await {
            Ok(false) => {}
            _ => return,
        }
        let deadline = tokio::time::Instant::now() + CLAIM_COALESCE_WINDOW;
        while self.slots.available_permits() < enough {
            tokio::select! {
                _ = self.wake_scheduler.notified() => return,
                _ = self.slot_freed.notified() => {}
                _ = tokio::time::sleep_until(deadline) => return,
                _ = stop.changed() => return,
            }
        }
    }

    async fn scheduler_loop(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        let poll = Duration::from_millis(self.config.engine.poll_ms);
        // The wait before the next claim while runs are due that the last
        // claim could not take (see `LOCKED_DUE_POLL_MAX`).
        let mut locked_due_wait = Duration::ZERO;
        loop {
            if self.stopping() {
                return;
            }
            self.health.beat(&self.health.scheduler_beat);
            let free = self.slots.available_permits();
            let (asked, got) = if free == 0 && !self.claims.fired_last.load(Ordering::Relaxed) { (0, 0) } else { self.claim_and_start().await };
            let full = asked > 0 && got == asked;
            if got > 0 {
                locked_due_wait = Duration::ZERO;
            }
            if full && self.claims.fired_last.load(Ordering::Relaxed) {
                // Steps ran inside that claim and more runs are due: claim
                // again at once (the claims in flight bound how far ahead).
                continue;
            }
            // Due runs are waiting for workers when every worker is busy or
            // the claim took all it asked for: claim again when enough
            // workers are free, not for every one that frees.
            if free == 0 || full {
                self.await_free_workers(poll, &mut stop).await;
                continue;
            }
            if self.claim_flights.available_permits() < CLAIMS_IN_FLIGHT {
                // The runs of a claim in flight still look due until it lands:
                // wait for every claim in flight to land (or a wake, or `poll`).
                // Then the next due time below is true again.
                let deadline = tokio::time::Instant::now() + poll;
                let mut woken = false;
                while self.claim_flights.available_permits() < CLAIMS_IN_FLIGHT {
                    tokio::select! {
                        _ = self.claim_landed.notified() => {}
                        _ = self.wake_scheduler.notified() => {
                            woken = true;
                            break;
                        }
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = stop.changed() => return,
                    }
                }
                if woken {
                    // A wake (a signal, a run made due) claims at once.
                    locked_due_wait = Duration::ZERO;
                    continue;
                }
            }
            let until_ms = |ms: f64| Duration::from_micros((ms.max(0.0) * 1000.0) as u64).min(poll);
            let next_due = async {
                let mut conn = HeldConnection::acquire(&self.db.pool).await?;
                let next = within(self.config.engine.database_deadline(), store::next_due_in_ms(&mut conn)).await;
                conn.settle(next)
            };
            let wait = match next_due.await {
                // Due, yet the claim took none of them: their rows are
                // locked by another transaction (another engine's claim, a
                // webhook's, a team's write-back), which may hold them for
                // seconds. Poll again sooner than `poll`, but not every
                // millisecond: 1, 2, 4 … ms up to `LOCKED_DUE_POLL_MAX`;
                // and never past the next run still ahead (a critical
                // alert's timeout falls due: nothing else wakes for it).
                Ok((Some(ms), ahead)) if ms <= 0.0 && asked > 0 && got == 0 => {
                    locked_due_wait = (locked_due_wait * 2).clamp(Duration::from_millis(1), LOCKED_DUE_POLL_MAX.min(poll));
                    ahead.map_or(locked_due_wait, |a| locked_due_wait.min(until_ms(a)))
                }
                Ok((Some(ms), _)) if ms <= 0.0 => {
                    locked_due_wait = Duration::ZERO;
                    Duration::from_millis(1)
                }
                Ok((Some(ms), _)) => {
                    locked_due_wait = Duration::ZERO;
                    until_ms(ms)
                }
                _ => {
                    locked_due_wait = Duration::ZERO;
                    poll
                }
            };
            tokio::select! {
                _ = self.wake_scheduler.notified() => {}
                _ = self.slot_freed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Executes a claimed run until it parks (sleep, wait, retry), finishes, or
    /// the lease is lost, on `slot` (which its steps may trade for a
    /// recording place, [`WorkerSlot::leave_for_records`]). The lease is renewed
    /// every third of its length meanwhile. `prefetch`: what the dispatcher
    /// read ahead for the run's first step, and `first_tier`: the first tier
    /// its dispatch opened, each given to the first step this execution runs
    /// ([`StepContext::prefetched`], [`StepContext::first_tier_opened`]).
    pub async fn execute(
        self: &Arc<Self>,
        mut run: ClaimedRun,
        slot: &WorkerSlot,
        mut prefetch: Option<Prefetch>,
        mut first_tier: Option<step::DispatchedTier>,
    ) {
        let lost = Arc::new(AtomicBool::new(false));
        // Aborted when `execute` returns or unwinds, so a lease is never renewed
        // for a step nobody executes.
        let _renewer = AbortOnDrop({
            let pool = self.db.pool.clone();
            let lost = lost.clone();
            let (id, token, lease) = (run.id, run.fencing_token, self.lease_ms());
            // A renewal that gets no reply within a third of the lease is
            // given up (its connection closed) and tried again at once on
            // another, before the lease lapses.
            let deadline = self.config.engine.database_deadline().min(Duration::from_millis((lease / 3).max(100) as u64));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis((lease / 3).max(100) as u64));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let renewed = async {
                        let mut conn = HeldConnection::acquire(&pool).await?;
                        let renewed = within(deadline, store::renew_lease(&mut conn, id, token, lease)).await;
                        conn.settle(renewed)
                    };
                    match renewed.await {
                        Ok(true) => {}
                        Ok(false) => {
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                        Err(e) => tracing::warn!(error = %crate::capture::db_message(&e), "lease renewal failed; retrying"),
                    }
                }
            })
        });
        let actor = self.actor();
        let mut snapshot: Option<state_patch::Snapshot> = None;
        // The buffers of the snapshot before the last step, for the next one's.
        let mut spare: Option<state_patch::Snapshot> = None;
        loop {
            if run.wait_signal.is_some() {
                let resolved = async {
                    let mut conn = HeldConnection::acquire(&self.db.pool).await?;
                    let resolved = within(self.config.engine.database_deadline(), store::resolve_wait(&mut conn, &run, &actor)).await;
                    conn.settle(resolved)
                };
                match resolved.await {
                    Ok(WaitResolution::Resolved(outcome)) => {
                        run.wait_signal = None;
                        run.wait_outcome = Some(outcome);
                    }
                    Ok(WaitResolution::Parked) | Ok(WaitResolution::LeaseLost) => break,
                    Err(e) => {
                        // The lease lapses and another claim retries the resolution.
                        tracing::warn!(run = %run.id, error = %crate::capture::db_message(&e), "resolving a wait failed");
                        break;
                    }
                }
            }
            let Some(workflow) = self.config.workflow(&run.workflow) else {
                // Fail visibly instead of retrying forever: status `failed`,
                // `last_error` naming the workflow, audited `run.failed`, logged.
                let msg = format!("workflow '{}' is not in this engine's config (removed?): the run cannot proceed", run.workflow);
                tracing::error!(run = %run.id, workflow = %run.workflow, "run failed: its workflow is not in this engine's config");
                let fail = store::Parking::Fail { error: msg };
                if let Err(e) = self.bounded_record(store::commit_transition(&self.db.pool, &run, &run.state, &run.step, &fail, &actor)).await {
                    tracing::warn!(run = %run.id, error = %e, "recording the failure failed; the lease will lapse and it is retried");
                }
                break;
            };
            let rule = self.host.retry_rule(workflow, &run.step);
            // What a `continue` is logged as: the changes the step recorded,
            // when its workflow records them; else the state compared with
            // the snapshot of the state before the step
            // (`state_patch::diff_from`), made by the last step's commit (or
            // here, once per claim or after recorded steps).
            // The snapshot left by the last step is taken either way: a
            // recording step leaves none (or its buffers go to `spare`), so
            // that a later step never compares against an older state.
            let recording = self.host.records_state_changes(workflow, &run);
            let prior = snapshot.take();
            let before = if recording {
                spare = spare.or(prior);
                None
            } else {
                Some(prior.unwrap_or_else(|| state_patch::Snapshot::of(&run.state)))
            };
            // Debug builds check that a recording step changed nothing else.
            #[cfg(debug_assertions)]
            let state_before = recording.then(|| run.state.clone());
            // Taken, not copied: on a failure the run is re-claimed from the
            // database; on success the new state goes back into `run`.
            let mut state = std::mem::take(&mut run.state);
            let saved = AtomicBool::new(false);
            let (result, in_commit, recorded) = {
                use futures_util::FutureExt;
                let mut ctx = StepContext {
                    services: &self.services,
                    run: &run,
                    workflow,
                    state: &mut state,
                    lease_lost: &lost,
                    in_commit: Vec::new(),
                    slot,
                    prefetched: prefetch.take(),
                    first_tier_opened: first_tier.take(),
                    recorded: recording.then(Vec::new),
                    state_saved: &saved,
                };
                // A panicking step is a bug; it must not leave the run leased
                // forever nor crash-loop: it counts as a failed attempt.
                let r = match std::panic::AssertUnwindSafe(self.host.run_step(&mut ctx)).catch_unwind().await {
                    Ok(r) => r,
                    Err(panic) => {
                        let msg =
                            panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("(no message)");
                        Err(StepError::Retryable(anyhow::anyhow!("step panicked: {msg}")))
                    }
                };
                (r, std::mem::take(&mut ctx.in_commit), ctx.recorded.take())
            };
            // (A step that broke the contract fails for good, visibly: a
            // panic here would re-run it on every takeover.)
            #[cfg(debug_assertions)]
            let result = match (&state_before, &recorded, result) {
                (Some(before), Some(ops), Ok(transition)) => {
                    let mut replayed = before.clone();
                    state_patch::apply(&mut replayed, &Value::Array(ops.clone()));
                    if replayed == state {
                        Ok(transition)
                    } else {
                        tracing::error!(run = %run.id, step = %run.step, "the step changed its state otherwise than through record_set");
                        Err(StepError::Permanent(anyhow::anyhow!("step {} changed its state otherwise than through record_set", run.step)))
                    }
                }
                (_, _, result) => result,
            };
            let result = match result {
                Ok(transition) => {
                    let (next_step, parking) = parking_of(transition, &run.step);
                    let critical = self.host.is_critical(workflow);
                    match self
                        .commit_step(
                            &run,
                            critical,
                            &mut state,
                            before.as_ref().filter(|_| !saved.load(Ordering::Relaxed)),
                            recorded.filter(|_| !saved.load(Ordering::Relaxed)),
                            &mut snapshot,
                            spare.take(),
                            &next_step,
                            &parking,
                            &in_commit,
                            &actor,
                        )
                        .await
                    {
                        Ok(committed) => {
                            spare = before.or(spare);
                            Ok((next_step, parking, committed))
                        }
                        Err(step_error) => Err(step_error),
                    }
                }
                Err(e) => Err(e),
            };
            let committed = match result {
                Ok((next_step, parking, committed)) => match committed {
                    Some(due_now) => {
                        if due_now {
                            self.wake_scheduler.notify_one();
                        }
                        if matches!(parking, Parking::Continue) {
                            // A step that recorded its sends off its worker slot
                            // takes one again before the next step.
                            slot.rejoin_workers().await;
                            if self.stopping() {
                                // Shutdown took the worker slots meanwhile: leave
                                // the next step to whoever takes the run over.
                                break;
                            }
                            run.step = next_step;
                            run.state = state;
                            run.step_seq += 1;
                            run.step_attempt = 0;
                            run.wait_outcome = None;
                            continue;
                        }
                        true
                    }
                    None => false,
                },
                Err(StepError::LeaseLost) => false,
                Err(StepError::RetryIn { error, delay_ms }) => {
                    let msg = error;
                    tracing::warn!(run = %run.id, step = %run.step, attempt = run.step_attempt + 1, error = %msg, retry_in_ms = delay_ms, "step failed");
                    let hook = self.host.failure_hook(workflow, &run.step);
                    matches!(
                        self.bounded_record(store::record_step_failure(&self.db.pool, &run, &msg, rule.max_attempts, delay_ms, hook.as_deref(), &actor)).await,
                        Ok(Some(_))
                    )
                }
                Err(StepError::Retryable(err)) => {
                    let delay = retry_delay_ms(workflow, run.step_attempt + 1);
                    let delay = rule.cap_ms.map_or(delay, |cap| delay.min(cap));
                    let msg = crate::capture::error_text(&err);
                    tracing::warn!(run = %run.id, step = %run.step, attempt = run.step_attempt + 1, error = %msg, "step failed");
                    let hook = self.host.failure_hook(workflow, &run.step);
                    matches!(
                        self.bounded_record(store::record_step_failure(&self.db.pool, &run, &msg, rule.max_attempts, delay, hook.as_deref(), &actor)).await,
                        Ok(Some(_))
                    )
                }
                Err(StepError::Permanent(err)) if rule.max_attempts == u32::MAX => {
                    // An alert is never given up on: an escalation keeps retrying
                    // (the config or the provider may be fixed meanwhile).
                    let msg = crate::capture::error_text(&err);
                    tracing::error!(run = %run.id, step = %run.step, error = %msg, "escalation step failed; retrying (alerts are never dead-lettered)");
                    let delay = retry_delay_ms(workflow, run.step_attempt + 1);
                    let delay = rule.cap_ms.map_or(delay, |cap| delay.min(cap));
                    matches!(self.bounded_record(store::record_step_failure(&self.db.pool, &run, &msg, u32::MAX, delay, None, &actor)).await, Ok(Some(_)))
                }
                Err(StepError::Permanent(err)) => {
                    let msg = crate::capture::error_text(&err);
                    tracing::error!(run = %run.id, step = %run.step, error = %msg, "step failed permanently");
                    let hook = self.host.failure_hook(workflow, &run.step);
                    if hook.is_some() {
                        matches!(self.bounded_record(store::record_step_failure(&self.db.pool, &run, &msg, 0, 0, hook.as_deref(), &actor)).await, Ok(Some(_)))
                    } else {
                        matches!(
                            self.bounded_record(store::commit_transition(&self.db.pool, &run, &state, &run.step, &Parking::Fail { error: msg }, &actor)).await,
                            Ok(Some(_))
                        )
                    }
                }
            };
            if !committed {
                tracing::info!(run = %run.id, step = %run.step, "lease lost; leaving the run to its new owner");
            }
            break;
        }
    }

    /// Commits a step: its [`workflows::CommitWork`] (a `sql` step's statement,
    /// an `emit`) and its transition in one transaction fenced by the lease's
    /// token; a step without such work is committed by the group committer
    /// with other runs' transitions ([`Engine::commit_grouped`]).
    /// `Ok(None)`: the lease was lost, nothing was written;
    /// `Ok(Some(due_now))`: committed. A database error in the commit itself
    /// is reported as lost (the lease lapses and the step re-runs); an error
    /// of the step's own statement is the step's error. A non-critical run's
    /// transaction with work first waits for a place (`Engine::commit_work`).
    /// A `continue` of the group's is logged as the state's changes since
    /// `before` (its snapshot; `None` when the step saved its state
    /// mid-way, which makes the transition a checkpoint); the snapshot of
    /// the new state goes to `after`, for the next step, made in the
    /// buffers of `spare` when there is one. A `continue` whose step
    /// recorded its changes (`recorded`, [`StepContext::record_set`]) is
    /// logged as those, with no comparison and no snapshot for the next step.
    #[allow(clippy::too_many_arguments)]
    async fn commit_step(
        &self,
        run: &ClaimedRun,
        critical: bool,
        state: &mut Value,
        before: Option<&state_patch::Snapshot>,
        recorded: Option<Vec<Value>>,
        after: &mut Option<state_patch::Snapshot>,
        spare: Option<state_patch::Snapshot>,
        next_step: &str,
        parking: &Parking,
        work: &[Box<dyn step::CommitWork>],
        actor: &str,
    ) -> Result<Option<bool>, StepError> {
        if work.is_empty() {
            // A `continue` goes to the step log as the state's changes: one
            // narrow row, the run's row (a long run's state: a script's
            // results, an escalation's positions) not rewritten. Any other
            // transition (or a step that saved its state mid-way) checkpoints
            // the whole state, shared with the batch, not copied.
            let continuing = matches!(parking, Parking::Continue);
            let (shared, patch) = match (recorded.filter(|_| continuing), before.filter(|_| continuing)) {
                (Some(ops), _) => {
                    *after = None;
                    (Arc::new(Value::Null), Some(Value::Array(ops)))
                }
                (None, Some(before)) => {
                    let (patch, next) = state_patch::diff_reusing(before, state, spare.unwrap_or_default());
                    *after = Some(next);
                    (Arc::new(Value::Null), Some(patch))
                }
                (None, None) => (Arc::new(std::mem::take(state)), None),
            };
            let patch_less = patch.is_none();
            let item = store::TransitionCommit {
                id: run.id,
                fencing_token: run.fencing_token,
                step: run.step.clone(),
                state: shared.clone(),
                next_step: next_step.to_string(),
                parking: parking.clone(),
                actor: actor.to_string(),
                seq: run.step_seq + 1,
                patch,
            };
            let outcome = self.commit_grouped(item, critical).await;
            if patch_less {
                *state = Arc::try_unwrap(shared).unwrap_or_else(|still_shared| (*still_shared).clone());
            }
            return Ok(outcome);
        }
        // A non-critical run waits for a place before it takes a connection
        // (`Engine::commit_work`); a critical one never waits for one.
        let _place = if critical { None } else { self.commit_work.acquire().await.ok() };
        let attempt = async {
            let mut tx = self.db.pool.begin().await?;
            if !store::lock_fenced(&mut tx, run.id, run.fencing_token).await? {
                return Ok::<_, sqlx::Error>(Err(StepError::LeaseLost));
            }
            for w in work {
                if let Err(step_error) = w.apply(&mut tx, &run.input, state).await {
                    tx.rollback().await?;
                    return Ok(Err(step_error));
                }
            }
            let due_now = store::write_transition(&mut tx, run, state, next_step, parking, actor).await?;
            tx.commit().await?;
            Ok(Ok(due_now))
        };
        // Bounded: past the deadline its connection is dropped mid-statement,
        // checked as it goes back to the pool and closed (`db::deadline`).
        match deadline::within_on(&self.db.pool, self.config.engine.database_deadline(), attempt).await {
            Ok(Ok(due_now)) => Ok(Some(due_now)),
            Ok(Err(StepError::LeaseLost)) => Ok(None),
            Ok(Err(step_error)) => Err(step_error),
            Err(e) => {
                tracing::warn!(run = %run.id, error = %crate::capture::db_message(&e), "committing a step failed; the lease will lapse and the step re-run");
                Ok(None)
            }
        }
    }

    /// A step's outcome recorded outside its commit (a failure, a retry, a
    /// run whose workflow is gone), bounded by `engine.database_deadline_ms`
    /// like the rest of the step's database work
    /// ([`crate::db::deadline::within_on`]): one that gets no reply leaves
    /// the run to the lapse of its lease (its renewals end with the step).
    async fn bounded_record<T>(&self, record: impl std::future::Future<Output = Result<T, sqlx::Error>>) -> Result<T, sqlx::Error> {
        deadline::within_on(&self.db.pool, self.config.engine.database_deadline(), record).await
    }

    /// Releases, after stop: waits up to `grace` for steps in flight (holding
    /// every worker slot, so nothing new can start), then releases the leases
    /// still held so other engines take over at once. Call only after the
    /// listener, dispatcher and scheduler have returned ([`EngineTasks::stop`]).
    async fn drain_and_release(self: &Arc<Self>, grace: Duration) {
        let workers = self.config.engine.workers as u32;
        let started = tokio::time::Instant::now();
        // Claims in flight land (and start their runs) before the workers drain.
        let _claims = tokio::time::timeout(grace, self.claim_flights.acquire_many(CLAIMS_IN_FLIGHT as u32)).await;
        let _held = tokio::time::timeout(grace.saturating_sub(started.elapsed()), self.slots.acquire_many(workers)).await;
        // Steps recording their sends without a worker slot finish too.
        let recording = workers * step::RECORDING_PLACES_PER_WORKER as u32;
        let _recording = tokio::time::timeout(grace.saturating_sub(started.elapsed()), self.record_places.recording.acquire_many(recording)).await;
        let released = async {
            let mut conn = HeldConnection::acquire(&self.db.pool).await?;
            let released = within(self.config.engine.database_deadline(), store::release_leases(&mut conn, &self.engine_id)).await;
            conn.settle(released)
        };
        match released.await {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "released leases at shutdown"),
            Err(e) => tracing::warn!(error = %crate::capture::db_message(&e), "releasing leases failed; they expire on their own"),
        }
    }
}

/// Delay before retry number `attempt` (1-based): `retry_base_ms · 2^(attempt-1)`,
/// capped at `retry_max_ms`, with "equal jitter" (half fixed, half random) so
/// that retries of many runs spread out.
pub fn retry_delay_ms(w: &crate::config::Workflow, attempt: i32) -> i64 {
    let exp = (attempt.max(1) - 1).min(30) as u32;
    let raw = w.retry_base_ms.saturating_mul(1u64 << exp).min(w.retry_max_ms);
    let half = raw / 2;
    let jitter = if half > 0 { rand::random_range(0..=half) } else { 0 };
    (half + jitter) as i64
}

/// Longest key (bytes) stored as it is; a longer one is stored as
/// `sha1:<hex>` of itself, so that it always fits the unique index
/// `runs_live_key` (a b-tree entry is at most about 2.7 kB).
pub const MAX_KEY_BYTES: usize = 200;

/// The key of a new run of `workflow` from outbox row `outbox_id`: its
/// workflow's key template (if any) rendered over the payload
/// ([`run_key`]); a template that renders empty is logged (by workflow and
/// outbox id, never the payload) and the run starts without a key. Shared by
/// the dispatch batch and the direct dispatch, which must key runs alike.
fn new_run_key(template: Option<&str>, payload: &Value, workflow: &str, outbox_id: i64) -> Option<String> {
    let key = template.and_then(|t| run_key(t, payload));
    if template.is_some() && key.is_none() {
        tracing::warn!(workflow = %workflow, outbox_id, "the event's key renders empty; the run starts without a key");
    }
    key
}

/// A run's key: `template` rendered over the event payload (hashed when
/// longer than [`MAX_KEY_BYTES`]); `None` when it renders empty (the payload
/// lacks the field).
fn run_key(template: &str, payload: &Value) -> Option<String> {
    use sha1::Digest;
    let t = crate::template::Template::parse(template).ok()?;
    let k = t.render_with(payload, &std::collections::HashMap::new(), &Value::Null);
    if k.is_empty() {
        return None;
    }
    if k.len() > MAX_KEY_BYTES {
        let digest = sha1::Sha1::digest(k.as_bytes());
        return Some(format!("sha1:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    }
    Some(k)
}

/// Evaluates a workflow's `when` over a batch of payloads in one statement
/// (in a savepoint). `Ok(Ok(ids))`: the outbox ids whose payload matched;
/// `Ok(Err(sqlstate))`: the condition failed (the savepoint is rolled back).
async fn when_matches(tx: &mut sqlx::PgConnection, when: &str, ids: &[i64], payloads: &[&Value]) -> Result<Result<Vec<i64>, Option<String>>, sqlx::Error> {
    sqlx::query("SAVEPOINT wardcall_when").execute(&mut *tx).await?;
    let sql = format!("SELECT id FROM unnest($1::bigint[], $2::jsonb[]) AS event(id, payload) WHERE ({when})");
    match sqlx::query_scalar::<_, i64>(&sql).bind(ids).bind(payloads).fetch_all(&mut *tx).await {
        Ok(matched) => {
            sqlx::query("RELEASE SAVEPOINT wardcall_when").execute(&mut *tx).await?;
            Ok(Ok(matched))
        }
        Err(e) => {
            sqlx::query("ROLLBACK TO SAVEPOINT wardcall_when").execute(&mut *tx).await?;
            Ok(Err(e.as_database_error().and_then(|d| d.code()).map(|c| c.to_string())))
        }
    }
}

/// The group committer of one engine: forms a batch of the transitions
/// queued (at most [`GROUP_COMMIT_MAX`]) until no commit is in flight, or it
/// holds [`GROUP_COMMIT_MIN`], or [`GROUP_COMMIT_WINDOW`] has passed; then,
/// as soon as one of its [`GROUP_COMMITS_IN_FLIGHT`] commits is free,
/// commits it in one statement. Ends when the engine (the queue's sender)
/// is dropped.
async fn group_committer(
    pool: sqlx::PgPool,
    deadline: Duration,
    mut rx: mpsc::UnboundedReceiver<CommitRequest>,
    stats: Arc<GroupCommitStats>,
    flights: Arc<Semaphore>,
    queued: Arc<AtomicU64>,
) {
    loop {
        let Some(first) = rx.recv().await else { return };
        // Queued transitions keep the workers off the direct path until
        // this batch is taken; more join while it forms: until no commit is
        // in flight, or it holds GROUP_COMMIT_MIN, or GROUP_COMMIT_WINDOW
        // has passed since its first transition, and then while a flight frees.
        let formed_by = tokio::time::Instant::now() + GROUP_COMMIT_WINDOW;
        let mut batch = vec![first];
        let mut open = true;
        loop {
            while batch.len() < GROUP_COMMIT_MAX {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if !open || batch.len() >= GROUP_COMMIT_MIN || flights.available_permits() == GROUP_COMMITS_IN_FLIGHT {
                break;
            }
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => batch.push(r),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(formed_by) => break,
            }
        }
        let Ok(flight) = flights.clone().acquire_owned().await else { return };
        while batch.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        queued.fetch_sub(batch.len() as u64, Ordering::AcqRel);
        let (pool, stats) = (pool.clone(), stats.clone());
        tokio::spawn(async move {
            // The transitions move out of their requests (no copy of their
            // patches and names); each reply waits beside its transition.
            let (items, replies): (Vec<store::TransitionCommit>, Vec<_>) = batch.into_iter().map(|r| (r.item, r.reply)).unzip();
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.transitions.fetch_add(items.len() as u64, Ordering::Relaxed);
            stats.largest.fetch_max(items.len() as u64, Ordering::Relaxed);
            let committed = async {
                let mut conn = HeldConnection::acquire(&pool).await?;
                let committed = within(deadline, store::commit_transitions_skip_locked(&mut conn, &items)).await;
                conn.settle(committed)
            };
            let outcomes = match committed.await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(runs = items.len(), error = %crate::capture::db_message(&e), "a group commit failed; the leases will lapse and the steps re-run");
                    vec![store::GroupOutcome::LeaseLost; items.len()]
                }
            };
            drop(flight);
            for ((reply, item), outcome) in replies.into_iter().zip(items).zip(outcomes) {
                // The batch lets go of the state before the worker resumes,
                // so that the worker takes it back without a copy.
                match outcome {
                    store::GroupOutcome::Committed { due_now } => {
                        drop(item);
                        let _ = reply.send(Some(due_now));
                    }
                    store::GroupOutcome::LeaseLost => {
                        drop(item);
                        stats.fenced_out.fetch_add(1, Ordering::Relaxed);
                        let _ = reply.send(None);
                    }
                    store::GroupOutcome::Busy => {
                        // Its row is held (a webhook locks the run first): commit
                        // it alone, waiting for the lock, without holding the batch.
                        stats.busy.fetch_add(1, Ordering::Relaxed);
                        let (pool, stats) = (pool.clone(), stats.clone());
                        tokio::spawn(async move {
                            let committed = async {
                                let mut conn = HeldConnection::acquire(&pool).await?;
                                let committed = within(deadline, store::commit_transitions(&mut conn, std::slice::from_ref(&item))).await;
                                conn.settle(committed)
                            };
                            let outcome = match committed.await {
                                Ok(mut o) => o.pop().flatten(),
                                Err(e) => {
                                    tracing::warn!(run = %item.id, error = %crate::capture::db_message(&e), "committing a step failed; the lease will lapse and the step re-run");
                                    None
                                }
                            };
                            if outcome.is_none() {
                                stats.fenced_out.fetch_add(1, Ordering::Relaxed);
                            }
                            drop(item);
                            let _ = reply.send(outcome);
                        });
                    }
                }
            }
        });
    }
}

/// The step a run goes on with and what it becomes after a step at
/// `current` answered `transition`.
fn parking_of(transition: Transition, current: &str) -> (String, Parking) {
    match transition {
        Transition::Next { step } => (step, Parking::Continue),
        Transition::Sleep { step, delay_ms } => (step, Parking::Sleep { due_at_epoch_ms: None, delay_ms }),
        Transition::SleepUntil { step, epoch_ms } => (step, Parking::Sleep { due_at_epoch_ms: Some(epoch_ms), delay_ms: 0 }),
        Transition::Wait { step, signal, timeout_ms } => (step, Parking::Wait { signal, timeout_ms }),
        Transition::Complete => (current.to_string(), Parking::Complete),
        Transition::Fail { error } => (current.to_string(), Parking::Fail { error }),
        Transition::Cancelled => (current.to_string(), Parking::Cancelled),
        Transition::Defer { delay_ms } => (current.to_string(), Parking::Defer { delay_ms }),
    }
}

/// A claim whose runs are locked and whose in-claim steps have run, not yet
/// committed ([`Engine::lock_due_runs`], [`Engine::land_claim`]).
struct LockedClaim {
    /// The claim's connection, inside its transaction ([`HeldConnection::begin`]).
    conn: HeldConnection,
    /// Transitions of the steps run inside the claim.
    fired: Vec<store::TransitionCommit>,
    /// The status each of `fired`'s runs was due in.
    held: Vec<String>,
    /// Runs to lease.
    leased: Vec<ClaimedRun>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The running tasks of an engine.
pub struct EngineTasks {
    engine: Arc<Engine>,
    set: JoinSet<()>,
}

impl EngineTasks {
    /// Graceful stop: the listener, dispatcher and scheduler stop and are
    /// joined first (no claim can be half-way), then steps in flight get
    /// `grace` to finish and the leases still held are released.
    ///
    /// A loop still waiting after `grace` (a statement on a connection that a
    /// hard failover left half-open, which only the kernel would end:
    /// [`crate::db::deadline`]) is aborted, so that a stop is bounded; an
    /// aborted claim's connection is closed and the server rolls it back.
    pub async fn stop(mut self, grace: Duration) {
        let _ = self.engine.shutdown.send(true);
        let joined = tokio::time::timeout(grace, async { while self.set.join_next().await.is_some() {} }).await;
        if joined.is_err() {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "engine tasks still running after the grace period (waiting on the database?); aborting them");
            // Their connections, dropped mid-statement, are checked as they go back.
            deadline::mark_suspect(&self.engine.db.pool);
            self.set.abort_all();
            while self.set.join_next().await.is_some() {}
        }
        self.engine.drain_and_release(grace).await;
    }

    /// The engine these tasks belong to.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}
