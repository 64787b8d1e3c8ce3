//! The WebSocket message vocabulary (DESIGN §6): parsing client messages into
//! requests, and building the server's replies. No I/O here.

use serde_json::{Map, Value, json};

use crate::domain::{DomainError, ItemPatch, StreamKey};
use crate::http::wire::{ItemBody, SnapshotBody};
use crate::service::{ItemChange, ServiceError};

/// Error codes of `{"type":"error"}` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BadMessage,
    UnknownType,
    Invalid,
    NotFound,
    VersionConflict,
    InsufficientStock,
    Forbidden,
    RateLimited,
    IdempotencyKeyReused,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadMessage => "bad_message",
            Code::UnknownType => "unknown_type",
            Code::Invalid => "invalid",
            Code::NotFound => "not_found",
            Code::VersionConflict => "version_conflict",
            Code::InsufficientStock => "insufficient_stock",
            Code::Forbidden => "forbidden",
            Code::RateLimited => "rate_limited",
            Code::IdempotencyKeyReused => "idempotency_key_reused",
            Code::Internal => "internal",
        }
    }
}

/// A refused request: its code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub message: String,
    /// For `rate_limited`: when to try again.
    pub retry_after_ms: Option<u64>,
}

impl Refusal {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn rate_limited(retry: crate::limits::RetryAfter, what: &str) -> Self {
        Refusal {
            code: Code::RateLimited,
            message: format!("too many {what}"),
            retry_after_ms: Some(retry.millis()),
        }
    }
}

impl From<DomainError> for Refusal {
    fn from(e: DomainError) -> Self {
        let code = match e {
            DomainError::NotFound(_) => Code::NotFound,
            DomainError::Invalid(_) | DomainError::Conflict(_) => Code::Invalid,
            DomainError::VersionConflict { .. } => Code::VersionConflict,
            DomainError::InsufficientStock { .. } => Code::InsufficientStock,
            DomainError::Unauthenticated(_) | DomainError::Forbidden(_) => Code::Forbidden,
            DomainError::IdempotencyKeyReused(_) => Code::IdempotencyKeyReused,
        };
        Refusal::new(code, e.to_string())
    }
}

impl From<ServiceError> for Refusal {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Domain(d) => d.into(),
            ServiceError::Store(s) => {
                tracing::error!(error = %s, "storage failure");
                Refusal::new(Code::Internal, "internal error; it has been logged")
            }
        }
    }
}

/// What a client asked for.
#[derive(Debug)]
pub enum Request {
    RequestStock {
        zone_id: Option<i32>,
    },
    UpdateQuantity {
        item_id: i32,
        patch: ItemPatch,
    },
    Subscribe {
        stream: StreamKey,
        last_event_id: Option<u64>,
    },
    Unsubscribe {
        stream: StreamKey,
    },
    /// One notification (`notification_id`), or all with `"all": true`.
    MarkRead {
        notification_id: Option<i32>,
    },
    GetUnreadCount,
    Ping,
}

/// A parsed message: its `request_id` (echoed in the reply) and the request, or why
/// it was refused.
pub struct Parsed {
    pub request_id: Option<Value>,
    pub request: Result<Request, Refusal>,
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn int(obj: &Map<String, Value>, name: &str) -> Result<Option<i64>, Refusal> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| Refusal::new(Code::Invalid, format!("{name} must be an integer"))),
    }
}

fn id(obj: &Map<String, Value>, name: &str) -> Result<Option<i32>, Refusal> {
    int(obj, name)?
        .map(|v| {
            i32::try_from(v)
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| Refusal::new(Code::Invalid, format!("{name} must be a positive id")))
        })
        .transpose()
}

fn string<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, Refusal> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| Refusal::new(Code::Invalid, format!("{name} must be a string"))),
    }
}

fn required<T>(v: Option<T>, name: &str) -> Result<T, Refusal> {
    v.ok_or_else(|| Refusal::new(Code::Invalid, format!("{name} is required")))
}

