//! The policy store: the only code in Prism that knows sled.
//!
//! Every accepted write becomes one revision. The resources it touches, the new
//! revision number and its change-log entry (which is also the audit record:
//! who, when, what) are written in one sled transaction and flushed to disk
//! before [`Store::commit`] returns, so an acknowledged write survives `kill -9`.
//! After the flush the new immutable [`Snapshot`] is published on a `watch`
//! channel, which is what discovery streams to the fleet.
//!
//! A write costs what it changes, not the size of the policy: the candidate
//! is validated with [`validate_delta`] against the route matches of the
//! current snapshot (falling back to the whole check exactly where the
//! proxy's stager does, so the verdict and error are the whole check's), and
//! what it changes is read off the keys it touches.
//!
//! Layout on disk, one sled database with three trees:
//! - `resources`: `"{Kind}/{name}"` (e.g. `Backend/demo/web`) → protobuf bytes.
//! - `meta`: `revision` → the current revision, u64 big-endian.
//! - `changelog`: revision (u64 big-endian) → encoded [`pb::admin::v1::Revision`].
//! - `tokens`: the admin API's bearer tokens ([`tokens`]), outside revisions.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prism_proto::pb::admin::v1::ResourceChange;
use prism_proto::pb::admin::v1::{Revision, resource_change};
use prism_proto::{
    Delta, Kind, Matches, Resource, ResourceKey, Snapshot, ValidationError, validate_delta,
    validate_snapshot,
};
use prost::Message;
use serde::Serialize;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionResult, TransactionError};
use tokio::sync::{Mutex, watch};
use tracing::{debug, info};

use crate::metrics::{StoreMetrics, WriteLabels};

mod tokens;

pub use tokens::TokenRecord;

const RESOURCES_TREE: &str = "resources";
const META_TREE: &str = "meta";
const CHANGELOG_TREE: &str = "changelog";
const REVISION_KEY: &str = "revision";

/// Opens sled at `dir`. A store closed a moment ago may still be held by
/// sled's flusher thread for a few milliseconds, so a lock conflict is retried
/// for up to two seconds before it is an error.
fn open_db(dir: &Path) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::Config::new().path(dir).open() {
            Err(sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Handle to the policy store. Cheap to clone: every clone shares one database,
/// one writer lock and one snapshot channel.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

/// One all-or-nothing write: resources to create, resources to create or
/// replace, and keys to delete. Deletes are applied before creates and upserts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mutation {
    /// Resources to create or replace.
    pub upserts: Vec<Resource>,
    /// Keys to remove; each must exist, or the whole write fails with
    /// [`StoreError::NotFound`].
    pub deletes: Vec<ResourceKey>,
    /// Resources that must not exist yet, or the whole write fails with
    /// [`StoreError::AlreadyExists`]. Checked under the writer lock, so two
    /// concurrent creates of one name cannot both succeed.
    pub creates: Vec<Resource>,
    /// What must still hold when the write applies (an HTTP `If-Match`),
    /// or the whole write fails with [`StoreError::PreconditionFailed`].
    /// Checked under the writer lock, so no other write slips in between.
    pub precondition: Option<Precondition>,
}

/// A write's condition on what it was based on: optimistic concurrency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// The policy is at one of these revisions.
    Revision(Vec<u64>),
    /// The resource exists, at one of these content versions (any version
    /// when empty: `If-Match: *`).
    Resource {
        /// The resource.
        key: ResourceKey,
        /// Its acceptable content versions.
        versions: Vec<String>,
    },
}

/// The outcome of a successful [`Store::commit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// The revision the store is at after the write: the new one, or the
    /// current one when nothing changed.
    pub revision: u64,
    /// What the write changed, ordered by kind then name.
    pub changes: Vec<Change>,
    /// True when the write changed nothing, so no revision was written.
    pub unchanged: bool,
}

/// What a write does to one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    /// The resource did not exist before.
    Create,
    /// The resource existed with other content.
    Update,
    /// The resource is removed.
    Delete,
}

