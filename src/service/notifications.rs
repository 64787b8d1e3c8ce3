//! Per-user notifications, watches and announcements.
//!
//! Each change (create, mark read, mark all read) is one transaction that also appends
//! to the user's stream `user:{id}`: `notification` or `notification_read`, then
//! `unread_count`, so every open tab of the user converges on the same state. A user
//! touches only their own notifications; another user's id is "not found".

use chrono::{DateTime, Utc};
use sea_orm::DatabaseTransaction;
use serde_json::{Value, json};

use super::idempotency::Requested;
use super::{Service, ServiceError};
use crate::domain::{
    DomainError, Event, EventKind, NewNotification, Notification, Principal, ReadState, Role,
    StreamKey, format_time, now,
};
use crate::store::{NewEvent, Store, StoreError};

pub(super) fn own_user(by: &Principal) -> Result<&str, DomainError> {
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
    stream: &StreamKey,
    kind: EventKind,
    data: &Value,
    at: DateTime<Utc>,
) -> Result<Event, StoreError> {
    let seq = Store::next_seq(txn, stream).await?;
    Store::append(txn, event(stream, seq, kind, json_text(data), at)).await
}

/// A user-stream event: these carry no request id.
fn event(
    stream: &StreamKey,
    seq: u64,
    kind: EventKind,
    data: String,
    at: DateTime<Utc>,
) -> NewEvent<'_> {
    NewEvent {
        stream,
        seq,
        kind,
        data,
        request_id: None,
        at,
    }
}

/// The user's `unread_count` event after a change to their notifications.
async fn append_unread(
    txn: &DatabaseTransaction,
    stream: &StreamKey,
    unread: u64,
    at: DateTime<Utc>,
) -> Result<Event, StoreError> {
    let count = json!({ "count": unread });
    append(txn, stream, EventKind::UnreadCount, &count, at).await
}

/// Creates a notification in `txn`: the row, then `notification` and `unread_count`
/// on the user's stream. Also used by the low-stock path of item changes.
pub(crate) async fn notify_in(
    txn: &DatabaseTransaction,
    user: &str,
    new: &NewNotification,
    at: DateTime<Utc>,
) -> Result<(Notification, Vec<Event>), StoreError> {
    let stream = StreamKey::User(user.to_owned());
    // The stream row lock first: it orders this user's changes and their counts.
    let seq = Store::next_seq(txn, &stream).await?;
    let n = Store::insert_notification(txn, user, new, at).await?;
    let created = Store::append(
        txn,
        event(
            &stream,
            seq,
            EventKind::Notification,
            json_text(&n.to_json()),
            at,
        ),
    )
    .await?;
    let unread = Store::unread_in(txn, user).await?;
    let count = append_unread(txn, &stream, unread, at).await?;
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
        let req = Requested::new(
            by,
            request_id.as_deref(),
            json!(["notify", user, new.canonical()]),
        );
        self.write(by, async |txn| {
            if let Some(done) = req.claim(txn).await? {
                let n: Notification = serde_json::from_slice(&done.json)
                    .ok()
                    .and_then(|v: Value| serde_json::from_value(v["data"].clone()).ok())
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("event {}#{}", done.stream, done.seq))
                    })?;
                return Ok((n, vec![]));
            }
            let (n, events) = notify_in(txn, &user, &new, now()).await?;
            req.settle(txn, &events[0]).await?;
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
        let stream = StreamKey::User(user.clone());
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
        self.write(by, async |txn| {
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
                event(
                    &stream,
                    seq,
                    EventKind::NotificationRead,
                    json_text(&read),
                    at,
                ),
            )
            .await?;
            let e2 = append_unread(txn, &stream, unread, at).await?;
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
        self.zone(by, zone).await?;
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
        let data = json!({"subject": new.subject(), "message": new.message(),
                          "priority": new.priority(), "actor": by.name});
        let stream = StreamKey::Alerts;
        let req = Requested::new(
            by,
            request_id.as_deref(),
            json!(["announce", new.subject(), new.message(), new.priority()]),
        );
        self.write(by, async |txn| {
            if let Some(done) = req.claim(txn).await? {
                return Ok((done.seq, vec![]));
            }
            let ev = append(txn, &stream, EventKind::Announcement, &data, now()).await?;
            req.settle(txn, &ev).await?;
            Ok((ev.seq, vec![ev]))
        })
        .await
    }
}
