//! The KeyValue conformance suite: one set of cases, each run against
//! SQLite (a file in a temporary directory) and PostgreSQL (at
//! `PRISM_TEST_POSTGRES_URL`, by default the local server's `test`
//! database with trust auth). Every case uses a namespace of its own, so
//! runs never collide and nothing another run owns is touched.
//!
//! A PostgreSQL case fails, never skips, when the server is not there.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prism_datastore::kv::stored_rows;
use prism_datastore::{Error, KeyValue, KvParams, KvStore, Put, ScanLimit, open_kv};
use tempfile::TempDir;

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// How long any one case may take before it fails.
const CASE_DEADLINE: Duration = Duration::from_secs(60);

/// How long a case waits for an expiry or a sweep.
const EXPIRY_DEADLINE: Duration = Duration::from_secs(15);

/// A store opened for one case, with what opened it.
struct Store {
    kv: Arc<dyn KeyValue>,
    params: KvParams,
    /// Keeps an SQLite file alive for the case.
    _dir: Option<TempDir>,
}

/// A namespace no other case or run uses.
fn namespace(case: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{case}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn params(namespace: String, store: KvStore) -> KvParams {
    KvParams {
        namespace,
        store,
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
    }
}

fn postgres_url() -> String {
    std::env::var("PRISM_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_string())
}

async fn sqlite(case: &str) -> Store {
    let dir = tempfile::tempdir().unwrap();
    let params = params(
        namespace(case),
        KvStore::Sqlite {
            path: dir.path().join("kv.db"),
        },
    );
    let kv = open_kv(&params).await.unwrap();
    Store {
        kv,
        params,
        _dir: Some(dir),
    }
}

async fn postgres(case: &str) -> Store {
    let params = params(
        namespace(case),
        KvStore::Postgres {
            url: postgres_url(),
        },
    );
    match open_kv(&params).await {
        Ok(kv) => Store {
            kv,
            params,
            _dir: None,
        },
        Err(error @ Error::Unavailable { .. }) => panic!(
            "PostgreSQL is not reachable ({error}): start it (trust auth, database `test`), \
             or set PRISM_TEST_POSTGRES_URL"
        ),
        Err(error) => panic!("opening PostgreSQL failed: {error}"),
    }
}

/// Runs `case` within [`CASE_DEADLINE`].
async fn bounded(case: impl Future<Output = ()>) {
    tokio::time::timeout(CASE_DEADLINE, case)
        .await
        .expect("the case did not finish in time");
}

/// Waits, within `deadline`, until `check` holds.
async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while !check().await {
        assert!(
            Instant::now() < until,
            "{what} did not happen within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn put(key: &str, value: &str) -> Put {
    Put {
        key: key.to_string(),
        value: Bytes::copy_from_slice(value.as_bytes()),
        ..Put::default()
    }
}

fn cas(key: &str, value: &str, expected: u64) -> Put {
    Put {
        expected_version: Some(expected),
        ..put(key, value)
    }
}

fn assert_mismatch(result: Result<impl std::fmt::Debug, Error>, want_found: Option<u64>) {
    match result {
        Err(Error::VersionMismatch { found, .. }) => assert_eq!(found, want_found),
        other => panic!("expected a version mismatch, got {other:?}"),
    }
}

async fn value_of(kv: &Arc<dyn KeyValue>, key: &str) -> Option<(Bytes, u64)> {
    kv.get(key)
        .await
        .unwrap()
        .map(|item| (item.value, item.version))
}

// The cases.

async fn get_missing(kv: Arc<dyn KeyValue>, _: KvParams) {
    assert_eq!(kv.get("absent").await.unwrap(), None);
    assert_eq!(kv.batch_get(&[]).await.unwrap(), vec![]);
}

async fn put_get_round_trip(kv: Arc<dyn KeyValue>, _: KvParams) {
    assert_eq!(kv.put(put("k", "one")).await.unwrap(), 1);
    let item = kv.get("k").await.unwrap().unwrap();
    assert_eq!(
        (
            item.key.as_str(),
            &item.value[..],
            item.version,
            item.expires_at
        ),
        ("k", &b"one"[..], 1, None)
    );
    assert_eq!(kv.put(put("k", "two")).await.unwrap(), 2);
    assert_eq!(value_of(&kv, "k").await, Some((Bytes::from("two"), 2)));
    // Bytes that are not UTF-8 come back as they went in.
    let binary = Put {
        value: Bytes::from_static(&[0, 255, 1, 254]),
        ..put("bin", "")
    };
    kv.put(binary).await.unwrap();
    assert_eq!(
        value_of(&kv, "bin").await,
        Some((Bytes::from_static(&[0, 255, 1, 254]), 1))
    );
}

async fn delete(kv: Arc<dyn KeyValue>, _: KvParams) {
    kv.put(put("k", "v")).await.unwrap();
    kv.put(put("k", "v")).await.unwrap();
    assert!(kv.delete("k", None).await.unwrap());
    assert_eq!(kv.get("k").await.unwrap(), None);
    assert!(!kv.delete("k", None).await.unwrap());
    // A deleted key starts again at 1.
    assert_eq!(kv.put(put("k", "again")).await.unwrap(), 1);
}

async fn compare_and_set(kv: Arc<dyn KeyValue>, _: KvParams) {
    assert_eq!(kv.put(cas("k", "first", 0)).await.unwrap(), 1);
    assert_mismatch(kv.put(cas("k", "second", 0)).await, Some(1));
    assert_mismatch(kv.put(cas("k", "second", 5)).await, Some(1));
    assert_eq!(value_of(&kv, "k").await, Some((Bytes::from("first"), 1)));
    assert_eq!(kv.put(cas("k", "second", 1)).await.unwrap(), 2);
    assert_eq!(value_of(&kv, "k").await, Some((Bytes::from("second"), 2)));
    assert_mismatch(kv.put(cas("absent", "x", 3)).await, None);
    assert_eq!(kv.get("absent").await.unwrap(), None);

    assert_mismatch(kv.delete("k", Some(1)).await, Some(2));
    assert_mismatch(kv.delete("k", Some(0)).await, Some(2));
    assert_eq!(value_of(&kv, "k").await, Some((Bytes::from("second"), 2)));
    assert!(kv.delete("k", Some(2)).await.unwrap());
    assert!(!kv.delete("k", Some(2)).await.unwrap());
}

async fn idempotent_retry(kv: Arc<dyn KeyValue>, _: KvParams) {
    let first = Put {
        idempotency_key: Some("request-1".into()),
        ..put("k", "first")
    };
    let retry = Put {
        idempotency_key: Some("request-1".into()),
        ..put("k", "a retry that differs")
    };
    assert_eq!(kv.put(first).await.unwrap(), 1);
    assert_eq!(kv.put(retry.clone()).await.unwrap(), 1);
    assert_eq!(kv.batch_put(vec![retry]).await.unwrap(), vec![1]);
    assert_eq!(value_of(&kv, "k").await, Some((Bytes::from("first"), 1)));

    // A write that failed its condition was not applied: its key is free.
    let failed = Put {
        idempotency_key: Some("request-2".into()),
        ..cas("k", "second", 7)
    };
    assert_mismatch(kv.put(failed).await, Some(1));
    let second = Put {
        idempotency_key: Some("request-2".into()),
        ..cas("k", "second", 1)
    };
    assert_eq!(kv.put(second).await.unwrap(), 2);
    assert_eq!(value_of(&kv, "k").await, Some((Bytes::from("second"), 2)));
}

async fn ttl_expiry_and_sweep(kv: Arc<dyn KeyValue>, params: KvParams) {
    let short = Put {
        ttl: Some(Duration::from_secs(1)),
        ..put("short", "soon gone")
    };
    assert_eq!(kv.put(short.clone()).await.unwrap(), 1);
    assert_eq!(kv.put(short.clone()).await.unwrap(), 2);
    kv.put(put("durable", "stays")).await.unwrap();
    let item = kv.get("short").await.unwrap().unwrap();
    assert!(item.expires_at.unwrap() > SystemTime::now());

    eventually(EXPIRY_DEADLINE, "expiry of `short`", || async {
        kv.get("short").await.unwrap().is_none()
    })
    .await;
    let keys = ["short".to_string(), "durable".to_string()];
    let items = kv.batch_get(&keys).await.unwrap();
    assert!(items[0].is_none());
    assert_eq!(items[1].as_ref().unwrap().key, "durable");
    let page = kv
        .scan(
            "",
            None,
            ScanLimit {
                max_items: 10,
                max_bytes: 1 << 20,
            },
        )
        .await
        .unwrap();
    let keys: Vec<_> = page.items.iter().map(|item| item.key.as_str()).collect();
    assert_eq!(keys, ["durable"]);

    // The sweeper removes the expired row itself, not only hides it.
    eventually(EXPIRY_DEADLINE, "the sweep of `short`", || async {
        stored_rows(&params).await.unwrap() == 1
    })
    .await;
    // An expired key written again starts at 1.
    assert_eq!(kv.put(short).await.unwrap(), 1);
    assert_eq!(stored_rows(&params).await.unwrap(), 2);
}

async fn expired_key_restarts_before_the_sweep(kv: Arc<dyn KeyValue>, _: KvParams) {
    let short = Put {
        ttl: Some(Duration::from_millis(200)),
        ..put("short", "v")
    };
    kv.put(short.clone()).await.unwrap();
    assert_eq!(kv.put(short.clone()).await.unwrap(), 2);
    eventually(EXPIRY_DEADLINE, "expiry of `short`", || async {
        kv.get("short").await.unwrap().is_none()
    })
    .await;
    // Whether or not the sweeper has run, the key is new again: CAS on
    // absence succeeds and the version is 1.
    assert_eq!(kv.put(cas("short", "new", 0)).await.unwrap(), 1);
}

async fn batch_put_is_atomic(kv: Arc<dyn KeyValue>, _: KvParams) {
    kv.put(put("a", "a1")).await.unwrap();
    let failing = vec![put("b", "b1"), cas("a", "a2", 5), put("c", "c1")];
    assert_mismatch(kv.batch_put(failing).await, Some(1));
    assert_eq!(kv.get("b").await.unwrap(), None);
    assert_eq!(kv.get("c").await.unwrap(), None);
    assert_eq!(value_of(&kv, "a").await, Some((Bytes::from("a1"), 1)));

    let passing = vec![put("b", "b1"), cas("a", "a2", 1), put("b", "b2")];
    assert_eq!(kv.batch_put(passing).await.unwrap(), vec![1, 2, 2]);
    assert_eq!(value_of(&kv, "b").await, Some((Bytes::from("b2"), 2)));
}

async fn batch_get_keeps_order(kv: Arc<dyn KeyValue>, _: KvParams) {
    kv.put(put("a", "va")).await.unwrap();
    kv.put(put("c", "vc")).await.unwrap();
    let keys = ["c", "missing", "a", "c"].map(String::from);
    let items = kv.batch_get(&keys).await.unwrap();
    let got: Vec<_> = items
        .iter()
        .map(|item| item.as_ref().map(|item| &item.value[..]))
        .collect();
    assert_eq!(
        got,
        [Some(&b"vc"[..]), None, Some(&b"va"[..]), Some(&b"vc"[..])]
    );
}

/// Every key under `prefix`, page by page; the sizes of the pages.
async fn scan_all(
    kv: &Arc<dyn KeyValue>,
    prefix: &str,
    limit: ScanLimit,
) -> (Vec<String>, Vec<usize>) {
    let mut keys = Vec::new();
    let mut sizes = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = kv.scan(prefix, after.as_deref(), limit).await.unwrap();
        sizes.push(page.items.len());
        keys.extend(page.items.into_iter().map(|item| item.key));
        match page.next_after {
            Some(next) => after = Some(next),
            None => return (keys, sizes),
        }
        assert!(sizes.len() < 1000, "the scan does not end");
    }
}

async fn scan_pages(kv: Arc<dyn KeyValue>, params: KvParams) {
    let want: Vec<String> = (0..25).map(|i| format!("s/{i:03}")).collect();
    // Written out of order; each is 5 bytes of key and 10 of value.
    for key in want.iter().rev() {
        kv.put(put(key, "0123456789")).await.unwrap();
    }
    // Neighbours outside the prefix, before and after it in byte order.
    for key in ["s.", "s0", "r/1", "s", "t/1"] {
        kv.put(put(key, "outside")).await.unwrap();
    }
    // The same prefix in another namespace of the same database.
    let other = KvParams {
        namespace: format!("{}-other", params.namespace),
        ..params.clone()
    };
    let neighbour = open_kv(&other).await.unwrap();
    neighbour.put(put("s/100", "not mine")).await.unwrap();
    neighbour.close().await;

    let by_items = ScanLimit {
        max_items: 7,
        max_bytes: 1 << 20,
    };
    assert_eq!(
        scan_all(&kv, "s/", by_items).await,
        (want.clone(), vec![7, 7, 7, 4])
    );

    // Two items make 30 bytes; a third would pass 40.
    let by_bytes = ScanLimit {
        max_items: 100,
        max_bytes: 40,
    };
    let (keys, sizes) = scan_all(&kv, "s/", by_bytes).await;
    assert_eq!(keys, want);
    assert_eq!(sizes, [vec![2; 12], vec![1]].concat());

    // A page holds at least one item, however small its bounds.
    let tiny = ScanLimit {
        max_items: 0,
        max_bytes: 0,
    };
    let (keys, sizes) = scan_all(&kv, "s/", tiny).await;
    assert_eq!(keys, want);
    assert_eq!(sizes, vec![1; 25]);

    // `after` is exclusive, and may lie outside the prefix.
    let page = kv.scan("s/", Some("s/022"), by_items).await.unwrap();
    let keys: Vec<_> = page.items.iter().map(|item| item.key.as_str()).collect();
    assert_eq!((keys, page.next_after), (vec!["s/023", "s/024"], None));
    let page = kv
        .scan(
            "s/",
            Some("a"),
            ScanLimit {
                max_items: 1,
                max_bytes: 100,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items[0].key, "s/000");
    assert_eq!(page.next_after.as_deref(), Some("s/000"));
}

async fn scan_takes_wildcards_literally(kv: Arc<dyn KeyValue>, _: KvParams) {
    let inside = ["p%_", "p%_1", "p%_2", "p%_\u{e9}", "p%_\u{10ffff}"];
    let outside = ["p%x", "pa_1", "p%", "p\\%_", "pz", "p%`"];
    for key in inside.iter().chain(&outside) {
        kv.put(put(key, "v")).await.unwrap();
    }
    let limit = ScanLimit {
        max_items: 2,
        max_bytes: 1 << 20,
    };
    let (keys, _) = scan_all(&kv, "p%_", limit).await;
    assert_eq!(keys, inside);
    let (keys, _) = scan_all(&kv, "p_", limit).await;
    assert_eq!(keys, Vec::<String>::new());
}

async fn concurrent_puts_keep_every_version(kv: Arc<dyn KeyValue>, _: KvParams) {
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let kv = Arc::clone(&kv);
            tokio::spawn(async move { kv.put(put("hot", &format!("writer {i}"))).await })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.unwrap().unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=20).collect::<Vec<u64>>());
    assert_eq!(kv.get("hot").await.unwrap().unwrap().version, 20);
}

async fn concurrent_retries_apply_once(kv: Arc<dyn KeyValue>, _: KvParams) {
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let kv = Arc::clone(&kv);
            let retry = Put {
                idempotency_key: Some("request".into()),
                ..put("k", &format!("attempt {i}"))
            };
            tokio::spawn(async move { kv.put(retry).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), 1);
    }
    assert_eq!(kv.get("k").await.unwrap().unwrap().version, 1);
}

