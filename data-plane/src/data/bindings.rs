//! What a namespace's DataBindings compile to: a KeyValue store and a PubSub
//! bus, each opened (pool connected, schema made) before the runtime that
//! holds them is stored, so the first call finds them ready.
//!
//! An apply reopens only what changed: a binding whose store parameters
//! (driver, path or connection string, pool size, timeouts) are those of the
//! binding it replaces keeps that one's open store, even when its other
//! settings (limits, TTL, callers) changed. A store no binding uses any more
//! drains (calls in flight finish, up to [`DRAIN_TIMEOUT`]) and closes once
//! the runtime that replaced it is stored.
//!
//! A KeyValue binding with `move_items` that replaces one of another store
//! moves the namespace: the old binding is sealed ([`Seal`]: its writes in
//! flight finish, new ones answer UNAVAILABLE, retry), its items are copied
//! into the new store, and only then is the runtime that serves the new
//! store stored. A write acknowledged before the seal is in the copy; one
//! refused by it is retried by its client against the new store. Should the
//! apply fail after all, [`Bindings::abandon`] unseals the old binding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::join_all;
use prism_datastore::{
    BusKind, BusParams, KeyValue, KvParams, KvStore, PubSub, ScanLimit, open_bus, open_kv,
};
use prism_proto::defaults::{self, binding as default};
use prism_proto::pb::config::v1::{DataBinding, data_binding, secret};
use prism_proto::{Kind, Resource, ResourceKey, Snapshot};
use tokio::sync::Notify;
use tracing::{info, warn};

/// How long a store no binding uses any more waits for the calls that still
/// hold it before it is closed.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Items copied in one step of a move.
const MOVE_PAGE: ScanLimit = ScanLimit {
    max_items: 1000,
    max_bytes: 4 * 1024 * 1024,
};

/// Every namespace's bindings.
#[derive(Debug, Default)]
pub(crate) struct Bindings {
    namespaces: HashMap<String, Namespace>,
    /// The seals of the bindings whose namespaces these bindings moved to
    /// another store, for [`Bindings::abandon`].
    moved_from: Vec<Arc<Seal>>,
}

/// One namespace's bindings, at most one of each API.
#[derive(Clone, Debug, Default)]
struct Namespace {
    kv: Option<Arc<Binding<dyn KeyValue>>>,
    bus: Option<Arc<Binding<dyn PubSub>>>,
}

/// One opened binding: its store or bus and the settings calls through it
/// obey.
#[derive(Debug)]
pub(crate) struct Binding<T: ?Sized> {
    /// `namespace/name`.
    pub name: String,
    pub settings: Settings,
    params: Params,
    pub store: Arc<T>,
    /// Admits the writes to `store`: shared by every binding of it.
    pub seal: Arc<Seal>,
}

/// Admits writes to a KeyValue store until its namespace moves away.
#[derive(Debug, Default)]
pub(crate) struct Seal {
    sealed: AtomicBool,
    writing: AtomicUsize,
    idle: Notify,
}

/// A write admitted by a [`Seal`], until it is dropped.
#[derive(Debug)]
pub(crate) struct Writing<'a>(&'a Seal);

/// What a call through a binding obeys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    pub max_value_bytes: usize,
    /// A put's TTL when it names none.
    pub default_ttl: Option<Duration>,
    /// Who may call it; `None` lets every caller in.
    pub allow: Option<Allow>,
    /// Copy the items of the store this binding replaces.
    pub move_items: bool,
}

/// Who may call a binding that names its callers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Allow {
    /// Namespaces besides its own whose callers may call it; `None` for any
    /// (no list, or `*`).
    pub namespaces: Option<Vec<String>>,
    /// Identities (or prefixes, ending in `*`) of which a caller must
    /// present one; none needed when empty.
    pub identities: Vec<String>,
}

/// What opening a store depends on: equal params share one open store.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Params {
    Kv(KvParams),
    Bus(BusParams),
}

/// A binding that could not be opened: the apply is refused with this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DataBinding {binding}: {field}: {reason}")]
pub(crate) struct OpenError {
    pub binding: String,
    pub field: &'static str,
    pub reason: String,
}

impl Bindings {
    /// The KeyValue binding of `namespace`.
    pub(crate) fn kv(&self, namespace: &str) -> Option<&Arc<Binding<dyn KeyValue>>> {
        self.namespaces.get(namespace)?.kv.as_ref()
    }

