//! Several nodes on one PostgreSQL database, in one process: each node is a real server
//! with its own broker, listener and sweep; only the database is shared. (The suite of
//! real processes behind nginx, with SIGKILL, is `tests/cluster`.)

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use zonecast::app::{Application, StartError};
use zonecast::config::ServeArgs;
use zonecast::domain::{Role, ZoneScope};

use crate::helpers::*;

/// Two nodes, `a` and `b`, on one fresh PostgreSQL database; `b` also gets `flags_b`.
async fn two_nodes(flags_a: &[&str], flags_b: &[&str]) -> Option<(TestDb, TestApp, TestApp)> {
    let db = postgres_db().await?;
    let a = spawn_app(&db, &[&["--node-id", "a"], flags_a].concat()).await;
    let b = spawn_app(&db, &[&["--node-id", "b"], flags_b].concat()).await;
    Some((db, a, b))
}

/// Terminates the listening connection of `node` (as a failover or a network cut
/// would); returns how many backends it ended.
async fn terminate_listener(db: &TestDb, node: &str) -> u64 {
    use sea_orm::{ConnectionTrait, Database, Statement};
    let (admin, name) = db.postgres_admin().expect("a PostgreSQL database");
    let c = Database::connect(admin.as_str())
        .await
        .expect("admin connection");
    let sql = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND application_name = 'zonecast-listener {node}'"
    );
    let rows = c
        .query_all_raw(Statement::from_string(c.get_database_backend(), sql))
        .await
        .expect("terminate");
    rows.len() as u64
}

