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
//! beside its calls) and commits the tier's intents, synchronously: the run
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
    /// The same routes for a dispatch without a read before its claim
    /// ([`store::runs::claim_next_into_runs`]), when every event starts one
    /// workflow whose key, if any, is one top-level field of the payload
    /// (`key = "{field}"`, which the statement reads as the template
    /// renders it); `None` otherwise.
    next_routes: Option<Vec<store::runs::NextRunRoute>>,
}

/// The payload field a key template names when it is exactly one top-level
/// placeholder (`{field}`: letters, digits, `_`), else `None`.
fn single_field(template: &str) -> Option<&str> {
    let field = template.strip_prefix('{')?.strip_suffix('}')?;
    (!field.is_empty() && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some(field)
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
        let next: Option<Vec<store::runs::NextRunRoute>> = out
            .events
            .iter()
            .map(|event| {
                let mut bound = out.routes.iter().filter(|r| &r.0 == event);
                let (_, workflow, key) = bound.next()?;
                if bound.next().is_some() {
                    return None;
                }
                let key_field = match key {
                    None => None,
                    Some(template) => Some(single_field(template)?.to_string()),
                };
                Some(store::runs::NextRunRoute { event: event.clone(), workflow: workflow.clone(), key_field })
            })
            .collect();
        out.next_routes = next.filter(|routes| !routes.is_empty());
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
        if let Some(next) = &self.direct_routes.next_routes {
            return self.dispatch_next_on(conn, next).await;
        }
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
        let created = store::runs::claim_into_runs(conn, &runs, &tiers, &self.engine_id, self.lease_ms(), DISPATCH_LOCK_KEY).await?;
        let committed_at = std::time::Instant::now();
        // A row another dispatcher took, or a run its key kept from
        // starting: the batch looks again (it audits nothing more for a
        // skipped duplicate, as a batch does not either).
        batch_needed |= created.len() < workflows.len();
        let mut started = 0;
        for store::runs::DispatchedRun { run, first_tier, .. } in created.into_iter().flatten() {
            // One worker per run created (`created` is never longer than
            // the workflows the workers were taken for).
            let Some(permit) = workers.permits.pop() else { break };
            let prefetch = (0..workflows.len())
                .find(|&i| prefetches[i].is_some() && workflows[i] == run.workflow && inputs[i] == run.input)
                .and_then(|i| prefetches[i].take());
            self.start(run, permit, prefetch, first_tier.map(|opened| DispatchedTier { opened, committed_at }));
            started += 1;
        }
        Ok(DirectDispatch { started, batch_needed })
    }
}

