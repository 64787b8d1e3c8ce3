//! Hostile and careless clients (issue 10): bodies, scopes, idempotency keys, expired
//! credentials, protocol abuse. Each test failed against the server before its fix.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zonecast::domain::{Role, ZoneScope};

use crate::helpers::*;

async fn raw(app: &TestApp) -> TcpStream {
    connect_from(app.addr(), "127.0.0.1".parse().expect("ip")).await
}

/// A complete HTTP response: its head, and a body as long as its `Content-Length`.
fn complete(out: &[u8]) -> bool {
    let text = String::from_utf8_lossy(out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|n| body.len() >= n)
}

/// Writes `head` (and nothing else) and reads the answer until the server closes or
/// the head of a response with its body has arrived.
async fn answer_to_head(app: &TestApp, head: &str) -> String {
    let mut s = raw(app).await;
    s.write_all(head.as_bytes()).await.expect("write");
    let out = read_until_closed(&mut s, complete).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_before_it_is_sent() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--max-body", "64KiB"]).await;
    let zone = app.create_zone("A").await;
    let item = app.create_item(zone, "S", 10, 0).await;
    let reader = app.make_key(Role::Reader, ZoneScope::All, None).await;
    // 50 MiB announced, none of it sent: the answer comes at once.
    let head = format!(
        "PATCH /api/items/{item} HTTP/1.1\r\nHost: z\r\nAuthorization: Bearer {reader}\r\n\
         Content-Type: application/json\r\nContent-Length: 52428800\r\n\r\n"
    );
    let answer = answer_to_head(&app, &head).await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert!(answer.contains("application/problem+json") && answer.contains("too_large"));
    // Anonymous: refused for its credentials, and the body is never read either.
    let head = format!(
        "POST /api/zones/{zone}/items HTTP/1.1\r\nHost: z\r\nContent-Type: application/json\r\n\
         Content-Length: 209715200\r\n\r\n"
    );
    let answer = answer_to_head(&app, &head).await;
    assert_eq!(status_of(&answer), 401, "{answer}");
    app.stop().await;
}

#[tokio::test]
async fn a_chunked_body_is_cut_off_at_the_limit() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--max-body", "1KiB"]).await;
    let zone = app.create_zone("A").await;
    let item = app.create_item(zone, "S", 10, 0).await;
    // Chunked (no Content-Length): 1 MiB of valid JSON that would apply if it were
    // read whole.
    let parts = std::iter::once(bytes::Bytes::from(r#"{"delta": -1"#))
        .chain((0..256).map(|_| bytes::Bytes::from(vec![b' '; 4096])))
        .chain(std::iter::once(bytes::Bytes::from("}")));
    let chunks = futures_util::stream::iter(parts.map(Ok::<_, std::io::Error>));
    let resp = app
        .http
        .patch(format!("{}/api/items/{item}", app.base))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    // The server may answer and close before the client has sent everything.
    if let Ok(resp) = resp {
        Reply::read(resp).await.assert_problem(413, "too_large");
    }
    // A body under the limit, chunked too, is read and applied.
    let small = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(
        r#"{"delta": -1}"#,
    ))]);
    let resp = app
        .http
        .patch(format!("{}/api/items/{item}", app.base))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(small))
        .send()
        .await
        .expect("sent");
    let r = Reply::read(resp).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json()["item"]["quantity"],
        9,
        "the oversized body applied nothing"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_arrives_too_slowly_gets_408() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--header-timeout", "300ms"]).await;
    let zone = app.create_zone("A").await;
    let item = app.create_item(zone, "S", 10, 0).await;
    let mut s = raw(&app).await;
    let head = format!(
        "PATCH /api/items/{item} HTTP/1.1\r\nHost: z\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 13\r\n\r\n{{\"de",
        app.key
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = within("the 408", s.read(&mut buf)).await.expect("read");
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert_eq!(app.snapshot(zone).await["items"][0]["quantity"], 10);
    app.stop().await;
}

