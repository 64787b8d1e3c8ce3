//! Notification and watch rows. Writes take the caller's transaction, which has
//! already locked the user's stream row, so one user's notifications change in order.

use chrono::{DateTime, Utc};
use entity::{notification, watch};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseTransaction, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set,
};

use super::{Store, StoreError, unique};
use crate::domain::{NewNotification, Notification};

fn to_notification(m: notification::Model) -> Result<Notification, StoreError> {
    Ok(Notification {
        id: m.id,
        priority: m
            .priority
            .parse()
            .map_err(|e: crate::domain::DomainError| StoreError::Corrupt(e.to_string()))?,
        data: serde_json::from_str(&m.data)
            .map_err(|e| StoreError::Corrupt(format!("notification {}: {e}", m.id)))?,
        user_id: m.user_id,
        kind: m.kind,
        subject: m.subject,
        message: m.message,
        created_at: m.created_at,
        read_at: m.read_at,
    })
}

impl Store {
    pub async fn insert_notification(
        txn: &DatabaseTransaction,
        user: &str,
        new: &NewNotification,
        at: DateTime<Utc>,
    ) -> Result<Notification, StoreError> {
        let m = notification::ActiveModel {
            user_id: Set(user.to_owned()),
            kind: Set(new.kind().to_owned()),
            priority: Set(new.priority().to_string()),
            subject: Set(new.subject().to_owned()),
            message: Set(new.message().to_owned()),
            data: Set(new.data().to_string()),
            created_at: Set(at),
            read_at: Set(None),
            ..Default::default()
        }
        .insert(txn)
        .await?;
        to_notification(m)
    }

    pub async fn notification(&self, id: i32) -> Result<Option<Notification>, StoreError> {
        unique(notification::Entity::find_by_id(id), &self.db)
            .await?
            .map(to_notification)
            .transpose()
    }

    pub async fn watching(&self, user: &str, zone: i32) -> Result<bool, StoreError> {
        Ok(
            unique(watch::Entity::find_by_id((user.to_owned(), zone)), &self.db)
                .await?
                .is_some(),
        )
    }

    pub async fn notification_in(
        txn: &DatabaseTransaction,
        id: i32,
    ) -> Result<Option<Notification>, StoreError> {
        unique(notification::Entity::find_by_id(id), txn)
            .await?
            .map(to_notification)
            .transpose()
    }

    /// Marks the user's unread notifications (all, or just `only`) read; returns
    /// the ids that changed.
    pub async fn mark_read(
        txn: &DatabaseTransaction,
        user: &str,
        only: Option<i32>,
        at: DateTime<Utc>,
    ) -> Result<Vec<i32>, StoreError> {
        let mut q = notification::Entity::find()
            .filter(notification::Column::UserId.eq(user))
            .filter(notification::Column::ReadAt.is_null());
        if let Some(id) = only {
            q = q.filter(notification::Column::Id.eq(id));
        }
        let ids: Vec<i32> = q
            .order_by_asc(notification::Column::Id)
            .all(txn)
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect();
        if !ids.is_empty() {
            notification::Entity::update_many()
                .col_expr(
                    notification::Column::ReadAt,
                    sea_orm::sea_query::Expr::value(at),
                )
                .filter(notification::Column::Id.is_in(ids.clone()))
                .exec(txn)
                .await?;
        }
        Ok(ids)
    }

    pub async fn unread_in(txn: &DatabaseTransaction, user: &str) -> Result<u64, StoreError> {
        Ok(notification::Entity::find()
            .filter(notification::Column::UserId.eq(user))
            .filter(notification::Column::ReadAt.is_null())
            .count(txn)
            .await?)
    }

    pub async fn unread(&self, user: &str) -> Result<u64, StoreError> {
        Ok(notification::Entity::find()
            .filter(notification::Column::UserId.eq(user))
            .filter(notification::Column::ReadAt.is_null())
            .count(&self.db)
            .await?)
    }

    /// The user's notifications, newest first, with id < `before`.
    pub async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<i32>,
        limit: u64,
    ) -> Result<Vec<Notification>, StoreError> {
        let mut q = notification::Entity::find().filter(notification::Column::UserId.eq(user));
        if unread_only {
            q = q.filter(notification::Column::ReadAt.is_null());
        }
        if let Some(b) = before {
            q = q.filter(notification::Column::Id.lt(b));
        }
        q.order_by_desc(notification::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(to_notification)
            .collect()
    }

    pub async fn watchers_in(
        txn: &DatabaseTransaction,
        zone: i32,
    ) -> Result<Vec<String>, StoreError> {
        Ok(watch::Entity::find()
            .filter(watch::Column::ZoneId.eq(zone))
            .order_by_asc(watch::Column::UserId)
            .all(txn)
            .await?
            .into_iter()
            .map(|w| w.user_id)
            .collect())
    }

    pub async fn watch(&self, user: &str, zone: i32, at: DateTime<Utc>) -> Result<(), StoreError> {
        watch::Entity::insert(watch::ActiveModel {
            user_id: Set(user.to_owned()),
            zone_id: Set(zone),
            created_at: Set(at),
        })
        .on_conflict(
            OnConflict::columns([watch::Column::UserId, watch::Column::ZoneId])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await?;
        Ok(())
    }

    pub async fn unwatch(&self, user: &str, zone: i32) -> Result<(), StoreError> {
        watch::Entity::delete_many()
            .filter(watch::Column::UserId.eq(user))
            .filter(watch::Column::ZoneId.eq(zone))
            .exec(&self.db)
            .await?;
        Ok(())
    }
}
