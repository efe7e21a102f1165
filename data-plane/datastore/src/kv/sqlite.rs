//! The SQLite store: one database file in WAL mode, created if missing.
//!
//! SQLite allows one writer at a time. Every write transaction begins with
//! `BEGIN IMMEDIATE`, taking the write lock before it reads, and each
//! connection waits up to [`BUSY_TIMEOUT`] for it: concurrent writers queue
//! instead of failing with `SQLITE_BUSY`, while readers go on in parallel.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Sqlite;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::sql::{Dialect, SqlKv, classify, within};
use super::{KeyValue, KvParams};
use crate::Error;

/// How long a statement waits for another connection's write lock before
/// the store answers `Unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl Dialect for Sqlite {
    // TEXT compares with the BINARY collation: keys sort in byte order, as
    // they do in PostgreSQL under `COLLATE "C"`.
    const KEY_TYPE: &'static str = "TEXT";
    const BYTES_TYPE: &'static str = "BLOB";
    const INTEGER_TYPE: &'static str = "INTEGER";
    const SCHEMA_LOCK: Option<&'static str> = None;

    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";

    fn retryable(code: &str) -> bool {
        // The primary result code is the extended code's low byte: BUSY,
        // LOCKED, IOERR, FULL, CANTOPEN.
        primary(code).is_some_and(|code| matches!(code, 5 | 6 | 10 | 13 | 14))
    }

    fn invalid(code: &str) -> bool {
        // TOOBIG, CONSTRAINT, MISMATCH.
        primary(code).is_some_and(|code| (18..=20).contains(&code))
    }
}

fn primary(code: &str) -> Option<i32> {
    code.parse::<i32>().ok().map(|code| code & 0xff)
}

/// Opens the store in the file at `path`.
pub(super) async fn open(params: &KvParams, path: &Path) -> Result<Arc<dyn KeyValue>, Error> {
    let target = format!("database file {}", path.display());
    within::<Sqlite, _>(params.connect_timeout, &target, async {
        let pool = connect(params, path, params.pool_size).await?;
        Ok(Arc::new(SqlKv::start(pool, &params.namespace).await?) as Arc<dyn KeyValue>)
    })
    .await
}

/// The rows stored for the namespace of `params`, expired or not.
pub(super) async fn stored_rows(params: &KvParams, path: &Path) -> Result<u64, Error> {
    let pool = connect(params, path, 1).await?;
    let count = SqlKv::count_rows(&pool, &params.namespace).await;
    pool.close().await;
    count
}

async fn connect(params: &KvParams, path: &Path, size: u32) -> Result<SqlitePool, Error> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // In WAL mode NORMAL loses no data on a crash of the process, only
        // the last commits on a power loss, and spares an fsync per commit.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT);
    SqlitePoolOptions::new()
        .max_connections(size.max(1))
        // sqlx pings an idle connection before it hands it out, by default:
        // for SQLite a round trip to the connection's worker thread that
        // checks only that the thread lives, and doubles the thread
        // hand-offs of a write (the data bench's profile: most of its time
        // is the kernel switching threads). Gets do not use the pool at
        // all (`Readers` in `sql.rs`).
        .test_before_acquire(false)
        .acquire_timeout(params.connect_timeout)
        .connect_with(options)
        .await
        .map_err(classify::<Sqlite>)
}
