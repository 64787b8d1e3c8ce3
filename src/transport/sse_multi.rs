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

use bytes::Bytes;
use poem::web::Query;
use poem::{Response, handler};

use super::batch::Merged;
use super::sse::respond;
use super::{Caller, OpenError, render};
use crate::cursor::{Item, Start};
use crate::domain::{DomainError, StreamKey};

/// At most this many streams on one connection.
const MAX_STREAMS: usize = 8;

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

#[derive(Debug, Default, serde::Deserialize)]
pub struct MultiQuery {
    streams: Option<String>,
}

/// Every stream's position, `alerts=3,zone:1=42` (ordered by the streams' names): the
/// `id:` of each frame.
fn composite_id(positions: &BTreeMap<String, u64>) -> String {
    positions
        .iter()
        .map(|(s, p)| format!("{s}={p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `GET /sse/streams?streams=…`
#[handler]
pub async fn streams(Query(q): Query<MultiQuery>, caller: Caller<'_>) -> Response {
    let opened = async {
        let names: Vec<&str> = q
            .streams
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if names.is_empty() || names.len() > MAX_STREAMS {
            return Err(OpenError::Refused(DomainError::Invalid(format!(
                "give 1 to {MAX_STREAMS} streams: ?streams=zone:1,alerts,user:ID"
            ))));
        }
        let mut keys: Vec<StreamKey> = Vec::new();
        for n in &names {
            let k = StreamKey::parse(n).map_err(OpenError::Refused)?;
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        caller.admit()?;
        let from = caller
            .resume
            .as_deref()
            .map(Positions::parse)
            .unwrap_or_default();
        let mut merged = Merged::default();
        let mut positions = BTreeMap::new();
        for k in keys {
            let start = from.start(&k.to_string());
            let cursor = caller.open(k.clone(), start).await?;
            positions.insert(k.to_string(), cursor.position());
            merged.insert(cursor);
        }
        Ok((merged, positions))
    };
    let (merged, mut positions) = match opened.await {
        Ok(v) => v,
        Err(e) => return e.response(),
    };
    let first: Bytes = render::retry(caller.state.config.sse_retry);
    respond(
        &caller,
        move || Some((merged, first)),
        move |stream, item| {
            let at = match item {
                Item::Event(ev) => ev.seq,
                Item::Reset(r) => r.last_event_id,
            };
            positions.insert(stream.to_string(), at);
            render::sse_multi(&composite_id(&positions), stream, item)
        },
    )
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
