//! Embedded PostgreSQL: a private cluster run from the machine's server binaries.
//!
//! When wardcall is given no `database_url` (nor `DATABASE_URL`) it runs its own
//! PostgreSQL cluster through [`EmbeddedCluster`]; the integration-test harness uses
//! the same code (one cluster per test run).
//!
//! # Files
//!
//! For a data directory `D` (say `/var/lib/wardcall/postgres`):
//!
//! | path | what |
//! |---|---|
//! | `D/` | the cluster (`initdb` output), mode 0700, owned by the account PostgreSQL runs as |
//! | `D/wardcall.conf` | settings owned by wardcall, rewritten before every start; included from `D/postgresql.conf` |
//! | `D/log/postgresql-<Mon..Sun>.log` | server log (logging collector, one file per weekday, a rolling week) |
//! | `D/log/startup.log` | `pg_ctl -l` output: messages written before the logging collector runs |
//! | `D.wardcall.lock` | `flock(2)` lock serialising start/stop between processes (next to `D`, not inside) |
//! | `D.wardcall.users` | shared `flock(2)` held by every live handle: "who still uses this cluster" |
//! | `D.wardcall-initdb` | present only while `initdb` runs; a leftover means an interrupted `initdb` |
//!
//! The lock files live next to the data directory because `initdb` insists on an empty
//! directory; wardcall therefore needs write access to the directory containing `D`.
//! `flock` locks die with their process, so a killed wardcall never leaves a stale lock.
//!
//! # Connections: Unix socket only
//!
//! The cluster never listens on TCP (`listen_addresses = ''`, and `pg_hba.conf` rejects
//! host connections anyway). The socket lives in the data directory itself
//! (`D/.s.PGSQL.5432`), which is mode 0700, and `unix_socket_permissions = 0700`: only
//! the account PostgreSQL runs as (and root) can connect, so `trust` authentication on
//! the socket is confined to that account. If `D/.s.PGSQL.5432` would exceed the
//! 107-byte `sun_path` limit (or `D` contains characters awkward in a configuration
//! list), the socket goes to `/tmp/wardcall-pg-<16 hex digits>` instead: a 0700
//! directory owned by the server account, named by a stable FNV-1a hash of `D`, so it
//! is unique per data directory and identical across restarts. (PostgreSQL touches its
//! socket files periodically, so `/tmp` cleaners leave them alone.)
//!
//! # Reuse, restart and shutdown semantics
//!
//! * A server already running on `D` (e.g. left by a killed wardcall) is reused as is
//!   (`started_by_us() == false`); one that is still starting (crash recovery) is
//!   waited for.
//! * A `postmaster.pid` whose process is dead, a zombie, or an unrelated process that
//!   got the same PID after a reboot or container restart is stale: the server is
//!   started normally and PostgreSQL's crash recovery does the rest. Before starting,
//!   wardcall waits for any orphaned server processes of the dead postmaster (found
//!   through `/proc`) to exit, which is the interlock PostgreSQL relies on.
//! * The cluster belongs to the data directory, not to the process that happened to
//!   start it: [`EmbeddedCluster::stop`] shuts the server down whether this handle
//!   started it or adopted it, **unless another live handle (in any process) still
//!   uses it**, in which case it is left running and the last user stops it. A handle
//!   that is dropped without `stop` (or whose process dies) leaves the server running,
//!   to be reused by the next [`EmbeddedCluster::start`].
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. When wardcall runs as root, `initdb`, `pg_ctl`
//! and the server run as the `postgres` system account; the data directory is chowned
//! to it and every parent directory must be searchable by it.
//!
//! When a parent is not (the usual case: a repository cloned under `/root`, mode
//! 0700, where the default data directory `.wardcall` lies), and the requested
//! directory holds no cluster yet, the cluster is placed in
//! `/var/lib/wardcall/relocated/<16 hex digits>` instead ([`RELOCATION_BASE`],
//! [`relocation_key`]): keyed by the FNV-1a hash of the canonical requested path, so
//! the same requested path always finds its cluster again, with
//! `<key>.wardcall.requested` recording that path (claimed with `O_EXCL`: two
//! requested paths never share a cluster). The cluster directory is mode 0700 and
//! owned by `postgres` like any other; its lock files are its siblings, so start,
//! reuse, stale-pid handling and stop work unchanged. This is logged at info level
//! naming both paths, and [`EmbeddedCluster::relocated_from`] tells it. A requested
//! directory that already holds a cluster is never relocated (the
//! [`NotTraversable`](EmbeddedError::NotTraversable) error says what to `chmod`).
//!
//! # PostgreSQL manual references
//!
//! Section numbers are those of the PostgreSQL 15 manual; the page names are stable.
//! * `initdb` reference page (`app-initdb.html`); §19.2 "Creating a Database Cluster" (`creating-cluster.html`)
//! * `pg_ctl` reference page (`app-pg-ctl.html`); §19.3 "Starting the Database Server" (`server-start.html`)
//! * §19.5 "Shutting Down the Server" (`server-shutdown.html`)
//! * §20.3 "Connections and Authentication" (`runtime-config-connection.html`):
//!   `listen_addresses`, `port`, `unix_socket_directories`, `unix_socket_permissions`, `max_connections`
//! * §20.8 "Error Reporting and Logging" (`runtime-config-logging.html`)
//! * §21.1 "The pg_hba.conf File" (`auth-pg-hba-conf.html`)
//! * §34.1.1 "Connection Strings" (`libpq-connect.html`) for [`EmbeddedCluster::url`]

use std::ffi::{CString, OsString};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Gid, Pid, User};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};
use sqlx::{ConnectOptions, Connection, Executor};
use tracing::{debug, info, warn};

/// Port number of the embedded cluster: 5432.
///
/// No TCP is used, so this never conflicts with another server; it only names the
/// socket file (`.s.PGSQL.5432`) inside the socket directory.
pub const DEFAULT_PORT: u16 = 5432;

/// Superuser role of the embedded cluster (`initdb -U postgres`), whoever runs it.
pub const SUPERUSER: &str = "postgres";

/// System account PostgreSQL runs as when wardcall runs as root.
pub const SERVER_ACCOUNT: &str = "postgres";

/// Longest Unix-domain socket path, in bytes, PostgreSQL accepts on Linux
/// (`sun_path` is 108 bytes including the terminating NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// `pg_ctl start -t`: also the longest wait for a server that is already starting
/// (crash recovery can take minutes on a slow disk; failing would only page someone).
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// `pg_ctl stop -m fast -t`, after which an immediate shutdown is tried.
const FAST_STOP_TIMEOUT: Duration = Duration::from_secs(60);
const IMMEDIATE_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for `initdb` (it fsyncs the new cluster).
const INITDB_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest wait for another process starting or stopping the same cluster.
const LOCK_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest wait for orphaned server processes of a dead postmaster to exit.
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to and querying the server over the socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// `CREATE DATABASE` copies a template and checkpoints.
const CREATE_DATABASE_TIMEOUT: Duration = Duration::from_secs(120);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

const CONF_FILE: &str = "wardcall.conf";
const INCLUDE_LINE: &str = "include = 'wardcall.conf'";
const LOG_DIR: &str = "log";
const STARTUP_LOG: &str = "startup.log";
const PID_FILE: &str = "postmaster.pid";
const SOCKET_FALLBACK_PREFIX: &str = "/tmp/wardcall-pg-";

