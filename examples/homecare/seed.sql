-- Demo rows of the home-care scenario (fictional people, 555 numbers).
--
-- One coordinator per zone: Casey (North), Devon (South), Emery (West) and
-- Finley (East), who is on leave (is_active = false). Casey is backed up by
-- Devon, Devon by Emery, Emery by Casey (the chain is a cycle, which the
-- recipients query cuts), and Finley by Devon.
INSERT INTO zones (id, name) VALUES
  ('a0000000-0000-4000-8000-000000000001', 'North'),
  ('a0000000-0000-4000-8000-000000000002', 'East'),
  ('a0000000-0000-4000-8000-000000000003', 'South'),
  ('a0000000-0000-4000-8000-000000000004', 'West');
INSERT INTO users (id, full_name) VALUES
  ('b0000000-0000-4000-8000-000000000001', 'Casey Lindqvist'),
  ('b0000000-0000-4000-8000-000000000002', 'Devon Achebe'),
  ('b0000000-0000-4000-8000-000000000003', 'Emery Santos'),
  ('b0000000-0000-4000-8000-000000000004', 'Finley Okafor'),
  ('b0000000-0000-4000-8000-000000000009', 'Gale Moreau');
INSERT INTO coordinators (id, user_id, zone_id, phone_number, is_active) VALUES
  ('c0000000-0000-4000-8000-000000000001', 'b0000000-0000-4000-8000-000000000001', 'a0000000-0000-4000-8000-000000000001', '+13855550201', true),
  ('c0000000-0000-4000-8000-000000000002', 'b0000000-0000-4000-8000-000000000002', 'a0000000-0000-4000-8000-000000000003', '+13855550202', true),
  ('c0000000-0000-4000-8000-000000000003', 'b0000000-0000-4000-8000-000000000003', 'a0000000-0000-4000-8000-000000000004', '+13855550203', true),
  ('c0000000-0000-4000-8000-000000000004', 'b0000000-0000-4000-8000-000000000004', 'a0000000-0000-4000-8000-000000000002', '+13855550204', false);
UPDATE coordinators SET backup_coordinator_id = 'c0000000-0000-4000-8000-000000000002' WHERE id = 'c0000000-0000-4000-8000-000000000001';
UPDATE coordinators SET backup_coordinator_id = 'c0000000-0000-4000-8000-000000000003' WHERE id = 'c0000000-0000-4000-8000-000000000002';
UPDATE coordinators SET backup_coordinator_id = 'c0000000-0000-4000-8000-000000000001' WHERE id = 'c0000000-0000-4000-8000-000000000003';
UPDATE coordinators SET backup_coordinator_id = 'c0000000-0000-4000-8000-000000000002' WHERE id = 'c0000000-0000-4000-8000-000000000004';
INSERT INTO clients (id, full_name, zone_id) VALUES
  ('d0000000-0000-4000-8000-000000000001', 'Harper Nilsen', 'a0000000-0000-4000-8000-000000000001'),
  ('d0000000-0000-4000-8000-000000000002', 'Indra Kovac',   'a0000000-0000-4000-8000-000000000002');

-- Demo instrumentation, not wardcall's: every change of care_alerts.status
-- with its time, so that the demo and the tests can show each stage.
CREATE TABLE care_alert_history (
  seq      bigserial PRIMARY KEY,
  alert_id uuid NOT NULL,
  status   care_alert_status NOT NULL,
  at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION care_alert_history_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
    INSERT INTO care_alert_history (alert_id, status) VALUES (NEW.id, NEW.status);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER care_alert_history AFTER INSERT OR UPDATE OF status ON care_alerts
  FOR EACH ROW EXECUTE FUNCTION care_alert_history_log();
