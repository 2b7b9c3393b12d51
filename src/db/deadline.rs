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
//! A missed deadline also marks its pool suspect for a while
//! ([`mark_suspect`]): connections the pool hands out or takes back
//! meanwhile (one dropped mid-statement by some other deadline, a
//! webhook's) are checked within a bound first and closed if silent
//! ([`check_on_acquire`], [`check_on_release`]).

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgConnectOptions;
use sqlx::postgres::PgTransactionManager;
use sqlx::{PgConnection, PgPool, Postgres, TransactionManager};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The database did not answer within the engine's deadline: the
/// connection is presumed dead (half-open after a failover) and is closed.
/// Carried as `sqlx::Error::Io` with kind `TimedOut`, so that every caller's
/// handling of a database error (retry, fallback, lease lapse) applies.
#[derive(Debug, thiserror::Error)]
#[error("no reply from PostgreSQL within {ms} ms: the connection is presumed dead (half-open after a failover?) and is not reused")]
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
/// (the held connection, not released, is then closed when dropped:
/// [`HeldConnection::settle`] also marks its pool suspect).
///
/// Errors: `work`'s own, or [`NoReply`] (as `sqlx::Error::Io`, converted to `E`).
pub async fn within<T, E: From<sqlx::Error>>(deadline: Duration, work: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    match tokio::time::timeout(deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(no_reply(deadline).into()),
    }
}

/// [`within`] for work that takes its connections from `pool` itself
/// (sqlx's own acquire, a `pool.begin()` transaction): a deadline that
/// passes marks `pool` suspect ([`mark_suspect`]) before `work` is
/// dropped, so that the connections `work` drops mid-statement are checked,
/// not trusted, as they go back to the pool ([`check_on_release`]).
///
/// Errors: as [`within`].
pub async fn within_on<T, E: From<sqlx::Error>>(pool: &PgPool, deadline: Duration, work: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    // `pin!` keeps `work` in this frame: `select!` drops only the reference
    // to it, so `work` (and the connections it holds) is dropped when this
    // function returns, after `mark_suspect` has run.
    let work = std::pin::pin!(work);
    tokio::select! {
        biased;
        result = work => result,
        _ = tokio::time::sleep(deadline) => {
            mark_suspect(pool);
            Err(no_reply(deadline).into())
        }
    }
}

/// The [`NoReply`] of `deadline`, as sqlx's error.
pub fn no_reply(deadline: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, NoReply { ms: deadline.as_millis() }))
}

/// How long after a missed deadline (or a silent listener connection) a
/// pool checks each connection it hands out or takes back
/// ([`check_on_acquire`], [`check_on_release`]).
pub const SUSPECT_WINDOW: Duration = Duration::from_secs(60);

/// A pool's suspect state: until when (milliseconds on
/// [`process_clock_ms`]) its connections are checked; 0: never marked.
/// Made by [`crate::db::pool_options`], captured by its hooks, and found
/// from the pool ([`register`]) by [`mark_suspect`].
#[derive(Debug, Default)]
pub struct SuspectClock(AtomicU64);

impl SuspectClock {
    /// Whether the pool was marked suspect within the last [`SUSPECT_WINDOW`].
    pub fn suspect(&self) -> bool {
        process_clock_ms() < self.0.load(Ordering::Relaxed)
    }

    fn mark(&self) {
        self.0.fetch_max(process_clock_ms() + SUSPECT_WINDOW.as_millis() as u64, Ordering::Relaxed);
    }
}

/// The pools' clocks, by the identity of each pool's connect options (one
/// `Arc` for a pool's life); entries of dropped pools are pruned.
static CLOCKS: Mutex<Vec<(Weak<PgConnectOptions>, Arc<SuspectClock>)>> = Mutex::new(Vec::new());

/// Ties `pool` to the clock its hooks were made with
/// ([`crate::db::pool_options`]), so that [`mark_suspect`] finds it.
pub fn register(pool: &PgPool, clock: Arc<SuspectClock>) {
    let mut clocks = CLOCKS.lock().unwrap_or_else(|p| p.into_inner());
    clocks.retain(|(options, _)| options.strong_count() > 0);
    clocks.push((Arc::downgrade(&pool.connect_options()), clock));
}

fn clock_of(pool: &PgPool) -> Option<Arc<SuspectClock>> {
    let options = pool.connect_options();
    let clocks = CLOCKS.lock().unwrap_or_else(|p| p.into_inner());
    clocks.iter().find(|(o, _)| std::ptr::eq(o.as_ptr(), Arc::as_ptr(&options))).map(|(_, c)| c.clone())
}