/// Errors of [`EmbeddedCluster`]. Each message says what failed and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbeddedError {
    /// No directory holds all three of `initdb`, `pg_ctl` and `postgres`.
    /// `searched` lists, in search order, the PATH entries and distribution
    /// directory patterns (with `*`) that were tried.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found (searched: {}); \
         install the `postgresql` server package (Debian/Ubuntu: `apt-get install postgresql-15`; \
         RHEL/Fedora: `dnf install postgresql-server`; Alpine: `apk add postgresql15`) or put the \
         directory that holds them on PATH; alternatively set `database_url` in the config or the \
         DATABASE_URL environment variable to use an existing PostgreSQL server",
        display_paths(.searched)
    )]
    NoServerBinaries {
        /// Directories and patterns searched, in order.
        searched: Vec<PathBuf>,
    },

    /// wardcall runs as root, PostgreSQL refuses to, and there is no account to run it as.
    #[error(
        "wardcall runs as root and PostgreSQL refuses to run as root, but there is no `{account}` \
         system account to run it as; create one (normally done by the postgresql package: \
         `useradd --system --home-dir /var/lib/postgresql --shell /usr/sbin/nologin {account}`), \
         run wardcall as an unprivileged user, or set `database_url` / DATABASE_URL"
    )]
    NoServerAccount {
        /// The account looked up ([`SERVER_ACCOUNT`]).
        account: String,
    },

    /// A parent of the data directory cannot be entered by the account PostgreSQL runs as.
    #[error(
        "directory {} (mode {mode:o}) cannot be entered by system user {account}, which runs \
         PostgreSQL because wardcall runs as root; every parent of the data directory needs search \
         permission for it: run `chmod o+x {}` or choose a data directory elsewhere (e.g. under /var/lib/wardcall)",
        .dir.display(), .dir.display()
    )]
    NotTraversable {
        /// The directory lacking search permission.
        dir: PathBuf,
        /// The account PostgreSQL runs as.
        account: String,
        /// Its permission bits.
        mode: u32,
    },

    /// The data directory path is unusable (not a directory, someone else's files, an
    /// externally managed cluster, characters `pg_ctl` cannot pass through its shell).
    #[error("cannot use {} as the embedded PostgreSQL data directory: {reason}", .data_dir.display())]
    InvalidDataDir {
        /// The data directory.
        data_dir: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },

    /// The data directory was created by a PostgreSQL major version whose binaries are
    /// not installed (data directories are not compatible across major versions).
    #[error(
        "{} holds a PostgreSQL {cluster_version} cluster but no PostgreSQL {cluster_version} server \
         binaries were found (found: {available}); install them (Debian/Ubuntu: `apt-get install \
         postgresql-{cluster_version}`) or upgrade the cluster with pg_upgrade",
        .data_dir.display()
    )]
    VersionMismatch {
        /// The data directory.
        data_dir: PathBuf,
        /// Major version from its `PG_VERSION`.
        cluster_version: u32,
        /// The installations found, as "`<major> in <dir>`" items.
        available: String,
    },

    /// `initdb` failed; `output` is its (tail-trimmed) stderr and stdout.
    #[error("initdb failed for {} ({status}):\n{output}", .data_dir.display())]
    Initdb {
        /// The data directory.
        data_dir: PathBuf,
        /// Exit status or "timed out".
        status: String,
        /// What initdb printed.
        output: String,
    },

    /// The server did not start or does not answer; `log_tail` holds the last lines of
    /// `log/startup.log` and of the newest server log file.
    #[error("PostgreSQL in {} did not start: {reason}\n{log_tail}", .data_dir.display())]
    Start {
        /// The data directory.
        data_dir: PathBuf,
        /// What went wrong.
        reason: String,
        /// Last lines of the server's log files.
        log_tail: String,
    },

    /// Server processes of a dead postmaster still run, so starting a new one could
    /// corrupt the cluster.
    #[error(
        "PostgreSQL processes {pids:?} of a dead server still run on {} after {}s; a new server \
         cannot safely start until they are gone: terminate them (`kill -9 <pid>`) and start again",
        .data_dir.display(), ORPHAN_TIMEOUT.as_secs()
    )]
    StaleServerProcesses {
        /// The data directory.
        data_dir: PathBuf,
        /// Their process IDs.
        pids: Vec<i32>,
    },

    /// `pg_ctl stop` failed in both fast and immediate mode.
    #[error("could not stop PostgreSQL in {}: {reason}", .data_dir.display())]
    Stop {
        /// The data directory.
        data_dir: PathBuf,
        /// What pg_ctl said.
        reason: String,
    },

    /// Another process kept the start/stop lock for longer than the wait limit.
    #[error(
        "waited {waited_secs}s for lock file {} (held by {holder}): another wardcall process is \
         starting or stopping this PostgreSQL cluster and seems stuck; check that process",
        .path.display()
    )]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// Seconds waited.
        waited_secs: u64,
        /// Holder as recorded in the file ("pid N"), or "unknown".
        holder: String,
    },

    /// The `/tmp` socket directory exists but is not safe to use.
    #[error("unsafe socket directory {}: {reason}; remove it and start again", .dir.display())]
    UnsafeSocketDir {
        /// The directory.
        dir: PathBuf,
        /// Why it is unsafe.
        reason: String,
    },

    /// The database name cannot be used (empty, NUL, longer than 63 bytes).
    #[error("invalid database name {name:?}: {reason}")]
    InvalidDatabaseName {
        /// The name given.
        name: String,
        /// Why.
        reason: String,
    },

    /// A query against the embedded cluster failed.
    #[error("{context}")]
    Database {
        /// What was being done.
        context: String,
        /// The sqlx error.
        #[source]
        source: sqlx::Error,
    },

    /// A file-system or process operation failed.
    #[error("{context}")]
    Io {
        /// What was being done, with the path involved.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedError {
    let context = context.into();
    move |source| EmbeddedError::Io { context, source }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// The unprivileged system account PostgreSQL runs as when wardcall runs as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemUser {
    /// Numeric user ID.
    pub uid: u32,
    /// Numeric primary group ID.
    pub gid: u32,
    /// Account name (e.g. `postgres`).
    pub name: String,
}

/// Paths derived from the canonical data directory.
#[derive(Debug, Clone)]
struct Paths {
    data_dir: PathBuf,
    lock: PathBuf,
    users: PathBuf,
    initdb_marker: PathBuf,
    /// When the cluster was relocated: the canonical requested path and why.
    relocated_from: Option<(PathBuf, String)>,
}

impl Paths {
    fn new(data_dir: PathBuf) -> Self {
        let sibling = |suffix: &str| {
            let mut name = data_dir.file_name().unwrap_or_default().to_os_string();
            name.push(suffix);
            data_dir.with_file_name(name)
        };
        Paths { lock: sibling(".wardcall.lock"), users: sibling(".wardcall.users"), initdb_marker: sibling(".wardcall-initdb"), data_dir, relocated_from: None }
    }
}

/// A running embedded PostgreSQL cluster (see the module documentation).
///
/// Dropping the handle does **not** stop the server (it cannot be done asynchronously
/// in `Drop`, and a killed process would not run it anyway): call
/// [`stop`](Self::stop) on shutdown. A server left running is reused by the next
/// [`start`](Self::start).
#[derive(Debug)]
pub struct EmbeddedCluster {
    paths: Paths,
    socket_dir: PathBuf,
    bin_dir: PathBuf,
    server_version: u32,
    port: u16,
    run_as: Option<SystemUser>,
    started_by_us: bool,
    /// Shared lock on `D.wardcall.users` while this handle uses the cluster; `None` once stopped.
    in_use: tokio::sync::Mutex<Option<Flock<File>>>,
}

impl EmbeddedCluster {
    /// Finds the directory holding the PostgreSQL server binaries `initdb`, `pg_ctl` and
    /// `postgres` (all three must be executable files in the same directory). When all
    /// three are symbolic links into one directory, that directory is returned.
    ///
    /// Search order: the absolute entries of `PATH`; then `/usr/lib/postgresql/*/bin`
    /// (Debian/Ubuntu), `/usr/pgsql-*/bin` (PGDG RPMs) and `/usr/libexec/postgresql*`
    /// (Alpine), each newest version first; then `/usr/local/pgsql/bin` (source builds).
    /// [`start`](Self::start) may pick an older installation from the same list when an
    /// existing cluster needs it.
    ///
    /// # Errors
    /// [`EmbeddedError::NoServerBinaries`] naming the package to install and the
    /// `database_url` / `DATABASE_URL` alternative.
    pub fn find_binaries() -> Result<PathBuf, EmbeddedError> {
        let (found, searched) = bin_dir_candidates();
        found.into_iter().next().ok_or(EmbeddedError::NoServerBinaries { searched })
    }

    /// Ensures a cluster exists in `data_dir`, that a server runs on it, and returns a
    /// handle once it accepts connections on its Unix socket.
    ///
    /// * `data_dir`: absolute or relative path; missing parents are created. It must be
    ///   absent, empty, or a cluster created by this function. Symbolic links are
    ///   resolved; the canonical path is what [`data_dir`](Self::data_dir) returns.
    /// * First use: `initdb -U postgres -E UTF8 --locale=C --data-checksums
    ///   --auth-local=trust --auth-host=reject`. The C locale makes text ordering
    ///   independent of the C library, so OS upgrades cannot silently corrupt text
    ///   indexes (the price: `upper`/`lower` only fold ASCII). `initdb` runs under a
    ///   marker file; an `initdb` interrupted by a kill or power loss is detected and
    ///   redone on the next start.
    /// * Settings, in `D/wardcall.conf` (rewritten before every start; tune the cluster
    ///   with `ALTER SYSTEM`, which takes precedence): `listen_addresses = ''`,
    ///   `port = 5432`, `unix_socket_directories` (see the module documentation),
    ///   `unix_socket_permissions = 0700`, `max_connections = 200`,
    ///   `shared_buffers = 128MB`, `fsync`, `synchronous_commit` and `full_page_writes`
    ///   on, logging collector writing `D/log/postgresql-<weekday>.log`.
    /// * A server already running on `data_dir` is reused (waiting up to 300 s if it is
    ///   still starting); a stale `postmaster.pid` is dealt with; `pg_ctl start -w -t 300`
    ///   otherwise. See the module documentation.
    /// * Concurrent calls for the same data directory, in one or several processes, are
    ///   serialised by an exclusive `flock` on `D.wardcall.lock` (waiting up to 600 s).
    /// * As root, everything runs as the `postgres` system account, which is logged at
    ///   info level.
    ///
    /// Follows the initdb and pg_ctl reference pages and §19.2/§19.3 of the PostgreSQL 15 manual.
    ///
    /// # Errors
    /// [`NoServerBinaries`](EmbeddedError::NoServerBinaries),
    /// [`NoServerAccount`](EmbeddedError::NoServerAccount),
    /// [`NotTraversable`](EmbeddedError::NotTraversable),
    /// [`InvalidDataDir`](EmbeddedError::InvalidDataDir),
    /// [`VersionMismatch`](EmbeddedError::VersionMismatch),
    /// [`Initdb`](EmbeddedError::Initdb), [`Start`](EmbeddedError::Start) (with the log tail),
    /// [`StaleServerProcesses`](EmbeddedError::StaleServerProcesses),
    /// [`LockTimeout`](EmbeddedError::LockTimeout),
    /// [`UnsafeSocketDir`](EmbeddedError::UnsafeSocketDir), [`Io`](EmbeddedError::Io).
    pub async fn start(data_dir: &Path) -> Result<EmbeddedCluster, EmbeddedError> {
        let (candidates, searched) = bin_dir_candidates();
        if candidates.is_empty() {
            return Err(EmbeddedError::NoServerBinaries { searched });
        }
        let run_as = server_account()?;
        if let Some(user) = &run_as {
            info!(uid = user.uid, "running PostgreSQL as system user {} because wardcall runs as root", user.name);
        }
        let requested = data_dir.to_path_buf();
        let account = run_as.clone();
        let paths = blocking(move || resolve_paths(&requested, account.as_ref())).await?;
        if let Some((requested, why)) = &paths.relocated_from {
            info!(
                requested = %requested.display(),
                data_dir = %paths.data_dir.display(),
                "the requested data directory {} cannot be reached by the PostgreSQL server's account ({why}); \
                 placing the cluster in {} instead (the same requested path always maps to the same cluster)",
                requested.display(),
                paths.data_dir.display()
            );
        }

        let _start_lock = acquire_lock(&paths.lock, LockKind::Exclusive).await?;

        let inspected = paths.clone();
        let state = blocking(move || inspect_data_dir(&inspected)).await?;
        let (bin_dir, server_version) = match state {
            DataDirState::Initialized { version } => choose_bin_dir(&candidates, Some(version), &paths.data_dir).await?,
            DataDirState::Empty | DataDirState::InterruptedInitdb => {
                if state == DataDirState::InterruptedInitdb {
                    warn!(
                        data_dir = %paths.data_dir.display(),
                        "found an interrupted initdb (marker {} exists); clearing the data directory and running initdb again",
                        paths.initdb_marker.display()
                    );
                    let dir = paths.data_dir.clone();
                    blocking(move || clear_dir_contents(&dir)).await?;
                }
                let chosen = choose_bin_dir(&candidates, None, &paths.data_dir).await?;
                init_cluster(&paths, &chosen.0, run_as.as_ref()).await?;
                chosen
            }
        };

        let (socket_dir, port, started_by_us) = bring_up(&paths, &bin_dir, server_version, run_as.as_ref()).await?;
        let in_use = acquire_lock(&paths.users, LockKind::Shared).await?;
        info!(
            data_dir = %paths.data_dir.display(),
            socket = %socket_dir.join(format!(".s.PGSQL.{port}")).display(),
            bin_dir = %bin_dir.display(),
            "PostgreSQL {server_version} ready ({})",
            if started_by_us { "started" } else { "reused the server already running" }
        );
        Ok(EmbeddedCluster { paths, socket_dir, bin_dir, server_version, port, run_as, started_by_us, in_use: tokio::sync::Mutex::new(Some(in_use)) })
    }

