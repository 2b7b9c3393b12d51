-- Issue 9: the functions behind every write-back's `$2` (`attempt_details`,
-- `attempt_recipient`) and `iso_utc`, made cheap to call once per statement.
--
-- A LANGUAGE sql function that cannot be inlined is parsed and planned again
-- on every call; under a burst of alerts that cost 0.9 ms per write-back
-- (`pg_stat_statements`, BENCHMARKS.md "Issue 9"). PL/pgSQL keeps the plans
-- of its queries for the session (PostgreSQL 15 manual §43.11.2 "Plan
-- Caching"): 0.3 ms per call on the same data. Same results, same names,
-- same arguments: write-back statements and team SQL that call them are
-- unchanged.
--
-- `iso_utc` was declared IMMUTABLE, but `to_char` is only STABLE, so the
-- planner could not inline it (§38.7 "Function Volatility Categories") and
-- ran it as a nested SQL function three times per `attempt_details`. It is
-- STABLE now, as its body is, and is inlined.

CREATE OR REPLACE FUNCTION wardcall.iso_utc(t timestamptz) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

CREATE OR REPLACE FUNCTION wardcall.attempt_details(attempt uuid) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
BEGIN
RETURN (
SELECT jsonb_strip_nulls(jsonb_build_object(
         'attempt_id',       n.id,
         'alert_id',         n.alert_id,
         'run_id',           n.run_id,
         'step_key',         nullif(n.step_key, ''),
         'person_id',        n.person_id,
         'phone_number',     n.destination,
         'channel',          n.channel,
         'call_id',          CASE WHEN n.channel = 'voice' THEN n.provider_id END,
         'message_id',       CASE WHEN n.channel = 'sms' THEN n.provider_id END,
         'call_status',      CASE WHEN n.channel <> 'voice' THEN NULL
                                  WHEN n.acknowledged_at IS NOT NULL THEN 'answered'
                                  WHEN n.status IN ('intent','requested','initiated') THEN 'initiated'
                                  WHEN n.status = 'in-progress' THEN 'answered'
                                  ELSE n.status END,
         'message_status',   CASE WHEN n.channel = 'sms' THEN n.status END,
         'provider_status',  n.status,
         'answered_by',      n.answered_by,
         'message',          a.message,
         'cycle',            n.cycle,
         'step_index',       n.step_index,
         'initiated_at',     wardcall.iso_utc(coalesce(n.requested_at, n.created_at)),
         'answered_at',      wardcall.iso_utc(coalesce(n.answered_at, n.replied_at)),
         'acknowledged_at',  wardcall.iso_utc(a.acknowledged_at),
         'acknowledged_by',  a.acknowledged_by,
         'acknowledged_via', a.acknowledged_via,
         'alert_status',     a.status))
  FROM wardcall.notification_attempts n
  LEFT JOIN wardcall.alerts a ON a.id = n.alert_id
 WHERE n.id = attempt
);
END
$$;


CREATE OR REPLACE FUNCTION wardcall.attempt_recipient(attempt uuid) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
BEGIN
RETURN coalesce((SELECT jsonb_strip_nulls(jsonb_build_object('person_id', n.person_id, 'person_name', n.person_name))
                   FROM wardcall.notification_attempts n WHERE n.id = attempt), '{}'::jsonb);
END
$$;