/// Milliseconds since this process first asked (a monotonic clock).
fn process_clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// `pool`'s database may have gone silent (a deadline passed, the
/// listener's connection stopped answering): for the next
/// [`SUSPECT_WINDOW`], every connection `pool` hands out or takes back is
/// checked ([`check_on_acquire`], [`check_on_release`]). A pool not made
/// with [`crate::db::pool_options`] and [`register`]ed is left alone.
pub fn mark_suspect(pool: &PgPool) {
    if let Some(clock) = clock_of(pool) {
        clock.mark();
    }
}

/// Whether `pool` was marked suspect within the last [`SUSPECT_WINDOW`].
pub fn suspect(pool: &PgPool) -> bool {
    clock_of(pool).is_some_and(|c| c.suspect())
}

/// The pools' `after_release` check (`crate::db::pool_options`). sqlx pings
/// every connection given back to its pool, with no bound: on a connection a
/// hard failover left half-open (one whose statement was dropped at its
/// deadline, say) that ping would wait for the kernel's retransmission
/// timeout, about 15 minutes, holding a pool slot. While the pool is
/// suspect (`clock`), the connection is first pinged here within
/// [`REPLY_MARGIN`]: an error when it does not answer (sqlx then shuts the
/// socket without a farewell, which could wait on a full send buffer).
/// Otherwise it costs nothing: `Ok(true)` at once.
///
/// Errors: [`NoReply`] (or the ping's own error): the connection is silent.
pub async fn check_on_release(clock: &SuspectClock, conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    if !clock.suspect() {
        return Ok(true);
    }
    match tokio::time::timeout(REPLY_MARGIN, sqlx::Connection::ping(conn)).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(no_reply(REPLY_MARGIN)),
    }
}

/// The pools' `before_acquire` check while the pool is suspect (`clock`): a
/// connection is pinged within [`REPLY_MARGIN`] before it is handed out,
/// however recently it was used, and dropped if silent (`Ok(false)`: sqlx
/// closes it and takes another), so that the idle connections a hard
/// failover left half-open are weeded out for every user of the pool, not
/// only for the units of work bounded by [`within`].
///
/// Errors: none.
pub async fn check_on_acquire(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    Ok(matches!(tokio::time::timeout(REPLY_MARGIN, sqlx::Connection::ping(conn)).await, Ok(Ok(()))))
}

/// What a live server may take, beyond a statement's own
/// `statement_timeout`, to answer (the cancel, the error's trip back, a
/// busy machine): a statement under a known `statement_timeout` (the team's
/// lookups, on their pool's session default or a `SET LOCAL`; recipients
/// queries, under `SET LOCAL`) gets that timeout plus this margin
/// ([`past_statement_timeout`]) before it is a [`NoReply`].
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
    /// Its pool, marked suspect when the connection does not answer.
    pool: PgPool,
    finished: bool,
    /// A `BEGIN` failed: the connection is closed whatever happens next.
    poisoned: bool,
}

impl HeldConnection {
    /// Takes a connection from `pool` (bounded by the pool's acquire timeout).
    ///
    /// Errors: sqlx's (`PoolTimedOut`, a failed connect).
    pub async fn acquire(pool: &PgPool) -> Result<HeldConnection, sqlx::Error> {
        Ok(HeldConnection { conn: pool.acquire().await?, pool: pool.clone(), finished: false, poisoned: false })
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

    /// Releases the connection unless `result` is a [`NoReply`] (then the
    /// pool is marked suspect, [`mark_suspect`], and the connection closed),
    /// and passes `result` on.
    pub fn settle<T>(self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if matches!(&result, Err(e) if is_no_reply(e)) {
            mark_suspect(&self.pool);
        } else {
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
        let depth = PgTransactionManager::get_transaction_depth(&self.conn);
        if !self.finished || self.poisoned || depth > 1 {
            // (A savepoint still open: one queued rollback would not end the transaction.)
            self.conn.close_on_drop();
        } else if depth == 1 {
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
        assert!(e.to_string().contains("no reply from PostgreSQL within 5 ms"), "{e}");
        assert!(!is_no_reply(&sqlx::Error::PoolTimedOut));
        assert_eq!(within(Duration::from_secs(1), async { Ok::<_, sqlx::Error>(7) }).await.unwrap(), 7);
    }
}
