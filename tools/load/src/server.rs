//! The server under load, as the tool talks to it: zonecast (REST or WebSocket to make
//! changes, `/sse/zones/{id}/stock` and `/ws/zones/{id}` to watch), or Nchan as the
//! reference peer (`POST /pub/{channel}`, `GET /sub/{channel}` for both SSE and WS,
//! `/pubsub/{channel}` to publish over WS). Messages to Nchan carry their own seq
//! (`{"seq":N}`), so both servers are checked for missing, duplicated and
//! out-of-order deliveries the same way.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

/// What kind of server is on the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Zonecast,
    Nchan,
}

/// `sse` or `ws`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Sse,
    Ws,
}

/// One stream being watched: where to subscribe and how to recognise its seqs.
#[derive(Clone)]
pub struct Topic {
    pub kind: Kind,
    /// zonecast: the zone and its item; Nchan: the channel.
    pub zone: i64,
    pub item: i64,
    pub channel: String,
    /// The seq subscribers start after.
    pub start: u64,
    pub key: String,
}

/// An HTTP client for one server.
#[derive(Clone)]
pub struct Server {
    pub kind: Kind,
    pub base: String,
    pub http: reqwest::Client,
    pub key: String,
    /// Nchan: each message is padded to this many bytes (`nchan_message`).
    pub message_bytes: usize,
}

impl Server {
    pub fn new(kind: Kind, base: &url::Url, key: &str) -> anyhow::Result<Server> {
        let mut headers = reqwest::header::HeaderMap::new();
        if kind == Kind::Zonecast {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {key}").parse().context("key")?,
            );
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(Server {
            kind,
            base: base.as_str().trim_end_matches('/').to_owned(),
            http,
            key: key.to_owned(),
            message_bytes: 0,
        })
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// A fresh stream to watch: a new zone with one item (zonecast), a new channel
    /// (Nchan).
    pub async fn topic(&self, name: &str) -> anyhow::Result<Topic> {
        let mut t = Topic {
            kind: self.kind,
            zone: 0,
            item: 0,
            // A path segment as is: no character that would need escaping.
            channel: format!("zcload-{}-{}", std::process::id(), name.replace(' ', "-")),
            start: 0,
            key: self.key.clone(),
        };
        if self.kind == Kind::Zonecast {
            let z = self.post("/api/zones", json!({ "name": name })).await?;
            t.zone = z["id"].as_i64().context("zone id")?;
            let i = self
                .post(
                    &format!("/api/zones/{}/items", t.zone),
                    json!({"sku": "LOAD", "name": "load item", "quantity": 0, "low_stock_threshold": 0}),
                )
                .await?;
            t.item = i["item"]["id"].as_i64().context("item id")?;
            t.start = self.last_seq(t.zone).await?;
        }
        Ok(t)
    }

    /// One change over REST; returns its seq (`n` for Nchan, whose messages carry it).
    pub async fn publish(&self, topic: &Topic, n: u64) -> anyhow::Result<u64> {
        let r = match self.kind {
            Kind::Zonecast => self
                .http
                .patch(format!("{}/api/items/{}", self.base, topic.item))
                .json(&json!({"delta": 1})),
            Kind::Nchan => self
                .http
                .post(format!("{}/pub/{}", self.base, topic.channel))
                .body(nchan_message(n, self.message_bytes)),
        };
        let r = r.send().await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("publish: {status}: {text}");
        }
        match self.kind {
            Kind::Zonecast => {
                let v: Value = serde_json::from_str(&text)?;
                v["event_id"].as_u64().context("event_id")
            }
            Kind::Nchan => Ok(n),
        }
    }

    /// The zone's last seq.
    pub async fn last_seq(&self, zone: i64) -> anyhow::Result<u64> {
        let r = self
            .http
            .get(format!("{}/api/zones/{zone}/items", self.base))
            .send()
            .await?;
        let v: Value = r.json().await?;
        v["last_event_id"].as_u64().context("last_event_id")
    }

