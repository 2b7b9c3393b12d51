//! The append-only audit log (`wardcall.audit_log`): one row per state change
//! of a run, an alert, a notification attempt or a source, with time and actor.
//! UPDATE, DELETE and TRUNCATE on the table are refused by triggers (migration 1).

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
    /// The value stored in `audit_log.entity`.
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
        "INSERT INTO wardcall.audit_log (entity, entity_id, action, from_state, to_state, actor, detail)
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
