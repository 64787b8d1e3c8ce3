//! The service layer: each change is ONE transaction that updates the rows and appends
//! exactly one event to its stream (plus a `low_stock_alert` on `alerts` when an item
//! crosses into low stock), and is published only after commit. Every operation takes
//! the calling `Principal` and applies the access rules itself: handlers and transports
//! parse and map, and never decide who may do what.
//!
//! No HTTP or WebSocket types here: transports parse their input into domain types,
//! call these methods, and map `ServiceError` to their own wire form.
//!
//! - `items`: zones and items (reads and changes), `keys`: API keys,
//!   `notifications`: per-user notifications, watches, announcements,
//!   `streams`: opening a stream, `retention`: pruning the log, `demo`: the demo zone,
//!   `idempotency`: keys and their fingerprints, `commit`: group commit on SQLite,
//!   `facts`: what never changes once seen (a zone exists, an item's zone).

mod commit;
mod demo;
mod facts;
mod idempotency;
mod items;
mod keys;
mod notifications;
mod retention;
mod streams;

use std::sync::Arc;

use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult, Statement};

use crate::broker::Broker;
use crate::cursor::History;
use crate::domain::{DomainError, Event, Item, ItemEventData, Principal, StreamKey, ZoneScope};
use crate::observe::Stats;
use crate::pace::Pace;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sea_orm::DbErr> for ServiceError {
    fn from(e: sea_orm::DbErr) -> Self {
        ServiceError::Store(e.into())
    }
}

/// The result of an item change, rebuilt from its logged event so that a repeated
/// idempotency key answers with exactly the same result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemChange {
    /// The event the change appended; for a change that changed nothing, the zone's
    /// last event (the item is as of it).
    pub event_id: u64,
    pub item: Item,
    /// `false`: the request would change nothing (`delta: 0`, the same quantity);
    /// nothing was appended and the version did not move.
    pub changed: bool,
}

impl ItemChange {
    fn from_event(ev: &Event) -> Result<Self, ServiceError> {
        let data: ItemEventData = serde_json::from_str(&ev.data)
            .map_err(|e| StoreError::Corrupt(format!("event {}#{}: {e}", ev.stream, ev.seq)))?;
        Ok(ItemChange {
            event_id: ev.seq,
            item: data.item(ev.at),
            changed: true,
        })
    }
}

#[derive(Clone)]
pub struct Service {
    /// The store, for what has no policy of its own (tests, the CLI's reads).
    pub store: Store,
    broker: Arc<dyn Broker>,
    history: Arc<dyn History>,
    stats: Arc<Stats>,
    /// Group commit, on SQLite only (see `commit`).
    groups: Option<Arc<commit::Groups>>,
    /// Zones known to exist. Zones are never deleted, so once seen a zone exists for
    /// good and opening its stream needs no query (a reconnect storm opens thousands
    /// at once). Holds only ids the database had, and at most `facts::FACTS_MAX`.
    known_zones: Arc<facts::Facts<i32, ()>>,
    /// The zone of each item changed lately (items never change zones).
    item_zones: Arc<facts::Facts<i32, i32>>,
    /// How far this node's fan-out may fall behind a writer (`pace`).
    pace: Arc<Pace>,
}

/// A remembered key (`Principal::key_remembered`) that a change must find valid in its
/// own transaction before it reads or writes anything.
pub(crate) struct KeyCheck(Option<i32>);

impl KeyCheck {
    /// The key a change by `by` must check: a remembered one.
    pub(crate) fn key_of(by: &Principal) -> Option<i32> {
        by.key_id.filter(|_| by.key_remembered)
    }

    /// The key still to check.
    pub(crate) fn pending(&self) -> Option<i32> {
        self.0
    }

    /// Checks the key now, in a statement of its own.
    pub(crate) async fn run(&mut self, txn: &DatabaseTransaction) -> Result<(), ServiceError> {
        let valid = match self.0 {
            Some(id) => Store::key_valid_in(txn, id).await?,
            None => true,
        };
        self.settle(Some(valid))
    }