/// One resource changed by a write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Whether the resource is created, updated or deleted.
    pub op: ChangeOp,
    /// Resource kind, e.g. `Backend`.
    #[serde(serialize_with = "serialize_kind")]
    pub kind: Kind,
    /// Resource name, e.g. `demo/web`.
    pub name: String,
    /// Content version after the change; `None` for a delete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Why the store refused or failed a read or write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The policy after the write would break a validation rule; nothing was written.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A key to delete does not exist; nothing was written.
    #[error("{0} does not exist")]
    NotFound(ResourceKey),
    /// A resource to create exists already; nothing was written.
    #[error("{0} already exists")]
    AlreadyExists(ResourceKey),
    /// The write's [`Precondition`] no longer holds: the policy or the
    /// resource changed since the writer read it; nothing was written.
    #[error("{what} changed underneath: it is now {now}")]
    PreconditionFailed {
        /// What the precondition was on: `the policy`, or a resource key.
        what: String,
        /// Where it is now: `revision N`, a version, or `deleted`.
        now: String,
        /// Its entity tag now, if it exists.
        etag: Option<String>,
    },
    /// The store directory could not be created.
    #[error("cannot create the store directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying IO error.
        #[source]
        source: std::io::Error,
    },
    /// sled failed to read, write or flush.
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    /// The database holds something this code cannot read.
    #[error("corrupt store: {0}")]
    Corrupt(String),
}

struct Inner {
    db: sled::Db,
    resources: sled::Tree,
    meta: sled::Tree,
    changelog: sled::Tree,
    tokens: sled::Tree,
    metrics: StoreMetrics,
    /// Serializes writers: each commit builds on the snapshot the previous
    /// one published.
    writer: Mutex<()>,
    /// The route matches of the published snapshot, or `None` when the policy
    /// loaded from disk does not pass validation (then a write is validated
    /// whole until one passes). Changed with the snapshot, under this lock,
    /// so a reader that holds it sees the two agree.
    matches: std::sync::Mutex<Option<Matches>>,
    /// Holds the latest snapshot. The store keeps the sender, so the channel
    /// never closes while a `Store` handle is alive.
    snapshots: watch::Sender<Arc<Snapshot>>,
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and loads every resource
    /// into memory at the stored revision (0 for a new store).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let db = open_db(dir)?;
        let resources = db.open_tree(RESOURCES_TREE)?;
        let meta = db.open_tree(META_TREE)?;
        let changelog = db.open_tree(CHANGELOG_TREE)?;
        let tokens = db.open_tree(tokens::TOKENS_TREE)?;

