-- Demo rows of the SLA scenario (fictional nurses, 555 numbers).
INSERT INTO users (id, name, phone) VALUES
  ('e0000000-0000-4000-8000-000000000001', 'Jordan Pike', '+13855550301'),
  ('e0000000-0000-4000-8000-000000000002', 'Sam Ortega',  '+13855550302');
INSERT INTO nurse_shifts (user_id, starts_at, ends_at) VALUES
  ('e0000000-0000-4000-8000-000000000001', now() - interval '1 hour', now() + interval '7 hours'),
  ('e0000000-0000-4000-8000-000000000002', now() - interval '1 hour', now() + interval '7 hours');
