//! The broker of several nodes on one PostgreSQL database. PostgreSQL holds the log and
//! is the bus: each node announces its committed events with `pg_notify`, `LISTEN`s for
//! the other nodes' announcements, and feeds what it hears into its own cache and hub
//! exactly as it feeds its own commits. A node's own commits are delivered locally at
//! once; its own announcements, when they come back, are recognised by the node id on
//! their first line and skipped.
//!
//! Correctness never depends on an announcement arriving. Announcements are lost when
//! the listening connection drops, when a node dies between commit and `pg_notify`
//! (after-commit mode), or when the outbox is full; so every `--sweep-interval`, and at
//! once after the listener (re)connects, the node compares its live streams' positions
//! with `streams.last_seq` in one query and reads what it missed from the log. A lost
//! announcement costs at most one interval of latency, never an event: cursors fill
//! any hole from the cache or the log, and drop what they already handed out.
//!
//! Payloads (at most 7,999 bytes): the node id, then one event per line as its event
//! JSON (DESIGN §4, which renders back to the same bytes), or `@stream seq` for an event
//! too large to travel, which receivers with subscribers read from the log.
//!
//! Must not hold a lock or a connection across the listener's wait; must not block the
//! writer: after-commit announcements go through a bounded outbox, and a full outbox
//! drops (the sweep covers it) rather than waits.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use sea_orm::DatabaseTransaction;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::broker::{Broker, BusHealth, Local};
use crate::config::NotifyMode;
use crate::cursor::BATCH;
use crate::domain::{Event, EventKind, StreamKey};
use crate::store::{MAX_PAYLOAD, Store, StoreError};

/// What a node needs to know to join the bus.
pub struct BusOptions {
    /// The database URL: the listener connects on its own, outside the pool.
    pub url: String,
    /// Unique per node; the first line of every payload.
    pub node: String,
    pub sweep_interval: Duration,
    pub notify: NotifyMode,
}

/// Announcements queued for the after-commit notifier before new ones are dropped.
const OUTBOX: usize = 8192;

pub struct PostgresBroker {
    local: Local,
    store: Store,
    opts: BusOptions,
    channel: String,
    outbox: mpsc::Sender<Arc<Event>>,
    outbox_rx: std::sync::Mutex<Option<mpsc::Receiver<Arc<Event>>>>,
    listening: AtomicBool,
    m: Meters,
}

/// Metric handles, taken once.
struct Meters {
    listening: metrics::Gauge,
    reconnects: metrics::Counter,
    sent: metrics::Counter,
    received: metrics::Counter,
    via_notification: metrics::Counter,
    via_reference: metrics::Counter,
    via_sweep: metrics::Counter,
    outbox_full: metrics::Counter,
    notify_failed: metrics::Counter,
    malformed: metrics::Counter,
    sweeps: metrics::Counter,
}

impl Meters {
    fn new() -> Self {
        let dropped =
            |r: &'static str| metrics::counter!("zonecast_bus_dropped_total", "reason" => r);
        let events =
            |v: &'static str| metrics::counter!("zonecast_bus_events_received_total", "via" => v);
        let payloads =
            |d: &'static str| metrics::counter!("zonecast_bus_payloads_total", "direction" => d);
        Meters {
            listening: metrics::gauge!("zonecast_bus_listening"),
            reconnects: metrics::counter!("zonecast_bus_reconnects_total"),
            sent: payloads("sent"),
            received: payloads("received"),
            via_notification: events("notification"),
            via_reference: events("reference"),
            via_sweep: events("sweep"),
            outbox_full: dropped("outbox_full"),
            notify_failed: dropped("notify_failed"),
            malformed: dropped("malformed"),
            sweeps: metrics::counter!("zonecast_sweeps_total"),
        }
    }
}

