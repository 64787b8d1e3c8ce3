//! SSE connections the server hands over (a plain HTTP/1.1 connection's first request
//! to a single-stream endpoint): close-delimited, followed on their own until caught up,
//! then written by their stream's fan-out task; handed back when their socket cannot
//! take a batch. Each test reads the raw bytes, so the framing is what is checked.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zonecast::domain::{ItemPatch, Principal, Role, ZoneScope};

use crate::helpers::*;

/// An event-stream client on a connection of its own, written by hand.
struct RawSse {
    tcp: TcpStream,
    head: String,
    /// Body bytes read, not yet parsed.
    pending: Vec<u8>,
}

/// One SSE frame's fields.
#[derive(Debug, Default)]
struct Frame {
    id: Option<u64>,
    event: String,
    data: String,
}

impl RawSse {
    /// Opens `path` with the app's key; `rcvbuf` shrinks the client's receive buffer.
    async fn open(
        app: &TestApp,
        path: &str,
        last_event_id: Option<u64>,
        rcvbuf: Option<u32>,
    ) -> Self {
        Self::open_as(app, &app.key, path, last_event_id, rcvbuf).await
    }

    async fn open_as(
        app: &TestApp,
        key: &str,
        path: &str,
        last_event_id: Option<u64>,
        rcvbuf: Option<u32>,
    ) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(n) = rcvbuf {
            socket.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        let tcp = within("connect", socket.connect(app.addr()))
            .await
            .expect("connect");
        let resume = last_event_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: zonecast\r\nAccept: text/event-stream\r\n\
             Authorization: Bearer {key}\r\n{resume}\r\n"
        );
        Self::request(tcp, &request).await
    }

    async fn request(mut tcp: TcpStream, request: &str) -> Self {
        tcp.write_all(request.as_bytes()).await.expect("request");
        let mut got = Vec::new();
        let end = within("the response head", async {
            let mut buf = [0u8; 4096];
            loop {
                let n = tcp.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed before the head");
                got.extend_from_slice(&buf[..n]);
                if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    return i + 4;
                }
            }
        })
        .await;
        RawSse {
            head: String::from_utf8_lossy(&got[..end]).to_lowercase(),
            pending: got[end..].to_vec(),
            tcp,
        }
    }

    /// The next frame with an `event:` (the `retry:` preamble is skipped); `None` once
    /// the server closed.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(i) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let text = String::from_utf8_lossy(&self.pending[..i]).into_owned();
                self.pending.drain(..i + 2);
                let mut f = Frame::default();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        f.id = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        f.event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        f.data = v.to_owned();
                    }
                }
                if f.event.is_empty() {
                    continue;
                }
                return Some(f);
            }
            let mut buf = [0u8; 16384];
            match self.tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// The ids of the next `n` events (heartbeats skipped), within `limit`.
    async fn ids(&mut self, n: usize, limit: Duration) -> Vec<u64> {
        within_for(limit, "events", async {
            let mut ids = Vec::new();
            while ids.len() < n {
                let f = self.next().await.expect("the stream stays open");
                if f.event != "heartbeat" {
                    ids.push(f.id.expect("an event has an id"));
                }
            }
            ids
        })
        .await
    }
}

/// The zone's stream position, from its snapshot.
async fn last_event_id(app: &TestApp, zone: i64) -> u64 {
    app.snapshot(zone).await["last_event_id"]
        .as_u64()
        .expect("id")
}

/// `/api/stats`' fan-out figures: `(groups, members, handed_back)`.
async fn fanout(app: &TestApp) -> (u64, u64, u64) {
    let s = app.get("/api/stats").await.json();
    let n = |k: &str| s["fanout"][k].as_u64().expect("a count");
    (n("groups"), n("members"), n("handed_back"))
}

