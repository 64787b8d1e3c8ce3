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

use chrono::{DateTime, Utc};
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

    /// The wire form, as in JWTs: `"*"` or a list of zone ids.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ZoneScope::All => serde_json::json!("*"),
            ZoneScope::Only(z) => serde_json::json!(z),
        }
    }

    /// Reads the wire form: `"*"` or a list of positive zone ids.
    pub fn from_json(v: &serde_json::Value) -> Result<ZoneScope, DomainError> {
        let bad = || {
            DomainError::Invalid("zones must be \"*\" or a list of zone ids, like [1, 2]".into())
        };
        match v {
            serde_json::Value::String(s) if s == "*" => Ok(ZoneScope::All),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|z| {
                    z.as_i64()
                        .and_then(|z| i32::try_from(z).ok())
                        .filter(|z| *z > 0)
                        .ok_or_else(bad)
                })
                .collect::<Result<Vec<_>, _>>()
                .map(ZoneScope::Only),
            _ => Err(bad()),
        }
    }

    /// Every zone of `other` is in this scope.
    pub fn covers(&self, other: &ZoneScope) -> bool {
        match (self, other) {
            (ZoneScope::All, _) => true,
            (ZoneScope::Only(_), ZoneScope::All) => false,
            (ZoneScope::Only(_), ZoneScope::Only(z)) => z.iter().all(|z| self.contains(*z)),
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
    /// When the credentials stop being valid (a JWT's `exp`): from then on every
    /// request is refused and open connections are ended.
    pub expires_at: Option<DateTime<Utc>>,
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
            expires_at: None,
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
            expires_at: None,
        }
    }

    fn expired(&self) -> bool {
        self.expires_at.is_some_and(|at| at <= Utc::now())
    }

    /// Refused: 401 for an anonymous caller (credentials would help), else 403.
    fn refuse(&self, what: String) -> DomainError {
        if self.expired() {
            DomainError::Unauthenticated(format!("the credentials of {} have expired", self.name))
        } else if self.anonymous {
            DomainError::Unauthenticated(format!("{what} needs credentials"))
        } else {
            DomainError::Forbidden(format!("{} may not {what}", self.name))
        }
    }

    pub fn require_zone(&self, zone: i32) -> Result<(), DomainError> {
        if self.zones.contains(zone) && !self.expired() {
            Ok(())
        } else {
            Err(self.refuse(format!("read zone {zone}")))
        }
    }

    pub fn require_write(&self, zone: i32) -> Result<(), DomainError> {
        self.require_zone(zone)?;
        if self.role >= Role::Writer && !self.anonymous && !self.expired() {
            Ok(())
        } else {
            Err(self.refuse(format!("change stock in zone {zone}")))
        }
    }

    pub fn require_role(&self, role: Role, what: &str) -> Result<(), DomainError> {
        if self.role >= role && !self.anonymous && !self.expired() {
            Ok(())
        } else {
            Err(self.refuse(what.to_owned()))
        }
    }

    pub fn require_admin(&self, what: &str) -> Result<(), DomainError> {
        if self.role == Role::Admin && !self.anonymous && !self.expired() {
            Ok(())
        } else {
            Err(self.refuse(what.to_owned()))
        }
    }

    /// An admin of every zone: may create zones and bind keys to any user.
    pub fn require_full_admin(&self, what: &str) -> Result<(), DomainError> {
        self.require_admin(what)?;
        if self.zones == ZoneScope::All {
            Ok(())
        } else {
            Err(self.refuse(format!("{what} (an admin of some zones only)")))
        }
    }

    /// What this principal may hand on: a role no higher than its own, zones within
    /// its own, and a user binding only if it is an admin of every zone (binding a
    /// user gives that user's notifications) or the binding is its own user.
    pub fn may_grant(&self, role: Role, zones: &ZoneScope, user: Option<&str>) -> bool {
        role <= self.role
            && self.zones.covers(zones)
            && (self.zones == ZoneScope::All || user.is_none() || user == self.user.as_deref())
    }

    /// Whether this principal could read `stream` (for what `/api/stats` shows).
    pub fn sees_stream(&self, stream: &str) -> bool {
        StreamKey::parse(stream).is_ok_and(|k| self.require_stream(&k).is_ok())
    }

    pub fn require_stream(&self, stream: &StreamKey) -> Result<(), DomainError> {
        if self.expired() {
            return Err(self.refuse(format!("read {stream}")));
        }
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

    #[test]
    fn a_principal_grants_only_within_its_own_role_and_scope() {
        let one = ZoneScope::Only(vec![1]);
        let mut scoped = Principal::system("t");
        scoped.zones = ZoneScope::Only(vec![1, 2]);
        scoped.user = Some("lead".into());
        assert!(scoped.may_grant(Role::Admin, &one, None));
        assert!(scoped.may_grant(Role::Reader, &one, Some("lead")));
        assert!(!scoped.may_grant(Role::Reader, &ZoneScope::All, None));
        assert!(!scoped.may_grant(Role::Reader, &ZoneScope::Only(vec![3]), None));
        assert!(!scoped.may_grant(Role::Reader, &one, Some("someone-else")));
        let mut writer = Principal::system("w");
        writer.role = Role::Writer;
        assert!(!writer.may_grant(Role::Admin, &one, None));
        assert!(Principal::system("full").may_grant(Role::Admin, &ZoneScope::All, Some("x")));
        assert!(scoped.require_full_admin("create zones").is_err());
    }

    #[test]
    fn expired_credentials_may_do_nothing() {
        let mut p = Principal::system("jwt:a");
        p.role = Role::Writer;
        assert!(p.require_write(1).is_ok());
        p.expires_at = Some(Utc::now() - chrono::Duration::seconds(1));
        for refused in [
            p.require_write(1),
            p.require_zone(1),
            p.require_role(Role::Reader, "read"),
            p.require_stream(&StreamKey::Alerts),
        ] {
            assert!(
                matches!(&refused, Err(DomainError::Unauthenticated(m)) if m.contains("expired")),
                "{refused:?}"
            );
        }
    }
}
