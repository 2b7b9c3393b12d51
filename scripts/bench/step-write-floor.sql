-- What PostgreSQL alone can do of a step's writes, without the engine:
-- the floor under `wardcall bench steps` (BENCHMARKS.md, "Issue 9, seventh
-- session"). pgbench runs one of the functions below per transaction, each
-- writing the transitions of 27 runs (the engine's mean group commit in
-- `bench steps`) in one statement, from 4 clients on their own runs.
--
-- `step_transitions(client, runs, big_state, variant)` runs a copy of the
-- group-commit statement (`store::runs::group_commit_statement(false)` as of
-- main at cb6bf8e; keep it in step if that statement changes) for `runs`
-- of the client's runs, every one a `continue` transition (`op:1` → `op:2`).
-- Each state goes as text and is parsed by the server, as sqlx's jsonb
-- parameters are. `big_state`: 50 step results (4 KB, as at the end of a
-- bench run) or one. `variant`:
--   0  the statement as the engine sends it;
--   1  without the audit rows;
--   2  without the `locked` CTE (the UPDATE takes its own row locks);
--   3  as 2, and the state not written;
--   4  without the audit rows and without the `locked` CTE;
--   9  the harness alone (arrays built, no statement): subtract its time.
-- `step_log_rows(client, runs)` appends one narrow row per run to a table of
-- its own keyed (run, seq): what a step would write if a step's result were
-- appended to a log instead of rewriting its run's row and auditing it.
--
-- Usage (a scratch database; never a production one: it TRUNCATEs wardcall.runs):
--   DATABASE_URL=postgres://…/scratch wardcall migrate
--   psql "$DATABASE_URL" -f scripts/bench/step-write-floor.sql
--   echo 'SELECT step_transitions(:client_id, 27, false, 0);' > v0.sql
--   pgbench -n -c 4 -j 2 -T 6 -f v0.sql "$DATABASE_URL"      # tps × 27 = transitions/s
--   echo 'SELECT step_log_rows(:client_id, 27);' > log.sql
--   pgbench -n -c 4 -j 2 -T 6 -f log.sql "$DATABASE_URL"

TRUNCATE wardcall.runs CASCADE;
CREATE TABLE IF NOT EXISTS floor_runs (i int PRIMARY KEY, id uuid NOT NULL);
TRUNCATE floor_runs;
INSERT INTO wardcall.runs (workflow, event, input, state, step, status, lease_owner)
SELECT 'bench', 'bench.script',
       jsonb_build_object('steps', (SELECT jsonb_agg(jsonb_build_object('op', 'step', 'name', 's' || k)) FROM generate_series(0, 49) k)),
       (SELECT jsonb_build_object('results', jsonb_object_agg(k::text, jsonb_build_object('name', 's' || k, 'ran_at', '2026-11-26T15:41:48.898173Z', 'attempt', 1)))
          FROM generate_series(0, 49) k),
       'op:1', 'running', 'floor'
  FROM generate_series(1, 400);
INSERT INTO floor_runs SELECT row_number() OVER (), id FROM wardcall.runs;

CREATE OR REPLACE FUNCTION step_transitions(client int, runs int, big_state bool, variant int) RETURNS void LANGUAGE plpgsql AS $f$
DECLARE
    ids uuid[];
    tokens bigint[];
    states text[];
    k int;
    lock_join text := CASE WHEN variant IN (2, 3, 4) THEN 'FROM input i' ELSE 'FROM input i JOIN locked l ON l.id = i.id' END;
    state_set text := CASE WHEN variant = 3 THEN '' ELSE 'state = i.state::jsonb,' END;
    audit text := CASE WHEN variant IN (1, 4) THEN 'SELECT 1 FROM input i JOIN updated u ON u.id = i.id'
                       ELSE 'INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
                             SELECT ''run'', i.id::text, i.action, i.held, i.to_status, i.actor, i.detail FROM input i JOIN updated u ON u.id = i.id' END;
BEGIN
    SELECT array_agg(r.id ORDER BY r.id), array_agg(r.fencing_token ORDER BY r.id) INTO ids, tokens
      FROM (SELECT f.id FROM floor_runs f WHERE f.i % 4 = client ORDER BY random() LIMIT runs) s JOIN wardcall.runs r ON r.id = s.id;
    k := array_length(ids, 1);
    SELECT array_agg(CASE WHEN big_state
                          THEN (SELECT jsonb_build_object('results', jsonb_object_agg(j::text, jsonb_build_object('name', 's' || j, 'ran_at', clock_timestamp()::text, 'attempt', 1)))
                                  FROM generate_series(0, 49) j)
                          ELSE jsonb_build_object('results', jsonb_build_object('0', jsonb_build_object('name', 's0', 'ran_at', clock_timestamp()::text, 'attempt', 1)))
                     END::text)
      INTO states FROM generate_series(1, k);
    IF variant = 9 THEN
        RETURN;
    END IF;
    EXECUTE format($q$
        WITH input AS MATERIALIZED (
                 SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[],
                                      $8::text[], $9::text[], $10::text[], $11::text[], $12::jsonb[], $13::text[], $14::text[])
                     AS t(id, token, state, next_step, kind, due_epoch_ms, delay_ms, signal, error, action, to_status, detail, actor, held)),
             locked AS (
                 SELECT r.id FROM wardcall.runs r JOIN input i ON i.id = r.id
                  WHERE r.id = ANY($1::uuid[]) AND r.fencing_token = i.token AND r.status = i.held
                  ORDER BY r.id FOR UPDATE OF r),
             updated AS (
                 UPDATE wardcall.runs r SET
                        %s
                        fencing_token = CASE WHEN i.held = 'running' THEN r.fencing_token ELSE r.fencing_token + 1 END,
                        step = CASE WHEN i.kind = 'defer' THEN r.step ELSE i.next_step END,
                        step_attempt = CASE WHEN i.kind IN ('continue','sleep','wait','complete') THEN 0
                                            WHEN i.kind = 'fail' THEN r.step_attempt + 1 ELSE r.step_attempt END,
                        wait_outcome = CASE WHEN i.kind IN ('fail','defer') THEN r.wait_outcome END,
                        last_error = CASE WHEN i.kind IN ('continue','sleep','wait','complete') THEN NULL
                                          WHEN i.kind = 'fail' THEN i.error ELSE r.last_error END,
                        status = i.to_status,
                        lease_owner = CASE WHEN i.kind = 'continue' THEN r.lease_owner END,
                        key = CASE WHEN i.kind = 'cancelled' THEN NULL ELSE r.key END,
                        wait_signal = CASE WHEN i.kind = 'wait' THEN i.signal ELSE r.wait_signal END,
                        wait_deadline = CASE WHEN i.kind = 'wait' THEN clock_timestamp() + i.delay_ms * interval '1 millisecond'
                                             ELSE r.wait_deadline END,
                        due_at = CASE WHEN i.kind = 'sleep' AND i.due_epoch_ms IS NOT NULL THEN to_timestamp(i.due_epoch_ms / 1000.0)
                                      WHEN i.kind IN ('sleep','wait','defer') THEN clock_timestamp() + i.delay_ms * interval '1 millisecond'
                                      ELSE r.due_at END,
                        finished_at = CASE WHEN i.kind IN ('complete','fail','cancelled') THEN clock_timestamp() ELSE r.finished_at END,
                        updated_at = clock_timestamp()
                   %s
                  WHERE r.id = i.id AND r.fencing_token = i.token AND r.status = i.held
                 RETURNING r.id),
             audited AS (%s)
        SELECT count(*) FROM updated $q$, state_set, lock_join, audit)
    USING ids, tokens, states, array_fill('op:2'::text, ARRAY[k]), array_fill('continue'::text, ARRAY[k]),
          array_fill(NULL::bigint, ARRAY[k]), array_fill(0::bigint, ARRAY[k]), array_fill(NULL::text, ARRAY[k]), array_fill(NULL::text, ARRAY[k]),
          array_fill('run.step_completed'::text, ARRAY[k]), array_fill('running'::text, ARRAY[k]),
          array_fill('{"step":"op:1","next":"op:2"}'::jsonb, ARRAY[k]), array_fill('engine:floor'::text, ARRAY[k]), array_fill('running'::text, ARRAY[k]);
END $f$;

CREATE TABLE IF NOT EXISTS floor_step_log (
    run_id uuid        NOT NULL,
    seq    bigint      NOT NULL,
    at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    step   text        NOT NULL,
    actor  text        NOT NULL,
    result jsonb       NOT NULL,
    PRIMARY KEY (run_id, seq)
);
TRUNCATE floor_step_log;
CREATE SEQUENCE IF NOT EXISTS floor_step_seq;

CREATE OR REPLACE FUNCTION step_log_rows(client int, runs int) RETURNS void LANGUAGE plpgsql AS $f$
DECLARE
    ids uuid[];
BEGIN
    SELECT array_agg(f.id ORDER BY f.id) INTO ids FROM (SELECT id FROM floor_runs WHERE i % 4 = client ORDER BY random() LIMIT runs) f;
    EXECUTE $q$ INSERT INTO floor_step_log (run_id, seq, step, actor, result)
                SELECT id, $2, 'op:1', 'engine:floor', jsonb_build_object('name', 's1', 'ran_at', clock_timestamp()::text, 'attempt', 1)
                  FROM unnest($1::uuid[]) id $q$
    USING ids, nextval('floor_step_seq');
END $f$;
