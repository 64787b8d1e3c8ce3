//! API keys: made, listed and revoked only within the caller's own role and scope.

use super::{Service, ServiceError};
use crate::credentials::{hash_key, new_key};
use crate::domain::{DomainError, Principal, Role, ZoneScope, now};
use crate::store::{ApiKey, StoreError};

impl Service {
    /// Creates an API key; the secret is returned here once and stored only hashed.
    pub async fn create_key(
        &self,
        by: &Principal,
        name: &str,
        role: Role,
        zones: ZoneScope,
        user: Option<&str>,
    ) -> Result<(ApiKey, String), ServiceError> {
        by.require_admin("manage keys")?;
        let name = crate::domain::key_name(name)?;
        let user = user.map(crate::domain::user_id).transpose()?;
        if !by.may_grant(role, &zones, user.as_deref()) {
            return Err(DomainError::Forbidden(format!(
                "{} may only create keys within its own role ({}) and zones ({}){}",
                by.name,
                by.role,
                by.zones,
                if by.zones == ZoneScope::All {
                    ""
                } else {
                    ", bound to no user or its own"
                }
            ))
            .into());
        }
        if let ZoneScope::Only(ids) = &zones {
            for id in ids {
                if self.store.zone(*id).await?.is_none() {
                    return Err(DomainError::Invalid(format!("zone {id} does not exist")).into());
                }
            }
        }
        let secret = new_key().map_err(|e| StoreError::Corrupt(format!("no randomness: {e}")))?;
        let key = self
            .store
            .insert_api_key(
                &name,
                &hash_key(&secret),
                role,
                &zones,
                user.as_deref(),
                now(),
            )
            .await?
            .ok_or_else(|| DomainError::Conflict(format!("a key named {name:?} exists")))?;
        Ok((key, secret))
    }

    /// The keys `by` may see: those it could have created itself.
    pub async fn keys(&self, by: &Principal) -> Result<Vec<ApiKey>, ServiceError> {
        by.require_admin("manage keys")?;
        let mut keys = self.store.api_keys().await?;
        keys.retain(|k| by.may_grant(k.role, &k.zones, k.user_id.as_deref()));
        Ok(keys)
    }

    /// Revokes a key `by` may see; any other is "not found", so nothing says it exists.
    pub async fn revoke_key(&self, by: &Principal, name: &str) -> Result<ApiKey, ServiceError> {
        by.require_admin("manage keys")?;
        let visible = self
            .store
            .api_key_by_name(name)
            .await?
            .is_some_and(|k| by.may_grant(k.role, &k.zones, k.user_id.as_deref()));
        if !visible {
            return Err(DomainError::NotFound("key").into());
        }
        Ok(self
            .store
            .revoke_api_key(name, now())
            .await?
            .ok_or(DomainError::NotFound("key"))?)
    }
}
