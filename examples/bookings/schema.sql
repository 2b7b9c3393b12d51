-- The bookings scenario (SCENARIOS.md §2): the sales platform's own table,
-- exactly as the team has it. wardcall only adds a capture trigger to it.
CREATE TABLE IF NOT EXISTS lead_bookings (
  id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id        uuid NOT NULL,
  lead_id          uuid,
  assigned_user_id uuid,
  booking_type     text NOT NULL,
  scheduled_at     timestamptz NOT NULL,
  task_status      text NOT NULL DEFAULT 'pending',  -- pending → scheduled → done | failed | cancelled
  task_name        text,                             -- set when scheduled
  created_at       timestamptz NOT NULL DEFAULT now(),
  updated_at       timestamptz NOT NULL DEFAULT now()
);
