-- Issue 9: a call's status callbacks as heap-only tuple (HOT) updates
-- (PostgreSQL 15 manual, 73.7 "Heap-Only Tuples (HOT)"; "CREATE TABLE …
-- fillfactor").
--
-- A status callback (initiated, ringing, in-progress) changes `status` and
-- one time stamp. `notification_attempts_live`'s predicate named `status`,
-- so every such change was an indexed column's: no update of the table was
-- ever HOT (a 1,000-alert burst: 2,325 updates, none HOT), and each put a
-- new entry into all seven of its indexes. The reconciliation sweeps'
-- index now keys on what ends an attempt instead: `ended_at` is stamped
-- once, with a final status (a call's completed, busy, no-answer, failed,
-- canceled; a text's delivered, undelivered, failed, canceled), and an
-- attempt whose outcome is unknown but not settled keeps it NULL. The
-- sweeps' queries say `ended_at IS NULL` to use it. With room kept on every
-- page, a status change leaves the indexes alone. Existing pages keep
-- their layout until they are rewritten.
ALTER TABLE wardcall.notification_attempts SET (fillfactor = 70);
DROP INDEX wardcall.notification_attempts_live;
CREATE INDEX notification_attempts_unended ON wardcall.notification_attempts (reconcile_after) WHERE ended_at IS NULL;
