-- Issue 9: a run's state is compressed with lz4 instead of pglz, where the
-- server was built with lz4 (PostgreSQL 15 manual, "ALTER TABLE … SET
-- COMPRESSION" and the setting default_toast_compression, whose allowed
-- values list lz4 only then). Without it the column keeps pglz: nothing
-- else changes.
--
-- Every committed step rewrites its run's whole state (a script's results,
-- an escalation's positions and variables); once it passes about 2 kB it is
-- compressed again at every step. In `wardcall bench steps` pglz_compress
-- took 7 % of all CPU samples, and lz4 gave 1.09–1.12× the steps per second
-- (BENCHMARKS.md, "Issue 9, sixth session"). Only new values are written
-- with lz4; existing ones are read as they are. Setting a column's
-- compression changes the catalog only (no table rewrite), under a brief
-- ACCESS EXCLUSIVE lock on wardcall.runs.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE wardcall.runs ALTER COLUMN state SET COMPRESSION lz4;
    END IF;
END
$$;