    /// sqlx connect options for `database` in this cluster, over the Unix socket
    /// `<socket_dir>/.s.PGSQL.<port>` as superuser [`SUPERUSER`], TLS disabled (PostgreSQL
    /// offers no TLS on Unix sockets). Starts from
    /// [`PgConnectOptions::new_without_pgpass`], so `PGAPPNAME` and `PGOPTIONS` from the
    /// environment still apply; chain more setters as needed. Never fails; connecting
    /// fails if the cluster has been stopped.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        socket_connect_options(&self.socket_dir, self.port, database)
    }

    /// Creates database `name` (owned by [`SUPERUSER`], from `template1`) unless it
    /// exists. Idempotent and safe against concurrent callers: losing a creation race
    /// counts as success. Connects to the `postgres` maintenance database (`template1`
    /// if that was dropped). `name` is quoted, so any valid identifier works, case
    /// preserved.
    ///
    /// # Errors
    /// [`InvalidDatabaseName`](EmbeddedError::InvalidDatabaseName) (empty, NUL, over 63
    /// bytes, which PostgreSQL would silently truncate);
    /// [`Database`](EmbeddedError::Database) if connecting or `CREATE DATABASE` fails or
    /// takes more than 120 s.
    pub async fn ensure_database(&self, name: &str) -> Result<(), EmbeddedError> {
        validate_database_name(name)?;
        let mut conn = maintenance_connection(&self.socket_dir, self.port)
            .await
            .map_err(|source| EmbeddedError::Database { context: format!("connecting to the embedded PostgreSQL at {}", self.url("postgres")), source })?;
        let result = tokio::time::timeout(CREATE_DATABASE_TIMEOUT, async {
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1)").bind(name).fetch_one(&mut conn).await?;
            if exists {
                return Ok(false);
            }
            match conn.execute(format!("CREATE DATABASE {}", quote_ident(name)).as_str()).await {
                Ok(_) => Ok(true),
                // Another process created it between our check and our CREATE.
                Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut));
        let _ = conn.close().await;
        match result {
            Ok(true) => {
                info!(database = name, "created database in the embedded PostgreSQL");
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(source) => Err(EmbeddedError::Database { context: format!("creating database {name:?} in the embedded PostgreSQL"), source }),
        }
    }

    /// A libpq connection URI for humans, e.g. for `psql`:
    /// `postgresql:///wardcall?host=/var/lib/wardcall/postgres&port=5432&user=postgres`
    /// (components percent-encoded; libpq reads a `host` starting with `/` as a socket
    /// directory, §34.1.1). Only root and the account PostgreSQL runs as can connect.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql:///{}?host={}&port={}&user={}",
            percent_encode(database.as_bytes(), false),
            percent_encode(self.socket_dir.as_os_str().as_bytes(), true),
            self.port,
            SUPERUSER
        )
    }

    /// Stops the server: `pg_ctl stop -m fast -w -t 60` (aborts open transactions,
    /// writes a shutdown checkpoint); if that fails, `-m immediate -t 30` (crash
    /// recovery on next start, no committed data lost since fsync is on). See §19.5
    /// "Shutting Down the Server".
    ///
    /// Stops the server whether this handle started it or reused it, except when another
    /// live [`EmbeddedCluster`] handle, in this or another process, still uses it: then
    /// it is left running and `Ok(())` returned (the last user stops it). Idempotent: a
    /// second call, or a call when the server is already down, returns `Ok(())`.
    /// Serialised with [`start`](Self::start) through the same lock file.
    ///
    /// # Errors
    /// [`Stop`](EmbeddedError::Stop) if the server is still running after both attempts
    /// (the handle then still counts as a user, so `stop` may be retried);
    /// [`LockTimeout`](EmbeddedError::LockTimeout); [`Io`](EmbeddedError::Io).
    pub async fn stop(&self) -> Result<(), EmbeddedError> {
        let mut in_use = self.in_use.lock().await;
        let Some(shared) = in_use.take() else {
            debug!(data_dir = %self.paths.data_dir.display(), "embedded PostgreSQL already stopped by this handle");
            return Ok(());
        };
        let start_lock = match acquire_lock(&self.paths.lock, LockKind::Exclusive).await {
            Ok(lock) => lock,
            Err(e) => {
                *in_use = Some(shared);
                return Err(e);
            }
        };
        drop(shared);
        // Under the start lock nobody can begin using the cluster, so if an exclusive
        // lock on the users file is refused, some other live handle holds it shared.
        let others = match open_lock_file(&self.paths.users) {
            Ok(file) => match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(sole) => {
                    drop(sole);
                    false
                }
                Err((_, e)) if e == Errno::EWOULDBLOCK => true,
                Err((_, e)) => {
                    warn!("cannot tell whether other processes use the embedded PostgreSQL ({e}); stopping it anyway");
                    false
                }
            },
            Err(e) => {
                warn!("cannot tell whether other processes use the embedded PostgreSQL ({e}); stopping it anyway");
                false
            }
        };
        if others {
            info!(
                data_dir = %self.paths.data_dir.display(),
                "leaving the embedded PostgreSQL running: another wardcall handle still uses it and will stop it"
            );
            return Ok(());
        }
        let result = self.shutdown().await;
        if result.is_err() {
            if let Ok(lock) = try_lock_now(&self.paths.users, LockKind::Shared) {
                *in_use = Some(lock);
            }
        }
        drop(start_lock);
        result
    }

    /// Canonical data directory (symbolic links resolved): where the cluster really
    /// is, which differs from the requested path when it was relocated.
    pub fn data_dir(&self) -> &Path {
        &self.paths.data_dir
    }

    /// The canonical requested data directory when the cluster was placed elsewhere
    /// because the server's account cannot reach it (see "Running as root" in the
    /// module documentation); `None` when the cluster is where it was requested.
    pub fn relocated_from(&self) -> Option<&Path> {
        self.paths.relocated_from.as_ref().map(|(p, _)| p.as_path())
    }

    /// Directory holding the socket `.s.PGSQL.<port>`: the data directory, or
    /// `/tmp/wardcall-pg-<hash>` when that path would be too long (see module docs).
    /// For a reused server, the directory it actually listens in (from `postmaster.pid`).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// Directory of the `initdb`, `pg_ctl` and `postgres` binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Major version of those binaries and of the cluster (e.g. 15).
    pub fn server_version(&self) -> u32 {
        self.server_version
    }

    /// Port number naming the socket file; [`DEFAULT_PORT`] unless a reused server says otherwise.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The account PostgreSQL runs as when wardcall runs as root; `None` when it runs as
    /// wardcall's own user.
    pub fn run_as(&self) -> Option<&SystemUser> {
        self.run_as.as_ref()
    }

    /// `true` if this handle launched the server, `false` if it reused one already
    /// running (for instance left by a killed wardcall). Informational: [`stop`](Self::stop)
    /// behaves the same either way.
    pub fn started_by_us(&self) -> bool {
        self.started_by_us
    }

    async fn shutdown(&self) -> Result<(), EmbeddedError> {
        let data_dir = &self.paths.data_dir;
        if !server_running(data_dir)? {
            debug!(data_dir = %data_dir.display(), "embedded PostgreSQL is not running; nothing to stop");
            return Ok(());
        }
        let run_as = self.run_as.as_ref();
        let fast = pg_ctl_stop(&self.bin_dir, run_as, data_dir, "fast", FAST_STOP_TIMEOUT).await?;
        if fast.is_ok() || !server_running(data_dir)? {
            info!(data_dir = %data_dir.display(), "embedded PostgreSQL stopped");
            return Ok(());
        }
        let fast_error = fast.unwrap_err();
        warn!(
            data_dir = %data_dir.display(),
            "fast shutdown failed ({fast_error}); trying immediate shutdown (crash recovery will run at the next start)"
        );
        let immediate = pg_ctl_stop(&self.bin_dir, run_as, data_dir, "immediate", IMMEDIATE_STOP_TIMEOUT).await?;
        if immediate.is_ok() || !server_running(data_dir)? {
            warn!(data_dir = %data_dir.display(), "embedded PostgreSQL stopped by immediate shutdown");
            return Ok(());
        }
        Err(EmbeddedError::Stop { data_dir: data_dir.clone(), reason: format!("fast shutdown: {fast_error}; immediate shutdown: {}", immediate.unwrap_err()) })
    }
}

// ---------------------------------------------------------------------------
// Binaries

fn bin_dir_candidates() -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut found: Vec<PathBuf> = Vec::new();
    let mut searched = Vec::new();
    let consider = |dir: PathBuf, found: &mut Vec<PathBuf>| {
        if let Some(dir) = installation_dir(&dir) {
            if !found.contains(&dir) {
                found.push(dir);
            }
        }
    };
    if let Some(path) = std::env::var_os("PATH") {
        // Relative entries would resolve against the working directory: never as root.
        for dir in std::env::split_paths(&path).filter(|d| d.is_absolute()) {
            searched.push(dir.clone());
            consider(dir, &mut found);
        }
    }
    let versioned: [(&str, &str, &str, Option<&str>); 3] = [
        ("/usr/lib/postgresql/*/bin", "/usr/lib/postgresql", "", Some("bin")),
        ("/usr/pgsql-*/bin", "/usr", "pgsql-", Some("bin")),
        ("/usr/libexec/postgresql*", "/usr/libexec", "postgresql", None),
    ];
    for (pattern, base, prefix, suffix) in versioned {
        searched.push(PathBuf::from(pattern));
        for dir in versioned_dirs(Path::new(base), prefix) {
            consider(suffix.map_or_else(|| dir.clone(), |s| dir.join(s)), &mut found);
        }
    }
    let source_build = PathBuf::from("/usr/local/pgsql/bin");
    searched.push(source_build.clone());
    consider(source_build, &mut found);
    (found, searched)
}