        let revision = match meta.get(REVISION_KEY)? {
            None => 0,
            Some(bytes) => decode_revision(&bytes)?,
        };
        let mut snapshot = Snapshot::empty(revision);
        for entry in resources.iter() {
            let (key, value) = entry?;
            let key = decode_key(&key)?;
            let resource = Resource::decode(key.kind, &value)
                .map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))?;
            if resource.key() != key {
                return Err(StoreError::Corrupt(format!(
                    "{key} is stored under the name of {}",
                    resource.key()
                )));
            }
            snapshot.insert(resource);
        }
        // Rules may have tightened since the policy was written: only a
        // policy that passes them is a base for the incremental check.
        let matches = validate_snapshot(&snapshot)
            .is_ok()
            .then(|| Matches::of(&snapshot));
        info!(
            path = %dir.display(),
            revision,
            resources = snapshot.len(),
            "Opened the store."
        );
        let (snapshots, _) = watch::channel(Arc::new(snapshot));
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                resources,
                meta,
                changelog,
                tokens,
                metrics: StoreMetrics::default(),
                writer: Mutex::new(()),
                matches: std::sync::Mutex::new(matches),
                snapshots,
            }),
        })
    }

    /// The latest committed snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.inner.snapshots.borrow())
    }

    /// A receiver that sees every snapshot published from now on (and the
    /// current one as its initial value).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.snapshots.subscribe()
    }

    /// What the store records: writes and flush times.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    /// The latest committed revision.
    pub fn revision(&self) -> u64 {
        self.inner.snapshots.borrow().revision
    }

    /// Validates `mutation` against the current snapshot and returns what it
    /// would change, writing nothing.
    pub fn dry_run(&self, mutation: &Mutation) -> Result<Vec<Change>, StoreError> {
        let matches = self.matches();
        let current = self.snapshot();
        let staged = candidate(&current, matches.as_ref(), mutation)?;
        Ok(changes(&current, &staged.delta, &staged.snapshot))
    }

    /// The route matches of the published snapshot, locked: a commit
    /// publishes its snapshot only while holding them.
    fn matches(&self) -> std::sync::MutexGuard<'_, Option<Matches>> {
        // A poisoned lock only means a panic elsewhere; the matches were
        // never left half updated (an update does not panic).
        self.inner
            .matches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies `mutation` as one revision, recorded as done by `actor` through
    /// `action` (e.g. `apply`, `create`, `replace`, `delete`).
    ///
    /// Nothing is written when the result would be invalid or a precondition
    /// fails, and no revision is written when nothing would change. Otherwise
    /// resources, revision and change-log entry are written in one transaction
    /// and flushed to disk before this returns; then the new snapshot is
    /// published to subscribers.
    pub async fn commit(
        &self,
        mutation: Mutation,
        actor: &str,
        action: &str,
    ) -> Result<Commit, StoreError> {
        let result = self.commit_locked(mutation, actor, action).await;
        let outcome = match &result {
            Ok(commit) if commit.unchanged => "unchanged",
            Ok(_) => "committed",
            Err(_) => "refused",
        };
        self.inner
            .metrics
            .writes
            .get_or_create(&WriteLabels {
                action: action.to_string(),
                outcome,
            })
            .inc();
        result
    }

    async fn commit_locked(
        &self,
        mutation: Mutation,
        actor: &str,
        action: &str,
    ) -> Result<Commit, StoreError> {
        let _writer = self.inner.writer.lock().await;
        let current = self.snapshot();
        let staged = candidate(&current, self.matches().as_ref(), &mutation)?;
        let changes = changes(&current, &staged.delta, &staged.snapshot);
        if changes.is_empty() {
            debug!(
                revision = current.revision,
                actor, action, "Nothing to commit."
            );
            return Ok(Commit {
                revision: current.revision,
                changes,
                unchanged: true,
            });
        }
        let revision = staged.snapshot.revision;
        let record = Revision {
            revision,
            changes: changes.iter().map(Change::to_record).collect(),
            actor: actor.to_string(),
            action: action.to_string(),
            unix_millis: unix_millis_now(),
        };
        self.write(&staged.snapshot, &changes, &record)?;
        // Durability before acknowledgement: the caller answers 2xx only
        // once the transaction is on disk.
        let flush_started = std::time::Instant::now();
        let flushed = self.inner.db.flush_async().await;
        self.inner
            .metrics
            .flush
            .observe(flush_started.elapsed().as_secs_f64());
        // The transaction is in sled's trees whether or not the flush worked,
        // so the published snapshot follows it: the next commit must build on
        // it rather than reuse its revision. A failed flush is still an error
        // to the caller, who must not take the write as acknowledged.
        self.publish(&current, staged);
        flushed?;
        info!(
            revision,
            actor,
            action,
            changes = changes.len(),
            "Committed."
        );
        Ok(Commit {
            revision,
            changes,
            unchanged: false,
        })
    }

    /// Publishes the committed `staged` snapshot, which follows `current`,
    /// with its route matches.
    fn publish(&self, current: &Snapshot, staged: Staged) {
        let mut matches = self.matches();
        *matches = match (staged.matches, matches.take()) {
            (Some(whole), _) => Some(whole),
            (None, Some(mut known)) => {
                known.update(current, &staged.delta, &staged.snapshot);
                Some(known)
            }
            // Without matches every write is validated whole, which gives them.
            (None, None) => None,
        };
        self.inner.snapshots.send_replace(Arc::new(staged.snapshot));
    }

    /// The newest `limit` change-log entries that `keep` keeps, newest
    /// first.
    pub fn history(
        &self,
        limit: usize,
        keep: impl Fn(&Revision) -> bool,
    ) -> Result<Vec<Revision>, StoreError> {
        let decoded = self.inner.changelog.iter().rev().map(|entry| {
            let (key, value) = entry?;
            Revision::decode(value.as_ref()).map_err(|e| {
                StoreError::Corrupt(format!(
                    "change-log entry {}: {e}",
                    decode_revision(&key).unwrap_or_default()
                ))
            })
        });
        decoded
            .filter(|entry| entry.as_ref().map_or(true, &keep))
            .take(limit)
            .collect()
    }

    /// Writes resources, revision and change-log entry in one transaction.
    fn write(
        &self,
        candidate: &Snapshot,
        changes: &[Change],
        record: &Revision,
    ) -> Result<(), StoreError> {
        let mut puts: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut removes: Vec<Vec<u8>> = Vec::new();
        for change in changes {
            let key = ResourceKey::new(change.kind, change.name.clone());
            let stored_key = encode_key(&key);
            match change.op {
                ChangeOp::Delete => removes.push(stored_key),
                ChangeOp::Create | ChangeOp::Update => {
                    let Some(entry) = candidate.get(&key) else {
                        // `changes` was computed from `candidate`, so every
                        // upserted key is in it.
                        return Err(StoreError::Corrupt(format!("{key} vanished mid-commit")));
                    };
                    puts.push((stored_key, entry.resource.encode_to_vec()));
                }
            }
        }
        let revision_bytes = candidate.revision.to_be_bytes();
        let record_bytes = record.encode_to_vec();
        let inner = &self.inner;
        (&inner.resources, &inner.meta, &inner.changelog)
            .transaction(
                |(resources, meta, changelog)| -> ConflictableTransactionResult<()> {
                    for (key, value) in &puts {
                        resources.insert(key.as_slice(), value.as_slice())?;
                    }
                    for key in &removes {
                        resources.remove(key.as_slice())?;
                    }
                    meta.insert(REVISION_KEY, &revision_bytes[..])?;
                    changelog.insert(&revision_bytes[..], record_bytes.as_slice())?;
                    Ok(())
                },
            )
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Storage(e),
                // The closure never aborts.
                TransactionError::Abort(()) => {
                    StoreError::Corrupt("transaction aborted".to_string())
                }
            })
    }
}

