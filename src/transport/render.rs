//! Every wire form of what cursors yield, each in one place: SSE frames (one stream, or
//! several with composite ids), WebSocket texts, the `reset` notice in each, the
//! heartbeat and the `retry:` preamble. An event's own JSON and SSE frame are rendered
//! once, when it is committed (`domain::event`); these only choose between them.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::cursor::Item;
use crate::domain::{Reset, ResetReason, StreamKey, format_time, now, sse_frame};
use crate::http::wire::SnapshotBody;

/// The `reset` notice, in every form: `type` and `stream` where the form needs them.
#[derive(Serialize)]
struct ResetBody {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
    reason: ResetReason,
    earliest_id: u64,
    last_event_id: u64,
}

fn reset_json(kind: Option<&'static str>, stream: Option<&StreamKey>, r: &Reset) -> Vec<u8> {
    serde_json::to_vec(&ResetBody {
        kind,
        stream: stream.map(ToString::to_string),
        reason: r.reason,
        earliest_id: r.earliest_id,
        last_event_id: r.last_event_id,
    })
    .unwrap_or_default()
}

/// `retry: <ms>`, the first bytes of every event stream.
pub fn retry(after: Duration) -> Bytes {
    Bytes::from(format!("retry: {}\n\n", after.as_millis()))
}

/// `event: heartbeat` with no `id:` (it must not move the browser's `lastEventId`).
pub fn heartbeat() -> Bytes {
    let data = format!("{{\"at\":\"{}\"}}", format_time(&now()));
    sse_frame(None, "heartbeat", data.as_bytes())
}

/// The `stock_snapshot` frame of `?snapshot=1`, with the id it is consistent with.
pub fn sse_snapshot(snapshot: &SnapshotBody) -> Bytes {
    let json = serde_json::to_vec(snapshot).unwrap_or_default();
    sse_frame(Some(snapshot.last_event_id), "stock_snapshot", &json)
}

/// A single-stream SSE frame: an event is its shared, pre-rendered bytes.
pub fn sse(item: &Item) -> Bytes {
    match item {
        Item::Event(ev) => ev.sse.clone(),
        Item::Reset(r) => sse_frame(None, "reset", &reset_json(None, None, r)),
    }
}

/// A frame of `/sse/streams`: `id:` is every stream's position (`composite_id`), and
/// a reset names its stream.
pub fn sse_multi(composite_id: &str, stream: &StreamKey, item: &Item) -> Bytes {
    match item {
        Item::Event(ev) => {
            let mut b = BytesMut::with_capacity(ev.json.len() + composite_id.len() + 40);
            b.put_slice(b"id: ");
            b.put_slice(composite_id.as_bytes());
            b.put_slice(b"\nevent: ");
            b.put_slice(ev.kind.as_str().as_bytes());
            b.put_slice(b"\ndata: ");
            b.put_slice(&ev.json);
            b.put_slice(b"\n\n");
            b.freeze()
        }
        Item::Reset(r) => sse_frame(None, "reset", &reset_json(None, Some(stream), r)),
    }
}

/// A WebSocket text: an event is its JSON (the same shared bytes as the SSE `data:`
/// line); a reset is `{"type":"reset","stream":…}`.
pub fn ws(stream: &StreamKey, item: &Item) -> Utf8Bytes {
    match item {
        Item::Event(ev) => ev.text.clone(),
        Item::Reset(r) => {
            // serde_json writes valid UTF-8.
            let json = reset_json(Some("reset"), Some(stream), r);
            String::from_utf8(json).unwrap_or_default().into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_says_its_stream_where_the_form_needs_it() {
        let r = Reset {
            reason: ResetReason::HistoryExpired,
            earliest_id: 5,
            last_event_id: 9,
        };
        let item = Item::Reset(r);
        let z = StreamKey::Zone(1);
        let single = String::from_utf8(sse(&item).to_vec()).unwrap();
        assert_eq!(
            single,
            "event: reset\ndata: {\"reason\":\"history_expired\",\"earliest_id\":5,\"last_event_id\":9}\n\n"
        );
        let multi = String::from_utf8(sse_multi("zone:1=9", &z, &item).to_vec()).unwrap();
        assert!(multi.contains("\"stream\":\"zone:1\"") && !multi.contains("id: "));
        let text = ws(&z, &item);
        let v: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(v["type"], "reset");
        assert_eq!(v["stream"], "zone:1");
        assert_eq!(v["last_event_id"], 9);
    }
}
