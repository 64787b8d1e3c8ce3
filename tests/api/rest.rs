use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn same_idempotency_key_twice_gives_one_event_and_the_same_body() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 10, 0).await;
        let path = format!("/api/items/{item}");
        let key = [("Idempotency-Key", "pick-42")];
        let first = app.patch(&path, json!({"delta": -3}), &key).await;
        let again = app.patch(&path, json!({"delta": -3}), &key).await;
        assert_eq!(first.status, 200, "{}", first.text);
        assert_eq!(again.status, 200);
        assert_eq!(first.text, again.text, "same response body");
        let snap = app.snapshot(zone).await;
        assert_eq!(snap["items"][0]["quantity"], 7);
        assert_eq!(snap["last_event_id"], 2, "one event for two requests");
        let page = app
            .get(&format!("/api/zones/{zone}/events?after=0"))
            .await
            .json();
        assert_eq!(page["events"].as_array().map(Vec::len), Some(2));
        // A new key applies again.
        let other = app
            .patch(
                &path,
                json!({"delta": -3}),
                &[("Idempotency-Key", "pick-43")],
            )
            .await;
        assert_eq!(other.json()["item"]["quantity"], 4);
        assert_eq!(other.json()["event_id"], 3, "the replay left no gap");

        // Item creation too.
        let body = json!({"sku": "T", "name": "t", "quantity": 1}).to_string();
        let items = format!("/api/zones/{zone}/items");
        let k = [("Idempotency-Key", "create-t")];
        let a = app.request(Method::POST, &items, Some(&body), &k).await;
        let b = app.request(Method::POST, &items, Some(&body), &k).await;
        assert_eq!((a.status, b.status), (201, 201), "{}", b.text);
        assert_eq!(a.text, b.text);
        assert_eq!(
            app.snapshot(zone).await["items"].as_array().map(Vec::len),
            Some(2)
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn conflicts_and_bad_input_are_problems_and_change_nothing() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 5, 0).await;
        let path = format!("/api/items/{item}");
        let before = app.snapshot(zone).await;

        app.patch(&path, json!({"quantity": 1, "expected_version": 7}), &[])
            .await
            .assert_problem(409, "version_conflict");
        app.patch(&path, json!({"delta": -6}), &[])
            .await
            .assert_problem(422, "insufficient_stock");
        app.patch(&path, json!({"quantity": -1}), &[])
            .await
            .assert_problem(422, "invalid");
        app.patch(&path, json!({"quantity": 1, "delta": 1}), &[])
            .await
            .assert_problem(422, "invalid");
        app.request(Method::PATCH, &path, Some("{\"delta\": "), &[])
            .await
            .assert_problem(400, "bad_request");
        app.request(Method::PATCH, &path, Some("{\"delta\": \"many\"}"), &[])
            .await
            .assert_problem(400, "bad_request");
        app.patch("/api/items/9999", json!({"delta": 1}), &[])
            .await
            .assert_problem(404, "not_found");
        app.request(Method::DELETE, "/api/items/9999", None, &[])
            .await
            .assert_problem(404, "not_found");
        app.get("/api/zones/9999")
            .await
            .assert_problem(404, "not_found");
        app.get("/api/zones/9999/items")
            .await
            .assert_problem(404, "not_found");
        app.get("/api/zones/9999/events")
            .await
            .assert_problem(404, "not_found");
        app.post("/api/zones/9999/items", json!({"sku": "x", "name": "x"}))
            .await
            .assert_problem(404, "not_found");
        app.post(
            &format!("/api/zones/{zone}/items"),
            json!({"sku": "S", "name": "dup"}),
        )
        .await
        .assert_problem(409, "conflict");
        app.get("/api/zones/abc")
            .await
            .assert_problem(400, "bad_request");
        app.get("/no/such/route")
            .await
            .assert_problem(404, "not_found");

        assert_eq!(app.snapshot(zone).await, before, "nothing changed");

        // The right version applies.
        let ok = app
            .patch(&path, json!({"quantity": 1, "expected_version": 1}), &[])
            .await;
        assert_eq!(ok.json()["item"]["version"], 2);
        app.stop().await;
    }
}

#[tokio::test]
async fn change_log_pages_carry_the_sse_event_json() {
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 5, 0).await;
        let mut sse = app
            .sse(&format!("/sse/zones/{zone}/stock"), Some("0"))
            .await;
        app.patch(
            &format!("/api/items/{item}"),
            json!({"name": "Renamed"}),
            &[],
        )
        .await;
        let del = app
            .request(Method::DELETE, &format!("/api/items/{item}"), None, &[])
            .await;
        assert_eq!(del.status, 200, "{}", del.text);
        let frames = sse.take(3).await;
        let kinds: Vec<&str> = frames.iter().map(|f| f.event.as_str()).collect();
        assert_eq!(kinds, ["item_created", "item_updated", "item_deleted"]);
        let page = app
            .get(&format!("/api/zones/{zone}/events?after=1&limit=1"))
            .await
            .json();
        assert_eq!(page["next_after"], 2);
        assert_eq!(page["events"][0], frames[1].data);
        let rest = app
            .get(&format!("/api/zones/{zone}/events?after=2"))
            .await
            .json();
        assert_eq!(rest["events"][0], frames[2].data);
        assert_eq!(app.snapshot(zone).await["items"], json!([]));
        app.stop().await;
    }
}

#[tokio::test]
async fn docs_and_spec_are_served() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let spec = app.get("/openapi.json").await;
    assert_eq!(spec.status, 200);
    let spec = spec.json();
    for p in [
        "/zones",
        "/zones/{id}/items",
        "/items/{id}",
        "/zones/{id}/events",
    ] {
        assert!(spec["paths"][p].is_object(), "spec lacks {p}");
    }
    let docs = app.get("/docs").await;
    assert_eq!(docs.status, 200);
    assert!(docs.text.contains("swagger"), "swagger UI");
    let index = app.get("/").await;
    assert!(index.content_type.starts_with("text/html") && index.text.contains("/zonecast.js"));
    let js = app.get("/zonecast.js").await;
    assert!(js.content_type.starts_with("text/javascript") && js.text.contains("EventSource"));
    for page in ["/sse-client.html", "/ws-client.html"] {
        let r = app.get(page).await;
        assert!(
            r.status == 200 && r.content_type.starts_with("text/html"),
            "{page}"
        );
    }
    let me = app.get("/api/me").await.json();
    assert_eq!(
        (me["role"].as_str(), me["zones"].as_str()),
        (Some("admin"), Some("*"))
    );
    assert_eq!(app.get("/healthz").await.text, "ok");
    app.stop().await;
}
