//! Several nodes as they run in production: three `zonecast` processes on one
//! PostgreSQL database behind a real nginx (Debian's `nginx-light`) configured with the
//! shipped `docs/nginx-zonecast.conf`. Subscribers over SSE and WebSocket, directly on
//! the nodes and through nginx; writers on every node. Mid-load one node is killed with
//! SIGKILL and restarted, and then every node's listening connection is cut again and
//! again for 5 s. Every subscriber must see every seq of its stream exactly once, in
//! order.
//!
//! Needs PostgreSQL (`ZONECAST_TEST_POSTGRES_URL`) and nginx: ignored by `cargo test`,
//! run by `.ci/run` with `cargo test --test cluster -- --ignored`, where a missing
//! service fails.

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use helpers::*;

const NODES: usize = 3;
const ZONES: usize = 4;
const SSE_SUBSCRIBERS: usize = 300;
const WS_SUBSCRIBERS: usize = 60;
const WRITERS: usize = 8;
const WRITES_EACH: usize = 90;
/// Between two writes of one writer: the writes span the kill and the cut listeners.
const WRITE_PAUSE: Duration = Duration::from_millis(110);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One zonecast process.
struct Node {
    id: String,
    port: u16,
    child: Option<Child>,
}

impl Node {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self, dir: &Path, db_url: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", self.id)))
            .expect("node log");
        let child = Command::new(env!("CARGO_BIN_EXE_zonecast"))
            .args(["--bind", &format!("127.0.0.1:{}", self.port)])
            .args(["--database-url", db_url, "--node-id", &self.id, "--no-demo"])
            .args([
                "--admin-key-file",
                &dir.join("admin-key").display().to_string(),
            ])
            .args([
                "--write-rate",
                "0",
                "--connect-rate",
                "0",
                "--ws-message-rate",
                "0",
            ])
            .args(["--auth-failure-rate", "0", "--max-connections-per-ip", "0"])
            .args(["--sweep-interval", "500ms", "--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start zonecast");
        self.child = Some(child);
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().expect("SIGKILL");
            within("the killed node to exit", c.wait())
                .await
                .expect("wait");
        }
    }
}