    /// The PubSub binding of `namespace`.
    pub(crate) fn bus(&self, namespace: &str) -> Option<&Arc<Binding<dyn PubSub>>> {
        self.namespaces.get(namespace)?.bus.as_ref()
    }

    /// The bindings of `snapshot`, keeping every open store of `previous`
    /// whose params are unchanged and opening the others, all at once. The
    /// first that cannot be opened refuses the whole apply; what was opened
    /// for it is dropped, and `previous` is untouched.
    ///
    /// `data_dir` is where relative SQLite paths are taken from.
    pub(crate) async fn open(
        snapshot: &Snapshot,
        previous: &Bindings,
        data_dir: Option<&Path>,
    ) -> Result<Bindings, OpenError> {
        let mut bindings = Bindings::default();
        let mut opening = Vec::new();
        // The KeyValue bindings whose namespaces move to another store.
        let mut moves = Vec::new();
        for entry in snapshot.of_kind(Kind::DataBinding) {
            let Resource::DataBinding(spec) = &entry.resource else {
                continue;
            };
            let namespace = entry.resource.namespace();
            let (params, settings) = compile(snapshot, spec, namespace, data_dir)?;
            let old = previous.namespaces.get(namespace);
            let slot = bindings
                .namespaces
                .entry(namespace.to_string())
                .or_default();
            match &params {
                Params::Kv(_) => {
                    let old = old.and_then(|o| o.kv.as_ref());
                    match old.filter(|b| b.params == params) {
                        Some(b) => slot.kv = Some(b.with(&spec.name, settings)),
                        None => {
                            if let Some(old) = old.filter(|_| settings.move_items) {
                                moves.push(Arc::clone(old));
                            }
                            opening.push(open_one(spec.name.clone(), settings, params));
                        }
                    }
                }
                Params::Bus(_) => match old
                    .and_then(|o| o.bus.as_ref())
                    .filter(|b| b.params == params)
                {
                    Some(b) => slot.bus = Some(b.with(&spec.name, settings)),
                    None => opening.push(open_one(spec.name.clone(), settings, params)),
                },
            }
        }
        for opened in join_all(opening).await {
            let (namespace, opened) = opened?;
            let slot = bindings.namespaces.entry(namespace).or_default();
            match opened {
                Opened::Kv(binding) => slot.kv = Some(binding),
                Opened::Bus(binding) => slot.bus = Some(binding),
            }
        }
        for old in moves {
            let Some(new) = bindings.kv(namespace_of(&old.name)).map(Arc::clone) else {
                continue;
            };
            bindings.moved_from.push(Arc::clone(&old.seal));
            if let Err(error) = move_items(&old, &new).await {
                bindings.abandon();
                return Err(error);
            }
        }
        Ok(bindings)
    }

    /// Unseals the bindings these bindings moved namespaces away from: the
    /// apply that opened them failed, and the old bindings go on serving.
    pub(crate) fn abandon(&self) {
        for seal in &self.moved_from {
            seal.sealed.store(false, Ordering::SeqCst);
        }
    }

    /// Drains and closes every store of `self` that `next` does not use:
    /// called once `next` is the one stored.
    pub(crate) fn retire(&self, next: &Bindings) {
        for (namespace, old) in &self.namespaces {
            let new = next.namespaces.get(namespace);
            retire(old.kv.as_ref(), new.and_then(|n| n.kv.as_ref()), |s| {
                s.close()
            });
            retire(old.bus.as_ref(), new.and_then(|n| n.bus.as_ref()), |s| {
                s.close()
            });
        }
    }
}

impl<T: ?Sized> Binding<T> {
    /// A binding of a store just opened.
    fn opened(name: &str, settings: Settings, params: &Params, store: Arc<T>) -> Arc<Self> {
        Arc::new(Binding {
            name: name.to_string(),
            settings,
            params: params.clone(),
            store,
            seal: Arc::default(),
        })
    }

    /// This binding's open store under `name` with `settings`.
    fn with(&self, name: &str, settings: Settings) -> Arc<Binding<T>> {
        Arc::new(Binding {
            name: name.to_string(),
            settings,
            params: self.params.clone(),
            store: Arc::clone(&self.store),
            seal: Arc::clone(&self.seal),
        })
    }
}

