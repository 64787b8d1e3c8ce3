//! Per-user notifications: their domain types and the service operations on them.
//!
//! Each change (create, mark read, mark all read) is one transaction that also appends
//! to the user's stream `user:{id}`: `notification` or `notification_read`, then
//! `unread_count`, so every open tab of the user converges on the same state. A user
//! touches only their own notifications; another user's id is "not found".

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sea_orm::DatabaseTransaction;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::{Principal, Role};
use crate::domain::{DomainError, StreamKey, format_time, now};
use crate::event::Event;
use crate::service::{Keyed, Service, ServiceError, claim, settle};
use crate::store::{Store, StoreError};

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
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            "urgent" => Ok(Priority::Urgent),
            _ => Err(format!(
                "unknown priority {s:?}: low, normal, high or urgent"
            )),
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

/// A notification to create, checked.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub kind: String,
    pub priority: Priority,
    pub subject: String,
    pub message: String,
    pub data: Value,
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
            priority: priority
                .map(str::parse)
                .transpose()
                .map_err(DomainError::Invalid)?
                .unwrap_or_default(),
            subject: text("subject", subject, 200)?,
            message: text("message", message, 2000)?,
            data,
        })
    }
}

/// After a read: which notifications turned read, and how many stay unread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadState {
    pub ids: Vec<i32>,
    pub unread: u64,
}