fn stream(obj: &Map<String, Value>) -> Result<StreamKey, Refusal> {
    let raw = required(string(obj, "stream")?, "stream")?;
    StreamKey::parse(raw).map_err(|e| Refusal::new(Code::Invalid, e.to_string()))
}

pub fn parse(text: &str) -> Parsed {
    let obj = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => obj,
        Ok(_) => {
            return Parsed {
                request_id: None,
                request: Err(Refusal::new(
                    Code::BadMessage,
                    "a message is one JSON object",
                )),
            };
        }
        Err(e) => {
            return Parsed {
                request_id: None,
                request: Err(Refusal::new(Code::BadMessage, format!("not JSON: {e}"))),
            };
        }
    };
    let request_id = field(&obj, "request_id").cloned();
    Parsed {
        request: request(&obj, request_id.as_ref()),
        request_id,
    }
}

fn request(obj: &Map<String, Value>, request_id: Option<&Value>) -> Result<Request, Refusal> {
    let kind = required(string(obj, "type")?, "type")?;
    match kind {
        "ping" => Ok(Request::Ping),
        "request_stock" => Ok(Request::RequestStock {
            zone_id: id(obj, "zone_id")?,
        }),
        "update_quantity" => {
            // The request id doubles as the idempotency key, shared with REST's
            // `Idempotency-Key`, so it must be a string here.
            if request_id.is_some_and(|r| !r.is_string()) {
                return Err(Refusal::new(Code::Invalid, "request_id must be a string"));
            }
            let item_id = required(id(obj, "item_id")?, "item_id")?;
            let quantity = int(obj, "quantity")?;
            let delta = int(obj, "delta")?;
            if quantity.is_none() && delta.is_none() {
                return Err(Refusal::new(Code::Invalid, "quantity or delta is required"));
            }
            let patch = ItemPatch::parse(
                quantity,
                delta,
                None,
                None,
                int(obj, "expected_version")?,
                string(obj, "reason")?,
            )?;
            Ok(Request::UpdateQuantity { item_id, patch })
        }
        "subscribe" => {
            let last_event_id = match field(obj, "last_event_id") {
                None => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| {
                    Refusal::new(
                        Code::Invalid,
                        "last_event_id must be a non-negative integer",
                    )
                })?),
            };
            Ok(Request::Subscribe {
                stream: stream(obj)?,
                last_event_id,
            })
        }
        "mark_read" => Ok(Request::MarkRead {
            notification_id: if field(obj, "all").and_then(Value::as_bool) == Some(true) {
                None
            } else {
                Some(required(id(obj, "notification_id")?, "notification_id")?)
            },
        }),
        "get_unread_count" => Ok(Request::GetUnreadCount),
        "unsubscribe" => Ok(Request::Unsubscribe {
            stream: stream(obj)?,
        }),
        other => Err(Refusal::new(
            Code::UnknownType,
            format!("unknown message type {other:?}"),
        )),
    }
}

fn with_request_id(mut v: Value, request_id: Option<&Value>) -> String {
    if let (Some(r), Some(obj)) = (request_id, v.as_object_mut()) {
        obj.insert("request_id".into(), r.clone());
    }
    v.to_string()
}

pub fn error(request_id: Option<&Value>, r: &Refusal) -> String {
    let mut v = json!({"type": "error", "request_id": request_id, "code": r.code.as_str(), "message": r.message});
    if let (Some(ms), Some(obj)) = (r.retry_after_ms, v.as_object_mut()) {
        obj.insert("retry_after_ms".into(), ms.into());
    }
    v.to_string()
}

pub fn welcome(
    connection_id: &str,
    node_id: &str,
    subscriptions: &[String],
    heartbeat_ms: u128,
) -> String {
    json!({"type": "welcome", "connection_id": connection_id, "node_id": node_id,
           "subscriptions": subscriptions, "heartbeat_ms": heartbeat_ms})
    .to_string()
}

pub fn ack(request_id: Option<&Value>, change: ItemChange) -> String {
    let item = serde_json::to_value(ItemBody::from(change.item)).unwrap_or(Value::Null);
    with_request_id(
        json!({"type": "ack", "event_id": change.event_id, "item": item, "changed": change.changed}),
        request_id,
    )
}

