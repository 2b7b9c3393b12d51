-- Twilio SMS, the second channel (issue 8): message statuses on notification
-- attempts, one-way messages of a workflow step (no alert), and the channel
-- that acknowledged an alert.

-- Which channel acknowledged the alert ('voice' keypress, 'sms' reply).
ALTER TABLE wardcall.alerts ADD COLUMN acknowledged_via text;

ALTER TABLE wardcall.notification_attempts
    -- A one-way message of a `notify` step belongs to a run, not an alert.
    ALTER COLUMN alert_id DROP NOT NULL,
    -- The workflow step that sent a one-way message ('' for escalation attempts).
    ADD COLUMN step_key text NOT NULL DEFAULT '',
    -- When an inbound reply (SMS) acknowledged or answered this attempt.
    ADD COLUMN replied_at timestamptz;

-- Call statuses, and Twilio's message statuses
-- (https://www.twilio.com/docs/messaging/api/message-resource#message-status-values).
ALTER TABLE wardcall.notification_attempts DROP CONSTRAINT notification_attempts_status_check;
ALTER TABLE wardcall.notification_attempts ADD CONSTRAINT notification_attempts_status_check CHECK (status IN (
    'intent','requested','unknown',
    'initiated','ringing','in-progress','completed','busy','no-answer','failed','canceled',
    'accepted','scheduled','queued','sending','sent','delivered','undelivered','read'));

-- A person reached on two channels at one escalation position (a call, then
-- its SMS fallback), or by several one-way steps of one run: the channel and
-- the step are part of an attempt's identity.
DO $$
DECLARE c text;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint
              WHERE conrelid = 'wardcall.notification_attempts'::regclass AND contype = 'u' LOOP
        EXECUTE format('ALTER TABLE wardcall.notification_attempts DROP CONSTRAINT %I', c);
    END LOOP;
END $$;
CREATE UNIQUE INDEX notification_attempts_identity
    ON wardcall.notification_attempts (run_id, step_key, cycle, step_index, person_id, channel, generation);

-- Inbound replies are looked up by the sender's number.
CREATE INDEX notification_attempts_destination ON wardcall.notification_attempts (destination, created_at);

-- The details given to write-back statements as $2: `acknowledged_via` names
-- the channel that acknowledged ('voice', 'sms'); one-way messages have no alert.
CREATE OR REPLACE FUNCTION wardcall.attempt_details(attempt uuid) RETURNS jsonb LANGUAGE sql STABLE AS $$
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
$$;

CREATE OR REPLACE FUNCTION wardcall.alert_details(alert uuid) RETURNS jsonb LANGUAGE sql STABLE AS $$
SELECT jsonb_strip_nulls(jsonb_build_object(
         'alert_id',         a.id,
         'run_id',           a.run_id,
         'message',          a.message,
         'alert_status',     a.status,
         'acknowledged_at',  wardcall.iso_utc(a.acknowledged_at),
         'acknowledged_by',  a.acknowledged_by,
         'acknowledged_via', a.acknowledged_via,
         'attempts',         (SELECT count(*) FROM wardcall.notification_attempts n WHERE n.alert_id = a.id)))
  FROM wardcall.alerts a WHERE a.id = alert
$$;

-- One row per text message the provider accepted (a MessageSid is known), for
-- monitoring delivery: delivery rate = delivered / sent over a period.
CREATE VIEW wardcall.message_log AS
SELECT n.id            AS attempt_id,
       n.alert_id,
       n.run_id,
       nullif(n.step_key, '') AS step_key,
       n.person_id,
       n.destination   AS phone_number,
       n.provider_id   AS message_id,
       n.status        AS message_status,
       n.created_at    AS attempted_at,
       n.ended_at,
       n.acknowledged_at,
       (n.status IN ('delivered','read')) AS delivered,
       n.error
  FROM wardcall.notification_attempts n
 WHERE n.channel = 'sms' AND n.provider_id IS NOT NULL;
