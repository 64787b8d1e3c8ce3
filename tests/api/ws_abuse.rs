//! WebSocket clients that break the protocol, flood, or stop reading: each gets the
//! documented close code, the close frame reaches it, and nothing of its connection
//! stays behind on the server.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

async fn welcomed(app: &TestApp, rcvbuf: Option<u32>) -> RawWs {
    let mut ws = RawWs::connect(app, &format!("/ws?access_token={}", app.key), rcvbuf).await;
    let (op, payload) = within("welcome", ws.next_frame())
        .await
        .expect("welcome frame");
    assert_eq!(op, 1);
    let v: Value = serde_json::from_slice(&payload).expect("json");
    assert_eq!(v["type"], "welcome");
    ws
}

async fn next_json(ws: &mut RawWs) -> Value {
    within("a text frame", async {
        loop {
            let (op, payload) = ws.next_frame().await.expect("open");
            if op == 1 {
                return serde_json::from_slice(&payload).expect("json");
            }
        }
    })
    .await
}

#[tokio::test]
async fn protocol_errors_close_with_the_codes_of_rfc_6455() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "invalid UTF-8 text",
            ws_frame(1, true, 0, &[0x7b, 0xff, 0xfe], false),
            1007,
        ),
        ("unmasked frame", ws_frame(1, true, 0, b"{}", true), 1002),
        ("RSV1 set", ws_frame(1, true, 4, b"{}", false), 1002),
        ("reserved opcode", ws_frame(3, true, 0, b"{}", false), 1002),
        (
            "continuation without a start",
            ws_frame(0, true, 0, b"{}", false),
            1002,
        ),
        ("fragmented ping", ws_frame(9, false, 0, b"", false), 1002),
        (
            "frame over 64 KiB",
            ws_frame(1, true, 0, &vec![b' '; 70_000], false),
            1009,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut ws = welcomed(&app, None).await;
        // The server may close before it has read everything (the oversized frame).
        let _ = ws.send_raw(&bytes).await;
        assert_eq!(ws.close_code().await, Some(code), "{what}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_close_the_server_starts_reaches_the_client_every_time() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    for i in 0..20 {
        let mut ws = welcomed(&app, None).await;
        // The oversized frame is sent whole, so unread input is waiting when the server
        // decides to close: without a lingering close this resets the connection.
        let _ = ws
            .send_raw(&ws_frame(1, true, 0, &vec![b'x'; 200_000], false))
            .await;
        assert_eq!(ws.close_code().await, Some(1009), "attempt {i}");
    }
    app.stop().await;
}

#[tokio::test]
async fn binary_frames_count_against_the_message_limit_and_the_flood_close() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--ws-message-rate", "1", "--ws-message-burst", "2"]).await;
    let mut ws = welcomed(&app, None).await;
    for _ in 0..4 {
        ws.send_raw(&ws_frame(2, true, 0, b"\x00\x01", false))
            .await
            .expect("send");
    }
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(
            next_json(&mut ws).await["code"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        );
    }
    assert_eq!(
        codes,
        ["bad_message", "bad_message", "rate_limited", "rate_limited"]
    );
    // Far past the limit, binary frames alone get the connection closed.
    let burst: Vec<u8> = (0..300)
        .flat_map(|_| ws_frame(2, true, 0, b"\x00", false))
        .collect();
    let _ = ws.send_raw(&burst).await;
    assert_eq!(ws.close_code().await, Some(1008));
    app.stop().await;
}

async fn open_sockets(app: &TestApp) -> u64 {
    app.get("/api/stats").await.json()["open_sockets"]
        .as_u64()
        .expect("open_sockets")
}

