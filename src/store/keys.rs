//! API key rows.

use chrono::{DateTime, Utc};
use entity::api_key;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseTransaction, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, Set,
};

use super::{Store, StoreError, unique};
use crate::domain::{Role, ZoneScope};

/// A stored key, without its secret.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: i32,
    pub name: String,
    pub role: Role,
    pub zones: ZoneScope,
    pub user_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

fn to_key(m: api_key::Model) -> Result<ApiKey, StoreError> {
    Ok(ApiKey {
        id: m.id,
        role: m
            .role
            .parse()
            .map_err(|e: crate::domain::DomainError| StoreError::Corrupt(e.to_string()))?,
        zones: m
            .zones
            .parse()
            .map_err(|e: crate::domain::DomainError| StoreError::Corrupt(e.to_string()))?,
        name: m.name,
        user_id: m.user_id,
        created_at: m.created_at,
        revoked_at: m.revoked_at,
    })
}

impl Store {
    pub async fn insert_api_key(
        &self,
        name: &str,
        hash: &str,
        role: Role,
        zones: &ZoneScope,
        user_id: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<Option<ApiKey>, StoreError> {
        if api_key::Entity::find()
            .filter(api_key::Column::Name.eq(name))
            .count(&self.db)
            .await?
            > 0
        {
            return Ok(None);
        }
        let m = api_key::ActiveModel {
            name: Set(name.to_owned()),
            hash: Set(hash.to_owned()),
            role: Set(role.to_string()),
            zones: Set(zones.to_string()),
            user_id: Set(user_id.map(str::to_owned)),
            created_at: Set(at),
            revoked_at: Set(None),
            ..Default::default()
        }
        .insert(&self.db)
        .await?;
        to_key(m).map(Some)
    }

    pub async fn api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        api_key::Entity::find()
            .order_by_asc(api_key::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .map(to_key)
            .collect()
    }

    pub async fn api_key_count(&self) -> Result<u64, StoreError> {
        Ok(api_key::Entity::find().count(&self.db).await?)
    }

    /// The key row whose `column` (unique: name or hash) is `value`.
    async fn key_row(
        &self,
        column: api_key::Column,
        value: &str,
    ) -> Result<Option<api_key::Model>, StoreError> {
        let select = api_key::Entity::find().filter(column.eq(value));
        Ok(unique(select, &self.db).await?)
    }

    pub async fn api_key_by_name(&self, name: &str) -> Result<Option<ApiKey>, StoreError> {
        self.key_row(api_key::Column::Name, name)
            .await?
            .map(to_key)
            .transpose()
    }

    pub async fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>, StoreError> {
        self.key_row(api_key::Column::Hash, hash)
            .await?
            .map(to_key)
            .transpose()
    }

    /// Revokes the named key; `None` if there is no such key.
    pub async fn revoke_api_key(
        &self,
        name: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<ApiKey>, StoreError> {
        let Some(m) = self.key_row(api_key::Column::Name, name).await? else {
            return Ok(None);
        };
        if m.revoked_at.is_some() {
            return to_key(m).map(Some);
        }
        let mut am: api_key::ActiveModel = m.into();
        am.revoked_at = Set(Some(at));
        to_key(am.update(&self.db).await?).map(Some)
    }

    /// Whether the key exists and is not revoked, as `txn` sees it.
    pub async fn key_valid_in(txn: &DatabaseTransaction, id: i32) -> Result<bool, StoreError> {
        let row = unique(api_key::Entity::find_by_id(id), txn).await?;
        Ok(row.is_some_and(|k| k.revoked_at.is_none()))
    }

    pub async fn revoked_key_ids(&self) -> Result<Vec<i32>, StoreError> {
        Ok(api_key::Entity::find()
            .filter(api_key::Column::RevokedAt.is_not_null())
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect())
    }
}