impl Mutation {
    /// A mutation that creates or replaces one resource.
    pub fn upsert(resource: Resource) -> Self {
        Self {
            upserts: vec![resource],
            ..Self::default()
        }
    }

    /// A mutation that creates one resource, failing if it exists.
    pub fn create(resource: Resource) -> Self {
        Self {
            creates: vec![resource],
            ..Self::default()
        }
    }

    /// A mutation that deletes one resource, failing if it does not exist.
    pub fn delete(key: ResourceKey) -> Self {
        Self {
            deletes: vec![key],
            ..Self::default()
        }
    }
}

impl Change {
    /// The change-log form of this change.
    pub fn to_record(&self) -> ResourceChange {
        let op = match self.op {
            ChangeOp::Create | ChangeOp::Update => resource_change::Op::Upsert,
            ChangeOp::Delete => resource_change::Op::Delete,
        };
        ResourceChange {
            kind: self.kind.as_str().to_string(),
            name: self.name.clone(),
            op: op.into(),
            version: self.version.clone().unwrap_or_default(),
        }
    }
}

/// A validated candidate: the snapshot a write makes, the delta that makes
/// it from the current one, and its route matches if validation gave them.
struct Staged {
    snapshot: Snapshot,
    delta: Delta,
    matches: Option<Matches>,
}

