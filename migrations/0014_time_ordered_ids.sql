-- Issue 9: new runs, alerts and notification attempts get time-ordered ids
-- (UUID version 7, RFC 9562 §5.7: 48 bits of Unix time in milliseconds,
-- then the version, variant and random bits) instead of random ones
-- (gen_random_uuid(), version 4). PostgreSQL 15 has no uuidv7() (it came
-- with 18): wardcall.uuid_v7() builds one from gen_random_uuid()'s random
-- bits and clock_timestamp().
--
-- A random id puts every new row's primary-key entry on a random leaf page.
-- While the table is small those pages are all in memory and each is
-- logged whole once per checkpoint; with 1,000,000 runs sleeping far ahead
-- (SLA timers; `wardcall bench scale`) nearly every new run's entry lands on
-- a page not touched since the last checkpoint, which is then written to
-- the WAL whole (8 kB, full_page_writes): 12.5 kB of WAL per run inserted
-- instead of 1.2 kB (BENCHMARKS.md, "Issue 9, seventh session"). Time-ordered
-- ids go to the right-most leaf pages, as a bigserial's would.
--
-- Existing ids stay as they are. The engine compares ids only for equality
-- and to order row locks, which any total order serves; `wardcall bench
-- bookings` hands out due times in id order, which is now creation order
-- (it was random).
CREATE FUNCTION wardcall.uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                                PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                                FROM 1 FOR 6),
                        52, 1),
                53, 1),
        'hex')::uuid
$$;
ALTER TABLE wardcall.runs ALTER COLUMN id SET DEFAULT wardcall.uuid_v7();
ALTER TABLE wardcall.alerts ALTER COLUMN id SET DEFAULT wardcall.uuid_v7();
ALTER TABLE wardcall.notification_attempts ALTER COLUMN id SET DEFAULT wardcall.uuid_v7();
