//! Test harness: a real zonecast on 127.0.0.1:0 over a real database (a fresh SQLite
//! file, and a fresh PostgreSQL database when `ZONECAST_TEST_POSTGRES_URL` is set),
//! with typed HTTP and SSE helpers. Every wait is bounded.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zonecast::app::Application;
use zonecast::config::ServeArgs;
use zonecast::domain::{Principal, Role, ZoneScope};
use zonecast::service::Service;

pub const WAIT: Duration = Duration::from_secs(20);

/// Bound for whole load runs (thousands of writes on a busy 2-core machine).
pub const LOAD_WAIT: Duration = Duration::from_secs(180);

/// Awaits `f`, failing the test if it takes longer than `WAIT`.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    within_for(WAIT, what, f).await
}

/// Awaits `f`, failing the test if it takes longer than `limit`.
pub async fn within_for<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A database of its own for one test.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_admin: Option<(String, String)>,
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("zonecast.db").display()
        );
        TestDb {
            url,
            _dir: Some(dir),
            pg_admin: None,
        }
    }

    async fn postgres(admin_url: &str) -> TestDb {
        let name = unique("zc");
        let admin = Database::connect(admin_url)
            .await
            .expect("connect to postgres");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
        TestDb {
            url: format!("{base}/{name}"),
            _dir: None,
            pg_admin: Some((admin_url.to_owned(), name)),
        }
    }
}

impl TestDb {
    /// For a PostgreSQL test database: the admin URL and the database name.
    pub fn postgres_admin(&self) -> Option<(String, String)> {
        self.pg_admin.clone()
    }
}

impl Drop for TestDb {
    /// Drops a PostgreSQL test database (SQLite's goes with its temp dir), also when
    /// the test panicked. Runs on a thread of its own: `Drop` cannot await.
    fn drop(&mut self) {
        let Some((admin_url, name)) = self.pg_admin.take() else {
            return;
        };
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(admin) = Database::connect(admin_url.as_str()).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = admin.execute_unprepared(&sql).await;
                }
            });
        })
        .join();
    }
}

