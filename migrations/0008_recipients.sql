-- Recipients from the team's own tables (issue 8, item 2).
--
-- The recipient's display name is kept on the attempt row (personal data, like
-- `destination`): write-backs get it as `person_name`; it is never written to
-- the audit log or to logs.
ALTER TABLE wardcall.notification_attempts ADD COLUMN person_name text;

-- An open alert whose policy yielded nobody to call at all (every tier of a
-- cycle empty): set when the engine raises the alarm, cleared when someone is
-- called again. `wardcall status` lists such alerts as a problem.
ALTER TABLE wardcall.alerts ADD COLUMN nobody_since timestamptz;
CREATE INDEX alerts_nobody ON wardcall.alerts (nobody_since) WHERE nobody_since IS NOT NULL AND status = 'open';

-- The recipient of an attempt, merged into `wardcall.attempt_details` by the
-- write-back hooks: `{"person_id": …, "person_name": …}` (keys absent when NULL).
CREATE FUNCTION wardcall.attempt_recipient(attempt uuid) RETURNS jsonb LANGUAGE sql STABLE AS $$
SELECT coalesce((SELECT jsonb_strip_nulls(jsonb_build_object('person_id', n.person_id, 'person_name', n.person_name))
                   FROM wardcall.notification_attempts n WHERE n.id = attempt), '{}'::jsonb)
$$;
