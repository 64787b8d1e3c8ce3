//! Group commit on SQLite: changes that arrive while one is being written share its
//! transaction, each inside its own savepoint, and commit together. One writer holds
//! SQLite's lock at a time anyway; without this, concurrent writers each take it in
//! turn through SQLite's busy handler, which sleeps (1, 2, 5, 10 … 100 ms) instead of
//! handing the lock over, and every change pays its own `BEGIN`/`COMMIT`.
//!
//! What a member sees is exactly what a transaction of its own would give it: its
//! change is rolled back to its savepoint when refused (or when it changes nothing), so
//! it never touches the others; its answer is returned only once the group has
//! committed, and if the commit fails every member gets the error and nothing of the
//! group is applied. Events are published after the commit, all together, in order.
//! The first member takes no savepoint (one round trip less for a change that comes
//! alone): the transaction holds nothing else, so its refusal rolls the transaction
//! back, and a member behind it begins a new one.
//!
//! Calls to SQLite's thread are what a grouped change costs most (each is two context
//! switches on a busy core), so a quantity change makes one: its first statement (the
//! key check, the stream's next seq and the item) runs in the same call as its
//! savepoint, and its last (the item's update and the event's insert) is deferred to
//! the next call on the transaction, the next member's or the commit's. A deferred
//! statement is the member's last, nothing reads what it writes before the commit, and
//! it cannot fail on client input; if it fails anyway, the group does. 6.5 context
//! switches per change became 2.6 at 64 writers.
//!
//! Cancellation: a member whose request is dropped still counts itself out of the
//! group (a `Member` guard), a savepoint it left open is rolled back by whoever uses
//! the transaction next, and the savepoint statements and the commit run in tasks of
//! their own, so a dropped request can neither stall the group, nor leave it counting
//! on a savepoint that is gone, nor commit half a change. A member's first statement
//! runs in that task as well: a dropped request cannot leave the group unsure whether
//! its savepoint was taken, and what the statement did is undone with its change.
//!
//! Not used on PostgreSQL: there several nodes write at once, and a group that takes
//! the row locks of several zones in the order its members arrived could deadlock with
//! another node's group taking them in another order. Each change keeps its own
//! transaction there (`Service::write_alone`).

use std::sync::{Arc, Mutex};

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement};
use tokio::sync::{OwnedMutexGuard, watch};

use super::{Done, FirstRows, Service, ServiceError};
use crate::domain::Event;
use crate::store::{Store, StoreError, exec};

/// Changes in one group, at most: a bound on how long the first member may wait.
pub const MAX_GROUP: usize = 128;

/// The group being formed, and the turn of groups on the database.
pub(crate) struct Groups {
    current: Mutex<Option<Arc<Group>>>,
    /// Held by a group from `BEGIN` to `COMMIT`: the next group waits here (FIFO), not
    /// in SQLite's busy handler, and keeps gathering members meanwhile.
    turn: Arc<tokio::sync::Mutex<()>>,
    size: metrics::Histogram,
}

impl Default for Groups {
    fn default() -> Self {
        Groups {
            current: Mutex::new(None),
            turn: Arc::default(),
            size: metrics::histogram!("zonecast_write_group_size"),
        }
    }
}

struct Group {
    counts: Mutex<Counts>,
    open: Arc<tokio::sync::Mutex<Open>>,
    /// The group's outcome, once committed (or not).
    done: watch::Sender<Option<Result<(), Arc<str>>>>,
}

#[derive(Default)]
struct Counts {
    joined: usize,
    finished: usize,
}

/// The group's transaction, used by one member at a time.
#[derive(Default)]
struct Open {
    txn: Option<DatabaseTransaction>,
    turn: Option<OwnedMutexGuard<()>>,
    /// The transaction cannot be used: `BEGIN` or a savepoint statement failed.
    broken: Option<Arc<str>>,
    /// What undoes the change of the member using the transaction now (or dropped in the
    /// middle of it): set when its turn is prepared, cleared when its change is kept or
    /// undone.
    abandoned: Option<Undo>,
    /// The last member's change was kept and its savepoint not yet released: the next
    /// member releases it in the same round trip as it takes its own (and `COMMIT`
    /// releases whatever is left).
    kept: bool,
    /// The last kept member's deferred last statement (`Change::defer`), not yet run:
    /// the next call on the transaction runs it first, before the next member's
    /// savepoint (or before `COMMIT`).
    last: Option<Statement>,
    events: Vec<Event>,
}

