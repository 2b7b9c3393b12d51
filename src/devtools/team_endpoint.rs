//! A team's HTTP endpoint, for the demo, the benchmarks and the tests: a real
//! HTTP server on 127.0.0.1 (port 0) that records every request it receives
//! and answers as scripted: the first N requests fail with 503, or every
//! request fails (the endpoint is down), or it hangs (a timeout). Never used
//! by the engine.

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::Router;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// One request as the endpoint received it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The `Idempotency-Key` header, if any.
    pub idempotency_key: Option<String>,
    /// Every header (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON (`Value::Null` when it is not JSON).
    pub body: Value,
    /// When it arrived (UTC).
    pub at: jiff::Timestamp,
    /// The status it was answered with (0: not answered, it hung).
    pub status: u16,
}

/// How the endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// 200 with `{"ok": true}`.
    Up,
    /// The next `n` requests get this status (e.g. 503, 429, 400), then `Up`.
    FailNext { n: u32, status: u16 },
    /// Every request gets 503.
    Down,
    /// Requests are held without an answer for this long (a timeout on the caller's side).
    Hang { ms: u64 },
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    received: Mutex<Vec<ReceivedRequest>>,
    events: broadcast::Sender<ReceivedRequest>,
}

/// A running endpoint. Dropping it stops the server.
pub struct TeamEndpoint {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TeamEndpoint {
    /// Starts the endpoint on 127.0.0.1 with a free port.
    ///
    /// Errors: the port cannot be bound.
    pub async fn start(behaviour: Behaviour) -> std::io::Result<TeamEndpoint> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared { behaviour: Mutex::new(behaviour), received: Mutex::new(Vec::new()), events: broadcast::channel(1024).0 });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(TeamEndpoint { shared, addr, task })
    }

    /// `http://127.0.0.1:<port>` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes how the endpoint answers from the next request on.
    pub fn set_behaviour(&self, b: Behaviour) {
        *self.shared.behaviour.lock().expect("not poisoned") = b;
    }

    /// Every request received so far, in order.
    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.shared.received.lock().expect("not poisoned").clone()
    }

    /// The requests as they arrive (after they are answered).
    pub fn subscribe(&self) -> broadcast::Receiver<ReceivedRequest> {
        self.shared.events.subscribe()
    }
}

impl Drop for TeamEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap, body: axum::body::Bytes) -> (StatusCode, String) {
    let (status, hang_ms) = {
        let mut b = shared.behaviour.lock().expect("not poisoned");
        match *b {
            Behaviour::Up => (200, 0),
            Behaviour::Down => (503, 0),
            Behaviour::Hang { ms } => (200, ms),
            Behaviour::FailNext { n, status } => {
                *b = if n <= 1 { Behaviour::Up } else { Behaviour::FailNext { n: n - 1, status } };
                (status, 0)
            }
        }
    };
    if hang_ms > 0 {
        tokio::time::sleep(Duration::from_millis(hang_ms)).await;
    }
    let req = ReceivedRequest {
        method: method.to_string(),
        path: uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        idempotency_key: headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string),
        headers: headers.iter().map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())).collect(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: jiff::Timestamp::now(),
        status,
    };
    shared.received.lock().expect("not poisoned").push(req.clone());
    let _ = shared.events.send(req);
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, if code.is_success() { "{\"ok\":true}".into() } else { "{\"error\":\"scripted failure\"}".into() })
}