/// Polls `/api/stats` until `ok` holds of its fan-out figures (bounded).
async fn fanout_until(app: &TestApp, what: &str, ok: impl Fn((u64, u64, u64)) -> bool) {
    within(what, async {
        loop {
            if ok(fanout(app).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Large changes (a 500-character reason each), in rounds of 100, until the fan-out
/// has handed a connection back (its socket or queue filled), at most 50 rounds; how
/// many were made.
async fn changes_until_handed_back(app: &TestApp, item: i32) -> u64 {
    const ROUND: u64 = 100;
    let reason = "r".repeat(500);
    let admin = Principal::system("test");
    let mut changes = 0;
    for _ in 0..50 {
        for _ in 0..ROUND {
            app.service
                .update_item(item, patch(Some(&reason)), None, &admin)
                .await
                .expect("change");
        }
        changes += ROUND;
        if fanout(app).await.2 >= 1 {
            return changes;
        }
    }
    panic!("no connection was handed back after {changes} changes");
}

fn patch(reason: Option<&str>) -> ItemPatch {
    ItemPatch::parse(None, Some(1), None, None, None, reason).expect("patch")
}

/// The first request of a fresh connection is served outside hyper: a close-delimited
/// body (no chunked encoding) with `Connection: close`, heartbeats, every change in
/// order; and once caught up it is a member of its stream's fan-out, which lets it go
/// as soon as its peer leaves.
#[tokio::test]
async fn a_fresh_connections_stream_is_close_delimited_and_joins_the_fanout() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--heartbeat", "300ms"]).await;
    let zone = app.create_zone("Fanned").await;
    let item = app.create_item(zone, "F", 0, 0).await;
    let mut sse = RawSse::open(&app, &format!("/sse/zones/{zone}/stock"), None, None).await;
    assert!(sse.head.starts_with("http/1.1 200 ok\r\n"), "{}", sse.head);
    for h in [
        "content-type: text/event-stream\r\n",
        "cache-control: no-cache\r\n",
        "x-accel-buffering: no\r\n",
        "connection: close\r\n",
        "x-request-id: ",
    ] {
        assert!(sse.head.contains(h), "{h:?} in {}", sse.head);
    }
    assert!(!sse.head.contains("transfer-encoding"), "{}", sse.head);
    assert!(!sse.head.contains("content-length"), "{}", sse.head);
    fanout_until(&app, "the connection to join the fan-out", |(g, m, _)| {
        g == 1 && m == 1
    })
    .await;
    let beat = within("a heartbeat from the fan-out", sse.next())
        .await
        .expect("open");
    assert_eq!((beat.event.as_str(), beat.id), ("heartbeat", None));
    let start = last_event_id(&app, zone).await;
    for _ in 0..3 {
        app.delta(item, 1).await;
    }
    assert_eq!(
        sse.ids(3, WAIT).await,
        vec![start + 1, start + 2, start + 3]
    );
    let stats = app.get("/api/stats").await.json();
    assert_eq!(stats["connections_by_transport"]["sse"], 1, "{stats}");
    drop(sse);
    fanout_until(&app, "the member to leave with its peer", |(g, m, _)| {
        g == 0 && m == 0
    })
    .await;
    let stats = app.get("/api/stats").await.json();
    assert_eq!(stats["total_connections"], 0, "{stats}");
    app.stop().await;
}

/// An event stream asked for later on a keep-alive connection is hyper's: chunked, and
/// not in the fan-out; it still carries every event.
#[tokio::test]
async fn a_stream_later_on_a_keep_alive_connection_is_served_chunked_by_hyper() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let mut tcp = within("connect", TcpStream::connect(app.addr()))
        .await
        .expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: zonecast\r\n\r\n")
        .await
        .expect("request");
    let ok = read_until_closed(&mut tcp, |b| b.ends_with(b"\r\n\r\nok")).await;
    assert!(
        ok.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&ok)
    );
    let request = format!(
        "GET /sse/alerts HTTP/1.1\r\nHost: zonecast\r\nAuthorization: Bearer {}\r\n\r\n",
        app.key
    );
    let mut sse = RawSse::request(tcp, &request).await;
    assert!(
        sse.head.contains("transfer-encoding: chunked\r\n"),
        "{}",
        sse.head
    );
    let r = app
        .post(
            "/api/announcements",
            serde_json::json!({"subject": "chunked", "message": "chunked"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    within("the announcement, chunked", async {
        while !String::from_utf8_lossy(&sse.pending).contains("event: announcement") {
            let mut buf = [0u8; 4096];
            let n = sse.tcp.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed");
            sse.pending.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert_eq!(fanout(&app).await.1, 0, "hyper's stream is no member");
    app.stop().await;
}

/// A reader that stops reading cannot take its batches: the fan-out hands it back to
/// follow on its own, the others are not held up, and once it reads again it gets
/// every event, in order, once, and rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_falls_behind_alone_and_later_gets_everything_once() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let zone = app.create_zone("Slow").await;
    let item = app.create_item(zone, "S", 0, 0).await as i32;
    let path = format!("/sse/zones/{zone}/stock");
    let mut slow = RawSse::open(&app, &path, None, Some(4096)).await;
    let mut fast = RawSse::open(&app, &path, None, None).await;
    fanout_until(&app, "both to join", |(_, m, _)| m == 2).await;
    let start = last_event_id(&app, zone).await;
    // The fast reader reads throughout, until it has seen the last change.
    let (last_tx, mut last_rx) = tokio::sync::watch::channel(u64::MAX);
    let fast_reader = tokio::spawn(async move {
        let mut ids = Vec::new();
        within_for(LOAD_WAIT, "the fast reader", async {
            while ids.last() != Some(&*last_rx.borrow_and_update()) {
                tokio::select! {
                    f = fast.next() => {
                        let f = f.expect("open");
                        if f.event != "heartbeat" {
                            ids.push(f.id.expect("id"));
                        }
                    }
                    _ = last_rx.changed() => {}
                }
            }
        })
        .await;
        (fast, ids)
    });
    let changes = changes_until_handed_back(&app, item).await;
    last_tx.send_replace(start + changes);
    let (mut fast, ids) = within_for(LOAD_WAIT, "the fast reader", fast_reader)
        .await
        .expect("fast reader");
    let want: Vec<u64> = (start + 1..=start + changes).collect();
    assert_eq!(ids, want, "the fast reader, not held up");
    assert_eq!(
        slow.ids(changes as usize, LOAD_WAIT).await,
        want,
        "the slow reader"
    );
    fanout_until(&app, "the slow reader to rejoin", |(_, m, _)| m == 2).await;
    app.service
        .update_item(item, patch(None), None, &Principal::system("test"))
        .await
        .expect("change");
    assert_eq!(slow.ids(1, WAIT).await, vec![start + changes + 1]);
    assert_eq!(fast.ids(1, WAIT).await, vec![start + changes + 1]);
    app.stop().await;
}

/// Connections that open while changes pour in, resuming from many points (behind the
/// fan-out, level with it, or ahead of it when they join), each get every seq after
/// their start once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_joining_while_changes_pour_in_get_every_seq_once_in_order() {
    const CHANGES: u64 = 800;
    const SUBSCRIBERS: u64 = 40;
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("Joining").await;
        let item = app.create_item(zone, "J", 0, 0).await as i32;
        let path = format!("/sse/zones/{zone}/stock");
        let start = last_event_id(&app, zone).await;
        let last = start + CHANGES;
        // One live from the start keeps the stream's fan-out running throughout.
        let mut first = RawSse::open(&app, &path, None, None).await;
        fanout_until(&app, "the first to join", |(_, m, _)| m == 1).await;
        let (service, admin) = (app.service.clone(), Principal::system("test"));
        let writer = tokio::spawn(async move {
            for _ in 0..CHANGES {
                service
                    .update_item(item, patch(None), None, &admin)
                    .await
                    .expect("change");
                tokio::task::yield_now().await;
            }
        });
        let mut readers = Vec::new();
        let mut rng = 0x1234_5678u64;
        for i in 0..SUBSCRIBERS {
            let now = last_event_id(&app, zone).await;
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // From the start, a little behind, or live.
            let from = match i % 3 {
                0 => start,
                1 => now.saturating_sub((rng >> 33) % 50).max(start),
                _ => now,
            };
            let mut sse = RawSse::open(&app, &path, Some(from), None).await;
            readers.push(tokio::spawn(async move {
                let ids = sse.ids((last - from) as usize, LOAD_WAIT).await;
                (from, ids)
            }));
        }
        within_for(LOAD_WAIT, "the writer", writer)
            .await
            .expect("writer");
        for r in readers {
            let (from, ids) = within_for(LOAD_WAIT, "a reader", r).await.expect("reader");
            let want: Vec<u64> = (from + 1..=last).collect();
            assert_eq!(ids, want, "a reader from {from}");
        }
        let want: Vec<u64> = (start + 1..=last).collect();
        assert_eq!(first.ids(CHANGES as usize, WAIT).await, want);
        app.stop().await;
    }
}

/// More members than a pass writes between two looks at the cursor (256), changes
/// back to back: a pass takes events that arrive while it runs for the members it has
/// not reached, and the next brings the rest level. Every member gets every seq once,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_group_under_back_to_back_changes_writes_every_seq_once_in_order() {
    const CHANGES: u64 = 300;
    const SUBSCRIBERS: u64 = 600;
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("Large").await;
        let item = app.create_item(zone, "L", 0, 0).await as i32;
        let path = format!("/sse/zones/{zone}/stock");
        let start = last_event_id(&app, zone).await;
        let last = start + CHANGES;
        let mut readers = Vec::new();
        for _ in 0..SUBSCRIBERS {
            let mut sse = RawSse::open(&app, &path, Some(start), None).await;
            readers.push(tokio::spawn(async move {
                sse.ids(CHANGES as usize, LOAD_WAIT).await
            }));
        }
        fanout_until(&app, "every subscriber in the group", |(_, m, _)| {
            m == SUBSCRIBERS
        })
        .await;
        for _ in 0..CHANGES {
            app.service
                .update_item(item, patch(None), None, &Principal::system("test"))
                .await
                .expect("change");
        }
        let want: Vec<u64> = (start + 1..=last).collect();
        for r in readers {
            let ids = within_for(LOAD_WAIT, "a reader", r).await.expect("reader");
            assert_eq!(ids, want);
        }
        app.stop().await;
    }
}

/// Revoking the key ends the connections the fan-out writes, and only those.
#[tokio::test]
async fn a_revoked_keys_streams_end_in_the_fanout() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let zone = app.create_zone("Revoked").await;
    let (name, key) = app.make_named_key(Role::Reader, ZoneScope::All, None).await;
    let path = format!("/sse/zones/{zone}/stock");
    let mut theirs = RawSse::open_as(&app, &key, &path, None, None).await;
    let mut ours = RawSse::open(&app, &path, None, None).await;
    fanout_until(&app, "both to join", |(_, m, _)| m == 2).await;
    let r = app
        .request(
            reqwest::Method::DELETE,
            &format!("/api/keys/{name}"),
            None,
            &[],
        )
        .await;
    assert!(r.status == 204 || r.status == 200, "{}", r.text);
    let ended = within("the revoked stream to end", async {
        loop {
            match theirs.next().await {
                None => return true,
                Some(f) if f.event == "heartbeat" => {}
                Some(f) => panic!("unexpected {f:?}"),
            }
        }
    })
    .await;
    assert!(ended);
    fanout_until(&app, "the revoked member to leave", |(_, m, _)| m == 1).await;
    let item = app.create_item(zone, "R", 1, 0).await;
    let f = within("our stream goes on", ours.next())
        .await
        .expect("open");
    assert_eq!(f.event, "item_created");
    let data: Value = serde_json::from_str(&f.data).expect("json");
    assert_eq!(data["data"]["item_id"], item);
    app.stop().await;
}

/// A WebSocket subscription that has caught up joins its stream's fan-out beside the
/// SSE connections: one group writes both, each in its own framing, every change in
/// order; the group lets a connection go as soon as it ends.
#[tokio::test]
async fn ws_and_sse_followers_of_one_stream_share_its_fanout() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let zone = app.create_zone("Both").await;
    let item = app.create_item(zone, "B", 0, 0).await;
    let mut sse = RawSse::open(&app, &format!("/sse/zones/{zone}/stock"), None, None).await;
    let (mut ws, _) = app.ws_welcomed(&format!("/ws/zones/{zone}")).await;
    fanout_until(&app, "both to join one group", |(g, m, _)| g == 1 && m == 2).await;
    let start = last_event_id(&app, zone).await;
    for _ in 0..3 {
        app.delta(item, 1).await;
    }
    let want: Vec<u64> = (start + 1..=start + 3).collect();
    assert_eq!(sse.ids(3, WAIT).await, want);
    let mut got = Vec::new();
    while got.len() < 3 {
        let v = ws.recv().await;
        got.push(v["id"].as_u64().expect("an event"));
    }
    assert_eq!(got, want);
    drop(ws);
    fanout_until(&app, "the WebSocket to leave the group", |(g, m, _)| {
        g == 1 && m == 1
    })
    .await;
    app.delta(item, 1).await;
    assert_eq!(sse.ids(1, WAIT).await, vec![start + 4]);
    app.stop().await;
}

/// `unsubscribed` comes after the stream's last event, and nothing of the stream
/// follows it, though the stream's fan-out was writing it.
#[tokio::test]
async fn nothing_of_a_stream_follows_its_unsubscribed_reply() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let zone = app.create_zone("Leaving").await;
    let item = app.create_item(zone, "L", 0, 0).await;
    let (mut ws, _) = app.ws_welcomed("/ws").await;
    let stream = format!("zone:{zone}");
    ws.send(serde_json::json!({"type": "subscribe", "stream": stream}))
        .await;
    assert_eq!(ws.recv().await["type"], "subscribed");
    fanout_until(&app, "the subscription to join", |(_, m, _)| m == 1).await;
    app.delta(item, 1).await;
    assert_eq!(ws.recv().await["type"], "stock_updated");
    ws.send(serde_json::json!({"type": "unsubscribe", "stream": stream}))
        .await;
    assert_eq!(ws.recv().await["type"], "unsubscribed");
    for _ in 0..3 {
        app.delta(item, 1).await;
    }
    ws.send(serde_json::json!({"type": "ping", "request_id": "after"}))
        .await;
    let next = ws.recv().await;
    assert_eq!(
        (next["type"].as_str(), next["request_id"].as_str()),
        (Some("pong"), Some("after")),
        "{next}"
    );
    fanout_until(&app, "the group to let it go", |(_, m, _)| m == 0).await;
    app.stop().await;
}