impl Engine {
    /// A direct dispatch whose claim needs no read before it
    /// ([`DirectRoutes`]' `next_routes`): as many workers as are free
    /// ([`DIRECT_DISPATCH_MAX`] at most) are taken first, then one statement
    /// claims as many rows and creates their runs with their first tiers
    /// ([`store::runs::claim_next_into_runs`]), while the same rows are read
    /// on another connection ([`store::outbox::peek_unprocessed`]) so that
    /// their first steps' reads (an escalation's lookups) run beside the
    /// claim; that read also says whether other events wait. The workers
    /// the claim did not use are given back.
    ///
    /// Errors: as [`Engine::dispatch_direct`]'s.
    async fn dispatch_next_on(self: &Arc<Self>, conn: &mut HeldConnection, next: &[store::runs::NextRunRoute]) -> anyhow::Result<DirectDispatch> {
        let free = self.slots.available_permits().min(DIRECT_DISPATCH_MAX);
        let mut workers = UnusedWorkers { permits: Vec::new(), freed: self.slot_freed.clone() };
        while workers.permits.len() < free {
            match self.slots.clone().try_acquire_owned() {
                Ok(p) => workers.permits.push(p),
                Err(_) => break,
            }
        }
        if workers.permits.is_empty() {
            return Ok(DirectDispatch { started: 0, batch_needed: true });
        }
        // The read beside the claim, on its own connection and task, bounded
        // by the same deadline; its reads ahead start as soon as it answers.
        let mut peek = Some({
            let this = self.clone();
            let events = self.direct_routes.events().to_vec();
            let limit = workers.permits.len() as i64 + 1;
            tokio::spawn(async move {
                let mut conn = HeldConnection::acquire(&this.db.pool).await?;
                let read = within(this.config.engine.database_deadline(), store::outbox::peek_unprocessed(&mut conn, &events, limit)).await;
                if read.is_ok() {
                    conn.release();
                }
                let (rows, others) = read?;
                let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
                let prefetches: Vec<(i64, String, serde_json::Value, Prefetch)> = rows
                    .into_iter()
                    .filter_map(|(id, event, payload)| {
                        let route = this.direct_routes.routes.iter().find(|r| r.0 == event)?;
                        let w = this.config.workflow(&route.1)?;
                        let read = this.host.prefetch_first_step(&this.services, w, &payload)?;
                        Some((id, route.1.clone(), payload, Prefetch::spawn(read)))
                    })
                    .collect();
                Ok::<_, anyhow::Error>(PeekedBeside { ids, prefetches, others })
            })
        });
        let tiers: Vec<(String, crate::store::alerts::TierIntents)> = next
            .iter()
            .filter_map(|r| {
                let w = self.config.workflow(&r.workflow)?;
                Some((r.workflow.clone(), self.host.first_tier_at_dispatch(&self.services, w)?))
            })
            .collect();
        let mut peeked: Option<PeekedBeside> = None;
        let (mut started, mut claimed) = (0, Vec::new());
        let mut batch_needed = false;
        // A second claim when the read saw rows the first did not take: its
        // snapshot may have been older than theirs (a sweep's claim that began
        // as they committed); what is still left then goes to the batch.
        for round in 0..2 {
            let limit = workers.permits.len();
            if limit == 0 {
                batch_needed = true;
                break;
            }
            let created = store::runs::claim_next_into_runs(
                conn,
                next,
                &tiers,
                limit as i64,
                super::MAX_KEY_BYTES as i32,
                &self.engine_id,
                self.lease_ms(),
                DISPATCH_LOCK_KEY,
            )
            .await?;
            let committed_at = std::time::Instant::now();
            let full = created.len() == limit;
            // The read is normally done by now (one short statement against
            // the claim's several); the runs do not wait for one that is not
            // (they read for themselves).
            if peek.as_ref().is_some_and(|p| p.is_finished()) {
                peeked = Some(settle_peek(peek.take()).await);
            }
            for store::runs::DispatchedRun { run, event_id, first_tier } in created {
                let Some(permit) = workers.permits.pop() else { break };
                claimed.push(event_id);
                let prefetch = peeked.as_mut().and_then(|p| {
                    let i = p.prefetches.iter().position(|(id, workflow, payload, _)| *id == event_id && *workflow == run.workflow && *payload == run.input)?;
                    Some(p.prefetches.swap_remove(i).3)
                });
                self.start(run, permit, prefetch, first_tier.map(|opened| DispatchedTier { opened, committed_at }));
                started += 1;
            }
            if peeked.is_none() {
                peeked = Some(settle_peek(peek.take()).await);
            }
            let read = peeked.as_ref().expect("settled above");
            // More rows may wait (every worker used), or other events do.
            batch_needed = full || read.others;
            let left = read.ids.iter().any(|id| !claimed.contains(id));
            if batch_needed || !left {
                break;
            }
            // Rows left after the second claim (a key the batch renders,
            // another dispatcher's) go to the batch.
            batch_needed = round == 1;
        }
        Ok(DirectDispatch { started, batch_needed })
    }
}

/// What the read beside a claim-first direct dispatch saw: the rows of the
/// direct events (`ids`), their first steps' reads started (outbox id,
/// workflow, payload, read), and whether other events wait.
struct PeekedBeside {
    ids: Vec<i64>,
    prefetches: Vec<(i64, String, serde_json::Value, Prefetch)>,
    others: bool,
}

/// The read beside the claim, waited for; a read that failed (or none)
/// counts as one that saw other events wait, so the batch looks.
async fn settle_peek(peek: Option<tokio::task::JoinHandle<anyhow::Result<PeekedBeside>>>) -> PeekedBeside {
    match peek {
        Some(handle) => match handle.await {
            Ok(Ok(read)) => read,
            _ => PeekedBeside { ids: Vec::new(), prefetches: Vec::new(), others: true },
        },
        None => PeekedBeside { ids: Vec::new(), prefetches: Vec::new(), others: true },
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
