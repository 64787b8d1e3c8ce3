//! Idempotency keys, as the service uses them: a key belongs to its principal, is
//! claimed first in the writing transaction with a fingerprint of the request, and
//! settles on the event the request appended (see `store::idempotency`).

use sea_orm::DatabaseTransaction;
use sha2::Digest;

use super::ServiceError;
use chrono::{DateTime, Utc};

use crate::domain::{DomainError, Event, EventKind, Item, Principal, StreamKey, now};
use crate::store::{KeyClaim, NewEvent, Store};

/// An idempotency key with its owner and the fingerprint of the request it came with.
struct Keyed<'a> {
    principal: &'a str,
    key: &'a str,
    fingerprint: String,
}

/// A change's request: its id, stored on the event it appends and, as an idempotency
/// key of its principal, claimed first in the writing transaction and settled on that
/// event.
pub(crate) struct Requested<'a> {
    id: Option<&'a str>,
    keyed: Option<Keyed<'a>>,
}

impl<'a> Requested<'a> {
    /// `request` names the operation, its target and its parsed body, so the same
    /// change over REST or WebSocket has the same fingerprint.
    pub(crate) fn new(by: &'a Principal, id: Option<&'a str>, request: serde_json::Value) -> Self {
        let keyed = id.map(|key| Keyed {
            principal: &by.name,
            key,
            fingerprint: hex::encode(sha2::Sha256::digest(request.to_string().as_bytes())),
        });
        Requested { id, keyed }
    }

    /// The request id, stored on the event the request appends.
    pub(crate) fn id(&self) -> Option<String> {
        self.id.map(str::to_owned)
    }

    /// Whether the request carries an idempotency key (`claim` has something to do).
    pub(crate) fn keyed(&self) -> bool {
        self.keyed.is_some()
    }

    /// Claims the key for this transaction; for a key already used, the event the
    /// original request appended (same request) or `idempotency_key_reused` (another).
    pub(crate) async fn claim(
        &self,
        txn: &DatabaseTransaction,
    ) -> Result<Option<Event>, ServiceError> {
        let Some(k) = &self.keyed else {
            return Ok(None);
        };
        match Store::claim_key(txn, k.principal, k.key, &k.fingerprint, now()).await? {
            KeyClaim::New => Ok(None),
            KeyClaim::Used {
                fingerprint,
                stream,
                seq,
            } => {
                if fingerprint != k.fingerprint {
                    return Err(DomainError::IdempotencyKeyReused(k.key.to_owned()).into());
                }
                let ev = Store::event_in(txn, &stream, seq).await?.ok_or_else(|| {
                    DomainError::Conflict(format!(
                        "the result of idempotency key {:?} is no longer kept; use a new key",
                        k.key
                    ))
                })?;
                Ok(Some(ev))
            }
        }
    }

    /// Settles the key on the event the request appended.
    pub(crate) async fn settle(
        &self,
        txn: &DatabaseTransaction,
        ev: &Event,
    ) -> Result<(), ServiceError> {
        if let Some(k) = &self.keyed {
            Store::settle_key(txn, k.principal, k.key, &ev.stream, ev.seq).await?;
        }
        Ok(())
    }

    /// Saves the changed item and appends its event (one round trip on SQLite), with
    /// the request id, and settles the key on it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn save_and_append(
        &self,
        txn: &DatabaseTransaction,
        item: &Item,
        stream: &StreamKey,
        seq: u64,
        kind: EventKind,
        data: String,
        at: DateTime<Utc>,
    ) -> Result<Event, ServiceError> {
        let new = self.event(stream, seq, kind, data, at);
        let ev = Store::save_and_append(txn, item, new).await?;
        self.settle(txn, &ev).await?;
        Ok(ev)
    }

    /// The change's event, with the request id.
    fn event<'s>(
        &self,
        stream: &'s StreamKey,
        seq: u64,
        kind: EventKind,
        data: String,
        at: DateTime<Utc>,
    ) -> NewEvent<'s> {
        NewEvent {
            stream,
            seq,
            kind,
            data,
            request_id: self.id(),
            at,
        }
    }

    /// Appends the change's event, with the request id, and settles the key on it.
    pub(crate) async fn append(
        &self,
        txn: &DatabaseTransaction,
        stream: &StreamKey,
        seq: u64,
        kind: EventKind,
        data: String,
        at: DateTime<Utc>,
    ) -> Result<Event, ServiceError> {
        let new = self.event(stream, seq, kind, data, at);
        let ev = Store::append(txn, new).await?;
        self.settle(txn, &ev).await?;
        Ok(ev)
    }
}
