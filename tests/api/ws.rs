use std::collections::HashMap;

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn ws_writes_reach_ws_and_sse_clients_with_identical_bytes() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 10, 0).await;
        let (mut a, welcome) = app.ws_welcomed(&format!("/ws/zones/{zone}")).await;
        assert_eq!(welcome["subscriptions"], json!([format!("zone:{zone}")]));
        assert!(welcome["connection_id"].is_string());
        assert_eq!(welcome["heartbeat_ms"], 30000);
        let (mut b, _) = app.ws_welcomed(&format!("/ws/zones/{zone}")).await;
        let resp = app
            .http
            .get(format!("{}/sse/zones/{zone}/stock", app.base))
            .send()
            .await
            .expect("sse");
        let mut sse_raw = resp.bytes_stream();

        a.send(json!({"type": "update_quantity", "request_id": "r1", "item_id": item, "delta": -3, "reason": "picked"}))
            .await;
        let mut ack = None;
        let mut event_a = None;
        while ack.is_none() || event_a.is_none() {
            let text = a.recv_text().await;
            let v: Value = serde_json::from_str(&text).expect("json");
            match v["type"].as_str() {
                Some("ack") => ack = Some(v),
                Some("stock_updated") => event_a = Some(text),
                other => panic!("unexpected {other:?}: {text}"),
            }
        }
        let ack = ack.expect("ack");
        assert_eq!(ack["request_id"], "r1");
        assert_eq!(ack["event_id"], 2);
        assert_eq!(ack["item"]["quantity"], 7);
        let event_a = event_a.expect("event");
        let event_b = b.recv_text().await;
        assert_eq!(event_a, event_b);

        use futures_util::StreamExt;
        let mut raw = String::new();
        while !raw.contains("event: stock_updated\ndata: ") || !raw.ends_with("\n\n") {
            let chunk = within("SSE bytes", sse_raw.next())
                .await
                .expect("open")
                .expect("chunk");
            raw.push_str(&String::from_utf8_lossy(&chunk));
        }
        let data_line = raw
            .lines()
            .find_map(|l| {
                l.strip_prefix("data: ")
                    .filter(|d| d.contains("stock_updated"))
            })
            .expect("data line");
        assert_eq!(
            data_line, event_a,
            "WS text == SSE data line, byte for byte"
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn ws_request_id_is_idempotent_and_stale_versions_conflict() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 10, 0).await;
        let (mut ws, _) = app.ws_welcomed("/ws").await;
        let msg =
            json!({"type": "update_quantity", "request_id": "same", "item_id": item, "delta": -1});
        ws.send(msg.clone()).await;
        let first = ws.recv_text().await;
        ws.send(msg).await;
        let again = ws.recv_text().await;
        assert_eq!(first, again, "the same ack");
        // Shared with REST's Idempotency-Key.
        let rest = app
            .patch(
                &format!("/api/items/{item}"),
                json!({"delta": -1}),
                &[("Idempotency-Key", "same")],
            )
            .await;
        assert_eq!(rest.json()["event_id"], 2);
        let snap = app.snapshot(zone).await;
        assert_eq!(
            (
                snap["last_event_id"].clone(),
                snap["items"][0]["quantity"].clone()
            ),
            (json!(2), json!(9))
        );

        ws.send(json!({"type": "update_quantity", "request_id": "old", "item_id": item, "quantity": 1, "expected_version": 1}))
            .await;
        let err = ws.recv().await;
        assert_eq!(
            (err["type"].as_str(), err["code"].as_str()),
            (Some("error"), Some("version_conflict"))
        );
        assert_eq!(err["request_id"], "old");
        ws.send(json!({"type": "update_quantity", "item_id": item, "delta": -100}))
            .await;
        assert_eq!(ws.recv().await["code"], "insufficient_stock");
        ws.send(json!({"type": "update_quantity", "item_id": 999, "delta": 1}))
            .await;
        assert_eq!(ws.recv().await["code"], "not_found");
        assert_eq!(app.snapshot(zone).await, snap, "nothing changed");

        ws.send(json!({"type": "request_stock", "zone_id": zone, "request_id": 5}))
            .await;
        let stock = ws.recv().await;
        assert_eq!(stock["type"], "stock_snapshot");
        assert_eq!(stock["request_id"], 5);
        assert_eq!(stock["last_event_id"], 2);
        assert_eq!(stock["items"][0]["quantity"], 9);
        app.stop().await;
    }
}

