-- Demo rows of the hospital scenario (fictional rooms and patients).
INSERT INTO rooms (room_name) VALUES ('Room 1'), ('Room 2'), ('Room 3');
INSERT INTO patients (patient_id, name) VALUES ('P-DHE-001', 'Dana Vale'), ('P-DHE-002', 'Rowan Ellis');
