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
//! - `changelog`: revision (u64 big-endian) → encoded [`pb::admin::v1::Revision`],
//!   each change with the before-image of its resource (`previous`: the
//!   encoded resource before the change, empty for a create). With those,
//!   [`Store::policy_at`] rebuilds any revision's policy by undoing the later
//!   ones, newest first; entries written before the change log recorded
//!   content have none, and no revision before the newest of them can be
//!   rebuilt.
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
use tracing::{Instrument as _, debug, info};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Change {
    /// Whether the resource is created, updated or deleted.
    pub op: ChangeOp,
    /// Resource kind, e.g. `Backend`.
    #[serde(serialize_with = "serialize_kind")]
    #[schema(value_type = String)]
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
    /// A revision asked for by number is newer than the newest one.
    #[error("revision {revision} does not exist: the newest is {newest}")]
    NoSuchRevision {
        /// The revision asked for.
        revision: u64,
        /// The newest revision.
        newest: u64,
    },
    /// A revision's policy cannot be rebuilt: a later change-log entry was
    /// written before the change log recorded content, so it cannot be undone.
    #[error(
        "revision {revision} predates recorded content; diff and rollback reach back to revision {earliest}"
    )]
    ContentNotRecorded {
        /// The revision asked for.
        revision: u64,
        /// The oldest revision whose policy can be rebuilt.
        earliest: u64,
    },
}

/// A write worked out against the current policy but not made: what
/// [`Store::preview`] and [`Store::preview_rollback`] answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Preview {
    /// The policy the write starts from: the current one.
    pub before: Arc<Snapshot>,
    /// The policy the write would make, at the next revision.
    pub after: Snapshot,
    /// What it would change, ordered by kind then name.
    pub changes: Vec<Change>,
}

/// What [`Store::rollback`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollback {
    /// The revision written (or, when nothing changed, the current one).
    pub commit: Commit,
    /// The policy the rollback replaced.
    pub before: Arc<Snapshot>,
    /// The policy it restored: the target revision's, which the store holds
    /// now (its `revision` is the target's).
    pub after: Snapshot,
}

