//! Per-user notifications: what one is, what may be created, and what a read leaves.
//! Each change is a transaction of the service layer that also appends to the user's
//! stream `user:{id}`; these are the types it works with.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{DomainError, Item, format_time};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Urgent,
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Urgent => "urgent",
        })
    }
}

impl FromStr for Priority {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, DomainError> {
        match s {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            "urgent" => Ok(Priority::Urgent),
            _ => Err(DomainError::Invalid(format!(
                "unknown priority {s:?}: low, normal, high or urgent"
            ))),
        }
    }
}

/// As stored and as sent (`to_json`); read back from a `notification` event to
/// replay an idempotency key's original result.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Notification {
    pub id: i32,
    pub user_id: String,
    pub kind: String,
    pub priority: Priority,
    pub subject: String,
    pub message: String,
    pub data: Value,
    pub created_at: DateTime<Utc>,
    pub read_at: Option<DateTime<Utc>>,
}

impl Notification {
    /// The wire form: REST bodies and the `data` of `notification` events.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "user_id": self.user_id, "kind": self.kind,
            "priority": self.priority, "subject": self.subject, "message": self.message,
            "data": self.data, "created_at": format_time(&self.created_at),
            "read_at": self.read_at.as_ref().map(format_time),
        })
    }
}

/// A notification to create, checked: `parse` (or `stock_alert`) is the only way to
/// make one.
#[derive(Debug, Clone)]
pub struct NewNotification {
    kind: String,
    priority: Priority,
    subject: String,
    message: String,
    data: Value,
}

fn text(field: &str, v: &str, max: usize) -> Result<String, DomainError> {
    let t = v.trim();
    if t.is_empty() || t.chars().count() > max {
        return Err(DomainError::Invalid(format!(
            "{field} must be 1 to {max} characters"
        )));
    }
    Ok(t.to_owned())
}

impl NewNotification {
    pub fn parse(
        kind: Option<&str>,
        priority: Option<&str>,
        subject: &str,
        message: &str,
        data: Option<Value>,
    ) -> Result<Self, DomainError> {
        let data = data.unwrap_or(Value::Object(Default::default()));
        if !data.is_object() {
            return Err(DomainError::Invalid("data must be a JSON object".into()));
        }
        Ok(NewNotification {
            kind: text("kind", kind.unwrap_or("message"), 64)?,
            priority: priority.map(str::parse).transpose()?.unwrap_or_default(),
            subject: text("subject", subject, 200)?,
            message: text("message", message, 2000)?,
            data,
        })
    }
}

impl NewNotification {
    /// The `stock_alert` notification for a watcher of the item's zone, when the zone's
    /// event `zone_event_id` took the item into low stock.
    pub fn stock_alert(item: &Item, zone_event_id: u64) -> NewNotification {
        NewNotification {
            kind: "stock_alert".into(),
            priority: Priority::High,
            subject: format!("Low stock: {}", item.name),
            message: format!(
                "{} ({}) is down to {} (threshold {}).",
                item.name, item.sku, item.quantity, item.low_stock_threshold
            ),
            data: json!({"zone_id": item.zone_id, "item_id": item.id, "sku": item.sku,
                         "quantity": item.quantity, "low_stock_threshold": item.low_stock_threshold,
                         "zone_event_id": zone_event_id}),
        }
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn priority(&self) -> Priority {
        self.priority
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn data(&self) -> &Value {
        &self.data
    }

    /// The canonical form, for idempotency fingerprints.
    pub fn canonical(&self) -> Value {
        json!([
            self.kind,
            self.priority,
            self.subject,
            self.message,
            self.data
        ])
    }
}

/// After a read: which notifications turned read, and how many stay unread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadState {
    pub ids: Vec<i32>,
    pub unread: u64,
}
