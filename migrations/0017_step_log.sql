-- The step log: a step that lets its run go on at once (a `continue`
-- transition, committed by a worker that keeps the lease) appends one narrow
-- row here instead of rewriting the run's row. The run's row keeps the state
-- as of its last checkpoint (`runs.step_seq`); the rows of the log after it
-- carry the state's changes, step by step. The truth of a run is its row
-- with the log's rows after `step_seq` folded in (`step_log_fold`).
--
-- Who writes what (ARCHITECTURE.md, "The step log"):
-- * a worker holding the lease appends seq = step_seq + k under the run
--   row's lock (`FOR UPDATE`, as every fenced commit takes it), so an
--   append never races a claim, a cancel or another owner;
-- * every other write of a run's state or step is a checkpoint: it writes
--   the whole state with its seq, or folds the log into the row first
--   (`fold_step_log`): claims of a run left `running`, failures, deferrals,
--   cancels, a tier's saved recipients.
ALTER TABLE wardcall.runs ADD COLUMN step_seq bigint NOT NULL DEFAULT 0;

CREATE TABLE wardcall.run_steps (
    run_id        uuid        NOT NULL,
    -- 1, 2, … per run: the transition's number (`runs.step_seq` + k).
    seq           bigint      NOT NULL,
    -- The step that ran, and the step the run went on with.
    step          text        NOT NULL,
    next_step     text        NOT NULL,
    -- The state's changes made by the step: a JSON array of operations,
    -- applied in order: {"set": [key, …], "value": v} (the object member at
    -- that path, created or replaced; [] replaces the whole state) or
    -- {"remove": [key, …]}. Written by `runtime::state_patch::diff`.
    patch         jsonb       NOT NULL,
    fencing_token bigint      NOT NULL,
    at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, seq)
);

-- Whether every prefix of `path` but the whole leads through objects of
-- `state` (the parent of the member `path` names is an object).
CREATE FUNCTION wardcall.state_parent_is_object(state jsonb, path text[]) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    node jsonb := state;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(path), 0) - 1 LOOP
        IF node IS NULL OR jsonb_typeof(node) <> 'object' THEN
            RETURN false;
        END IF;
        node := node -> path[i];
    END LOOP;
    RETURN node IS NOT NULL AND jsonb_typeof(node) = 'object';
END $$;

-- `state` with the operations of one patch (above) applied in order. Total:
-- an operation that is malformed (a path that is not an array of strings, a
-- `set` without a value), or whose path does not lead through
-- objects, is skipped (as `runtime::state_patch::apply` skips it), so a
-- fold never fails a claim and never gives NULL.
CREATE FUNCTION wardcall.apply_state_patch(state jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    op jsonb;
    path text[];
BEGIN
    IF jsonb_typeof(patch) IS DISTINCT FROM 'array' THEN
        RETURN state;
    END IF;
    FOR op IN SELECT value FROM jsonb_array_elements(patch) LOOP
        -- A path is an array of keys (strings); anything else is skipped.
        IF EXISTS (SELECT 1 FROM jsonb_array_elements(
                            coalesce(CASE WHEN jsonb_typeof(op->'set') = 'array' THEN op->'set' END, '[]')
                         || coalesce(CASE WHEN jsonb_typeof(op->'remove') = 'array' THEN op->'remove' END, '[]')) e
                    WHERE jsonb_typeof(e) <> 'string') THEN
            CONTINUE;
        END IF;
        IF jsonb_typeof(op->'set') = 'array' AND op ? 'value' THEN
            path := ARRAY(SELECT jsonb_array_elements_text(op->'set'));
            IF cardinality(path) = 0 THEN
                state := op->'value';
            ELSIF wardcall.state_parent_is_object(state, path) THEN
                state := jsonb_set(state, path, op->'value', true);
            END IF;
        ELSIF jsonb_typeof(op->'remove') = 'array' THEN
            path := ARRAY(SELECT jsonb_array_elements_text(op->'remove'));
            IF cardinality(path) > 0 AND wardcall.state_parent_is_object(state, path) THEN
                state := state #- path;
            END IF;
        END IF;
    END LOOP;
    RETURN state;
END $$;

-- The run's state, step and seq with its log's rows after `runs.step_seq`
-- folded in; no row when the log has none. Reads the newest committed
-- versions (a volatile function takes a new snapshot per query): call it
-- holding the run's row lock, so that no append is in flight.
CREATE FUNCTION wardcall.step_log_fold(run uuid) RETURNS TABLE (state jsonb, step text, seq bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    s jsonb;
    after bigint;
    last_step text;
    last_seq bigint;
    l record;
BEGIN
    SELECT r.state, r.step_seq INTO s, after FROM wardcall.runs r WHERE r.id = run;
    FOR l IN SELECT x.seq, x.next_step, x.patch FROM wardcall.run_steps x WHERE x.run_id = run AND x.seq > after ORDER BY x.seq LOOP
        s := wardcall.apply_state_patch(s, l.patch);
        last_step := l.next_step;
        last_seq := l.seq;
    END LOOP;
    IF last_seq IS NOT NULL THEN
        RETURN QUERY SELECT s, last_step, last_seq;
    END IF;
END $$;

-- Writes the fold (above) into the run's row, as the `continue` transitions
-- it replays would have: state, step and seq, `step_attempt` 0, no wait
-- outcome, no last error. Returns the run's step after the fold, or NULL
-- when there was nothing to fold. Call it holding the run's row lock.
CREATE FUNCTION wardcall.fold_step_log(run uuid) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    f record;
BEGIN
    SELECT * INTO f FROM wardcall.step_log_fold(run);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    UPDATE wardcall.runs SET state = f.state, step = f.step, step_seq = f.seq, step_attempt = 0,
                             wait_outcome = NULL, last_error = NULL, updated_at = clock_timestamp()
     WHERE id = run;
    RETURN f.step;
END $$;
