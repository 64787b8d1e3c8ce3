//! Idempotency key rows: `(principal, key)` → the fingerprint of the request and the
//! event it appended.
//!
//! A key is *claimed* first thing in the writing transaction (an insert that does
//! nothing if the key exists), before any stream row is locked: a concurrent request
//! with the same key waits on the claim until the first commits or rolls back, then
//! finds the committed row. Claims are always taken before stream locks, so they add
//! no lock-order cycle.

use chrono::{DateTime, Utc};
use entity::idempotency_key;
use sea_orm::{DatabaseTransaction, EntityTrait};

use super::{Store, StoreError, exec, unique};
use crate::domain::StreamKey;

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyClaim {
    /// The key is new; this transaction holds it until it commits or rolls back.
    New,
    /// The key was used before, for the request with this fingerprint, which
    /// appended event `seq` of `stream`.
    Used {
        fingerprint: String,
        stream: StreamKey,
        seq: u64,
    },
}

impl Store {
    pub async fn claim_key(
        txn: &DatabaseTransaction,
        principal: &str,
        key: &str,
        fingerprint: &str,
        at: DateTime<Utc>,
    ) -> Result<KeyClaim, StoreError> {
        let inserted = exec(
            txn,
            "INSERT INTO idempotency_keys (principal, key, fingerprint, stream, seq, created_at) \
             VALUES ($1, $2, $3, '', 0, $4) ON CONFLICT (principal, key) DO NOTHING",
            vec![principal.into(), key.into(), fingerprint.into(), at.into()],
        )
        .await?;
        if inserted == 1 {
            return Ok(KeyClaim::New);
        }
        let row = unique(
            idempotency_key::Entity::find_by_id((principal.to_owned(), key.to_owned())),
            txn,
        )
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("idempotency key {key:?} vanished")))?;
        let stream = StreamKey::parse(&row.stream)
            .map_err(|e| StoreError::Corrupt(format!("idempotency key {key:?}: {e}")))?;
        Ok(KeyClaim::Used {
            fingerprint: row.fingerprint,
            stream,
            seq: u64::try_from(row.seq).unwrap_or(0),
        })
    }

    /// Records the event a newly claimed key's request appended.
    pub async fn settle_key(
        txn: &DatabaseTransaction,
        principal: &str,
        key: &str,
        stream: &StreamKey,
        seq: u64,
    ) -> Result<(), StoreError> {
        let seq = i64::try_from(seq).map_err(|_| StoreError::Corrupt("seq overflow".into()))?;
        exec(
            txn,
            "UPDATE idempotency_keys SET stream = $1, seq = $2 WHERE principal = $3 AND key = $4",
            vec![
                stream.to_string().into(),
                seq.into(),
                principal.into(),
                key.into(),
            ],
        )
        .await?;
        Ok(())
    }

    /// Forgets keys whose event the log no longer keeps (run after pruning the log), so
    /// a key lives exactly as long as its event.
    pub async fn prune_keys(&self) -> Result<u64, StoreError> {
        exec(
            &self.db,
            "DELETE FROM idempotency_keys WHERE NOT EXISTS (SELECT 1 FROM events e \
             WHERE e.stream = idempotency_keys.stream AND e.seq = idempotency_keys.seq)",
            vec![],
        )
        .await
    }
}