/// How one member's change is undone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Undo {
    /// Roll back to the member's savepoint.
    Savepoint,
    /// Roll the transaction back: the member is the first in it, so the transaction
    /// holds nothing else, and it took no savepoint (one round trip less for a change
    /// that comes alone).
    Transaction,
}

/// One change's place in a group; counts itself out when dropped.
struct Member<'a> {
    service: &'a Service,
    groups: Arc<Groups>,
    group: Arc<Group>,
    finished: bool,
}

impl Groups {
    fn join(&self) -> Arc<Group> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = current.as_ref() {
            let mut c = g.counts.lock().unwrap_or_else(|p| p.into_inner());
            if c.joined < MAX_GROUP {
                c.joined += 1;
                return g.clone();
            }
        }
        let g = Arc::new(Group {
            counts: Mutex::new(Counts {
                joined: 1,
                finished: 0,
            }),
            open: Arc::default(),
            done: watch::channel(None).0,
        });
        *current = Some(g.clone());
        g
    }

    /// Counts a member out; `true` for the last one, which seals the group (no one
    /// joins it after) and has it committed.
    fn finish(&self, group: &Arc<Group>) -> bool {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut c = group.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.finished += 1;
        let last = c.finished == c.joined;
        if last && current.as_ref().is_some_and(|g| Arc::ptr_eq(g, group)) {
            *current = None;
        }
        if last {
            self.size.record(c.joined as f64);
        }
        last
    }
}

impl Member<'_> {
    /// Counts this member out, and starts the commit if it was the last.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.groups.finish(&self.group) {
            let (service, group) = (self.service.clone(), self.group.clone());
            // In a task of its own: a member dropped now must not stop the commit the
            // others wait for.
            tokio::spawn(async move {
                let mut open = group.open.clone().lock_owned().await;
                let outcome = service.commit_group(&mut open).await;
                drop(open);
                group.done.send_replace(Some(outcome));
            });
        }
    }
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

fn broken(e: impl std::fmt::Display) -> Arc<str> {
    Arc::from(e.to_string())
}

impl Service {
    /// `write` on SQLite: the change in a savepoint of the group's transaction.
    pub(super) async fn write_grouped<T, F>(
        &self,
        groups: &Arc<Groups>,
        first: Option<Statement>,
        body: F,
    ) -> Result<T, ServiceError>
    where
        F: AsyncFnOnce(&DatabaseTransaction, FirstRows) -> Done<T>,
    {
        let mut member = Member {
            service: self,
            group: groups.join(),
            groups: groups.clone(),
            finished: false,
        };
        let mut done = member.group.done.subscribe();
        let open = member.group.open.clone().lock_owned().await;
        let prepared = prepare(self.store.clone(), member.groups.turn.clone(), open, first);
        let result = match detached(prepared).await {
            Ok((open, rows)) => self.run_member(open, rows, body).await,
            Err(e) => Err(e),
        };
        member.finish();
        let outcome = done
            .wait_for(Option::is_some)
            .await
            .map_err(|_| StoreError::Commit("the group's commit was abandoned".into()))?
            .clone();
        match outcome {
            Some(Ok(())) => result,
            Some(Err(e)) => Err(StoreError::Commit(e.to_string()).into()),
            None => Err(StoreError::Commit("no outcome".into()).into()),
        }
    }

    /// One member's change, in its own savepoint (taken by `prepare`). Its events join
    /// the group's; a refusal (or a change that appends nothing) rolls back to the
    /// savepoint (`undo_member`).
    async fn run_member<T, F>(
        &self,
        mut open: OwnedMutexGuard<Open>,
        rows: FirstRows,
        body: F,
    ) -> Result<T, ServiceError>
    where
        F: AsyncFnOnce(&DatabaseTransaction, FirstRows) -> Done<T>,
    {
        if let Some(e) = &open.broken {
            return Err(StoreError::Commit(e.to_string()).into());
        }
        let Some(txn) = open.txn.as_ref() else {
            return Err(StoreError::Commit("no transaction".into()).into());
        };
        let result = body(txn, rows).await;
        let undone = match result {
            Ok((value, events, last)) if !events.is_empty() => {
                // Recorded with no await in between: a drop cannot split it. Only a
                // savepoint is released later; the first member has none. A deferred
                // last statement runs in the next call on the transaction.
                open.kept = open.abandoned == Some(Undo::Savepoint);
                open.events.extend(events);
                open.last = last;
                open.abandoned = None;
                return Ok(value);
            }
            // Nothing appended: the seq taken under the lock must not be kept.
            Ok((value, _, _)) => Ok(value),
            Err(e) => Err(e),
        };
        let open = detached(undo_member(open)).await?;
        if let Some(e) = &open.broken {
            return Err(StoreError::Commit(e.to_string()).into());
        }
        undone
    }

