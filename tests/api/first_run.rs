//! The first hour with zonecast (issue 11): a failed first start, the API docs with a
//! key, error texts a user can act on, the logs, and no-op changes.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use zonecast::domain::{Role, ZoneScope};

use crate::helpers::*;

fn zonecast(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_zonecast"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run zonecast")
}

#[tokio::test]
async fn a_start_that_cannot_listen_leaves_nothing_and_the_next_one_gives_the_key() {
    let db = TestDb::sqlite().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = zonecast(&["--bind", &addr, "--database-url", &db.url]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on") && err.contains("--bind"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("key"));
    drop(taken);
    // Nothing was written: the next start is a first start, with its key.
    let mut first = spawn_binary(&db.url, &[]).await;
    assert!(first.key.is_some(), "the next start makes the admin key");
    let status = first.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}: {}", first.logs());
    // A start on a database with keys says how to get one.
    let mut again = spawn_binary(&db.url, &[]).await;
    assert!(again.key.is_none());
    let banner = again.banner.join("\n");
    assert!(
        banner.contains("zonecast keys create --name NAME --role admin"),
        "{banner}"
    );
    assert!(again.terminate(Duration::from_secs(15)).await.success());
    let help = String::from_utf8_lossy(&zonecast(&["--help"]).stdout).into_owned();
    assert!(
        help.contains("zonecast keys create --name NAME --role admin"),
        "{help}"
    );
}

#[tokio::test]
async fn the_openapi_spec_declares_the_credentials_on_every_operation() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let spec: Value = reqwest::get(format!("{}/openapi.json", app.base))
        .await
        .expect("spec")
        .json()
        .await
        .expect("json");
    let schemes = &spec["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer", "{schemes}");
    assert_eq!(
        (&schemes["api_key"]["in"], &schemes["api_key"]["name"]),
        (&json!("header"), &json!("X-API-Key"))
    );
    assert_eq!(schemes["access_token"]["in"], "query");
    let paths = spec["paths"].as_object().expect("paths");
    let mut operations = 0;
    for (path, methods) in paths {
        for (method, op) in methods.as_object().expect("methods") {
            operations += 1;
            let names: Vec<&str> = op["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{method} {path} declares no security"))
                .iter()
                .filter_map(|r| r.as_object()?.keys().next().map(String::as_str))
                .collect();
            for want in ["bearer", "api_key", "access_token"] {
                assert!(names.contains(&want), "{method} {path}: {names:?}");
            }
        }
    }
    assert!(operations >= 20, "{operations}");
    app.stop().await;
}

