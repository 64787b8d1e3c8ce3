use reqwest::Method;
use serde_json::{Value, json};
use zonecast::credentials::{Claims, ZonesClaim};
use zonecast::domain::{Role, ZoneScope};

use crate::helpers::*;

struct Who {
    name: &'static str,
    key: Option<String>,
    public: bool,
}

/// Expected statuses, in the order of the principals: reader, writer, admin,
/// writer scoped to zone 1, anonymous, anonymous with `--public-read`.
type Row = (&'static str, [u16; 6]);

#[tokio::test]
async fn roles_and_scopes_decide_every_route() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let public_db = TestDb::sqlite().await;
    let public = spawn_app(&public_db, &["--public-read"]).await;
    // The same zones and items on both servers.
    let mut items = Vec::new();
    for a in [&app, &public] {
        let z1 = a.create_zone("One").await;
        let z2 = a.create_zone("Two").await;
        items.push((
            z1,
            a.create_item(z1, "A", 1000, 0).await,
            z2,
            a.create_item(z2, "B", 1000, 0).await,
        ));
    }
    let (z1, i1, z2, i2) = items[0];
    assert_eq!(items[0], items[1]);
    let who = [
        Who {
            name: "reader",
            key: Some(app.make_key(Role::Reader, ZoneScope::All, None).await),
            public: false,
        },
        Who {
            name: "writer",
            key: Some(app.make_key(Role::Writer, ZoneScope::All, None).await),
            public: false,
        },
        Who {
            name: "admin",
            key: Some(app.key.clone()),
            public: false,
        },
        Who {
            name: "scoped",
            key: Some(
                app.make_key(Role::Writer, ZoneScope::Only(vec![z1 as i32]), None)
                    .await,
            ),
            public: false,
        },
        Who {
            name: "anonymous",
            key: None,
            public: false,
        },
        Who {
            name: "anonymous+public-read",
            key: None,
            public: true,
        },
    ];
    let rest: Vec<(Row, Method, String, Option<Value>)> = vec![
        (
            ("read zone 1", [200, 200, 200, 200, 401, 200]),
            Method::GET,
            format!("/api/zones/{z1}/items"),
            None,
        ),
        (
            ("read zone 2", [200, 200, 200, 403, 401, 200]),
            Method::GET,
            format!("/api/zones/{z2}/events"),
            None,
        ),
        (
            ("write zone 1", [403, 200, 200, 200, 401, 401]),
            Method::PATCH,
            format!("/api/items/{i1}"),
            Some(json!({"delta": -1})),
        ),
        (
            ("write zone 2", [403, 200, 200, 403, 401, 401]),
            Method::PATCH,
            format!("/api/items/{i2}"),
            Some(json!({"delta": -1})),
        ),
        (
            ("create item z2", [403, 201, 201, 403, 401, 401]),
            Method::POST,
            format!("/api/zones/{z2}/items"),
            None,
        ),
        (
            ("create zone", [403, 403, 201, 403, 401, 401]),
            Method::POST,
            "/api/zones".into(),
            Some(json!({"name": "New"})),
        ),
        (
            ("list keys", [403, 403, 200, 403, 401, 401]),
            Method::GET,
            "/api/keys".into(),
            None,
        ),
        (
            ("SSE zone 1", [200, 200, 200, 200, 401, 200]),
            Method::GET,
            format!("/sse/zones/{z1}/stock"),
            None,
        ),
        (
            ("SSE zone 2", [200, 200, 200, 403, 401, 200]),
            Method::GET,
            format!("/sse/zones/{z2}/stock"),
            None,
        ),
        (
            ("SSE alerts", [200, 200, 200, 200, 401, 200]),
            Method::GET,
            "/sse/alerts".into(),
            None,
        ),
        (
            ("healthz", [200, 200, 200, 200, 200, 200]),
            Method::GET,
            "/healthz".into(),
            None,
        ),
    ];
    let mut sku = 0;
    for ((what, expected), method, path, body) in rest {
        for (w, want) in who.iter().zip(expected) {
            let server = if w.public { &public } else { &app };
            let body = if what == "create item z2" {
                sku += 1;
                Some(json!({"sku": format!("N{sku}"), "name": "n"}))
            } else {
                body.clone()
            };
            let r = server
                .request_as(w.key.as_deref(), method.clone(), &path, body)
                .await;
            assert_eq!(r.status, want, "{what} as {}: {}", w.name, r.text);
            if want == 401 || want == 403 {
                r.assert_problem(
                    want,
                    if want == 401 {
                        "unauthorized"
                    } else {
                        "forbidden"
                    },
                );
            }
        }
    }

    // WebSocket: refused before the upgrade, then per message.
    let ws_open: [u16; 6] = [101, 101, 101, 101, 401, 101];
    let subscribe_z2 = [
        "subscribed",
        "subscribed",
        "subscribed",
        "forbidden",
        "",
        "subscribed",
    ];
    let update_z1 = ["forbidden", "ack", "ack", "ack", "", "forbidden"];
    for (i, w) in who.iter().enumerate() {
        let server = if w.public { &public } else { &app };
        let auth = w
            .key
            .as_ref()
            .map(|k| format!("?access_token={k}"))
            .unwrap_or_default();
        let path = format!("/ws/zones/{z1}{auth}");
        assert_eq!(
            server.ws_status(&path).await,
            ws_open[i],
            "WS open as {}",
            w.name
        );
        if ws_open[i] != 101 {
            continue;
        }
        let mut ws = server.ws_raw(&format!("/ws{auth}")).await;
        assert_eq!(ws.recv().await["type"], "welcome");
        ws.send(json!({"type": "subscribe", "stream": format!("zone:{z2}")}))
            .await;
        let r = ws.recv().await;
        let got = if r["type"] == "error" {
            r["code"].clone()
        } else {
            r["type"].clone()
        };
        assert_eq!(
            got, subscribe_z2[i],
            "WS subscribe zone 2 as {}: {r}",
            w.name
        );
        ws.send(json!({"type": "update_quantity", "item_id": i1, "delta": -1}))
            .await;
        let r = loop {
            let r = ws.recv().await;
            if r.get("stream").is_none() {
                break r; // skip events of the subscription
            }
        };
        let got = if r["type"] == "error" {
            r["code"].clone()
        } else {
            r["type"].clone()
        };
        assert_eq!(got, update_z1[i], "WS update zone 1 as {}: {r}", w.name);
        ws.send(json!({"type": "subscribe", "stream": "user:someone"}))
            .await;
        let r = loop {
            let r = ws.recv().await;
            if r.get("stream").is_none() || r["type"] == "subscribed" {
                break r;
            }
        };
        assert_eq!(
            r["code"], "forbidden",
            "another user's stream as {}",
            w.name
        );
    }
    app.stop().await;
    public.stop().await;
}

