-- An alert may be opened before its message is rendered. The dispatch of a
-- critical event whose first tier calls people of the config (no query)
-- opens the run's alert and records that tier's intents in the statement
-- that creates the run, while the message's lookups run beside it; the step
-- writes the rendered message right after the calls are placed, and an
-- engine taking the run over renders it and writes it before its own calls
-- (BENCHMARKS.md, "Issue 9, nineteenth session"). `message` is NULL only in
-- that interval: about a millisecond, before anyone can answer.

ALTER TABLE wardcall.alerts ALTER COLUMN message DROP NOT NULL;

COMMENT ON COLUMN wardcall.alerts.message IS
    'The rendered message read aloud and texted (patient data). NULL from the alert''s opening by its dispatch until its first step writes it, about a millisecond.';
