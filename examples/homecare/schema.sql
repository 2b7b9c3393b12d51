-- The home-care team's own schema (SCENARIOS.md §4). The types and the tables
-- `coordinators` and `care_alerts` are exactly the team's; `users`, `zones`
-- and `clients` are the tables such a team keeps besides (names of staff,
-- service zones, the clients and the zone each lives in). Demo rows: seed.sql.

CREATE TYPE care_alert_type   AS ENUM ('medical_concern','medication_issue','behavioral_change',
  'safety_concern','family_request','equipment_issue','other');
CREATE TYPE care_alert_status AS ENUM ('initiated','ringing','answered','no_answer',
  'escalated','resolved','cancelled');
CREATE TABLE coordinators (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id uuid UNIQUE NOT NULL,
  zone_id uuid NOT NULL,
  phone_number text NOT NULL,
  backup_coordinator_id uuid REFERENCES coordinators,
  is_active boolean NOT NULL DEFAULT true
);
CREATE TABLE care_alerts (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  client_id uuid NOT NULL, staff_id uuid NOT NULL, coordinator_id uuid REFERENCES coordinators,
  alert_type care_alert_type NOT NULL, voice_message_url text,
  status care_alert_status NOT NULL DEFAULT 'initiated',
  initiated_at timestamptz NOT NULL DEFAULT now(), answered_at timestamptz,
  escalated_at timestamptz, resolved_at timestamptz, outcome text
);

-- The team's other tables.
CREATE TABLE users (
  id        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  full_name text NOT NULL
);
CREATE TABLE zones (
  id   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name text NOT NULL UNIQUE
);
CREATE TABLE clients (
  id        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  full_name text NOT NULL,
  zone_id   uuid NOT NULL REFERENCES zones
);