#[tokio::test]
async fn access_tokens_in_the_query_and_jwts_are_checked() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--jwt-secret", "s3cret"]).await;
    let zone = app.create_zone("A").await;
    let key = app.make_key(Role::Reader, ZoneScope::All, None).await;
    let sse = |token: &str| format!("/sse/zones/{zone}/stock?access_token={token}");
    assert_eq!(
        app.request_as(None, Method::GET, &sse(&key), None)
            .await
            .status,
        200
    );
    assert_eq!(app.ws_status(&format!("/ws?access_token={key}")).await, 101);
    let wrong = "zk_0000000000000000000000000000000000000000000000000000000000000000";
    app.request_as(None, Method::GET, &sse(wrong), None)
        .await
        .assert_problem(401, "unauthorized");
    assert_eq!(
        app.ws_status(&format!("/ws?access_token={wrong}")).await,
        401
    );
    app.request_as(Some("garbage"), Method::GET, "/api/zones", None)
        .await
        .assert_problem(401, "unauthorized");

    let now = jsonwebtoken::get_current_timestamp();
    let jwt = |exp: u64, zones: ZonesClaim, secret: &[u8]| {
        let claims = Claims {
            sub: "alice".into(),
            role: Role::Writer,
            zones: Some(zones),
            exp,
            nbf: None,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .expect("jwt")
    };
    let good = jwt(now + 600, ZonesClaim::List(vec![zone as i32]), b"s3cret");
    let r = app
        .request_as(
            Some(&good),
            Method::GET,
            &format!("/api/zones/{zone}/items"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        app.request_as(None, Method::GET, &sse(&good), None)
            .await
            .status,
        200
    );
    let item = app.create_item(zone, "S", 5, 0).await;
    let r = app
        .request_as(
            Some(&good),
            Method::PATCH,
            &format!("/api/items/{item}"),
            Some(json!({"delta": -1})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let page = app
        .get(&format!("/api/zones/{zone}/events?after=1"))
        .await
        .json();
    assert_eq!(page["events"][0]["data"]["actor"], "jwt:alice");
    let other_zone = jwt(now + 600, ZonesClaim::List(vec![999]), b"s3cret");
    app.request_as(
        Some(&other_zone),
        Method::GET,
        &format!("/api/zones/{zone}/items"),
        None,
    )
    .await
    .assert_problem(403, "forbidden");
    let expired = jwt(now - 10, ZonesClaim::Star("*".into()), b"s3cret");
    app.request_as(Some(&expired), Method::GET, "/api/zones", None)
        .await
        .assert_problem(401, "unauthorized");
    assert_eq!(
        app.ws_status(&format!("/ws?access_token={expired}")).await,
        401
    );
    let forged = jwt(now + 600, ZonesClaim::Star("*".into()), b"not-the-secret");
    app.request_as(Some(&forged), Method::GET, "/api/zones", None)
        .await
        .assert_problem(401, "unauthorized");
    app.stop().await;
}

#[tokio::test]
async fn revoking_a_key_refuses_it_and_closes_its_connections() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--revocation-check", "100ms"]).await;
    let zone = app.create_zone("A").await;
    for via_rest in [true, false] {
        let (name, key) = app.make_named_key(Role::Reader, ZoneScope::All, None).await;
        let resp = client_with(Some(&key))
            .get(format!("{}/sse/zones/{zone}/stock", app.base))
            .send()
            .await
            .expect("sse");
        assert_eq!(resp.status().as_u16(), 200);
        let mut sse = Sse::from_response(resp);
        let mut ws = app
            .ws_raw(&format!("/ws/zones/{zone}?access_token={key}"))
            .await;
        assert_eq!(ws.recv().await["type"], "welcome");
        if via_rest {
            let r = app
                .request(Method::DELETE, &format!("/api/keys/{name}"), None, &[])
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert!(r.json()["revoked_at"].is_string());
        } else {
            // As `zonecast keys revoke` does: the server notices on its next
            // revocation check.
            app.revoke_in_database(&name).await;
        }
        sse.assert_ends().await;
        assert_eq!(ws.close_code().await, 1008);
        app.request_as(Some(&key), Method::GET, "/api/zones", None)
            .await
            .assert_problem(401, "unauthorized");
    }
    app.stop().await;
}

/// Requests with one key at the same time share its lookup (a reconnect storm), but a
/// request never takes the answer of a lookup that began before it: every request
/// sent after a revocation is refused, even while a burst with the key keeps lookups
/// in flight throughout. A cache of keys (even a short one) fails this; the race of
/// joining a lookup already running is covered deterministically by the unit tests
/// in `credentials`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_refuses_every_later_request_during_a_burst_with_the_key() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--connect-rate", "0"]).await;
    let (name, key) = app.make_named_key(Role::Reader, ZoneScope::All, None).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let (client, url, mut stopped) = (
                client_with(Some(&key)),
                format!("{}/api/zones", app.base),
                stopped.clone(),
            );
            tokio::spawn(async move {
                let mut answered = 0u32;
                while !*stopped.borrow_and_update() {
                    if client.get(&url).send().await.is_ok() {
                        answered += 1;
                    }
                }
                answered
            })
        })
        .collect();
    drop(stopped);
    // The key works while the burst runs.
    let ok = app
        .request_as(Some(&key), Method::GET, "/api/zones", None)
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    // As `zonecast keys revoke` does: nothing in the server is told or evicted.
    app.revoke_in_database(&name).await;
    let after: Vec<_> = (0..32)
        .map(|_| app.request_as(Some(&key), Method::GET, "/api/zones", None))
        .collect();
    for reply in futures_util::future::join_all(after).await {
        reply.assert_problem(401, "unauthorized");
    }
    stop.send_replace(true);
    for t in burst {
        let answered = within("the burst to end", t).await.expect("burst task");
        assert!(answered > 0, "the burst kept lookups in flight");
    }
    app.stop().await;
}

