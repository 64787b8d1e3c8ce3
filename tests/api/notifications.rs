use reqwest::Method;
use serde_json::{Value, json};
use zonecast::domain::{Role, ZoneScope};

use crate::helpers::*;

/// Creates a notification for `user` as the admin; returns its id.
async fn notify(app: &TestApp, user: &str, subject: &str) -> i64 {
    let r = app
        .post("/api/notifications", json!({"user_id": user, "subject": subject, "message": "m", "priority": "high", "data": {"n": 1}}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["id"].as_i64().expect("id")
}

async fn sse_as(app: &TestApp, key: &str, last: Option<&str>) -> Sse {
    app.sse_as(key, "/sse/notifications", last).await
}

#[tokio::test]
async fn each_user_sees_only_their_own_notifications() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let alice = app
            .make_key(Role::Reader, ZoneScope::All, Some("alice"))
            .await;
        let bob = app
            .make_key(Role::Reader, ZoneScope::All, Some("bob"))
            .await;
        let mut alice_sse = sse_as(&app, &alice, None).await;
        let mut bob_sse = sse_as(&app, &bob, None).await;
        let mut bob_ws = app.ws_raw(&format!("/ws?access_token={bob}")).await;
        assert_eq!(bob_ws.recv().await["type"], "welcome");
        bob_ws
            .send(json!({"type": "subscribe", "stream": "user:bob"}))
            .await;
        assert_eq!(bob_ws.recv().await["type"], "subscribed");
        bob_ws
            .send(json!({"type": "subscribe", "stream": "user:alice"}))
            .await;
        assert_eq!(bob_ws.recv().await["code"], "forbidden");

        let a1 = notify(&app, "alice", "for alice").await;
        let b1 = notify(&app, "bob", "for bob").await;

        let f = alice_sse.take(2).await;
        assert_eq!(
            (f[0].event.as_str(), f[1].event.as_str()),
            ("notification", "unread_count")
        );
        assert_consecutive(&f, 1, "user:alice");
        assert_eq!(f[0].data["data"]["id"], a1);
        assert_eq!(f[0].data["data"]["subject"], "for alice");
        assert_eq!(f[0].data["data"]["priority"], "high");
        assert_eq!(f[1].data["data"], json!({"count": 1}));
        let f = bob_sse.take(2).await;
        assert_eq!(f[0].data["data"]["id"], b1, "bob's stream has only bob's");
        let w = bob_ws.recv().await;
        assert_eq!(
            (w["stream"].as_str(), w["data"]["id"].as_i64()),
            (Some("user:bob"), Some(b1))
        );

        let list = app
            .request_as(Some(&alice), Method::GET, "/api/notifications", None)
            .await
            .json();
        let ids: Vec<i64> = list
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|n| n["id"].as_i64())
            .collect();
        assert_eq!(ids, vec![a1]);
        // Another user's notification does not exist for bob.
        app.request_as(
            Some(&bob),
            Method::POST,
            &format!("/api/notifications/{a1}/read"),
            None,
        )
        .await
        .assert_problem(404, "not_found");
        bob_ws
            .send(json!({"type": "mark_read", "notification_id": a1}))
            .await;
        let r = loop {
            let r = bob_ws.recv().await;
            if r.get("stream").is_none() {
                break r;
            }
        };
        assert_eq!(r["code"], "not_found");
        let count = app
            .request_as(
                Some(&alice),
                Method::GET,
                "/api/notifications/unread-count",
                None,
            )
            .await;
        assert_eq!(count.json(), json!({"count": 1}), "alice's is still unread");
        // Readers cannot create notifications; keys without a user have no stream.
        let r = app
            .request_as(
                Some(&bob),
                Method::POST,
                "/api/notifications",
                Some(json!({"user_id": "alice", "subject": "s", "message": "m"})),
            )
            .await;
        r.assert_problem(403, "forbidden");
        app.get("/sse/notifications")
            .await
            .assert_problem(403, "forbidden");
        app.stop().await;
    }
}