async fn until_ready(http: &reqwest::Client, url: &str) {
    within_for(Duration::from_secs(60), "a node to be ready", async {
        loop {
            if let Ok(r) = http.get(format!("{url}/readyz")).send().await
                && r.status().as_u16() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// nginx in the foreground with the shipped configuration, ports changed.
struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    fn start(dir: &Path, port: u16, nodes: &[u16]) -> Nginx {
        std::fs::create_dir_all(dir).expect("nginx dir");
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/nginx-zonecast.conf"),
        )
        .expect("docs/nginx-zonecast.conf");
        let names = |p: u16| shipped.contains(&format!("127.0.0.1:{p}"));
        assert!(
            [8080, 8081, 8082, 8083].into_iter().all(names),
            "the shipped file names ports 8080-8083"
        );
        let mut conf = shipped.clone();
        for (i, p) in nodes.iter().enumerate() {
            conf = conf.replace(
                &format!("127.0.0.1:{}", 8081 + i),
                &format!("127.0.0.1:{p}"),
            );
        }
        conf = conf.replace(
            "listen 127.0.0.1:8080;",
            &format!("listen 127.0.0.1:{port};"),
        );
        std::fs::write(dir.join("zonecast.conf"), conf).expect("write conf");
        let d = dir.display();
        let main = format!(
            "daemon off;\nmaster_process on;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             include {d}/zonecast.conf;\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, main).expect("write nginx.conf");
        let bin = if Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx"
        } else {
            "nginx"
        };
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("nginx-error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx must be installed (apt-get install nginx-light)");
        Nginx { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM stops the master and its worker; KILL (kill_on_drop) would orphan the
        // worker.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            // Give the master time to stop its worker before kill_on_drop's SIGKILL.
            for _ in 0..50 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    seqs: Vec<u64>,
    reconnects: u64,
}

/// The seq of an event frame of the zone stream, if it is one.
fn zone_seq(v: &Value, stream: &str) -> Option<u64> {
    (v["stream"] == stream).then(|| v["id"].as_u64()).flatten()
}

/// A subscriber's transport.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Sse,
    Ws,
}

/// The seqs of zone events arriving on one connection; ends when the connection does.
type Seqs = std::pin::Pin<Box<dyn futures_util::Stream<Item = u64> + Send>>;

/// Opens `/sse/zones/{zone}/stock` at `base` after `last` (`Last-Event-ID`).
async fn open_sse(base: &str, zone: i64, key: &str, last: u64) -> Option<Seqs> {
    let resp = reqwest::Client::new()
        .get(format!("{base}/sse/zones/{zone}/stock"))
        .header("Authorization", format!("Bearer {key}"))
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .ok()
        .filter(|r| r.status().as_u16() == 200)?;
    let stream = format!("zone:{zone}");
    let mut events = resp.bytes_stream().eventsource();
    Some(Box::pin(async_stream::stream! {
        while let Some(Ok(ev)) = events.next().await {
            let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
            if let Some(seq) = zone_seq(&v, &stream) {
                yield seq;
            }
        }
    }))
}

/// Opens `/ws/zones/{zone}?last_event_id=N` at `base`.
async fn open_ws(base: &str, zone: i64, key: &str, last: u64) -> Option<Seqs> {
    use tokio_tungstenite::tungstenite::Message;
    let url = format!(
        "{}/ws/zones/{zone}?last_event_id={last}&access_token={key}",
        base.replacen("http", "ws", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.ok()?;
    let stream = format!("zone:{zone}");
    Some(Box::pin(async_stream::stream! {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if let Some(seq) = zone_seq(&v, &stream) {
                        yield seq;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    }))
}

/// A subscriber that starts at `first` and, whenever its connection ends or fails,
/// resumes through `fallback` after the last seq it saw, until it has seen `until`.
async fn subscriber(
    via: Via,
    first: String,
    fallback: String,
    zone: i64,
    key: String,
    until: watch::Receiver<Option<u64>>,
) -> Seen {
    let mut seen = Seen::default();
    let mut base = first;
    let done = |seen: &Seen, until: &watch::Receiver<Option<u64>>| {
        let last = seen.seqs.last().copied().unwrap_or(0);
        until.borrow().is_some_and(|u| last >= u)
    };
    loop {
        if done(&seen, &until) {
            return seen;
        }
        let last = seen.seqs.last().copied().unwrap_or(0);
        let opened = match via {
            Via::Sse => open_sse(&base, zone, &key, last).await,
            Via::Ws => open_ws(&base, zone, &key, last).await,
        };
        if let Some(mut seqs) = opened {
            let mut until = until.clone();
            let mut settled = false;
            loop {
                tokio::select! {
                    seq = seqs.next() => match seq {
                        Some(seq) => seen.seqs.push(seq),
                        None => break,
                    },
                    // Once the target is known it no longer changes.
                    r = until.changed(), if !settled => settled = r.is_err(),
                }
                if done(&seen, &until) {
                    return seen;
                }
            }
        }
        seen.reconnects += 1;
        base = fallback.clone();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `WRITES_EACH` deltas of +1 on `item`, first at `home`, each retried through
/// `fallback` with its Idempotency-Key until it is answered 200.
async fn writer(
    n: usize,
    home: String,
    fallback: String,
    item: i64,
    key: String,
    done: Arc<AtomicU64>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let mut base = home;
    for i in 0..WRITES_EACH {
        let idem = format!("w{n}-{i}");
        let mut attempts = 0;
        loop {
            attempts += 1;
            assert!(attempts < 200, "write {idem} never succeeded");
            let r = http
                .patch(format!("{base}/api/items/{item}"))
                .header("Authorization", format!("Bearer {key}"))
                .header("Idempotency-Key", &idem)
                .json(&json!({"delta": 1}))
                .send()
                .await;
            match r {
                Ok(r) if r.status().as_u16() == 200 => break,
                Ok(r) if r.status().is_client_error() => {
                    panic!(
                        "write {idem} refused: {}",
                        r.text().await.unwrap_or_default()
                    )
                }
                _ => {
                    base = fallback.clone();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(WRITE_PAUSE).await;
    }
}

/// Terminates every zonecast listening connection on the database `name`.
async fn cut_listeners(admin: &sea_orm::DatabaseConnection, name: &str) -> usize {
    use sea_orm::{ConnectionTrait, Statement};
    let sql = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND application_name LIKE 'zonecast-listener %'"
    );
    admin
        .query_all_raw(Statement::from_string(admin.get_database_backend(), sql))
        .await
        .map(|rows| rows.len())
        .unwrap_or(0)
}

async fn until_writes(done: &AtomicU64, n: u64) {
    within_for(LOAD_WAIT, "the writers to progress", async {
        while done.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL and nginx: .ci/run runs it with --ignored"]
async fn three_nodes_behind_nginx_lose_and_duplicate_nothing_through_a_kill_and_cut_listeners() {
    let db = postgres_db()
        .await
        .expect("ZONECAST_TEST_POSTGRES_URL must be set for the cluster suite");
    let (admin_url, db_name) = db.postgres_admin().expect("postgres");
    let admin = sea_orm::Database::connect(admin_url.as_str())
        .await
        .expect("admin connection");
    let dir = tempfile::tempdir().expect("temp dir");
    let dir_path: PathBuf = dir.path().to_owned();
    let http = reqwest::Client::new();

    // Three nodes (the first alone, so that it makes the admin key), then nginx.
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|i| Node {
            id: format!("node-{}", i + 1),
            port: free_port(),
            child: None,
        })
        .collect();
    nodes[0].start(&dir_path, &db.url);
    until_ready(&http, &nodes[0].url()).await;
    for n in &mut nodes[1..] {
        n.start(&dir_path, &db.url);
    }
    for n in &nodes {
        until_ready(&http, &n.url()).await;
    }
    let nginx = Nginx::start(
        &dir_path,
        free_port(),
        &nodes.iter().map(|n| n.port).collect::<Vec<_>>(),
    );
    until_ready(&http, &nginx.url()).await;
    let key = std::fs::read_to_string(dir_path.join("admin-key"))
        .expect("admin key file")
        .trim()
        .to_owned();
    let auth = format!("Bearer {key}");

    // Zones and their items, made through nginx.
    let mut items = Vec::new();
    for z in 0..ZONES {
        let r: Value = http
            .post(format!("{}/api/zones", nginx.url()))
            .header("Authorization", &auth)
            .json(&json!({"name": format!("Zone {z}")}))
            .send()
            .await
            .expect("create zone")
            .json()
            .await
            .expect("zone json");
        let zone = r["id"].as_i64().expect("zone id");
        let r: Value = http
            .post(format!("{}/api/zones/{zone}/items", nginx.url()))
            .header("Authorization", &auth)
            .json(&json!({"sku": "S", "name": "Item", "quantity": 0, "low_stock_threshold": 0}))
            .send()
            .await
            .expect("create item")
            .json()
            .await
            .expect("item json");
        items.push((zone, r["item"]["id"].as_i64().expect("item id")));
    }

    // Subscribers: half directly on a node, half through nginx; all fall back to nginx.
    let (targets, until) = watch::channel::<BTreeMap<i64, u64>>(BTreeMap::new());
    let per_zone = |zone: i64| {
        let mut rx = until.clone();
        let (tx, out) = watch::channel(None);
        tokio::spawn(async move {
            loop {
                let t = rx.borrow().get(&zone).copied();
                if t.is_some() {
                    let _ = tx.send(t);
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        out
    };
    let mut subs = Vec::new();
    for i in 0..SSE_SUBSCRIBERS + WS_SUBSCRIBERS {
        let (zone, _) = items[i % ZONES];
        let first = if i % 2 == 0 {
            nodes[(i / 2) % NODES].url()
        } else {
            nginx.url()
        };
        let direct_on = (i % 2 == 0).then_some((i / 2) % NODES);
        let (fallback, key, until) = (nginx.url(), key.clone(), per_zone(zone));
        let via = if i < SSE_SUBSCRIBERS {
            Via::Sse
        } else {
            Via::Ws
        };
        let task = tokio::spawn(subscriber(via, first, fallback, zone, key, until));
        subs.push((i < SSE_SUBSCRIBERS, zone, direct_on, task));
    }

    // Writers on every node.
    let done = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (_, item) = items[w % ZONES];
        writers.push(tokio::spawn(writer(
            w,
            nodes[w % NODES].url(),
            nginx.url(),
            item,
            key.clone(),
            done.clone(),
        )));
    }
    let total = (WRITERS * WRITES_EACH) as u64;

    // A third of the way: node 3 dies (SIGKILL); 2 s later it is back on its port.
    until_writes(&done, total / 3).await;
    nodes[2].kill().await;
    eprintln!(
        "killed node-3 after {} writes",
        done.load(Ordering::Relaxed)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    nodes[2].start(&dir_path, &db.url);
    until_ready(&http, &nodes[2].url()).await;
    // It serves again: a subscriber directly on it, from the start.
    let (zone0, _) = items[0];
    let on_restarted = tokio::spawn(subscriber(
        Via::Sse,
        nodes[2].url(),
        nginx.url(),
        zone0,
        key.clone(),
        per_zone(zone0),
    ));

    // Two thirds of the way: every node's listening connection is cut every 50 ms for
    // 5 s, so announcements are lost; the sweep must deliver.
    until_writes(&done, total * 2 / 3).await;
    let mut cuts = 0;
    let until_cut = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until_cut {
        cuts += cut_listeners(&admin, &db_name).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("cut listening connections {cuts} times");
    assert!(
        cuts >= NODES * 5,
        "the listeners were cut only {cuts} times"
    );

    for w in writers {
        within_for(LOAD_WAIT, "the writers", w)
            .await
            .expect("writer");
    }
    for n in &nodes {
        until_ready(&http, &n.url()).await;
    }

    // Each zone's last seq, from the log: item_created plus every write, once each
    // (a write retried after the kill must not have been applied twice).
    let mut last = BTreeMap::new();
    for (z, (zone, _)) in items.iter().enumerate() {
        let s: Value = http
            .get(format!("{}/api/zones/{zone}/items", nginx.url()))
            .header("Authorization", &auth)
            .send()
            .await
            .expect("snapshot")
            .json()
            .await
            .expect("snapshot json");
        let writes = (0..WRITERS).filter(|w| w % ZONES == z).count() * WRITES_EACH;
        assert_eq!(s["last_event_id"], 1 + writes as u64, "zone {zone}: {s}");
        assert_eq!(s["items"][0]["quantity"], writes as u64, "zone {zone}");
        last.insert(*zone, 1 + writes as u64);
    }
    targets.send_replace(last.clone());

    let mut reconnected_from_killed = 0;
    let mut checked = 0;
    for (sse, zone, direct_on, task) in subs {
        let seen = within_for(LOAD_WAIT, "a subscriber to catch up", task)
            .await
            .expect("subscriber");
        let want: Vec<u64> = (1..=last[&zone]).collect();
        assert!(
            seen.seqs == want,
            "{} subscriber on zone {zone} (direct on {direct_on:?}) saw {} events, not 1..={}: \
             first difference at {:?}",
            if sse { "SSE" } else { "WS" },
            seen.seqs.len(),
            last[&zone],
            seen.seqs.iter().zip(&want).position(|(a, b)| a != b)
        );
        if direct_on == Some(2) && seen.reconnects > 0 {
            reconnected_from_killed += 1;
        }
        checked += 1;
    }
    let seen = within_for(LOAD_WAIT, "the restarted node's subscriber", on_restarted)
        .await
        .expect("subscriber");
    assert_eq!(seen.seqs, (1..=last[&zone0]).collect::<Vec<_>>());
    assert_eq!(checked, SSE_SUBSCRIBERS + WS_SUBSCRIBERS);
    assert!(
        reconnected_from_killed > 0,
        "no subscriber of the killed node had to reconnect"
    );
    eprintln!(
        "{checked} subscribers saw every seq once, in order; {reconnected_from_killed} of them \
         resumed through nginx after node-3 was killed"
    );
    drop(nginx);
    for n in &mut nodes {
        n.kill().await;
    }
}

/// The `bash` block of the README's "Running several nodes", as printed: the same ports
/// (8080 for nginx, 8081-8083 for the nodes), with two substitutions the README names:
/// its own database, and nginx started in a directory of its own for the `sudo` line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL and nginx: .ci/run runs it with --ignored"]
async fn the_readme_several_nodes_example_works_as_printed() {
    use std::os::unix::process::CommandExt;
    let db = postgres_db()
        .await
        .expect("ZONECAST_TEST_POSTGRES_URL must be set for the cluster suite");
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let section = readme
        .split("## Running several nodes")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the README's several-nodes section");
    let block = section
        .split("```bash\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("its bash block");
    for port in [8080, 8081, 8082, 8083] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is taken: the README example uses 8080-8083"
        );
    }
    let db_line = "DB=postgres://postgres@127.0.0.1:5432/zonecast";
    let nginx_line =
        "sudo cp docs/nginx-zonecast.conf /etc/nginx/conf.d/zonecast.conf && sudo nginx -s reload";
    assert!(
        block.contains(db_line) && block.contains(nginx_line),
        "{block}"
    );
    let script = block
        .replace(db_line, &format!("DB={}", db.url))
        .replace(nginx_line, "");
    let dir = tempfile::tempdir().expect("temp dir");
    let nginx = Nginx::start(&dir.path().join("nginx"), 8080, &[8081, 8082, 8083]);
    let path = path_with_zonecast();
    let child = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -eu\n{script}"))
        .current_dir(dir.path())
        .env("PATH", path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, which the nodes it starts in the background join.
        .process_group(0)
        .spawn()
        .expect("bash");
    let group = child.id();
    let run = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = within_for(Duration::from_secs(60), "the README block", run)
        .await
        .expect("join")
        .expect("bash");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", "--", &format!("-{group}")])
        .status();
    drop(nginx);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the README block failed:\n{}\n--- stdout:\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().any(|l| l.trim() == "1"),
        "grep -c said: {stdout}"
    );
    assert!(stdout.contains(r#""node_id":"node-2""#), "{stdout}");
    assert!(stdout.contains(r#""scope":"node""#), "{stdout}");
}
