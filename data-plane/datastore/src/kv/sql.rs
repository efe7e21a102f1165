//! The SQL stores' shared logic, written once over sqlx's `Database`: every
//! statement uses `$N` placeholders, which SQLite and PostgreSQL both read,
//! so the two stores differ only in their [`Dialect`] (schema types, how a
//! write transaction begins, which error codes mean "busy").
//!
//! Every write is one statement that checks its condition and bumps the
//! version in the database (an upsert `… ON CONFLICT … DO UPDATE … WHERE`
//! or an `UPDATE … WHERE version = …`, each `RETURNING version`), so
//! concurrent writers of one key serialize on its row and never lose an
//! increment, whatever the isolation level. An idempotency key is claimed
//! by inserting its row before the write, in the same transaction: a
//! concurrent retry waits on that row and then reads the version the first
//! one wrote.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::TryStreamExt;
use futures::future::BoxFuture;
use sqlx::error::ErrorKind;
use sqlx::{
    AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type,
};
use tokio::task::JoinHandle;

use super::{IDEMPOTENCY_RETENTION, Item, KeyValue, Page, Put, ScanLimit};
use crate::Error;

/// How often the sweeper deletes expired rows.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// The most rows one sweep statement deletes, so that a backlog of expired
/// rows never holds a long write lock; the sweeper repeats until a batch
/// comes back short.
const SWEEP_BATCH: i64 = 500;

/// What differs between the SQL databases.
pub(super) trait Dialect: Database {
    /// The column type of keys: one that compares and sorts in byte order.
    const KEY_TYPE: &'static str;
    /// The column type of values.
    const BYTES_TYPE: &'static str;
    /// The column type of versions and unix milliseconds.
    const INTEGER_TYPE: &'static str;
    /// A statement run first in each transaction creating the schema, to
    /// make stores opened at once take turns.
    const SCHEMA_LOCK: Option<&'static str>;
    /// The statement beginning a transaction that will write.
    const BEGIN_WRITE: &'static str;

    /// Whether a database error code means the database is busy or gone
    /// for now, so that the caller may retry.
    fn retryable(code: &str) -> bool;

    /// Whether a database error code means the request cannot be stored
    /// (bad data rather than a broken database).
    fn invalid(code: &str) -> bool;
}

/// One namespace's view of an SQL store.
pub(super) struct SqlKv<DB: Database> {
    pool: Pool<DB>,
    readers: Readers<DB>,
    namespace: String,
    /// Deletes expired rows; aborted on close and on drop.
    sweeper: JoinHandle<()>,
}

/// The connections Gets read through, kept out of sqlx's pool: the pool
/// pings a connection each time it is given back (a round trip to SQLite's
/// worker thread, or to the Postgres server, that no pool option turns
/// off, and which the data bench's profile found on every Get), so a read
/// takes an idle reader and puts it back as it is. A reader whose read
/// failed or was cancelled is dropped, which closes it, and a new one is
/// taken out of the pool when none is idle: as many readers as the pool's
/// `pool_size`, besides the pool's own connections for writes and scans.
struct Readers<DB: Database> {
    idle: std::sync::Mutex<Vec<DB::Connection>>,
    permits: tokio::sync::Semaphore,
}

/// A reader lent to one read: dropped with it unless [`Reader::keep`] gives
/// it back.
struct Reader<'a, DB: Database> {
    conn: Option<DB::Connection>,
    readers: &'a Readers<DB>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl<DB: Dialect> Readers<DB> {
    fn new(size: usize) -> Self {
        Readers {
            idle: std::sync::Mutex::new(Vec::with_capacity(size)),
            permits: tokio::sync::Semaphore::new(size),
        }
    }

    /// An idle reader, else a connection taken out of `pool`.
    async fn lend<'a>(&'a self, pool: &Pool<DB>) -> Result<Reader<'a, DB>, Error> {
        let permit = self.permits.acquire().await.map_err(|_| Error::Closed)?;
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => pool.acquire().await.map_err(classify::<DB>)?.detach(),
        };
        Ok(Reader {
            conn: Some(conn),
            readers: self,
            _permit: permit,
        })
    }

    /// Closes every idle reader, and lends no more.
    fn close(&self) {
        self.permits.close();
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl<DB: Database> Reader<'_, DB> {
    fn conn(&mut self) -> &mut DB::Connection {
        self.conn
            .as_mut()
            .expect("a lent reader holds its connection")
    }

    /// Gives the connection back for the next read, unless the store is
    /// closed.
    fn keep(mut self) {
        if let Some(conn) = self.conn.take()
            && !self.readers.permits.is_closed()
        {
            self.readers
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        }
    }
}

