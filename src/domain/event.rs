//! A logged event, rendered once. The event JSON (DESIGN §4) and the complete SSE frame
//! are built when the event is created or read back from the log, and shared as
//! `Bytes` by every subscriber: no transport re-serialises an event.
//!
//! Rendering is a pure function of `(stream, seq, type, at, data)`, with `data` the
//! exact text stored in the log, so a replayed event is byte-identical to the live one.

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{EventKind, StreamKey, format_time};

#[derive(Debug)]
pub struct Event {
    pub stream: StreamKey,
    pub seq: u64,
    pub kind: EventKind,
    pub at: DateTime<Utc>,
    /// The `data` member as stored in the log.
    pub data: String,
    /// The event JSON: the SSE `data:` line (and `text`'s bytes).
    pub json: Bytes,
    /// The same bytes as a WebSocket text payload, checked as UTF-8 once.
    pub text: Utf8Bytes,
    /// `id: {seq}\nevent: {type}\ndata: {json}\n\n`.
    pub sse: Bytes,
    /// When its transaction committed on this node (live events only), for the
    /// delivery-lag histogram.
    pub committed: Option<std::time::Instant>,
}

impl Event {
    pub fn render(
        stream: &StreamKey,
        seq: u64,
        kind: EventKind,
        at: DateTime<Utc>,
        data: String,
    ) -> Self {
        // Written by hand so the member order is fixed and `data` is inserted verbatim.
        let json = format!(
            "{{\"id\":{seq},\"stream\":{},\"type\":\"{kind}\",\"at\":\"{}\",\"data\":{data}}}",
            json_str(&stream.to_string()),
            format_time(&at)
        );
        let text = Utf8Bytes::from(json);
        let json: Bytes = AsRef::<Bytes>::as_ref(&text).clone();
        let sse = sse_frame(Some(seq), kind.as_str(), &json);
        Event {
            stream: stream.clone(),
            seq,
            kind,
            at,
            data,
            json,
            text,
            sse,
            committed: None,
        }
    }
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// One SSE frame. `data` must be a single line (serde_json output always is).
pub fn sse_frame(id: Option<u64>, event: &str, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(data.len() + event.len() + 32);
    if let Some(id) = id {
        b.put_slice(b"id: ");
        b.put_slice(id.to_string().as_bytes());
        b.put_u8(b'\n');
    }
    b.put_slice(b"event: ");
    b.put_slice(event.as_bytes());
    b.put_slice(b"\ndata: ");
    b.put_slice(data);
    b.put_slice(b"\n\n");
    b.freeze()
}

/// The `reset` notice (DESIGN §5): the resume point cannot be replayed, the subscriber
/// continues live from `last_event_id + 1` and should refetch its snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reset {
    pub reason: ResetReason,
    pub earliest_id: u64,
    pub last_event_id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetReason {
    /// The resume point is older than the oldest kept event.
    HistoryExpired,
    /// The resume point is in the future or not a number.
    UnknownPosition,
}

impl ResetReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::HistoryExpired => "history_expired",
            ResetReason::UnknownPosition => "unknown_position",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_design_json_and_sse_frame() {
        let at = DateTime::parse_from_rfc3339("2026-11-24T12:00:00.123Z")
            .unwrap()
            .with_timezone(&Utc);
        let e = Event::render(
            &StreamKey::Zone(1),
            42,
            EventKind::StockUpdated,
            at,
            r#"{"quantity":3}"#.into(),
        );
        assert_eq!(
            &e.json[..],
            br#"{"id":42,"stream":"zone:1","type":"stock_updated","at":"2026-11-24T12:00:00.123Z","data":{"quantity":3}}"#
        );
        let mut frame = b"id: 42\nevent: stock_updated\ndata: ".to_vec();
        frame.extend_from_slice(&e.json);
        frame.extend_from_slice(b"\n\n");
        assert_eq!(&e.sse[..], &frame[..]);
        assert_eq!(e.text.as_str().as_bytes(), &e.json[..]);
    }
}
