use serde_json::json;

use zonecast::domain::StreamKey;

use crate::helpers::*;

#[tokio::test]
async fn sse_delivers_events_with_consecutive_ids_and_design_json() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "A-7", 10, 2).await;
        let mut sse = app.sse(&format!("/sse/zones/{zone}/stock"), None).await;
        for d in [-1, -2, 3, -4, 5] {
            app.delta(item, d).await;
        }
        let frames = sse.take(5).await;
        // Event 1 was the item's creation; live starts after it.
        assert_consecutive(&frames, 2, &format!("zone:{zone}"));
        let f = &frames[1];
        assert_eq!(f.event, "stock_updated");
        let at = f.data["at"].as_str().expect("at");
        assert!(at.ends_with('Z') && at.len() == 24, "{at}");
        let d = &f.data["data"];
        assert_eq!(d["item_id"], item);
        assert_eq!(d["sku"], "A-7");
        assert_eq!(
            (d["quantity"].clone(), d["previous_quantity"].clone()),
            (json!(7), json!(9))
        );
        assert_eq!(d["delta"], -2);
        assert_eq!(d["version"], 3);
        assert_eq!(d["low_stock"], false);
        assert_eq!(d["actor"], "key:admin", "the actor is the principal");
        let last = &frames[4].data["data"];
        assert_eq!(last["quantity"], 11);
        app.stop().await;
    }
}

#[tokio::test]
async fn sse_resumes_after_last_event_id_header_and_query() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 100, 0).await;
        let path = format!("/sse/zones/{zone}/stock");
        let mut last = 1; // the item's creation
        for via_query in [false, true] {
            let mut sse = app.sse(&path, Some("0")).await;
            let seen = sse.take(last as usize).await;
            let x = seen.last().expect("frames").seq();
            assert_eq!(x, last);
            drop(sse);
            for _ in 0..4 {
                app.delta(item, -1).await;
            }
            let mut resumed = if via_query {
                app.sse(&format!("{path}?last_event_id={x}"), None).await
            } else {
                app.sse(&path, Some(&x.to_string())).await
            };
            let frames = resumed.take(4).await;
            assert_consecutive(&frames, x + 1, &format!("zone:{zone}"));
            // Nothing more was replayed: the next frame is the next new change.
            let r = app.delta(item, 1).await;
            let next = resumed.next().await;
            assert_eq!(next.seq(), x + 5);
            assert_eq!(r["event_id"], x + 5);
            last = x + 5;
        }
        app.stop().await;
    }
}

#[tokio::test]
async fn sse_snapshot_first_then_events_after_it() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 5, 1).await;
        app.delta(item, 2).await;
        let mut sse = app
            .sse(&format!("/sse/zones/{zone}/stock?snapshot=1"), None)
            .await;
        let snap = sse.next().await;
        assert_eq!(snap.event, "stock_snapshot");
        assert_eq!(snap.seq(), 2);
        assert_eq!(snap.data["last_event_id"], 2);
        assert_eq!(snap.data["items"][0]["quantity"], 7);
        assert_eq!(app.snapshot(zone).await["last_event_id"], 2);
        app.delta(item, -1).await;
        let f = sse.next().await;
        assert_eq!((f.seq(), f.event.as_str()), (3, "stock_updated"));
        app.stop().await;
    }
}

#[tokio::test]
async fn sse_old_resume_point_gets_reset_then_live_events() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 100, 0).await;
        for _ in 0..9 {
            app.delta(item, -1).await;
        }
        // Keep only the newest 3 of the 10 events.
        app.service
            .prune(std::time::Duration::from_secs(3600), 3)
            .await
            .expect("prune");
        let path = format!("/sse/zones/{zone}/stock");
        let mut sse = app.sse(&path, Some("2")).await;
        let reset = sse.next().await;
        assert_eq!(reset.event, "reset");
        assert_eq!(reset.id, "", "a reset carries no id");
        assert_eq!(
            reset.data,
            json!({"reason": "history_expired", "earliest_id": 8, "last_event_id": 10})
        );
        app.delta(item, -1).await;
        assert_eq!(sse.next().await.seq(), 11);

        // A resume point still kept replays normally.
        let mut kept = app.sse(&path, Some("7")).await;
        let frames = kept.take(4).await;
        assert_consecutive(&frames, 8, &format!("zone:{zone}"));

        // In the future, or not a number: unknown_position, then live.
        for bad in ["99", "abc"] {
            let mut sse = app.sse(&path, Some(bad)).await;
            let reset = sse.next().await;
            assert_eq!(reset.event, "reset");
            assert_eq!(reset.data["reason"], "unknown_position", "{bad}");
            assert_eq!(reset.data["last_event_id"], 11);
        }
        app.stop().await;
    }
}

