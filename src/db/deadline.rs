//! Client-side deadlines for the engine's database work, so that a
//! connection whose server is gone without a word cannot hold the engine.
//!
//! After a hard failover (the old primary's machine dies or is cut off; the
//! HA manager moves a DNS name or a proxy's backend to the new primary),
//! every connection to the old primary is half-open: no reset ever comes
//! back. PostgreSQL's `statement_timeout` is enforced by the server that is
//! gone, and sqlx sets no TCP keepalive or user timeout, so a statement
//! waiting for its reply waits until the kernel gives up retransmitting
//! (`net.ipv4.tcp_retries2`, about 15 minutes by default). Before this
//! module, one such statement in a batch (the first tiers', the send
//! records', a group commit, a claim, a dispatch) held every later request
//! of that batch queue or loop for that long: every critical alert of the
//! engine (DESIGN.md invariant 10).
//!
//! The engine's units of database work now run [`within`] a deadline
//! (`engine.database_deadline_ms`, [`crate::config::EngineConfig::database_deadline`]),
//! longer than any reply a live server can take (its `statement_timeout`
//! answers first), on a [`HeldConnection`]: a connection whose work did not
//! finish (the deadline passed, or the future was dropped) is closed, not
//! returned to the pool. sqlx would otherwise ping it on release, and that
//! ping would wait on the dead socket just as long, holding a pool slot.
//! A missed deadline also marks the database suspect for a while
//! ([`mark_suspect`]): connections given back to a pool meanwhile (dropped
//! mid-statement by some other deadline, a webhook's) are checked within a
//! bound first and closed if silent ([`check_on_release`]).

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgTransactionManager;
use sqlx::{PgConnection, PgPool, Postgres, TransactionManager};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The database did not answer within the engine's deadline: the
/// connection is presumed dead (half-open after a failover) and is closed.
/// Carried as `sqlx::Error::Io` with kind `TimedOut`, so that every caller's
/// handling of a database error (retry, fallback, lease lapse) applies.
#[derive(Debug, thiserror::Error)]
#[error("no reply from PostgreSQL within {ms} ms (engine.database_deadline_ms): the connection is presumed dead and is closed")]
pub struct NoReply {
    /// The deadline that passed, in milliseconds.
    pub ms: u128,
}

/// Whether `e` is a [`NoReply`].
pub fn is_no_reply(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(io) if io.get_ref().is_some_and(|inner| inner.is::<NoReply>()))
}

/// Runs `work` (database work on one [`HeldConnection`]) for at most
/// `deadline`; when it passes, `work` is dropped and [`NoReply`] returned
/// (the held connection, not released, is then closed when dropped).
///
/// Errors: `work`'s own, or [`NoReply`] (as `sqlx::Error::Io`, converted to `E`).
///
/// A deadline that passes also marks the database suspect
/// ([`mark_suspect`]) before `work` is dropped, so that the connections it
/// drops mid-statement are checked, not trusted, as they go back to their
/// pool ([`check_on_release`]).
pub async fn within<T, E: From<sqlx::Error>>(deadline: Duration, work: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let work = std::pin::pin!(work);
    tokio::select! {
        biased;
        result = work => result,
        _ = tokio::time::sleep(deadline) => {
            mark_suspect();
            Err(no_reply(deadline).into())
        }
    }
}

/// How long after a missed deadline (or a silent listener connection) the
/// pools check each connection given back to them ([`check_on_release`]).
pub const SUSPECT_WINDOW: Duration = Duration::from_secs(60);

/// Until when (milliseconds on [`process_clock_ms`]) connections given back
/// to a pool are checked; 0: never marked.
static SUSPECT_UNTIL_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since this process first asked (a monotonic clock).
fn process_clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The database may have gone silent (a deadline passed, the listener's
/// connection stopped answering): for the next [`SUSPECT_WINDOW`], every
/// connection given back to a pool is checked ([`check_on_release`]).
pub fn mark_suspect() {
    SUSPECT_UNTIL_MS.fetch_max(process_clock_ms() + SUSPECT_WINDOW.as_millis() as u64, Ordering::Relaxed);
}

/// Whether the database was marked suspect within the last [`SUSPECT_WINDOW`].
pub fn suspect() -> bool {
    process_clock_ms() < SUSPECT_UNTIL_MS.load(Ordering::Relaxed)
}

/// The pools' `after_release` check (`crate::db::pool_options`). sqlx pings
/// every connection given back to its pool, with no bound: on a connection a
/// hard failover left half-open (one whose statement was dropped at its
/// deadline, say) that ping would wait for the kernel's retransmission
/// timeout, about 15 minutes, holding a pool slot. While the database is
/// [`suspect`], the connection is first pinged here within [`REPLY_MARGIN`]:
/// `Ok(false)` (sqlx then closes it) when it does not answer. Otherwise it
/// costs nothing: `Ok(true)` at once.
///
/// Errors: none (a failed ping is `Ok(false)`).
pub async fn check_on_release(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    if !suspect() {
        return Ok(true);
    }
    Ok(matches!(tokio::time::timeout(REPLY_MARGIN, sqlx::Connection::ping(conn)).await, Ok(Ok(()))))
}

/// The [`NoReply`] of `deadline`, as sqlx's error.
pub fn no_reply(deadline: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, NoReply { ms: deadline.as_millis() }))
}