/// Entries `<base>/<prefix><version>` (version like `15` or `9.6`), newest first.
fn versioned_dirs(base: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(base) else { return Vec::new() };
    let mut dirs: Vec<(Vec<u32>, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let version = parse_version(name.to_str()?.strip_prefix(prefix)?)?;
            Some((version, e.path()))
        })
        .collect();
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    dirs.into_iter().map(|(_, p)| p).collect()
}

fn parse_version(s: &str) -> Option<Vec<u32>> {
    if s.is_empty() {
        return None;
    }
    s.split('.').map(|part| part.parse().ok()).collect()
}

/// `dir` if it holds executable `initdb`, `pg_ctl` and `postgres`. When all three are
/// symbolic links into one directory (e.g. `/usr/local/bin/pg_ctl ->
/// /usr/lib/postgresql/15/bin/pg_ctl`), that directory: the real installation, which
/// is also where `pg_ctl` and `initdb` look for `postgres`.
fn installation_dir(dir: &Path) -> Option<PathBuf> {
    let mut real_dirs = Vec::new();
    for name in ["initdb", "pg_ctl", "postgres"] {
        let path = dir.join(name);
        let meta = fs::metadata(&path).ok()?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return None;
        }
        real_dirs.push(fs::canonicalize(&path).ok()?.parent()?.to_path_buf());
    }
    real_dirs.dedup();
    match real_dirs.as_slice() {
        [real] => Some(real.clone()),
        _ => Some(dir.to_path_buf()),
    }
}

/// Major version from `postgres --version` output, e.g.
/// "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" → 15.
fn parse_server_version(output: &str) -> Option<u32> {
    let rest = &output[output.find("(PostgreSQL) ")? + "(PostgreSQL) ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

async fn server_version(bin_dir: &Path) -> Result<u32, EmbeddedError> {
    let program = bin_dir.join("postgres");
    let out = tokio::process::Command::new(&program)
        .arg("--version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io_err(format!("running {} --version", program.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_server_version(&text).ok_or_else(|| EmbeddedError::Io {
        context: format!("running {} --version", program.display()),
        source: io::Error::other(format!("unrecognised output {:?}", text.trim())),
    })
}

/// The newest candidate for a new cluster, or the first whose major version matches
/// the existing cluster's.
async fn choose_bin_dir(candidates: &[PathBuf], cluster_version: Option<u32>, data_dir: &Path) -> Result<(PathBuf, u32), EmbeddedError> {
    let Some(wanted) = cluster_version else {
        let dir = candidates[0].clone();
        let version = server_version(&dir).await?;
        return Ok((dir, version));
    };
    let mut available = Vec::new();
    for dir in candidates {
        match server_version(dir).await {
            Ok(v) if v == wanted => return Ok((dir.clone(), v)),
            Ok(v) => available.push(format!("{v} in {}", dir.display())),
            Err(e) => warn!("ignoring PostgreSQL binaries in {}: {e}", dir.display()),
        }
    }
    Err(EmbeddedError::VersionMismatch {
        data_dir: data_dir.to_path_buf(),
        cluster_version: wanted,
        available: if available.is_empty() { "none usable".into() } else { available.join(", ") },
    })
}

// ---------------------------------------------------------------------------
// Accounts, paths and permissions

fn server_account() -> Result<Option<SystemUser>, EmbeddedError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match User::from_name(SERVER_ACCOUNT) {
        Ok(Some(user)) if !user.uid.is_root() => Ok(Some(SystemUser { uid: user.uid.as_raw(), gid: user.gid.as_raw(), name: user.name })),
        Ok(_) => Err(EmbeddedError::NoServerAccount { account: SERVER_ACCOUNT.into() }),
        Err(errno) => Err(io_err(format!("looking up system account {SERVER_ACCOUNT}"))(errno.into())),
    }
}

/// Makes `requested` absolute and canonical, creating missing parents, and checks it.
fn resolve_paths(requested: &Path, run_as: Option<&SystemUser>) -> Result<Paths, EmbeddedError> {
    let invalid = |reason: &str| EmbeddedError::InvalidDataDir { data_dir: requested.to_path_buf(), reason: reason.into() };
    let absolute = std::path::absolute(requested).map_err(io_err(format!("resolving data directory {}", requested.display())))?;
    let (Some(name), Some(parent)) = (absolute.file_name(), absolute.parent()) else {
        return Err(invalid("it must name a directory below `/` (and not end in `..`)"));
    };
    create_parents(parent, run_as.is_some())?;
    let parent = fs::canonicalize(parent).map_err(io_err(format!("resolving directory {}", parent.display())))?;
    let joined = parent.join(name);
    let data_dir = match fs::symlink_metadata(&joined) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(&joined).map_err(|_| invalid("it is a symbolic link to a missing directory; create the target or remove the link"))?
        }
        Ok(_) => joined,
        Err(e) if e.kind() == io::ErrorKind::NotFound => joined,
        Err(e) => return Err(io_err(format!("inspecting {}", joined.display()))(e)),
    };
    if data_dir.exists() && !data_dir.is_dir() {
        return Err(invalid("it exists and is not a directory"));
    }
    check_shell_safe(&data_dir)?;
    if let Some(user) = run_as {
        match check_traversable(&data_dir, user) {
            Ok(()) => {}
            Err(not_traversable @ EmbeddedError::NotTraversable { .. }) => {
                // A cluster already there is never hidden behind a new, empty one.
                if fs::symlink_metadata(data_dir.join("PG_VERSION")).is_ok() {
                    return Err(not_traversable);
                }
                let why = match &not_traversable {
                    EmbeddedError::NotTraversable { dir, mode, .. } => {
                        format!("{} has mode {mode:o}", dir.display())
                    }
                    _ => not_traversable.to_string(),
                };
                let relocated = match relocate(Path::new(RELOCATION_BASE), &data_dir, Some(user)) {
                    Ok(dir) => dir,
                    Err(e @ EmbeddedError::InvalidDataDir { .. }) => return Err(e),
                    Err(e) => {
                        // The original error says what to chmod; say why relocating failed.
                        warn!("cannot place the cluster under {RELOCATION_BASE} instead: {e}");
                        return Err(not_traversable);
                    }
                };
                if check_traversable(&relocated, user).is_err() {
                    return Err(not_traversable);
                }
                let mut paths = Paths::new(relocated);
                paths.relocated_from = Some((data_dir, why));
                return Ok(paths);
            }
            Err(other) => return Err(other),
        }
    }
    Ok(Paths::new(data_dir))
}

/// Where a cluster whose requested data directory the server's account cannot
/// reach is placed: `<base>/<key>`, `<key>` being [`relocation_key`] of the
/// canonical requested path (`-1`, `-2`, … appended if another path already holds
/// that name). `<base>/<name>.wardcall.requested` records the requested path; it is
/// created with `O_EXCL`, so two different requested paths never share a cluster,
/// even when started at the same moment. `base` (and its missing parents) are
/// created mode 0755 and must be a real directory owned by root (or wardcall's
/// user) that nobody else can write. The cluster directory itself is created
/// later by `initdb` (mode 0700, owned by the server's account), and its lock
/// files are its siblings, as for any data directory.
fn relocate(base: &Path, requested: &Path, run_as: Option<&SystemUser>) -> Result<PathBuf, EmbeddedError> {
    let invalid = |reason: String| EmbeddedError::InvalidDataDir { data_dir: requested.to_path_buf(), reason };
    create_parents(base, run_as.is_some())?;
    let meta = fs::symlink_metadata(base).map_err(io_err(format!("inspecting {}", base.display())))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_dir() || (meta.uid() != 0 && meta.uid() != me) || meta.mode() & 0o022 != 0 {
        return Err(invalid(format!(
            "the server's account cannot reach it, and {} (where such clusters are placed) is not a \
             directory owned by root and writable only by its owner; fix that, or choose a data \
             directory the server's account can reach",
            base.display()
        )));
    }
    let key = relocation_key(requested);
    let wanted = requested.as_os_str().as_bytes();
    for n in 0..1000u32 {
        let name = if n == 0 { key.clone() } else { format!("{key}-{n}") };
        let record = base.join(format!("{name}.wardcall.requested"));
        match OpenOptions::new().write(true).create_new(true).mode(0o644).open(&record) {
            Ok(mut file) => {
                file.write_all(wanted)
                    .and_then(|()| file.write_all(b"\n"))
                    .and_then(|()| file.sync_all())
                    .map_err(io_err(format!("writing {}", record.display())))?;
                fsync_dir(base)?;
                return Ok(base.join(name));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let recorded = fs::read(&record).map_err(io_err(format!("reading {}", record.display())))?;
                if recorded.strip_suffix(b"\n").unwrap_or(&recorded) == wanted {
                    return Ok(base.join(name));
                }
            }
            Err(e) => return Err(io_err(format!("creating {}", record.display()))(e)),
        }
    }
    Err(invalid(format!("no free cluster name for it under {}", base.display())))
}

/// Directory under which relocated clusters are placed (see [`relocation_key`]).
pub const RELOCATION_BASE: &str = "/var/lib/wardcall/relocated";

/// Name of the relocated cluster of the canonical requested data directory
/// `requested`: 16 lower-case hex digits of its 64-bit FNV-1a hash (stable across
/// releases). The cluster is `<RELOCATION_BASE>/<key>` unless another path took
/// that name first (then `<key>-1`, …; see `<key>.wardcall.requested`).
pub fn relocation_key(requested: &Path) -> String {
    format!("{:016x}", fnv1a64(requested.as_os_str().as_bytes()))
}

/// Creates missing directories down to `dir`. As root (`world_searchable`) the new
/// ones get mode 0755 whatever the umask, so the server account can pass through them.
fn create_parents(dir: &Path, world_searchable: bool) -> Result<(), EmbeddedError> {
    let mut missing = Vec::new();
    let mut current = Some(dir);
    while let Some(d) = current {
        if fs::symlink_metadata(d).is_ok() {
            break;
        }
        missing.push(d);
        current = d.parent();
    }
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {
                if world_searchable {
                    fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(io_err(format!("setting permissions of {}", d.display())))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(format!("creating directory {}", d.display()))(e)),
        }
    }
    Ok(())
}