impl PostgresBroker {
    pub async fn new(store: Store, local: Local, opts: BusOptions) -> Result<Self, StoreError> {
        let channel = store.bus_channel().await?;
        let (outbox, rx) = mpsc::channel(OUTBOX);
        Ok(PostgresBroker {
            local,
            store,
            opts,
            channel,
            outbox,
            outbox_rx: std::sync::Mutex::new(Some(rx)),
            listening: AtomicBool::new(false),
            m: Meters::new(),
        })
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Listens until aborted: connects, sweeps, delivers what it hears; on a lost
    /// connection reconnects with back-off (100 ms doubling to 5 s) and sweeps again.
    async fn listen_forever(&self) {
        let mut backoff = Duration::from_millis(100);
        let mut ever = false;
        loop {
            match Store::listen(&self.opts.url, &self.channel, &self.opts.node).await {
                Ok(mut listener) => {
                    self.set_listening(true);
                    if ever {
                        tracing::info!(channel = %self.channel, "listening again for other nodes' events");
                    } else {
                        tracing::info!(channel = %self.channel, "listening for other nodes' events");
                    }
                    ever = true;
                    backoff = Duration::from_millis(100);
                    // Announcements made while not listening are lost: read them now.
                    self.sweep_logged().await;
                    let why = loop {
                        match listener.recv().await {
                            Ok(Some(payload)) => self.receive(&payload).await,
                            Ok(None) => break "connection lost".to_owned(),
                            Err(e) => break e.to_string(),
                        }
                    };
                    self.set_listening(false);
                    self.m.reconnects.increment(1);
                    tracing::warn!(error = %why, "stopped listening for other nodes' events; \
                        reconnecting (the sweep delivers them meanwhile)");
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "cannot listen for other nodes' events");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn set_listening(&self, on: bool) {
        self.listening.store(on, Ordering::Relaxed);
        self.m.listening.set(if on { 1.0 } else { 0.0 });
    }

    async fn sweep_forever(&self) {
        let mut tick = tokio::time::interval(self.opts.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep_logged().await;
        }
    }

    async fn sweep_logged(&self) {
        match self.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(events = n, "the sweep delivered missed events"),
            Err(e) => tracing::warn!(error = %e, "sweep failed; will retry"),
        }
    }

    /// Compares this node's live streams with the log's heads and delivers what it has
    /// not seen. Returns the events delivered.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        self.m.sweeps.increment(1);
        let positions = self.local.positions();
        if positions.is_empty() {
            return Ok(0);
        }
        let keys: Vec<StreamKey> = positions.iter().map(|(k, _)| k.clone()).collect();
        let heads: HashMap<StreamKey, u64> = self.store.heads(&keys).await?.into_iter().collect();
        let mut delivered = 0;
        for (key, seen) in positions {
            let Some(&head) = heads.get(&key) else {
                continue;
            };
            if head <= seen {
                continue;
            }
            // Nothing published here since the stream became live: its cursors know
            // their positions, the newest event is enough to wake those behind it.
            // Otherwise what was missed, at most one batch (cursors fill the rest).
            let from = if seen == 0 {
                head
            } else {
                (seen + 1).max(head.saturating_sub(BATCH as u64 - 1))
            };
            let events: Vec<Arc<Event>> = self
                .store
                .read_from(&key, from, head - from + 1)
                .await?
                .into_iter()
                .map(Arc::new)
                .collect();
            delivered += events.len() as u64;
            self.local.deliver(&events);
        }
        self.m.via_sweep.increment(delivered);
        Ok(delivered)
    }

    async fn receive(&self, payload: &str) {
        self.m.received.increment(1);
        let (node, lines) = match decode(payload) {
            Ok(v) => v,
            Err(e) => {
                self.m.malformed.increment(1);
                tracing::warn!(error = %e, "ignored a malformed announcement");
                return;
            }
        };
        if node == self.opts.node {
            return;
        }
        let mut events = Vec::with_capacity(lines.len());
        for line in lines {
            match line {
                Line::Event(ev) => events.push(Arc::new(ev)),
                Line::Ref(stream, seq) => {
                    if !self.local.is_live(&stream) {
                        continue;
                    }
                    match self.store.read_from(&stream, seq, 1).await {
                        Ok(found) => {
                            let found: Vec<Arc<Event>> = found
                                .into_iter()
                                .filter(|e| e.seq == seq)
                                .map(Arc::new)
                                .collect();
                            self.m.via_reference.increment(found.len() as u64);
                            events.extend(found);
                        }
                        // The sweep reads it later.
                        Err(e) => tracing::warn!(error = %e, stream = %stream, seq,
                            "cannot read an announced event"),
                    }
                }
            }
        }
        self.m.via_notification.increment(events.len() as u64);
        self.local.deliver(&events);
    }

    /// Sends what the writers queued, in batches, until the outbox closes.
    async fn notify_forever(&self, mut rx: mpsc::Receiver<Arc<Event>>) {
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 256).await > 0 {
            let payloads = encode(&self.opts.node, batch.iter().map(|e| e.as_ref()));
            match self.store.notify(&self.channel, &payloads).await {
                Ok(()) => self.m.sent.increment(payloads.len() as u64),
                Err(e) => {
                    self.m.notify_failed.increment(batch.len() as u64);
                    tracing::warn!(error = %e, events = batch.len(),
                        "cannot announce events; other nodes get them by the sweep");
                }
            }
            batch.clear();
        }
    }
}

impl Broker for PostgresBroker {
    fn local(&self) -> &Local {
        &self.local
    }

