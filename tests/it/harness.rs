//! Test harness: one PostgreSQL cluster per test run (the embedded one, or the
//! server of `DATABASE_URL`), one migrated template database, and a fresh
//! database cloned from the template for every test. No fixed TCP ports: the
//! embedded cluster listens on a Unix socket, HTTP servers bind port 0.

use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{ConnectOptions, Connection};
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use wardcall::app::{App, StartOptions};
use wardcall::config::Config;
use wardcall::db::embedded::EmbeddedCluster;
use wardcall::db::Database;

pub const AUTH_TOKEN: &str = "test-auth-token";
/// The JSON API's bearer token in tests (`start_app` serves the API on the
/// app's listener behind it).
pub const API_TOKEN: &str = "test-api-token-0123456789";
pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";

/// The server every test database lives on.
pub struct Server {
    /// Connect options to the maintenance database `postgres`.
    pub admin: PgConnectOptions,
    pub cluster: Option<EmbeddedCluster>,
}

static SERVER: OnceLock<Server> = OnceLock::new();

/// The template database of this test process (several `cargo test` processes
/// may share the cluster).
pub fn template() -> String {
    format!("wardcall_it_template_{}", std::process::id())
}
static COUNTER: AtomicUsize = AtomicUsize::new(0);
/// Serialises clones of the template across the tests' runtimes.
static CLONE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the cluster (or reads `DATABASE_URL`) and builds the template. Called
/// once from `main` before any test.
pub fn init() -> &'static Server {
    SERVER.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let server = match std::env::var("DATABASE_URL") {
                Ok(url) if !url.is_empty() => Server { admin: PgConnectOptions::from_str(&url).unwrap().database("postgres"), cluster: None },
                _ => {
                    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("wardcall-it-cluster");
                    // Under a directory the server's account cannot enter (a clone
                    // under /root, run as root) the cluster is relocated (see
                    // `EmbeddedCluster::start`); the same target dir finds it again.
                    let cluster = EmbeddedCluster::start(&dir).await.expect("embedded PostgreSQL for the tests");
                    if let Some(requested) = cluster.relocated_from() {
                        eprintln!("test cluster for {} placed in {}", requested.display(), cluster.data_dir().display());
                    }
                    Server { admin: cluster.connect_options("postgres"), cluster: Some(cluster) }
                }
            };
            let mut conn = server.admin.connect().await.expect("connect to the test server");
            let template = template();
            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {template} WITH (FORCE)")).execute(&mut conn).await.unwrap();
            sqlx::raw_sql(&format!("CREATE DATABASE {template}")).execute(&mut conn).await.unwrap();
            let pool = PgPool::connect_with(server.admin.clone().database(&template)).await.unwrap();
            wardcall::db::migrate::migrate(&pool).await.expect("migrations apply");
            pool.close().await;
            server
        })
    })
}

/// Stops the embedded cluster after the last test.
pub fn finish() {
    if let Some(server) = SERVER.get() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            // Drop this run's databases, then stop the cluster (left running
            // if another test process still uses it).
            if let Ok(mut conn) = server.admin.connect().await {
                let prefix = format!("wardcall_it_{}_", std::process::id());
                let names: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1 || '%' OR datname = $2")
                    .bind(&prefix)
                    .bind(template())
                    .fetch_all(&mut conn)
                    .await
                    .unwrap_or_default();
                for name in names {
                    let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await;
                }
            }
            if let Some(c) = &server.cluster {
                let _ = c.stop().await;
            }
        });
    }
}

/// A fresh database cloned from the migrated template.
pub struct TestDb {
    pub name: String,
    pub options: PgConnectOptions,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let server = SERVER.get().expect("harness initialised");
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("wardcall_it_{}_{}", std::process::id(), n);
        let mut conn = server.admin.connect().await.unwrap();
        // CREATE DATABASE … TEMPLATE needs the template free of other sessions,
        // including another clone in progress: clones are taken one at a time.
        {
            let _one_at_a_time = CLONE_LOCK.lock().await;
            sqlx::raw_sql(&format!("CREATE DATABASE {name} TEMPLATE {}", template()))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("creating {name}: {e}"));
        }
        conn.close().await.ok();
        let options = server.admin.clone().database(&name);
        let pool = wardcall::db::connect_pool(options.clone(), 20).await.unwrap();
        TestDb { name, options, pool }
    }

    /// A `Database` for an App (no embedded cluster: the harness owns it).
    pub fn database(&self) -> Database {
        Database { pool: self.pool.clone(), connect_options: self.options.clone(), embedded: None }
    }

    /// A `postgres://` URL for a child `wardcall` process.
    /// A team-read pool over this database with the default engine settings
    /// (what the engine's lookups and recipients queries run on).
    pub fn team_reads(&self) -> wardcall::db::TeamReadPool {
        wardcall::db::TeamReadPool::new(&self.pool, &wardcall::config::EngineConfig::default())
    }

    pub fn url(&self) -> String {
        let o = &self.options;
        let host = o.get_socket().map(|p| p.display().to_string()).unwrap_or_else(|| o.get_host().to_string());
        format!("postgresql://{}@localhost:{}/{}?host={}", o.get_username(), o.get_port(), self.name, url_escape(&host))
    }

    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(&self.pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

fn url_escape(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F").replace(' ', "%20")
}

/// Parses and validates a test config.
pub fn config(toml: &str) -> Arc<Config> {
    let c = Config::parse(toml, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    c.validate("test.toml").unwrap_or_else(|e| panic!("{e}"));
    Arc::new(c)
}

/// Starts an App on `db` with an HTTP server on port 0.
pub async fn start_app(db: &TestDb, config: Arc<Config>) -> App {
    App::start(
        db.database(),
        config,
        StartOptions {
            twilio_auth_token: Some(AUTH_TOKEN.into()),
            http_listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
            api_token: Some(API_TOKEN.into()),
            ..Default::default()
        },
    )
    .await
    .expect("app starts")
}

/// Polls `probe` until it yields a value (the condition it awaits), failing
/// the test after `timeout`. Polls the database every 10 ms: nothing else
/// tells the test when a run reaches a state.
pub async fn await_some<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits a SQL boolean becoming true.
pub async fn await_true(db: &TestDb, what: &str, timeout: Duration, sql: &str) {
    let pool = db.pool.clone();
    await_some(what, timeout, || {
        let pool = pool.clone();
        let sql = sql.to_string();
        async move {
            let v: bool = sqlx::query_scalar(&sql).fetch_one(&pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            v.then_some(())
        }
    })
    .await
}

/// A Twilio emulator on a free local port, with the test account's
/// credentials, whose every number rings out unanswered.
pub async fn no_answer_emulator() -> wardcall::devtools::twilio_emulator::EmulatorHandle {
    use wardcall::devtools::twilio_emulator::{EmulatorConfig, Persona, TwilioEmulator};
    let config = EmulatorConfig {
        account_sid: ACCOUNT_SID.into(),
        auth_token: AUTH_TOKEN.into(),
        personas: std::collections::HashMap::new(),
        default_persona: Persona::NoAnswer,
    };
    TwilioEmulator::start(config, tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).await.unwrap()
}