/// Role × scope for key management and stats. A principal grants, sees and revokes
/// only what lies within its own role and zones; an admin of some zones sees in
/// `/api/stats` only the connections and streams it could read itself.
#[tokio::test]
async fn key_management_and_stats_stay_within_the_callers_role_and_scope() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let z1 = app.create_zone("One").await as i32;
    let z2 = app.create_zone("Two").await as i32;
    let one = || ZoneScope::Only(vec![z1]);
    let who: Vec<(&str, String)> = vec![
        (
            "reader*",
            app.make_key(Role::Reader, ZoneScope::All, None).await,
        ),
        ("reader1", app.make_key(Role::Reader, one(), None).await),
        (
            "writer*",
            app.make_key(Role::Writer, ZoneScope::All, None).await,
        ),
        ("writer1", app.make_key(Role::Writer, one(), None).await),
        ("admin*", app.key.clone()),
        (
            "admin1",
            app.make_key(Role::Admin, one(), Some("lead")).await,
        ),
    ];
    // (what, body of POST /api/keys, expected status per principal in `who` order)
    let creates: Vec<(&str, Value, [u16; 6])> = vec![
        (
            "admin for *",
            json!({"role": "admin", "zones": "*"}),
            [403, 403, 403, 403, 201, 403],
        ),
        (
            "reader for 1",
            json!({"role": "reader", "zones": [z1]}),
            [403, 403, 403, 403, 201, 201],
        ),
        (
            "admin for 1",
            json!({"role": "admin", "zones": [z1]}),
            [403, 403, 403, 403, 201, 201],
        ),
        (
            "reader for 2",
            json!({"role": "reader", "zones": [z2]}),
            [403, 403, 403, 403, 201, 403],
        ),
        (
            "reader for 1,2",
            json!({"role": "reader", "zones": [z1, z2]}),
            [403, 403, 403, 403, 201, 403],
        ),
        (
            "reader for 1 as bob",
            json!({"role": "reader", "zones": [z1], "user": "bob"}),
            [403, 403, 403, 403, 201, 403],
        ),
        (
            "reader for 1 as lead",
            json!({"role": "reader", "zones": [z1], "user": "lead"}),
            [403, 403, 403, 403, 201, 201],
        ),
    ];
    let mut n = 0;
    for (what, body, want) in &creates {
        for ((name, key), want) in who.iter().zip(want) {
            n += 1;
            let mut body = body.clone();
            body["name"] = json!(format!("made-{n}"));
            let r = app
                .request_as(Some(key), Method::POST, "/api/keys", Some(body))
                .await;
            assert_eq!(r.status, *want, "create {what} as {name}: {}", r.text);
            if *want == 403 {
                r.assert_problem(403, "forbidden");
            }
        }
    }
    // Listing: nothing for non-admins; an admin of zone 1 sees only keys it could
    // have made.
    let scoped = &who[5].1;
    for (_, key) in &who[..4] {
        app.request_as(Some(key), Method::GET, "/api/keys", None)
            .await
            .assert_problem(403, "forbidden");
    }
    let all = app.get("/api/keys").await.json();
    let mine = app
        .request_as(Some(scoped), Method::GET, "/api/keys", None)
        .await
        .json();
    let all = all.as_array().expect("list");
    let mine = mine.as_array().expect("list");
    assert!(mine.len() < all.len());
    for k in mine {
        assert_eq!(k["zones"], json!([z1]), "{k}");
        assert!(k["user"].is_null() || k["user"] == "lead", "{k}");
    }
    let admin_names: Vec<&str> = all.iter().filter_map(|k| k["name"].as_str()).collect();
    // Revoking: an unscoped key is "not found" for the scoped admin and unchanged.
    let unscoped = all
        .iter()
        .find(|k| k["zones"] == "*" && k["role"] == "reader")
        .and_then(|k| k["name"].as_str())
        .expect("an unscoped key");
    app.request_as(
        Some(scoped),
        Method::DELETE,
        &format!("/api/keys/{unscoped}"),
        None,
    )
    .await
    .assert_problem(404, "not_found");
    assert!(
        app.get("/api/keys")
            .await
            .json()
            .as_array()
            .expect("list")
            .iter()
            .any(|k| k["name"] == unscoped && k["revoked_at"].is_null())
    );
    let zone_one_key = mine
        .iter()
        .find(|k| {
            k["role"] == "reader"
                && k["user"].is_null()
                && k["name"].as_str().is_some_and(|n| n.starts_with("made-"))
        })
        .and_then(|k| k["name"].as_str())
        .expect("a zone-1 reader key made above");
    let r = app
        .request_as(
            Some(scoped),
            Method::DELETE,
            &format!("/api/keys/{zone_one_key}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    app.request_as(
        Some(&who[2].1),
        Method::DELETE,
        &format!("/api/keys/{zone_one_key}"),
        None,
    )
    .await
    .assert_problem(403, "forbidden");
    assert!(admin_names.contains(&zone_one_key));

    // Stats: one stream per zone and one user stream are open.
    let bob = app
        .make_key(Role::Reader, ZoneScope::All, Some("bob"))
        .await;
    let mut open = Vec::new();
    for path in [
        format!("/sse/zones/{z1}/stock"),
        format!("/sse/zones/{z2}/stock"),
        "/sse/notifications".to_owned(),
    ] {
        let resp = client_with(Some(&bob))
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .expect("sse");
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        open.push(Sse::from_response(resp));
    }
    let full = within("stats to list three", async {
        loop {
            let st = app.get("/api/stats").await.json();
            if st["total_connections"] == 3 {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(full["connections_by_stream"][format!("zone:{z2}")], 1);
    assert_eq!(full["connections_by_stream"]["user:bob"], 1);
    assert_eq!(full["unique_users"], 1);
    let part = app
        .request_as(Some(scoped), Method::GET, "/api/stats", None)
        .await;
    assert_eq!(part.status, 200, "{}", part.text);
    let part = part.json();
    assert_eq!(part["total_connections"], 1, "{part}");
    assert_eq!(
        part["connections_by_stream"],
        json!({ format!("zone:{z1}"): 1 }),
        "{part}"
    );
    for (_, key) in &who[..4] {
        app.request_as(Some(key), Method::GET, "/api/stats", None)
            .await
            .assert_problem(403, "forbidden");
    }
    drop(open);
    app.stop().await;
}

/// PATCH as `key` with an optional idempotency key.
async fn patch_as(
    app: &TestApp,
    key: &str,
    item: i64,
    body: Value,
    idempotency: Option<&str>,
) -> Reply {
    let mut req = client_with(Some(key))
        .patch(format!("{}/api/items/{item}", app.base))
        .json(&body);
    if let Some(k) = idempotency {
        req = req.header("Idempotency-Key", k);
    }
    Reply::read(within("PATCH", req.send()).await.expect("sent")).await
}

#[tokio::test]
async fn idempotency_keys_belong_to_their_principal_and_their_request() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let one = app.create_item(zone, "ONE", 10, 0).await;
        let five = app.create_item(zone, "FIVE", 10, 0).await;
        let a = app.make_key(Role::Writer, ZoneScope::All, None).await;
        let b = app.make_key(Role::Writer, ZoneScope::All, None).await;
        let first = patch_as(&app, &a, one, json!({"quantity": 3}), Some("r1")).await;
        assert_eq!(first.status, 200, "{}", first.text);
        // Another principal's "r1" is its own: applied, with its own result.
        let other = patch_as(&app, &b, five, json!({"quantity": 77}), Some("r1")).await;
        assert_eq!(other.status, 200, "{}", other.text);
        assert_eq!(other.json()["item"]["id"], five);
        assert_eq!(other.json()["item"]["quantity"], 77);
        let last = app.snapshot(zone).await["last_event_id"].clone();
        // The same request again: the original result, nothing applied.
        let again = patch_as(&app, &a, one, json!({"quantity": 3}), Some("r1")).await;
        assert_eq!((again.status, &again.text), (200, &first.text));
        // The same key for another request: refused, nothing applied.
        for (item, body) in [
            (five, json!({"quantity": 1})),
            (one, json!({"quantity": 4})),
        ] {
            patch_as(&app, &a, item, body, Some("r1"))
                .await
                .assert_problem(422, "idempotency_key_reused");
        }
        let snap = app.snapshot(zone).await;
        assert_eq!(snap["last_event_id"], last);
        assert_eq!(snap["items"][0]["quantity"], 3);
        assert_eq!(snap["items"][1]["quantity"], 77);

        // Over WebSocket the key is the same principal's: the same change is the
        // original ack, another change is refused.
        let mut ws = app.ws_raw(&format!("/ws?access_token={a}")).await;
        assert_eq!(ws.recv().await["type"], "welcome");
        ws.send(
            json!({"type": "update_quantity", "request_id": "r1", "item_id": one, "quantity": 3}),
        )
        .await;
        let ack = ws.recv().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["event_id"], first.json()["event_id"]);
        ws.send(
            json!({"type": "update_quantity", "request_id": "r1", "item_id": five, "delta": -1}),
        )
        .await;
        let err = ws.recv().await;
        assert_eq!(
            (
                err["type"].as_str(),
                err["code"].as_str(),
                err["request_id"].as_str()
            ),
            (Some("error"), Some("idempotency_key_reused"), Some("r1")),
            "{err}"
        );
        assert_eq!(app.snapshot(zone).await["last_event_id"], last);

        // Concurrent requests with one new key: exactly one applies; the others get its
        // result (same request) or are refused (another item).
        let mut tasks = Vec::new();
        for i in 0..12 {
            let (base, key) = (app.base.clone(), a.clone());
            let item = if i % 2 == 0 { one } else { five };
            tasks.push(tokio::spawn(async move {
                let r = client_with(Some(&key))
                    .patch(format!("{base}/api/items/{item}"))
                    .header("Idempotency-Key", "race")
                    .json(&json!({"delta": -1}))
                    .send()
                    .await
                    .expect("sent");
                (item, r.status().as_u16(), r.text().await.expect("body"))
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(within("a racing write", t).await.expect("task"));
        }
        let ok: Vec<&(i64, u16, String)> = results.iter().filter(|r| r.1 == 200).collect();
        assert!(!ok.is_empty(), "{results:?}");
        assert!(
            ok.iter().all(|r| r.0 == ok[0].0 && r.2 == ok[0].2),
            "{results:?}"
        );
        assert!(
            results.iter().all(|r| r.1 == 200 || r.1 == 422),
            "{results:?}"
        );
        let snap = app.snapshot(zone).await;
        assert_eq!(
            snap["last_event_id"].as_u64(),
            last.as_u64().map(|l| l + 1),
            "one change applied"
        );

        // A key lives as long as its event: once the log no longer keeps it, the key is
        // free again.
        app.service
            .prune(Duration::from_secs(3600), 0)
            .await
            .expect("prune");
        let reused = patch_as(&app, &a, five, json!({"quantity": 5}), Some("r1")).await;
        assert_eq!(reused.status, 200, "{}", reused.text);
        app.stop().await;
    }
}

fn jwt(secret: &str, claims: &zonecast::credentials::Claims) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("jwt")
}

fn claims(
    sub: &str,
    zones: Option<zonecast::credentials::ZonesClaim>,
    exp: u64,
) -> zonecast::credentials::Claims {
    zonecast::credentials::Claims {
        sub: sub.into(),
        role: Role::Writer,
        zones,
        exp,
        nbf: None,
    }
}

#[tokio::test]
async fn an_expired_token_ends_its_open_connections() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--jwt-secret", "s3cret"]).await;
    let zone = app.create_zone("A").await;
    let item = app.create_item(zone, "S", 10, 0).await;
    let now = jsonwebtoken::get_current_timestamp();
    let star = Some(zonecast::credentials::ZonesClaim::Star("*".into()));
    let token = jwt("s3cret", &claims("alice", star, now + 2));
    let mut ws = app
        .ws_raw(&format!("/ws/zones/{zone}?access_token={token}"))
        .await;
    assert_eq!(ws.recv().await["type"], "welcome");
    let resp = client_with(Some(&token))
        .get(format!("{}/sse/zones/{zone}/stock", app.base))
        .send()
        .await
        .expect("sse");
    assert_eq!(resp.status().as_u16(), 200);
    let mut sse = Sse::from_response(resp);
    ws.send(json!({"type": "update_quantity", "item_id": item, "delta": -1}))
        .await;
    loop {
        let m = ws.recv().await;
        if m["type"] == "ack" {
            break;
        }
    }
    // At `exp` both end: WS with 1008 and a reason that says why.
    let frame = within("the close frame", async {
        use tokio_tungstenite::tungstenite::Message;
        loop {
            match futures_util::StreamExt::next(&mut ws.inner).await {
                Some(Ok(Message::Close(Some(f)))) => return f,
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(u16::from(frame.code), 1008);
    assert!(frame.reason.contains("expired"), "{}", frame.reason);
    assert_eq!(sse.next().await.event, "stock_updated");
    sse.assert_ends().await;
    let r = app
        .request_as(Some(&token), Method::GET, "/api/zones", None)
        .await;
    r.assert_problem(401, "unauthorized");
    assert!(
        r.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("expired"))
    );
    app.stop().await;
}

#[tokio::test]
async fn tokens_without_zones_with_an_empty_sub_or_before_nbf_grant_nothing() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--jwt-secret", "s3cret"]).await;
    let now = jsonwebtoken::get_current_timestamp();
    let star = || Some(zonecast::credentials::ZonesClaim::Star("*".into()));
    let mut early = claims("alice", star(), now + 600);
    early.nbf = Some(now + 300);
    for (token, says) in [
        (jwt("s3cret", &claims("alice", None, now + 600)), "zones"),
        (jwt("s3cret", &claims("", star(), now + 600)), "sub"),
        (jwt("s3cret", &early), "nbf"),
    ] {
        let r = app
            .request_as(Some(&token), Method::GET, "/api/zones", None)
            .await;
        r.assert_problem(401, "unauthorized");
        let detail = r.json()["detail"].as_str().unwrap_or("").to_owned();
        assert!(detail.contains(says), "{says}: {detail}");
        assert_eq!(
            app.ws_status(&format!("/ws?access_token={token}")).await,
            401
        );
    }
    let good = jwt("s3cret", &claims("alice", star(), now + 600));
    let r = app
        .request_as(Some(&good), Method::GET, "/api/zones", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    app.stop().await;
}

#[tokio::test]
async fn every_write_is_limited_and_a_no_op_takes_no_write_lock() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--write-rate", "1", "--write-burst", "2"]).await;
    let zone = app.create_zone("A").await;
    let reader = app.make_key(Role::Reader, ZoneScope::All, Some("u1")).await;
    let as_reader = |method: Method, path: String| {
        let (app, key) = (&app, reader.clone());
        async move { app.request_as(Some(&key), method, &path, None).await }
    };
    // A reader's writes share one budget: read-all, watch, unwatch.
    assert_eq!(
        as_reader(Method::POST, "/api/notifications/read-all".into())
            .await
            .status,
        200
    );
    assert_eq!(
        as_reader(Method::POST, format!("/api/zones/{zone}/watch"))
            .await
            .status,
        200
    );
    let limited = as_reader(Method::DELETE, format!("/api/zones/{zone}/watch")).await;
    limited.assert_problem(429, "rate_limited");
    // Over WebSocket, mark_read counts against the same budget.
    let mut ws = app.ws_raw(&format!("/ws?access_token={reader}")).await;
    assert_eq!(ws.recv().await["type"], "welcome");
    ws.send(json!({"type": "mark_read", "all": true})).await;
    assert_eq!(ws.recv().await["code"], "rate_limited");

    // With SQLite's write lock held elsewhere, calls that change nothing still answer
    // at once: they never ask for the lock.
    // Each call below has a principal of its own, so none is refused by the limit.
    let watcher = app.make_key(Role::Reader, ZoneScope::All, Some("u2")).await;
    let r = app
        .request_as(
            Some(&watcher),
            Method::POST,
            &format!("/api/zones/{zone}/watch"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let fresh = app.make_key(Role::Reader, ZoneScope::All, Some("u3")).await;
    let stranger = app.make_key(Role::Reader, ZoneScope::All, Some("u4")).await;
    use sea_orm::sqlx::Connection;
    let mut lock = sea_orm::sqlx::SqliteConnection::connect(&db.url)
        .await
        .expect("second connection");
    sea_orm::sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut lock)
        .await
        .expect("take the write lock");
    for (key, method, path) in [
        (
            &fresh,
            Method::POST,
            "/api/notifications/read-all".to_owned(),
        ),
        (&watcher, Method::POST, format!("/api/zones/{zone}/watch")),
        (
            &stranger,
            Method::DELETE,
            format!("/api/zones/{zone}/watch"),
        ),
    ] {
        let started = std::time::Instant::now();
        let r = app.request_as(Some(key), method, &path, None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{path} waited for the write lock"
        );
    }
    sea_orm::sqlx::query("ROLLBACK")
        .execute(&mut lock)
        .await
        .expect("release");
    app.stop().await;
}

#[tokio::test]
async fn the_multi_stream_endpoint_resets_a_stream_whose_position_it_cannot_read() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let zone = app.create_zone("A").await;
    let item = app.create_item(zone, "S", 10, 0).await;
    app.delta(item, -1).await;
    let path = format!("/sse/streams?streams=zone:{zone},alerts");
    let huge = "9".repeat(100);
    for (resume, reset_streams) in [
        (
            format!("zone:{zone}=x,alerts=0"),
            vec![format!("zone:{zone}")],
        ),
        (
            format!("zone:{zone}={huge},alerts=0"),
            vec![format!("zone:{zone}")],
        ),
        (
            "garbage".to_owned(),
            vec!["alerts".to_owned(), format!("zone:{zone}")],
        ),
    ] {
        let mut sse = app.sse(&path, Some(&resume)).await;
        let mut resets = Vec::new();
        for _ in 0..reset_streams.len() {
            let f = sse.next().await;
            assert_eq!(f.event, "reset", "{resume}: {f:?}");
            assert_eq!(f.data["reason"], "unknown_position", "{resume}");
            assert!(f.data["last_event_id"].is_u64(), "{f:?}");
            resets.push(f.data["stream"].as_str().expect("stream").to_owned());
        }
        resets.sort();
        assert_eq!(resets, reset_streams, "{resume}");
        // Then live: the next change arrives with every stream's position.
        app.delta(item, -1).await;
        let f = sse.next().await;
        assert_eq!(f.event, "stock_updated", "{resume}");
        assert!(f.id.contains(&format!("zone:{zone}=")), "{}", f.id);
    }
    app.stop().await;
}

#[tokio::test]
async fn sse_clients_that_close_leave_at_once_not_after_heartbeats() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--heartbeat", "60s"]).await;
    let zone = app.create_zone("A").await;
    let head = format!(
        "GET /sse/zones/{zone}/stock HTTP/1.1\r\nHost: z\r\nAuthorization: Bearer {}\r\n\r\n",
        app.key
    );
    let mut clients = Vec::new();
    for _ in 0..40 {
        let mut s = raw(&app).await;
        s.write_all(head.as_bytes()).await.expect("write");
        let mut buf = [0u8; 1024];
        let n = within("the stream's head", s.read(&mut buf))
            .await
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        clients.push(s);
    }
    let count = |app: &TestApp| {
        let http = app.http.clone();
        let url = format!("{}/api/stats", app.base);
        async move {
            let v: Value = http
                .get(url)
                .send()
                .await
                .expect("stats")
                .json()
                .await
                .expect("json");
            v["total_connections"].as_u64().expect("count")
        }
    };
    assert_eq!(count(&app).await, 40);
    // Half close with a FIN, half with a reset (SO_LINGER 0).
    for (i, s) in clients.into_iter().enumerate() {
        if i % 2 == 1 {
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .expect("linger");
        }
        drop(s);
    }
    within_for(
        Duration::from_secs(3),
        "closed clients to leave the registry",
        async {
            while count(&app).await > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn failed_authentications_are_limited_per_client_address() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(
        &db,
        &["--auth-failure-rate", "1", "--auth-failure-burst", "5"],
    )
    .await;
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().expect("ip"))
            .build()
            .expect("client")
    };
    let guess = |i: usize| format!("zk_{i:064x}");
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..10 {
        let r = within(
            "a guess",
            from("127.0.0.1")
                .get(format!("{}/api/zones", app.base))
                .bearer_auth(guess(i))
                .send(),
        )
        .await
        .expect("sent");
        statuses.push(r.status().as_u16());
        if r.status().as_u16() == 429 {
            retry_after = r.headers().get("retry-after").cloned();
        }
    }
    assert_eq!(&statuses[..5], &[401; 5]);
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    assert!(retry_after.is_some(), "429 without Retry-After");
    // The address's valid credentials still work; another address has its own budget.
    let ok = from("127.0.0.1")
        .get(format!("{}/api/zones", app.base))
        .bearer_auth(&app.key)
        .send()
        .await
        .expect("sent");
    assert_eq!(ok.status().as_u16(), 200);
    let other = from("127.0.0.2")
        .get(format!("{}/api/zones", app.base))
        .bearer_auth(guess(99))
        .send()
        .await
        .expect("sent");
    assert_eq!(other.status().as_u16(), 401);
    app.stop().await;
}

#[tokio::test]
async fn the_first_admin_key_goes_to_a_private_file_not_to_a_pipe_or_a_log() {
    let db = TestDb::sqlite().await;
    // `spawn_binary` reads stdout through a pipe and fails on any `zk_` in it.
    let mut child = spawn_binary(&db.url, &[]).await;
    let key = child.key.clone().expect("the key, from its file");
    let path = child.key_file.clone().expect("a key file");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{path:?}");
    let r = client_with(Some(&key))
        .get(format!("{}/api/me", child.base))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 200, "the key in the file works");
    let status = child.terminate(Duration::from_secs(15)).await;
    assert!(status.success());
    assert!(!child.logs().contains(&key[3..]), "the key reached the log");
}

#[tokio::test]
async fn every_metric_exists_on_a_fresh_server_before_its_first_event() {
    let db = TestDb::sqlite().await;
    // A process of its own: in this one, other tests have recorded most series.
    let mut child = spawn_binary(&db.url, &[]).await;
    let text = reqwest::get(format!("{}/metrics", child.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let mut missing = Vec::new();
    for (name, labels) in zonecast::observe::COUNTERS {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let series = if labels.is_empty() {
            format!("{name} ")
        } else {
            format!("{name}{{{}}} ", labels.join(","))
        };
        if !text.lines().any(|l| l.starts_with(&series)) {
            missing.push(series);
        }
    }
    for (kind, types) in zonecast::observe::EVENT_TYPES {
        for t in *types {
            let series =
                format!("zonecast_events_appended_total{{stream_kind=\"{kind}\",type=\"{t}\"}}");
            if !text.contains(&series) {
                missing.push(series);
            }
        }
    }
    for name in [
        "zonecast_connections{transport=\"sse\"}",
        "zonecast_connections{transport=\"ws\"}",
        "zonecast_tcp_connections",
        "zonecast_write_duration_seconds_count",
        "zonecast_delivery_lag_seconds_count",
    ] {
        if !text.contains(name) {
            missing.push(name.to_owned());
        }
    }
    assert!(missing.is_empty(), "missing {missing:?} in:\n{text}");
    assert!(child.terminate(Duration::from_secs(15)).await.success());
}

#[tokio::test]
async fn notifications_and_announcements_take_idempotency_keys_too() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let post = |path: &'static str, body: Value, key: &'static str| {
            let app = &app;
            async move {
                let r = app
                    .http
                    .post(format!("{}{path}", app.base))
                    .header("Idempotency-Key", key)
                    .json(&body)
                    .send()
                    .await
                    .expect("sent");
                Reply::read(r).await
            }
        };
        let note = json!({"user_id": "u1", "subject": "Hi", "message": "Count bay 4"});
        let first = post("/api/notifications", note.clone(), "n1").await;
        assert_eq!(first.status, 201, "{}", first.text);
        let again = post("/api/notifications", note.clone(), "n1").await;
        assert_eq!((again.status, &again.text), (201, &first.text));
        let mut other = note.clone();
        other["message"] = json!("Count bay 5");
        post("/api/notifications", other, "n1")
            .await
            .assert_problem(422, "idempotency_key_reused");
        let u1 = app.make_key(Role::Reader, ZoneScope::All, Some("u1")).await;
        let list = app
            .request_as(Some(&u1), Method::GET, "/api/notifications", None)
            .await
            .json();
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

        let ann = json!({"subject": "Stocktake", "message": "Friday 6:00"});
        let a1 = post("/api/announcements", ann.clone(), "a1").await;
        let a2 = post("/api/announcements", ann, "a1").await;
        assert_eq!(a1.status, 201, "{}", a1.text);
        assert_eq!(a1.json()["event_id"], a2.json()["event_id"]);
        app.stop().await;
    }
}