/// `PATH` with the directory of the `zonecast` binary under test first, for scripts
/// that run `zonecast` as the documents print it.
pub fn path_with_zonecast() -> String {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_zonecast"));
    let dir = bin.parent().unwrap_or(bin);
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A PostgreSQL database of its own, if `ZONECAST_TEST_POSTGRES_URL` is set (tests of
/// several nodes need one; `.ci/run` sets it).
pub async fn postgres_db() -> Option<TestDb> {
    match std::env::var("ZONECAST_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(TestDb::postgres(&url).await),
        _ => {
            eprintln!("skipped: set ZONECAST_TEST_POSTGRES_URL to run tests of several nodes");
            None
        }
    }
}

/// SQLite always; PostgreSQL too when `ZONECAST_TEST_POSTGRES_URL` is set.
pub async fn test_dbs() -> Vec<TestDb> {
    let mut dbs = vec![TestDb::sqlite().await];
    if let Ok(url) = std::env::var("ZONECAST_TEST_POSTGRES_URL")
        && !url.is_empty()
    {
        dbs.push(TestDb::postgres(&url).await);
    }
    dbs
}

pub struct TestApp {
    pub base: String,
    /// An admin key; `http` sends it on every request.
    pub key: String,
    pub service: Service,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// Flags tests start with unless they give their own: no rate limits, so load tests
/// measure correctness, not the limiter.
const DEFAULT_FLAGS: [(&str, &str); 4] = [
    ("--write-rate", "0"),
    ("--connect-rate", "0"),
    ("--ws-message-rate", "0"),
    ("--auth-failure-rate", "0"),
];

/// What a start on `db` with `flags` stops with; it must not start.
pub async fn start_error(db: &TestDb, flags: &[&str]) -> zonecast::app::StartError {
    let mut all = vec!["--bind", "127.0.0.1:0", "--database-url", &db.url];
    all.extend_from_slice(flags);
    let config = ServeArgs::from_flags(all).expect("flags parse");
    match Application::build(config).await {
        Ok(_) => panic!("started with {flags:?}"),
        Err(e) => e,
    }
}

/// Starts zonecast on `db` with `--no-demo` plus `flags`; `http` carries an admin key.
pub async fn spawn_app(db: &TestDb, flags: &[&str]) -> TestApp {
    let mut all = vec![
        "--bind",
        "127.0.0.1:0",
        "--database-url",
        &db.url,
        "--no-demo",
    ];
    for (flag, value) in DEFAULT_FLAGS {
        if !flags.contains(&flag) {
            all.extend([flag, value]);
        }
    }
    all.extend_from_slice(flags);
    let config = ServeArgs::from_flags(all).expect("valid flags");
    let app = Application::build(config).await.expect("app starts");
    let base = format!("http://{}", app.addr());
    let service = app.service().clone();
    let key = match app.first_admin_key() {
        Some(k) => k.to_owned(),
        // A restart on the same database: the first key was shown once; make another.
        None => {
            let name = unique("admin");
            service
                .create_key(
                    &Principal::system("test"),
                    &name,
                    Role::Admin,
                    ZoneScope::All,
                    None,
                )
                .await
                .expect("admin key")
                .1
        }
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        base,
        http: client_with(Some(&key)),
        key,
        service,
        stop: Some(stop),
        task: Some(task),
    }
}

/// An HTTP client that sends `key` (if any) as `Authorization: Bearer`.
pub fn client_with(key: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(k) = key {
        let v = reqwest::header::HeaderValue::from_str(&format!("Bearer {k}")).expect("header");
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub text: String,
}

impl Reply {
    /// Reads a response; the body of an event stream is left unread (its status and
    /// headers are what a caller asks about).
    pub async fn read(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = if content_type.starts_with("text/event-stream") {
            String::new()
        } else {
            within("a response body", resp.text()).await.expect("body")
        };
        Reply {
            status,
            content_type,
            text,
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Asserts an RFC 9457 problem with this status and code.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert!(
            self.content_type.starts_with("application/problem+json"),
            "content type {} for {}",
            self.content_type,
            self.text
        );
        let p = self.json();
        assert_eq!(p["status"], status);
        assert_eq!(p["code"], code, "{p}");
        assert!(p["title"].is_string() && p["type"].is_string() && p["detail"].is_string());
    }
}

impl TestApp {
    /// Stops the server gracefully and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            within("server shutdown", t)
                .await
                .expect("server task")
                .expect("server ran");
        }
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = within(path, req.send()).await.expect("request sent");
        Reply::read(resp).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(reqwest::Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.request(reqwest::Method::POST, path, Some(&body.to_string()), &[])
            .await
    }

    pub async fn patch(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
        self.request(
            reqwest::Method::PATCH,
            path,
            Some(&body.to_string()),
            headers,
        )
        .await
    }

    pub async fn create_zone(&self, name: &str) -> i64 {
        let r = self.post("/api/zones", json!({ "name": name })).await;
        assert_eq!(r.status, 201, "{}", r.text);
        r.json()["id"].as_i64().expect("zone id")
    }

    pub async fn create_item(&self, zone: i64, sku: &str, quantity: i64, low: i64) -> i64 {
        let r = self
            .post(
                &format!("/api/zones/{zone}/items"),
                json!({"sku": sku, "name": format!("Item {sku}"), "quantity": quantity, "low_stock_threshold": low}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        r.json()["item"]["id"].as_i64().expect("item id")
    }

    /// Applies a delta; returns the reply's JSON after asserting 200.
    pub async fn delta(&self, item: i64, delta: i64) -> Value {
        let r = self
            .patch(
                &format!("/api/items/{item}"),
                json!({ "delta": delta }),
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json()
    }

    pub async fn snapshot(&self, zone: i64) -> Value {
        let r = self.get(&format!("/api/zones/{zone}/items")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json()
    }

    /// Opens an SSE stream; `last_event_id` is sent as the `Last-Event-ID` header.
    pub async fn sse(&self, path: &str, last_event_id: Option<&str>) -> Sse {
        self.sse_with(&self.http, path, last_event_id).await
    }

    /// Opens an SSE stream with another key's credentials.
    pub async fn sse_as(&self, key: &str, path: &str, last_event_id: Option<&str>) -> Sse {
        self.sse_with(&client_with(Some(key)), path, last_event_id)
            .await
    }

    async fn sse_with(
        &self,
        http: &reqwest::Client,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Sse {
        let mut req = http.get(format!("{}{path}", self.base));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = within("SSE open", req.send()).await.expect("SSE request");
        assert_eq!(resp.status().as_u16(), 200, "SSE {path}");
        let headers = resp.headers();
        assert_eq!(headers["content-type"], "text/event-stream");
        assert_eq!(headers["cache-control"], "no-cache");
        assert_eq!(headers["x-accel-buffering"], "no");
        Sse::from_response(resp)
    }
}

type Events = Pin<
    Box<
        dyn Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<reqwest::Error>,
                >,
            > + Send,
    >,
>;

/// An SSE client on top of a standard parser (eventsource-stream).
pub struct Sse {
    events: Events,
}

/// One parsed frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: String,
    pub event: String,
    pub data: Value,
}

impl Frame {
    pub fn seq(&self) -> u64 {
        self.id
            .parse()
            .unwrap_or_else(|_| panic!("frame id {:?}", self.id))
    }
}

impl Sse {
    pub fn from_response(resp: reqwest::Response) -> Sse {
        Sse {
            events: Box::pin(resp.bytes_stream().eventsource()),
        }
    }

    /// The next frame of any kind, heartbeats included; `None` when the stream ended.
    pub async fn next_any(&mut self) -> Option<Frame> {
        loop {
            let ev = within("an SSE frame", self.events.next()).await?;
            let ev = ev.expect("well-formed SSE");
            if ev.event.is_empty() && ev.data.is_empty() {
                continue; // the `retry:` preamble
            }
            let data = serde_json::from_str(&ev.data)
                .unwrap_or_else(|e| panic!("data is not JSON ({e}): {}", ev.data));
            return Some(Frame {
                id: ev.id,
                event: ev.event,
                data,
            });
        }
    }

    /// The next frame that is not a heartbeat (bounded as a whole, so heartbeats
    /// cannot keep a missing event waiting forever).
    pub async fn next(&mut self) -> Frame {
        within("an SSE event", async {
            loop {
                let f = self.next_any().await.expect("stream still open");
                if f.event != "heartbeat" {
                    return f;
                }
            }
        })
        .await
    }

    /// The next `n` non-heartbeat frames.
    pub async fn take(&mut self, n: usize) -> Vec<Frame> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }

    /// Waits for the server to end the stream (heartbeats are skipped).
    pub async fn assert_ends(&mut self) {
        within("the stream to end", async {
            loop {
                match self.events.next().await {
                    None | Some(Err(_)) => return,
                    Some(Ok(ev)) if ev.event == "heartbeat" || ev.event.is_empty() => continue,
                    Some(Ok(ev)) => panic!("expected the stream to end, got {ev:?}"),
                }
            }
        })
        .await
    }
}

/// Asserts frames are events with consecutive ids starting at `first`, each carrying
/// the DESIGN §4 JSON with a matching id.
pub fn assert_consecutive(frames: &[Frame], first: u64, stream: &str) {
    for (i, f) in frames.iter().enumerate() {
        let want = first + i as u64;
        assert_eq!(f.seq(), want, "frame {i}: {f:?}");
        assert_eq!(f.data["id"], want);
        assert_eq!(f.data["stream"], stream);
        assert_eq!(f.data["type"], f.event.as_str());
    }
}

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client (tokio-tungstenite).
pub struct Ws {
    pub inner: WsStream,
}

impl TestApp {
    /// A WS client authenticated with the admin key (`?access_token=`).
    pub async fn ws(&self, path: &str) -> Ws {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.ws_raw(&format!("{path}{sep}access_token={}", self.key))
            .await
    }

    /// A WS client with exactly this path and query.
    pub async fn ws_raw(&self, path: &str) -> Ws {
        let url = format!("{}{path}", self.base.replacen("http", "ws", 1));
        let (inner, _) = within("WS connect", tokio_tungstenite::connect_async(url))
            .await
            .expect("WS handshake");
        Ws { inner }
    }

    /// A WS client that has read its `welcome`.
    pub async fn ws_welcomed(&self, path: &str) -> (Ws, Value) {
        let mut ws = self.ws(path).await;
        let welcome = ws.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (ws, welcome)
    }
}

impl Ws {
    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        use futures_util::SinkExt;
        within(
            "WS send",
            self.inner
                .send(tokio_tungstenite::tungstenite::Message::text(text)),
        )
        .await
        .expect("WS send");
    }

    /// The next text message (pings and pongs skipped), as received.
    pub async fn recv_text(&mut self) -> String {
        use tokio_tungstenite::tungstenite::Message;
        within("a WS message", async {
            loop {
                match self.inner.next().await {
                    Some(Ok(Message::Text(t))) => return t.to_string(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => panic!("expected a text message, got {other:?}"),
                }
            }
        })
        .await
    }

    pub async fn recv(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Waits for the server's close frame and returns its code.
    pub async fn close_code(&mut self) -> u16 {
        use tokio_tungstenite::tungstenite::Message;
        within("a close frame", async {
            loop {
                match self.inner.next().await {
                    Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                    Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
                    Some(Err(e)) => panic!("error before close frame: {e}"),
                    Some(Ok(_)) => continue,
                }
            }
        })
        .await
    }
}

impl TestApp {
    /// A new API key with this role and zone scope.
    pub async fn make_key(&self, role: Role, zones: ZoneScope, user: Option<&str>) -> String {
        self.make_named_key(role, zones, user).await.1
    }

    /// `make_key`, with the key's name (for revoking it).
    pub async fn make_named_key(
        &self,
        role: Role,
        zones: ZoneScope,
        user: Option<&str>,
    ) -> (String, String) {
        let (key, secret) = self
            .service
            .create_key(&Principal::system("test"), &unique("k"), role, zones, user)
            .await
            .expect("key");
        (key.name, secret)
    }

    /// Revokes a key straight in the database, as `zonecast keys revoke` does from
    /// another process: nothing in the server is told.
    pub async fn revoke_in_database(&self, name: &str) {
        self.service
            .store
            .revoke_api_key(name, zonecast::domain::now())
            .await
            .expect("revoke")
            .expect("known key");
    }

    /// A request with exactly these credentials (`None`: anonymous).
    pub async fn request_as(
        &self,
        key: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Reply {
        let mut req = client_with(key).request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = within(path, req.send()).await.expect("request sent");
        Reply::read(resp).await
    }

    /// The HTTP status of a WebSocket handshake (101 when it upgraded).
    pub async fn ws_status(&self, path: &str) -> u16 {
        let url = format!("{}{path}", self.base.replacen("http", "ws", 1));
        match within("WS connect", tokio_tungstenite::connect_async(url)).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("handshake failed: {e}"),
        }
    }
}

/// The real `zonecast` binary as a child process, with its stderr (logs) kept.
pub struct Child {
    pub process: tokio::process::Child,
    pub base: String,
    pub key: Option<String>,
    /// Where the first start wrote its admin key.
    pub key_file: Option<std::path::PathBuf>,
    /// The start-up banner, as printed on stdout.
    pub banner: Vec<String>,
    pub log_path: std::path::PathBuf,
    _log_dir: tempfile::TempDir,
}

/// Starts the binary on `db_url` with `args` and waits until it serves.
pub async fn spawn_binary(db_url: &str, args: &[&str]) -> Child {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let log_dir = tempfile::tempdir().expect("temp dir");
    let log_path = log_dir.path().join("zonecast.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let key_file = log_dir.path().join("admin-key");
    let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_zonecast"))
        .args([
            "--bind",
            "127.0.0.1:0",
            "--database-url",
            db_url,
            "--no-demo",
        ])
        .args(["--admin-key-file".as_ref(), key_file.as_os_str()])
        .args(args)
        .env("RUST_LOG", "info")
        // The binary's own default (no huge pages) is what the tests see.
        .env_remove("MIMALLOC_ALLOW_THP")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start zonecast");
    let stdout = process.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut base, mut key, mut key_file) = (None, None, None);
    let mut banner = Vec::new();
    within("the server to start", async {
        while let Ok(Some(line)) = lines.next_line().await {
            banner.push(line.clone());
            // Not a terminal: the key is in a file, and never on stdout.
            assert!(!line.contains("zk_"), "a key was printed to a pipe: {line}");
            if let Some(rest) = line.strip_prefix("  first admin key written to ") {
                let path = rest.split(" (mode 0600").next().unwrap_or(rest);
                assert!(!rest.contains("zk_"));
                let text = std::fs::read_to_string(path).expect("the key file");
                key = Some(text.trim().to_owned());
                key_file = Some(std::path::PathBuf::from(path));
            }
            if let Some(url) = line.strip_prefix("  API docs:  ") {
                base = url.strip_suffix("/docs").map(str::to_owned);
            }
            if base.is_some() {
                break; // `API docs` is the banner's last line
            }
        }
    })
    .await;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Child {
        process,
        base: base.expect("the server printed its address"),
        key,
        key_file,
        banner,
        log_path,
        _log_dir: log_dir,
    }
}

impl Child {
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.process.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        within_for(limit, "the server to exit", self.process.wait())
            .await
            .expect("exit status")
    }
}

/// A raw TCP connection to `to` from the loopback address `from`.
pub async fn try_connect_from(
    to: std::net::SocketAddr,
    from: std::net::IpAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from, 0))?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

pub async fn connect_from(
    to: std::net::SocketAddr,
    from: std::net::IpAddr,
) -> tokio::net::TcpStream {
    try_connect_from(to, from).await.expect("TCP connect")
}

/// Reads until the server closes the connection (or `done` says the answer is
/// complete); returns what it sent.
pub async fn read_until_closed(
    s: &mut tokio::net::TcpStream,
    done: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    within("the server to answer or close", async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if done(&out) {
                break;
            }
        }
    })
    .await;
    out
}

impl TestApp {
    pub fn addr(&self) -> std::net::SocketAddr {
        self.base
            .trim_start_matches("http://")
            .parse()
            .expect("server address")
    }
}

/// A WebSocket client written by hand on a raw TCP socket, for what a well-behaved
/// library will not send: malformed frames, and a client that never reads.
pub struct RawWs {
    pub tcp: tokio::net::TcpStream,
    /// Bytes read past the handshake, not yet parsed.
    pending: Vec<u8>,
}

/// A client frame: `opcode`, FIN, the RSV bits, masked unless `unmasked`.
pub fn ws_frame(opcode: u8, fin: bool, rsv: u8, payload: &[u8], unmasked: bool) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0x0f)];
    let mask_bit = if unmasked { 0 } else { 0x80 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if unmasked {
        f.extend_from_slice(payload);
    } else {
        let key = [0x11, 0x22, 0x33, 0x44];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    }
    f
}

impl RawWs {
    /// Connects and upgrades `path` (with its query); `rcvbuf` shrinks the client's
    /// receive buffer (a client that reads slowly fills the server's queue sooner).
    pub async fn connect(app: &TestApp, path: &str, rcvbuf: Option<u32>) -> RawWs {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(n) = rcvbuf {
            socket.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        let mut tcp = within("TCP connect", socket.connect(app.addr()))
            .await
            .expect("connect");
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: zonecast\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await.expect("handshake");
        let mut got = Vec::new();
        let end = within("the 101", async {
            let mut buf = [0u8; 1024];
            loop {
                let n = tcp.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed during the handshake");
                got.extend_from_slice(&buf[..n]);
                if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    return i + 4;
                }
            }
        })
        .await;
        assert!(
            got.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        RawWs {
            tcp,
            pending: got[end..].to_vec(),
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.tcp.write_all(bytes).await
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_raw(&ws_frame(1, true, 0, text.as_bytes(), false))
            .await
            .expect("send");
    }

    /// The next frame from the server: `(opcode, payload)`; `None` once it closed.
    pub async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.pending.len() >= 2 {
                let op = self.pending[0] & 0x0f;
                let len7 = (self.pending[1] & 0x7f) as usize;
                let (len, head) = match len7 {
                    126 if self.pending.len() >= 4 => (
                        u16::from_be_bytes([self.pending[2], self.pending[3]]) as usize,
                        4,
                    ),
                    127 if self.pending.len() >= 10 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.pending[2..10]);
                        (u64::from_be_bytes(b) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && self.pending.len() >= head + len {
                    let payload = self.pending[head..head + len].to_vec();
                    self.pending.drain(..head + len);
                    return Some((op, payload));
                }
            }
            let mut buf = [0u8; 8192];
            match self.tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Reads frames until the server's close frame; its code (`None`: the connection
    /// ended without one).
    pub async fn close_code(&mut self) -> Option<u16> {
        within("a close frame", async {
            while let Some((op, payload)) = self.next_frame().await {
                if op == 8 {
                    return (payload.len() >= 2)
                        .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                }
            }
            None
        })
        .await
    }
}