    /// A counter of zonecast's `/metrics` (summed over its labels matching `labels`).
    pub async fn metric(&self, name: &str, labels: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

/// Publishes over one kept-alive HTTP/1.1 connection, its requests written by hand,
/// and says when each request went out.
///
/// Why not the `reqwest` client: its requests are written by the connection's own
/// task, which on a busy tool waits its turn behind thousands of subscribers' reads,
/// so a publish time taken before `send` counted the tool's queue as the server's
/// latency. Here the request is written in the publisher's own turn, right after the
/// time is taken.
pub struct RestPublisher {
    tcp: tokio::net::TcpStream,
    kind: Kind,
    host: String,
    /// zonecast: the item's path and the key; Nchan: the channel's path.
    path: String,
    key: String,
    message_bytes: usize,
}

/// Largest publish response read.
const MAX_RESPONSE: usize = 64 * 1024;

impl RestPublisher {
    pub async fn connect(server: &Server, topic: &Topic) -> anyhow::Result<RestPublisher> {
        let addr = address(&server.base)?;
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(RestPublisher {
            tcp,
            kind: server.kind,
            host: addr.to_string(),
            path: match server.kind {
                Kind::Zonecast => format!("/api/items/{}", topic.item),
                Kind::Nchan => format!("/pub/{}", topic.channel),
            },
            key: server.key.clone(),
            message_bytes: server.message_bytes,
        })
    }

    /// One change: its seq (`n` for Nchan), and when its request was written.
    pub async fn publish(&mut self, n: u64) -> anyhow::Result<(u64, std::time::Instant)> {
        use tokio::io::AsyncReadExt;
        let req = match self.kind {
            Kind::Zonecast => {
                let body = r#"{"delta":1}"#;
                format!(
                    "PATCH {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    self.path,
                    self.host,
                    self.key,
                    body.len()
                )
            }
            Kind::Nchan => {
                let body = nchan_message(n, self.message_bytes);
                format!(
                    "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n{body}",
                    self.path,
                    self.host,
                    body.len()
                )
            }
        };
        let at = std::time::Instant::now();
        let (head, early) = crate::sse::exchange(&mut self.tcp, req.as_bytes()).await?;
        let status = crate::sse::status(&head).to_owned();
        let mut framing = crate::sse::Framing::of(&head)?;
        if matches!(framing, crate::sse::Framing::Close) {
            bail!("publish: response without a length");
        }
        let mut body = Vec::new();
        let mut more = framing.feed(&early, &mut |b| body.extend_from_slice(b))?;
        while more {
            if body.len() > MAX_RESPONSE {
                bail!("publish: response over {MAX_RESPONSE} bytes");
            }
            let mut chunk = [0u8; 4096];
            let n = self.tcp.read(&mut chunk).await?;
            if n == 0 {
                bail!("publish: connection closed in the body");
            }
            more = framing.feed(&chunk[..n], &mut |b| body.extend_from_slice(b))?;
        }
        if !status.starts_with('2') {
            bail!("publish: HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        match self.kind {
            Kind::Zonecast => {
                let v: Value = serde_json::from_slice(&body)?;
                Ok((v["event_id"].as_u64().context("event_id")?, at))
            }
            Kind::Nchan => Ok((n, at)),
        }
    }
}

/// The most publishing connections a run keeps open at once.
const MAX_PUBLISHERS: usize = 64;

/// Kept-alive connections for changes over REST: each change takes an idle one, or
/// opens one while fewer than `MAX_PUBLISHERS` are busy, so at a rate a slow answer
/// does not delay the next change, and back to back each publisher in flight keeps
/// one. Each request is written by hand (`RestPublisher`), its time taken as it goes
/// out rather than when its turn came.
pub struct Publishers {
    server: Server,
    topic: Arc<Topic>,
    idle: std::sync::Mutex<Vec<RestPublisher>>,
    room: tokio::sync::Semaphore,
}

impl Publishers {
    pub fn new(server: Server, topic: Arc<Topic>) -> Publishers {
        Publishers {
            server,
            topic,
            idle: std::sync::Mutex::default(),
            room: tokio::sync::Semaphore::new(MAX_PUBLISHERS),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<RestPublisher>> {
        // Pushes and pops leave the list whole: a poisoned lock is usable.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One change: its seq, and when its request was written.
    pub async fn publish(&self, n: u64) -> anyhow::Result<(u64, std::time::Instant)> {
        let _busy = self.room.acquire().await?;
        let kept = self.idle().pop();
        let mut p = match kept {
            Some(p) => p,
            None => RestPublisher::connect(&self.server, &self.topic).await?,
        };
        let done = p.publish(n).await?;
        self.idle().push(p);
        Ok(done)
    }
}

/// Publishes over one WebSocket connection: zonecast `update_quantity` (the seq from
/// its `ack`), Nchan `/pubsub/{channel}` text frames.
pub struct WsPublisher {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    kind: Kind,
    item: i64,
    message_bytes: usize,
}

impl WsPublisher {
    pub async fn connect(server: &Server, topic: &Topic) -> anyhow::Result<WsPublisher> {
        let ws_base = server.base.replacen("http", "ws", 1);
        let url = match server.kind {
            Kind::Zonecast => format!("{ws_base}/ws?access_token={}", server.key),
            Kind::Nchan => format!("{ws_base}/pubsub/{}", topic.channel),
        };
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
        if server.kind == Kind::Zonecast {
            // The welcome.
            ws.next().await.context("no welcome")??;
        }
        Ok(WsPublisher {
            ws,
            kind: server.kind,
            item: topic.item,
            message_bytes: server.message_bytes,
        })
    }

    pub async fn publish(&mut self, n: u64) -> anyhow::Result<u64> {
        match self.kind {
            Kind::Nchan => {
                self.ws
                    .send(Message::text(nchan_message(n, self.message_bytes)))
                    .await?;
                Ok(n)
            }
            Kind::Zonecast => {
                // The request id is an idempotency key: unique per run and change.
                let id = format!("zonecast-load-{}-{}-{n}", std::process::id(), self.item);
                let msg = json!({"type": "update_quantity", "request_id": id, "item_id": self.item, "delta": 1});
                self.ws.send(Message::text(msg.to_string())).await?;
                loop {
                    let m = self.ws.next().await.context("connection closed")??;
                    let Message::Text(t) = m else { continue };
                    let v: Value = serde_json::from_str(&t)?;
                    match v["type"].as_str() {
                        Some("ack") if v["request_id"] == id.as_str() => {
                            return v["event_id"].as_u64().context("event_id");
                        }
                        Some("error") => bail!("update_quantity refused: {t}"),
                        _ => {}
                    }
                }
            }
        }
    }
}

/// A message to Nchan: `{"seq":N}`, padded (`{"seq":N,"pad":"…"}`) to `bytes` when
/// that is longer, so that each delivery carries as many bytes as a zonecast event.
pub fn nchan_message(n: u64, bytes: usize) -> String {
    let bare = format!("{{\"seq\":{n}}}");
    // `,"pad":""` adds 9 bytes before any padding.
    match bytes.checked_sub(bare.len() + 9) {
        Some(pad) => format!("{{\"seq\":{n},\"pad\":\"{}\"}}", "x".repeat(pad)),
        None => bare,
    }
}

/// The IPv4 address `url` names (`localhost` resolved): subscribers connect from a
/// 127.0.0.x source address, so every connection of the tool goes to IPv4.
pub fn address(url: &str) -> anyhow::Result<std::net::SocketAddr> {
    url::Url::parse(url)?
        .socket_addrs(|| None)?
        .into_iter()
        .find(std::net::SocketAddr::is_ipv4)
        .with_context(|| format!("{url}: no IPv4 address"))
}

/// Connects a TCP socket to `addr` from the loopback address `from`.
pub async fn connect_from(
    addr: std::net::SocketAddr,
    from: std::net::IpAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let sock = TcpSocket::new_v4()?;
    // The port is chosen at connect time, for the whole 4-tuple. A plain bind takes a
    // port for every destination and searches all bound ones to find it: with 10,000
    // sockets that search was 70 % of the tool's CPU, and ports ran out.
    #[cfg(target_os = "linux")]
    bind_address_no_port(&sock)?;
    sock.bind(std::net::SocketAddr::new(from, 0))?;
    sock.connect(addr).await
}

#[cfg(target_os = "linux")]
fn bind_address_no_port(sock: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: `sock` is an open socket for the duration of the call, and the option
    // value is a live c_int of the length given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that answers each request it reads (up to its blank line and the
    /// `{"delta":1}` body) with the next of `answers`, on one connection.
    async fn answering(
        answers: Vec<&'static str>,
    ) -> (url::Url, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = url::Url::parse(&format!("http://{}", listener.local_addr().expect("addr")))
            .expect("url");
        let peer = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut requests = Vec::new();
            for a in answers {
                let mut got = Vec::new();
                while !got.ends_with(br#"{"delta":1}"#) {
                    let mut b = [0u8; 1024];
                    let n = tcp.read(&mut b).await.expect("read");
                    assert!(n > 0, "closed");
                    got.extend_from_slice(&b[..n]);
                }
                requests.push(String::from_utf8_lossy(&got).into_owned());
                tcp.write_all(a.as_bytes()).await.expect("answer");
            }
            requests
        });
        (url, peer)
    }

    /// `localhost`, which `loopback` accepts, is an address the subscribers can use.
    #[test]
    fn urls_name_ipv4_addresses() {
        assert_eq!(
            address("http://localhost:8091")
                .expect("localhost")
                .to_string(),
            "127.0.0.1:8091"
        );
        assert_eq!(
            address("http://127.0.0.2")
                .expect("default port")
                .to_string(),
            "127.0.0.2:80"
        );
        assert!(address("not a url").is_err());
    }

    #[tokio::test]
    async fn a_rest_publisher_reads_sized_and_chunked_answers_on_one_connection() {
        let (url, peer) = answering(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"event_id\":41}",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"eve\r\nA\r\nnt_id\":42}\r\n0\r\n\r\n",
            "HTTP/1.1 409 Conflict\r\nContent-Length: 7\r\n\r\nrefused",
        ])
        .await;
        let server = Server::new(Kind::Zonecast, &url, "k").expect("server");
        let topic = Topic {
            kind: Kind::Zonecast,
            zone: 1,
            item: 7,
            channel: String::new(),
            start: 0,
            key: "k".into(),
        };
        let mut p = RestPublisher::connect(&server, &topic)
            .await
            .expect("connect");
        let before = std::time::Instant::now();
        let (seq, at) = tokio::time::timeout(Duration::from_secs(5), p.publish(1))
            .await
            .expect("in time")
            .expect("first");
        assert_eq!(seq, 41);
        assert!(at >= before);
        let (seq, _) = tokio::time::timeout(Duration::from_secs(5), p.publish(2))
            .await
            .expect("in time")
            .expect("second");
        assert_eq!(seq, 42);
        let refused = tokio::time::timeout(Duration::from_secs(5), p.publish(3))
            .await
            .expect("in time");
        assert!(
            refused.is_err_and(|e| e.to_string().contains("409")),
            "a refusal is an error"
        );
        let requests = peer.await.expect("peer");
        assert!(requests[0].starts_with("PATCH /api/items/7 HTTP/1.1\r\n"));
        assert!(requests[0].contains("Authorization: Bearer k\r\n"));
    }
}