/// Waits until `app` answers `/readyz` with 200.
async fn until_ready(app: &TestApp) {
    within("the node to be ready", async {
        loop {
            if app.get("/readyz").await.status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn changes_made_on_one_node_reach_subscribers_of_every_kind_on_another() {
    let Some((_db, a, b)) = two_nodes(&[], &[]).await else {
        return;
    };
    let zone = a.create_zone("A").await;
    let item = a.create_item(zone, "S", 10, 5).await;
    let user = a.make_key(Role::Reader, ZoneScope::All, Some("u1")).await;
    // Watching through node b; the alert is made by a write on node a.
    let r = b
        .request_as(
            Some(&user),
            Method::POST,
            &format!("/api/zones/{zone}/watch"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    let mut stock = b.sse(&format!("/sse/zones/{zone}/stock"), Some("1")).await;
    let mut alerts = b.sse("/sse/alerts", None).await;
    let mut inbox = b.sse_as(&user, "/sse/notifications", None).await;
    let (mut ws, welcome) = b
        .ws_welcomed(&format!("/ws/zones/{zone}?last_event_id=1"))
        .await;
    assert_eq!(welcome["node_id"], "b", "{welcome}");

    a.delta(item, -6).await; // 10 → 4, at or below 5: low stock
    let f = stock.next().await;
    assert_eq!((f.event.as_str(), f.seq()), ("stock_updated", 2));
    assert_eq!(f.data["data"]["quantity"], 4);
    let m = ws.recv().await;
    assert_eq!(
        (m["type"].as_str(), m["id"].as_u64()),
        (Some("stock_updated"), Some(2)),
        "{m}"
    );
    let f = alerts.next().await;
    assert_eq!(f.event, "low_stock_alert");
    assert_eq!(f.data["data"]["zone_event_id"], 2);
    let got: Vec<String> = inbox.take(2).await.into_iter().map(|f| f.event).collect();
    assert_eq!(got, ["notification", "unread_count"]);

    let r = a
        .post(
            "/api/announcements",
            json!({"subject": "Stocktake", "message": "at 4"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let f = alerts.next().await;
    assert_eq!((f.event.as_str(), f.seq()), ("announcement", 2));

    // A write on b reaches a subscriber on a the same way.
    let mut on_a = a.sse(&format!("/sse/zones/{zone}/stock"), Some("2")).await;
    b.delta(item, 1).await;
    assert_eq!(on_a.next().await.seq(), 3);
    assert_eq!(stock.next().await.seq(), 3, "and b's own subscriber");

    for (app, node) in [(&a, "a"), (&b, "b")] {
        let s = app.get("/api/stats").await.json();
        assert_eq!(
            (s["node_id"].as_str(), s["scope"].as_str()),
            (Some(node), Some("node"))
        );
        assert_eq!(
            (s["broker"].as_str(), s["bus"].as_str()),
            (Some("postgres"), Some("listening"))
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_node_that_hears_no_announcement_still_gets_every_event_by_the_sweep() {
    // Node a runs the one-node broker: it announces nothing, as if every notification
    // were lost. Node b sees a's writes only through its sweep.
    let Some((_db, a, b)) =
        two_nodes(&["--broker", "memory"], &["--sweep-interval", "200ms"]).await
    else {
        return;
    };
    let zone = a.create_zone("A").await;
    let item = a.create_item(zone, "S", 0, 0).await;
    let mut on_b = b.sse(&format!("/sse/zones/{zone}/stock"), Some("1")).await;
    let (mut ws, _) = b
        .ws_welcomed(&format!("/ws/zones/{zone}?last_event_id=1"))
        .await;
    for _ in 0..40 {
        a.delta(item, 1).await;
    }
    let frames = on_b.take(40).await;
    assert_consecutive(&frames, 2, &format!("zone:{zone}"));
    for want in 2..=41u64 {
        let m = ws.recv().await;
        assert_eq!(m["id"].as_u64(), Some(want), "{m}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn while_its_listener_is_cut_again_and_again_a_node_misses_nothing_and_says_so() {
    let Some((db, a, b)) = two_nodes(&[], &["--sweep-interval", "300ms"]).await else {
        return;
    };
    let zone = a.create_zone("A").await;
    let item = a.create_item(zone, "S", 0, 0).await;
    let mut on_b = b.sse(&format!("/sse/zones/{zone}/stock"), Some("1")).await;
    until_ready(&b).await;

    // For 3 s, b's listening connection is terminated every 50 ms, while a writes and
    // b's readiness is watched.
    let cut = async {
        let mut ended = 0;
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < until {
            ended += terminate_listener(&db, "b").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ended
    };
    let write = async {
        for _ in 0..60 {
            a.delta(item, 1).await;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    };
    let watch = async {
        let mut unready = None;
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < until {
            let r = b.get("/readyz").await;
            if r.status == 503 {
                unready = Some(r.text);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        unready
    };
    let (ended, (), unready) = tokio::join!(cut, write, watch);
    assert!(ended >= 3, "the listener was cut {ended} times");
    let unready = unready.expect("/readyz said 503 while the listener was down");
    assert!(unready.contains("other nodes"), "{unready}");

    // It recovers: ready again, and every event reached b's subscriber once, in order,
    // the last ones too (with no later write to reveal a hole, only the sweep can
    // deliver what was announced while b was not listening).
    until_ready(&b).await;
    let frames = on_b.take(60).await;
    assert_consecutive(&frames, 2, &format!("zone:{zone}"));
    let metrics = b.get("/metrics").await.text;
    assert!(
        metrics.contains("zonecast_bus_reconnects_total"),
        "{metrics}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_revocation_made_on_one_node_ends_connections_on_another() {
    let Some((_db, a, b)) = two_nodes(&[], &["--revocation-check", "200ms"]).await else {
        return;
    };
    let zone = a.create_zone("A").await;
    let r = a
        .post("/api/keys", json!({"name": "scanner-9", "role": "reader"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let key = r.json()["key"].as_str().expect("key").to_owned();
    let mut sse = b
        .sse_as(&key, &format!("/sse/zones/{zone}/stock"), None)
        .await;
    let mut ws = b
        .ws_raw(&format!("/ws/zones/{zone}?access_token={key}"))
        .await;
    assert_eq!(ws.recv().await["type"], "welcome");
    let r = a
        .request(Method::DELETE, "/api/keys/scanner-9", None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    sse.assert_ends().await;
    assert_eq!(ws.close_code().await, 1008);
    b.request_as(Some(&key), Method::GET, "/api/zones", None)
        .await
        .assert_problem(401, "unauthorized");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn sqlite_serves_one_node_and_refuses_the_postgres_broker() {
    let db = TestDb::sqlite().await;
    match start_error(&db, &["--broker", "postgres"]).await {
        e @ StartError::Broker(_) => {
            assert!(e.to_string().contains("PostgreSQL"), "{e}");
        }
        e => panic!("another error: {e}"),
    }
    for bad in ["a b", "", "x\ny", &"n".repeat(65)] {
        assert!(
            ServeArgs::from_flags(["--node-id", bad]).is_err(),
            "{bad:?}"
        );
    }
    let app = spawn_app(&db, &["--node-id", "solo"]).await;
    let s = app.get("/api/stats").await.json();
    assert_eq!(
        (
            s["node_id"].as_str(),
            s["broker"].as_str(),
            s["bus"].as_str()
        ),
        (Some("solo"), Some("memory"), Some("one_node"))
    );
    app.stop().await;
}

#[tokio::test]
async fn nodes_started_at_once_on_a_new_database_migrate_and_seed_it_once() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let build = |node: &'static str| {
        let url = db.url.clone();
        async move {
            let flags = [
                "--bind",
                "127.0.0.1:0",
                "--database-url",
                &url,
                "--node-id",
                node,
            ];
            Application::build(ServeArgs::from_flags(flags).expect("flags"))
                .await
                .expect("a node starts")
        }
    };
    let (a, b, c) = tokio::join!(build("a"), build("b"), build("c"));
    let apps = [a, b, c];
    let keys = apps
        .iter()
        .filter(|a| a.first_admin_key().is_some())
        .count();
    let demos = apps.iter().filter(|a| a.demo_zone().is_some()).count();
    assert_eq!(
        (keys, demos),
        (1, 1),
        "one first admin key and one demo zone"
    );
    let key = apps
        .iter()
        .find_map(|a| a.first_admin_key())
        .expect("key")
        .to_owned();
    let zones = apps[0]
        .service()
        .zones(&zonecast::domain::Principal::system("test"))
        .await
        .expect("zones");
    assert_eq!(zones.len(), 1, "{zones:?}");
    assert!(!key.is_empty());
}