/// `current` with `mutation` applied at the next revision, validated against
/// `matches`, the route matches of `current` (`None`: validated whole).
/// The entity tag of the policy at `revision`: `"r{revision}"`.
pub fn policy_etag(revision: u64) -> String {
    format!("\"r{revision}\"")
}

/// The entity tag of a resource at content `version`: `"{version}"`.
pub fn resource_etag(version: &str) -> String {
    format!("\"{version}\"")
}

/// Whether `precondition` holds in `current`.
fn check(current: &Snapshot, precondition: &Precondition) -> Result<(), StoreError> {
    match precondition {
        Precondition::Revision(revisions) => {
            if revisions.contains(&current.revision) {
                return Ok(());
            }
            Err(StoreError::PreconditionFailed {
                what: "the policy".into(),
                now: format!("at revision {}", current.revision),
                etag: Some(policy_etag(current.revision)),
            })
        }
        Precondition::Resource { key, versions } => match current.get(key) {
            Some(entry) if versions.is_empty() || versions.contains(&entry.version) => Ok(()),
            Some(entry) => Err(StoreError::PreconditionFailed {
                what: key.to_string(),
                now: format!("at version {}", entry.version),
                etag: Some(resource_etag(&entry.version)),
            }),
            None => Err(StoreError::PreconditionFailed {
                what: key.to_string(),
                now: "absent".into(),
                etag: None,
            }),
        },
    }
}

fn candidate(
    current: &Snapshot,
    matches: Option<&Matches>,
    mutation: &Mutation,
) -> Result<Staged, StoreError> {
    if let Some(precondition) = &mutation.precondition {
        check(current, precondition)?;
    }
    // A key deleted twice is missing the second time.
    let mut deleted = HashSet::new();
    if let Some(key) = mutation
        .deletes
        .iter()
        .find(|key| current.get(key).is_none() || !deleted.insert(*key))
    {
        return Err(StoreError::NotFound(key.clone()));
    }
    if let Some(key) = mutation
        .creates
        .iter()
        .map(Resource::key)
        .find(|key| current.get(key).is_some())
    {
        return Err(StoreError::AlreadyExists(key));
    }
    let delta = Delta {
        revision: current.revision + 1,
        upserts: mutation
            .creates
            .iter()
            .chain(&mutation.upserts)
            .map(|resource| Arc::new(resource.clone().versioned()))
            .collect(),
        removals: mutation.deletes.clone(),
    };
    let snapshot = current.apply(&delta);
    let matches = match matches {
        Some(matches) => validate_delta(current, matches, &delta, &snapshot)?,
        None => {
            validate_snapshot(&snapshot)?;
            Some(Matches::of(&snapshot))
        }
    };
    Ok(Staged {
        snapshot,
        delta,
        matches,
    })
}

/// What turns `from` into `to`, which is `from` with `delta` applied, ordered
/// by kind then name: only the keys the delta touches can differ.
fn changes(from: &Snapshot, delta: &Delta, to: &Snapshot) -> Vec<Change> {
    let mut touched: Vec<ResourceKey> = delta
        .removals
        .iter()
        .cloned()
        .chain(delta.upserts.iter().map(|v| v.resource.key()))
        .collect();
    touched.sort_unstable();
    touched.dedup();
    touched
        .into_iter()
        .filter_map(|key| {
            let (op, version) = match (from.get(&key), to.get(&key)) {
                (Some(old), Some(new)) if old.version == new.version => return None,
                (Some(_), Some(new)) => (ChangeOp::Update, Some(new.version.clone())),
                (None, Some(new)) => (ChangeOp::Create, Some(new.version.clone())),
                (Some(_), None) => (ChangeOp::Delete, None),
                (None, None) => return None,
            };
            Some(Change {
                op,
                kind: key.kind,
                name: key.name,
                version,
            })
        })
        .collect()
}

