//! Credentials into principals (DESIGN §8): API keys (`zk_…`, stored as a SHA-256
//! hash) and HS256 JWTs; and the end of credentials: revocations (watched, so open
//! connections of a revoked key can be closed) and JWT expiry. What a principal may
//! do is `domain::access`'s.
//!
//! Must never log a credential.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
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
    lookups: Arc<Lookups<Result<Option<ApiKey>, StoreError>>>,
    /// Keys found valid, by hash, for `authenticate_write`. A key's grants never
    /// change; only its revocation, which the change's transaction checks.
    remembered: Arc<RwLock<HashMap<String, Principal>>>,
    /// Whether keys are remembered at all (SQLite only; see `authenticate_write`).
    remembering: bool,
}

/// Keys remembered at most; the map is emptied when full (each key then costs one
/// query again). A few hundred bytes each.
const REMEMBERED_MAX: usize = 10_000;

impl Authenticator {
    pub fn new(store: Store, jwt_secret: Option<&str>, public_read: bool) -> Self {
        Authenticator {
            jwt: jwt_secret.map(|s| Arc::new(DecodingKey::from_secret(s.as_bytes()))),
            public_read,
            revoked: Arc::default(),
            revocations: watch::channel(0).0,
            lookups: Arc::default(),
            remembered: Arc::default(),
            remembering: store.backend() == sea_orm::DbBackend::Sqlite,
            store,
        }
    }

    /// The principal for a request that changes nothing but through `Service::write`
    /// (an item change over REST): a key found valid before is taken from memory,
    /// without a query, and marked `key_remembered`, so that the change's own
    /// transaction checks it has not been revoked since (by the CLI, another node, or
    /// an admin). Other credentials are authenticated as `authenticate` does.
    ///
    /// Saves the key lookup, a quarter of a lone change's CPU, while a revocation
    /// committed before the request still refuses it.
    ///
    /// SQLite only (`remembering`), where the check is cheap: folded into a quantity
    /// change's first statement, else one statement on the writer's own connection. On
    /// PostgreSQL it adds a round trip to every change's transaction, while the lookups
    /// of concurrent requests with one key share a query (`Lookups`): 64 writers ran
    /// 11–17 % slower with it there.
    pub async fn authenticate_write(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        if self.remembering
            && let Some(token) = token.map(str::trim).filter(|t| t.starts_with("zk_"))
        {
            let known = self.remembered_map().get(&hash_key(token)).cloned();
            if let Some(mut p) = known.filter(|p| !self.is_revoked(p)) {
                p.key_remembered = true;
                return Ok(p);
            }
        }
        self.authenticate(token).await
    }

    fn remembered_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Principal>> {
        self.remembered.read().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, hash: String, principal: &Principal) {
        // Most requests come with a key already remembered: a read lock says so.
        if !self.remembering || self.remembered_map().contains_key(&hash) {
            return;
        }
        let mut map = self.remembered.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= REMEMBERED_MAX {
            map.clear();
        }
        map.insert(hash, principal.clone());
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
            let hash = hash_key(token);
            let (store, h) = (self.store.clone(), hash.clone());
            let key = self
                .lookups
                .get(&hash, move || {
                    async move { store.api_key_by_hash(&h).await }.boxed()
                })
                .await?
                .filter(|k| k.revoked_at.is_none())
                .ok_or(AuthError::Invalid)?;
            let principal = principal_of(&key);
            self.remember(hash, &principal);
            return Ok(principal);
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
            key_remembered: false,
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
            if set.len() > before {
                // Not needed for safety (each change checks its key), but a revoked
                // key's writes are then refused before they reach the database.
                let mut map = self.remembered.write().unwrap_or_else(|e| e.into_inner());
                map.retain(|_, p| p.key_id.is_none_or(|id| !set.contains(&id)));
            }
            set.len() > before
        };
        if grew {
            self.revocations.send_modify(|g| *g += 1);
        }
        Ok(())
    }

    /// Changes whenever the set of revoked keys grows: whoever holds many principals
    /// (the SSE fan-out) checks them with `is_revoked` then.
    pub fn revocations(&self) -> watch::Receiver<u64> {
        self.revocations.subscribe()
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

/// API key lookups in flight, by key hash. Requests with the same key at the same time
/// (a reconnect storm: thousands of dashboards with one key) share one query, yet none
/// is answered by a query that began before the request arrived, so a revocation
/// committed before a request always refuses it ("at once for new requests"): a
/// request that finds the query for its key already running waits for the next one,
/// which every request arriving meanwhile shares. One query per key runs at a time.
///
/// Holds an entry only while a lookup for it is queued or running (at most one per
/// request in flight); the last request to leave removes it.
struct Lookups<V> {
    slots: Mutex<HashMap<String, Slot<V>>>,
    /// Queries begun, for the tests.
    queries: std::sync::atomic::AtomicU64,
}

type Lookup<V> = Shared<BoxFuture<'static, V>>;

struct Slot<V> {
    lookup: Lookup<V>,
    /// Set when the query begins: from then on, new requests queue the next one.
    started: Arc<AtomicBool>,
}

impl<V> Default for Lookups<V> {
    fn default() -> Self {
        Lookups {
            slots: Mutex::default(),
            queries: Default::default(),
        }
    }
}

impl<V> Lookups<V> {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot<V>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<V: Clone + Send + Sync + 'static> Lookups<V> {
    /// The answer to `query` for `key`, from a query that begins after this call.
    async fn get<F>(self: &Arc<Self>, key: &str, query: F) -> V
    where
        F: FnOnce() -> BoxFuture<'static, V> + Send + 'static,
    {
        let lookup = self.join(key, query);
        let _leave = Leave {
            lookups: self,
            key,
            lookup: &lookup,
        };
        lookup.clone().await
    }

    /// The queued lookup for `key`, or a new one queued behind the running one.
    fn join<F>(self: &Arc<Self>, key: &str, query: F) -> Lookup<V>
    where
        F: FnOnce() -> BoxFuture<'static, V> + Send + 'static,
    {
        let mut slots = self.slots();
        let running = match slots.get(key) {
            // SeqCst with the store below: a request that sees `false` here arrived
            // before the query reads anything.
            Some(s) if !s.started.load(Ordering::SeqCst) => return s.lookup.clone(),
            Some(s) => Some(s.lookup.clone()),
            None => None,
        };
        let started = Arc::new(AtomicBool::new(false));
        let lookup = {
            let (started, this) = (started.clone(), self.clone());
            async move {
                if let Some(running) = running {
                    let _ = running.await;
                }
                started.store(true, Ordering::SeqCst);
                this.queries.fetch_add(1, Ordering::Relaxed);
                query().await
            }
            .boxed()
            .shared()
        };
        slots.insert(
            key.to_owned(),
            Slot {
                lookup: lookup.clone(),
                started,
            },
        );
        lookup
    }
}

/// Removes a lookup's entry when its last request leaves (answered or gone).
struct Leave<'a, V> {
    lookups: &'a Lookups<V>,
    key: &'a str,
    lookup: &'a Lookup<V>,
}