/// How often [`Store::rollback`] works its write out again when another write
/// lands between working it out and committing it.
const ROLLBACK_ATTEMPTS: usize = 8;

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
    /// would change and the policy it would make, writing nothing.
    pub fn preview(&self, mutation: &Mutation) -> Result<Preview, StoreError> {
        let matches = self.matches();
        let current = self.snapshot();
        let staged = candidate(&current, matches.as_ref(), mutation)?;
        let changes = changes(&current, &staged.delta, &staged.snapshot);
        Ok(Preview {
            before: current,
            after: staged.snapshot,
            changes,
        })
    }

    /// The policy as it was at `revision`: the current one with every later
    /// revision undone, newest first, from the before-images in the change
    /// log. Revision 0 is the empty policy a new store starts with.
    ///
    /// Fails with [`StoreError::NoSuchRevision`] past the current revision,
    /// and with [`StoreError::ContentNotRecorded`] when a later entry was
    /// written before the change log recorded content.
    pub fn policy_at(&self, revision: u64) -> Result<Snapshot, StoreError> {
        self.undo(&self.snapshot(), revision)
    }

    /// `current` with every revision after `revision` undone.
    fn undo(&self, current: &Snapshot, revision: u64) -> Result<Snapshot, StoreError> {
        if revision > current.revision {
            return Err(StoreError::NoSuchRevision {
                revision,
                newest: current.revision,
            });
        }
        let mut policy = current.clone();
        if revision == current.revision {
            return Ok(policy);
        }
        // Bounded by the snapshot's revision: a commit may have written its
        // entry and not yet published its snapshot.
        let range = (revision + 1).to_be_bytes()..=current.revision.to_be_bytes();
        let mut expected = current.revision;
        for entry in self.inner.changelog.range(range).rev() {
            let (key, value) = entry?;
            let at = decode_revision(&key)?;
            if at != expected {
                return Err(StoreError::Corrupt(format!(
                    "change-log entry {expected} is missing"
                )));
            }
            let record = Revision::decode(value.as_ref())
                .map_err(|e| StoreError::Corrupt(format!("change-log entry {at}: {e}")))?;
            for change in &record.changes {
                undo_change(&mut policy, change, at).map_err(|error| match error {
                    Undo::NotRecorded => StoreError::ContentNotRecorded {
                        revision,
                        earliest: at,
                    },
                    Undo::Corrupt(what) => {
                        StoreError::Corrupt(format!("change-log entry {at}: {what}"))
                    }
                })?;
            }
            expected -= 1;
        }
        if expected != revision {
            return Err(StoreError::Corrupt(format!(
                "change-log entry {expected} is missing"
            )));
        }
        policy.revision = revision;
        Ok(policy)
    }

    /// Works out, against the current policy, the write that makes the
    /// policy equal revision `to`'s again, writing nothing. `precondition`
    /// is checked as a commit checks it.
    pub fn preview_rollback(
        &self,
        to: u64,
        precondition: Option<&Precondition>,
    ) -> Result<Preview, StoreError> {
        // Held throughout: no commit publishes a snapshot meanwhile, so the
        // write is worked out and validated against one policy.
        let matches = self.matches();
        let current = self.snapshot();
        if let Some(precondition) = precondition {
            check(&current, precondition)?;
        }
        let target = self.undo(&current, to)?;
        let staged = candidate(&current, matches.as_ref(), &restoring(&current, &target))?;
        let changes = changes(&current, &staged.delta, &staged.snapshot);
        Ok(Preview {
            before: current,
            after: staged.snapshot,
            changes,
        })
    }

    /// Commits one revision, recorded as action `rollback` by `actor`, whose
    /// policy equals revision `to`'s; "unchanged" when it already does.
    ///
    /// The write goes through [`Store::commit`], so the restored policy must
    /// pass today's validation rules, or nothing is written. `precondition`
    /// (an `If-Match`) must hold on the policy the rollback replaces. The
    /// write is worked out against the current policy and committed only if
    /// the policy is still that one; when another write lands in between, it
    /// is worked out again.
    pub async fn rollback(
        &self,
        to: u64,
        precondition: Option<&Precondition>,
        actor: &str,
    ) -> Result<Rollback, StoreError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let before = self.snapshot();
            if let Some(precondition) = precondition {
                check(&before, precondition)?;
            }
            let after = self.undo(&before, to)?;
            let mutation = Mutation {
                precondition: Some(Precondition::Revision(vec![before.revision])),
                ..restoring(&before, &after)
            };
            match self.commit(mutation, actor, "rollback").await {
                Err(StoreError::PreconditionFailed { .. }) if attempts < ROLLBACK_ATTEMPTS => {
                    debug!(to, attempts, "Another write came first; rollback again.");
                }
                result => {
                    return result.map(|commit| Rollback {
                        commit,
                        before,
                        after,
                    });
                }
            }
        }
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
        // A trace's span (see `admin::trace`), a child of the write's.
        let span = tracing::info_span!(
            target: "prism_trace",
            "store commit",
            prism.action = action,
            prism.author = actor,
            prism.revision = tracing::field::Empty,
            prism.outcome = tracing::field::Empty,
        );
        let result = self
            .commit_locked(mutation, actor, action)
            .instrument(span.clone())
            .await;
        let outcome = match &result {
            Ok(commit) if commit.unchanged => "unchanged",
            Ok(_) => "committed",
            Err(_) => "refused",
        };
        span.record("prism.outcome", outcome);
        if let Ok(commit) = &result {
            span.record("prism.revision", commit.revision);
        }
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
            changes: changes
                .iter()
                .map(|change| change.to_record_from(&current))
                .collect(),
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
    /// first, without their before-images: those hold key material and are
    /// read only to rebuild a revision ([`Store::policy_at`]).
    pub fn history(
        &self,
        limit: usize,
        keep: impl Fn(&Revision) -> bool,
    ) -> Result<Vec<Revision>, StoreError> {
        let decoded = self.inner.changelog.iter().rev().map(|entry| {
            let (key, value) = entry?;
            let mut record = Revision::decode(value.as_ref()).map_err(|e| {
                StoreError::Corrupt(format!(
                    "change-log entry {}: {e}",
                    decode_revision(&key).unwrap_or_default()
                ))
            })?;
            for change in &mut record.changes {
                change.previous = None;
            }
            Ok(record)
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
    /// The change-log form of this change, without its before-image (see
    /// [`Change::to_record_from`]).
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
            previous: None,
        }
    }

    /// The change-log form of this change made to the policy `before`: with
    /// its resource's before-image (empty for a create).
    pub fn to_record_from(&self, before: &Snapshot) -> ResourceChange {
        let key = ResourceKey::new(self.kind, self.name.clone());
        let previous = before
            .get(&key)
            .map(|entry| entry.resource.encode_to_vec())
            .unwrap_or_default();
        ResourceChange {
            previous: Some(previous),
            ..self.to_record()
        }
    }
}