/// A row as read: key, value, version, expiry (unix milliseconds).
type RawItem = (String, Vec<u8>, i64, Option<i64>);

/// The statements creating the schema if missing, in the column types of
/// `DB`: items keyed by (namespace, key) with an index on their expiry, and
/// applied idempotency keys with an index on when they were applied.
fn schema<DB: Dialect>() -> [String; 4] {
    let (key, bytes, integer) = (DB::KEY_TYPE, DB::BYTES_TYPE, DB::INTEGER_TYPE);
    [
        format!(
            "CREATE TABLE IF NOT EXISTS prism_kv_items (\
             namespace TEXT NOT NULL, key {key} NOT NULL, value {bytes} NOT NULL, \
             version {integer} NOT NULL, expires_at {integer}, \
             PRIMARY KEY (namespace, key))"
        ),
        "CREATE INDEX IF NOT EXISTS prism_kv_items_expiry \
         ON prism_kv_items (namespace, expires_at)"
            .to_string(),
        format!(
            "CREATE TABLE IF NOT EXISTS prism_kv_idempotency (\
             namespace TEXT NOT NULL, idempotency_key TEXT NOT NULL, \
             version {integer} NOT NULL, applied_at {integer} NOT NULL, \
             PRIMARY KEY (namespace, idempotency_key))"
        ),
        "CREATE INDEX IF NOT EXISTS prism_kv_idempotency_applied \
         ON prism_kv_idempotency (namespace, applied_at)"
            .to_string(),
    ]
}

/// Reads a live item: `$1` namespace, `$2` key, `$3` now in Unix
/// milliseconds.
const SELECT_ITEM: &str = "SELECT key, value, version, expires_at FROM prism_kv_items \
     WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > $3)";

const SELECT_VERSION: &str = "SELECT version FROM prism_kv_items \
     WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > $3)";

/// Writes a key whether or not it exists (`$6` true), or only where it does
/// not (`$6` false: the row is missing or expired). An expired row written
/// again starts at version 1. `$3` is the value, `$4` when it expires (null
/// for never), `$5` now, both in Unix milliseconds.
const UPSERT: &str = "INSERT INTO prism_kv_items (namespace, key, value, version, expires_at) \
     VALUES ($1, $2, $3, 1, $4) \
     ON CONFLICT (namespace, key) DO UPDATE SET \
     value = excluded.value, expires_at = excluded.expires_at, \
     version = CASE WHEN prism_kv_items.expires_at <= $5 THEN 1 \
     ELSE prism_kv_items.version + 1 END \
     WHERE $6 OR prism_kv_items.expires_at <= $5 \
     RETURNING version";

/// Writes a live key whose version is `$6`.
const UPDATE_IF_VERSION: &str = "UPDATE prism_kv_items \
     SET value = $3, expires_at = $4, version = version + 1 \
     WHERE namespace = $1 AND key = $2 AND version = $6 \
     AND (expires_at IS NULL OR expires_at > $5) \
     RETURNING version";

/// Writes an item as it is, where the row is missing, older or expired.
const IMPORT: &str = "INSERT INTO prism_kv_items (namespace, key, value, version, expires_at) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (namespace, key) DO UPDATE SET \
     value = excluded.value, version = excluded.version, expires_at = excluded.expires_at \
     WHERE prism_kv_items.version < excluded.version OR prism_kv_items.expires_at <= $6";

const DELETE: &str = "DELETE FROM prism_kv_items \
     WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > $3) \
     AND ($4 IS NULL OR version = $4) \
     RETURNING version";

