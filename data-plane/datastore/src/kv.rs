//! The KeyValue interface: versioned values with optional TTL, compare-and-set,
//! idempotent writes, atomic batches and prefix scans in bounded pages.
//!
//! Semantics every store keeps (the conformance suite checks each):
//! - A key's version is 1 when it is created and grows by one on every write
//!   of it; a deleted or expired key starts again at 1.
//! - `Put::expected_version`: `None` writes unconditionally; `Some(0)` writes
//!   only if the key does not exist; `Some(v)` only if its version is `v`.
//!   Otherwise [`Error::VersionMismatch`] and nothing changes.
//! - `Put::idempotency_key`: a second put with a key already applied (within
//!   [`IDEMPOTENCY_RETENTION`]) changes nothing and returns the version the
//!   first one wrote, so a client's retry of a write applies it once.
//! - An expired item is never returned; expired rows are removed through an
//!   index on their expiry, never by scanning the whole table.
//! - `batch_put` is one transaction: all puts apply or none.
//! - `scan` returns items in key order, starting after `after`, and stops at
//!   the first of `limit.max_items` items or `limit.max_bytes` of keys plus
//!   values (always at least one item, however large); `Page::next_after` is
//!   the last key returned when more may follow.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::Error;

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;

/// How long an applied idempotency key is remembered.
pub const IDEMPOTENCY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// Where a KeyValue binding keeps its data and how it connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvParams {
    /// The namespace whose data this is: every row is keyed by it, so several
    /// namespaces may share one database.
    pub namespace: String,
    pub store: KvStore,
    /// Connections in the pool.
    pub pool_size: u32,
    /// How long opening (and each later connection attempt) may take.
    pub connect_timeout: Duration,
}

/// A KeyValue store.
#[derive(Clone, PartialEq, Eq)]
pub enum KvStore {
    /// An SQLite database file (created if missing), in WAL mode.
    Sqlite { path: PathBuf },
    /// A PostgreSQL database, `postgres://…`.
    Postgres { url: String },
}

/// One stored value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    pub value: Bytes,
    pub version: u64,
    /// When it expires, if it has a TTL.
    pub expires_at: Option<SystemTime>,
}

/// One write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Put {
    pub key: String,
    pub value: Bytes,
    /// Expire the value this long after the write; `None` keeps it.
    pub ttl: Option<Duration>,
    /// Compare-and-set, see the module documentation.
    pub expected_version: Option<u64>,
    /// Apply once, see the module documentation.
    pub idempotency_key: Option<String>,
}

/// How much one scan page may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanLimit {
    pub max_items: usize,
    pub max_bytes: usize,
}

/// One page of a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<Item>,
    /// The key to continue after; `None` when the scan is complete.
    pub next_after: Option<String>,
}

/// A KeyValue store opened for one namespace. Cheap to share: callers hold
/// it in an `Arc` for as long as a request needs it.
pub trait KeyValue: Send + Sync + fmt::Debug {
    /// The item at `key`, `None` if there is none (or it expired).
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Item>, Error>>;

    /// Writes `put`; the new version.
    fn put(&self, put: Put) -> BoxFuture<'_, Result<u64, Error>>;

    /// Deletes `key` (if its version is `expected_version`, when given; `0`
    /// never matches an existing key); whether there was one.
    fn delete<'a>(
        &'a self,
        key: &'a str,
        expected_version: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, Error>>;

    /// The items at `keys`, in their order.
    fn batch_get<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<Item>>, Error>>;

    /// Writes every put in one transaction; their new versions, in order.
    fn batch_put(&self, puts: Vec<Put>) -> BoxFuture<'_, Result<Vec<u64>, Error>>;

    /// Items whose key starts with `prefix`, after `after`, in key order.
    fn scan<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: ScanLimit,
    ) -> BoxFuture<'a, Result<Page, Error>>;

    /// Writes `items` as they are, keeping their versions and expiry, in one
    /// transaction, where the store holds no newer version of the key (or
    /// only an expired one): the copy of a namespace moved here from
    /// another store. Idempotency keys are not carried over.
    fn import(&self, items: Vec<Item>) -> BoxFuture<'_, Result<(), Error>>;

    /// Waits for operations in flight, then closes the pool. Later calls
    /// fail with [`Error::Closed`].
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Opens the store of `params`: connects (within `connect_timeout`),
/// creates the schema if missing and starts the expiry sweeper, so the
/// first request finds a ready pool.
pub async fn open_kv(params: &KvParams) -> Result<Arc<dyn KeyValue>, Error> {
    match &params.store {
        KvStore::Sqlite { .. } => open_sqlite(params).await,
        KvStore::Postgres { .. } => open_postgres(params).await,
    }
}

#[cfg(not(feature = "sqlite"))]
async fn open_sqlite(_: &KvParams) -> Result<Arc<dyn KeyValue>, Error> {
    Err(Error::Invalid(
        "this proxy was built without the `sqlite` feature".into(),
    ))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_: &KvParams) -> Result<Arc<dyn KeyValue>, Error> {
    Err(Error::Invalid(
        "this proxy was built without the `postgres` feature".into(),
    ))
}

#[cfg(feature = "sqlite")]
async fn open_sqlite(params: &KvParams) -> Result<Arc<dyn KeyValue>, Error> {
    match &params.store {
        KvStore::Sqlite { path } => sqlite::open(params, path).await,
        KvStore::Postgres { .. } => Err(Error::Invalid("not an SQLite store".into())),
    }
}

#[cfg(feature = "postgres")]
async fn open_postgres(params: &KvParams) -> Result<Arc<dyn KeyValue>, Error> {
    match &params.store {
        KvStore::Postgres { url } => postgres::open(params, url).await,
        KvStore::Sqlite { .. } => Err(Error::Invalid("not a PostgreSQL store".into())),
    }
}

/// The rows stored for the namespace of `params`, expired ones included:
/// what the conformance suite reads to see that the sweeper removed them.
#[doc(hidden)]
pub async fn stored_rows(params: &KvParams) -> Result<u64, Error> {
    match &params.store {
        #[cfg(feature = "sqlite")]
        KvStore::Sqlite { path } => sqlite::stored_rows(params, path).await,
        #[cfg(feature = "postgres")]
        KvStore::Postgres { url } => postgres::stored_rows(params, url).await,
        #[allow(unreachable_patterns)]
        _ => Err(Error::Invalid("this store was not built".into())),
    }
}

impl fmt::Debug for KvStore {
    /// A Postgres URL may carry a password: only its scheme is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvStore::Sqlite { path } => f.debug_struct("Sqlite").field("path", path).finish(),
            KvStore::Postgres { .. } => f.write_str("Postgres { url: \"postgres://…\" }"),
        }
    }
}
