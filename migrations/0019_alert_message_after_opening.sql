-- An alert may be opened before its message is rendered. The dispatch of a
-- critical event whose first tier calls people of the config (no query)
-- opens the run's alert and records that tier's intents in the statement
-- that creates the run, while the message's lookups run beside it; the step
-- writes the rendered message once the calls' requests are answered, and an engine
-- taking the run over renders it and writes it before its own calls
-- (ARCHITECTURE.md, "First tiers in batches", the direct dispatch).
-- `message` is NULL in that interval (normally under a millisecond, before
-- anyone can answer; after a crash, until the run is taken over), and for
-- good when the run was cancelled before its first step ran.

ALTER TABLE wardcall.alerts ALTER COLUMN message DROP NOT NULL;

COMMENT ON COLUMN wardcall.alerts.message IS
    'The rendered message read aloud and texted (patient data). NULL from the alert''s opening by its dispatch until its first step (or a takeover) writes it.';