pub fn stock_snapshot(request_id: Option<&Value>, snapshot: SnapshotBody) -> String {
    let mut v = serde_json::to_value(snapshot).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("type".into(), "stock_snapshot".into());
    }
    with_request_id(v, request_id)
}

pub fn subscription(kind: &str, request_id: Option<&Value>, stream: &str) -> String {
    with_request_id(json!({"type": kind, "stream": stream}), request_id)
}

pub fn marked_read(request_id: Option<&Value>, ids: &[i32], unread: u64) -> String {
    with_request_id(
        json!({"type": "marked_read", "ids": ids, "unread_count": unread}),
        request_id,
    )
}

pub fn unread_count(request_id: Option<&Value>, count: u64) -> String {
    with_request_id(json!({"type": "unread_count", "count": count}), request_id)
}

pub fn pong(request_id: Option<&Value>) -> String {
    with_request_id(json!({"type": "pong"}), request_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_request_with_the_right_code() {
        let code = |t: &str| parse(t).request.err().map(|r| r.code);
        assert_eq!(code("nope"), Some(Code::BadMessage));
        assert_eq!(code("[1]"), Some(Code::BadMessage));
        assert_eq!(code(r#"{"type":"dance"}"#), Some(Code::UnknownType));
        assert_eq!(code(r#"{"kind":"ping"}"#), Some(Code::Invalid));
        assert_eq!(
            code(r#"{"type":"update_quantity","item_id":"x","delta":1}"#),
            Some(Code::Invalid)
        );
        assert_eq!(
            code(r#"{"type":"update_quantity","item_id":1}"#),
            Some(Code::Invalid)
        );
        assert_eq!(
            code(r#"{"type":"subscribe","stream":"zone:x"}"#),
            Some(Code::Invalid)
        );
        assert_eq!(code(r#"{"type":"ping"}"#), None);
        let p = parse(r#"{"type":"update_quantity","request_id":"r1","item_id":7,"delta":-2}"#);
        assert_eq!(p.request_id, Some(json!("r1")));
        assert!(matches!(
            p.request,
            Ok(Request::UpdateQuantity { item_id: 7, .. })
        ));
    }

    use proptest::prelude::*;

    /// JSON values shaped like client messages: the protocol's member names and
    /// message types, with values of every kind.
    fn message() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<u64>().prop_map(|i| json!(i)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
            prop::sample::select(vec![
                "ping",
                "request_stock",
                "update_quantity",
                "subscribe",
                "unsubscribe",
                "mark_read",
                "get_unread_count",
                "zone:1",
                "alerts",
                "user:a",
                "zone:0",
            ])
            .prop_map(|s| json!(s)),
        ];
        let names = prop::sample::select(vec![
            "type",
            "request_id",
            "item_id",
            "quantity",
            "delta",
            "expected_version",
            "reason",
            "stream",
            "last_event_id",
            "zone_id",
            "notification_id",
            "all",
            "x",
        ]);
        let value = leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        prop::collection::btree_map(names, value, 0..8)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
    }

    fn defined(r: &Result<Request, Refusal>) -> bool {
        match r {
            Ok(_) => true,
            Err(e) => matches!(e.code, Code::BadMessage | Code::UnknownType | Code::Invalid),
        }
    }

    proptest! {
        /// Any text frame is a request or a refusal with a parse error code, never a
        /// panic; the reply to a refusal is itself valid JSON.
        #[test]
        fn any_text_is_a_request_or_a_defined_refusal(text in ".{0,200}") {
            let p = parse(&text);
            prop_assert!(defined(&p.request));
            if let Err(r) = &p.request {
                let reply: Value = serde_json::from_str(&error(p.request_id.as_ref(), r)).unwrap();
                prop_assert_eq!(&reply["type"], "error");
            }
        }

        #[test]
        fn any_message_shaped_object_is_a_request_or_a_defined_refusal(v in message()) {
            let p = parse(&v.to_string());
            prop_assert!(defined(&p.request), "{v}");
        }
    }
}