/// pg_ctl runs the server through `/bin/sh -c "... -D \"<dir>\" ..."`: refuse
/// characters that would break out of those double quotes.
fn check_shell_safe(data_dir: &Path) -> Result<(), EmbeddedError> {
    let bad = data_dir.as_os_str().as_bytes().iter().find(|&&b| b < 0x20 || b == 0x7f || b"\"$`\\".contains(&b));
    match bad {
        None => Ok(()),
        Some(&b) => Err(EmbeddedError::InvalidDataDir {
            data_dir: data_dir.to_path_buf(),
            reason: format!(
                "its path contains {:?}, which pg_ctl cannot pass safely through /bin/sh; choose a path without \", $, `, \\ or control characters",
                char::from(b)
            ),
        }),
    }
}

fn check_traversable(data_dir: &Path, user: &SystemUser) -> Result<(), EmbeddedError> {
    let groups: Vec<u32> = CString::new(user.name.as_str())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, Gid::from_raw(user.gid)).ok())
        .map(|gs| gs.into_iter().map(Gid::as_raw).collect())
        .unwrap_or_else(|| vec![user.gid]);
    for dir in data_dir.ancestors().skip(1) {
        let meta = fs::metadata(dir).map_err(io_err(format!("inspecting {}", dir.display())))?;
        if !may_search(meta.uid(), meta.gid(), meta.mode(), user.uid, &groups) {
            return Err(EmbeddedError::NotTraversable { dir: dir.to_path_buf(), account: user.name.clone(), mode: meta.mode() & 0o7777 });
        }
    }
    Ok(())
}

/// Search (x) permission by the classic owner/group/other rule (ACLs not considered).
fn may_search(owner: u32, group: u32, mode: u32, uid: u32, groups: &[u32]) -> bool {
    if owner == uid {
        mode & 0o100 != 0
    } else if groups.contains(&group) {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// Gives `root` and everything below it (not following symbolic links) to `user`.
fn chown_tree(root: &Path, user: &SystemUser) -> Result<(), EmbeddedError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(format!("inspecting {}", path.display()))(e)),
        };
        if meta.uid() != user.uid || meta.gid() != user.gid {
            std::os::unix::fs::lchown(&path, Some(user.uid), Some(user.gid)).map_err(io_err(format!(
                "changing the owner of {} to {}",
                path.display(),
                user.name
            )))?;
        }
        if meta.is_dir() {
            let entries = fs::read_dir(&path).map_err(io_err(format!("reading directory {}", path.display())))?;
            for entry in entries {
                let entry = entry.map_err(io_err(format!("reading directory {}", path.display())))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(())
}

/// Ensures `dir` is a private (0700) directory owned by the server account, creating it
/// if needed. Used for the `/tmp` socket directory, whose predictable name anyone
/// could have taken first.
fn prepare_private_dir(dir: &Path, run_as: Option<&SystemUser>) -> Result<(), EmbeddedError> {
    let unsafe_dir = |reason: String| EmbeddedError::UnsafeSocketDir { dir: dir.to_path_buf(), reason };
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            if let Some(user) = run_as {
                std::os::unix::fs::lchown(dir, Some(user.uid), Some(user.gid)).map_err(io_err(format!("changing the owner of {}", dir.display())))?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(format!("creating socket directory {}", dir.display()))(e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(io_err(format!("inspecting {}", dir.display())))?;
    if !meta.file_type().is_dir() {
        return Err(unsafe_dir("it exists and is not a directory (or is a symbolic link)".into()));
    }
    let expected = run_as.map_or_else(|| nix::unistd::geteuid().as_raw(), |u| u.uid);
    if meta.uid() != expected {
        return Err(unsafe_dir(format!("it is owned by uid {} instead of uid {expected}, the account PostgreSQL runs as", meta.uid())));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(format!("setting permissions of {}", dir.display())))?;
    }
    Ok(())
}

/// The socket directory for `data_dir`: itself when `<data_dir>/.s.PGSQL.<port>` fits
/// in [`MAX_SOCKET_PATH_LEN`] and the path is plain, else `/tmp/wardcall-pg-<fnv1a64>`.
fn socket_dir_for(data_dir: &Path, port: u16) -> PathBuf {
    let bytes = data_dir.as_os_str().as_bytes();
    let socket_len = bytes.len() + "/.s.PGSQL.".len() + port.to_string().len();
    let plain = bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b"/._-+@=:~%".contains(&b));
    if socket_len <= MAX_SOCKET_PATH_LEN && plain {
        data_dir.to_path_buf()
    } else {
        PathBuf::from(format!("{SOCKET_FALLBACK_PREFIX}{:016x}", fnv1a64(bytes)))
    }
}

/// 64-bit FNV-1a: stable across Rust releases, unlike `DefaultHasher`.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

// ---------------------------------------------------------------------------
// Cluster creation and configuration

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataDirState {
    Empty,
    InterruptedInitdb,
    Initialized { version: u32 },
}

fn inspect_data_dir(paths: &Paths) -> Result<DataDirState, EmbeddedError> {
    let data_dir = &paths.data_dir;
    if fs::symlink_metadata(&paths.initdb_marker).is_ok() {
        return Ok(DataDirState::InterruptedInitdb);
    }
    let mut entries = match fs::read_dir(data_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DataDirState::Empty),
        Err(e) => return Err(io_err(format!("reading data directory {}", data_dir.display()))(e)),
    };
    if entries.next().is_none() {
        return Ok(DataDirState::Empty);
    }
    let invalid = |reason: String| EmbeddedError::InvalidDataDir { data_dir: data_dir.clone(), reason };
    let version = match fs::read_to_string(data_dir.join("PG_VERSION")) {
        Ok(text) => text
            .trim()
            .split('.')
            .next()
            .and_then(|major| major.parse::<u32>().ok())
            .ok_or_else(|| invalid(format!("its PG_VERSION file is unreadable ({:?})", text.trim())))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(invalid(
                "it is not empty and is not a PostgreSQL data directory (no PG_VERSION); wardcall \
                 will not touch other files: point it at a new or empty directory"
                    .into(),
            ))
        }
        Err(e) => return Err(io_err(format!("reading {}/PG_VERSION", data_dir.display()))(e)),
    };
    if !data_dir.join("postgresql.conf").exists() {
        return Err(invalid(
            "it has no postgresql.conf, so it looks like a cluster managed by the distribution \
             (pg_ctlcluster, configuration under /etc); wardcall only runs clusters it created: \
             set `database_url` to use that server instead"
                .into(),
        ));
    }
    Ok(DataDirState::Initialized { version })
}

fn clear_dir_contents(dir: &Path) -> Result<(), EmbeddedError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("reading {}", dir.display()))(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_err(format!("reading {}", dir.display())))?.path();
        let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        let removed = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        removed.map_err(io_err(format!("removing {}", path.display())))?;
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> Result<(), EmbeddedError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(format!("syncing directory {}", dir.display())))
}

/// Runs initdb under the interrupted-initdb marker (see [`inspect_data_dir`]).
async fn init_cluster(paths: &Paths, bin_dir: &Path, run_as: Option<&SystemUser>) -> Result<(), EmbeddedError> {
    let data_dir = paths.data_dir.clone();
    info!(data_dir = %data_dir.display(), "creating the embedded PostgreSQL cluster (initdb)");
    {
        let (paths, run_as) = (paths.clone(), run_as.cloned());
        blocking(move || {
            let marker = &paths.initdb_marker;
            let mut file = File::create(marker)
                .map_err(io_err(format!("creating {} (wardcall needs write access to the directory containing the data directory)", marker.display())))?;
            writeln!(file, "initdb started by wardcall pid {}", std::process::id())
                .and_then(|()| file.sync_all())
                .map_err(io_err(format!("writing {}", marker.display())))?;
            let parent = paths.data_dir.parent().unwrap_or(Path::new("/"));
            fsync_dir(parent)?;
            match fs::DirBuilder::new().mode(0o700).create(&paths.data_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(format!("creating data directory {}", paths.data_dir.display()))(e)),
            }
            if let Some(user) = &run_as {
                chown_tree(&paths.data_dir, user)?;
            }
            Ok(())
        })
        .await?;
    }
    let args: Vec<OsString> = vec![
        "-D".into(),
        data_dir.clone().into(),
        "-U".into(),
        SUPERUSER.into(),
        "--encoding=UTF8".into(),
        "--locale=C".into(),
        "--data-checksums".into(),
        "--auth-local=trust".into(),
        "--auth-host=reject".into(),
    ];
    let failed = |status: String, output: String| EmbeddedError::Initdb { data_dir: data_dir.clone(), status, output };
    match run_tool(bin_dir, run_as, "initdb", &args, INITDB_TIMEOUT).await? {
        Some(out) if out.status.success() => {}
        Some(out) => return Err(failed(out.status.to_string(), output_text(&out))),
        None => return Err(failed(format!("timed out after {}s", INITDB_TIMEOUT.as_secs()), String::new())),
    }
    let paths = paths.clone();
    blocking(move || {
        ensure_include(&paths.data_dir)?;
        fs::remove_file(&paths.initdb_marker).map_err(io_err(format!("removing {}", paths.initdb_marker.display())))?;
        fsync_dir(paths.data_dir.parent().unwrap_or(Path::new("/")))
    })
    .await
}