fn encode_key(key: &ResourceKey) -> Vec<u8> {
    format!("{}/{}", key.kind.as_str(), key.name).into_bytes()
}

fn decode_key(bytes: &[u8]) -> Result<ResourceKey, StoreError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| StoreError::Corrupt(format!("resource key {bytes:?} is not UTF-8")))?;
    let (kind, name) = text
        .split_once('/')
        .ok_or_else(|| StoreError::Corrupt(format!("resource key `{text}` has no kind")))?;
    let kind = kind
        .parse::<Kind>()
        .map_err(|e| StoreError::Corrupt(format!("resource key `{text}`: {e}")))?;
    Ok(ResourceKey::new(kind, name))
}

fn decode_revision(bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("revision {bytes:?} is not 8 bytes")))?;
    Ok(u64::from_be_bytes(array))
}

fn serialize_kind<S: serde::Serializer>(kind: &Kind, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(kind.as_str())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_millis_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use prism_proto::pb::config::v1::route_match;
    use prism_proto::{Backend, Endpoint, Namespace, Route, RouteMatch};

    use super::*;

    fn ns(name: &str) -> Resource {
        Resource::Namespace(Namespace {
            name: name.into(),
            hosts: vec![format!("{name}.local")],
            ..Default::default()
        })
    }

    fn backend(name: &str, addr: &str) -> Resource {
        Resource::Backend(Backend {
            name: name.into(),
            endpoints: vec![Endpoint {
                address: addr.into(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn route(name: &str, backend: &str) -> Resource {
        Resource::Route(Route {
            name: name.into(),
            r#match: Some(RouteMatch {
                host: String::new(),
                path: Some(route_match::Path::Prefix("/".into())),
                ..Default::default()
            }),
            backend: backend.into(),
            ..Default::default()
        })
    }

    fn demo() -> Mutation {
        Mutation {
            upserts: vec![
                ns("demo"),
                backend("demo/web", "127.0.0.1:8081"),
                route("demo/root", "web"),
            ],
            ..Mutation::default()
        }
    }

    #[tokio::test]
    async fn commits_survive_reopen_and_revisions_continue() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("opens");
            assert_eq!(store.revision(), 0);
            let commit = store
                .commit(demo(), "alice", "apply")
                .await
                .expect("commits");
            assert_eq!(commit.revision, 1);
            assert!(!commit.unchanged);
            assert_eq!(commit.changes.len(), 3);
            assert!(commit.changes.iter().all(|c| c.op == ChangeOp::Create));
            let commit = store
                .commit(
                    Mutation::upsert(backend("demo/web", "127.0.0.1:9999")),
                    "bob",
                    "replace",
                )
                .await
                .expect("commits");
            assert_eq!(commit.revision, 2);
            assert_eq!(commit.changes[0].op, ChangeOp::Update);
        }
        let store = Store::open(dir.path()).expect("reopens");
        assert_eq!(store.revision(), 2);
        let snapshot = store.snapshot();
        assert_eq!(snapshot.len(), 3);
        let web = snapshot
            .get(&ResourceKey::new(Kind::Backend, "demo/web"))
            .expect("backend survives");
        assert_eq!(web.resource, backend("demo/web", "127.0.0.1:9999"));

        let history = store.history(10, |_| true).expect("history");
        assert_eq!(
            history.iter().map(|r| r.revision).collect::<Vec<_>>(),
            [2, 1]
        );
        assert_eq!(history[0].actor, "bob");
        assert_eq!(history[1].action, "apply");
        assert_eq!(history[1].changes.len(), 3);
        assert_eq!(store.history(1, |_| true).expect("history").len(), 1);

        let commit = store
            .commit(
                Mutation::delete(ResourceKey::new(Kind::Route, "demo/root")),
                "carol",
                "delete",
            )
            .await
            .expect("commits");
        assert_eq!(commit.revision, 3);
        assert_eq!(commit.changes[0].op, ChangeOp::Delete);
        drop(store);
        let store = Store::open(dir.path()).expect("reopens");
        assert_eq!(store.revision(), 3);
        assert!(!store.snapshot().contains(Kind::Route, "demo/root"));
    }

    /// Set in the child process of `acknowledged_commits_survive_abort`: the
    /// store directory it commits to before aborting.
    const ABORT_CHILD_DIR: &str = "PRISM_STORE_TEST_ABORT_DIR";

    #[tokio::test]
    async fn acknowledged_commits_survive_abort() {
        if let Some(dir) = std::env::var_os(ABORT_CHILD_DIR) {
            // Child: commit, then die without running any destructor, as
            // `kill -9` would.
            let store = Store::open(Path::new(&dir)).expect("opens");
            store
                .commit(demo(), "child", "apply")
                .await
                .expect("commits");
            std::process::abort();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "store::tests::acknowledged_commits_survive_abort",
                "--test-threads=1",
            ])
            .env(ABORT_CHILD_DIR, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("child runs");
        assert!(!status.success(), "the child aborts");
        let store = Store::open(dir.path()).expect("reopens");
        assert_eq!(store.revision(), 1);
        assert_eq!(store.snapshot().len(), 3);
        assert_eq!(
            store.history(10, |_| true).expect("history")[0].actor,
            "child"
        );
    }

    #[tokio::test]
    async fn invalid_writes_leave_the_store_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        store.commit(demo(), "a", "apply").await.expect("commits");
        let before = store.snapshot();

        let err = store
            .commit(
                Mutation::upsert(backend("demo/web", "not an address")),
                "a",
                "replace",
            )
            .await
            .unwrap_err();
        let StoreError::Invalid(e) = err else {
            panic!("expected a validation error, got {err}")
        };
        assert_eq!(e.field, "endpoints[0].address");
        assert_eq!(store.snapshot(), before);
        assert_eq!(store.history(10, |_| true).expect("history").len(), 1);

        // A backend a route still points at cannot go.
        let err = store
            .commit(
                Mutation::delete(ResourceKey::new(Kind::Backend, "demo/web")),
                "a",
                "delete",
            )
            .await
            .unwrap_err();
        let StoreError::Invalid(e) = err else {
            panic!("expected a validation error, got {err}")
        };
        assert_eq!(e.field, "backend");
        assert_eq!(e.resource, Some(ResourceKey::new(Kind::Route, "demo/root")));
        assert_eq!(store.snapshot(), before);

        drop(store);
        let store = Store::open(dir.path()).expect("reopens");
        assert_eq!(*store.snapshot(), *before);
    }

    fn prefixed(name: &str, prefix: &str) -> Resource {
        Resource::Route(Route {
            name: name.into(),
            r#match: Some(RouteMatch {
                path: Some(route_match::Path::Prefix(prefix.into())),
                ..Default::default()
            }),
            backend: "web".into(),
            ..Default::default()
        })
    }

    /// The demo namespace and backend with 20 routes, `/0/` to `/19/`: large
    /// enough that a write of a few routes is validated by what it changes.
    async fn routed_store(dir: &Path) -> Store {
        let store = Store::open(dir).expect("opens");
        let mut upserts = vec![ns("demo"), backend("demo/web", "127.0.0.1:8081")];
        upserts.extend((0..20).map(|i| prefixed(&format!("demo/r{i}"), &format!("/{i}/"))));
        let mutation = Mutation {
            upserts,
            ..Mutation::default()
        };
        store.commit(mutation, "a", "apply").await.expect("commits");
        store
    }

    #[tokio::test]
    async fn a_small_write_is_refused_exactly_as_the_whole_check_refuses_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = routed_store(dir.path()).await;
        let before = store.snapshot();
        // r1 takes r0's match, which r0 keeps.
        let taking = Mutation::upsert(prefixed("demo/r1", "/0/"));
        let mut whole = (*before).clone();
        whole.insert(prefixed("demo/r1", "/0/"));
        let expected = validate_snapshot(&whole).expect_err("a duplicate match");
        let err = store.commit(taking, "a", "apply").await.unwrap_err();
        let StoreError::Invalid(e) = err else {
            panic!("expected a validation error, got {err}")
        };
        assert_eq!(e, expected);
        assert_eq!(store.snapshot(), before);
        assert_eq!(store.history(10, |_| true).expect("history").len(), 1);
    }

    #[tokio::test]
    async fn small_writes_follow_the_matches_they_move() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = routed_store(dir.path()).await;
        // Two routes trade matches in one write.
        let trade = Mutation {
            upserts: vec![prefixed("demo/r0", "/1/"), prefixed("demo/r1", "/0/")],
            ..Mutation::default()
        };
        store.commit(trade, "a", "apply").await.expect("a trade");
        // r2 moves away; its old match is free for r3 in the next write.
        store
            .commit(Mutation::upsert(prefixed("demo/r2", "/new/")), "a", "apply")
            .await
            .expect("a fresh match");
        store
            .commit(Mutation::upsert(prefixed("demo/r3", "/2/")), "a", "apply")
            .await
            .expect("the match r2 left");
        // r2's new match is held now.
        let err = store
            .commit(Mutation::upsert(prefixed("demo/r4", "/new/")), "a", "apply")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
        validate_snapshot(&store.snapshot()).expect("a valid policy");
        assert_eq!(store.revision(), 4);
    }

    #[tokio::test]
    async fn deleting_one_key_twice_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = routed_store(dir.path()).await;
        let key = ResourceKey::new(Kind::Route, "demo/r0");
        let twice = Mutation {
            deletes: vec![key.clone(), key.clone()],
            ..Mutation::default()
        };
        let err = store.commit(twice, "a", "delete").await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound(k) if k == key));
        assert_eq!(store.revision(), 1);
    }

    #[tokio::test]
    async fn reapplying_the_same_policy_does_not_bump_the_revision() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let mut updates = store.subscribe();
        store.commit(demo(), "a", "apply").await.expect("commits");
        assert!(updates.has_changed().expect("open channel"));
        assert_eq!(updates.borrow_and_update().revision, 1);

        let again = store.commit(demo(), "a", "apply").await.expect("commits");
        assert_eq!(
            again,
            Commit {
                revision: 1,
                changes: vec![],
                unchanged: true
            }
        );
        assert_eq!(store.revision(), 1);
        assert_eq!(store.history(10, |_| true).expect("history").len(), 1);
        assert!(!updates.has_changed().expect("open channel"));
    }

    #[tokio::test]
    async fn deleting_a_missing_key_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let key = ResourceKey::new(Kind::Namespace, "ghost");
        let err = store
            .commit(Mutation::delete(key.clone()), "a", "delete")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound(k) if k == key));
        assert_eq!(store.revision(), 0);
    }

    #[tokio::test]
    async fn creating_an_existing_resource_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        store
            .commit(Mutation::create(ns("demo")), "a", "create")
            .await
            .expect("creates");
        let err = store
            .commit(Mutation::create(ns("demo")), "a", "create")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists(_)), "{err}");
        assert_eq!(store.revision(), 1);
    }

    #[tokio::test]
    async fn dry_run_reports_changes_without_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let changes = store.dry_run(&demo()).expect("valid");
        assert_eq!(
            changes
                .iter()
                .map(|c| (c.op, c.kind, c.name.as_str()))
                .collect::<Vec<_>>(),
            [
                (ChangeOp::Create, Kind::Namespace, "demo"),
                (ChangeOp::Create, Kind::Backend, "demo/web"),
                (ChangeOp::Create, Kind::Route, "demo/root"),
            ]
        );
        assert_eq!(store.revision(), 0);
        assert!(store.snapshot().is_empty());

        let dangling = Mutation::upsert(route("demo/root", "web"));
        assert!(matches!(
            store.dry_run(&dangling),
            Err(StoreError::Invalid(_))
        ));
    }
}