/// Why one change-log change cannot be undone.
enum Undo {
    /// Its entry was written before the change log recorded content.
    NotRecorded,
    /// It does not read as a change.
    Corrupt(String),
}

/// Undoes one change of revision `at` in `policy`: a created resource goes,
/// an updated or deleted one comes back as it was.
fn undo_change(policy: &mut Snapshot, change: &ResourceChange, at: u64) -> Result<(), Undo> {
    let kind = change
        .kind
        .parse::<Kind>()
        .map_err(|e| Undo::Corrupt(e.to_string()))?;
    let key = ResourceKey::new(kind, change.name.clone());
    let previous = change.previous.as_deref().ok_or(Undo::NotRecorded)?;
    if previous.is_empty() {
        if change.op() == resource_change::Op::Delete {
            return Err(Undo::Corrupt(format!("{key} deleted with no before-image")));
        }
        policy.remove(&key);
        return Ok(());
    }
    let resource = Resource::decode(kind, previous)
        .map_err(|e| Undo::Corrupt(format!("{key} before revision {at}: {e}")))?;
    if resource.key() != key {
        return Err(Undo::Corrupt(format!(
            "the before-image of {key} is {}",
            resource.key()
        )));
    }
    policy.insert(resource);
    Ok(())
}

/// The mutation that turns `current` into `target`: every resource `target`
/// holds at another version or `current` lacks, and every key only
/// `current` holds.
fn restoring(current: &Snapshot, target: &Snapshot) -> Mutation {
    let delta = Snapshot::diff(current, target);
    Mutation {
        upserts: delta
            .upserts
            .iter()
            .map(|entry| entry.resource.clone())
            .collect(),
        deletes: delta.removals,
        ..Mutation::default()
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
pub(crate) fn changes(from: &Snapshot, delta: &Delta, to: &Snapshot) -> Vec<Change> {
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
impl Store {
    /// Rewrites change-log entry `revision` with `edit`, as a store written
    /// by another version of this code might hold it.
    pub(crate) fn rewrite_changelog(&self, revision: u64, edit: impl FnOnce(&mut Revision)) {
        let key = revision.to_be_bytes();
        let bytes = self
            .inner
            .changelog
            .get(key)
            .expect("reads")
            .expect("the entry exists");
        let mut record = Revision::decode(bytes.as_ref()).expect("decodes");
        edit(&mut record);
        self.inner
            .changelog
            .insert(key, record.encode_to_vec())
            .expect("writes");
    }

    /// Rewrites change-log entry `revision` without before-images, as the
    /// change log was written before it recorded content.
    pub(crate) fn forget_content(&self, revision: u64) {
        self.rewrite_changelog(revision, |record| {
            for change in &mut record.changes {
                change.previous = None;
            }
        });
    }
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
        let changes = store.preview(&demo()).expect("valid").changes;
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
            store.preview(&dangling),
            Err(StoreError::Invalid(_))
        ));
    }

    /// The resources of `snapshot`, ordered by kind then name.
    fn resources(snapshot: &Snapshot) -> Vec<Resource> {
        snapshot
            .iter()
            .map(|entry| entry.resource.clone())
            .collect()
    }

    /// Commits `mutation` and returns the snapshot it published.
    async fn commit(store: &Store, mutation: Mutation) -> Arc<Snapshot> {
        let commit = store.commit(mutation, "a", "apply").await.expect("commits");
        assert!(!commit.unchanged);
        store.snapshot()
    }

    #[tokio::test]
    async fn policy_at_rebuilds_every_revision_over_creates_updates_and_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let mut seen = vec![store.snapshot()];
        seen.push(commit(&store, demo()).await);
        seen.push(
            commit(
                &store,
                Mutation::upsert(backend("demo/web", "127.0.0.1:9999")),
            )
            .await,
        );
        let api = Mutation {
            upserts: vec![
                backend("demo/api", "127.0.0.1:7000"),
                prefixed("demo/api", "/api/"),
            ],
            ..Mutation::default()
        };
        seen.push(commit(&store, api).await);
        let root = ResourceKey::new(Kind::Route, "demo/root");
        seen.push(commit(&store, Mutation::delete(root)).await);
        // A delete and an update of two kinds in one revision.
        let mixed = Mutation {
            upserts: vec![Resource::Route(Route {
                name: "demo/api".into(),
                r#match: Some(RouteMatch {
                    path: Some(route_match::Path::Prefix("/v2/".into())),
                    ..Default::default()
                }),
                backend: "api".into(),
                ..Default::default()
            })],
            deletes: vec![ResourceKey::new(Kind::Backend, "demo/web")],
            ..Mutation::default()
        };
        seen.push(commit(&store, mixed).await);
        assert_eq!(store.revision(), 5);

        let check = |store: &Store| {
            for (revision, expected) in seen.iter().enumerate() {
                let revision = revision as u64;
                let rebuilt = store.policy_at(revision).expect("rebuilds");
                assert_eq!(rebuilt, **expected, "revision {revision}");
            }
            let err = store.policy_at(6).unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::NoSuchRevision {
                        revision: 6,
                        newest: 5
                    }
                ),
                "{err}"
            );
        };
        check(&store);
        assert!(store.policy_at(0).expect("rebuilds").is_empty());
        drop(store);
        // The before-images are on disk with the revisions.
        check(&Store::open(dir.path()).expect("reopens"));
    }

    #[tokio::test]
    async fn history_leaves_out_the_before_images_it_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        commit(&store, demo()).await;
        commit(
            &store,
            Mutation::upsert(backend("demo/web", "127.0.0.1:9999")),
        )
        .await;
        let mut recorded = None;
        store.rewrite_changelog(2, |record| recorded = Some(record.changes[0].clone()));
        let previous = recorded.and_then(|c| c.previous).expect("a before-image");
        let before = Resource::decode(Kind::Backend, &previous).expect("a backend");
        assert_eq!(before, backend("demo/web", "127.0.0.1:8081"));
        let history = store.history(10, |_| true).expect("history");
        assert_eq!(history.len(), 2);
        assert!(
            history
                .iter()
                .flat_map(|entry| &entry.changes)
                .all(|change| change.previous.is_none())
        );
    }

    #[tokio::test]
    async fn revisions_before_recorded_content_are_refused_naming_how_far_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        commit(&store, demo()).await;
        let second = commit(&store, Mutation::upsert(backend("demo/web", "127.0.0.1:2"))).await;
        commit(&store, Mutation::upsert(backend("demo/web", "127.0.0.1:3"))).await;
        // Entry 2 as an older Prism wrote it: no before-images.
        store.forget_content(2);

        assert_eq!(store.policy_at(2).expect("rebuilds"), *second);
        let err = store.policy_at(1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "revision 1 predates recorded content; diff and rollback reach back to revision 2"
        );
        assert!(matches!(
            store.preview_rollback(0, None),
            Err(StoreError::ContentNotRecorded {
                revision: 0,
                earliest: 2
            })
        ));
        let err = store.rollback(1, None, "a").await.unwrap_err();
        assert!(
            matches!(err, StoreError::ContentNotRecorded { .. }),
            "{err}"
        );
        assert_eq!(store.revision(), 3, "nothing was written");
        // Back to revision 2 works, and is itself a revision with content.
        let rolled = store.rollback(2, None, "b").await.expect("rolls back");
        assert_eq!(rolled.commit.revision, 4);
        assert_eq!(resources(&store.snapshot()), resources(&second));
        assert_eq!(store.policy_at(3).expect("rebuilds").revision, 3);
    }

    #[tokio::test]
    async fn rollback_commits_the_target_policy_as_a_new_revision() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let first = commit(&store, demo()).await;
        commit(
            &store,
            Mutation::upsert(backend("demo/web", "127.0.0.1:9999")),
        )
        .await;
        let api = Mutation {
            upserts: vec![
                backend("demo/api", "127.0.0.1:7000"),
                prefixed("demo/api", "/api/"),
            ],
            ..Mutation::default()
        };
        let third = commit(&store, api).await;

        let preview = store.preview_rollback(1, None).expect("previews");
        assert_eq!(store.revision(), 3, "a preview writes nothing");
        assert_eq!(resources(&preview.after), resources(&first));
        assert_eq!(
            preview
                .changes
                .iter()
                .map(|c| (c.op, c.kind, c.name.as_str()))
                .collect::<Vec<_>>(),
            [
                (ChangeOp::Delete, Kind::Backend, "demo/api"),
                (ChangeOp::Update, Kind::Backend, "demo/web"),
                (ChangeOp::Delete, Kind::Route, "demo/api"),
            ]
        );

        let rolled = store.rollback(1, None, "carol").await.expect("rolls back");
        assert_eq!(rolled.commit.revision, 4);
        assert_eq!(rolled.commit.changes, preview.changes);
        assert_eq!(*rolled.before, *third);
        assert_eq!(resources(&store.snapshot()), resources(&first));
        let entry = &store.history(1, |_| true).expect("history")[0];
        assert_eq!(
            (entry.actor.as_str(), entry.action.as_str()),
            ("carol", "rollback")
        );
        // The rollback is a revision like any other: it can be undone too.
        assert_eq!(store.policy_at(3).expect("rebuilds"), *third);

        // The policy is revision 1's already: nothing to write.
        let again = store.rollback(1, None, "carol").await.expect("unchanged");
        assert!(again.commit.unchanged);
        assert_eq!(store.revision(), 4);

        // A stale precondition refuses it.
        let stale = Precondition::Revision(vec![3]);
        let err = store.rollback(3, Some(&stale), "carol").await.unwrap_err();
        assert!(
            matches!(err, StoreError::PreconditionFailed { .. }),
            "{err}"
        );
        assert!(matches!(
            store.preview_rollback(3, Some(&stale)),
            Err(StoreError::PreconditionFailed { .. })
        ));
        assert_eq!(store.revision(), 4);
    }

    #[tokio::test]
    async fn a_rollback_to_a_policy_invalid_today_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        commit(&store, demo()).await;
        commit(
            &store,
            Mutation::upsert(backend("demo/web", "127.0.0.1:9999")),
        )
        .await;
        // Written by a Prism whose rules let this address through.
        let old = backend("demo/web", "not an address");
        store.rewrite_changelog(2, |record| {
            record.changes[0].previous = Some(old.encode_to_vec());
        });
        assert_eq!(
            resources(&store.policy_at(1).expect("rebuilds"))[1],
            old,
            "the history holds what it was"
        );
        let before = store.snapshot();
        for err in [
            store.preview_rollback(1, None).unwrap_err(),
            store.rollback(1, None, "a").await.unwrap_err(),
        ] {
            let StoreError::Invalid(e) = err else {
                panic!("expected a validation error, got {err}")
            };
            assert_eq!(e.field, "endpoints[0].address");
        }
        assert_eq!(store.snapshot(), before);
        assert_eq!(store.history(10, |_| true).expect("history").len(), 2);
    }

    fn ops() -> impl proptest::strategy::Strategy<Value = Vec<(usize, Option<u16>)>> {
        // Which of three backends, and its new port or a delete.
        proptest::collection::vec((0usize..3, proptest::option::of(1u16..4)), 1..12)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// However writes go, every revision's policy is rebuilt exactly.
        #[test]
        fn policy_at_gives_every_committed_snapshot(ops in ops()) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let dir = tempfile::tempdir().expect("tempdir");
                let store = Store::open(dir.path()).expect("opens");
                let mut seen = vec![store.snapshot()];
                seen.push(commit(&store, Mutation::upsert(ns("demo"))).await);
                for (which, port) in ops {
                    let name = format!("demo/b{which}");
                    let mutation = match port {
                        Some(port) => Mutation::upsert(backend(&name, &format!("127.0.0.1:{port}"))),
                        None => Mutation::delete(ResourceKey::new(Kind::Backend, name)),
                    };
                    // Deleting a missing backend, or writing one as it is,
                    // makes no revision.
                    if let Ok(done) = store.commit(mutation, "a", "apply").await
                        && !done.unchanged
                    {
                        seen.push(store.snapshot());
                    }
                }
                for (revision, expected) in seen.iter().enumerate() {
                    let rebuilt = store.policy_at(revision as u64).expect("rebuilds");
                    assert_eq!(rebuilt, **expected, "revision {revision}");
                }
            });
        }
    }
}
