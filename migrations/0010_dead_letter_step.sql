-- A dead letter names the step that failed for good, also when the run's
-- on_failure hook ran after it (the run then ends on the hook's last step;
-- the failed step is kept in state.ending.step, and `wardcall retry` resumes
-- there).
CREATE OR REPLACE VIEW wardcall.dead_letters AS
SELECT id           AS run_id,
       workflow,
       event,
       event_id,
       coalesce(state->'ending'->>'step', step) AS step,
       step_attempt AS attempts,
       last_error,
       finished_at  AS failed_at
  FROM wardcall.runs
 WHERE status = 'failed';
