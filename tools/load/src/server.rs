//! The server under load, as the tool talks to it: zonecast (REST or WebSocket to make
//! changes, `/sse/zones/{id}/stock` and `/ws/zones/{id}` to watch), or Nchan as the
//! reference peer (`POST /pub/{channel}`, `GET /sub/{channel}` for both SSE and WS,
//! `/pubsub/{channel}` to publish over WS). Messages to Nchan carry their own seq
//! (`{"seq":N}`), so both servers are checked for missing, duplicated and
//! out-of-order deliveries the same way.

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