impl<V> Drop for Leave<'_, V> {
    fn drop(&mut self) {
        let mut slots = self.lookups.slots();
        let Some(slot) = slots.get(self.key) else {
            return;
        };
        // Held by the map and by this request only (`None`: this handle has completed;
        // a new request would not join it anyway).
        if slot.lookup.ptr_eq(self.lookup) && self.lookup.strong_count().is_none_or(|n| n <= 2) {
            slots.remove(self.key);
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
        key_remembered: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::poll;
    use std::time::Duration;
    use tokio::sync::oneshot;

    /// A query that says when it began and answers what the test sends it.
    fn gated(
        began: oneshot::Sender<()>,
        answer: oneshot::Receiver<u32>,
    ) -> impl FnOnce() -> BoxFuture<'static, u32> + Send + 'static {
        move || {
            async move {
                let _ = began.send(());
                answer.await.unwrap_or(0)
            }
            .boxed()
        }
    }

    fn unused() -> impl FnOnce() -> BoxFuture<'static, u32> + Send + 'static {
        || async { panic!("a request that joined a queued lookup ran its own query") }.boxed()
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("timed out")
    }

    #[tokio::test]
    async fn a_request_arriving_during_a_lookup_waits_for_the_next_which_later_arrivals_share() {
        let lookups = Arc::new(Lookups::<u32>::default());
        let (began1, mut began1_rx) = oneshot::channel();
        let (answer1, answer1_rx) = oneshot::channel();
        let mut first = Box::pin(lookups.get("k", gated(began1, answer1_rx)));
        assert!(poll!(&mut first).is_pending());
        assert!(began1_rx.try_recv().is_ok(), "the first query began");

        // Arrives while query 1 runs: a revocation committed just before must refuse
        // it, so query 1's answer must not be its answer.
        let (began2, mut began2_rx) = oneshot::channel();
        let (answer2, answer2_rx) = oneshot::channel();
        let mut second = Box::pin(lookups.get("k", gated(began2, answer2_rx)));
        assert!(poll!(&mut second).is_pending());
        let mut third = Box::pin(lookups.get("k", unused()));
        assert!(poll!(&mut third).is_pending());
        assert!(began2_rx.try_recv().is_err(), "one query per key at a time");

        answer1.send(1).expect("query 1 waits");
        assert_eq!(within(first).await, 1);
        answer2.send(2).expect("query 2 waits");
        assert_eq!(within(second).await, 2);
        assert_eq!(within(third).await, 2);
        assert_eq!(lookups.queries.load(Ordering::Relaxed), 2);
        assert!(lookups.slots().is_empty(), "entries are removed");

        // Nothing running: a new request begins a query of its own.
        let fresh = lookups.get("k", || async { 3 }.boxed());
        assert_eq!(within(fresh).await, 3);
        assert!(lookups.slots().is_empty());
    }

    #[tokio::test]
    async fn requests_that_leave_take_their_lookups_with_them() {
        let lookups = Arc::new(Lookups::<u32>::default());
        let (began, _began_rx) = oneshot::channel();
        let (answer, answer_rx) = oneshot::channel();
        let mut first = Box::pin(lookups.get("k", gated(began, answer_rx)));
        assert!(poll!(&mut first).is_pending());
        // Queued behind it, then gone (a client that disconnected).
        let mut queued = Box::pin(lookups.get("k", unused()));
        assert!(poll!(&mut queued).is_pending());
        drop(queued);
        answer.send(7).expect("the query waits");
        assert_eq!(within(first).await, 7);
        assert!(lookups.slots().is_empty(), "no entry outlives its requests");

        // A running lookup whose only request leaves is dropped with it.
        let (began, _began_rx) = oneshot::channel();
        let (_answer, answer_rx) = oneshot::channel::<u32>();
        let mut lone = Box::pin(lookups.get("k", gated(began, answer_rx)));
        assert!(poll!(&mut lone).is_pending());
        drop(lone);
        assert!(lookups.slots().is_empty());
    }

    #[test]
    fn keys_are_256_random_bits_stored_as_their_hash() {
        let k = new_key().unwrap();
        assert!(k.starts_with("zk_") && k.len() == 67);
        assert_ne!(new_key().unwrap(), k);
        assert_eq!(hash_key(&k).len(), 64);
        assert_eq!(hash_key(&k), hash_key(&k));
    }
}
