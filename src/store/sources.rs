//! SQL of `wardcall.sources`: the capture triggers wardcall installed on the
//! team's tables (one row per configured source), so that a changed or
//! removed source is cleaned up. The triggers themselves (DDL on the team's
//! tables) are `crate::capture`'s.

use sqlx::PgConnection;

/// An installed source: name, qualified table, trigger names, function.
pub type InstalledSource = (String, String, Vec<String>, String);

/// Every installed source.
pub async fn all(conn: &mut PgConnection) -> Result<Vec<InstalledSource>, sqlx::Error> {
    sqlx::query_as("SELECT name, table_name, triggers, function FROM wardcall.sources").fetch_all(conn).await
}

/// The table and triggers of source `name`, if installed.
pub async fn table_and_triggers(conn: &mut PgConnection, name: &str) -> Result<Option<(String, Vec<String>)>, sqlx::Error> {
    sqlx::query_as("SELECT table_name, triggers FROM wardcall.sources WHERE name = $1").bind(name).fetch_optional(conn).await
}

/// Records (or updates) an installed source. Returns true when the row is new.
pub async fn upsert(conn: &mut PgConnection, name: &str, table: &str, triggers: &[String], function: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO wardcall.sources (name, table_name, triggers, function) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET table_name = EXCLUDED.table_name, triggers = EXCLUDED.triggers,
                function = EXCLUDED.function, installed_at = clock_timestamp()
         RETURNING xmax = 0",
    )
    .bind(name)
    .bind(table)
    .bind(triggers)
    .bind(function)
    .fetch_one(conn)
    .await
}

/// Forgets source `name` (its triggers were dropped).
pub async fn remove(conn: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM wardcall.sources WHERE name = $1").bind(name).execute(conn).await?;
    Ok(())
}