/// Claims an idempotency key not yet applied (or applied before the
/// retention `$4`); returns no row when it was applied within it.
const CLAIM_IDEMPOTENCY: &str = "INSERT INTO prism_kv_idempotency \
     (namespace, idempotency_key, version, applied_at) VALUES ($1, $2, 0, $3) \
     ON CONFLICT (namespace, idempotency_key) DO UPDATE SET \
     version = 0, applied_at = excluded.applied_at \
     WHERE prism_kv_idempotency.applied_at <= $4 \
     RETURNING version";

const APPLIED_VERSION: &str = "SELECT version FROM prism_kv_idempotency \
     WHERE namespace = $1 AND idempotency_key = $2";

const RECORD_IDEMPOTENCY: &str = "UPDATE prism_kv_idempotency SET version = $3 \
     WHERE namespace = $1 AND idempotency_key = $2";

/// Keys in `[$2, $3)` (no upper bound when `$3` is null), after `$4`.
const SCAN: &str = "SELECT key, value, version, expires_at FROM prism_kv_items \
     WHERE namespace = $1 AND key >= $2 AND ($3 IS NULL OR key < $3) \
     AND ($4 IS NULL OR key > $4) AND (expires_at IS NULL OR expires_at > $5) \
     ORDER BY key LIMIT $6";

/// Deletes one batch of expired rows through the `(namespace, expires_at)`
/// index. The outer condition is checked again on each row, so a row
/// written again since the inner select found it is kept.
const SWEEP_ITEMS: &str = "DELETE FROM prism_kv_items \
     WHERE namespace = $1 AND expires_at <= $2 AND key IN (\
     SELECT key FROM prism_kv_items WHERE namespace = $1 AND expires_at <= $2 \
     ORDER BY expires_at LIMIT $3) \
     RETURNING version";

/// Deletes one batch of idempotency keys past their retention.
const SWEEP_IDEMPOTENCY: &str = "DELETE FROM prism_kv_idempotency \
     WHERE namespace = $1 AND applied_at <= $2 AND idempotency_key IN (\
     SELECT idempotency_key FROM prism_kv_idempotency \
     WHERE namespace = $1 AND applied_at <= $2 ORDER BY applied_at LIMIT $3) \
     RETURNING version";

const COUNT_ROWS: &str = "SELECT COUNT(*) FROM prism_kv_items WHERE namespace = $1";

/// What one put asks of the database, converted once from [`Put`].
struct Write {
    key: String,
    value: Vec<u8>,
    expires_at: Option<i64>,
    expected_version: Option<i64>,
    idempotency_key: Option<String>,
}