async fn closed_store_answers_closed(kv: Arc<dyn KeyValue>, _: KvParams) {
    kv.put(put("k", "v")).await.unwrap();
    kv.close().await;
    assert!(matches!(kv.get("k").await, Err(Error::Closed)));
    assert!(matches!(kv.put(put("k", "v")).await, Err(Error::Closed)));
    assert!(matches!(
        kv.scan(
            "",
            None,
            ScanLimit {
                max_items: 1,
                max_bytes: 1
            }
        )
        .await,
        Err(Error::Closed)
    ));
}

/// Gets cancelled part-way (each closes the connection it read through)
/// and more Gets at once than the store keeps connections for leave every
/// later read right.
async fn cancelled_and_crowded_reads_stay_right(kv: Arc<dyn KeyValue>, _: KvParams) {
    kv.put(put("k", "v")).await.expect("put");
    for _ in 0..20 {
        // Polled once, then dropped: cancelled before or after its query went.
        let _ = tokio::time::timeout(Duration::ZERO, kv.get("k")).await;
    }
    let reads: Vec<_> = (0..64)
        .map(|_| {
            let kv = kv.clone();
            tokio::spawn(async move { kv.get("k").await })
        })
        .collect();
    for read in reads {
        let item = read.await.expect("join").expect("get").expect("k is there");
        assert_eq!((item.value, item.version), (Bytes::from("v"), 1));
    }
}

