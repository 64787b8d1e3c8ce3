//! `GET /sse/streams?streams=zone:1,alerts,user:alice`: several streams on ONE
//! EventSource. Browsers allow six HTTP/1.1 connections per host, shared by all tabs;
//! a dashboard that opened one EventSource per stream would exhaust them with two
//! tabs and starve its own REST calls.
//!
//! Each frame's `id:` is the position of every stream at that point,
//! `zone:1=42,alerts=3,user:alice=9`, so the browser's automatic `Last-Event-ID`
//! resumes all of them; the data is the usual event JSON (it names its stream). Each
//! stream is still fed by its own gapless cursor. Frames are rendered per connection
//! (the id differs), so the single-stream endpoints stay the fan-out hot path.

use std::collections::BTreeMap;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SelectAll, select_all};
use futures_util::{FutureExt, Stream, StreamExt};
use poem::web::{Data, Query};
use poem::{Request, Response, handler};

use super::sse::{
    Delivery, Feed, MAX_CHUNK, SseQuery, feed_response, header_resume_point, refusal, retry_line,
    unavailable,
};
use crate::api::access::RateKey;
use crate::api::problem::{error_response, service_problem};
use crate::app::AppState;
use crate::auth::Principal;
use crate::cursor::{Cursor, CursorError, Item, Start};
use crate::domain::{DomainError, StreamKey};
use crate::event::sse_frame;

/// At most this many streams on one connection.
const MAX_STREAMS: usize = 8;

type Tagged = Pin<Box<dyn Stream<Item = Result<(String, Item), CursorError>> + Send>>;

/// Several cursors merged, with each stream's position.
pub struct Merged {
    inner: SelectAll<Tagged>,
    positions: BTreeMap<String, u64>,
}

fn tagged(mut cursor: Cursor) -> Tagged {
    Box::pin(async_stream::stream! {
        loop {
            match cursor.next().await {
                Ok(item) => yield Ok((cursor.stream().to_owned(), item)),
                Err(e) => {
                    yield Err(e);
                    break;
                }
            }
        }
    })
}

/// A composite resume point, `zone:1=42,alerts=3`, read per stream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Positions {
    /// Streams it names, with where each resumes (`Start::Unparsable` when the
    /// position is not a number that fits).
    named: BTreeMap<String, Start>,
    /// A part names no stream (`x`, `42`, `bogus=1`): it cannot be attributed, so
    /// every stream it does not position resumes from an unknown position too.
    garbled: bool,
}

impl Positions {
    pub fn parse(raw: &str) -> Positions {
        let mut p = Positions::default();
        for part in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match part.rsplit_once('=') {
                Some((stream, id)) if StreamKey::parse(stream).is_ok() => {
                    let start = id.trim().parse().map_or(Start::Unparsable, Start::After);
                    p.named.insert(stream.to_owned(), start);
                }
                _ => p.garbled = true,
            }
        }
        p
    }

    /// Where `stream` starts: its own position, else live, or an unknown position
    /// if the resume point had parts that could not be read.
    pub fn start(&self, stream: &str) -> Start {
        match self.named.get(stream) {
            Some(s) => *s,
            None if self.garbled => Start::Unparsable,
            None => Start::Live,
        }
    }
}

impl Merged {
    pub fn streams(&self) -> Vec<String> {
        self.positions.keys().cloned().collect()
    }