/// A WebSocket client that stops reading fills its connection's bounded queue: the
/// stream's fan-out hands the stream back, the connection pulls no more meanwhile, and
/// once the client reads again it gets every event once, in order, and rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ws_subscription_whose_queue_fills_is_handed_back_and_made_whole() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--ws-queue", "16"]).await;
    let zone = app.create_zone("Full").await;
    let item = app.create_item(zone, "F", 0, 0).await as i32;
    let mut ws = RawWs::connect(&app, &format!("/ws?access_token={}", app.key), Some(4096)).await;
    let text = |frame: Option<(u8, Vec<u8>)>| -> Value {
        let (op, payload) = frame.expect("open");
        assert_eq!(op, 1, "a text frame");
        serde_json::from_slice(&payload).expect("json")
    };
    assert_eq!(
        text(within("welcome", ws.next_frame()).await)["type"],
        "welcome"
    );
    let stream = format!("zone:{zone}");
    ws.send_text(&serde_json::json!({"type": "subscribe", "stream": stream}).to_string())
        .await;
    assert_eq!(
        text(within("subscribed", ws.next_frame()).await)["type"],
        "subscribed"
    );
    fanout_until(&app, "the subscription to join", |(_, m, _)| m == 1).await;
    let start = last_event_id(&app, zone).await;
    let changes = changes_until_handed_back(&app, item).await;
    let ids = within_for(LOAD_WAIT, "every event", async {
        let mut ids = Vec::new();
        while ids.len() < changes as usize {
            let (op, payload) = ws.next_frame().await.expect("open");
            if op != 1 {
                continue;
            }
            let v: Value = serde_json::from_slice(&payload).expect("json");
            assert_ne!(v["type"], "reset", "{v}");
            ids.push(v["id"].as_u64().expect("an event"));
        }
        ids
    })
    .await;
    assert_eq!(ids, (start + 1..=start + changes).collect::<Vec<u64>>());
    fanout_until(&app, "the subscription to rejoin", |(_, m, _)| m == 1).await;
    app.stop().await;
}