    fn publish(&self, events: &[Arc<Event>]) {
        self.local.deliver(events);
        if self.opts.notify == NotifyMode::AfterCommit {
            for ev in events {
                if self.outbox.try_send(ev.clone()).is_err() {
                    self.m.outbox_full.increment(1);
                }
            }
        }
    }

    fn before_commit<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if self.opts.notify == NotifyMode::InTransaction && !events.is_empty() {
                let payloads = encode(&self.opts.node, events.iter());
                Store::notify_in(txn, &self.channel, &payloads).await?;
                self.m.sent.increment(payloads.len() as u64);
            }
            Ok(())
        })
    }

    fn run(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let rx = self
                .outbox_rx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let notifier = async {
                match rx {
                    Some(rx) => self.notify_forever(rx).await,
                    None => std::future::pending().await,
                }
            };
            tokio::join!(self.listen_forever(), self.sweep_forever(), notifier);
        })
    }

    fn health(&self) -> BusHealth {
        if self.listening.load(Ordering::Relaxed) {
            BusHealth::Listening
        } else {
            BusHealth::Reconnecting
        }
    }
}

/// Packs events into payloads: the node id, then one line per event.
fn encode<'a>(node: &str, events: impl IntoIterator<Item = &'a Event>) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::from(node);
    for ev in events {
        let json = std::str::from_utf8(&ev.json).unwrap_or_default();
        let line = if node.len() + 1 + json.len() <= MAX_PAYLOAD {
            std::borrow::Cow::Borrowed(json)
        } else {
            std::borrow::Cow::Owned(format!("@{} {}", ev.stream, ev.seq))
        };
        if cur.len() + 1 + line.len() > MAX_PAYLOAD {
            out.push(std::mem::replace(&mut cur, String::from(node)));
        }
        cur.push('\n');
        cur.push_str(&line);
    }
    if cur.len() > node.len() {
        out.push(cur);
    }
    out
}

enum Line {
    Event(Event),
    Ref(StreamKey, u64),
}

#[derive(Deserialize)]
struct Wire<'a> {
    id: u64,
    stream: std::borrow::Cow<'a, str>,
    #[serde(rename = "type")]
    kind: std::borrow::Cow<'a, str>,
    at: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

