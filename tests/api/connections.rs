//! Connection-level limits on the real server: the header and idle deadlines, the
//! caps in total and per client address, and that streams are kept alive by their
//! heartbeats and pings, not cut by those deadlines.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    read_until_closed(s, |_| false).await
}

#[tokio::test]
async fn a_connection_that_never_completes_its_request_head_is_closed() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--header-timeout", "400ms"]).await;
    let to = app.addr();
    // Sends nothing at all.
    let started = Instant::now();
    let mut silent = connect_from(to, "127.0.0.1".parse().unwrap()).await;
    assert!(read_to_close(&mut silent).await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(350));
    // Slowloris: one byte of the head every 50 ms, which would take 2 s in all.
    let started = Instant::now();
    let mut slow = connect_from(to, "127.0.0.1".parse().unwrap()).await;
    let head = b"GET /healthz HTTP/1.1\r\nHost: zonecast\r\nX-Padding: aaaaaaaaaa\r\n\r\n";
    let mut cut = false;
    for b in head {
        if slow.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(50), slow.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            Ok(Ok(_)) => panic!("the server answered a head it never got in full"),
            Err(_) => {} // still open: the next byte
        }
    }
    assert!(cut, "a slowloris head was allowed to complete");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "cut after {:?}",
        started.elapsed()
    );
    // Everyone else is served meanwhile and after.
    assert_eq!(app.get("/healthz").await.text, "ok");
    app.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--header-timeout", "5s", "--idle-timeout", "600ms"]).await;
    let to = app.addr();
    let request = b"GET /healthz HTTP/1.1\r\nHost: zonecast\r\n\r\n";
    let mut c = connect_from(to, "127.0.0.1".parse().unwrap()).await;
    // Requests every 200 ms keep it open well past the idle timeout.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        c.write_all(request).await.expect("write");
        let mut buf = [0u8; 1024];
        let n = within("a response", c.read(&mut buf)).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then it goes quiet and is closed after the idle timeout.
    let quiet = Instant::now();
    assert!(read_to_close(&mut c).await.is_empty());
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn streams_outlive_the_connection_deadlines_on_their_heartbeats_and_pings() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(
        &db,
        &[
            "--header-timeout",
            "300ms",
            "--idle-timeout",
            "300ms",
            "--heartbeat",
            "150ms",
            "--ws-ping",
            "150ms",
        ],
    )
    .await;
    let zone = app.create_zone("A").await;
    let item = app.create_item(zone, "S", 100, 0).await;
    let mut sse = app.sse(&format!("/sse/zones/{zone}/stock"), None).await;
    let (mut ws, _) = app.ws_welcomed(&format!("/ws/zones/{zone}")).await;
    // Well past both deadlines. The WS client keeps reading (tungstenite answers the
    // server's pings while it reads); the SSE client reads heartbeats afterwards.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1200) {
        ws.send(json!({"type": "ping"})).await;
        assert_eq!(ws.recv().await["type"], "pong");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut beats = 0;
    while beats < 6 {
        let f = sse.next_any().await.expect("the stream stays open");
        if f.event == "heartbeat" {
            beats += 1;
        }
    }
    app.delta(item, -1).await;
    assert_eq!(sse.next().await.event, "stock_updated");
    assert_eq!(ws.recv().await["type"], "stock_updated");
    app.stop().await;
}

#[tokio::test]
async fn past_max_connections_a_client_is_answered_503_at_once() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(
        &db,
        &[
            "--max-connections",
            "4",
            "--max-connections-per-ip",
            "0",
            "--header-timeout",
            "30s",
        ],
    )
    .await;
    let to = app.addr();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(to, "127.0.0.1".parse().unwrap()).await);
    }
    // Accepted in order: the four above hold every slot.
    let mut extra = connect_from(to, "127.0.0.1".parse().unwrap()).await;
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: zonecast\r\n\r\n")
        .await
        .expect("write");
    let answer = String::from_utf8(read_to_close(&mut extra).await).expect("utf-8");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1"), "{answer}");
    assert!(lower.contains("content-type: application/problem+json"));
    let body: Value =
        serde_json::from_str(answer.split("\r\n\r\n").nth(1).expect("body")).expect("problem json");
    assert_eq!(body["status"], 503);
    assert_eq!(body["code"], "unavailable");
    // A freed slot is usable again, and the refusal was counted (the recorder is
    // process-wide, so "at least one").
    drop(held.pop());
    let metrics = within("a slot to free up", async {
        loop {
            let r = reqwest::Client::new()
                .get(format!("{}/metrics", app.base))
                .header("connection", "close")
                .send()
                .await;
            if let Ok(r) = r
                && r.status().as_u16() == 200
            {
                break r.text().await.expect("metrics");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let series = "zonecast_connections_refused_total{reason=\"max_connections\"} ";
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(refused >= 1.0, "{metrics}");
    drop(held);
    app.stop().await;
}

#[tokio::test]
async fn one_address_at_its_cap_leaves_room_for_another() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(
        &db,
        &["--max-connections-per-ip", "3", "--header-timeout", "30s"],
    )
    .await;
    let to = app.addr();
    let flooder: IpAddr = "127.0.0.1".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(to, flooder).await);
    }
    let before = refused_total_from(&app, "127.0.0.2").await;
    let mut fourth = connect_from(to, flooder).await;
    let answer = read_to_close(&mut fourth).await;
    assert!(answer.starts_with(b"HTTP/1.1 503"), "{answer:?}");
    // Another address is served, SSE included.
    let zone = app.create_zone_from("127.0.0.2", "Z").await;
    let other = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<IpAddr>().unwrap())
        .build()
        .expect("client");
    let resp = other
        .get(format!(
            "{}/sse/zones/{zone}/stock?access_token={}",
            app.base, app.key
        ))
        .send()
        .await
        .expect("sse");
    assert_eq!(resp.status().as_u16(), 200);
    let after = refused_total_from(&app, "127.0.0.2").await;
    assert!(after >= before + 1.0);
    drop(held);
    app.stop().await;
}

/// `zonecast_connections_refused_total` for the per-address cap, read from `from`.
async fn refused_total_from(app: &TestApp, from: &str) -> f64 {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .build()
        .expect("client");
    let text = within(
        "metrics",
        client.get(format!("{}/metrics", app.base)).send(),
    )
    .await
    .expect("metrics")
    .text()
    .await
    .expect("text");
    let series = "zonecast_connections_refused_total{reason=\"max_connections_per_ip\"} ";
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

impl TestApp {
    /// Creates a zone over a connection from another loopback address.
    async fn create_zone_from(&self, from: &str, name: &str) -> i64 {
        let client = reqwest::Client::builder()
            .local_address(from.parse::<IpAddr>().unwrap())
            .build()
            .expect("client");
        let r = within(
            "create zone",
            client
                .post(format!("{}/api/zones", self.base))
                .bearer_auth(&self.key)
                .json(&json!({ "name": name }))
                .send(),
        )
        .await
        .expect("sent");
        assert_eq!(r.status().as_u16(), 201);
        r.json::<Value>().await.expect("json")["id"]
            .as_i64()
            .expect("id")
    }
}

#[tokio::test]
async fn a_connection_cap_the_open_file_limit_cannot_honour_stops_the_start() {
    let db = TestDb::sqlite().await;
    let err = start_error(&db, &["--max-connections", "100000000"])
        .await
        .to_string();
    assert!(
        err.contains("--max-connections 100000000") && err.contains("ulimit -n"),
        "{err}"
    );
}