impl<DB> SqlKv<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    /// Creates the schema on `pool` and starts the sweeper of `namespace`.
    pub(super) async fn start(pool: Pool<DB>, namespace: &str) -> Result<Self, Error> {
        // Each statement in a transaction of its own: `CREATE INDEX` locks
        // its table against writes even when the index exists, and a
        // transaction holding that lock on one table while it waits for the
        // next would deadlock with a write holding the second and waiting
        // for the first.
        for statement in schema::<DB>() {
            let mut tx = pool
                .begin_with(DB::BEGIN_WRITE)
                .await
                .map_err(classify::<DB>)?;
            for statement in DB::SCHEMA_LOCK
                .into_iter()
                .map(str::to_string)
                .chain([statement])
            {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await
                    .map_err(classify::<DB>)?;
            }
            tx.commit().await.map_err(classify::<DB>)?;
        }
        let sweeper = tokio::spawn(Self::sweep_forever(pool.clone(), namespace.to_string()));
        Ok(SqlKv {
            readers: Readers::new(pool.options().get_max_connections() as usize),
            pool,
            namespace: namespace.to_string(),
            sweeper,
        })
    }

    /// The rows stored for `namespace`, expired or not: what a test reads
    /// to see that the sweeper removed them.
    pub(super) async fn count_rows(pool: &Pool<DB>, namespace: &str) -> Result<u64, Error> {
        let mut conn = pool.acquire().await.map_err(classify::<DB>)?;
        let row = sqlx::query(COUNT_ROWS)
            .bind(namespace.to_string())
            .fetch_one(&mut *conn)
            .await
            .map_err(classify::<DB>)?;
        let count: i64 = row.try_get(0).map_err(classify::<DB>)?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Sweeps every [`SWEEP_EVERY`] until aborted; a failed sweep is logged
    /// and tried again on the next tick.
    async fn sweep_forever(pool: Pool<DB>, namespace: String) {
        let mut ticks = tokio::time::interval(SWEEP_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if pool.is_closed() {
                return;
            }
            if let Err(error) = Self::sweep(&pool, &namespace).await {
                tracing::warn!(%error, store = DB::NAME, %namespace, "Failed to sweep expired keys.");
            }
        }
    }

    /// Deletes every expired item and idempotency key past retention, in
    /// batches of [`SWEEP_BATCH`].
    async fn sweep(pool: &Pool<DB>, namespace: &str) -> Result<(), Error> {
        let now = now_millis();
        let retention = millis(IDEMPOTENCY_RETENTION);
        for (statement, before) in [
            (SWEEP_ITEMS, now),
            (SWEEP_IDEMPOTENCY, now.saturating_sub(retention)),
        ] {
            loop {
                let mut conn = pool.acquire().await.map_err(classify::<DB>)?;
                let deleted = sqlx::query(statement)
                    .bind(namespace.to_string())
                    .bind(before)
                    .bind(SWEEP_BATCH)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(classify::<DB>)?
                    .len();
                if i64::try_from(deleted).unwrap_or(i64::MAX) < SWEEP_BATCH {
                    break;
                }
            }
        }
        Ok(())
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.pool.is_closed() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    async fn get_one(&self, key: &str) -> Result<Option<Item>, Error> {
        self.check_open()?;
        let mut reader = self.readers.lend(&self.pool).await?;
        let item = self.select_item(reader.conn(), key).await?;
        reader.keep();
        Ok(item)
    }

    async fn select_item(
        &self,
        conn: &mut DB::Connection,
        key: &str,
    ) -> Result<Option<Item>, Error> {
        let row = sqlx::query(SELECT_ITEM)
            .bind(self.namespace.clone())
            .bind(key.to_string())
            .bind(now_millis())
            .fetch_optional(&mut *conn)
            .await
            .map_err(classify::<DB>)?;
        row.map(|row| decode_item::<DB>(&row)).transpose()
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Item>>, Error> {
        self.check_open()?;
        let mut reader = self.readers.lend(&self.pool).await?;
        let mut items = Vec::with_capacity(keys.len());
        for key in keys {
            items.push(self.select_item(reader.conn(), key).await?);
        }
        reader.keep();
        Ok(items)
    }

    async fn put_one(&self, put: Put) -> Result<u64, Error> {
        let versions = self.put_all(vec![put]).await?;
        versions
            .first()
            .copied()
            .ok_or_else(|| Error::internal(DB::NAME, "a put returned no version".to_string()))
    }

    /// Applies `puts` in one write transaction; nothing is applied unless
    /// every one is.
    async fn put_all(&self, puts: Vec<Put>) -> Result<Vec<u64>, Error> {
        self.check_open()?;
        let writes = puts
            .into_iter()
            .map(Write::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let mut tx = self
            .pool
            .begin_with(DB::BEGIN_WRITE)
            .await
            .map_err(classify::<DB>)?;
        let mut versions = Vec::with_capacity(writes.len());
        for write in writes {
            versions.push(self.write(&mut *tx, write).await?);
        }
        tx.commit().await.map_err(classify::<DB>)?;
        Ok(versions)
    }

    /// One write inside a transaction: claims its idempotency key, checks
    /// the expected version and writes, all in the database.
    async fn write(&self, conn: &mut DB::Connection, write: Write) -> Result<u64, Error> {
        let now = now_millis();
        if let Some(idempotency_key) = &write.idempotency_key {
            let claimed = sqlx::query(CLAIM_IDEMPOTENCY)
                .bind(self.namespace.clone())
                .bind(idempotency_key.clone())
                .bind(now)
                .bind(now.saturating_sub(millis(IDEMPOTENCY_RETENTION)))
                .fetch_optional(&mut *conn)
                .await
                .map_err(classify::<DB>)?;
            if claimed.is_none() {
                let row = sqlx::query(APPLIED_VERSION)
                    .bind(self.namespace.clone())
                    .bind(idempotency_key.clone())
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(classify::<DB>)?;
                return version::<DB>(&row);
            }
        }
        let query = match write.expected_version {
            Some(expected) if expected > 0 => sqlx::query(UPDATE_IF_VERSION)
                .bind(self.namespace.clone())
                .bind(write.key.clone())
                .bind(write.value)
                .bind(write.expires_at)
                .bind(now)
                .bind(expected),
            unconditional_or_absent => sqlx::query(UPSERT)
                .bind(self.namespace.clone())
                .bind(write.key.clone())
                .bind(write.value)
                .bind(write.expires_at)
                .bind(now)
                .bind(unconditional_or_absent.is_none()),
        };
        let Some(row) = query
            .fetch_optional(&mut *conn)
            .await
            .map_err(classify::<DB>)?
        else {
            let found = self.live_version(conn, &write.key, now).await?;
            return Err(mismatch(write.key, write.expected_version, found));
        };
        let written = version::<DB>(&row)?;
        if let Some(idempotency_key) = write.idempotency_key {
            sqlx::query(RECORD_IDEMPOTENCY)
                .bind(self.namespace.clone())
                .bind(idempotency_key)
                .bind(i64::try_from(written).unwrap_or(i64::MAX))
                .execute(&mut *conn)
                .await
                .map_err(classify::<DB>)?;
        }
        Ok(written)
    }

    async fn live_version(
        &self,
        conn: &mut DB::Connection,
        key: &str,
        now: i64,
    ) -> Result<Option<u64>, Error> {
        let row = sqlx::query(SELECT_VERSION)
            .bind(self.namespace.clone())
            .bind(key.to_string())
            .bind(now)
            .fetch_optional(&mut *conn)
            .await
            .map_err(classify::<DB>)?;
        row.map(|row| version::<DB>(&row)).transpose()
    }

    async fn delete_one(&self, key: &str, expected_version: Option<u64>) -> Result<bool, Error> {
        self.check_open()?;
        let expected = expected_version.map(to_i64).transpose()?;
        let now = now_millis();
        let mut conn = self.pool.acquire().await.map_err(classify::<DB>)?;
        let deleted = sqlx::query(DELETE)
            .bind(self.namespace.clone())
            .bind(key.to_string())
            .bind(now)
            .bind(expected)
            .fetch_optional(&mut *conn)
            .await
            .map_err(classify::<DB>)?;
        if deleted.is_some() {
            return Ok(true);
        }
        if expected.is_none() {
            return Ok(false);
        }
        // The conditional delete matched nothing: either there is no key
        // (nothing to delete) or its version differs.
        match self.live_version(&mut *conn, key, now).await? {
            None => Ok(false),
            found => Err(mismatch(key.to_string(), expected, found)),
        }
    }

    async fn scan_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: ScanLimit,
    ) -> Result<Page, Error> {
        self.check_open()?;
        let max_items = limit.max_items.max(1);
        // One row more than the page holds tells whether more follow.
        let fetch = i64::try_from(max_items).unwrap_or(i64::MAX - 1) + 1;
        let mut conn = self.pool.acquire().await.map_err(classify::<DB>)?;
        let mut rows = sqlx::query(SCAN)
            .bind(self.namespace.clone())
            .bind(prefix.to_string())
            .bind(prefix_successor(prefix))
            .bind(after.map(str::to_string))
            .bind(now_millis())
            .bind(fetch)
            .fetch(&mut *conn);
        let mut page = Page::default();
        let mut bytes = 0usize;
        while let Some(row) = rows.try_next().await.map_err(classify::<DB>)? {
            let item = decode_item::<DB>(&row)?;
            let size = item.key.len() + item.value.len();
            let full = page.items.len() == max_items
                || (!page.items.is_empty() && bytes + size > limit.max_bytes);
            if full {
                page.next_after = page.items.last().map(|item| item.key.clone());
                break;
            }
            bytes += size;
            page.items.push(item);
        }
        Ok(page)
    }

    async fn import_all(&self, items: Vec<Item>) -> Result<(), Error> {
        self.check_open()?;
        let now = now_millis();
        let mut tx = self
            .pool
            .begin_with(DB::BEGIN_WRITE)
            .await
            .map_err(classify::<DB>)?;
        for item in items {
            let expires_at = item
                .expires_at
                .map(|at| millis(at.duration_since(UNIX_EPOCH).unwrap_or_default()));
            sqlx::query(IMPORT)
                .bind(self.namespace.clone())
                .bind(item.key)
                .bind(item.value.to_vec())
                .bind(to_i64(item.version)?)
                .bind(expires_at)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(classify::<DB>)?;
        }
        tx.commit().await.map_err(classify::<DB>)
    }

    async fn shut(&self) {
        self.sweeper.abort();
        self.readers.close();
        self.pool.close().await;
    }
}

impl<DB: Database> Drop for SqlKv<DB> {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

impl<DB: Dialect> fmt::Debug for SqlKv<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlKv")
            .field("store", &DB::NAME)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Implements [`KeyValue`] for the store of one database by delegating to
/// the generic methods above. A macro rather than a generic impl because
/// the generic one would repeat every bound of the inherent impl (Rust does
/// not carry such bounds over); for one concrete database they simply hold.
macro_rules! key_value_for {
    ($db:ty) => {
        impl KeyValue for SqlKv<$db> {
            fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Item>, Error>> {
                Box::pin(self.get_one(key))
            }

            fn put(&self, put: Put) -> BoxFuture<'_, Result<u64, Error>> {
                Box::pin(self.put_one(put))
            }

            fn delete<'a>(
                &'a self,
                key: &'a str,
                expected_version: Option<u64>,
            ) -> BoxFuture<'a, Result<bool, Error>> {
                Box::pin(self.delete_one(key, expected_version))
            }

            fn batch_get<'a>(
                &'a self,
                keys: &'a [String],
            ) -> BoxFuture<'a, Result<Vec<Option<Item>>, Error>> {
                Box::pin(self.get_many(keys))
            }

            fn batch_put(&self, puts: Vec<Put>) -> BoxFuture<'_, Result<Vec<u64>, Error>> {
                Box::pin(self.put_all(puts))
            }

            fn scan<'a>(
                &'a self,
                prefix: &'a str,
                after: Option<&'a str>,
                limit: ScanLimit,
            ) -> BoxFuture<'a, Result<Page, Error>> {
                Box::pin(self.scan_page(prefix, after, limit))
            }

            fn import(&self, items: Vec<Item>) -> BoxFuture<'_, Result<(), Error>> {
                Box::pin(self.import_all(items))
            }

            fn close(&self) -> BoxFuture<'_, ()> {
                Box::pin(self.shut())
            }
        }
    };
}