/// Contents of `wardcall.conf`. `socket_dir` is plain (see [`socket_dir_for`]) but is
/// quoted properly anyway. `server_version` is the major version: settings that
/// appeared in PostgreSQL 13 are written only for 13 and later (an unknown
/// setting stops the server from starting).
///
/// Privacy (ARCHITECTURE.md, "No patient data on error paths"): the server log
/// must not hold the values that statements carry or that errors quote. From
/// §20.8 "Error Reporting and Logging" of the PostgreSQL 15 manual:
/// * `log_min_messages = log`: WARNING and ERROR reports are not written (the
///   client, wardcall, receives them and logs them redacted); LOG, FATAL and
///   PANIC (start, stop, checkpoints, crashes) still are. An ERROR's primary
///   message can quote a value (`invalid input syntax for type uuid: "…"`), so
///   verbosity alone would not do.
/// * `log_error_verbosity = terse`: no DETAIL (`Key (patient_id)=(…)`), HINT,
///   QUERY or CONTEXT on what is written.
/// * `log_min_error_statement = panic`: never the text of a failing statement.
/// * `log_statement = 'none'`, `log_duration = off`, `log_min_duration_statement = -1`,
///   (13+) `log_min_duration_sample = -1`, `log_parameter_max_length = 0`,
///   `log_parameter_max_length_on_error = 0`: no statement texts or bind
///   parameters, whatever their duration.
fn render_conf(socket_dir: &Path, port: u16, server_version: u32) -> String {
    let socket = socket_dir.to_string_lossy().replace('\'', "''");
    let since_13 = if server_version >= 13 {
        "log_min_duration_sample = -1\n\
         log_parameter_max_length = 0\n\
         log_parameter_max_length_on_error = 0\n"
    } else {
        ""
    };
    format!(
        "# Written by wardcall before every start of its embedded PostgreSQL; edits here are lost.\n\
         # Tune this cluster with ALTER SYSTEM (postgresql.auto.conf), which takes precedence.\n\
         listen_addresses = ''\n\
         port = {port}\n\
         unix_socket_directories = '{socket}'\n\
         unix_socket_permissions = 0700\n\
         max_connections = 200\n\
         shared_buffers = '128MB'\n\
         fsync = on\n\
         synchronous_commit = on\n\
         full_page_writes = on\n\
         logging_collector = on\n\
         log_directory = '{LOG_DIR}'\n\
         log_filename = 'postgresql-%a.log'\n\
         log_truncate_on_rotation = on\n\
         log_rotation_age = '1d'\n\
         log_rotation_size = 0\n\
         # Privacy: no values from statements or errors in the server log (see wardcall's ARCHITECTURE.md).\n\
         log_min_messages = log\n\
         log_error_verbosity = terse\n\
         log_min_error_statement = panic\n\
         log_statement = 'none'\n\
         log_duration = off\n\
         log_min_duration_statement = -1\n\
         {since_13}"
    )
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename), mode 0600;
/// does nothing when the file already has those contents.
fn write_file_atomically(path: &Path, contents: &str) -> Result<(), EmbeddedError> {
    if fs::read_to_string(path).is_ok_and(|existing| existing == contents) {
        return Ok(());
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    written.map_err(io_err(format!("writing {}", path.display())))?;
    fsync_dir(path.parent().unwrap_or(Path::new("/")))
}

/// Appends `include = 'wardcall.conf'` to `postgresql.conf` unless present.
fn ensure_include(data_dir: &Path) -> Result<(), EmbeddedError> {
    let conf = data_dir.join("postgresql.conf");
    let text = fs::read_to_string(&conf).map_err(io_err(format!("reading {}", conf.display())))?;
    if text.lines().any(|line| line.trim() == INCLUDE_LINE) {
        return Ok(());
    }
    OpenOptions::new()
        .append(true)
        .open(&conf)
        .and_then(|mut f| {
            write!(f, "\n# Added by wardcall: settings of its embedded cluster, rewritten before every start.\n{INCLUDE_LINE}\n")?;
            f.sync_all()
        })
        .map_err(io_err(format!("adding `{INCLUDE_LINE}` to {}", conf.display())))
}

// ---------------------------------------------------------------------------
// Server processes

#[derive(Debug, Clone, PartialEq, Eq)]
struct PidFile {
    pid: i32,
    port: Option<u16>,
    socket_dir: Option<PathBuf>,
    status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PidFileState {
    Missing,
    Unreadable,
    Present(PidFile),
}

/// Parses `postmaster.pid`: line 1 PID (negative for a single-user backend), 4 port,
/// 5 first socket directory, 8 status (`starting`, `ready`, `stopping`, `standby`).
fn parse_pid_file(text: &str) -> Option<PidFile> {
    let lines: Vec<&str> = text.lines().collect();
    let pid = lines.first()?.trim().parse::<i32>().ok().filter(|&p| p != 0)?.checked_abs()?;
    let field = |i: usize| lines.get(i).map(|l| l.trim()).filter(|l| !l.is_empty());
    Some(PidFile { pid, port: field(3).and_then(|p| p.parse().ok()), socket_dir: field(4).map(PathBuf::from), status: field(7).map(str::to_owned) })
}

fn read_pid_file(data_dir: &Path) -> Result<PidFileState, EmbeddedError> {
    let path = data_dir.join(PID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(parse_pid_file(&text).map_or(PidFileState::Unreadable, PidFileState::Present)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PidFileState::Missing),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(PidFileState::Unreadable),
        Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    /// No such process.
    Gone,
    /// Exited but not reaped (its parent, often PID 1 in containers, has not waited).
    Zombie,
    /// Alive but not a PostgreSQL server process of this data directory (PID reused).
    Unrelated,
    /// A PostgreSQL process of this data directory (or, without /proc, any live process).
    Server,
}

/// `(comm, state)` from the contents of `/proc/<pid>/stat`.
fn parse_proc_stat(stat: &str) -> Option<(&str, char)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let state = stat.get(close + 1..)?.trim_start().chars().next()?;
    Some((comm, state))
}

fn is_server_comm(comm: &str) -> bool {
    comm == "postgres" || comm == "postmaster"
}

fn classify_pid(pid: i32, data_dir: &Path) -> ProcState {
    if !Path::new("/proc/self/stat").exists() {
        // No procfs: fall back to PostgreSQL's own test (signal 0).
        return match nix::sys::signal::kill(Pid::from_raw(pid), None) {
            Ok(()) | Err(Errno::EPERM) => ProcState::Server,
            Err(_) => ProcState::Gone,
        };
    }
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = fs::read_to_string(dir.join("stat")) else { return ProcState::Gone };
    match parse_proc_stat(&stat) {
        Some((_, 'Z' | 'X' | 'x')) => ProcState::Zombie,
        Some((comm, _)) if !is_server_comm(comm) => ProcState::Unrelated,
        // The postmaster and all its children run with the data directory as working directory.
        _ => match fs::read_link(dir.join("cwd")) {
            Ok(cwd) if cwd != data_dir => ProcState::Unrelated,
            _ => ProcState::Server,
        },
    }
}

/// Live PostgreSQL processes whose working directory is `data_dir` (Linux; empty elsewhere).
fn server_processes(data_dir: &Path) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let own = std::process::id();
    let mut pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| u32::try_from(pid).is_ok_and(|p| p != own))
        .filter(|&pid| {
            let dir = PathBuf::from(format!("/proc/{pid}"));
            let stat = fs::read_to_string(dir.join("stat")).unwrap_or_default();
            matches!(parse_proc_stat(&stat), Some((comm, state)) if is_server_comm(comm) && !matches!(state, 'Z' | 'X' | 'x'))
                && fs::read_link(dir.join("cwd")).is_ok_and(|cwd| cwd == data_dir)
        })
        .collect();
    pids.sort_unstable();
    pids
}

fn server_running(data_dir: &Path) -> Result<bool, EmbeddedError> {
    Ok(match read_pid_file(data_dir)? {
        PidFileState::Missing => false,
        PidFileState::Present(pf) => classify_pid(pf.pid, data_dir) == ProcState::Server,
        PidFileState::Unreadable => !server_processes(data_dir).is_empty(),
    })
}

