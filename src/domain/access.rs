//! Who is calling and what they may do (DESIGN §8): roles, zone scopes, and the
//! principal of a request with the checks on it. These checks are the only
//! authorization rules; the service applies them to every operation. How credentials
//! become a principal is `credentials`' job, not this module's.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{DomainError, StreamKey};

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
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, DomainError> {
        match s {
            "reader" => Ok(Role::Reader),
            "writer" => Ok(Role::Writer),
            "admin" => Ok(Role::Admin),
            _ => Err(DomainError::Invalid(format!(
                "unknown role {s:?}: reader, writer or admin"
            ))),
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
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, DomainError> {
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
                    .ok_or_else(|| DomainError::Invalid(format!("bad zone id {p:?} in {s:?}")))
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
    /// The key was not looked up for this request but remembered from an earlier one
    /// (`credentials::Authenticator::authenticate_write`): whether it has been revoked
    /// since is checked in the change's own transaction (`Service::write`), so only a
    /// request that changes nothing but through that may carry such a principal.
    pub key_remembered: bool,
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
            key_remembered: false,
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
            key_remembered: false,
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
    pub fn sees_stream(&self, stream: &StreamKey) -> bool {
        self.require_stream(stream).is_ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_roles_order() {
        assert_eq!("*".parse::<ZoneScope>(), Ok(ZoneScope::All));
        assert_eq!("1, 2".parse::<ZoneScope>(), Ok(ZoneScope::Only(vec![1, 2])));
        assert!("1,x".parse::<ZoneScope>().is_err());
        assert!(Role::Admin > Role::Writer && Role::Writer > Role::Reader);
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