#[cfg(feature = "sqlite")]
key_value_for!(sqlx::Sqlite);
#[cfg(feature = "postgres")]
key_value_for!(sqlx::Postgres);

impl TryFrom<Put> for Write {
    type Error = Error;

    fn try_from(put: Put) -> Result<Self, Error> {
        let expires_at = put.ttl.map(|ttl| now_millis().saturating_add(millis(ttl)));
        Ok(Write {
            key: put.key,
            value: put.value.to_vec(),
            expires_at,
            expected_version: put.expected_version.map(to_i64).transpose()?,
            idempotency_key: put.idempotency_key,
        })
    }
}

/// Runs `open` within `timeout`. An `Unavailable` error, or the timeout,
/// names `target` (which must not hold a password): the operator learns
/// what could not be reached.
pub(super) async fn within<DB: Dialect, T>(
    timeout: Duration,
    target: &str,
    open: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(timeout, open).await {
        Ok(Err(Error::Unavailable { source, .. })) => Err(Error::unavailable(
            DB::NAME,
            format!("cannot reach {target}: {source}"),
        )),
        Ok(result) => result,
        Err(_) => Err(Error::unavailable(
            DB::NAME,
            format!("cannot reach {target} within {timeout:?}"),
        )),
    }
}

/// Turns a driver error into the crate's: what cannot be reached (or is
/// busy) is `Unavailable`, data the store refuses is `Invalid`.
pub(super) fn classify<DB: Dialect>(error: sqlx::Error) -> Error {
    match error {
        sqlx::Error::PoolClosed => Error::Closed,
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Error::unavailable(DB::NAME, error),
        sqlx::Error::InvalidArgument(_) | sqlx::Error::Encode(_) => {
            Error::Invalid(format!("{}: {error}", DB::NAME))
        }
        sqlx::Error::Database(db) => {
            let code = db.code().map(|code| code.into_owned()).unwrap_or_default();
            let constraint = matches!(
                db.kind(),
                ErrorKind::UniqueViolation
                    | ErrorKind::ForeignKeyViolation
                    | ErrorKind::NotNullViolation
                    | ErrorKind::CheckViolation
            );
            if constraint || DB::invalid(&code) {
                Error::Invalid(format!("{}: {}", DB::NAME, db.message()))
            } else if DB::retryable(&code) {
                Error::unavailable(DB::NAME, sqlx::Error::Database(db))
            } else {
                Error::internal(DB::NAME, sqlx::Error::Database(db))
            }
        }
        other => Error::internal(DB::NAME, other),
    }
}

