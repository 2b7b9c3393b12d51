-- The care-transition platform (SCENARIOS.md §3), the tables the SLA monitor
-- touches, in the team's own shape (snake_case names of EscalationTask,
-- NotificationLog, NurseShift and User). sla_minutes is numeric so that the
-- demo and the tests can use an SLA of a few seconds.
CREATE TABLE IF NOT EXISTS users (
  id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name             text NOT NULL,
  phone            text,
  email            text,
  last_assigned_at timestamptz
);
CREATE TABLE IF NOT EXISTS nurse_shifts (
  id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id           uuid NOT NULL REFERENCES users,
  starts_at         timestamptz NOT NULL,
  ends_at           timestamptz NOT NULL,
  active_task_count integer NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS escalation_tasks (
  id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  episode_id   uuid,
  patient_id   text NOT NULL,
  priority     text NOT NULL DEFAULT 'NORMAL',      -- LOW, NORMAL, HIGH, URGENT
  severity     text NOT NULL DEFAULT 'MODERATE',    -- LOW, MODERATE, HIGH, CRITICAL
  reason_codes text[] NOT NULL DEFAULT '{}',
  action_type  text NOT NULL,
  sla_minutes  numeric,
  status       text NOT NULL DEFAULT 'OPEN',        -- OPEN, IN_PROGRESS, RESOLVED
  assigned_to  uuid REFERENCES users,
  created_at   timestamptz NOT NULL DEFAULT now(),
  resolved_at  timestamptz
);
CREATE TABLE IF NOT EXISTS notification_log (
  id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id             uuid REFERENCES users,
  task_id             uuid REFERENCES escalation_tasks,
  type                text NOT NULL,                -- e.g. SLA_WARNING, SLA_BREACH
  channel             text NOT NULL,                -- SMS, EMAIL, PUSH, VOICE
  status              text NOT NULL,                -- PENDING, SENT, DELIVERED, READ, FAILED, CANCELLED
  provider_message_id text,
  error               text,
  created_at          timestamptz NOT NULL DEFAULT now(),
  sent_at             timestamptz,
  delivered_at        timestamptz,
  read_at             timestamptz
);
