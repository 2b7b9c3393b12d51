-- Outgoing HTTP requests to the team's endpoints (src/outbound): one intent
-- row per request, committed before the request is sent; a circuit breaker
-- per named endpoint shared by every engine; counts per endpoint; the dead
-- letters (failed runs) as a view.

-- The breaker of each named endpoint (`[[endpoints]]`). A row is created on
-- the endpoint's first failure; no row means closed with no failure.
--   closed    requests go out; consecutive_failures counts transport errors,
--             timeouts, 5xx and 429 since the last success
--   open      nothing is sent until opened_until
--   half_open one probe request (probe_request, sent by probe_owner) is in
--             flight until probe_expires_at; after that another caller may
--             claim the probe (a crashed prober never wedges the breaker)
CREATE TABLE wardcall.http_endpoints (
    name                 text        PRIMARY KEY,
    state                text        NOT NULL DEFAULT 'closed' CHECK (state IN ('closed','open','half_open')),
    consecutive_failures integer     NOT NULL DEFAULT 0,
    opened_until         timestamptz,
    probe_owner          text,
    probe_request        uuid,
    probe_expires_at     timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Counts per endpoint, spread over a few slots per endpoint (the writer picks
-- one at random) so that concurrent requests do not queue on one row lock;
-- readers sum them (wardcall.http_endpoint_stats).
CREATE TABLE wardcall.http_endpoint_counts (
    endpoint         text     NOT NULL,
    slot             smallint NOT NULL,
    attempts         bigint   NOT NULL DEFAULT 0,
    successes        bigint   NOT NULL DEFAULT 0,
    failures         bigint   NOT NULL DEFAULT 0,
    breaker_openings bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (endpoint, slot)
);

-- One row per request sent (or about to be sent): the intent is committed
-- before the request. No URL, header or body is kept (they may hold patient
-- data or secrets): the endpoint's name, the method and the outcome.
CREATE TABLE wardcall.http_requests (
    id              uuid        PRIMARY KEY,
    run_id          uuid,
    step            text        NOT NULL,
    attempt         integer     NOT NULL,
    endpoint        text        NOT NULL,
    method          text        NOT NULL,
    idempotency_key text        NOT NULL,
    engine          text        NOT NULL,
    probe           boolean     NOT NULL DEFAULT false,
    outcome         text        NOT NULL DEFAULT 'intent' CHECK (outcome IN ('intent','success','failed')),
    retryable       boolean,
    status          integer,
    latency_ms      integer,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at     timestamptz
);
CREATE INDEX http_requests_run ON wardcall.http_requests (run_id, step, attempt) WHERE run_id IS NOT NULL;
CREATE INDEX http_requests_endpoint ON wardcall.http_requests (endpoint, created_at);

-- What a metrics endpoint reads: breaker state and counts per endpoint.
CREATE VIEW wardcall.http_endpoint_stats AS
SELECT n.endpoint,
       coalesce(e.state, 'closed')             AS state,
       coalesce(e.consecutive_failures, 0)     AS consecutive_failures,
       e.opened_until,
       coalesce(c.attempts, 0)::bigint         AS attempts,
       coalesce(c.successes, 0)::bigint        AS successes,
       coalesce(c.failures, 0)::bigint         AS failures,
       coalesce(c.breaker_openings, 0)::bigint AS breaker_openings
  FROM (SELECT name AS endpoint FROM wardcall.http_endpoints
        UNION SELECT endpoint FROM wardcall.http_endpoint_counts) n
  LEFT JOIN wardcall.http_endpoints e ON e.name = n.endpoint
  LEFT JOIN (SELECT endpoint, sum(attempts) AS attempts, sum(successes) AS successes,
                    sum(failures) AS failures, sum(breaker_openings) AS breaker_openings
               FROM wardcall.http_endpoint_counts GROUP BY endpoint) c ON c.endpoint = n.endpoint;

-- Dead letters: runs that failed (retries exhausted, or a failure retrying
-- cannot help), with the step they failed at and the last error. Never the
-- payload. `wardcall retry <run-id>` / POST /api/runs/{id}/retry put one back.
CREATE VIEW wardcall.dead_letters AS
SELECT id           AS run_id,
       workflow,
       event,
       event_id,
       step,
       step_attempt AS attempts,
       last_error,
       finished_at  AS failed_at
  FROM wardcall.runs
 WHERE status = 'failed';

-- Audit rows about an endpoint's breaker (entity 'http_endpoint'). The allowed
-- entities are widened in place, keeping whatever other migrations allowed:
-- the existing CHECK's list gets one more value. NOT VALID skips re-checking
-- the (append-only, possibly large) table: every existing row satisfied the
-- narrower list.
DO $$
DECLARE
    def text;
BEGIN
    SELECT pg_get_constraintdef(oid) INTO def FROM pg_constraint
     WHERE conrelid = 'wardcall.audit_log'::regclass AND conname = 'audit_log_entity_check';
    IF def IS NOT NULL AND position('''http_endpoint''' IN def) = 0 AND position('ARRAY[' IN def) > 0 THEN
        ALTER TABLE wardcall.audit_log DROP CONSTRAINT audit_log_entity_check;
        EXECUTE 'ALTER TABLE wardcall.audit_log ADD CONSTRAINT audit_log_entity_check '
             || replace(replace(def, ' NOT VALID', ''), 'ARRAY[', 'ARRAY[''http_endpoint''::text, ') || ' NOT VALID';
    END IF;
END $$;
