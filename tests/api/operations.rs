use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use zonecast::domain::{Role, ZoneScope};

use crate::helpers::*;

/// Parses Prometheus text: `name{labels} value` lines and `#` comments only.
pub fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        out.insert(series.to_owned(), value);
    }
    out
}

#[tokio::test]
async fn metrics_and_stats_move_with_connections_writes_and_deliveries() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--heartbeat", "7s"]).await;
    let zone = app.create_zone("A").await;
    let item = app.create_item(zone, "S", 100, 0).await;
    let before = parse_prometheus(&app.get("/metrics").await.text);
    let get = |m: &HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);

    let user_key = app
        .make_key(Role::Reader, ZoneScope::All, Some("ops-user"))
        .await;
    let resp = client_with(Some(&user_key))
        .get(format!("{}/sse/zones/{zone}/stock", app.base))
        .send()
        .await
        .expect("sse");
    let mut sse = Sse::from_response(resp);
    let (mut ws, _) = app.ws_welcomed(&format!("/ws/zones/{zone}")).await;
    for _ in 0..5 {
        app.delta(item, -1).await;
    }
    sse.take(5).await;
    for _ in 0..5 {
        ws.recv().await;
    }

    let stats = app.get("/api/stats").await;
    assert_eq!(stats.status, 200, "{}", stats.text);
    let stats = stats.json();
    assert_eq!(stats["total_connections"], 2);
    assert_eq!(
        stats["connections_by_transport"],
        json!({"sse": 1, "ws": 1})
    );
    assert_eq!(
        stats["connections_by_stream"],
        json!({format!("zone:{zone}"): 2})
    );
    assert_eq!(stats["unique_users"], 1);
    assert_eq!(stats["heartbeat_interval"], 7000);
    assert!(stats["metrics"]["total_messages_sent"].as_u64() >= Some(10));
    assert!(stats["metrics"]["total_broadcasts"].as_u64() >= Some(6));
    assert!(
        stats["metrics"]["last_broadcast_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let reader = app.make_key(Role::Reader, ZoneScope::All, None).await;
    app.request_as(Some(&reader), reqwest::Method::GET, "/api/stats", None)
        .await
        .assert_problem(403, "forbidden");

    // The recorder is process-wide (other tests run beside this one), so counters
    // are compared as at least the movement this test caused.
    let metrics = app.get("/metrics").await;
    assert!(
        metrics.content_type.starts_with("text/plain"),
        "{}",
        metrics.content_type
    );
    let after = parse_prometheus(&metrics.text);
    let moved = |k: &str| get(&after, k) - get(&before, k);
    assert!(
        moved(r#"zonecast_events_appended_total{stream_kind="zone",type="stock_updated"}"#) >= 5.0
    );
    assert!(moved(r#"zonecast_deliveries_total{transport="sse"}"#) >= 5.0);
    assert!(moved(r#"zonecast_deliveries_total{transport="ws"}"#) >= 5.0);
    assert!(moved(r#"zonecast_connections_opened_total{transport="ws"}"#) >= 1.0);
    assert!(get(&after, r#"zonecast_connections{transport="sse"}"#) >= 1.0);
    assert!(moved("zonecast_write_duration_seconds_count") >= 5.0);
    // Recorded once per batch written: by the stream's fan-out for both connections,
    // once they have caught up.
    assert!(moved("zonecast_delivery_lag_seconds_count") >= 1.0);
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("zonecast_write_duration_seconds_bucket{le="))
    );

    // A resume from the log and a reset are counted too.
    let mut old = app
        .sse(&format!("/sse/zones/{zone}/stock"), Some("999"))
        .await;
    assert_eq!(old.next().await.event, "reset");
    let after = parse_prometheus(&app.get("/metrics").await.text);
    assert!(
        get(
            &after,
            r#"zonecast_resets_total{reason="unknown_position"}"#
        ) >= 1.0
    );
    drop((sse, ws, old));
    app.stop().await;
}

#[tokio::test]
async fn request_ids_are_returned_and_logged_and_tokens_are_not() {
    let db = TestDb::sqlite().await;
    let mut child = spawn_binary(&db.url, &["--log-format", "json"]).await;
    let key = child.key.clone().expect("first admin key");
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/api/zones?access_token={key}", child.base))
        .header("X-Request-Id", "req-7f3a")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-7f3a");
    let generated = http
        .get(format!("{}/healthz", child.base))
        .send()
        .await
        .expect("get");
    assert!(
        !generated.headers()["x-request-id"].is_empty(),
        "an id is made up when none is sent"
    );
    let bad = http
        .get(format!(
            "{}/api/zones?access_token=zk_wrong{key}",
            child.base
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(bad.status().as_u16(), 401);
    // An SSE stream with the token in the query, opened and closed.
    let sse = http
        .get(format!("{}/sse/alerts?access_token={key}", child.base))
        .send()
        .await
        .expect("sse");
    drop(sse);
    let status = child.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");

    let logs = child.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("req-7f3a"))
        .unwrap_or_else(|| panic!("no log line with the request id in:\n{logs}"));
    let v: Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(v["span"]["request_id"], "req-7f3a");
    assert_eq!(v["span"]["path"], "/api/zones");
    assert_eq!(v["fields"]["status"], 200);
    assert!(
        !logs.contains(&key[3..]),
        "a credential reached the logs:\n{logs}"
    );
    assert!(
        !logs.contains("access_token"),
        "a query string reached the logs"
    );
}

#[tokio::test]
async fn readyz_turns_503_when_the_database_goes_and_healthz_stays() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        assert_eq!(app.get("/readyz").await.status, 200);
        assert_eq!(app.get("/healthz").await.status, 200);
        if let Some((admin_url, name)) = db.postgres_admin() {
            // The database disappears under the running server.
            let admin = sea_orm::Database::connect(admin_url).await.expect("admin");
            use sea_orm::ConnectionTrait;
            admin
                .execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
                .await
                .expect("drop");
            app.get("/readyz").await.assert_problem(503, "unavailable");
            assert_eq!(app.get("/healthz").await.text, "ok");
        }
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_exits_zero_and_clients_resume_without_loss() {
    const SSE_CLIENTS: usize = 100;
    const WS_CLIENTS: usize = 20;
    let db = TestDb::sqlite().await;
    let flags = [
        "--shutdown-grace",
        "5s",
        "--write-rate",
        "0",
        "--connect-rate",
        "0",
        "--ws-message-rate",
        "0",
    ];
    let mut child = spawn_binary(&db.url, &flags).await;
    let key = child.key.clone().expect("first admin key");
    let http = client_with(Some(&key));
    let base = child.base.clone();
    let z = http
        .post(format!("{base}/api/zones"))
        .json(&json!({"name": "A"}))
        .send()
        .await
        .expect("zone");
    assert_eq!(z.status().as_u16(), 201);
    let i = http
        .post(format!("{base}/api/zones/1/items"))
        .json(&json!({"sku": "S", "name": "s", "quantity": 100000}))
        .send()
        .await
        .expect("item");
    assert_eq!(i.status().as_u16(), 201);

    // Each client collects the ids it saw until its stream ends.
    let mut sse_tasks = Vec::new();
    for _ in 0..SSE_CLIENTS {
        let resp = http
            .get(format!("{base}/sse/zones/1/stock"))
            .header("Last-Event-ID", "0")
            .send()
            .await
            .expect("sse");
        assert_eq!(resp.status().as_u16(), 200);
        let mut events = Sse::from_response(resp);
        sse_tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while let Some(f) = events.next_any().await {
                if f.event != "heartbeat" {
                    ids.push(f.seq());
                }
            }
            ids
        }));
    }
    let mut ws_tasks = Vec::new();
    for _ in 0..WS_CLIENTS {
        let url = format!(
            "{}/ws/zones/1?last_event_id=0&access_token={key}",
            base.replacen("http", "ws", 1)
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
        ws_tasks.push(tokio::spawn(async move {
            use tokio_tungstenite::tungstenite::Message;
            let mut ids = Vec::new();
            let mut code = None;
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(&t).expect("json");
                        if let Some(id) = v["id"].as_u64() {
                            ids.push(id);
                        }
                    }
                    Message::Close(f) => {
                        code = f.map(|f| u16::from(f.code));
                        break;
                    }
                    _ => {}
                }
            }
            (ids, code)
        }));
    }
    // Writes keep going while the server is told to stop.
    let writer = {
        let http = http.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let mut acked = 0u64;
            for _ in 0..100_000 {
                match http
                    .patch(format!("{base}/api/items/1"))
                    .json(&json!({"delta": -1}))
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => acked += 1,
                    _ => break,
                }
            }
            acked
        })
    };
    // Let some writes through before the signal.
    within("some writes", async {
        loop {
            let s: Value = http
                .get(format!("{base}/api/zones/1/items"))
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
            if s["last_event_id"].as_u64() >= Some(30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let status = child.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}");
    let acked = within("the writer", writer).await.expect("writer");

    let mut seen_sse = Vec::new();
    for t in sse_tasks {
        seen_sse.push(within("an SSE client", t).await.expect("sse client"));
    }
    let mut seen_ws = Vec::new();
    for t in ws_tasks {
        let (ids, code) = within("a WS client", t).await.expect("ws client");
        assert_eq!(code, Some(1012), "WS closed with 1012");
        seen_ws.push(ids);
    }

    // Restart on the same database; every client resumes from its last id.
    let mut child = spawn_binary(&db.url, &flags).await;
    let base = child.base.clone();
    let key2 = {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zonecast"))
            .args([
                "keys",
                "create",
                "--name",
                "after-restart",
                "--role",
                "admin",
                "--database-url",
                &db.url,
            ])
            .output()
            .expect("keys create");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("key")
            .to_owned()
    };
    let http = client_with(Some(&key2));
    let r = http
        .patch(format!("{base}/api/items/1"))
        .json(&json!({"delta": -1}))
        .send()
        .await
        .expect("write");
    assert_eq!(r.status().as_u16(), 200);
    let snap: Value = http
        .get(format!("{base}/api/zones/1/items"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let last = snap["last_event_id"].as_u64().expect("last id");
    // The item was created with event 1; every later event is one -1 change.
    assert_eq!(
        snap["items"][0]["quantity"].as_u64(),
        Some(100000 - (last - 1)),
        "no half-applied write"
    );
    assert!(last - 2 >= acked, "every acknowledged write is in the log");
    let all: Vec<u64> = (1..=last).collect();
    for ids in seen_sse {
        let from = ids.last().copied().unwrap_or(0);
        let resp = http
            .get(format!("{base}/sse/zones/1/stock"))
            .header("Last-Event-ID", from.to_string())
            .send()
            .await
            .expect("resume");
        let mut sse = Sse::from_response(resp);
        let mut got = ids;
        while got.last() != Some(&last) {
            got.push(sse.next().await.seq());
        }
        assert_eq!(
            got, all,
            "an SSE client lost or repeated an event across the restart"
        );
    }
    for ids in seen_ws {
        let from = ids.last().copied().unwrap_or(0);
        let url = format!(
            "{}/ws/zones/1?last_event_id={from}&access_token={key2}",
            base.replacen("http", "ws", 1)
        );
        let (inner, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
        let mut ws = Ws { inner };
        assert_eq!(ws.recv().await["type"], "welcome");
        let mut got = ids;
        while got.last() != Some(&last) {
            got.push(ws.recv().await["id"].as_u64().expect("event id"));
        }
        assert_eq!(
            got, all,
            "a WS client lost or repeated an event across the restart"
        );
    }
    let status = child.terminate(Duration::from_secs(10)).await;
    assert!(status.success());
}

/// mimalloc asks the kernel for transparent huge pages and hands freed memory back
/// after 10 ms; each touch after that zeroes 2 MiB. The binary turns huge pages off
/// for itself (a third of its CPU went to that zeroing in a reconnect storm).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages() {
    let db = TestDb::sqlite().await;
    let child = spawn_binary(&db.url, &[]).await;
    let pid = child.process.id().expect("the server's pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "{status}");
}

/// `zonecast migrate` takes the same lock as a starting node on PostgreSQL, so an
/// operator's migration and a node's cannot run at once. While another connection
/// holds the lock, `migrate` waits; once it is released, `migrate` finds nothing
/// pending and exits 0.
#[tokio::test]
async fn zonecast_migrate_waits_for_the_lock_a_starting_node_takes() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let migrate = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_zonecast"))
            .args(["migrate", "--database-url", db.url.as_str()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output()
    };
    let first = within("a first migration", migrate())
        .await
        .expect("run zonecast migrate");
    assert!(first.status.success(), "{first:?}");

    use sea_orm::{ConnectionTrait, TransactionTrait};
    let holder = sea_orm::Database::connect(db.url.as_str())
        .await
        .expect("connect");
    let txn = holder.begin().await.expect("begin");
    txn.execute_unprepared(
        "SELECT pg_advisory_xact_lock(hashtext('zonecast-migrate:' || current_schema()))",
    )
    .await
    .expect("take the migration lock");
    let mut second = tokio::spawn(migrate());
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut second)
            .await
            .is_err(),
        "zonecast migrate ran while a node held the migration lock"
    );
    txn.commit().await.expect("release the lock");
    let out = within("the migration after the lock", second)
        .await
        .expect("task")
        .expect("run zonecast migrate");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "applied 0 migration(s)"
    );
}
