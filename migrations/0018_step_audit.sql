-- A logged step is its own audit record. A worker's `continue` appended two
-- rows per step, one to the step log (`run_steps`, migration 0017) and one
-- `run.step_completed` row to the audit log, both in the same statement and
-- under the same row lock; the second repeated the first (the run, the two
-- steps, the time) and cost a tenth of `bench steps` (BENCHMARKS.md, "Issue 9,
-- fifteenth session"). Now the step log's row carries what the audit record
-- had besides (its number in the audit trail, the actor), and
-- `wardcall.audit_log` is a view of the whole trail: the audit records of
-- every other change (`wardcall.audit_records`, the former table) and one
-- `run.step_completed` row per logged step, ordered together by `id`.
--
-- Both tables are append-only (triggers refuse UPDATE, DELETE, TRUNCATE).

ALTER TABLE wardcall.audit_log RENAME TO audit_records;
ALTER SEQUENCE wardcall.audit_log_id_seq RENAME TO audit_id_seq;
ALTER INDEX wardcall.audit_log_pkey RENAME TO audit_records_pkey;
ALTER INDEX wardcall.audit_log_entity RENAME TO audit_records_entity;
ALTER TABLE wardcall.audit_records RENAME CONSTRAINT audit_log_entity_check TO audit_records_entity_check;
ALTER TRIGGER audit_log_append_only ON wardcall.audit_records RENAME TO audit_records_append_only;
ALTER TRIGGER audit_log_no_truncate ON wardcall.audit_records RENAME TO audit_records_no_truncate;

-- Steps logged before this migration have their audit rows in
-- `audit_records` already: their `audit_id` stays NULL and the view leaves
-- them out. Every step logged from now on takes the next id of the trail
-- and names its actor: the CHECK (NOT VALID: enforced on every new row,
-- the older rows left as they are) keeps a step from leaving the trail.
ALTER TABLE wardcall.run_steps ADD COLUMN audit_id bigint, ADD COLUMN actor text;
ALTER TABLE wardcall.run_steps ALTER COLUMN audit_id SET DEFAULT nextval('wardcall.audit_id_seq');
ALTER TABLE wardcall.run_steps ADD CONSTRAINT run_steps_audited CHECK (audit_id IS NOT NULL AND actor IS NOT NULL) NOT VALID;

-- The same columns and values as the audit rows these steps had before.
CREATE VIEW wardcall.audit_log AS
    SELECT id, at, entity, entity_id, action, from_state, to_state, actor, detail
      FROM wardcall.audit_records
    UNION ALL
    SELECT audit_id, at, 'run', run_id::text, 'run.step_completed', 'running', 'running', actor,
           jsonb_build_object('from_step', step, 'to_step', next_step)
      FROM wardcall.run_steps
     WHERE audit_id IS NOT NULL;

-- Whoever could read the audit log (the table, until now) can read the view.
DO $$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END
          FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'wardcall.audit_records'::regclass AND a.privilege_type = 'SELECT' AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT SELECT ON wardcall.audit_log TO %s', grantee);
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION wardcall.refuse_audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'wardcall.% is append-only (part of the audit trail): % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER run_steps_append_only BEFORE UPDATE OR DELETE ON wardcall.run_steps
    FOR EACH ROW EXECUTE FUNCTION wardcall.refuse_audit_change();
CREATE TRIGGER run_steps_no_truncate BEFORE TRUNCATE ON wardcall.run_steps
    FOR EACH STATEMENT EXECUTE FUNCTION wardcall.refuse_audit_change();
