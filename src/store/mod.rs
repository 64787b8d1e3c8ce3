//! The only place with SQL. Opens SQLite (default) or PostgreSQL, runs the migrations,
//! and offers the transactions the service layer composes: every write is one
//! transaction that also appends to the change log (`log.rs`).
//!
//! Depends on `domain` and the `entity` crate only. Must not publish anything:
//! publishing happens after commit, in the service layer; and must not decide who may
//! do what.

mod bus;
mod change;
mod idempotency;
mod keys;
mod log;
mod notifications;
mod stock;

use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    AccessMode, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction,
    DbBackend, DbErr, EntityTrait, IsolationLevel, Select, SqliteTransactionMode, Statement,
    TransactionOptions, TransactionTrait, Value,
};

pub use bus::{Listener, MAX_PAYLOAD};
pub use idempotency::KeyClaim;
pub use keys::ApiKey;
pub use log::NewEvent;

/// Storage failures. `Display` carries the database's own message, once: the cause is
/// not also exposed as `source()`, so an error chain printed at the top (`main`) does
/// not repeat it line after line.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {}", db_message(.0))]
    Db(DbErr),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("notification channel: {0}")]
    Bus(String),
    /// The transaction a change shared with others (group commit) could not commit.
    #[error("commit failed: {0}")]
    Commit(String),
}

impl From<DbErr> for StoreError {
    fn from(e: DbErr) -> Self {
        StoreError::Db(e)
    }
}

/// Pool options for `url`, with at most `max` connections.
fn connect_options(url: &str, max: u32) -> ConnectOptions {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.sqlx_logging(false)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(10))
        .max_connections(max)
        .min_connections(1);
    if url.starts_with("sqlite:") {
        // WAL lets readers (snapshots, replays) run beside the one writer; writers
        // queue on the busy timeout instead of failing with "database is locked".
        // A connection to a file does not drop away as a network one can: the ping
        // before each checkout is a round trip to the connection's thread for nothing.
        opts.test_before_acquire(false).map_sqlx_sqlite_opts(|o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                .create_if_missing(true)
        });
    }
    opts
}

/// Applies the pending migrations; their names. On PostgreSQL several nodes (and
/// `zonecast migrate`) may start at once on one database: the first to take the lock
/// migrates, in one transaction; the others then find nothing pending.
async fn apply_migrations(db: &DatabaseConnection) -> Result<Vec<String>, StoreError> {
    if db.get_database_backend() == DbBackend::Postgres {
        let txn = db.begin().await?;
        txn.execute_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock(hashtext('zonecast-migrate:' || current_schema()))",
        ))
        .await?;
        let pending = pending_names(&txn).await?;
        Migrator::up(&txn, None).await?;
        txn.commit().await?;
        Ok(pending)
    } else {
        let pending = pending_names(db).await?;
        Migrator::up(db, None).await?;
        Ok(pending)
    }
}

/// sea-orm's message, without the wrapper texts it repeats from its own causes
/// (`Connection Error: error returned from database: …`).
fn db_message(e: &DbErr) -> String {
    let mut msg = e.to_string();
    for prefix in ["Connection Error: ", "Execution Error: ", "Query Error: "] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            msg = rest.to_owned();
        }
    }
    msg.strip_prefix("error returned from database: ")
        .map(str::to_owned)
        .unwrap_or(msg)
}

#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    /// Where write transactions run: on SQLite one connection of its own (see `open`);
    /// on PostgreSQL the same pool as `db`.
    writer: DatabaseConnection,
}

