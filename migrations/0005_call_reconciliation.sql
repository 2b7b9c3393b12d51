-- Call reconciliation (ARCHITECTURE.md, "Calls are reconciled with the provider"):
-- hang-ups requested after an alert closed, attempts fetched from the provider
-- when their final callback never came, webhook replays recognised by
-- Twilio's idempotency token, and a call log that counts only accepted calls.

ALTER TABLE wardcall.notification_attempts
    -- When the engine asked the provider to end this call (the alert was
    -- acknowledged elsewhere or cancelled); NULL while it was never asked.
    ADD COLUMN hangup_requested_at timestamptz,
    -- When, without a final status by then, the call is fetched from the
    -- provider: the intent time + ring timeout + a margin, pushed on after each
    -- fetch that finds the call still live.
    ADD COLUMN reconcile_after timestamptz;

CREATE INDEX notification_attempts_live ON wardcall.notification_attempts (reconcile_after)
    WHERE status IN ('intent','requested','initiated','ringing','in-progress');

-- Webhooks already handled, by Twilio's `I-Twilio-Idempotency-Token` header
-- (the same token on every retry and replay of one webhook). A replay gets the
-- response of the first delivery and changes nothing.
CREATE TABLE wardcall.webhook_receipts (
    provider          text        NOT NULL,
    idempotency_token text        NOT NULL,
    attempt_id        uuid,
    response          text        NOT NULL,
    received_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (provider, idempotency_token)
);
CREATE INDEX webhook_receipts_received ON wardcall.webhook_receipts (received_at);

-- The call log counts only calls the provider accepted (a CallSid is known):
-- intents never confirmed, requests refused, and outcomes never known are not
-- calls. A call is answered by a human only by a keypress or a human AMD
-- verdict, never by a voicemail pickup.
CREATE OR REPLACE VIEW wardcall.call_log AS
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
       (coalesce(n.answered_by = 'human', false)
        OR ((coalesce(n.digits, '') <> '' OR n.acknowledged_at IS NOT NULL)
            AND coalesce(n.answered_by, 'human') NOT LIKE 'machine%'
            AND coalesce(n.answered_by, '') <> 'fax')) AS answered,
       (n.acknowledged_at IS NOT NULL) AS acknowledged,
       extract(epoch FROM (n.acknowledged_at - a.created_at)) AS seconds_to_acknowledge,
       n.error
  FROM wardcall.notification_attempts n
  JOIN wardcall.alerts a ON a.id = n.alert_id
  JOIN wardcall.runs r ON r.id = n.run_id
 WHERE n.channel = 'voice' AND n.provider_id IS NOT NULL;