impl Allow {
    /// Whether a caller from namespace `caller` (none when its host belongs
    /// to no namespace), presenting `identities`, may call a binding of
    /// `own`; if not, who was refused, for the error.
    pub(crate) fn admits(
        &self,
        own: &str,
        caller: Option<&str>,
        identities: &[String],
    ) -> Result<(), String> {
        let Some(caller) = caller else {
            return Err("callers from a host that no namespace serves".into());
        };
        let listed = |list: &Vec<String>| list.iter().any(|n| n == caller);
        if caller != own && !self.namespaces.as_ref().is_none_or(listed) {
            return Err(format!("callers from namespace `{caller}`"));
        }
        let matches = |identity: &String| {
            self.identities
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => identity.starts_with(prefix),
                    None => identity == pattern,
                })
        };
        if self.identities.is_empty() || identities.iter().any(matches) {
            return Ok(());
        }
        Err(if identities.is_empty() {
            format!(
                "callers from namespace `{caller}` without a client certificate that its `client_ca_secret` verifies"
            )
        } else {
            format!("identity `{}`", identities.join("`, `"))
        })
    }
}

impl Seal {
    /// Admits one write, unless the store is sealed.
    pub(crate) fn enter(&self) -> Option<Writing<'_>> {
        // Counted before the check, so that `seal` either sees this write
        // and waits for it, or this write sees the seal.
        self.writing.fetch_add(1, Ordering::SeqCst);
        if self.sealed.load(Ordering::SeqCst) {
            self.leave();
            return None;
        }
        Some(Writing(self))
    }

    fn leave(&self) {
        if self.writing.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Refuses new writes and waits for those in flight.
    async fn seal(&self) {
        self.sealed.store(true, Ordering::SeqCst);
        loop {
            // Made before the check: a last write that leaves in between
            // still wakes this wait.
            let idle = self.idle.notified();
            if self.writing.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Moves a namespace's items from `old`'s store into `new`'s: seals `old`,
/// then copies page by page.
async fn move_items(
    old: &Binding<dyn KeyValue>,
    new: &Binding<dyn KeyValue>,
) -> Result<(), OpenError> {
    let failed = |error: prism_datastore::Error| OpenError {
        binding: new.name.clone(),
        field: "move_items",
        reason: format!(
            "copying the items of `{}`: {}",
            old.name,
            crate::http::error::Chain(&error)
        ),
    };
    old.seal.seal().await;
    let mut after: Option<String> = None;
    let mut moved = 0usize;
    loop {
        let page = old
            .store
            .scan("", after.as_deref(), MOVE_PAGE)
            .await
            .map_err(failed)?;
        moved += page.items.len();
        new.store.import(page.items).await.map_err(failed)?;
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    info!(from = %old.name, to = %new.name, items = moved, "Moved a namespace's items to its new store.");
    Ok(())
}

enum Opened {
    Kv(Arc<Binding<dyn KeyValue>>),
    Bus(Arc<Binding<dyn PubSub>>),
}

/// Opens the store of one binding; its namespace and the binding.
async fn open_one(
    name: String,
    settings: Settings,
    params: Params,
) -> Result<(String, Opened), OpenError> {
    let failed = |field: &'static str, error: prism_datastore::Error| OpenError {
        binding: name.clone(),
        field,
        reason: crate::http::error::Chain(&error).to_string(),
    };
    let opened = match &params {
        Params::Kv(kv) => {
            let field = match kv.store {
                KvStore::Sqlite { .. } => "sqlite",
                KvStore::Postgres { .. } => "postgres",
            };
            let store = open_kv(kv).await.map_err(|e| failed(field, e))?;
            Opened::Kv(Binding::opened(&name, settings, &params, store))
        }
        Params::Bus(bus) => {
            let field = match bus.bus {
                BusKind::Memory => "memory",
                BusKind::Nats { .. } => "nats",
                BusKind::Kafka { .. } => "kafka",
            };
            let store = open_bus(bus).await.map_err(|e| failed(field, e))?;
            Opened::Bus(Binding::opened(&name, settings, &params, store))
        }
    };
    info!(binding = %name, "Opened data binding.");
    Ok((namespace_of(&name).to_string(), opened))
}

/// The store params and call settings of `spec`.
fn compile(
    snapshot: &Snapshot,
    spec: &DataBinding,
    namespace: &str,
    data_dir: Option<&Path>,
) -> Result<(Params, Settings), OpenError> {
    use data_binding::Store;

    let connect_timeout =
        defaults::duration_or(spec.connect_timeout.as_ref(), default::CONNECT_TIMEOUT);
    let kv = |store| {
        Params::Kv(KvParams {
            namespace: namespace.to_string(),
            store,
            pool_size: defaults::nonzero_or(spec.pool_size, default::POOL_SIZE),
            connect_timeout,
        })
    };
    let bus = |bus| {
        Params::Bus(BusParams {
            namespace: namespace.to_string(),
            bus,
            retention: spec.retention.as_ref().and_then(defaults::to_std),
            ack_wait: defaults::duration_or(spec.ack_wait.as_ref(), default::ACK_WAIT),
            connect_timeout,
        })
    };
    let params = match &spec.store {
        Some(Store::Sqlite(sqlite)) => kv(KvStore::Sqlite {
            path: sqlite_path(&sqlite.path, data_dir),
        }),
        Some(Store::Postgres(pg)) => kv(KvStore::Postgres {
            url: credential(snapshot, namespace, &pg.secret).ok_or_else(|| OpenError {
                binding: spec.name.clone(),
                field: "postgres.secret",
                reason: format!("secret `{namespace}/{}` holds no `credential`", pg.secret),
            })?,
        }),
        Some(Store::Memory(_)) => bus(BusKind::Memory),
        Some(Store::Nats(nats)) => bus(BusKind::Nats {
            url: nats.url.clone(),
            stream: (!nats.stream.is_empty()).then(|| nats.stream.clone()),
        }),
        Some(Store::Kafka(kafka)) => bus(BusKind::Kafka {
            brokers: kafka.brokers.clone(),
            partitions: defaults::nonzero_or(kafka.partitions, default::KAFKA_PARTITIONS),
        }),
        // Validation refuses a binding without a store.
        None => {
            return Err(OpenError {
                binding: spec.name.clone(),
                field: "sqlite",
                reason: "no store".into(),
            });
        }
    };
    let max_value_bytes = if spec.max_value_bytes == 0 {
        default::MAX_VALUE_BYTES
    } else {
        spec.max_value_bytes
    };
    let settings = Settings {
        max_value_bytes: usize::try_from(max_value_bytes).unwrap_or(usize::MAX),
        default_ttl: spec.default_ttl.as_ref().and_then(defaults::to_std),
        allow: (!spec.allow_namespaces.is_empty() || !spec.allow_identities.is_empty()).then(
            || Allow {
                namespaces: (!spec.allow_namespaces.is_empty()
                    && !spec.allow_namespaces.iter().any(|n| n == "*"))
                .then(|| spec.allow_namespaces.clone()),
                identities: spec.allow_identities.clone(),
            },
        ),
        move_items: spec.move_items,
    };
    Ok((params, settings))
}

/// A relative SQLite path is taken from the proxy's data directory (the
/// working directory when it keeps none).
fn sqlite_path(path: &str, data_dir: Option<&Path>) -> PathBuf {
    let path = Path::new(path);
    match data_dir {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

/// The value of the credential Secret `name` of `namespace`.
fn credential(snapshot: &Snapshot, namespace: &str, name: &str) -> Option<String> {
    let key = ResourceKey::new(Kind::Secret, format!("{namespace}/{name}"));
    match &snapshot.get(&key)?.resource {
        Resource::Secret(s) => match &s.kind {
            Some(secret::Kind::Credential(c)) => Some(c.value.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn namespace_of(name: &str) -> &str {
    name.split_once('/')
        .map_or(name, |(namespace, _)| namespace)
}

/// Drains and closes the store of `old` unless `new` is of the same store.
fn retire<T: ?Sized + Send + Sync + 'static>(
    old: Option<&Arc<Binding<T>>>,
    new: Option<&Arc<Binding<T>>>,
    close: impl FnOnce(&T) -> futures::future::BoxFuture<'_, ()> + Send + 'static,
) {
    if let Some(old) = old
        && !new.is_some_and(|new| Arc::ptr_eq(&new.store, &old.store))
    {
        drain(old.name.clone(), Arc::clone(&old.store), close);
    }
}

/// Waits (up to [`DRAIN_TIMEOUT`]) until nothing but this task holds
/// `store`, then closes it.
fn drain<T: ?Sized + Send + Sync + 'static>(
    binding: String,
    store: Arc<T>,
    close: impl FnOnce(&T) -> futures::future::BoxFuture<'_, ()> + Send + 'static,
) {
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        // Calls in flight hold the store through the runtime they loaded;
        // each ends within its own timeout, so polling ends too.
        while Arc::strong_count(&store) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if Arc::strong_count(&store) > 1 {
            warn!(%binding, "Closing a data binding with calls still in flight.");
        }
        close(&store).await;
        info!(%binding, "Closed data binding.");
    });
}

#[cfg(test)]
mod tests {
    use prism_proto::pb::config::v1::{MemoryBus, Namespace, SqliteStore};

    use super::*;

    fn snapshot(bindings: impl IntoIterator<Item = DataBinding>) -> Snapshot {
        let namespace = Resource::Namespace(Namespace {
            name: "demo".into(),
            ..Default::default()
        });
        Snapshot::from_resources(
            1,
            std::iter::once(namespace).chain(bindings.into_iter().map(Resource::DataBinding)),
        )
    }

    fn sqlite(path: &str, max_value_bytes: u64) -> DataBinding {
        DataBinding {
            name: "demo/kv".into(),
            store: Some(data_binding::Store::Sqlite(SqliteStore {
                path: path.into(),
            })),
            max_value_bytes,
            ..Default::default()
        }
    }

    fn memory() -> DataBinding {
        DataBinding {
            name: "demo/bus".into(),
            store: Some(data_binding::Store::Memory(MemoryBus {})),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_unchanged_store_is_kept_and_a_replaced_one_drains_and_closes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |snapshot: Snapshot, previous: &Bindings| {
            let dir = dir.path().to_path_buf();
            let previous = Bindings {
                namespaces: previous.namespaces.clone(),
                moved_from: Vec::new(),
            };
            async move {
                Bindings::open(&snapshot, &previous, Some(&dir))
                    .await
                    .expect("opens")
            }
        };
        let first = open(
            snapshot([sqlite("a.db", 0), memory()]),
            &Bindings::default(),
        )
        .await;
        let kv = |b: &Bindings| Arc::clone(&b.kv("demo").expect("a KeyValue binding").store);
        let bus = |b: &Bindings| Arc::clone(&b.bus("demo").expect("a PubSub binding").store);
        assert!(
            dir.path().join("a.db").exists(),
            "a relative path is in the data directory"
        );

        // Another limit: the same open store, under the new settings.
        let second = open(snapshot([sqlite("a.db", 10), memory()]), &first).await;
        assert!(Arc::ptr_eq(&kv(&first), &kv(&second)));
        assert!(Arc::ptr_eq(&bus(&first), &bus(&second)));
        assert_eq!(second.kv("demo").expect("kv").settings.max_value_bytes, 10);

        // Another file: a store of its own; the old one is closed once
        // nothing holds it.
        let third = open(snapshot([sqlite("b.db", 10)]), &second).await;
        assert!(!Arc::ptr_eq(&kv(&second), &kv(&third)));
        assert!(third.bus("demo").is_none());
        let (old_kv, old_bus) = (Arc::downgrade(&kv(&second)), Arc::downgrade(&bus(&second)));
        second.retire(&third);
        drop((first, second));
        tokio::time::timeout(DRAIN_TIMEOUT, async {
            while old_kv.strong_count() + old_bus.strong_count() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the replaced store and the removed bus are closed and freed");
        // The store kept goes on serving.
        assert_eq!(kv(&third).get("k").await.expect("get"), None);
    }

    #[tokio::test]
    async fn a_store_that_cannot_open_names_its_binding_and_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("no-such-dir/x.db");
        let error = Bindings::open(
            &snapshot([sqlite(missing.to_str().expect("UTF-8"), 0)]),
            &Bindings::default(),
            None,
        )
        .await
        .expect_err("a file in a missing directory cannot be opened");
        assert_eq!((error.binding.as_str(), error.field), ("demo/kv", "sqlite"));
        assert!(!error.reason.is_empty());
    }
}
