-- Alerts, notification attempts (the notification log) and the call log view.

CREATE TABLE wardcall.alerts (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    run_id          uuid        NOT NULL UNIQUE REFERENCES wardcall.runs (id),
    workflow        text        NOT NULL,
    policy          text        NOT NULL,
    message         text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('open','acknowledged','unacknowledged','cancelled')),
    acknowledged_at timestamptz,
    acknowledged_by text,        -- person id from the config
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE wardcall.notification_attempts (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    alert_id        uuid        NOT NULL REFERENCES wardcall.alerts (id),
    run_id          uuid        NOT NULL REFERENCES wardcall.runs (id),
    cycle           integer     NOT NULL,   -- repetition of the policy, from 0
    step_index      integer     NOT NULL,   -- step of the policy, from 0
    person_id       text        NOT NULL,
    generation      integer     NOT NULL DEFAULT 0, -- >0: re-placed after an unknown outcome
    channel         text        NOT NULL CHECK (channel IN ('voice','sms','email','webhook')),
    destination     text        NOT NULL,
    provider        text        NOT NULL,
    provider_id     text,
    status          text        NOT NULL CHECK (status IN ('intent','requested','initiated','ringing',
                    'in-progress','completed','busy','no-answer','failed','canceled','unknown')),
    answered_by     text,        -- 'human', 'machine_start', ... from answering-machine detection
    digits          text,        -- keys pressed, in order
    error           text,
    fencing_token   bigint      NOT NULL,   -- the run's token when the intent was recorded
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    requested_at    timestamptz,
    initiated_at    timestamptz,
    ringing_at      timestamptz,
    answered_at     timestamptz,
    acknowledged_at timestamptz,
    declined_at     timestamptz,
    ended_at        timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (run_id, cycle, step_index, person_id, generation)
);
CREATE UNIQUE INDEX notification_attempts_provider_id
    ON wardcall.notification_attempts (provider, provider_id) WHERE provider_id IS NOT NULL;
CREATE INDEX notification_attempts_alert ON wardcall.notification_attempts (alert_id);
CREATE INDEX notification_attempts_created ON wardcall.notification_attempts (created_at);

-- One row per voice call attempt, with the alert's source row, for monitoring:
--   calls per hour for critical alerts in the last 24 h:
--     SELECT date_trunc('hour', attempted_at) AS hour, count(*) FROM wardcall.call_log
--      WHERE source_row->>'severity' = 'critical' AND attempted_at > now() - interval '24 hours'
--      GROUP BY 1 ORDER BY 1;
--   answer rate over 7 days:
--     SELECT avg(answered::int) FROM wardcall.call_log WHERE attempted_at > now() - interval '7 days';
CREATE VIEW wardcall.call_log AS
SELECT n.id              AS attempt_id,
       n.alert_id,
       n.run_id,
       a.workflow,
       a.policy,
       r.input           AS source_row,
       n.cycle,
       n.step_index,
       n.person_id,
       n.destination     AS phone_number,
       n.provider_id     AS call_id,
       n.status          AS call_status,
       n.answered_by,
       n.digits,
       n.created_at      AS attempted_at,
       n.answered_at,
       n.acknowledged_at,
       n.ended_at,
       (n.answered_at IS NOT NULL AND coalesce(n.answered_by, 'human') = 'human') AS answered,
       (n.acknowledged_at IS NOT NULL) AS acknowledged,
       extract(epoch FROM (n.acknowledged_at - a.created_at)) AS seconds_to_acknowledge,
       n.error
  FROM wardcall.notification_attempts n
  JOIN wardcall.alerts a ON a.id = n.alert_id
  JOIN wardcall.runs r ON r.id = n.run_id
 WHERE n.channel = 'voice' AND n.status <> 'intent';

-- ISO-8601 UTC with milliseconds, as the write-back JSON carries timestamps.
CREATE FUNCTION wardcall.iso_utc(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- The details of a notification attempt given to write-back statements as $2.
CREATE FUNCTION wardcall.attempt_details(attempt uuid) RETURNS jsonb LANGUAGE sql STABLE AS $$
SELECT jsonb_strip_nulls(jsonb_build_object(
         'attempt_id',      n.id,
         'alert_id',        n.alert_id,
         'run_id',          n.run_id,
         'person_id',       n.person_id,
         'phone_number',    n.destination,
         'channel',         n.channel,
         'call_id',         n.provider_id,
         'call_status',     CASE WHEN n.acknowledged_at IS NOT NULL THEN 'answered'
                                 WHEN n.status IN ('intent','requested','initiated') THEN 'initiated'
                                 WHEN n.status = 'in-progress' THEN 'answered'
                                 ELSE n.status END,
         'provider_status', n.status,
         'answered_by',     n.answered_by,
         'message',         a.message,
         'cycle',           n.cycle,
         'step_index',      n.step_index,
         'initiated_at',    wardcall.iso_utc(coalesce(n.requested_at, n.created_at)),
         'answered_at',     wardcall.iso_utc(n.answered_at),
         'acknowledged_at', wardcall.iso_utc(a.acknowledged_at),
         'acknowledged_by', a.acknowledged_by,
         'alert_status',    a.status))
  FROM wardcall.notification_attempts n
  JOIN wardcall.alerts a ON a.id = n.alert_id
 WHERE n.id = attempt
$$;

-- The details of an alert without a specific attempt (escalated, unacknowledged).
CREATE FUNCTION wardcall.alert_details(alert uuid) RETURNS jsonb LANGUAGE sql STABLE AS $$
SELECT jsonb_strip_nulls(jsonb_build_object(
         'alert_id',        a.id,
         'run_id',          a.run_id,
         'message',         a.message,
         'alert_status',    a.status,
         'acknowledged_at', wardcall.iso_utc(a.acknowledged_at),
         'acknowledged_by', a.acknowledged_by,
         'attempts',        (SELECT count(*) FROM wardcall.notification_attempts n WHERE n.alert_id = a.id)))
  FROM wardcall.alerts a WHERE a.id = alert
$$;
