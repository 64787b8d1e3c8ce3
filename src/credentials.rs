//! Credentials into principals (DESIGN §8): API keys (`zk_…`, stored as a SHA-256
//! hash) and HS256 JWTs; and the end of credentials: revocations (watched, so open
//! connections of a revoked key can be closed) and JWT expiry. What a principal may
//! do is `domain::access`'s.
//!
//! Must never log a credential.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::domain::{Principal, Role, ZoneScope};
use crate::store::{ApiKey, Store, StoreError};

/// A new API key: `zk_` and 64 hex digits (256 random bits).
pub fn new_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("zk_{}", hex::encode(bytes)))
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// JWT claims as zonecast reads them: `sub` (a non-empty user id), `role`, `zones`
/// (a list of ids or `"*"`; required: a token without it grants nothing), `exp`
/// (required), `nbf` (honoured when present).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones: Option<ZonesClaim>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ZonesClaim {
    List(Vec<i32>),
    Star(String),
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials")]
    Missing,
    #[error("invalid or revoked credentials")]
    Invalid,
    /// A well-formed token that grants nothing, and why (safe to tell the caller).
    #[error("{0}")]
    Rejected(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Resolves credentials to principals and tracks revocations.
#[derive(Clone)]
pub struct Authenticator {
    store: Store,
    jwt: Option<Arc<DecodingKey>>,
    public_read: bool,
    revoked: Arc<RwLock<HashSet<i32>>>,
    revocations: watch::Sender<u64>,
}

impl Authenticator {
    pub fn new(store: Store, jwt_secret: Option<&str>, public_read: bool) -> Self {
        Authenticator {
            store,
            jwt: jwt_secret.map(|s| Arc::new(DecodingKey::from_secret(s.as_bytes()))),
            public_read,
            revoked: Arc::default(),
            revocations: watch::channel(0).0,
        }
    }

    /// The principal for a credential (`None`: none was given).
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return if self.public_read {
                Ok(Principal::anonymous())
            } else {
                Err(AuthError::Missing)
            };
        };
        if token.starts_with("zk_") {
            let key = self
                .store
                .api_key_by_hash(&hash_key(token))
                .await?
                .filter(|k| k.revoked_at.is_none())
                .ok_or(AuthError::Invalid)?;
            return Ok(principal_of(&key));
        }
        let Some(secret) = &self.jwt else {
            return Err(AuthError::Invalid);
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Claims>(token, secret, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Rejected("the token has expired"),
                    ErrorKind::ImmatureSignature => {
                        AuthError::Rejected("the token is not valid yet (nbf)")
                    }
                    ErrorKind::MissingRequiredClaim(_) => {
                        AuthError::Rejected("the token has no exp claim")
                    }
                    _ => AuthError::Invalid,
                }
            })?
            .claims;
        let zones = match claims.zones {
            None => {
                return Err(AuthError::Rejected(
                    "the token has no zones claim: give a list of zone ids or \"*\"",
                ));
            }
            Some(ZonesClaim::List(z)) => ZoneScope::Only(z),
            Some(ZonesClaim::Star(s)) if s == "*" => ZoneScope::All,
            Some(ZonesClaim::Star(_)) => {
                return Err(AuthError::Rejected(
                    "the zones claim must be a list of zone ids or \"*\"",
                ));
            }
        };
        let user = crate::domain::user_id(&claims.sub).map_err(|_| {
            AuthError::Rejected("the token's sub must name a user (1 to 128 characters)")
        })?;
        let expires_at = i64::try_from(claims.exp)
            .ok()
            .and_then(|exp| DateTime::from_timestamp(exp, 0));
        // `exp` is the first instant the token is invalid (jsonwebtoken still accepts
        // it during that second); the same instant open connections end.
        if expires_at.is_none_or(|at| at <= Utc::now()) {
            return Err(AuthError::Rejected("the token has expired"));
        }
        Ok(Principal {
            name: format!("jwt:{user}"),
            role: claims.role,
            zones,
            user: Some(user),
            key_id: None,
            anonymous: false,
            expires_at,
        })
    }

    /// Reloads the set of revoked keys (a key may be revoked by the CLI, in another
    /// process); wakes the connections if it grew.
    pub async fn refresh_revocations(&self) -> Result<(), StoreError> {
        let ids = self.store.revoked_key_ids().await?;
        let grew = {
            let mut set = self.revoked.write().unwrap_or_else(|e| e.into_inner());
            let before = set.len();
            set.extend(ids);
            set.len() > before
        };
        if grew {
            self.revocations.send_modify(|g| *g += 1);
        }
        Ok(())
    }

    pub fn is_revoked(&self, principal: &Principal) -> bool {
        principal.key_id.is_some_and(|id| {
            self.revoked
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&id)
        })
    }

    /// Completes once `principal`'s credentials stop being valid: its key is revoked,
    /// or its token expires. Never, for credentials that do neither.
    pub async fn ended(&self, principal: &Principal) -> Ended {
        let expiry = async {
            match principal.expires_at {
                None => std::future::pending::<()>().await,
                Some(at) => {
                    let left = (at - Utc::now()).to_std().unwrap_or_default();
                    tokio::time::sleep(left).await;
                }
            }
        };
        tokio::select! {
            _ = self.revoked(principal) => Ended::Revoked,
            _ = expiry => Ended::Expired,
        }
    }

    async fn revoked(&self, principal: &Principal) {
        if principal.key_id.is_none() {
            return std::future::pending().await;
        }
        let mut rx = self.revocations.subscribe();
        loop {
            if self.is_revoked(principal) {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// Why a connection's credentials stopped being valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Revoked,
    Expired,
}

impl Ended {
    /// For logs and close frames.
    pub fn reason(self) -> &'static str {
        match self {
            Ended::Revoked => "credentials revoked",
            Ended::Expired => "credentials expired",
        }
    }
}

pub fn principal_of(key: &ApiKey) -> Principal {
    Principal {
        name: format!("key:{}", key.name),
        role: key.role,
        zones: key.zones.clone(),
        user: key.user_id.clone(),
        key_id: Some(key.id),
        anonymous: false,
        expires_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_256_random_bits_stored_as_their_hash() {
        let k = new_key().unwrap();
        assert!(k.starts_with("zk_") && k.len() == 67);
        assert_ne!(new_key().unwrap(), k);
        assert_eq!(hash_key(&k).len(), 64);
        assert_eq!(hash_key(&k), hash_key(&k));
    }
}
