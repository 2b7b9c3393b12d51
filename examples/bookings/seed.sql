-- The bookings demo inserts its bookings itself (examples/bookings/wardcall.toml
-- and src/demo/bookings.rs); nothing to seed.
SELECT 1;