    /// Commits the group (or rolls it back when nothing is left to keep, or it broke),
    /// then publishes its events.
    async fn commit_group(&self, open: &mut Open) -> Result<(), Arc<str>> {
        let Some(txn) = open.txn.take() else {
            return match open.broken.clone() {
                Some(e) => Err(e),
                None => Ok(()),
            };
        };
        let events = std::mem::take(&mut open.events);
        let outcome = async {
            if let Some(e) = open.broken.clone() {
                txn.rollback().await.map_err(broken)?;
                return Err(e);
            }
            match open.abandoned.take() {
                Some(Undo::Transaction) => {
                    // The first member was dropped in the middle of its change: nothing
                    // else is in the transaction (kept changes clear `abandoned`).
                    txn.rollback().await.map_err(broken)?;
                    return match events.is_empty() {
                        true => Ok(()),
                        false => Err(broken("a kept change was in a transaction rolled back")),
                    };
                }
                Some(Undo::Savepoint) => undo(&txn, SAVEPOINT).await.map_err(broken)?,
                None => {}
            }
            if events.is_empty() {
                return txn.rollback().await.map_err(broken);
            }
            if let Some(last) = open.last.take()
                && let Err(e) = Store::run_last(&txn, last).await
            {
                let _ = txn.rollback().await;
                return Err(broken(e));
            }
            if let Err(e) = self.broker.before_commit(&txn, &events).await {
                let _ = txn.rollback().await;
                return Err(broken(e));
            }
            txn.commit().await.map_err(broken)
        }
        .await;
        open.turn = None;
        if outcome.is_ok() && !events.is_empty() {
            self.published(events);
        }
        outcome
    }
}

/// Runs the group's bookkeeping (`prepare`, `undo_member`) in a task of its own and
/// gives the transaction back. What these statements did must be recorded whatever
/// happens to the member that asked for them: a member dropped while `RELEASE
/// zc_change; SAVEPOINT zc_change` ran could otherwise leave the first done and the
/// second not, with the group still counting on the savepoint it released (the next
/// member then failed on "no such savepoint", and the whole group with it).
async fn detached<Fut, T>(f: Fut) -> Result<T, ServiceError>
where
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(f)
        .await
        .map_err(|e| StoreError::Commit(format!("group commit bookkeeping failed: {e}")).into())
}