#[tokio::test]
async fn ws_holds_several_resumable_subscriptions_and_unsubscribes() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let z1 = app.create_zone("One").await;
        let z2 = app.create_zone("Two").await;
        let i1 = app.create_item(z1, "A", 100, 0).await;
        let i2 = app.create_item(z2, "B", 100, 0).await;
        for _ in 0..3 {
            app.delta(i1, -1).await;
            app.delta(i2, -1).await;
        }
        let (mut ws, _) = app.ws_welcomed("/ws").await;
        ws.send(json!({"type": "subscribe", "stream": format!("zone:{z1}"), "last_event_id": 2}))
            .await;
        assert_eq!(ws.recv().await["type"], "subscribed");
        ws.send(json!({"type": "subscribe", "stream": format!("zone:{z2}"), "last_event_id": 1}))
            .await;
        let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
        let mut subscribed = 0;
        while subscribed < 1 || seen.values().map(Vec::len).sum::<usize>() < 5 {
            let v = ws.recv().await;
            if v["type"] == "subscribed" {
                subscribed += 1;
                continue;
            }
            let stream = v["stream"].as_str().expect("stream").to_owned();
            seen.entry(stream)
                .or_default()
                .push(v["id"].as_u64().expect("id"));
        }
        app.delta(i1, -1).await;
        app.delta(i2, -1).await;
        while seen.values().map(Vec::len).sum::<usize>() < 7 {
            let v = ws.recv().await;
            let stream = v["stream"].as_str().expect("stream").to_owned();
            seen.entry(stream)
                .or_default()
                .push(v["id"].as_u64().expect("id"));
        }
        assert_eq!(seen[&format!("zone:{z1}")], vec![3, 4, 5]);
        assert_eq!(seen[&format!("zone:{z2}")], vec![2, 3, 4, 5]);

        ws.send(json!({"type": "unsubscribe", "stream": format!("zone:{z1}")}))
            .await;
        assert_eq!(
            ws.recv().await,
            json!({"type": "unsubscribed", "stream": format!("zone:{z1}")})
        );
        app.delta(i1, -1).await;
        app.delta(i2, -1).await;
        let next = ws.recv().await;
        assert_eq!(
            (next["stream"].as_str(), next["id"].as_u64()),
            (Some(format!("zone:{z2}").as_str()), Some(6))
        );
        ws.send(json!({"type": "subscribe", "stream": "zone:999"}))
            .await;
        assert_eq!(ws.recv().await["code"], "not_found");
        ws.send(json!({"type": "subscribe", "stream": "user:bob"}))
            .await;
        assert_eq!(ws.recv().await["code"], "forbidden");
        drop(ws);
        within("subscriptions to go", async {
            while !app.service.broker().live_streams().is_empty() {
                app.delta(i2, -1).await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        app.stop().await;
    }
}

#[tokio::test]
async fn ws_answers_every_bad_message_and_stays_open() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let (mut ws, _) = app.ws_welcomed("/ws").await;
    let bad = [
        ("not json", "bad_message"),
        ("[1,2]", "bad_message"),
        (r#"{"type":"fly"}"#, "unknown_type"),
        (
            r#"{"type":"update_quantity","item_id":"x","delta":1}"#,
            "invalid",
        ),
        (r#"{"type":"subscribe"}"#, "invalid"),
    ];
    for i in 0..200 {
        ws.send_text(bad[i % bad.len()].0).await;
    }
    for i in 0..200 {
        let e = ws.recv().await;
        assert_eq!(e["type"], "error");
        assert_eq!(e["code"], bad[i % bad.len()].1, "{e}");
        assert!(e["message"].is_string());
    }
    {
        use futures_util::SinkExt;
        ws.inner
            .send(tokio_tungstenite::tungstenite::Message::binary(vec![
                1u8, 2, 3,
            ]))
            .await
            .expect("send binary");
    }
    assert_eq!(ws.recv().await["code"], "bad_message");
    ws.send(json!({"type": "ping", "request_id": "p"})).await;
    assert_eq!(ws.recv().await, json!({"type": "pong", "request_id": "p"}));
    app.stop().await;
}

#[tokio::test]
async fn ws_closes_oversized_frames_and_silent_clients() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--ws-ping", "150ms"]).await;
    let (mut ws, welcome) = app.ws_welcomed("/ws").await;
    assert_eq!(welcome["heartbeat_ms"], 150);
    ws.send_text(&"x".repeat(1 << 20)).await;
    assert_eq!(ws.close_code().await, 1009);

    // A client that reads nothing answers no pings: closed with 1001.
    let ws = app.ws("/ws").await;
    let mut ws = ws;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(ws.close_code().await, 1001);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ws_updates_on_one_item_are_exact_and_gapless() {
    const CLIENTS: usize = 20;
    const UPDATES: usize = 100;
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 1_000_000, 0).await;
        let last = 1 + (CLIENTS * UPDATES) as u64;
        let mut tasks = Vec::new();
        let mut expected = 1_000_000i64;
        for c in 0..CLIENTS {
            let deltas: Vec<i64> = (0..UPDATES)
                // Never 0: a zero delta changes nothing and appends no event.
                .map(|u| match ((c * 7 + u * 13) % 11) as i64 - 5 {
                    0 => 6,
                    d => d,
                })
                .collect();
            expected += deltas.iter().sum::<i64>();
            let (mut ws, _) = app
                .ws_welcomed(&format!("/ws/zones/{zone}?last_event_id=1"))
                .await;
            tasks.push(tokio::spawn(async move {
                for (u, d) in deltas.iter().enumerate() {
                    ws.send(json!({"type": "update_quantity", "request_id": format!("c{c}-u{u}"), "item_id": item, "delta": d}))
                        .await;
                }
                let (mut acks, mut seqs) = (0, Vec::new());
                while acks < UPDATES || seqs.last() != Some(&last) {
                    let v = ws.recv().await;
                    match v["type"].as_str() {
                        Some("ack") => acks += 1,
                        Some("stock_updated") => seqs.push(v["id"].as_u64().expect("id")),
                        other => panic!("unexpected {other:?}: {v}"),
                    }
                }
                seqs
            }));
        }
        for t in tasks {
            let seqs = within_for(LOAD_WAIT, "a client", t).await.expect("client");
            assert_eq!(seqs, (2..=last).collect::<Vec<u64>>());
        }
        let snap = app.snapshot(zone).await;
        assert_eq!(snap["items"][0]["quantity"], expected);
        assert_eq!(snap["last_event_id"], last);
        app.stop().await;
    }
}

#[tokio::test]
async fn shutdown_closes_ws_with_1012_and_leaves_no_subscription() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let zone = app.create_zone("A").await;
    let (mut ws, _) = app.ws_welcomed(&format!("/ws/zones/{zone}")).await;
    let broker = app.service.broker().clone();
    assert_eq!(broker.live_streams().len(), 1);
    app.stop().await;
    assert_eq!(ws.close_code().await, 1012);
    // The feeder is aborted with its connection; its cursor drops at its next poll.
    within("the feeder to go with its connection", async {
        while !broker.live_streams().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}