    /// Takes the answer of a statement the check was folded into (`None`: it was not).
    pub(crate) fn settle(&mut self, valid: Option<bool>) -> Result<(), ServiceError> {
        if self.0.is_some() {
            if valid != Some(true) {
                return Err(
                    DomainError::Unauthenticated("invalid or revoked credentials".into()).into(),
                );
            }
            self.0 = None;
        }
        Ok(())
    }
}

/// The rows of a change's first statement, when it gave one (`write_change`).
pub(crate) type FirstRows = Option<Vec<QueryResult>>;

/// What a change's body gets besides its transaction (`write_change`).
pub(crate) struct Change {
    /// The key to check before anything else.
    pub(crate) check: KeyCheck,
    /// The rows of the first statement the change gave, which has run.
    pub(crate) first: FirstRows,
    last: Option<Statement>,
}

impl Change {
    /// Leaves the change's last statement, one made by `Store::save_and_append_last`,
    /// to run later in its transaction, before the commit: in a group, in the same
    /// call as the next member's savepoint (`commit`). For a statement nothing after it
    /// in the change reads or depends on; an error of it fails the whole group, so it
    /// must be one that client input cannot make fail.
    pub(crate) fn defer(&mut self, last: Statement) {
        self.last = Some(last);
    }
}

/// Events of one transaction, published together after it commits.
type Outcome<T> = Result<(T, Vec<Event>), ServiceError>;

/// A change's outcome and the last statement it deferred (`Change::defer`).
type Done<T> = Result<(T, Vec<Event>, Option<Statement>), ServiceError>;

fn json<T: serde::Serialize>(v: &T) -> Result<String, ServiceError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()).into())
}

impl Service {
    pub fn new(store: Store, broker: Arc<dyn Broker>, stats: Arc<Stats>) -> Self {
        Service {
            history: Arc::new(store.clone()),
            groups: commit::grouped(&store).then(Arc::default),
            known_zones: Arc::default(),
            item_zones: Arc::default(),
            store,
            broker,
            stats,
            pace: Arc::default(),
        }
    }

    /// With `pace` instead of the default one.
    pub fn with_pace(mut self, pace: Pace) -> Self {
        self.pace = Arc::new(pace);
        self
    }

    /// Where this node's fan-out says how far it has written (`pace`).
    pub fn pace(&self) -> &Pace {
        &self.pace
    }