#[tokio::test]
async fn sse_heartbeats_arrive_without_an_id_line() {
    use futures_util::StreamExt;
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--heartbeat", "100ms", "--sse-retry", "1500ms"]).await;
    let zone = app.create_zone("A").await;
    let item = app.create_item(zone, "S", 3, 0).await;
    let resp = app
        .http
        .get(format!("{}/sse/zones/{zone}/stock", app.base))
        .header("Last-Event-ID", "0")
        .send()
        .await
        .expect("open");
    let mut body = resp.bytes_stream();
    let mut raw = String::new();
    while raw.matches("event: heartbeat").count() < 2 {
        let chunk = within("heartbeats", body.next())
            .await
            .expect("open stream")
            .expect("chunk");
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(raw.starts_with("retry: 1500\n\n"), "{raw}");
    let frames: Vec<&str> = raw.split("\n\n").filter(|f| !f.is_empty()).collect();
    let beats: Vec<&&str> = frames
        .iter()
        .filter(|f| f.contains("event: heartbeat"))
        .collect();
    assert!(beats.len() >= 2);
    for b in beats {
        assert!(!b.contains("id:"), "heartbeat with an id: {b:?}");
        assert!(b.contains("data: {\"at\":\""), "{b:?}");
    }
    // The event frame before them does carry its id.
    assert!(
        frames
            .iter()
            .any(|f| f.starts_with("id: 1\nevent: item_created\n"))
    );
    drop(body);
    let _ = item;
    app.stop().await;
}

#[tokio::test]
async fn low_stock_crossing_reaches_alerts_once_per_crossing() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 10, 5).await;
        let mut alerts = app.sse("/sse/alerts", Some("0")).await;
        app.delta(item, -4).await; // 6: not low
        let r = app.delta(item, -1).await; // 5: crosses
        app.delta(item, -1).await; // 4: still low, no alert
        app.delta(item, 10).await; // 14: recovers
        app.delta(item, -10).await; // 4: crosses again
        let a = alerts.take(2).await;
        assert_consecutive(&a, 1, "alerts");
        assert_eq!(a[0].event, "low_stock_alert");
        assert_eq!(a[0].data["data"]["item_id"], item);
        assert_eq!(a[0].data["data"]["quantity"], 5);
        assert_eq!(a[0].data["data"]["zone_event_id"], r["event_id"]);
        assert_eq!(a[1].data["data"]["quantity"], 4);
        app.stop().await;
    }
}

#[tokio::test]
async fn unknown_zone_stream_is_404_problem_and_streams_leave_no_channel() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    app.get("/sse/zones/999/stock")
        .await
        .assert_problem(404, "not_found");
    let zone = app.create_zone("A").await;
    let sse = app.sse(&format!("/sse/zones/{zone}/stock"), None).await;
    assert_eq!(
        app.service
            .broker()
            .subscribers(&StreamKey::parse(&format!("zone:{zone}")).expect("stream")),
        1
    );
    drop(sse);
    // The server notices the closed connection on its next write: a change makes one.
    let item = app.create_item(zone, "S", 1, 0).await;
    within("the channel to be dropped", async {
        while !app.service.broker().live_streams().is_empty() {
            app.delta(item, 1).await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn one_connection_carries_several_streams_and_resumes_them_all() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let z1 = app.create_zone("One").await;
        let z2 = app.create_zone("Two").await;
        let i1 = app.create_item(z1, "A", 10, 5).await;
        let i2 = app.create_item(z2, "B", 10, 0).await;
        let path = format!("/sse/streams?streams=zone:{z1},zone:{z2},alerts");
        let mut sse = app
            .sse(&path, Some(&format!("zone:{z1}=0,zone:{z2}=1")))
            .await;
        // zone 1 replays from 0 (its item_created), zone 2 is at 1, alerts live.
        let first = sse.next().await;
        assert_eq!(
            (first.data["stream"].as_str(), first.data["id"].as_u64()),
            (Some(format!("zone:{z1}").as_str()), Some(1))
        );
        assert_eq!(first.id, format!("alerts=0,zone:{z1}=1,zone:{z2}=1"));
        app.delta(i1, -5).await; // zone 1 event 2, and a low-stock alert
        app.delta(i2, -1).await; // zone 2 event 2
        let frames = sse.take(3).await;
        let mut by_stream: Vec<(String, u64)> = frames
            .iter()
            .map(|f| {
                (
                    f.data["stream"].as_str().unwrap_or("").to_owned(),
                    f.data["id"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        by_stream.sort();
        assert_eq!(
            by_stream,
            vec![
                ("alerts".into(), 1),
                (format!("zone:{z1}"), 2),
                (format!("zone:{z2}"), 2)
            ]
        );
        // The last frame's id holds every stream's position.
        let final_id = format!("alerts=1,zone:{z1}=2,zone:{z2}=2");
        assert_eq!(frames.last().map(|f| f.id.clone()), Some(final_id.clone()));
        drop(sse);
        // Resume with the composite id of the last frame: only what came after.
        app.delta(i2, -1).await;
        let mut again = app.sse(&path, Some(&final_id)).await;
        let f = again.next().await;
        assert_eq!(
            (f.data["stream"].as_str(), f.data["id"].as_u64()),
            (Some(format!("zone:{z2}").as_str()), Some(3))
        );
        assert_eq!(f.id, format!("alerts=1,zone:{z1}=2,zone:{z2}=3"));
        // Scope and input are checked before the stream starts.
        app.get("/sse/streams").await.assert_problem(422, "invalid");
        app.get("/sse/streams?streams=zone:999")
            .await
            .assert_problem(404, "not_found");
        app.get("/sse/streams?streams=user:nobody")
            .await
            .assert_problem(403, "forbidden");
        app.stop().await;
    }
}
