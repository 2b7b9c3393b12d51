//! SQL of `wardcall.webhook_receipts` (migration 0005): the deliveries of
//! providers' webhooks already applied, by the provider's idempotency token,
//! with the first delivery's response, so that a replay is answered the same
//! and changes nothing. A receipt never holds patient data.

use sqlx::PgConnection;
use uuid::Uuid;

/// Claims a delivery inside the event's transaction. `None`: first delivery
/// (a receipt with an empty response is recorded; see [`finish`]).
/// `Some(response)`: a replay, with the first delivery's response; the
/// caller must roll back.
pub async fn claim(tx: &mut PgConnection, provider: &str, token: &str, attempt: Uuid) -> Result<Option<String>, sqlx::Error> {
    let inserted: Option<i32> = sqlx::query_scalar(
        "INSERT INTO wardcall.webhook_receipts (provider, idempotency_token, attempt_id, response) VALUES ($1, $2, $3, '')
         ON CONFLICT DO NOTHING RETURNING 1",
    )
    .bind(provider)
    .bind(token)
    .bind(attempt)
    .fetch_optional(&mut *tx)
    .await?;
    if inserted.is_some() {
        return Ok(None);
    }
    let response: Option<String> = sqlx::query_scalar("SELECT response FROM wardcall.webhook_receipts WHERE provider = $1 AND idempotency_token = $2")
        .bind(provider)
        .bind(token)
        .fetch_optional(&mut *tx)
        .await?;
    Ok(Some(response.unwrap_or_default()))
}

/// Keeps the response of a first delivery (no patient data) for its replays.
pub async fn finish(tx: &mut PgConnection, provider: &str, token: &str, response: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE wardcall.webhook_receipts SET response = $3 WHERE provider = $1 AND idempotency_token = $2")
        .bind(provider)
        .bind(token)
        .bind(response)
        .execute(tx)
        .await?;
    Ok(())
}

/// Deletes up to 1,000 receipts older than a day (a provider retries a
/// webhook for seconds, not days). Returns how many.
pub async fn prune(pool: &sqlx::PgPool) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "DELETE FROM wardcall.webhook_receipts WHERE ctid IN (
             SELECT ctid FROM wardcall.webhook_receipts WHERE received_at < clock_timestamp() - interval '1 day' LIMIT 1000)",
    )
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}
