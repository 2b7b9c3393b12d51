-- The workflow model (issue 8): keyed runs. At most one live run per
-- (workflow, key); a cancelled or replaced run gives its key up (key = NULL)
-- at once, even while its on_cancel hook still runs.
ALTER TABLE wardcall.runs ADD COLUMN key text;
CREATE UNIQUE INDEX runs_live_key ON wardcall.runs (workflow, key)
    WHERE key IS NOT NULL AND status IN ('pending','running','sleeping','waiting');