    /// The broker this node publishes to and subscribes through.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// The registry of this node's connections.
    pub fn connections(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Runs `body` for `by` in a write transaction: commit and publish on success, roll
    /// back on error, so a refused change applies nothing. On SQLite the transaction
    /// may be shared with other changes, each in its own savepoint (`commit`).
    ///
    /// A key remembered rather than looked up for this request (`key_remembered`) is
    /// checked first, in the transaction: a revocation committed before it refuses the
    /// change (401), before an idempotency key can replay an earlier answer.
    pub(crate) async fn write<T, F>(&self, by: &Principal, body: F) -> Result<T, ServiceError>
    where
        F: AsyncFnOnce(&DatabaseTransaction) -> Outcome<T>,
    {
        self.write_change(by, None, async |txn, change| {
            change.check.run(txn).await?;
            body(txn).await
        })
        .await
    }

    /// `write`, with more left to the change (`Change`):
    /// - the key check, which it makes before it reads or writes anything, in its own
    ///   statement (`KeyCheck::run`) or folded into its first (`KeyCheck::settle`); a
    ///   change that returns without making it is refused;
    /// - `first`, when given, the change's first statement: it runs in the same call as
    ///   the statement that begins the change's savepoint in a group (`commit`), or
    ///   right after `BEGIN`, and the change gets its rows. An error of it fails the
    ///   whole group (it cannot be told from an error of the savepoint's statement), so
    ///   it must be one that client input cannot make fail;
    /// - its last statement, which it may defer (`Change::defer`).
    pub(crate) async fn write_change<T, F>(
        &self,
        by: &Principal,
        first: Option<Statement>,
        body: F,
    ) -> Result<T, ServiceError>
    where
        F: AsyncFnOnce(&DatabaseTransaction, &mut Change) -> Outcome<T>,
    {
        let check = KeyCheck(KeyCheck::key_of(by));
        // Where the change's events went, for the fan-out's pace (`Pace::wait`).
        let appended: std::sync::Mutex<Vec<(StreamKey, u64)>> = Default::default();
        let appended_to = &appended;
        let body = async move |txn: &DatabaseTransaction, rows: FirstRows| -> Done<T> {
            let mut change = Change {
                check,
                first: rows,
                last: None,
            };
            let (value, events) = body(txn, &mut change).await?;
            *appended_to.lock().unwrap_or_else(|e| e.into_inner()) =
                events.iter().map(|e| (e.stream.clone(), e.seq)).collect();
            if change.check.pending().is_some() {
                return Err(StoreError::Corrupt("a change did not check its key".into()).into());
            }
            Ok((value, events, change.last))
        };
        let started = std::time::Instant::now();
        // Boxed: the change's future is large, and poem moves the handler's future
        // into a box at each of its layers; this way they move a pointer.
        let result = match &self.groups {
            Some(groups) => Box::pin(self.write_grouped(groups, first, body)).await,
            None => Box::pin(self.write_alone(first, body)).await,
        };
        metrics::histogram!("zonecast_write_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        if result.is_ok() {
            let appended = appended.into_inner().unwrap_or_else(|e| e.into_inner());
            self.pace.wait(&appended).await;
        }
        result
    }

    /// `write` in a transaction of its own.
    async fn write_alone<T, F>(&self, first: Option<Statement>, body: F) -> Result<T, ServiceError>
    where
        F: AsyncFnOnce(&DatabaseTransaction, FirstRows) -> Done<T>,
    {
        let txn = self.store.begin_write().await?;
        let rows = match first {
            Some(first) => match txn.query_all_raw(first).await {
                Ok(rows) => Some(rows),
                Err(e) => {
                    txn.rollback().await?;
                    return Err(e.into());
                }
            },
            None => None,
        };
        match body(&txn, rows).await {
            // Nothing appended (a replayed idempotency key, a change that changes
            // nothing): roll back, or the seq taken under the lock would be committed
            // without its event, leaving a gap.
            Ok((value, events, _)) if events.is_empty() => {
                txn.rollback().await?;
                Ok(value)
            }
            Ok((value, events, last)) => {
                let ready = async {
                    if let Some(last) = last {
                        Store::run_last(&txn, last).await?;
                    }
                    self.broker.before_commit(&txn, &events).await?;
                    Ok::<_, ServiceError>(())
                };
                if let Err(e) = ready.await {
                    txn.rollback().await?;
                    return Err(e);
                }
                txn.commit().await?;
                self.published(events);
                Ok(value)
            }
            Err(e) => {
                txn.rollback().await?;
                Err(e)
            }
        }
    }

    /// Publishes committed events, in order.
    fn published(&self, events: Vec<Event>) {
        let committed = std::time::Instant::now();
        let events: Vec<Arc<Event>> = events
            .into_iter()
            .map(|mut e| {
                metrics::counter!("zonecast_events_appended_total",
                    "stream_kind" => e.stream.kind(), "type" => e.kind.as_str())
                .increment(1);
                e.committed = Some(committed);
                Arc::new(e)
            })
            .collect();
        self.broker.publish(&events);
        self.stats.broadcast(events.len() as u64);
    }

    /// Connections and totals of this node as `by` may see them: an admin of every
    /// zone sees everything; an admin of some zones sees only connections reading a
    /// stream it could read itself, and only those streams. Delivery totals are the
    /// node's (they carry no names, and `/metrics` shows them anyway).
    pub fn stats(&self, by: &Principal) -> Result<crate::observe::Snapshot, ServiceError> {
        by.require_admin("read stats")?;
        Ok(if by.zones == ZoneScope::All {
            self.stats.snapshot(None)
        } else {
            self.stats.snapshot(Some(&|stream| by.sees_stream(stream)))
        })
    }
}