fn decode_item<DB>(row: &DB::Row) -> Result<Item, Error>
where
    DB: Dialect,
    for<'q> i64: Decode<'q, DB> + Type<DB>,
    for<'q> String: Decode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Decode<'q, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    let raw: RawItem = (
        row.try_get(0).map_err(classify::<DB>)?,
        row.try_get(1).map_err(classify::<DB>)?,
        row.try_get(2).map_err(classify::<DB>)?,
        row.try_get(3).map_err(classify::<DB>)?,
    );
    let (key, value, version, expires_at) = raw;
    Ok(Item {
        key,
        value: Bytes::from(value),
        version: u64::try_from(version).unwrap_or(0),
        expires_at: expires_at
            .map(|at| UNIX_EPOCH + Duration::from_millis(u64::try_from(at).unwrap_or(0))),
    })
}

/// The first column of `row`, a version.
fn version<DB>(row: &DB::Row) -> Result<u64, Error>
where
    DB: Dialect,
    for<'q> i64: Decode<'q, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    let version: i64 = row.try_get(0).map_err(classify::<DB>)?;
    Ok(u64::try_from(version).unwrap_or(0))
}

fn mismatch(key: String, expected: Option<i64>, found: Option<u64>) -> Error {
    Error::VersionMismatch {
        key,
        expected: expected.and_then(|v| u64::try_from(v).ok()).unwrap_or(0),
        found,
    }
}

