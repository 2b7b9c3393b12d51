-- The reconciliation sweeps' index covers every attempt not yet final, of
-- both channels. `notification_attempts_live` (0005) listed the live call
-- statuses only: the texts' sweep (`accepted` … `sent`) and the calls'
-- sweep, whose condition also takes an `unknown` call still open, could not
-- use it, and the planner read every attempt that ever had a provider id
-- (`notification_attempts_provider_id`) at each sweep: with a year of
-- calls and texts, a scan of the whole table every few seconds. The
-- statuses are those of `notify::acknowledgement`'s call and message ranks
-- below a final one, with `intent` and `unknown`.
DROP INDEX wardcall.notification_attempts_live;
CREATE INDEX notification_attempts_live ON wardcall.notification_attempts (reconcile_after)
    WHERE status IN ('intent','unknown','requested','initiated','ringing','in-progress',
                     'accepted','scheduled','queued','sending','sent');