#[tokio::test]
async fn a_read_on_one_connection_reaches_all_of_the_users_connections() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let carol = app
            .make_key(Role::Reader, ZoneScope::All, Some("carol"))
            .await;
        let n1 = notify(&app, "carol", "one").await;
        notify(&app, "carol", "two").await;
        let mut s1 = sse_as(&app, &carol, Some("4")).await;
        let mut s2 = sse_as(&app, &carol, Some("4")).await;
        let mut ws = app.ws_raw(&format!("/ws?access_token={carol}")).await;
        assert_eq!(ws.recv().await["type"], "welcome");
        ws.send(json!({"type": "subscribe", "stream": "user:carol", "last_event_id": 4}))
            .await;
        assert_eq!(ws.recv().await["type"], "subscribed");
        ws.send(json!({"type": "get_unread_count", "request_id": "c"}))
            .await;
        assert_eq!(
            ws.recv().await,
            json!({"type": "unread_count", "count": 2, "request_id": "c"})
        );

        ws.send(json!({"type": "mark_read", "notification_id": n1}))
            .await;
        let mut reply = None;
        let mut events = Vec::new();
        while reply.is_none() || events.len() < 2 {
            let v = ws.recv().await;
            if v["type"] == "marked_read" {
                reply = Some(v);
            } else {
                events.push(v);
            }
        }
        assert_eq!(
            reply,
            Some(json!({"type": "marked_read", "ids": [n1], "unread_count": 1}))
        );
        assert_eq!(events[0]["type"], "notification_read");
        assert_eq!(events[0]["data"]["ids"], json!([n1]));
        assert_eq!(events[1]["data"], json!({"count": 1}));
        for sse in [&mut s1, &mut s2] {
            let f = sse.take(2).await;
            assert_consecutive(&f, 5, "user:carol");
            assert_eq!(f[0].event, "notification_read");
            assert_eq!(f[0].data["data"]["ids"], json!([n1]));
            assert_eq!(f[1].data["data"]["count"], 1);
        }
        // Marking it again changes nothing and appends nothing.
        let again = app
            .request_as(
                Some(&carol),
                Method::POST,
                &format!("/api/notifications/{n1}/read"),
                None,
            )
            .await;
        assert_eq!(again.json(), json!({"ids": [], "unread_count": 1}));
        // Read-all over REST reaches the WS connection too.
        let all = app
            .request_as(
                Some(&carol),
                Method::POST,
                "/api/notifications/read-all",
                None,
            )
            .await;
        assert_eq!(all.json()["unread_count"], 0);
        let e = ws.recv().await;
        assert_eq!(
            (e["type"].as_str(), e["id"].as_u64()),
            (Some("notification_read"), Some(7))
        );
        assert_eq!(ws.recv().await["data"], json!({"count": 0}));
        let unread = app
            .request_as(
                Some(&carol),
                Method::GET,
                "/api/notifications?unread=true",
                None,
            )
            .await;
        assert_eq!(unread.json(), json!([]));
        app.stop().await;
    }
}

#[tokio::test]
async fn notifications_made_while_offline_arrive_once_on_resume() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let dave = app
            .make_key(Role::Reader, ZoneScope::All, Some("dave"))
            .await;
        notify(&app, "dave", "before").await;
        let mut sse = sse_as(&app, &dave, Some("0")).await;
        let seen = sse.take(2).await;
        drop(sse);
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(notify(&app, "dave", &format!("offline {i}")).await);
        }
        let mut sse = sse_as(&app, &dave, Some(&seen[1].id)).await;
        let f = sse.take(6).await;
        assert_consecutive(&f, 3, "user:dave");
        let got: Vec<Value> = f
            .iter()
            .filter(|x| x.event == "notification")
            .map(|x| x.data["data"]["id"].clone())
            .collect();
        assert_eq!(got, ids.iter().map(|i| json!(i)).collect::<Vec<_>>());
        assert_eq!(f[5].data["data"]["count"], 4);
        let count = app
            .request_as(
                Some(&dave),
                Method::GET,
                "/api/notifications/unread-count",
                None,
            )
            .await;
        assert_eq!(count.json()["count"], 4, "REST agrees");
        // Paging: newest first, before = the smallest id seen.
        let page = app
            .request_as(Some(&dave), Method::GET, "/api/notifications?limit=2", None)
            .await
            .json();
        assert_eq!(page[0]["id"], ids[2]);
        let before = page[1]["id"].as_i64().expect("id");
        let rest = app
            .request_as(
                Some(&dave),
                Method::GET,
                &format!("/api/notifications?before={before}"),
                None,
            )
            .await
            .json();
        assert_eq!(rest.as_array().map(Vec::len), Some(2));
        app.stop().await;
    }
}

