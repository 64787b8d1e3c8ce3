//! Fan-out benchmark (DESIGN §10): 1,000 changes to 1,000 SSE subscribers, and server
//! memory per idle SSE connection. Run with `cargo bench --bench fanout`; set
//! `FANOUT_SUBSCRIBERS`, `FANOUT_CHANGES` or `IDLE_CONNECTIONS` to change the sizes.
//!
//! Fan-out runs the server in this process so that a probe receiver on the hub can
//! mark the instant each event is published; latency is publish → a client has parsed
//! the frame. Memory runs the release binary as a child process and reads its RSS.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::Mutex;
use zonecast::app::Application;
use zonecast::config::ServeArgs;
use zonecast::domain::{ItemPatch, NewItem};
use zonecast::domain::{Principal, StreamKey};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Reads an SSE body and returns, for each event id, the instant it was parsed.
async fn subscriber(resp: reqwest::Response, expect: usize) -> Vec<(u64, Instant)> {
    let mut out = Vec::with_capacity(expect);
    let mut body = resp.bytes_stream();
    let mut line = Vec::new();
    while out.len() < expect {
        let Some(Ok(chunk)) = body.next().await else {
            break;
        };
        let now = Instant::now();
        for &b in chunk.iter() {
            if b == b'\n' {
                if let Some(id) = line.strip_prefix(b"id: ")
                    && let Some(seq) = std::str::from_utf8(id).ok().and_then(|s| s.parse().ok())
                {
                    out.push((seq, now));
                }
                line.clear();
            } else {
                line.push(b);
            }
        }
    }
    out
}

async fn fanout(subscribers: usize, changes: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("bench.db").display()
    );
    let config = ServeArgs::from_flags([
        "--bind",
        "127.0.0.1:0",
        "--database-url",
        &url,
        "--no-demo",
        "--connect-rate",
        "0",
    ])
    .expect("flags");
    let app = Application::build(config).await.expect("server");
    let base = format!("http://{}", app.addr());
    let key = app.first_admin_key().expect("fresh database").to_owned();
    let service = app.service().clone();
    let server = tokio::spawn(app.run_until_stopped(std::future::pending()));

    let system = Principal::system("bench");
    let zone = service.create_zone(&system, "bench").await.expect("zone");
    let item = service
        .create_item(
            zone.id,
            NewItem::parse("B", "bench", 0, 0).expect("item"),
            None,
            &system,
        )
        .await
        .expect("item");
    let stream = StreamKey::Zone(zone.id);

    // The probe: marks the instant each event reaches the hub.
    let published = Arc::new(Mutex::new(HashMap::new()));
    let mut probe = service.broker().subscribe(&stream);
    let probe_task = {
        let published = published.clone();
        tokio::spawn(async move {
            let rx = probe.raw().receiver();
            while let Ok(ev) = rx.recv().await {
                published.lock().await.insert(ev.seq, Instant::now());
                if published.lock().await.len() >= changes {
                    break;
                }
            }
        })
    };

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut tasks = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let resp = http
            .get(format!(
                "{base}/sse/zones/{}/stock?access_token={key}",
                zone.id
            ))
            .send()
            .await
            .expect("subscribe");
        assert_eq!(resp.status().as_u16(), 200, "a subscriber was refused");
        tasks.push(tokio::spawn(subscriber(resp, changes)));
    }
    // Every subscriber's cursor was opened before its response head came, so none
    // misses a change; wait until all are written by the stream's fan-out, to measure
    // that steady state (each joins once it has caught up).
    let deadline = Instant::now() + Duration::from_secs(60);
    while (service.connections().snapshot(None).fanout_members as usize) < subscribers {
        assert!(
            Instant::now() < deadline,
            "the subscribers did not all join the fan-out within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let started = Instant::now();
    for _ in 0..changes {
        let patch = ItemPatch::parse(None, Some(1), None, None, None, None).expect("patch");
        service
            .update_item(item.item.id, patch, None, &system)
            .await
            .expect("write");
    }
    let writes_done = started.elapsed();
    let mut latencies = Vec::with_capacity(subscribers * changes);
    let mut last = started;
    let mut delivered = 0usize;
    let _ = probe_task.await;
    let published = published.lock().await.clone();
    for t in tasks {
        for (seq, at) in t.await.expect("subscriber") {
            delivered += 1;
            last = last.max(at);
            if let Some(p) = published.get(&seq) {
                latencies.push(at.saturating_duration_since(*p));
            }
        }
    }
    let elapsed = last.duration_since(started);
    latencies.sort();
    println!(
        "fanout: {changes} changes x {subscribers} SSE subscribers: {delivered} deliveries in {:.2?} \
         = {:.0} deliveries/s; writes took {:.2?} ({:.0} writes/s); publish->receive p50 {:.2?} p99 {:.2?}",
        elapsed,
        delivered as f64 / elapsed.as_secs_f64(),
        writes_done,
        changes as f64 / writes_done.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
    );
    server.abort();
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn idle_memory(connections: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("idle.db").display());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_zonecast"))
        .args([
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--database-url",
            &url,
            "--heartbeat",
            "1h",
            "--public-read",
            "--connect-rate",
            "0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("server binary");
    let pid = child.id().expect("pid");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    loop {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Warm up allocator pools with a few connections first.
    let mut open = Vec::new();
    for _ in 0..50 {
        open.push(
            http.get(format!("{base}/sse/zones/1/stock"))
                .send()
                .await
                .expect("sse"),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);
    let clients: Vec<reqwest::Client> = (0..connections.div_ceil(500))
        .map(|_| reqwest::Client::new())
        .collect();
    for i in 0..connections {
        let c = &clients[i % clients.len()];
        open.push(
            c.get(format!("{base}/sse/zones/1/stock"))
                .send()
                .await
                .expect("sse"),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    println!(
        "idle SSE: {connections} connections added {} KiB to the server's RSS = {:.1} KiB per connection",
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / connections as f64
    );
    drop(open);
    let _ = child.kill().await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // `cargo test --benches` runs this with `--bench` absent: keep that run small.
    let full = std::env::args().any(|a| a == "--bench");
    let subs = env_usize("FANOUT_SUBSCRIBERS", if full { 1000 } else { 20 });
    let changes = env_usize("FANOUT_CHANGES", if full { 1000 } else { 20 });
    let idle = env_usize("IDLE_CONNECTIONS", if full { 2000 } else { 20 });
    rt.block_on(async {
        fanout(subs, changes).await;
        idle_memory(idle).await;
    });
}
