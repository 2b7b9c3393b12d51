-- Critical work first (issue 7, item 8; DESIGN.md invariant 10).
-- A run is `critical` when its workflow pages people (today: kind = escalation).
-- Claims take due critical runs before any other due run; each half of the claim
-- is an index range scan on runs_claim (critical = x AND due_at <= now(), in
-- due_at order), so a flood of other due work does not make the claim slower.
ALTER TABLE wardcall.runs ADD COLUMN critical boolean NOT NULL DEFAULT false;
DROP INDEX wardcall.runs_due;
CREATE INDEX runs_claim ON wardcall.runs (critical, due_at)
    WHERE status IN ('pending','running','sleeping','waiting');
-- Unprocessed outbox rows by event, so the dispatcher can take the events of
-- critical workflows first without reading the whole backlog.
CREATE INDEX outbox_unprocessed_event ON wardcall.outbox (event, id) WHERE processed_at IS NULL;
