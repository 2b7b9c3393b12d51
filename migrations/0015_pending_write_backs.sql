-- Issue 9: write-backs left out of a batch of send records are kept in the
-- database until they are written, instead of only in the memory of the
-- engine that deferred them.
--
-- A batch of send records (notify::delivery::RecordCommitter) runs each
-- write-back in a savepoint with a 200 ms lock timeout and a budget for all
-- of them; one that waits longer for a team's row, and the batch's later
-- ones, are left out so that the records commit (a nurse's keypress waits
-- for the attempt's row). They used to be run by a task of the engine
-- afterwards: if that engine stopped or lost the database for longer than
-- its retry budget, the team's row never got the call's details, and
-- nothing recorded that it did not (DESIGN.md invariants 2 and 4).
--
-- Now the batch inserts one row per left-out write-back in its own
-- transaction. A row is deleted in the transaction that runs its write-back
-- (or audits it as failed or superseded), so it runs once; an engine that
-- stops leaves it for the call sweeper of any engine, which tries it again
-- at `next_try_at`. The statement and the payload (the run's event, as the
-- run's `input` holds it) are kept as they were when the send was recorded.
CREATE TABLE wardcall.pending_write_backs (
    attempt_id   uuid        NOT NULL REFERENCES wardcall.notification_attempts (id) ON DELETE CASCADE,
    hook         text        NOT NULL,
    statement    text        NOT NULL,
    payload      jsonb       NOT NULL,
    actor        text        NOT NULL,
    deferred_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    tries        integer     NOT NULL DEFAULT 0,
    next_try_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (attempt_id, hook)
);
CREATE INDEX pending_write_backs_next_try ON wardcall.pending_write_backs (next_try_at);
