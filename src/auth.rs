//! Who is calling and what they may do (DESIGN §8).
//!
//! Credentials are API keys (`zk_…`, stored as a SHA-256 hash) or HS256 JWTs. Every
//! request resolves to a `Principal`; the checks on it (`require_*`) are the only
//! authorization rules, used by REST, SSE and every WebSocket message alike.
//! Revocations are watched, so open connections of a revoked key can be closed.
//!
//! Must never log a credential.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::domain::{DomainError, StreamKey};
use crate::store::{ApiKey, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    Writer,
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        })
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reader" => Ok(Role::Reader),
            "writer" => Ok(Role::Writer),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("unknown role {s:?}: reader, writer or admin")),
        }
    }
}

/// The zones a principal may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneScope {
    All,
    Only(Vec<i32>),
}

impl ZoneScope {
    pub fn contains(&self, zone: i32) -> bool {
        match self {
            ZoneScope::All => true,
            ZoneScope::Only(z) => z.contains(&zone),
        }
    }
}

impl fmt::Display for ZoneScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ZoneScope::All => f.write_str("*"),
            ZoneScope::Only(z) => {
                let ids: Vec<String> = z.iter().map(i32::to_string).collect();
                f.write_str(&ids.join(","))
            }
        }
    }
}

impl FromStr for ZoneScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" || s.is_empty() {
            return Ok(ZoneScope::All);
        }
        s.split(',')
            .map(|p| {
                p.trim()
                    .parse::<i32>()
                    .ok()
                    .filter(|z| *z > 0)
                    .ok_or_else(|| format!("bad zone id {p:?} in {s:?}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(ZoneScope::Only)
    }
}

/// The caller of one request or connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `key:NAME`, `jwt:SUB`, or `anonymous`: the `actor` of events, and the rate
    /// limit key (anonymous callers are limited per client IP instead).
    pub name: String,
    pub role: Role,
    pub zones: ZoneScope,
    pub user: Option<String>,
    /// The API key behind it, so its connections can be closed on revocation.
    pub key_id: Option<i32>,
    pub anonymous: bool,
}

impl Principal {
    /// Anonymous read access (`--public-read`).
    pub fn anonymous() -> Self {
        Principal {
            name: "anonymous".into(),
            role: Role::Reader,
            zones: ZoneScope::All,
            user: None,
            key_id: None,
            anonymous: true,
        }
    }

    /// The server itself (demo data, CLI).
    pub fn system(name: &str) -> Self {
        Principal {
            name: name.into(),
            role: Role::Admin,
            zones: ZoneScope::All,
            user: None,
            key_id: None,
            anonymous: false,
        }
    }

    /// Refused: 401 for an anonymous caller (credentials would help), else 403.
    fn refuse(&self, what: String) -> DomainError {
        if self.anonymous {
            DomainError::Unauthenticated(format!("{what} needs credentials"))
        } else {
            DomainError::Forbidden(format!("{} may not {what}", self.name))
        }
    }

    pub fn require_zone(&self, zone: i32) -> Result<(), DomainError> {
        if self.zones.contains(zone) {
            Ok(())
        } else {
            Err(self.refuse(format!("read zone {zone}")))
        }
    }

    pub fn require_write(&self, zone: i32) -> Result<(), DomainError> {
        self.require_zone(zone)?;
        if self.role >= Role::Writer && !self.anonymous {
            Ok(())
        } else {
            Err(self.refuse(format!("change stock in zone {zone}")))
        }
    }

    pub fn require_role(&self, role: Role, what: &str) -> Result<(), DomainError> {
        if self.role >= role && !self.anonymous {
            Ok(())
        } else {
            Err(self.refuse(what.to_owned()))
        }
    }

    pub fn require_admin(&self, what: &str) -> Result<(), DomainError> {
        if self.role == Role::Admin && !self.anonymous {
            Ok(())
        } else {
            Err(self.refuse(what.to_owned()))
        }
    }

    pub fn require_stream(&self, stream: &StreamKey) -> Result<(), DomainError> {
        match stream {
            StreamKey::Zone(z) => self.require_zone(*z),
            StreamKey::Alerts => Ok(()),
            StreamKey::User(u) if self.user.as_deref() == Some(u.as_str()) => Ok(()),
            StreamKey::User(_) => Err(self.refuse(format!("read {stream}"))),
        }
    }
}

/// A new API key: `zk_` and 64 hex digits (256 random bits).
pub fn new_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("zk_{}", hex::encode(bytes)))
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// JWT claims (`zones` is a list of ids or `"*"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    #[serde(default = "all_zones")]
    pub zones: ZonesClaim,
    pub exp: u64,
}

fn all_zones() -> ZonesClaim {
    ZonesClaim::Star("*".into())
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
        let claims = jsonwebtoken::decode::<Claims>(token, secret, &validation)
            .map_err(|_| AuthError::Invalid)?
            .claims;
        let zones = match claims.zones {
            ZonesClaim::List(z) => ZoneScope::Only(z),
            ZonesClaim::Star(s) if s == "*" => ZoneScope::All,
            ZonesClaim::Star(_) => return Err(AuthError::Invalid),
        };
        Ok(Principal {
            name: format!("jwt:{}", claims.sub),
            role: claims.role,
            zones,
            user: Some(claims.sub),
            key_id: None,
            anonymous: false,
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

    /// Completes once `principal`'s key is revoked (never, for other credentials).
    pub async fn revoked(&self, principal: &Principal) {
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

pub fn principal_of(key: &ApiKey) -> Principal {
    Principal {
        name: format!("key:{}", key.name),
        role: key.role,
        zones: key.zones.clone(),
        user: key.user_id.clone(),
        key_id: Some(key.id),
        anonymous: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_roles_order() {
        assert_eq!("*".parse::<ZoneScope>(), Ok(ZoneScope::All));
        assert_eq!("1, 2".parse::<ZoneScope>(), Ok(ZoneScope::Only(vec![1, 2])));
        assert!("1,x".parse::<ZoneScope>().is_err());
        assert!(Role::Admin > Role::Writer && Role::Writer > Role::Reader);
        let k = new_key().unwrap();
        assert!(k.starts_with("zk_") && k.len() == 67);
        assert_eq!(hash_key(&k).len(), 64);
    }

    #[test]
    fn principals_are_refused_outside_their_scope() {
        let mut p = Principal::system("t");
        p.role = Role::Reader;
        p.zones = ZoneScope::Only(vec![1]);
        assert!(p.require_zone(1).is_ok());
        assert!(matches!(p.require_zone(2), Err(DomainError::Forbidden(_))));
        assert!(matches!(p.require_write(1), Err(DomainError::Forbidden(_))));
        let anon = Principal::anonymous();
        assert!(matches!(
            anon.require_write(1),
            Err(DomainError::Unauthenticated(_))
        ));
        assert!(anon.require_stream(&StreamKey::User("u".into())).is_err());
    }
}