fn decode(payload: &str) -> Result<(&str, Vec<Line>), String> {
    let mut lines = payload.split('\n');
    let node = lines.next().filter(|n| !n.is_empty()).ok_or("no node id")?;
    let mut out = Vec::new();
    for line in lines {
        if let Some(r) = line.strip_prefix('@') {
            let (stream, seq) = r.rsplit_once(' ').ok_or("a reference without a seq")?;
            let stream = StreamKey::parse(stream).map_err(|e| e.to_string())?;
            let seq = seq.parse().map_err(|_| "a reference with a bad seq")?;
            out.push(Line::Ref(stream, seq));
            continue;
        }
        let w: Wire = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let stream = StreamKey::parse(&w.stream).map_err(|e| e.to_string())?;
        let kind = EventKind::parse(&w.kind).map_err(|e| e.to_string())?;
        let at: DateTime<Utc> = DateTime::parse_from_rfc3339(&w.at)
            .map_err(|e| format!("at: {e}"))?
            .with_timezone(&Utc);
        let ev = Event::render(&stream, w.id, kind, at, w.data.get().to_owned());
        // Rendering is a pure function, so an announcement renders to its own bytes; if
        // not (another version's format), the log is the authority.
        if ev.json.as_ref() == line.as_bytes() {
            out.push(Line::Event(ev));
        } else {
            out.push(Line::Ref(stream, w.id));
        }
    }
    Ok((node, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(stream: &StreamKey, seq: u64, data: String) -> Event {
        let at = DateTime::parse_from_rfc3339("2026-12-01T10:00:00.123Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        Event::render(stream, seq, EventKind::StockUpdated, at, data)
    }

    #[test]
    fn announcements_render_back_to_the_same_bytes() {
        let z = StreamKey::Zone(4);
        let u = StreamKey::User("al\"ice\n".into());
        let events = vec![
            ev(&z, 1, r#"{"q":1,"s":"é\n\u2028"}"#.into()),
            ev(&u, 9, "{}".into()),
        ];
        let payloads = encode("node-a", events.iter());
        assert_eq!(payloads.len(), 1);
        let (node, lines) = decode(&payloads[0]).expect("decodes");
        assert_eq!(node, "node-a");
        assert_eq!(lines.len(), 2);
        for (line, want) in lines.iter().zip(&events) {
            match line {
                Line::Event(got) => {
                    assert_eq!(got.json, want.json);
                    assert_eq!(got.sse, want.sse);
                    assert_eq!((got.seq, &got.stream), (want.seq, &want.stream));
                }
                Line::Ref(..) => panic!("small events travel whole"),
            }
        }
    }

    #[test]
    fn payloads_stay_under_the_limit_and_large_events_travel_as_references() {
        let z = StreamKey::Zone(1);
        let big = format!("{{\"s\":\"{}\"}}", "x".repeat(9000));
        let mid = format!("{{\"s\":\"{}\"}}", "y".repeat(3000));
        let events = [
            ev(&z, 1, mid.clone()),
            ev(&z, 2, big),
            ev(&z, 3, mid.clone()),
            ev(&z, 4, mid),
        ];
        let payloads = encode("n", events.iter());
        assert!(
            payloads.iter().all(|p| p.len() <= MAX_PAYLOAD),
            "{:?}",
            payloads.iter().map(String::len).collect::<Vec<_>>()
        );
        let mut seen = Vec::new();
        for p in &payloads {
            for line in decode(p).expect("decodes").1 {
                seen.push(match line {
                    Line::Event(e) => format!("event {}", e.seq),
                    Line::Ref(s, q) => format!("ref {s} {q}"),
                });
            }
        }
        assert_eq!(seen, ["event 1", "ref zone:1 2", "event 3", "event 4"]);
        assert!(
            payloads.len() >= 2,
            "three 3 KB events do not fit one payload"
        );
    }

    #[test]
    fn malformed_announcements_are_errors_not_panics() {
        for bad in [
            "",
            "\n{}",
            "n\n{",
            "n\n@zone:1",
            "n\n@nope 3",
            "n\n@zone:1 x",
            r#"n\n{"id":1,"stream":"zone:1","type":"nope","at":"2026-12-01T10:00:00.123Z","data":{}}"#,
        ] {
            assert!(decode(&bad.replace("\\n", "\n")).is_err(), "{bad:?}");
        }
        // Nothing but the node id: no events.
        assert!(decode("n").expect("decodes").1.is_empty());
    }
}
