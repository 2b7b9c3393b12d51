//! The append-only audit trail: one row per state change of a run, an alert,
//! a notification attempt, a source or an HTTP endpoint, with time and actor.
//!
//! Read it as the view `wardcall.audit_log` (ordered by `id`). It is the
//! union of two append-only tables (migration 0018): `wardcall.audit_records`,
//! which [`record`] and the store's statements write, and the step log
//! `wardcall.run_steps`, whose rows are the `run.step_completed` records of
//! the steps a worker went on from without parking (their `id` drawn from
//! the same sequence, `wardcall.audit_id_seq`). UPDATE, DELETE and TRUNCATE
//! on both tables are refused by triggers (migrations 0001 and 0018).

use sqlx::PgConnection;

/// What an audit row is about.
#[derive(Debug, Clone, Copy)]
pub enum Entity {
    Run,
    Alert,
    NotificationAttempt,
    Source,
    /// A named outgoing HTTP endpoint's circuit breaker (`src/outbound`).
    HttpEndpoint,
}

impl Entity {
    /// The value stored in `audit_records.entity` (and shown in `audit_log.entity`).
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Run => "run",
            Entity::Alert => "alert",
            Entity::NotificationAttempt => "notification_attempt",
            Entity::Source => "source",
            Entity::HttpEndpoint => "http_endpoint",
        }
    }
}

/// Appends one audit row inside the caller's transaction (so the row commits
/// with the change it describes, or not at all).
///
/// `actor` names who changed it: `engine:<id>`, `webhook:twilio`, `cli`, `sql`.
/// `detail` must not carry secrets; phone numbers may appear (the table is
/// patient data, like the team's own tables) but never in log lines.
#[allow(clippy::too_many_arguments)]
pub async fn record(
    conn: &mut PgConnection,
    entity: Entity,
    entity_id: &str,
    action: &str,
    from_state: Option<&str>,
    to_state: Option<&str>,
    actor: &str,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO wardcall.audit_records (entity, entity_id, action, from_state, to_state, actor, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(entity.as_str())
    .bind(entity_id)
    .bind(action)
    .bind(from_state)
    .bind(to_state)
    .bind(actor)
    .bind(detail)
    .execute(conn)
    .await?;
    Ok(())
}