    fn composite_id(&self) -> String {
        self.positions
            .iter()
            .map(|(s, p)| format!("{s}={p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn frame(&mut self, stream: String, item: &Item) -> Bytes {
        match item {
            Item::Event(ev) => {
                self.positions.insert(stream, ev.seq);
                let id = self.composite_id();
                let mut b = BytesMut::with_capacity(ev.json.len() + id.len() + 40);
                b.extend_from_slice(b"id: ");
                b.extend_from_slice(id.as_bytes());
                b.extend_from_slice(b"\nevent: ");
                b.extend_from_slice(ev.kind.as_bytes());
                b.extend_from_slice(b"\ndata: ");
                b.extend_from_slice(&ev.json);
                b.extend_from_slice(b"\n\n");
                b.freeze()
            }
            Item::Reset(r) => {
                self.positions.insert(stream.clone(), r.last_event_id);
                let data = serde_json::json!({"stream": stream, "reason": r.reason,
                    "earliest_id": r.earliest_id, "last_event_id": r.last_event_id});
                sse_frame(None, "reset", data.to_string().as_bytes())
            }
        }
    }

    /// Everything ready, coalesced. Cancel-safe (`SelectAll::next` is).
    pub async fn next_chunk(&mut self, delivery: &Delivery) -> Result<Bytes, CursorError> {
        let (stream, item) = match self.inner.next().await {
            Some(r) => r?,
            None => return Err(CursorError::Closed),
        };
        delivery.delivered(&item);
        let mut buf = BytesMut::from(&self.frame(stream, &item)[..]);
        let mut n = 1;
        while buf.len() < MAX_CHUNK {
            match self.inner.next().now_or_never() {
                Some(Some(Ok((stream, item)))) => {
                    delivery.delivered(&item);
                    n += 1;
                    let f = self.frame(stream, &item);
                    buf.extend_from_slice(&f);
                }
                Some(Some(Err(e))) => return Err(e),
                _ => break,
            }
        }
        delivery.stats.sent(delivery.transport, n);
        Ok(buf.freeze())
    }
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct MultiQuery {
    streams: Option<String>,
}

/// `GET /sse/streams?streams=…`
#[handler]
pub async fn streams(
    req: &Request,
    Query(q): Query<MultiQuery>,
    Query(resume): Query<SseQuery>,
    Data(state): Data<&AppState>,
    Data(principal): Data<&Principal>,
    Data(rate): Data<&RateKey>,
) -> Response {
    let names: Vec<&str> = q
        .streams
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() || names.len() > MAX_STREAMS {
        let e = DomainError::Invalid(format!(
            "give 1 to {MAX_STREAMS} streams: ?streams=zone:1,alerts,user:ID"
        ));
        return error_response(e);
    }
    let mut keys = Vec::new();
    for n in &names {
        match StreamKey::parse(n) {
            Ok(k) if !keys.contains(&k) => keys.push(k),
            Ok(_) => {}
            Err(e) => return error_response(e),
        }
    }
    if let Some(r) = refusal(state, principal, rate, None) {
        return r;
    }
    for k in &keys {
        if let Err(e) = principal.require_stream(k) {
            return error_response(e);
        }
        if let StreamKey::Zone(z) = k
            && let Err(e) = state.service.zone(*z).await
        {
            return service_problem(e);
        }
    }
    let raw = header_resume_point(req).or(resume.last_event_id);
    let from = raw.as_deref().map(Positions::parse).unwrap_or_default();
    let service = &state.service;
    let mut tagged_cursors = Vec::new();
    let mut positions = BTreeMap::new();
    for k in &keys {
        let name = k.to_string();
        let mut cursor = Cursor::subscribe(&service.broker, &service.store, &name);
        let start = from.start(&name);
        if let Err(e) = cursor.seek(start).await {
            return unavailable(e);
        }
        positions.insert(name, cursor.position());
        tagged_cursors.push(tagged(cursor));
    }
    let merged = Merged {
        inner: select_all(tagged_cursors),
        positions,
    };
    let first = Bytes::from(retry_line(state.config.sse_retry));
    feed_response(state, principal, Feed::Many(merged), first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_positions_parse_per_stream() {
        let p = Positions::parse("zone:1=42, alerts=3,user:a=b=9,zone:2=x");
        assert_eq!(p.start("zone:1"), Start::After(42));
        assert_eq!(p.start("alerts"), Start::After(3));
        assert_eq!(p.start("user:a=b"), Start::After(9));
        assert_eq!(p.start("zone:2"), Start::Unparsable, "not a number");
        assert_eq!(p.start("zone:3"), Start::Live, "not named: live");
        let huge = format!("zone:1={}", "9".repeat(100));
        assert_eq!(Positions::parse(&huge).start("zone:1"), Start::Unparsable);
        for garbled in ["42", "zone:1=5,nonsense", "bogus=1"] {
            let p = Positions::parse(garbled);
            assert_eq!(p.start("alerts"), Start::Unparsable, "{garbled}");
        }
        assert_eq!(
            Positions::parse("zone:1=5,x").start("zone:1"),
            Start::After(5)
        );
    }
}
