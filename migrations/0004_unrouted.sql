-- Nothing is dropped silently (DESIGN.md invariant 10): an outbox row whose
-- event no workflow listens to is marked unrouted when the dispatcher reaches
-- it, and kept (never deleted), so that `wardcall status`, /api/status and a
-- plain query show it.
ALTER TABLE wardcall.outbox ADD COLUMN unrouted_at timestamptz;
CREATE INDEX outbox_unrouted ON wardcall.outbox (unrouted_at) WHERE unrouted_at IS NOT NULL;