/// Reuses the server running on the data directory, or starts one.
/// Returns `(socket_dir, port, started_by_us)`.
async fn bring_up(paths: &Paths, bin_dir: &Path, server_version: u32, run_as: Option<&SystemUser>) -> Result<(PathBuf, u16, bool), EmbeddedError> {
    let data_dir = &paths.data_dir;
    let deadline = Instant::now() + START_TIMEOUT;
    let mut announced = false;
    let stale = loop {
        let problem = match read_pid_file(data_dir)? {
            PidFileState::Missing => break None,
            PidFileState::Unreadable if server_processes(data_dir).is_empty() => {
                warn!(data_dir = %data_dir.display(), "postmaster.pid is empty or corrupt and no server runs; removing it");
                break Some(None);
            }
            PidFileState::Unreadable => "postmaster.pid is unreadable while PostgreSQL processes run on this data directory".to_owned(),
            PidFileState::Present(pf) => match classify_pid(pf.pid, data_dir) {
                ProcState::Gone => {
                    info!(
                        data_dir = %data_dir.display(),
                        "stale postmaster.pid (process {} no longer exists): PostgreSQL was killed or crashed; starting it (crash recovery)",
                        pf.pid
                    );
                    break None;
                }
                ProcState::Zombie | ProcState::Unrelated => {
                    info!(
                        data_dir = %data_dir.display(),
                        "stale postmaster.pid (process {} is not a running server of this cluster); removing it and starting PostgreSQL (crash recovery)",
                        pf.pid
                    );
                    break Some(Some(pf));
                }
                ProcState::Server => {
                    let status = pf.status.clone().unwrap_or_else(|| "unknown".into());
                    match (&pf.socket_dir, pf.port) {
                        (Some(socket_dir), Some(port)) if status == "ready" => match probe(socket_dir, port, data_dir).await {
                            Ok(()) => {
                                info!(
                                    data_dir = %data_dir.display(),
                                    "reusing the PostgreSQL server (pid {}) already running on the data directory",
                                    pf.pid
                                );
                                refresh_settings(data_dir, socket_dir, port, server_version, run_as).await;
                                return Ok((socket_dir.clone(), port, false));
                            }
                            Err(e) => format!("server pid {} is ready but does not answer: {e}", pf.pid),
                        },
                        (None, _) if status == "ready" => format!("server pid {} listens on no Unix socket", pf.pid),
                        _ => format!("server pid {} has status `{status}`", pf.pid),
                    }
                }
            },
        };
        if !announced {
            info!(
                data_dir = %data_dir.display(),
                "waiting up to {}s for the PostgreSQL server already running on the data directory: {problem}",
                START_TIMEOUT.as_secs()
            );
            announced = true;
        }
        if Instant::now() >= deadline {
            return Err(EmbeddedError::Start {
                data_dir: data_dir.clone(),
                reason: format!(
                    "a PostgreSQL server runs on this data directory but did not accept connections within {}s ({problem}); \
                     if it is hung, stop it (`pg_ctl stop -D {} -m immediate` as the account that runs it) and start wardcall again",
                    START_TIMEOUT.as_secs(),
                    data_dir.display()
                ),
                log_tail: log_tail(data_dir),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    let (socket_dir, port) = launch(paths, bin_dir, server_version, run_as, stale).await?;
    Ok((socket_dir, port, true))
}

/// Rewrites `wardcall.conf` of a reused server (one started by an older wardcall may
/// lack settings, e.g. the privacy settings of [`render_conf`]) and makes the server
/// reload it (`pg_reload_conf()`; the logging settings take effect on reload,
/// §20.1.2 of the PostgreSQL 15 manual). A failure is logged, not fatal: the server
/// works as it is.
async fn refresh_settings(data_dir: &Path, socket_dir: &Path, port: u16, server_version: u32, run_as: Option<&SystemUser>) {
    let (dir, socket, user) = (data_dir.to_path_buf(), socket_dir.to_path_buf(), run_as.cloned());
    let written = blocking(move || {
        let conf = dir.join(CONF_FILE);
        write_file_atomically(&conf, &render_conf(&socket, port, server_version))?;
        if let Some(user) = &user {
            std::os::unix::fs::lchown(&conf, Some(user.uid), Some(user.gid)).map_err(io_err(format!("changing the owner of {}", conf.display())))?;
        }
        Ok(())
    })
    .await;
    let reloaded = match written {
        Err(e) => Err(e.to_string()),
        Ok(()) => match maintenance_connection(socket_dir, port).await {
            Err(e) => Err(e.to_string()),
            Ok(mut conn) => {
                let r = sqlx::query("SELECT pg_reload_conf()").execute(&mut conn).await.map(|_| ()).map_err(|e| e.to_string());
                let _ = conn.close().await;
                r
            }
        },
    };
    if let Err(e) = reloaded {
        warn!(data_dir = %data_dir.display(), "could not refresh the settings of the reused PostgreSQL server: {e}");
    }
}

/// Waits until no orphaned server process of a dead postmaster remains.
async fn wait_for_orphans(data_dir: &Path) -> Result<(), EmbeddedError> {
    let started = Instant::now();
    loop {
        let pids = server_processes(data_dir);
        if pids.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= ORPHAN_TIMEOUT {
            return Err(EmbeddedError::StaleServerProcesses { data_dir: data_dir.to_path_buf(), pids });
        }
        if started.elapsed() < POLL_INTERVAL {
            info!(?pids, "waiting for leftover processes of a dead PostgreSQL server to exit");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Removes a stale `postmaster.pid` (and the matching socket lock file) that PostgreSQL
/// would refuse to override because its PID looks alive (zombie or reused PID).
fn remove_stale_files(data_dir: &Path, stale: Option<&PidFile>) -> Result<(), EmbeddedError> {
    let pid_path = data_dir.join(PID_FILE);
    match fs::remove_file(&pid_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("removing stale {}", pid_path.display()))(e)),
    }
    let Some(PidFile { pid, port: Some(port), socket_dir: Some(socket_dir), .. }) = stale else {
        return Ok(());
    };
    let socket = socket_dir.join(format!(".s.PGSQL.{port}"));
    let lock = socket_dir.join(format!(".s.PGSQL.{port}.lock"));
    let owner = fs::read_to_string(&lock).ok().and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
    if owner.map(i32::abs) == Some(*pid) {
        for path in [&lock, &socket] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing stale {}", path.display()))(e)),
            }
        }
    }
    Ok(())
}

/// Starts the server with `pg_ctl start -w`. `stale`: `Some` when a stale
/// `postmaster.pid` must be removed first.
async fn launch(
    paths: &Paths,
    bin_dir: &Path,
    server_version: u32,
    run_as: Option<&SystemUser>,
    stale: Option<Option<PidFile>>,
) -> Result<(PathBuf, u16), EmbeddedError> {
    let data_dir = &paths.data_dir;
    wait_for_orphans(data_dir).await?;
    let port = DEFAULT_PORT;
    let socket_dir = socket_dir_for(data_dir, port);
    if socket_dir != *data_dir {
        info!(
            data_dir = %data_dir.display(),
            "the data directory path is too long (or unusual) for a Unix socket path; using socket directory {}",
            socket_dir.display()
        );
    }
    {
        let (dir, socket_dir, run_as) = (data_dir.clone(), socket_dir.clone(), run_as.cloned());
        blocking(move || {
            if let Some(stale) = stale {
                remove_stale_files(&dir, stale.as_ref())?;
            }
            if socket_dir != dir {
                prepare_private_dir(&socket_dir, run_as.as_ref())?;
            }
            write_file_atomically(&dir.join(CONF_FILE), &render_conf(&socket_dir, port, server_version))?;
            ensure_include(&dir)?;
            let log_dir = dir.join(LOG_DIR);
            match fs::DirBuilder::new().mode(0o700).create(&log_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(format!("creating {}", log_dir.display()))(e)),
            }
            if let Some(user) = &run_as {
                chown_tree(&dir, user)?;
            }
            Ok(())
        })
        .await?;
    }
    let args: Vec<OsString> = vec![
        "start".into(),
        "-D".into(),
        data_dir.clone().into(),
        "-w".into(),
        "-t".into(),
        START_TIMEOUT.as_secs().to_string().into(),
        "-l".into(),
        data_dir.join(LOG_DIR).join(STARTUP_LOG).into(),
    ];
    let start_failed = |reason: String| EmbeddedError::Start { data_dir: data_dir.clone(), reason, log_tail: log_tail(data_dir) };
    match run_tool(bin_dir, run_as, "pg_ctl", &args, START_TIMEOUT + Duration::from_secs(30)).await? {
        Some(out) if out.status.success() => {}
        Some(out) => return Err(start_failed(format!("pg_ctl start failed ({}): {}", out.status, output_text(&out)))),
        None => return Err(start_failed("pg_ctl start did not return in time".into())),
    }
    let (socket_dir, port) = match read_pid_file(data_dir)? {
        PidFileState::Present(pf) => (pf.socket_dir.unwrap_or(socket_dir), pf.port.unwrap_or(port)),
        _ => (socket_dir, port),
    };
    probe(&socket_dir, port, data_dir).await.map_err(|e| {
        start_failed(format!("the server started but does not accept connections on {}: {e}", socket_dir.join(format!(".s.PGSQL.{port}")).display()))
    })?;
    Ok((socket_dir, port))
}

async fn pg_ctl_stop(bin_dir: &Path, run_as: Option<&SystemUser>, data_dir: &Path, mode: &str, timeout: Duration) -> Result<Result<(), String>, EmbeddedError> {
    let args: Vec<OsString> =
        vec!["stop".into(), "-D".into(), data_dir.into(), "-m".into(), mode.into(), "-w".into(), "-t".into(), timeout.as_secs().to_string().into()];
    Ok(match run_tool(bin_dir, run_as, "pg_ctl", &args, timeout + Duration::from_secs(30)).await? {
        Some(out) if out.status.success() => Ok(()),
        Some(out) => Err(format!("pg_ctl stop -m {mode} failed ({}): {}", out.status, output_text(&out))),
        None => Err(format!("pg_ctl stop -m {mode} did not return in time")),
    })
}

/// Runs `<bin_dir>/<program>` as `run_as` (if set) from `/`, without the caller's `PG*`
/// environment variables. `Ok(None)` on timeout (the process is killed).
async fn run_tool(bin_dir: &Path, run_as: Option<&SystemUser>, program: &str, args: &[OsString], timeout: Duration) -> Result<Option<Output>, EmbeddedError> {
    let path = bin_dir.join(program);
    let mut cmd = tokio::process::Command::new(&path);
    cmd.args(args).current_dir("/").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.as_bytes().starts_with(b"PG") {
            cmd.env_remove(key);
        }
    }
    if let Some(user) = run_as {
        // std drops supplementary groups (setgroups(0)) before setuid when run as root.
        cmd.uid(user.uid).gid(user.gid);
    }
    debug!(program = %path.display(), ?args, "running PostgreSQL tool");
    let child = cmd.output();
    match tokio::time::timeout(timeout, child).await {
        Ok(result) => result.map(Some).map_err(io_err(format!("running {}", path.display()))),
        Err(_) => Ok(None),
    }
}

fn output_text(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stdout.trim());
    }
    const MAX: usize = 4000;
    if text.len() > MAX {
        let mut cut = text.len() - MAX;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = format!("...{}", &text[cut..]);
    }
    text
}

/// Last lines of `log/startup.log` and of the newest `log/postgresql-*.log`.
fn log_tail(data_dir: &Path) -> String {
    let dir = data_dir.join(LOG_DIR);
    let newest = fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("postgresql-") && name.ends_with(".log")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path());
    let mut out = String::new();
    for path in std::iter::once(dir.join(STARTUP_LOG)).chain(newest) {
        if let Some(tail) = tail_lines(&path, 20) {
            let _ = writeln!(out, "--- last lines of {} ---\n{tail}", path.display());
        }
    }
    if out.is_empty() {
        out = format!("(no PostgreSQL log output in {})", dir.display());
    }
    out
}

fn tail_lines(path: &Path, lines: usize) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024))).ok()?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        return None;
    }
    Some(all[all.len().saturating_sub(lines)..].join("\n"))
}

// ---------------------------------------------------------------------------
// Connections

fn socket_connect_options(socket_dir: &Path, port: u16, database: &str) -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass()
        .socket(socket_dir)
        .port(port)
        .username(SUPERUSER)
        .database(database)
        .ssl_mode(PgSslMode::Disable)
        // Statement texts may carry data; see `crate::db::connect_pool`.
        .disable_statement_logging()
}

/// Connects to `postgres`, or to `template1` if `postgres` was dropped.
async fn maintenance_connection(socket_dir: &Path, port: u16) -> Result<PgConnection, sqlx::Error> {
    let connect = |db: &str| {
        let options = socket_connect_options(socket_dir, port, db);
        async move {
            tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
                .await
                .unwrap_or_else(|_| Err(sqlx::Error::Io(io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))))
        }
    };
    match connect("postgres").await {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => connect("template1").await,
        other => other,
    }
}

