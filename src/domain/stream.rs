//! Streams of the change log, the kinds of events they carry, and what the log keeps
//! of a stream.

use std::fmt;

use super::DomainError;

/// A stream of the change log: its events carry consecutive seqs starting at 1.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKey {
    Zone(i32),
    User(String),
    Alerts,
}

impl StreamKey {
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        if s == "alerts" {
            return Ok(StreamKey::Alerts);
        }
        if let Some(id) = s.strip_prefix("zone:") {
            return id
                .parse::<i32>()
                .ok()
                .filter(|id| *id > 0)
                .map(StreamKey::Zone)
                .ok_or_else(|| DomainError::Invalid(format!("bad zone stream {s:?}")));
        }
        if let Some(user) = s.strip_prefix("user:")
            && !user.is_empty()
            && user.len() <= 128
        {
            return Ok(StreamKey::User(user.to_owned()));
        }
        Err(DomainError::Invalid(format!(
            "unknown stream {s:?}: expected zone:N, user:ID or alerts"
        )))
    }

    /// The kind of stream, as a metric label (never the key itself: labels must be a
    /// bounded set).
    pub fn kind(&self) -> &'static str {
        match self {
            StreamKey::Zone(_) => "zone",
            StreamKey::User(_) => "user",
            StreamKey::Alerts => "alerts",
        }
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamKey::Zone(id) => write!(f, "zone:{id}"),
            StreamKey::User(id) => write!(f, "user:{id}"),
            StreamKey::Alerts => f.write_str("alerts"),
        }
    }
}

/// The type of a logged event (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    ItemCreated,
    StockUpdated,
    ItemUpdated,
    ItemDeleted,
    LowStockAlert,
    Announcement,
    Notification,
    NotificationRead,
    UnreadCount,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::ItemCreated,
        EventKind::StockUpdated,
        EventKind::ItemUpdated,
        EventKind::ItemDeleted,
        EventKind::LowStockAlert,
        EventKind::Announcement,
        EventKind::Notification,
        EventKind::NotificationRead,
        EventKind::UnreadCount,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ItemCreated => "item_created",
            EventKind::StockUpdated => "stock_updated",
            EventKind::ItemUpdated => "item_updated",
            EventKind::ItemDeleted => "item_deleted",
            EventKind::LowStockAlert => "low_stock_alert",
            EventKind::Announcement => "announcement",
            EventKind::Notification => "notification",
            EventKind::NotificationRead => "notification_read",
            EventKind::UnreadCount => "unread_count",
        }
    }

    pub fn parse(s: &str) -> Result<Self, DomainError> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| DomainError::Invalid(format!("unknown event type {s:?}")))
    }

    /// The kind of stream that carries this type of event.
    pub fn stream_kind(self) -> &'static str {
        match self {
            EventKind::ItemCreated
            | EventKind::StockUpdated
            | EventKind::ItemUpdated
            | EventKind::ItemDeleted => "zone",
            EventKind::LowStockAlert | EventKind::Announcement => "alerts",
            EventKind::Notification | EventKind::NotificationRead | EventKind::UnreadCount => {
                "user"
            }
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the change log holds of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// Oldest kept seq, `None` if nothing is kept.
    pub earliest: Option<u64>,
    /// Latest seq handed out (0 for a stream with no events yet).
    pub last: u64,
}

impl LogBounds {
    /// The first seq that a resume could still read.
    pub fn first_available(&self) -> u64 {
        self.earliest.unwrap_or(self.last + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_keys_round_trip() {
        for s in ["zone:7", "user:alice", "alerts"] {
            assert_eq!(StreamKey::parse(s).unwrap().to_string(), s);
        }
        for s in ["zone:x", "zone:0", "user:", "bogus", ""] {
            assert!(StreamKey::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn event_kinds_round_trip_and_know_their_stream() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Ok(k));
        }
        assert!(EventKind::parse("bogus").is_err());
        assert_eq!(
            EventKind::LowStockAlert.stream_kind(),
            StreamKey::Alerts.kind()
        );
    }
}
