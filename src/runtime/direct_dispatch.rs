//! The direct dispatch: a critical event's run created in two round trips
//! instead of a dispatch batch's four (`BEGIN` and the dispatch lock, the
//! claim, the runs' creation, `COMMIT`), on the way from a seizure alert's
//! commit to the nurse's phone.
//!
//! It serves only events whose handling needs nothing of the batch's
//! logic ([`DirectRoutes`]): every workflow bound to the event is critical,
//! has no `when` condition, and either no key or `on_duplicate = "skip"`
//! (which the runs' unique key index enforces by itself); and no workflow
//! cancels or signals runs on the event (`cancel_on`, a `wait` for it). For
//! those, the dispatcher first reads the oldest unprocessed rows
//! ([`store::outbox::peek_unprocessed`]), renders their runs' keys and starts
//! their first steps' reads (an escalation's lookups), then claims them and
//! creates their runs in one statement ([`store::runs::claim_into_runs`]),
//! which takes the same dispatch lock as every batch: a batch with an event
//! that cancels by key (`alert.resolved`) either sees these runs or is seen
//! by them, as if both were one batch. For a run whose first tier is fixed by
//! the config ([`WorkflowHost::first_tier_at_dispatch`]), that statement
//! also opens the run's alert (without its message, which the step writes
//! after its calls' requests) and commits the tier's intents, synchronously: the run
//! goes from its outbox row to its first calls' intents in one statement,
//! and its worker gets them as [`crate::runtime::step::DispatchedTier`].
//!
//! The general batch ([`Engine::dispatch_batch`]) still claims every event,
//! these included: a direct dispatch that fails, or finds no free worker,
//! leaves its rows to it, and it runs after the direct dispatch whenever
//! another event waits, a row read was left, or a row read was taken by
//! another dispatcher or started no run. Measured in BENCHMARKS.md ("Issue 9, sixteenth
//! session").

use super::{new_run_key, Engine, DISPATCH_LOCK_KEY};
use crate::config::{Config, OnDuplicate};
use crate::db::deadline::{self, within, HeldConnection};
use crate::runtime::step::{DispatchedTier, Prefetch, WorkflowHost};
use crate::store;
use std::sync::Arc;

/// Most runs one direct dispatch creates (one per workflow bound to each
/// event it takes); a burst's rest goes to the general batch, which takes
/// hundreds of events at a time.
pub const DIRECT_DISPATCH_MAX: usize = 32;

/// The events a direct dispatch may serve, and their workflows (see the
/// module documentation), fixed for the engine's config.
#[derive(Debug, Default)]
pub struct DirectRoutes {
    /// The events, each once.
    events: Vec<String>,
    /// (event, workflow, key template) per workflow bound to one of them,
    /// in config order.
    routes: Vec<(String, String, Option<String>)>,
}

impl DirectRoutes {
    /// The direct routes of `config`, as `host` runs its workflows.
    pub fn of(config: &Config, host: &dyn WorkflowHost) -> DirectRoutes {
        let mut out = DirectRoutes::default();
        for w in &config.workflows {
            if out.events.contains(&w.event) {
                continue;
            }
            let event = &w.event;
            let bound: Vec<_> = config.workflows.iter().filter(|b| &b.event == event).collect();
            let direct = bound.iter().all(|b| host.is_critical(b) && b.when.is_none() && (b.key.is_none() || b.on_duplicate == OnDuplicate::Skip))
                && config.workflows.iter().all(|any| host.keyed_routes(any, event).is_empty());
            if direct {
                out.events.push(event.clone());
                out.routes.extend(bound.iter().map(|b| (event.clone(), b.name.clone(), b.key.clone())));
            }
        }
        out
    }

    /// Whether no event can be dispatched directly.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The events a direct dispatch serves.
    pub fn events(&self) -> &[String] {
        &self.events
    }
}

/// What a direct dispatch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectDispatch {
    /// Runs created and started.
    pub started: usize,
    /// Whether the general batch must run now: another event waits, the
    /// direct dispatch found more rows than it took (no free worker, a
    /// burst), or a row it read was not claimed by it.
    pub batch_needed: bool,
}

impl Engine {
    /// One direct dispatch (module documentation): whole events, as many as
    /// there are free workers for all of their runs ([`DIRECT_DISPATCH_MAX`]
    /// runs at most), each run started at once on its worker; workers are
    /// taken only after the rows are read, and given back (the scheduler
    /// told) when a run they were taken for was not created. Two
    /// autocommit statements on one connection, bounded together by
    /// `engine.database_deadline_ms`.
    ///
    /// Errors: a database error or [`deadline::NoReply`]; nothing was
    /// claimed unless the second statement's `COMMIT` landed without its
    /// reply (its runs, leased to this engine and not started, are claimed
    /// again when their leases lapse, as after a dispatch batch's; their
    /// first tiers' intents, of unknown outcome, go under the re-call rule).
    pub(super) async fn dispatch_direct(self: &Arc<Self>) -> anyhow::Result<DirectDispatch> {
        let mut conn = HeldConnection::acquire(&self.db.pool).await?;
        let result = within(self.config.engine.database_deadline(), self.dispatch_direct_on(&mut conn)).await;
        if result.as_ref().is_err_and(|e| e.downcast_ref::<sqlx::Error>().is_some_and(deadline::is_no_reply)) {
            deadline::mark_suspect(&self.db.pool);
        } else {
            conn.release();
        }
        result
    }

