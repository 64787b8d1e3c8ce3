//! Random PATCH bodies against a real server: every one is applied or refused with a
//! documented problem, never a 500, and the item stays valid.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::helpers::*;

fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        (-5i64..5).prop_map(|i| json!(i)),
        any::<u64>().prop_map(|i| json!(i)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        Just(json!([1, 2])),
        Just(json!({"a": 1})),
    ]
}

fn body() -> impl Strategy<Value = String> {
    let names = prop::sample::select(vec![
        "quantity",
        "delta",
        "expected_version",
        "reason",
        "name",
        "low_stock_threshold",
        "extra",
    ]);
    prop_oneof![
        ".{0,80}",
        prop::collection::btree_map(names, field_value(), 0..5).prop_map(|m| {
            Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()).to_string()
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_patch_body_is_applied_or_refused_with_a_problem() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &[]).await;
    let zone = app.create_zone("A").await;
    let item = app.create_item(zone, "S", 1000, 10).await;
    let url = format!("{}/api/items/{item}", app.base);
    let handle = tokio::runtime::Handle::current();
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 300,
        failure_persistence: None,
        ..Default::default()
    });
    let result = tokio::task::block_in_place(|| {
        runner.run(&body(), |text| {
            let (status, ctype, reply) = handle.block_on(async {
                let r = within(
                    "PATCH",
                    app.http
                        .patch(&url)
                        .header("content-type", "application/json")
                        .body(text.clone())
                        .send(),
                )
                .await
                .expect("sent");
                let status = r.status().as_u16();
                let ctype = r
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                (status, ctype, r.text().await.expect("body"))
            });
            prop_assert!(
                [200, 400, 409, 422].contains(&status),
                "{status} for {text:?}: {reply}"
            );
            if status != 200 {
                prop_assert!(ctype.starts_with("application/problem+json"), "{ctype}");
                let p: Value = serde_json::from_str(&reply).expect("problem json");
                let code = p["code"].as_str().unwrap_or("");
                prop_assert!(
                    [
                        "bad_request",
                        "invalid",
                        "insufficient_stock",
                        "version_conflict"
                    ]
                    .contains(&code),
                    "{code} for {text:?}"
                );
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let snap = app.snapshot(zone).await;
    let it = &snap["items"][0];
    assert!(it["quantity"].as_i64().is_some_and(|q| q >= 0), "{it}");
    app.stop().await;
}