#[tokio::test]
async fn error_texts_say_what_to_fix() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--cors-origin", "https://dash.example"]).await;
    let zone = app.create_zone("A").await;
    let item = app.create_item(zone, "S", 10, 0).await;
    for (path, body, names) in [
        (
            "/api/announcements",
            json!({"subject": null, "message": "x"}),
            "`subject`",
        ),
        ("/api/announcements", json!({"message": "x"}), "`subject`"),
        ("/api/zones", json!({"name": 7}), "`name`"),
    ] {
        let r = app.post(path, body).await;
        r.assert_problem(400, "bad_request");
        let detail = r.json()["detail"].as_str().unwrap_or("").to_owned();
        assert!(
            detail.contains(names) && !detail.contains("occurred while"),
            "{detail}"
        );
    }
    let r = app
        .patch(&format!("/api/items/{item}"), json!({"delta": "x"}), &[])
        .await;
    let detail = r.json()["detail"].as_str().unwrap_or("").to_owned();
    assert!(
        detail.contains("`delta`") && detail.contains("integer"),
        "{detail}"
    );
    for path in [
        "/api/zones/abc",
        "/api/zones/abc/items",
        "/sse/zones/abc/stock",
    ] {
        let r = app.get(path).await;
        r.assert_problem(400, "bad_request");
        let detail = r.json()["detail"].as_str().unwrap_or("").to_owned();
        assert!(
            detail.contains(r#"zone id "abc""#) && !detail.contains("param0"),
            "{detail}"
        );
    }
    // CORS: a refusal is problem+json; only the methods the API has are allowed.
    let preflight = |origin: &'static str| {
        reqwest::Client::new()
            .request(Method::OPTIONS, format!("{}/api/zones", app.base))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "GET")
            .send()
    };
    Reply::read(preflight("https://evil.example").await.expect("preflight"))
        .await
        .assert_problem(403, "forbidden");
    let ok = preflight("https://dash.example").await.expect("preflight");
    let methods = ok.headers()["access-control-allow-methods"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        methods.contains("PATCH") && !methods.contains("TRACE") && !methods.contains("CONNECT"),
        "{methods}"
    );
    // Zone scopes have one shape everywhere: a list of ids, or "*".
    let r = app
        .post(
            "/api/keys",
            json!({"name": "one", "role": "reader", "zones": [zone]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json()["zones"], json!([zone]));
    let scoped = r.json()["key"].as_str().expect("key").to_owned();
    let me = app
        .request_as(Some(&scoped), Method::GET, "/api/me", None)
        .await
        .json();
    assert_eq!(me["zones"], json!([zone]));
    assert_eq!(app.get("/api/me").await.json()["zones"], "*");
    app.post(
        "/api/keys",
        json!({"name": "two", "role": "reader", "zones": "1,2"}),
    )
    .await
    .assert_problem(422, "invalid");
    // A zone that does not exist cannot be granted.
    let r = app
        .post(
            "/api/keys",
            json!({"name": "three", "role": "reader", "zones": [99]}),
        )
        .await;
    r.assert_problem(422, "invalid");
    assert!(r.text.contains("zone 99 does not exist"), "{}", r.text);
    app.stop().await;

    // A database that cannot be opened: one line, said once.
    let out = zonecast(&[
        "--bind",
        "127.0.0.1:0",
        "--database-url",
        "sqlite:///no/such/dir/z.db?mode=rwc",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("unable to open database file").count(),
        1,
        "{err}"
    );
    assert!(!err.contains("Caused by"), "{err}");
}

#[tokio::test]
async fn logs_are_plain_when_piped_and_say_each_thing_once() {
    let db = TestDb::sqlite().await;
    let mut child = spawn_binary(&db.url, &[]).await;
    let key = child.key.clone().expect("key");
    for _ in 0..3 {
        let r = client_with(Some(&key))
            .get(format!("{}/api/zones", child.base))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 200);
    }
    assert!(child.terminate(Duration::from_secs(15)).await.success());
    let logs = child.logs();
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in a piped log:\n{logs}"
    );
    assert_eq!(logs.matches("migrated the database").count(), 1, "{logs}");
    assert_eq!(
        logs.lines().filter(|l| l.contains("migration")).count(),
        0,
        "{logs}"
    );
    assert_eq!(logs.matches(" listening").count(), 1, "{logs}");
    for line in logs.lines().filter(|l| l.contains("elapsed_ms=")) {
        let ms = line
            .split("elapsed_ms=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("");
        let decimals = ms.split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 2, "{line}");
    }
    // The next start on the same database migrates nothing and says nothing of it.
    let mut again = spawn_binary(&db.url, &[]).await;
    assert!(again.terminate(Duration::from_secs(15)).await.success());
    assert_eq!(
        again.logs().matches("migrated").count(),
        0,
        "{}",
        again.logs()
    );
}

#[tokio::test]
async fn a_change_that_changes_nothing_appends_nothing_and_says_so() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--public-read"]).await;
    let zone = app.create_zone("A").await;
    let item = app.create_item(zone, "S", 10, 0).await;
    let last = app.snapshot(zone).await["last_event_id"].clone();
    for body in [
        json!({"delta": 0}),
        json!({"quantity": 10}),
        json!({"name": "Item S"}),
    ] {
        let r = app
            .patch(&format!("/api/items/{item}"), body.clone(), &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let v = r.json();
        assert_eq!(v["changed"], false, "{body}: {v}");
        assert_eq!(v["item"]["version"], 1, "{body}: the version did not move");
        assert_eq!(v["event_id"], last);
    }
    assert_eq!(
        app.snapshot(zone).await["last_event_id"],
        last,
        "no event appended"
    );
    let (mut ws, _) = app.ws_welcomed(&format!("/ws/zones/{zone}")).await;
    ws.send(json!({"type": "update_quantity", "request_id": "z", "item_id": item, "delta": 0}))
        .await;
    let ack = ws.recv().await;
    assert_eq!(
        (ack["type"].as_str(), ack["changed"].as_bool()),
        (Some("ack"), Some(false)),
        "{ack}"
    );
    // A real change says so too.
    let v = app.delta(item, -1).await;
    assert_eq!(v["changed"], true);
    // Anonymous callers asking for notifications need credentials: 401, not 403.
    app.request_as(None, Method::GET, "/api/notifications", None)
        .await
        .assert_problem(401, "unauthorized");
    let reader = app.make_key(Role::Reader, ZoneScope::All, None).await;
    app.request_as(Some(&reader), Method::GET, "/api/notifications", None)
        .await
        .assert_problem(403, "forbidden");
    app.stop().await;
}