/// On SQLite, item changes take a key found valid before from memory, without a query;
/// the change's own transaction then checks the key (PostgreSQL looks it up, and the
/// same must hold). A revocation committed before the
/// request (by `zonecast keys revoke` in another process, or another node) refuses
/// every kind of item change with 401 and applies nothing, a replayed idempotency key
/// included. Without the check in the transaction, each of these changes applies.
#[tokio::test]
async fn an_item_change_after_a_revocation_elsewhere_is_refused_and_applies_nothing() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &["--revocation-check", "1h"]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S1", 10, 0).await;
        let (name, key) = app.make_named_key(Role::Writer, ZoneScope::All, None).await;
        let patch = format!("/api/items/{item}");
        let items = format!("/api/zones/{zone}/items");
        // The key is remembered from its first request; this one's id is replayed below.
        let replay = async || {
            let sent = client_with(Some(&key))
                .patch(format!("{}{patch}", app.base))
                .header("Idempotency-Key", "once")
                .json(&json!({ "delta": 1 }))
                .send();
            Reply::read(within("a keyed patch", sent).await.expect("patch")).await
        };
        assert_eq!(replay().await.status, 200);
        let created = app
            .request_as(
                Some(&key),
                Method::POST,
                &items,
                Some(json!({"sku": "S2", "name": "two", "quantity": 1})),
            )
            .await;
        assert_eq!(created.status, 201, "{}", created.text);
        let doomed = created.json()["item"]["id"].as_i64().expect("item id");
        let before = app.get(&format!("/api/zones/{zone}/events")).await.json();

        app.revoke_in_database(&name).await;

        replay().await.assert_problem(401, "unauthorized");
        let deleted = format!("/api/items/{doomed}");
        for (method, path, body) in [
            (Method::PATCH, patch.as_str(), Some(json!({ "delta": 5 }))),
            (
                Method::POST,
                items.as_str(),
                Some(json!({"sku": "S3", "name": "three", "quantity": 1})),
            ),
            (Method::DELETE, deleted.as_str(), None),
            // Refusals made before the change's transaction say 401 too, not 404 or
            // 400: an unknown item, a malformed body.
            (
                Method::PATCH,
                "/api/items/999999",
                Some(json!({ "delta": 5 })),
            ),
            (
                Method::PATCH,
                patch.as_str(),
                Some(json!({ "delta": "five" })),
            ),
        ] {
            app.request_as(Some(&key), method, path, body)
                .await
                .assert_problem(401, "unauthorized");
        }

        let after = app.get(&format!("/api/zones/{zone}/events")).await.json();
        assert_eq!(after, before, "no event was appended ({})", db.url);
        let snapshot = app.snapshot(zone).await;
        let quantities: Vec<_> = snapshot["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| (i["sku"].clone(), i["quantity"].clone()))
            .collect();
        assert_eq!(
            quantities,
            vec![(json!("S1"), json!(11)), (json!("S2"), json!(1))]
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn bursts_past_the_write_limit_get_429_per_principal() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(
        &db,
        &[
            "--write-rate",
            "1",
            "--write-burst",
            "3",
            "--ws-message-rate",
            "1",
            "--ws-message-burst",
            "2",
        ],
    )
    .await;
    // The admin's zone creation counts against the admin's budget, not `writer`'s.
    let zone = app.create_zone("A").await;
    let item = app
        .service
        .create_item(
            zone as i32,
            zonecast::domain::NewItem::parse("S", "s", 100, 0).expect("item"),
            None,
            &zonecast::domain::Principal::system("t"),
        )
        .await
        .expect("item")
        .item
        .id;
    let writer = app.make_key(Role::Writer, ZoneScope::All, None).await;
    let other = app.make_key(Role::Writer, ZoneScope::All, None).await;
    let patch = |key: String| {
        let app = &app;
        async move {
            app.request_as(
                Some(&key),
                Method::PATCH,
                &format!("/api/items/{item}"),
                Some(json!({"delta": -1})),
            )
            .await
        }
    };
    for _ in 0..3 {
        assert_eq!(patch(writer.clone()).await.status, 200);
    }
    let limited = client_with(Some(&writer))
        .patch(format!("{}/api/items/{item}", app.base))
        .json(&json!({"delta": -1}))
        .send()
        .await
        .expect("send");
    assert_eq!(limited.status().as_u16(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: Value = limited.json().await.expect("json");
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(
        patch(other.clone()).await.status,
        200,
        "another principal is not affected"
    );
    // Waiting out Retry-After is the point of this step, not synchronisation.
    tokio::time::sleep(std::time::Duration::from_secs(retry)).await;
    assert_eq!(
        patch(writer.clone()).await.status,
        200,
        "after waiting, writes succeed"
    );

    // WS: messages per connection.
    let mut ws = app.ws("/ws").await;
    assert_eq!(ws.recv().await["type"], "welcome");
    for _ in 0..3 {
        ws.send(json!({"type": "ping"})).await;
    }
    let replies = [ws.recv().await, ws.recv().await, ws.recv().await];
    let limited: Vec<&Value> = replies
        .iter()
        .filter(|r| r["code"] == "rate_limited")
        .collect();
    assert_eq!(limited.len(), 1, "{replies:?}");
    assert!(
        limited[0]["retry_after_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0)
    );
    app.stop().await;
}

#[tokio::test]
async fn the_keys_cli_works_on_a_fresh_database() {
    let db = TestDb::sqlite().await;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_zonecast"))
            .args(args)
            .args(["--database-url", &db.url])
            .env("RUST_LOG", "error")
            .output()
            .expect("run zonecast")
    };
    let cli = |args: &[&str]| {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let scanner = [
        "keys",
        "create",
        "--name",
        "scanner-1",
        "--role",
        "writer",
        "--zones",
        "1",
        "--user",
        "u7",
    ];
    // On a fresh database zone 1 does not exist yet: a key for it is refused.
    let refused = run(&scanner);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("zone 1 does not exist"), "{err}");

    let app = spawn_app(&db, &[]).await;
    let zone = app.create_zone("A").await;
    assert_eq!(zone, 1);
    let out = cli(&scanner);
    let key = out.lines().last().expect("a last line").to_owned();
    assert!(key.starts_with("zk_") && key.len() == 67, "{out}");
    let list = cli(&["keys", "list"]);
    assert!(
        list.contains("scanner-1") && list.contains("writer") && !list.contains(&key),
        "{list}"
    );
    let r = app
        .request_as(Some(&key), Method::GET, "/api/zones/1/items", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(cli(&["keys", "revoke", "scanner-1"]).contains("revoked"));
    app.request_as(Some(&key), Method::GET, "/api/zones/1/items", None)
        .await
        .assert_problem(401, "unauthorized");
    app.stop().await;
}

#[tokio::test]
async fn cors_allows_only_the_configured_origins() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--cors-origin", "https://dash.example"]).await;
    let preflight = |origin: &'static str| {
        let http = reqwest::Client::new();
        let url = format!("{}/api/zones", app.base);
        async move {
            http.request(Method::OPTIONS, url)
                .header("Origin", origin)
                .header("Access-Control-Request-Method", "GET")
                .header("Access-Control-Request-Headers", "authorization")
                .send()
                .await
                .expect("preflight")
        }
    };
    let ok = preflight("https://dash.example").await;
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://dash.example"
    );
    let other = preflight("https://evil.example").await;
    assert!(other.headers().get("access-control-allow-origin").is_none());
    app.stop().await;

    // Default: same-origin only, no CORS headers at all.
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let r = app
        .http
        .get(format!("{}/api/zones", app.base))
        .header("Origin", "https://dash.example")
        .send()
        .await
        .expect("get");
    assert!(r.headers().get("access-control-allow-origin").is_none());
    app.stop().await;
}

#[tokio::test]
async fn a_ws_client_flooding_far_past_its_limit_is_closed_with_1008() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--ws-message-rate", "1", "--ws-message-burst", "1"]).await;
    let mut ws = app.ws("/ws").await;
    assert_eq!(ws.recv().await["type"], "welcome");
    {
        use futures_util::SinkExt;
        for _ in 0..300 {
            let ping = tokio_tungstenite::tungstenite::Message::text(r#"{"type":"ping"}"#);
            // The server may close mid-flood; later sends may then fail.
            if ws.inner.send(ping).await.is_err() {
                break;
            }
        }
    }
    assert_eq!(ws.close_code().await, 1008);
    app.stop().await;
}

/// A change finds its item's zone without asking the database once the item has been
/// changed before, yet the answers stay what the database says: 403 for an item of a
/// zone the caller may not write, 404 once it is gone — whether this node deleted it or
/// it went behind the server's back (another node, on a shared database).
#[tokio::test]
async fn changes_answer_403_and_404_as_the_database_says_after_the_item_was_seen() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let z1 = app.create_zone("Seen").await;
        let z2 = app.create_zone("Elsewhere").await;
        let other = app
            .make_key(Role::Writer, ZoneScope::Only(vec![z2 as i32]), None)
            .await;
        let writer = app
            .make_key(Role::Writer, ZoneScope::Only(vec![z1 as i32]), None)
            .await;
        let patch = |key: &str, item: i64| {
            let key = key.to_owned();
            let app = &app;
            async move {
                app.request_as(
                    Some(&key),
                    Method::PATCH,
                    &format!("/api/items/{item}"),
                    Some(json!({"delta": 1})),
                )
                .await
            }
        };
        // Deleted through this server.
        let item = app.create_item(z1, "GONE", 1, 0).await;
        assert_eq!(patch(&writer, item).await.status, 200);
        patch(&other, item).await.assert_problem(403, "forbidden");
        let r = app
            .request_as(
                Some(&writer),
                Method::DELETE,
                &format!("/api/items/{item}"),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        patch(&writer, item).await.assert_problem(404, "not_found");
        patch(&other, item).await.assert_problem(404, "not_found");
        // Deleted straight in the database: nothing in the server is told.
        let item = app.create_item(z1, "VANISHED", 1, 0).await;
        assert_eq!(patch(&writer, item).await.status, 200);
        let last = app.snapshot(z1).await["last_event_id"].clone();
        use sea_orm::EntityTrait;
        let deleted = entity::item::Entity::delete_by_id(item as i32)
            .exec(app.service.store.connection())
            .await
            .expect("delete");
        assert_eq!(deleted.rows_affected, 1);
        patch(&writer, item).await.assert_problem(404, "not_found");
        patch(&other, item).await.assert_problem(404, "not_found");
        // The refused changes appended nothing, and the zone still takes changes.
        assert_eq!(app.snapshot(z1).await["last_event_id"], last);
        let next = app.create_item(z1, "NEXT", 1, 0).await;
        assert_eq!(patch(&writer, next).await.status, 200);
        app.stop().await;
    }
}