#[tokio::test]
async fn watchers_get_one_stock_alert_per_crossing_and_others_none() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 10, 5).await;
        let erin = app
            .make_key(Role::Reader, ZoneScope::All, Some("erin"))
            .await;
        let frank = app
            .make_key(Role::Reader, ZoneScope::All, Some("frank"))
            .await;
        let r = app
            .request_as(
                Some(&erin),
                Method::POST,
                &format!("/api/zones/{zone}/watch"),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let again = app
            .request_as(
                Some(&erin),
                Method::POST,
                &format!("/api/zones/{zone}/watch"),
                None,
            )
            .await;
        assert_eq!(again.status, 200, "watching twice is fine");
        let mut sse = sse_as(&app, &erin, None).await;

        app.delta(item, -5).await; // 5: crosses
        app.delta(item, -1).await; // 4: still low
        app.delta(item, 10).await; // 14: recovers
        let second = app.delta(item, -10).await; // 4: crosses again
        let f = sse.take(4).await;
        assert_consecutive(&f, 1, "user:erin");
        let alerts: Vec<&Frame> = f.iter().filter(|x| x.event == "notification").collect();
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[0].data["data"]["kind"], "stock_alert");
        assert_eq!(alerts[0].data["data"]["data"]["quantity"], 5);
        assert_eq!(
            alerts[1].data["data"]["data"]["zone_event_id"],
            second["event_id"]
        );
        let list = app
            .request_as(Some(&frank), Method::GET, "/api/notifications", None)
            .await;
        assert_eq!(list.json(), json!([]), "a non-watcher gets none");

        // After unwatching, a new crossing notifies nobody.
        let r = app
            .request(
                Method::DELETE,
                &format!("/api/zones/{zone}/watch"),
                None,
                &[],
            )
            .await;
        r.assert_problem(403, "forbidden"); // the admin key has no user
        app.request_as(
            Some(&erin),
            Method::DELETE,
            &format!("/api/zones/{zone}/watch"),
            None,
        )
        .await;
        app.delta(item, 10).await;
        app.delta(item, -10).await;
        let n = app
            .request_as(Some(&erin), Method::GET, "/api/notifications", None)
            .await
            .json();
        assert_eq!(n.as_array().map(Vec::len), Some(2));
        app.stop().await;
    }
}

#[tokio::test]
async fn announcements_reach_alert_subscribers() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let mut alerts = app.sse("/sse/alerts", None).await;
    let r = app
        .post("/api/announcements", json!({"subject": "Stocktake", "message": "Zone A closes at 16:00", "priority": "urgent"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let f = alerts.next().await;
    assert_eq!((f.event.as_str(), f.seq()), ("announcement", 1));
    assert_eq!(f.data["data"]["subject"], "Stocktake");
    assert_eq!(f.data["data"]["priority"], "urgent");
    assert_eq!(r.json()["event_id"], 1);
    let writer = app.make_key(Role::Writer, ZoneScope::All, None).await;
    app.request_as(
        Some(&writer),
        Method::POST,
        "/api/announcements",
        Some(json!({"subject": "s", "message": "m"})),
    )
    .await
    .assert_problem(403, "forbidden");
    app.stop().await;
}
