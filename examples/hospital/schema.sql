-- The hospital team's own schema (SCENARIOS.md §1). Demo rows: seed.sql.
CREATE TABLE IF NOT EXISTS rooms    (room_id uuid PRIMARY KEY DEFAULT gen_random_uuid(), room_name text NOT NULL);
CREATE TABLE IF NOT EXISTS patients (patient_id text PRIMARY KEY, name text NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (
  id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  patient_id      text REFERENCES patients,
  room_id         uuid REFERENCES rooms,
  severity        text NOT NULL,
  status          text NOT NULL,
  alert_type      text,
  title           text,
  description     text,
  message         text,
  metadata        jsonb NOT NULL DEFAULT '{}',
  triggered_at    timestamptz NOT NULL DEFAULT now(),
  acknowledged_at timestamptz,
  acknowledged_by text
);