fn own_user(by: &Principal) -> Result<&str, DomainError> {
    if by.anonymous {
        return Err(DomainError::Unauthenticated(
            "notifications are per user: send credentials bound to a user".into(),
        ));
    }
    by.user
        .as_deref()
        .ok_or_else(|| DomainError::Forbidden(format!("{} is not bound to a user", by.name)))
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

async fn append(
    txn: &DatabaseTransaction,
    stream: &str,
    kind: &str,
    data: &Value,
    at: DateTime<Utc>,
) -> Result<Event, StoreError> {
    let seq = Store::next_seq(txn, stream).await?;
    Store::append(txn, stream, seq, kind, json_text(data), None, at).await
}

/// Creates a notification in `txn`: the row, then `notification` and `unread_count`
/// on the user's stream. Also used by the low-stock path of item changes.
pub(crate) async fn notify_in(
    txn: &DatabaseTransaction,
    user: &str,
    new: &NewNotification,
    at: DateTime<Utc>,
) -> Result<(Notification, Vec<Event>), StoreError> {
    let stream = StreamKey::User(user.to_owned()).to_string();
    // The stream row lock first: it orders this user's changes and their counts.
    let seq = Store::next_seq(txn, &stream).await?;
    let n = Store::insert_notification(txn, user, new, at).await?;
    let created = Store::append(
        txn,
        &stream,
        seq,
        "notification",
        json_text(&n.to_json()),
        None,
        at,
    )
    .await?;
    let unread = Store::unread_in(txn, user).await?;
    let count = append(
        txn,
        &stream,
        "unread_count",
        &json!({ "count": unread }),
        at,
    )
    .await?;
    Ok((n, vec![created, count]))
}

impl Service {
    /// Creates a notification for `user` (writers and admins).
    pub async fn notify(
        &self,
        by: &Principal,
        user: &str,
        new: NewNotification,
        request_id: Option<String>,
    ) -> Result<Notification, ServiceError> {
        by.require_role(Role::Writer, "create notifications")?;
        let user = crate::domain::user_id(user)?;
        let keyed = Keyed::new(
            by,
            request_id.as_deref(),
            json!([
                "notify",
                user,
                new.kind,
                new.priority,
                new.subject,
                new.message,
                new.data
            ]),
        );
        self.write(async |txn| {
            if let Some(done) = claim(txn, keyed.as_ref()).await? {
                let n: Notification = serde_json::from_slice(&done.json)
                    .ok()
                    .and_then(|v: Value| serde_json::from_value(v["data"].clone()).ok())
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("event {}#{}", done.stream, done.seq))
                    })?;
                return Ok((n, vec![]));
            }
            let (n, events) = notify_in(txn, &user, &new, now()).await?;
            settle(txn, keyed.as_ref(), &events[0]).await?;
            Ok((n, events))
        })
        .await
    }

    /// Marks one of the caller's notifications read (`Some(id)`) or all of them.
    pub async fn mark_read(
        &self,
        by: &Principal,
        only: Option<i32>,
    ) -> Result<ReadState, ServiceError> {
        let user = own_user(by)?.to_owned();
        let stream = StreamKey::User(user.clone()).to_string();
        // A read that would change nothing takes no write lock: answered from a read.
        let nothing_to_do = match only {
            None => self.store.unread(&user).await? == 0,
            Some(id) => match self.store.notification(id).await? {
                Some(n) if n.user_id == user => n.read_at.is_some(),
                _ => return Err(DomainError::NotFound("notification").into()),
            },
        };
        if nothing_to_do {
            let unread = self.store.unread(&user).await?;
            return Ok(ReadState {
                ids: vec![],
                unread,
            });
        }
        self.write(async |txn| {
            let seq = Store::next_seq(txn, &stream).await?;
            if let Some(id) = only {
                let mine = Store::notification_in(txn, id)
                    .await?
                    .is_some_and(|n| n.user_id == user);
                if !mine {
                    return Err(DomainError::NotFound("notification").into());
                }
            }
            let at = now();
            let ids = Store::mark_read(txn, &user, only, at).await?;
            let unread = Store::unread_in(txn, &user).await?;
            if ids.is_empty() {
                // Already read: nothing changes and nothing is appended.
                return Ok((ReadState { ids, unread }, vec![]));
            }
            let read = json!({"ids": ids, "read_at": format_time(&at)});
            let e1 = Store::append(
                txn,
                &stream,
                seq,
                "notification_read",
                json_text(&read),
                None,
                at,
            )
            .await?;
            let e2 = append(
                txn,
                &stream,
                "unread_count",
                &json!({ "count": unread }),
                at,
            )
            .await?;
            Ok((ReadState { ids, unread }, vec![e1, e2]))
        })
        .await
    }

    pub async fn unread_count(&self, by: &Principal) -> Result<u64, ServiceError> {
        Ok(self.store.unread(own_user(by)?).await?)
    }

    pub async fn notifications(
        &self,
        by: &Principal,
        unread_only: bool,
        before: Option<i32>,
        limit: u64,
    ) -> Result<Vec<Notification>, ServiceError> {
        let user = own_user(by)?;
        Ok(self
            .store
            .notifications(user, unread_only, before, limit)
            .await?)
    }

    /// The caller's user watches (or stops watching) a zone's low-stock crossings.
    pub async fn watch(&self, by: &Principal, zone: i32, on: bool) -> Result<(), ServiceError> {
        let user = own_user(by)?;
        by.require_zone(zone)?;
        self.zone(zone).await?;
        // Already so: nothing is written.
        if self.store.watching(user, zone).await? == on {
            return Ok(());
        }
        if on {
            self.store.watch(user, zone, now()).await?;
        } else {
            self.store.unwatch(user, zone).await?;
        }
        Ok(())
    }

    /// An announcement to everyone on the alerts stream (admins).
    pub async fn announce(
        &self,
        by: &Principal,
        subject: &str,
        message: &str,
        priority: Option<&str>,
        request_id: Option<String>,
    ) -> Result<u64, ServiceError> {
        by.require_admin("make announcements")?;
        let new = NewNotification::parse(Some("announcement"), priority, subject, message, None)?;
        let data = json!({"subject": new.subject, "message": new.message,
                          "priority": new.priority, "actor": by.name});
        let stream = StreamKey::Alerts.to_string();
        let keyed = Keyed::new(
            by,
            request_id.as_deref(),
            json!(["announce", new.subject, new.message, new.priority]),
        );
        self.write(async |txn| {
            if let Some(done) = claim(txn, keyed.as_ref()).await? {
                return Ok((done.seq, vec![]));
            }
            let ev = append(txn, &stream, "announcement", &data, now()).await?;
            settle(txn, keyed.as_ref(), &ev).await?;
            Ok((ev.seq, vec![ev]))
        })
        .await
    }
}

/// The `stock_alert` notification for a watcher of the item's zone.
pub(crate) fn stock_alert(item: &crate::domain::Item, zone_event_id: u64) -> NewNotification {
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
