//! Hostile and careless clients (issue 10): bodies, scopes, idempotency keys, expired
//! credentials, protocol abuse. Each test failed against the server before its fix.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zonecast::auth::{Role, ZoneScope};

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