/// Connects and checks that the server on that socket serves `data_dir`.
async fn probe(socket_dir: &Path, port: u16, data_dir: &Path) -> Result<(), String> {
    let mut conn = maintenance_connection(socket_dir, port).await.map_err(|e| e.to_string())?;
    let served = tokio::time::timeout(CONNECT_TIMEOUT, sqlx::query_scalar::<_, String>("SELECT current_setting('data_directory')").fetch_one(&mut conn)).await;
    let _ = conn.close().await;
    let served = match served {
        Ok(Ok(dir)) => PathBuf::from(dir),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs())),
    };
    let served = fs::canonicalize(&served).unwrap_or(served);
    if served != data_dir {
        return Err(format!("the server on that socket serves data directory {}, not {}", served.display(), data_dir.display()));
    }
    Ok(())
}

fn validate_database_name(name: &str) -> Result<(), EmbeddedError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.contains('\0') {
        "it contains a NUL character"
    } else if name.len() > 63 {
        "it is longer than 63 bytes (PostgreSQL would truncate it)"
    } else {
        return Ok(());
    };
    Err(EmbeddedError::InvalidDatabaseName { name: name.into(), reason: reason.into() })
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn percent_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Locks

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockKind {
    Exclusive,
    Shared,
}

fn open_lock_file(path: &Path) -> Result<File, EmbeddedError> {
    // Rust opens files with O_CLOEXEC, so server processes never inherit the lock.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .or_else(|e| if e.kind() == io::ErrorKind::PermissionDenied { File::open(path) } else { Err(e) })
        .map_err(io_err(format!("opening lock file {} (wardcall needs write access to the directory containing the data directory)", path.display())))
}

fn try_lock_now(path: &Path, kind: LockKind) -> Result<Flock<File>, (Option<Errno>, EmbeddedError)> {
    let file = open_lock_file(path).map_err(|e| (None, e))?;
    let arg = match kind {
        LockKind::Exclusive => FlockArg::LockExclusiveNonblock,
        LockKind::Shared => FlockArg::LockSharedNonblock,
    };
    Flock::lock(file, arg).map_err(|(_, errno)| (Some(errno), io_err(format!("locking {}", path.display()))(errno.into())))
}

/// Takes a `flock` on `path`, polling (cancellation-safe) for up to [`LOCK_TIMEOUT`].
/// An exclusive holder records its PID in the file for diagnostics.
async fn acquire_lock(path: &Path, kind: LockKind) -> Result<Flock<File>, EmbeddedError> {
    let started = Instant::now();
    loop {
        match try_lock_now(path, kind) {
            Ok(lock) => {
                if kind == LockKind::Exclusive {
                    let mut file: &File = &lock;
                    let _ = file.set_len(0).and_then(|()| file.seek(SeekFrom::Start(0))).and_then(|_| writeln!(file, "pid {}", std::process::id()));
                }
                return Ok(lock);
            }
            Err((Some(errno), _)) if errno == Errno::EWOULDBLOCK || errno == Errno::EINTR => {
                let holder = fs::read_to_string(path).ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).unwrap_or_else(|| "unknown".into());
                if started.elapsed() >= LOCK_TIMEOUT {
                    return Err(EmbeddedError::LockTimeout { path: path.to_path_buf(), waited_secs: started.elapsed().as_secs(), holder });
                }
                if started.elapsed() < POLL_INTERVAL {
                    info!(
                        lock = %path.display(),
                        "waiting for another process ({holder}) that is starting or stopping the embedded PostgreSQL"
                    );
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            Err((_, e)) => return Err(e),
        }
    }
}

async fn blocking<T, F>(f: F) -> Result<T, EmbeddedError>
where
    F: FnOnce() -> Result<T, EmbeddedError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(EmbeddedError::Io { context: "file-system task of the embedded PostgreSQL was cancelled".into(), source: io::Error::other(e) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_sort_newest_first() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("15-common"), None);
        assert_eq!(parse_version(""), None);
        let mut v = [parse_version("9.6").unwrap(), parse_version("16").unwrap(), parse_version("10").unwrap()];
        v.sort_by(|a, b| b.cmp(a));
        assert_eq!(v, [vec![16], vec![10], vec![9, 6]]);
        assert_eq!(parse_server_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"), Some(15));
        assert_eq!(parse_server_version("postgres (PostgreSQL) 17devel"), Some(17));
        assert_eq!(parse_server_version("something else"), None);
    }

    #[test]
    fn socket_dir_falls_back_to_tmp_for_long_or_odd_paths() {
        let short = Path::new("/var/lib/wardcall/postgres");
        assert_eq!(socket_dir_for(short, 5432), short);
        // 107 - "/.s.PGSQL.5432".len() = 93 bytes is the longest data dir kept.
        let fits = PathBuf::from(format!("/{}", "a".repeat(92)));
        assert_eq!(fits.as_os_str().len(), 93);
        assert_eq!(socket_dir_for(&fits, 5432), fits);
        let long = PathBuf::from(format!("/{}", "a".repeat(93)));
        let fallback = socket_dir_for(&long, 5432);
        assert!(fallback.starts_with("/tmp"), "{fallback:?}");
        assert_eq!(fallback, socket_dir_for(&long, 5432), "stable");
        assert_ne!(fallback, socket_dir_for(&fits.join("b"), 5432), "unique per data dir");
        assert!(fallback.join(".s.PGSQL.65535").as_os_str().len() <= MAX_SOCKET_PATH_LEN);
        assert!(socket_dir_for(Path::new("/srv/my data"), 5432).starts_with("/tmp"));
        assert!(socket_dir_for(Path::new("/srv/a,b"), 5432).starts_with("/tmp"));
        // Known FNV-1a test vector.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn pid_file_and_proc_stat_parsing() {
        let text = "4242\n/var/lib/wardcall/postgres\n1700000000\n5432\n/var/lib/wardcall/postgres\n\n  5432001  32768\nready   \n";
        assert_eq!(
            parse_pid_file(text),
            Some(PidFile { pid: 4242, port: Some(5432), socket_dir: Some("/var/lib/wardcall/postgres".into()), status: Some("ready".into()) })
        );
        assert_eq!(parse_pid_file("-77\n/d\n").map(|p| (p.pid, p.status)), Some((77, None)));
        assert_eq!(parse_pid_file(""), None);
        assert_eq!(parse_pid_file("garbage\n"), None);
        assert_eq!(parse_proc_stat("12 (postgres) S 1 12 12 0"), Some(("postgres", 'S')));
        assert_eq!(parse_proc_stat("13 (a) b (c)) Z 1"), Some(("a) b (c)", 'Z')));
        assert_eq!(parse_proc_stat("nonsense"), None);
    }

    #[test]
    fn quoting_and_encoding() {
        assert_eq!(quote_ident("wardcall"), "\"wardcall\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(percent_encode(b"/tmp/wardcall-pg-00ff", true), "/tmp/wardcall-pg-00ff");
        assert_eq!(percent_encode(b"a b/c&d", false), "a%20b%2Fc%26d");
        assert!(validate_database_name("wardcall_test").is_ok());
        assert!(validate_database_name("").is_err());
        assert!(validate_database_name(&"x".repeat(64)).is_err());
        assert!(validate_database_name(&"x".repeat(63)).is_ok());
        assert!(check_shell_safe(Path::new("/var/lib/wardcall/pg data")).is_ok());
        assert!(check_shell_safe(Path::new("/var/lib/$HOME")).is_err());
        assert!(check_shell_safe(Path::new("/var/lib/a\"b")).is_err());
    }

    #[test]
    fn search_permission_rule() {
        // owner, group, other
        assert!(may_search(10, 20, 0o700, 10, &[]));
        assert!(!may_search(0, 0, 0o700, 10, &[20]));
        assert!(may_search(0, 20, 0o710, 10, &[20]));
        assert!(!may_search(0, 20, 0o701, 10, &[20]), "group bits win over other bits");
        assert!(may_search(0, 0, 0o755, 10, &[20]));
    }

    #[test]
    fn conf_has_the_durable_no_tcp_settings() {
        let conf = render_conf(Path::new("/var/lib/wardcall/postgres"), 5432, 15);
        for line in [
            "listen_addresses = ''",
            "port = 5432",
            "unix_socket_directories = '/var/lib/wardcall/postgres'",
            "unix_socket_permissions = 0700",
            "max_connections = 200",
            "shared_buffers = '128MB'",
            "fsync = on",
            "synchronous_commit = on",
            "logging_collector = on",
            "log_min_messages = log",
            "log_error_verbosity = terse",
            "log_min_error_statement = panic",
            "log_statement = 'none'",
            "log_parameter_max_length_on_error = 0",
        ] {
            assert!(conf.lines().any(|l| l == line), "missing {line:?} in\n{conf}");
        }
    }

    #[test]
    fn relocation_is_stable_and_never_shared() {
        let base = std::env::temp_dir().join(format!("wardcall-relocate-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let a = Path::new("/root/clone-a/.wardcall");
        let b = Path::new("/root/clone-b/.wardcall");
        let ra = relocate(&base, a, None).unwrap();
        assert_eq!(ra, base.join(relocation_key(a)));
        assert_eq!(relocate(&base, a, None).unwrap(), ra, "same requested path, same cluster");
        let rb = relocate(&base, b, None).unwrap();
        assert_ne!(ra, rb);
        // A hash collision (forged: another path already holds b's name) moves on.
        let c = Path::new("/root/clone-c/.wardcall");
        fs::write(base.join(format!("{}.wardcall.requested", relocation_key(c))), b"/elsewhere\n").unwrap();
        let rc = relocate(&base, c, None).unwrap();
        assert_eq!(rc, base.join(format!("{}-1", relocation_key(c))));
        assert_eq!(relocate(&base, c, None).unwrap(), rc);
        assert_eq!(fs::read(base.join(format!("{}-1.wardcall.requested", relocation_key(c)))).unwrap(), b"/root/clone-c/.wardcall\n");
        // A base others can write is refused.
        fs::set_permissions(&base, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(relocate(&base, a, None), Err(EmbeddedError::InvalidDataDir { .. })));
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn no_binaries_error_is_actionable() {
        let msg = EmbeddedError::NoServerBinaries { searched: vec!["/usr/bin".into()] }.to_string();
        for needle in ["postgresql", "apt-get install postgresql-15", "database_url", "DATABASE_URL", "/usr/bin"] {
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
        }
    }
}