/// A zone with one item whose events are large (a 200-character name), so a few
/// hundred of them fill a small socket buffer.
async fn zone_with_a_long_item(app: &TestApp) -> (i64, i64) {
    let zone = app.create_zone("A").await;
    let r = app
        .post(
            &format!("/api/zones/{zone}/items"),
            json!({"sku": "S", "name": "n".repeat(200), "quantity": 1_000_000}),
        )
        .await;
    assert_eq!(r.status, 201);
    (zone, r.json()["item"]["id"].as_i64().expect("id"))
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_its_socket_freed() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--ws-ping", "200ms", "--ws-queue", "16"]).await;
    let (zone, item) = zone_with_a_long_item(&app).await;
    let before = open_sockets(&app).await;
    // A small receive window: the server's socket buffer fills after a few hundred
    // events, then its queue, then its writer blocks.
    let mut ws = welcomed(&app, Some(4096)).await;
    ws.send_text(&json!({"type": "subscribe", "stream": format!("zone:{zone}")}).to_string())
        .await;
    assert_eq!(open_sockets(&app).await, before + 1);
    for _ in 0..600 {
        app.delta(item, -1).await;
    }
    // Silent for two ping intervals: closed, and the socket is gone from the server
    // even though its send buffer never drained.
    within_for(Duration::from_secs(30), "the socket to be freed", async {
        while open_sockets(&app).await > before {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The client sees the end of the connection once it reads what was buffered.
    within("EOF", async { while ws.next_frame().await.is_some() {} }).await;
    // Writers were never held up by it.
    let r = app.delta(item, -1).await;
    assert_eq!(r["item"]["quantity"], 1_000_000 - 601);
    app.stop().await;
}

#[tokio::test]
async fn a_connection_holds_a_bounded_number_of_subscriptions() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let max = zonecast::transport::ws::MAX_SUBSCRIPTIONS;
    let mut zones = Vec::new();
    for i in 0..=max {
        zones.push(app.create_zone(&format!("Z{i}")).await);
    }
    let (mut ws, _) = app.ws_welcomed("/ws").await;
    for (i, z) in zones.iter().enumerate() {
        ws.send(json!({"type": "subscribe", "stream": format!("zone:{z}")}))
            .await;
        let r = ws.recv().await;
        if i < max {
            assert_eq!(r["type"], "subscribed", "{r}");
        } else {
            assert_eq!(
                (r["type"].as_str(), r["code"].as_str()),
                (Some("error"), Some("invalid")),
                "{r}"
            );
        }
    }
    // Re-subscribing to one already held is still fine.
    ws.send(json!({"type": "subscribe", "stream": format!("zone:{}", zones[0])}))
        .await;
    assert_eq!(ws.recv().await["type"], "subscribed");
    app.stop().await;
}

/// A client that pauses reading blocks only its own socket: the server stops taking
/// events for it (at most one batch waits) and, once it reads again, it gets every
/// event once, in order, from the cache or the log; writers are not held up.
#[tokio::test]
async fn a_client_that_pauses_reading_gets_everything_once_it_reads_again() {
    const CHANGES: u64 = 600;
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--ws-queue", "16", "--cache-events", "64"]).await;
    let (zone, item) = zone_with_a_long_item(&app).await;
    let mut ws = welcomed(&app, Some(4096)).await;
    let stream = format!("zone:{zone}");
    ws.send_text(&json!({"type": "subscribe", "stream": stream, "last_event_id": 1}).to_string())
        .await;
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    // Not read meanwhile: far more than the socket buffers and one batch hold.
    for _ in 0..CHANGES {
        app.delta(item, -1).await;
    }
    let mut seqs = Vec::new();
    while seqs.len() < CHANGES as usize {
        let v = next_json(&mut ws).await;
        assert_ne!(v["type"], "reset", "{v}");
        if let Some(id) = v["id"].as_u64() {
            seqs.push(id);
        }
    }
    assert_eq!(seqs, (2..=CHANGES + 1).collect::<Vec<u64>>());
    let last = next_json(&mut ws);
    app.delta(item, -1).await;
    assert_eq!(last.await["id"], CHANGES + 2);
    app.stop().await;
}