fn to_i64(version: u64) -> Result<i64, Error> {
    i64::try_from(version).map_err(|_| Error::Invalid(format!("version {version} is too large")))
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn now_millis() -> i64 {
    // A clock before 1970 reads as 1970: nothing then looks expired early.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

/// The smallest string greater than every string starting with `prefix`,
/// `None` when there is none (an empty prefix, or one of only `char::MAX`).
/// UTF-8 orders as its code points do, so this bound in byte order is the
/// next code point in place of the last one that has a next.
fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_successor;

    /// The sweeper task ends with its store, whether the store is closed
    /// or only dropped.
    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn the_sweeper_ends_with_its_store() {
        use std::time::Duration;

        use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

        use super::SqlKv;

        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("kv.db"))
            .create_if_missing(true);
        for close in [true, false] {
            let pool = SqlitePoolOptions::new()
                .connect_with(options.clone())
                .await
                .unwrap();
            let store = SqlKv::start(pool, "sweeper").await.unwrap();
            let sweeper = store.sweeper.abort_handle();
            assert!(!sweeper.is_finished());
            if close {
                store.shut().await;
            }
            drop(store);
            tokio::time::timeout(Duration::from_secs(5), async {
                while !sweeper.is_finished() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("the sweeper outlived its store (closed: {close})"));
        }
    }

    #[test]
    fn prefix_successor_bounds_the_prefix_in_byte_order() {
        assert_eq!(prefix_successor(""), None);
        assert_eq!(prefix_successor("a/"), Some("a0".to_string()));
        assert_eq!(prefix_successor("a%"), Some("a&".to_string()));
        assert_eq!(prefix_successor("a\u{d7ff}"), Some("a\u{e000}".to_string()));
        assert_eq!(prefix_successor("a\u{10ffff}"), Some("b".to_string()));
        assert_eq!(prefix_successor("\u{10ffff}"), None);
        let upper = prefix_successor("k\u{7f}").unwrap();
        assert!("k\u{7f}\u{80}".as_bytes() < upper.as_bytes());
        assert!("k\u{7f}\u{10ffff}".as_bytes() < upper.as_bytes());
    }
}
