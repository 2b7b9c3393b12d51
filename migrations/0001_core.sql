-- wardcall core schema: outbox, durable runs, signals, append-only audit log.
-- Every timestamp is timestamptz (UTC on the wire). clock_timestamp() is used
-- instead of now() where the value is a measurement (latency, lateness).

CREATE TABLE wardcall.outbox (
    id           bigserial PRIMARY KEY,
    source       text        NOT NULL,              -- source name from the config, or 'emit'
    event        text        NOT NULL,
    payload      jsonb       NOT NULL,
    dedup_key    text,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    processed_at timestamptz,
    processed_by text
);
CREATE UNIQUE INDEX outbox_dedup_key ON wardcall.outbox (dedup_key) WHERE dedup_key IS NOT NULL;
CREATE INDEX outbox_unprocessed ON wardcall.outbox (id) WHERE processed_at IS NULL;

CREATE TABLE wardcall.runs (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    workflow       text        NOT NULL,
    event_id       bigint,
    event          text        NOT NULL,
    input          jsonb       NOT NULL,
    state          jsonb       NOT NULL DEFAULT '{}',
    step           text        NOT NULL,
    status         text        NOT NULL CHECK (status IN
                   ('pending','running','sleeping','waiting','completed','failed','cancelled')),
    -- When the run is next claimable: the start time (pending), the wake time
    -- (sleeping), the wait deadline (waiting), the retry time (pending after a
    -- failure) or the lease expiry (running).
    due_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    wait_signal    text,
    wait_deadline  timestamptz,
    wait_outcome   jsonb,
    step_attempt   integer     NOT NULL DEFAULT 0,
    lease_owner    text,
    fencing_token  bigint      NOT NULL DEFAULT 0,
    last_error     text,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at    timestamptz,
    UNIQUE (workflow, event_id)
);
CREATE INDEX runs_due ON wardcall.runs (due_at)
    WHERE status IN ('pending','running','sleeping','waiting');
CREATE INDEX runs_status ON wardcall.runs (status);

CREATE TABLE wardcall.signals (
    id          bigserial   PRIMARY KEY,
    run_id      uuid        NOT NULL REFERENCES wardcall.runs (id),
    name        text        NOT NULL,
    payload     jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    consumed_at timestamptz
);
CREATE INDEX signals_unconsumed ON wardcall.signals (run_id, name, id) WHERE consumed_at IS NULL;

CREATE TABLE wardcall.audit_log (
    id         bigserial   PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    entity     text        NOT NULL CHECK (entity IN ('run','alert','notification_attempt','source')),
    entity_id  text        NOT NULL,
    action     text        NOT NULL,
    from_state text,
    to_state   text,
    actor      text        NOT NULL,
    detail     jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_entity ON wardcall.audit_log (entity, entity_id, id);

CREATE FUNCTION wardcall.refuse_audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'wardcall.audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON wardcall.audit_log
    FOR EACH ROW EXECUTE FUNCTION wardcall.refuse_audit_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON wardcall.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION wardcall.refuse_audit_change();

-- Sources whose capture triggers wardcall installed (so that a source removed
-- from the config has its trigger removed).
CREATE TABLE wardcall.sources (
    name         text PRIMARY KEY,
    table_name   text NOT NULL,
    triggers     text[] NOT NULL,
    function     text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Emit an event from any application inside its own transaction.
-- A repeated dedup_key is ignored (returns NULL) so it never starts a second run.
CREATE FUNCTION wardcall.emit(event_name text, payload jsonb, dedup_key text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO wardcall.outbox (source, event, payload, dedup_key)
    VALUES ('emit', event_name, coalesce(payload, '{}'::jsonb), dedup_key)
    ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
    RETURNING id INTO new_id;
    IF new_id IS NOT NULL THEN
        PERFORM pg_notify('wardcall_outbox', '');
    END IF;
    RETURN new_id;
END $$;

-- Deliver a named signal to a run (kept if the run is not waiting yet).
CREATE FUNCTION wardcall.send_signal(target_run uuid, signal_name text, payload jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    PERFORM 1 FROM wardcall.runs WHERE id = target_run FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'wardcall: no run %', target_run USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO wardcall.signals (run_id, name, payload)
    VALUES (target_run, signal_name, coalesce(payload, '{}'::jsonb))
    RETURNING id INTO new_id;
    UPDATE wardcall.runs SET due_at = clock_timestamp()
     WHERE id = target_run AND status = 'waiting' AND wait_signal = signal_name;
    IF FOUND THEN
        PERFORM pg_notify('wardcall_wake', '');
    END IF;
    RETURN new_id;
END $$;