/// A moved namespace's items keep their versions and expiry, and never
/// replace a newer version of a key.
async fn import_keeps_versions_and_newer_writes(kv: Arc<dyn KeyValue>, _: KvParams) {
    for _ in 0..3 {
        kv.put(put("newer", "here")).await.expect("put");
    }
    let at = std::time::SystemTime::now() + Duration::from_secs(3600);
    let item = |key: &str, value: &str, version: u64, expires_at| prism_datastore::Item {
        key: key.into(),
        value: Bytes::from(value.to_string()),
        version,
        expires_at,
    };
    kv.import(vec![
        item("moved", "there", 7, Some(at)),
        item("newer", "stale", 2, None),
    ])
    .await
    .expect("import");
    let moved = kv.get("moved").await.expect("get").expect("moved is there");
    assert_eq!((moved.value.as_ref(), moved.version), (&b"there"[..], 7));
    let expires = moved.expires_at.expect("its expiry is kept");
    let drift = expires.duration_since(at).unwrap_or_else(|e| e.duration());
    assert!(drift < Duration::from_millis(2), "{drift:?}");
    assert_eq!(value_of(&kv, "newer").await, Some((Bytes::from("here"), 3)));
    // The next write of a moved key goes on from its version.
    assert_eq!(kv.put(put("moved", "again")).await.expect("put"), 8);
}