/// Makes the group's transaction ready for the next member's change: `BEGIN` for the
/// first (which takes no savepoint: undoing its change is rolling the transaction
/// back), a change left half done by a dropped member undone, the last kept savepoint
/// released, and the member's own savepoint taken. The member's `first` statement runs
/// here too, in the same call as its savepoint (after `BEGIN` for the first member), so
/// that what it did is undone with the member's change even if the member is dropped
/// meanwhile. Failures, of `first` too, mark the group broken: an error of the joint
/// call cannot say whether the savepoint was taken.
async fn prepare(
    store: Store,
    turn: Arc<tokio::sync::Mutex<()>>,
    mut open: OwnedMutexGuard<Open>,
    first: Option<Statement>,
) -> (OwnedMutexGuard<Open>, FirstRows) {
    if open.broken.is_some() {
        return (open, None);
    }
    if open.abandoned == Some(Undo::Transaction) {
        // The first member was dropped in the middle of its change: the transaction
        // holds nothing else. This member begins a new one, in the same turn.
        if let Err(e) = roll_back(&mut open).await {
            open.broken = Some(broken(&e));
            return (open, None);
        }
    }
    if open.txn.is_none() {
        // The turn is kept in `open` only together with the transaction it is for.
        let turn = match open.turn.take() {
            Some(t) => t,
            None => turn.lock_owned().await,
        };
        let txn = match store.begin_write().await {
            Ok(t) => t,
            Err(e) => {
                open.broken = Some(broken(e));
                return (open, None);
            }
        };
        let rows = match first {
            Some(first) => match txn.query_all_raw(first).await {
                Ok(rows) => Some(rows),
                Err(e) => {
                    open.broken = Some(broken(e));
                    None
                }
            },
            None => None,
        };
        open.txn = Some(txn);
        open.turn = Some(turn);
        open.kept = false;
        open.abandoned = Some(Undo::Transaction);
        return (open, rows);
    }
    let o = &mut *open;
    let Some(txn) = o.txn.as_ref() else {
        o.broken = Some(broken("no transaction"));
        return (open, None);
    };
    if o.abandoned == Some(Undo::Savepoint) {
        if let Err(e) = undo(txn, SAVEPOINT).await {
            o.broken = Some(broken(&e));
            return (open, None);
        }
        o.abandoned = None;
    }
    // One name for every member's savepoint: each is released before the next is
    // taken (or rolled back to the innermost of that name), and the statements stay in
    // the prepared-statement cache.
    let take = if o.kept { RELEASE_AND_TAKE } else { TAKE };
    let last = o.last.take();
    let has_first = first.is_some();
    let taken = match (last, first) {
        (None, None) => exec(txn, take, vec![]).await.map(|_| None),
        (last, first) => {
            // One call: the last member's deferred statement, the savepoints, and this
            // member's first statement.
            let deferred = last.is_some();
            match txn
                .query_all_raw(joint([last, Some(plain(take)), first]))
                .await
            {
                Ok(rows) if deferred => Store::saved_and_appended(&rows, 1).map(|()| Some(rows)),
                Ok(rows) => Ok(Some(rows)),
                Err(e) => Err(e.into()),
            }
        }
    };
    match taken {
        Ok(rows) => {
            open.kept = false;
            open.abandoned = Some(Undo::Savepoint);
            // The member gets rows only for a first statement of its own.
            (open, rows.filter(|_| has_first))
        }
        Err(e) => {
            open.broken = Some(broken(&e));
            (open, None)
        }
    }
}

/// Undoes the member's change (it is refused, or changes nothing): back to its
/// savepoint, or, for the first member, the whole transaction, which a member joining
/// later begins again.
async fn undo_member(mut open: OwnedMutexGuard<Open>) -> OwnedMutexGuard<Open> {
    let undone = match (open.abandoned, open.txn.as_ref()) {
        (Some(Undo::Transaction), _) => {
            let r = roll_back(&mut open).await;
            open.turn = None;
            r
        }
        (_, Some(txn)) => undo(txn, SAVEPOINT).await,
        (_, None) => Ok(()),
    };
    match undone {
        Ok(()) => open.abandoned = None,
        Err(e) => open.broken = Some(broken(&e)),
    }
    open
}

/// Statements run in one call, in order: their texts joined and their values bound in
/// turn (SQLite's `?` are positional; the savepoint statements have none).
fn joint(parts: [Option<Statement>; 3]) -> Statement {
    let mut sql = String::new();
    let mut values = vec![];
    for part in parts.into_iter().flatten() {
        if !sql.is_empty() {
            sql.push_str("; ");
        }
        sql.push_str(&part.sql);
        values.extend(part.values.map(|v| v.0).unwrap_or_default());
    }
    Statement::from_sql_and_values(DbBackend::Sqlite, sql, values)
}

fn plain(sql: &str) -> Statement {
    Statement::from_string(DbBackend::Sqlite, sql)
}

/// Every member's savepoint, and the statements that take it.
const SAVEPOINT: &str = "zc_change";
const TAKE: &str = "SAVEPOINT zc_change";
const RELEASE_AND_TAKE: &str = "RELEASE zc_change; SAVEPOINT zc_change";

/// Rolls the group's transaction back; the turn stays where it is.
async fn roll_back(open: &mut Open) -> Result<(), StoreError> {
    open.abandoned = None;
    open.kept = false;
    match open.txn.take() {
        Some(txn) => Ok(txn.rollback().await?),
        None => Ok(()),
    }
}

/// Rolls a savepoint back and releases it.
async fn undo(txn: &DatabaseTransaction, sp: &str) -> Result<(), StoreError> {
    exec(txn, &format!("ROLLBACK TO {sp}"), vec![]).await?;
    exec(txn, &format!("RELEASE {sp}"), vec![]).await?;
    Ok(())
}

/// Whether the store's writes are grouped.
pub(super) fn grouped(store: &Store) -> bool {
    store.backend() == sea_orm::DbBackend::Sqlite
}
