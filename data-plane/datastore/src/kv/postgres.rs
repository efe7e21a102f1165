//! The PostgreSQL store. Keys are `TEXT COLLATE "C"`, so they compare and
//! sort in byte order, as SQLite's do: a scan pages the same way on both.
//!
//! Writes run at READ COMMITTED: each one is a single statement that locks
//! its row (an upsert or an `UPDATE … WHERE version = …`), so concurrent
//! writers of a key wait for each other and every increment is kept.

use std::str::FromStr;
use std::sync::Arc;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Postgres};

use super::sql::{Dialect, SqlKv, classify, within};
use super::{KeyValue, KvParams};
use crate::Error;

impl Dialect for Postgres {
    // Byte order, as SQLite's BINARY collation, whatever the database's
    // locale.
    const KEY_TYPE: &'static str = "TEXT COLLATE \"C\"";
    const BYTES_TYPE: &'static str = "BYTEA";
    const INTEGER_TYPE: &'static str = "BIGINT";
    // Two stores opened at once would race on `CREATE … IF NOT EXISTS`
    // (both find the table missing, one fails on the catalog's unique
    // index): a transaction-scoped advisory lock makes them take turns.
    const SCHEMA_LOCK: Option<&'static str> = Some("SELECT pg_advisory_xact_lock(7239140511)");

    const BEGIN_WRITE: &'static str = "BEGIN";

    fn retryable(code: &str) -> bool {
        // Connection exceptions (08), a refused login (28) or database
        // (3D), insufficient resources (53), operator intervention such as
        // a shutdown (57), serialization failures and deadlocks (40).
        ["08", "28", "3D", "53", "57", "40"]
            .iter()
            .any(|class| code.starts_with(class))
    }

    fn invalid(code: &str) -> bool {
        // Data exceptions (22): a NUL byte in a key, a value too long.
        code.starts_with("22")
    }
}

/// Opens the store at `url`.
pub(super) async fn open(params: &KvParams, url: &str) -> Result<Arc<dyn KeyValue>, Error> {
    let options = options(url)?;
    let target = describe(&options);
    within::<Postgres, _>(params.connect_timeout, &target, async {
        let pool = connect(params, options, params.pool_size).await?;
        Ok(Arc::new(SqlKv::start(pool, &params.namespace).await?) as Arc<dyn KeyValue>)
    })
    .await
}

/// The rows stored for the namespace of `params`, expired or not.
pub(super) async fn stored_rows(params: &KvParams, url: &str) -> Result<u64, Error> {
    let options = options(url)?;
    let target = describe(&options);
    within::<Postgres, _>(params.connect_timeout, &target, async {
        let pool = connect(params, options, 1).await?;
        let count = SqlKv::count_rows(&pool, &params.namespace).await;
        pool.close().await;
        count
    })
    .await
}

fn options(url: &str) -> Result<PgConnectOptions, Error> {
    // The parse error names the part that is wrong, never the URL, which
    // may carry a password.
    PgConnectOptions::from_str(url)
        .map_err(|error| Error::Invalid(format!("postgres: a bad URL: {error}")))
}

/// Where `options` connect, without the user or password.
fn describe(options: &PgConnectOptions) -> String {
    format!(
        "{}:{} (database {})",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("of the user's name")
    )
}

async fn connect(params: &KvParams, options: PgConnectOptions, size: u32) -> Result<PgPool, Error> {
    // One connection made directly first: a refused connection or a failed
    // login answers at once with its cause, where the pool would retry
    // until its acquire timeout and report only that it timed out.
    let probe = options.connect().await.map_err(classify::<Postgres>)?;
    probe.close().await.map_err(classify::<Postgres>)?;
    PgPoolOptions::new()
        .max_connections(size.max(1))
        .acquire_timeout(params.connect_timeout)
        .connect_with(options.application_name("prism"))
        .await
        .map_err(classify::<Postgres>)
}
