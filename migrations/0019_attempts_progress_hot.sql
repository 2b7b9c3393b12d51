-- Issue 9: an attempt's progress (`requested` → `initiated` → `ringing` →
-- `in-progress`, a text's `accepted` … `sent`) as heap-only tuple (HOT)
-- updates (PostgreSQL 15 manual, "Heap-Only Tuples (HOT)" and "CREATE
-- TABLE … fillfactor"; src/backend/access/heap/README.HOT).
--
-- `notification_attempts_live` (0016) named `status` in its predicate, and
-- an update that changes a column any index or index predicate names is
-- never HOT: each progress callback wrote a new entry into all seven
-- indexes of the table, about 18 index entries per alert out of its 63
-- (BENCHMARKS.md, "Issue 9, seventeenth session", `pg_waldump` by
-- relation). The index now names `live`, a stored generated column that
-- is true exactly for the statuses 0016 listed: a move between two of them
-- leaves every indexed value as it was, and with a fifth of each page kept
-- free the new version can stay on its page. The move to a final status
-- still updates the indexes, once. The sweeps' queries say `AND live` so
-- that the planner can use the index; their status conditions are unchanged.
--
-- Adding a stored column rewrites the table once, under an exclusive lock,
-- while wardcall migrates at start (seconds for a few million attempts).
ALTER TABLE wardcall.notification_attempts
    ADD COLUMN live boolean NOT NULL
        GENERATED ALWAYS AS (status IN ('intent','unknown','requested','initiated','ringing','in-progress',
                                        'accepted','scheduled','queued','sending','sent')) STORED;
ALTER TABLE wardcall.notification_attempts SET (fillfactor = 80);
DROP INDEX wardcall.notification_attempts_live;
CREATE INDEX notification_attempts_live ON wardcall.notification_attempts (reconcile_after) WHERE live;