    async fn dispatch_direct_on(self: &Arc<Self>, conn: &mut HeldConnection) -> anyhow::Result<DirectDispatch> {
        let routes = &self.direct_routes;
        // One row more than the free workers could take (an event starts at
        // least one run): whether the batch must follow. No worker is held
        // while the rows are read.
        let free = self.slots.available_permits().min(DIRECT_DISPATCH_MAX);
        let (rows, others) = store::outbox::peek_unprocessed(conn, routes.events(), free as i64 + 1).await?;
        // Whole events only, as many as there were free workers for each of
        // their runs (an event starts one run per workflow bound to it):
        // every run the statement creates is leased to a worker that starts
        // it at once. Never more than `free`, so that a row read and left
        // makes the batch follow.
        let mut workers = UnusedWorkers { permits: Vec::new(), freed: self.slot_freed.clone() };
        let mut taken = 0;
        'rows: for (_, event, _) in &rows {
            let runs = routes.routes.iter().filter(|r| &r.0 == event).count();
            if workers.permits.len() + runs > free {
                break;
            }
            let before = workers.permits.len();
            for _ in 0..runs {
                match self.slots.clone().try_acquire_owned() {
                    Ok(p) => workers.permits.push(p),
                    Err(_) => {
                        workers.give_back_from(before);
                        break 'rows;
                    }
                }
            }
            taken += 1;
        }
        let mut batch_needed = others || rows.len() > taken;
        if taken == 0 {
            return Ok(DirectDispatch { started: 0, batch_needed });
        }
        let (mut workflows, mut event_ids, mut events, mut inputs, mut keys) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (id, event, payload) in &rows[..taken] {
            for (_, workflow, template) in routes.routes.iter().filter(|r| &r.0 == event) {
                let key = new_run_key(template.as_deref(), payload, workflow, *id);
                workflows.push(workflow.clone());
                event_ids.push(*id);
                events.push(event.clone());
                inputs.push(payload.clone());
                keys.push(key);
            }
        }
        // The first steps' reads run while the runs are claimed and created.
        // (With several engines, each engine that read the rows starts them;
        // only the one whose claim wins uses them: bounded, read-only reads,
        // at most once per engine and alert.)
        let mut prefetches: Vec<Option<Prefetch>> = workflows
            .iter()
            .zip(&inputs)
            .map(|(name, input)| self.config.workflow(name).and_then(|w| self.host.prefetch_first_step(&self.services, w, input)).map(Prefetch::spawn))
            .collect();
        // The first tiers the statement opens with the runs (a tier of the
        // config's people): their intents commit with the runs, and the
        // message, which they do not need, is rendered from the reads above
        // meanwhile.
        let tiers: Vec<_> = workflows.iter().map(|name| self.config.workflow(name).and_then(|w| self.host.first_tier_at_dispatch(&self.services, w))).collect();
        let leased = vec![true; workflows.len()];
        let runs = store::runs::NewRuns {
            workflows: &workflows,
            event_ids: &event_ids,
            events: &events,
            inputs: &inputs,
            leased: &leased,
            criticals: &leased, // every workflow of a direct route is critical
            keys: &keys,
        };
        // On an error, or when the deadline drops this future, `workers`
        // gives the workers back and tells the scheduler.
        // Taken before the statement: its leases start no earlier, and a
        // commit that took long (a synchronous standby gone) may return
        // with them lapsed ([`DispatchedTier::sent_at`]).
        let sent_at = std::time::Instant::now();
        let created = store::runs::claim_into_runs(conn, &runs, &tiers, &self.engine_id, self.lease_ms(), DISPATCH_LOCK_KEY).await?;
        // A row another dispatcher took, or a run its key kept from
        // starting: the batch looks again (it audits nothing more for a
        // skipped duplicate, as a batch does not either).
        batch_needed |= created.len() < workflows.len();
        let mut started = 0;
        for store::runs::DispatchedRun { run, first_tier } in created.into_iter().flatten() {
            // One worker per run created (`created` is never longer than
            // the workflows the workers were taken for).
            let Some(permit) = workers.permits.pop() else { break };
            let prefetch = (0..workflows.len())
                .find(|&i| prefetches[i].is_some() && workflows[i] == run.workflow && inputs[i] == run.input)
                .and_then(|i| prefetches[i].take());
            self.start(run, permit, prefetch, first_tier.map(|opened| DispatchedTier { opened, sent_at }));
            started += 1;
        }
        Ok(DirectDispatch { started, batch_needed })
    }
}

/// Workers taken for a direct dispatch and not (yet) given to a run: given
/// back when dropped (an error, the deadline, runs not created), and the
/// scheduler told that workers are free.
struct UnusedWorkers {
    permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    freed: Arc<tokio::sync::Notify>,
}

impl UnusedWorkers {
    /// Gives back the workers taken after the first `kept`.
    fn give_back_from(&mut self, kept: usize) {
        if self.permits.len() > kept {
            self.permits.truncate(kept);
            self.freed.notify_one();
        }
    }
}

impl Drop for UnusedWorkers {
    fn drop(&mut self) {
        self.give_back_from(0);
    }
}

/// The general batch is what a wake-up runs when no event can go directly.
pub(super) fn run_batch_after(direct: &anyhow::Result<DirectDispatch>) -> bool {
    !matches!(direct, Ok(DirectDispatch { batch_needed: false, .. }))
}