impl Store {
    /// Connects and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let sqlite = url.starts_with("sqlite:");
        let db = Database::connect(connect_options(url, if sqlite { 8 } else { 16 })).await?;
        let pending = apply_migrations(&db).await?;
        if pending.is_empty() {
            tracing::debug!("database schema is up to date");
        } else {
            tracing::info!(applied = %pending.join(", "), "migrated the database");
        }
        let writer = if sqlite {
            // SQLite takes one writer at a time anyway (group commit queues them). On a
            // connection of its own, the writer's page cache stays valid from one write to
            // the next: a pooled connection's is dropped whenever another connection has
            // written since it last ran, and every change then read its pages again.
            Database::connect(connect_options(url, 1)).await?
        } else {
            db.clone()
        };
        let store = Store { db, writer };
        store
            .ensure_stream(&crate::domain::StreamKey::Alerts)
            .await?;
        Ok(store)
    }

    /// Applies pending migrations and returns their count (for `zonecast migrate`).
    /// `zonecast migrate`: what `open` does first, on its own. With the same
    /// connection settings (SQLite's busy timeout: a server may be writing) and the
    /// same lock on PostgreSQL (nodes may be starting and migrating meanwhile).
    pub async fn migrate(url: &str) -> Result<usize, StoreError> {
        let db = Database::connect(connect_options(url, 1)).await?;
        Ok(apply_migrations(&db).await?.len())
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// A write transaction. On SQLite it takes the write lock at BEGIN (IMMEDIATE), so two
    /// writers never both read and then fail to upgrade; on PostgreSQL the stream row
    /// lock taken by `next_seq` orders writers.
    pub async fn begin_write(&self) -> Result<DatabaseTransaction, StoreError> {
        Ok(self
            .writer
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?)
    }

    /// A read transaction that sees one point in time: SQLite's WAL snapshot, or
    /// REPEATABLE READ on PostgreSQL (READ COMMITTED would let the snapshot's items and
    /// its `last_event_id` come from different moments).
    pub(crate) async fn begin_read(&self) -> Result<DatabaseTransaction, StoreError> {
        let opts = match self.backend() {
            DbBackend::Postgres => TransactionOptions {
                isolation_level: Some(IsolationLevel::RepeatableRead),
                access_mode: Some(AccessMode::ReadOnly),
                ..Default::default()
            },
            _ => TransactionOptions::default(),
        };
        Ok(self.db.begin_with_options(opts).await?)
    }

    /// On PostgreSQL, a transaction holding a lock that other nodes' first-start setup
    /// (demo data, the first admin key) waits for until it ends; none on SQLite, which
    /// serves one node.
    pub async fn setup_lock(&self) -> Result<Option<DatabaseTransaction>, StoreError> {
        if self.backend() != DbBackend::Postgres {
            return Ok(None);
        }
        let txn = self.db.begin().await?;
        txn.execute_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock(hashtext('zonecast-setup:' || current_schema()))",
        ))
        .await?;
        Ok(Some(txn))
    }

    /// Ready to serve: the database answers and no migration is pending.
    pub async fn ready(&self) -> Result<(), String> {
        self.db
            .ping()
            .await
            .map_err(|e| format!("database unreachable: {e}"))?;
        let pending = Migrator::get_pending_migrations(&self.db)
            .await
            .map_err(|e| format!("cannot read migrations: {e}"))?;
        if pending.is_empty() {
            Ok(())
        } else {
            Err(format!("{} migration(s) pending", pending.len()))
        }
    }
}

async fn pending_names<C: ConnectionTrait>(c: &C) -> Result<Vec<String>, DbErr> {
    Ok(Migrator::get_pending_migrations(c)
        .await?
        .iter()
        .map(|m| m.name().to_owned())
        .collect())
}

/// The row a lookup by a unique key finds, if any: `select.one()` without its
/// `LIMIT ?`. SQLite plans a statement with the value bound to its LIMIT and so marks
/// it to be prepared again whenever that parameter is bound: a lookup through `one()`
/// was parsed and planned anew at every execution (the API key lookup of every
/// request among them). Only for a select that can find at most one row.
pub(crate) async fn unique<E, C>(select: Select<E>, c: &C) -> Result<Option<E::Model>, DbErr>
where
    E: EntityTrait,
    C: ConnectionTrait,
{
    Ok(select.all(c).await?.into_iter().next())
}

/// A statement written with `$1, $2, …` placeholders, each used once and in order, for
/// either backend.
pub(crate) fn stmt(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    let sql = match backend {
        DbBackend::Postgres => sql.to_owned(),
        _ => {
            let mut out = String::with_capacity(sql.len());
            let mut chars = sql.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                    while chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                        chars.next();
                    }
                    out.push('?');
                } else {
                    out.push(c);
                }
            }
            out
        }
    };
    Statement::from_sql_and_values(backend, sql, values)
}

pub(crate) async fn exec<C: ConnectionTrait>(
    c: &C,
    sql: &str,
    values: Vec<Value>,
) -> Result<u64, StoreError> {
    Ok(c.execute_raw(stmt(c.get_database_backend(), sql, values))
        .await?
        .rows_affected())
}
