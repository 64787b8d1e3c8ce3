//! The server under a connection flood, as issue 10's acceptance describes it: one
//! address (127.0.0.1) holds thousands of idle connections and a slowloris crowd while
//! another (127.0.0.2) keeps working; then the process is pushed past its open-file
//! limit. A binary of its own: it holds thousands of sockets, and its CPU figures
//! should not share the machine with the parallel suite.

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use helpers::*;

const FLOODER: &str = "127.0.0.1";
const CLIENT: &str = "127.0.0.2";

async fn flood_connect(to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    try_connect_from(to, FLOODER.parse().expect("ip")).await
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start at `state`.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// The share of one core the process used over `window`.
async fn cpu_share(pid: u32, window: Duration) -> f64 {
    let before = cpu_seconds(pid);
    tokio::time::sleep(window).await;
    (cpu_seconds(pid) - before) / window.as_secs_f64()
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(CLIENT.parse::<IpAddr>().expect("ip"))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_leaves_the_server_serving_another() {
    let db = TestDb::sqlite().await;
    let flags = [
        "--max-connections",
        "600",
        "--max-connections-per-ip",
        "300",
        "--header-timeout",
        "2s",
        "--write-rate",
        "0",
        "--connect-rate",
        "0",
    ];
    let child = spawn_binary(&db.url, &flags).await;
    let pid = child.process.id().expect("pid");
    let key = child.key.clone().expect("admin key");
    let to: SocketAddr = child
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("address");
    let http = client();
    let base = child.base.clone();
    let zone: Value = http
        .post(format!("{base}/api/zones"))
        .bearer_auth(&key)
        .json(&json!({"name": "Flooded"}))
        .send()
        .await
        .expect("zone")
        .json()
        .await
        .expect("json");
    let zone = zone["id"].as_i64().expect("zone id");
    let item: Value = http
        .post(format!("{base}/api/zones/{zone}/items"))
        .bearer_auth(&key)
        .json(&json!({"sku": "F", "name": "f", "quantity": 100000}))
        .send()
        .await
        .expect("item")
        .json()
        .await
        .expect("json");
    let item = item["item"]["id"].as_i64().expect("item id");

    // The flood: 2,000 idle connections opened at once and held (most are refused),
    // and 50 slowloris clients that reconnect whenever they are cut off.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        if let Ok(s) = flood_connect(to).await {
            idle.push(s);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut slow = Vec::new();
    for _ in 0..50 {
        let stop = stop.clone();
        slow.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = flood_connect(to).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaa" {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }

    // Another address opens an SSE stream and receives every event.
    let resp = http
        .get(format!("{base}/sse/zones/{zone}/stock?access_token={key}"))
        .send()
        .await
        .expect("an SSE stream from another address");
    assert_eq!(resp.status().as_u16(), 200);
    let mut sse = Sse::from_response(resp);
    for _ in 0..20 {
        let r = http
            .patch(format!("{base}/api/items/{item}"))
            .bearer_auth(&key)
            .json(&json!({"delta": -1}))
            .send()
            .await
            .expect("write from another address");
        assert_eq!(r.status().as_u16(), 200);
    }
    let frames = sse.take(20).await;
    assert_consecutive(&frames, 2, &format!("zone:{zone}"));

    // Shedding is not spinning.
    let share = cpu_share(pid, Duration::from_secs(2)).await;
    println!(
        "flooded: {} idle connections held, server CPU {share:.3} of a core",
        idle.len()
    );
    assert!(
        share < 0.3,
        "the server used {share:.2} of a core while flooded"
    );

    // Past the open-file limit: accept fails (EMFILE) and is backed off, not spun on.
    let (mut soft, mut hard) = (0, 0);
    rlimit::prlimit(
        pid as i32,
        rlimit::Resource::NOFILE,
        None,
        Some((&mut soft, &mut hard)),
    )
    .expect("read the server's open-file limit");
    let fds = open_fds(pid);
    rlimit::prlimit(
        pid as i32,
        rlimit::Resource::NOFILE,
        Some((fds, hard)),
        None,
    )
    .expect("lower the server's open-file limit");
    let mut pending = Vec::new();
    for _ in 0..20 {
        if let Ok(s) = flood_connect(to).await {
            pending.push(s); // in the backlog: the server cannot accept them
        }
    }
    let share = cpu_share(pid, Duration::from_secs(2)).await;
    println!("at the open-file limit ({fds} fds): server CPU {share:.3} of a core");
    assert!(
        share < 0.3,
        "the server used {share:.2} of a core at its open-file limit"
    );

    // The flood stops: the server answers within a second.
    stop.store(true, Ordering::Relaxed);
    drop(idle);
    drop(pending);
    for t in slow {
        t.abort();
    }
    rlimit::prlimit(
        pid as i32,
        rlimit::Resource::NOFILE,
        Some((soft, hard)),
        None,
    )
    .expect("restore the limit");
    let started = Instant::now();
    let ok = within_for(Duration::from_secs(5), "healthz", async {
        loop {
            if let Ok(r) = http.get(format!("{base}/healthz")).send().await
                && r.status().as_u16() == 200
            {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    println!("after the flood: /healthz answered in {ok:?}");
    assert!(ok < Duration::from_secs(1), "healthz answered after {ok:?}");
    // The stream from the other address lived through it all.
    http.patch(format!("{base}/api/items/{item}"))
        .bearer_auth(&key)
        .json(&json!({"delta": -1}))
        .send()
        .await
        .expect("write");
    assert_eq!(sse.next().await.seq(), 22);
    let logs = child.logs();
    assert!(
        logs.contains("cannot accept connections"),
        "the accept errors were not logged:\n{logs}"
    );
    assert!(logs.contains("refusing connections"), "{logs}");
}