/// What a live server may take, beyond a statement's own
/// `statement_timeout`, to answer (the cancel, the error's trip back, a
/// busy machine): a statement under an explicit `SET LOCAL
/// statement_timeout` (the team's lookups and recipients) gets that timeout
/// plus this margin ([`past_statement_timeout`]) before it is a [`NoReply`].
pub const REPLY_MARGIN: Duration = Duration::from_secs(2);

/// The deadline of a statement whose `statement_timeout` is
/// `statement_timeout_ms` milliseconds: that plus [`REPLY_MARGIN`].
pub fn past_statement_timeout(statement_timeout_ms: u64) -> Duration {
    Duration::from_millis(statement_timeout_ms) + REPLY_MARGIN
}

/// A pooled connection for one unit of work that goes back to the pool only
/// when the work finished ([`HeldConnection::release`], or
/// [`HeldConnection::settle`] with its result); dropped unfinished (a
/// [`NoReply`], a future dropped mid-statement) it is closed instead: the
/// server, if alive, rolls back what it held; if gone, nothing waits on it.
pub struct HeldConnection {
    conn: PoolConnection<Postgres>,
    finished: bool,
    /// A `BEGIN` failed: the connection is closed whatever happens next.
    poisoned: bool,
}

impl HeldConnection {
    /// Takes a connection from `pool` (bounded by the pool's acquire timeout).
    ///
    /// Errors: sqlx's (`PoolTimedOut`, a failed connect).
    pub async fn acquire(pool: &PgPool) -> Result<HeldConnection, sqlx::Error> {
        Ok(HeldConnection { conn: pool.acquire().await?, finished: false, poisoned: false })
    }

    /// Begins a transaction (`statement`, e.g. `BEGIN READ ONLY; SET LOCAL
    /// …`, or `BEGIN`) with sqlx's own bookkeeping, so that a `begin` on the
    /// connection inside it is a savepoint. Ended by [`HeldConnection::commit`]
    /// or [`HeldConnection::rollback`]; one left open is rolled back when
    /// the connection is released, closed with it when not.
    ///
    /// Errors: the server's (the connection is then closed, not released:
    /// a failed multi-statement `BEGIN` may leave a transaction open).
    pub async fn begin(&mut self, statement: Option<String>) -> Result<(), sqlx::Error> {
        let begun = PgTransactionManager::begin(&mut self.conn, statement.map(std::borrow::Cow::Owned)).await;
        if begun.is_err() {
            self.poisoned = true;
        }
        begun
    }

    /// Commits the transaction begun with [`HeldConnection::begin`].
    ///
    /// Errors: the server's (the commit failed: nothing of it was written,
    /// unless its reply was lost).
    pub async fn commit(&mut self) -> Result<(), sqlx::Error> {
        PgTransactionManager::commit(&mut self.conn).await
    }

    /// Rolls back the transaction begun with [`HeldConnection::begin`].
    ///
    /// Errors: the server's.
    pub async fn rollback(&mut self) -> Result<(), sqlx::Error> {
        PgTransactionManager::rollback(&mut self.conn).await
    }

    /// The work finished (committed, rolled back, or answered): the
    /// connection goes back to the pool when dropped (a transaction still
    /// open is rolled back first, as sqlx's `Transaction` does).
    pub fn release(mut self) {
        self.finished = true;
    }

    /// Releases the connection unless `result` is a [`NoReply`], and passes
    /// `result` on.
    pub fn settle<T>(self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if !matches!(&result, Err(e) if is_no_reply(e)) {
            self.release();
        }
        result
    }
}

impl std::ops::Deref for HeldConnection {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for HeldConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        if !self.finished || self.poisoned {
            self.conn.close_on_drop();
        } else if PgTransactionManager::get_transaction_depth(&self.conn) > 0 {
            // Queued; sent by sqlx's ping as the connection is released.
            PgTransactionManager::start_rollback(&mut self.conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deadline_that_passes_is_a_no_reply_io_error() {
        let e: sqlx::Error = within(Duration::from_millis(5), std::future::pending::<Result<(), sqlx::Error>>()).await.unwrap_err();
        assert!(is_no_reply(&e), "{e:?}");
        assert!(matches!(&e, sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut));
        assert!(e.to_string().contains("engine.database_deadline_ms"), "{e}");
        assert!(!is_no_reply(&sqlx::Error::PoolTimedOut));
        assert_eq!(within(Duration::from_secs(1), async { Ok::<_, sqlx::Error>(7) }).await.unwrap(), 7);
    }
}
