//! HTTPS (`--tls-cert`, `--tls-key`): HTTP/2 by ALPN, ten SSE streams on one
//! connection, and WebSocket over TLS, against a self-signed certificate.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::helpers::*;

struct Cert {
    _dir: tempfile::TempDir,
    cert: String,
    key: String,
    der: Vec<u8>,
}

fn self_signed() -> Cert {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let dir = tempfile::tempdir().expect("dir");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, c.cert.pem()).expect("write cert");
    std::fs::write(&key, c.signing_key.serialize_pem()).expect("write key");
    Cert {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        der: c.cert.der().to_vec(),
        _dir: dir,
    }
}

async fn tls_connect(
    app: &TestApp,
    cert: &Cert,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.der.clone().into()).expect("root");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = within("TCP", tokio::net::TcpStream::connect(app.addr()))
        .await
        .expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    within(
        "TLS handshake",
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake")
}

#[tokio::test]
async fn https_speaks_http2_and_carries_ten_event_streams_on_one_connection() {
    let cert = self_signed();
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db, &["--tls-cert", &cert.cert, "--tls-key", &cert.key]).await;
    let stream = tls_connect(&app, &cert, b"h2").await;
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN chose h2"
    );
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let auth = format!("Bearer {}", app.key);
    let get = |path: &str| {
        hyper::Request::get(format!("https://localhost{path}"))
            .header("authorization", &auth)
            .body(Empty::<Bytes>::new())
            .expect("request")
    };
    let r = within("healthz", h2.send_request(get("/healthz")))
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), hyper::Version::HTTP_2);

    let req = hyper::Request::post("https://localhost/api/zones")
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json!({"name": "TLS"}).to_string())))
        .expect("request");
    let r = within("create zone", h2_full(&app, &cert, req)).await;
    let body = r.into_body().collect().await.expect("body").to_bytes();
    let zone: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let zone = zone["id"].as_i64().expect("zone id");
    let json_req = |method: &str, path: String, body: serde_json::Value| {
        hyper::Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request")
    };
    let r = h2_full(
        &app,
        &cert,
        json_req(
            "POST",
            format!("/api/zones/{zone}/items"),
            json!({"sku": "T", "name": "t", "quantity": 10}),
        ),
    )
    .await;
    assert_eq!(r.status(), 201);
    let created: serde_json::Value =
        serde_json::from_slice(&r.into_body().collect().await.expect("body").to_bytes())
            .expect("json");
    let item = created["item"]["id"].as_i64().expect("item");

    // Ten streams, more than HTTP/1.1 browsers allow per host, on the one connection.
    let mut bodies = Vec::new();
    for _ in 0..10 {
        let r = within(
            "an SSE stream",
            h2.send_request(get(&format!("/sse/zones/{zone}/stock"))),
        )
        .await
        .expect("sent");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let mut body = r.into_body();
        // The stream has started (its `retry:` line) before the change is made.
        let first = within("the first bytes", body.frame())
            .await
            .expect("frame")
            .expect("ok");
        assert!(first.data_ref().is_some_and(|d| d.starts_with(b"retry:")));
        bodies.push(body);
    }
    let r = h2_full(
        &app,
        &cert,
        json_req("PATCH", format!("/api/items/{item}"), json!({"delta": -1})),
    )
    .await;
    assert_eq!(r.status(), 200);
    for (i, mut body) in bodies.into_iter().enumerate() {
        let got = within("the event on every stream", async {
            let mut seen = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref() {
                    seen.extend_from_slice(d);
                    if String::from_utf8_lossy(&seen).contains("event: stock_updated") {
                        return true;
                    }
                }
            }
            false
        })
        .await;
        assert!(got, "stream {i} did not get the event");
    }

    // WebSocket goes over TLS too (HTTP/1.1 by ALPN, then the upgrade).
    let stream = tls_connect(&app, &cert, b"http/1.1").await;
    let url = format!("wss://localhost/ws/zones/{zone}?access_token={}", app.key);
    let (inner, _) = within(
        "wss handshake",
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .expect("wss");
    let mut ws = WsTls { inner };
    let welcome = ws.recv().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    app.stop().await;
}

/// Sends one request with a body on an HTTP/2 connection of its own.
async fn h2_full(
    app: &TestApp,
    cert: &Cert,
    req: hyper::Request<Full<Bytes>>,
) -> hyper::Response<hyper::body::Incoming> {
    let stream = tls_connect(app, cert, b"h2").await;
    let (mut s, c) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(c);
    s.send_request(req).await.expect("sent")
}

struct WsTls {
    inner:
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

impl WsTls {
    async fn recv(&mut self) -> serde_json::Value {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        within("a WS message", async {
            loop {
                match self.inner.next().await {
                    Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("json"),
                    Some(Ok(_)) => continue,
                    other => panic!("expected a message, got {other:?}"),
                }
            }
        })
        .await
    }
}

#[tokio::test]
async fn a_certificate_that_cannot_be_read_stops_the_start_with_its_path() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("nope.pem").display().to_string();
    let db = TestDb::sqlite().await;
    let err = start_error(&db, &["--tls-cert", &missing, "--tls-key", &missing])
        .await
        .to_string();
    assert!(err.contains("nope.pem"), "{err}");
    assert!(
        zonecast::config::ServeArgs::from_flags(["--tls-cert", "c.pem"]).is_err(),
        "--tls-cert needs --tls-key"
    );
}