/// Runs each case against each store, as `sqlite::case` and
/// `postgres::case`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let store = super::sqlite(stringify!($case)).await;
                    super::bounded(super::$case(store.kv.clone(), store.params.clone())).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let store = super::postgres(stringify!($case)).await;
                    super::bounded(super::$case(store.kv.clone(), store.params.clone())).await;
                }
            )*
        }
    };
}

conformance!(
    get_missing,
    put_get_round_trip,
    delete,
    compare_and_set,
    idempotent_retry,
    ttl_expiry_and_sweep,
    expired_key_restarts_before_the_sweep,
    batch_put_is_atomic,
    batch_get_keeps_order,
    scan_pages,
    scan_takes_wildcards_literally,
    concurrent_puts_keep_every_version,
    concurrent_retries_apply_once,
    closed_store_answers_closed,
    import_keeps_versions_and_newer_writes,
    cancelled_and_crowded_reads_stay_right,
);

// Opening what is not there.

/// Opens `params` and expects `Unavailable` within its connect timeout
/// (and a little scheduling slack); the error's text.
async fn open_fails_unavailable(params: &KvParams) -> String {
    let started = Instant::now();
    let result = tokio::time::timeout(params.connect_timeout * 3, open_kv(params))
        .await
        .expect("open_kv hung past its connect timeout");
    let elapsed = started.elapsed();
    let error = match result {
        Err(error @ Error::Unavailable { .. }) => error,
        other => panic!("expected Unavailable, got {other:?}"),
    };
    assert!(
        elapsed < params.connect_timeout + Duration::from_millis(500),
        "failing took {elapsed:?}"
    );
    error.to_string()
}

/// Opens PostgreSQL at `port` of 127.0.0.1 with a password in the URL and
/// expects `Unavailable` naming the address, never the password.
async fn postgres_at_is_unavailable(port: u16, connect_timeout: Duration) {
    let mut params = params(
        namespace("unreachable"),
        KvStore::Postgres {
            url: format!("postgres://prism:hunter2@127.0.0.1:{port}/test"),
        },
    );
    params.connect_timeout = connect_timeout;
    let message = open_fails_unavailable(&params).await;
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[tokio::test]
async fn postgres_on_a_dead_port_is_unavailable() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    postgres_at_is_unavailable(port, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn postgres_that_never_answers_is_unavailable_in_time() {
    // A listener that takes connections into its backlog and never says a
    // word: without a deadline the startup handshake would wait forever.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    postgres_at_is_unavailable(port, Duration::from_secs(1)).await;
    drop(silent);
}

#[tokio::test]
async fn sqlite_in_a_missing_directory_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("no such directory").join("kv.db");
    let params = params(namespace("missing"), KvStore::Sqlite { path });
    let message = open_fails_unavailable(&params).await;
    assert!(message.contains("no such directory"), "{message}");
}
