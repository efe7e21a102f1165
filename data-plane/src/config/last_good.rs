//! The last-known-good snapshot on disk, so a proxy restarted while the
//! control plane is unreachable serves what it last accepted.
//!
//! The file is `<data dir>/last-good.pb`: one protobuf message defined here
//! (format number, revision, the subset it was accepted for, and every
//! resource as its kind's type URL, content version and protobuf encoding).
//! It is replaced atomically: a temp file in the same directory is written and
//! fsynced, renamed over the old file, and the directory is fsynced, so a
//! crash leaves either the old file or the new one, never a torn one.
//!
//! Writing happens in a background task fed by a `watch` channel: a burst of
//! accepted revisions is one write of the newest, writes are at least
//! [`SAVE_EVERY`] apart, and a slow disk never delays the discovery stream or
//! a request. A failed write is logged and serving goes on.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prism_proto::{Kind, Resource, Snapshot, Versioned, validate_snapshot};
use prost::Message;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::background;

/// Name of the snapshot file inside the data directory.
pub const FILE_NAME: &str = "last-good.pb";
/// The encoding written here; a file of another format is not read.
const FORMAT: u32 = 1;

/// The shortest time between two writes of the file. Encoding a
/// 10,000-route policy takes about ten milliseconds of the CPU the
/// requests share; a proxy restarted within this much of a change restores
/// the revision before it and catches up from the control plane.
pub(crate) const SAVE_EVERY: Duration = Duration::from_secs(2);

/// Distinguishes temp files of writers in one process (tests run several).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The file's message.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredSnapshot {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(uint64, tag = "2")]
    revision: u64,
    /// `subset::describe` of the proxy that accepted it.
    #[prost(string, tag = "3")]
    subset: String,
    #[prost(message, repeated, tag = "4")]
    resources: Vec<StoredResource>,
}

/// One resource of [`StoredSnapshot`].
#[derive(Clone, PartialEq, prost::Message)]
struct StoredResource {
    /// `Kind::type_url`, e.g. `type.googleapis.com/prism.config.v1.Route`.
    #[prost(string, tag = "1")]
    type_url: String,
    /// The version the control plane gave it, presented again on resume.
    #[prost(string, tag = "2")]
    version: String,
    /// The resource's protobuf encoding.
    #[prost(bytes = "vec", tag = "3")]
    value: Vec<u8>,
}

/// Why the snapshot file could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("cannot read the file: {0}")]
    Io(#[from] io::Error),
    #[error("the file is not a snapshot: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("the file has format {found}, this proxy reads format {FORMAT}")]
    Format { found: u32 },
    #[error("resources[{index}]: unknown type URL `{type_url}`")]
    Kind { index: usize, type_url: String },
    #[error("resources[{index}] ({kind}): cannot decode: {source}")]
    Resource {
        index: usize,
        kind: Kind,
        source: prost::DecodeError,
    },
    #[error("the snapshot is invalid: {0}")]
    Invalid(String),
    #[error("it was accepted for subset `{stored}`, this proxy serves `{current}`")]
    Subset { stored: String, current: String },
}

/// The snapshot file of one proxy.
#[derive(Debug, Clone)]
pub(crate) struct LastGood {
    dir: PathBuf,
    /// `subset::describe` of this proxy.
    subset: String,
}

impl LastGood {
    /// The file in `dir` of a proxy serving `subset`.
    pub(crate) fn new(dir: impl Into<PathBuf>, subset: String) -> Self {
        Self {
            dir: dir.into(),
            subset,
        }
    }

    /// Full path of the snapshot file.
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Reads and validates the snapshot; `Ok(None)` when there is no file.
    pub(crate) fn load(&self) -> Result<Option<Snapshot>, LoadError> {
        let bytes = match fs::read(self.path()) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let snapshot = decode(&bytes, &self.subset)?;
        validate_snapshot(&snapshot).map_err(|e| LoadError::Invalid(e.to_string()))?;
        Ok(Some(snapshot))
    }

    /// Replaces the file with `snapshot`, atomically and durably.
    #[cfg(test)]
    pub(crate) fn store(&self, snapshot: &Snapshot) -> io::Result<()> {
        self.write(&self.encode(snapshot))
    }

    /// The file's contents for `snapshot`.
    pub(crate) fn encode(&self, snapshot: &Snapshot) -> Vec<u8> {
        encode(snapshot, &self.subset)
    }

    /// Replaces the file with `bytes` (an encoded snapshot), atomically and
    /// durably: written to a temp file, synced, renamed over the file, and
    /// the directory synced.
    pub(crate) fn write(&self, bytes: &[u8]) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let temp = self.dir.join(format!(
            ".{FILE_NAME}.{}.{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result =
            write_and_rename(&temp, &self.path(), bytes).and_then(|()| sync_dir(&self.dir));
        if result.is_err() {
            // Best effort: the temp file is garbage whether or not this works.
            let _ = fs::remove_file(&temp);
        }
        result
    }
}

/// Writes every snapshot sent on `accepted` to `file`, newest first, at most
/// once per `every`: what is accepted meanwhile waits, and a value replaced
/// before its write started is skipped. A proxy swapping a large policy
/// twice a second so saves it a few times a minute, not each time; the file
/// is recovery data, and every version of it is a whole accepted snapshot.
/// Once the sender is gone the newest value is written at once, and the
/// loop returns when it is on disk.
pub(crate) async fn write_loop(
    file: Arc<LastGood>,
    mut accepted: watch::Receiver<Option<Snapshot>>,
    every: Duration,
) {
    // A second receiver, to learn that the sender is gone while waiting.
    let mut closing = accepted.clone();
    while accepted.changed().await.is_ok() {
        let Some(snapshot) = accepted.borrow_and_update().clone() else {
            continue;
        };
        save(&file, snapshot).await;
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = sender_gone(&mut closing) => {}
        }
    }
}

/// Resolves once `receiver`'s sender is gone.
async fn sender_gone(receiver: &mut watch::Receiver<Option<Snapshot>>) {
    while receiver.changed().await.is_ok() {}
}

/// Encodes `snapshot` as configuration work (it is the whole policy) and
/// writes it from a blocking thread (writing and syncing wait on the disk,
/// not the CPU, and must not hold up the configuration thread).
async fn save(file: &Arc<LastGood>, snapshot: Snapshot) {
    let revision = snapshot.revision;
    let encoder = Arc::clone(file);
    let bytes = match background::run(move || encoder.encode(&snapshot)).await {
        Ok(bytes) => bytes,
        Err(error) => {
            warn!(%error, revision, "The snapshot writer failed.");
            return;
        }
    };
    let writer = Arc::clone(file);
    match tokio::task::spawn_blocking(move || writer.write(&bytes)).await {
        Ok(Ok(())) => {
            debug!(revision, path = %file.path().display(), "Saved the last-known-good snapshot.")
        }
        Ok(Err(error)) => warn!(
            %error,
            revision,
            path = %file.path().display(),
            "Failed to save the last-known-good snapshot; serving goes on."
        ),
        Err(error) => warn!(%error, revision, "The snapshot writer failed."),
    }
}

/// Reads the file for startup: `None` (after a warning) when it is missing,
/// unreadable, corrupt, invalid or of another subset.
pub(crate) async fn restore(file: Arc<LastGood>) -> Option<Snapshot> {
    let path = file.path();
    match tokio::task::spawn_blocking(move || file.load()).await {
        Ok(Ok(Some(snapshot))) => {
            info!(
                revision = snapshot.revision,
                resources = snapshot.len(),
                path = %path.display(),
                "Loaded the last-known-good snapshot."
            );
            Some(snapshot)
        }
        Ok(Ok(None)) => {
            debug!(path = %path.display(), "No last-known-good snapshot yet.");
            None
        }
        Ok(Err(error)) => {
            warn!(%error, path = %path.display(), "Ignoring the last-known-good snapshot; starting empty.");
            None
        }
        Err(error) => {
            warn!(%error, "Reading the last-known-good snapshot failed; starting empty.");
            None
        }
    }
}

/// The [`StoredSnapshot`] of `snapshot`, byte for byte as prost encodes it,
/// written straight into one buffer: each resource is encoded in place, with
/// no copy of its type URL, version or encoding of its own. It is the whole
/// policy, encoded on the configuration thread.
fn encode(snapshot: &Snapshot, subset: &str) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

    /// A length-delimited field's key and length prefix.
    fn prefix(tag: u32, len: usize, buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(len as u64, buf);
    }
    /// A length-delimited field's size, as proto3 writes it (not at all
    /// when empty).
    fn field_len(tag: u32, len: usize) -> usize {
        if len == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(len as u64) + len
        }
    }

    let header = StoredSnapshot {
        format: FORMAT,
        revision: snapshot.revision,
        subset: subset.to_string(),
        resources: Vec::new(),
    };
    let mut buf = Vec::with_capacity(header.encoded_len() + snapshot.len() * 256);
    // `encode` fails only for a buffer that cannot grow; a `Vec` can.
    let _ = header.encode(&mut buf);
    for versioned in snapshot.iter() {
        let type_url = versioned.resource.kind().type_url();
        let value_len = versioned.resource.encoded_len();
        let len = field_len(1, type_url.len())
            + field_len(2, versioned.version.len())
            + field_len(3, value_len);
        prefix(4, len, &mut buf);
        for (tag, text) in [(1, type_url), (2, versioned.version.as_str())] {
            if !text.is_empty() {
                prefix(tag, text.len(), &mut buf);
                buf.extend_from_slice(text.as_bytes());
            }
        }
        if value_len > 0 {
            prefix(3, value_len, &mut buf);
            versioned.resource.encode_into(&mut buf);
        }
    }
    buf
}

fn decode(bytes: &[u8], subset: &str) -> Result<Snapshot, LoadError> {
    let stored = StoredSnapshot::decode(bytes)?;
    if stored.format != FORMAT {
        return Err(LoadError::Format {
            found: stored.format,
        });
    }
    if stored.subset != subset {
        return Err(LoadError::Subset {
            stored: stored.subset,
            current: subset.to_string(),
        });
    }
    let mut snapshot = Snapshot::empty(stored.revision);
    for (index, entry) in stored.resources.into_iter().enumerate() {
        let kind = Kind::from_type_url(&entry.type_url).ok_or_else(|| LoadError::Kind {
            index,
            type_url: entry.type_url.clone(),
        })?;
        let resource =
            Resource::decode(kind, &entry.value).map_err(|source| LoadError::Resource {
                index,
                kind,
                source,
            })?;
        snapshot.insert_versioned(Arc::new(Versioned {
            resource,
            version: entry.version,
        }));
    }
    Ok(snapshot)
}

fn write_and_rename(temp: &Path, target: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    // The snapshot holds Secrets, private keys among them: owner only.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(temp, target)
}

/// Makes the rename durable. Directories cannot be opened for fsync on
/// every platform; where they cannot, the rename is as durable as it gets.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = (dir, File::open);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prism_proto::pb::config::v1::{Endpoint, Namespace, Route, RouteMatch, route_match};

    use super::*;

    fn snapshot(revision: u64) -> Snapshot {
        let mut snapshot = Snapshot::from_resources(
            revision,
            [
                Resource::Namespace(Namespace {
                    name: "demo".into(),
                    hosts: vec!["demo.local".into()],
                    labels: [("env".to_string(), "prod".to_string())].into(),
                    ..Default::default()
                }),
                Resource::Route(Route {
                    name: "demo/root".into(),
                    r#match: Some(RouteMatch {
                        host: String::new(),
                        path: Some(route_match::Path::Prefix("/".into())),
                        ..Default::default()
                    }),
                    backend: "upstream".into(),
                    ..Default::default()
                }),
            ],
        );
        // A version the control plane chose is kept as it is, not recomputed.
        snapshot.insert_versioned(Arc::new(Versioned {
            resource: Resource::Backend(prism_proto::Backend {
                name: "demo/upstream".into(),
                endpoints: vec![Endpoint {
                    address: "127.0.0.1:8081".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            version: "server-chosen-7".into(),
        }));
        snapshot
    }

    fn temp_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn the_file_is_the_stored_snapshot_message_byte_for_byte() {
        let mut snapshot = snapshot(3);
        // A resource whose encoding is empty: proto3 leaves out empty fields.
        snapshot.insert_versioned(Arc::new(Versioned {
            resource: Resource::Namespace(prism_proto::pb::config::v1::Namespace::default()),
            version: String::new(),
        }));
        let message = StoredSnapshot {
            format: FORMAT,
            revision: 3,
            subset: "namespaces=;selector=".into(),
            resources: snapshot
                .iter()
                .map(|v| StoredResource {
                    type_url: v.resource.kind().type_url().to_string(),
                    version: v.version.clone(),
                    value: v.resource.encode_to_vec(),
                })
                .collect(),
        };
        assert_eq!(
            encode(&snapshot, "namespaces=;selector="),
            message.encode_to_vec()
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_snapshot_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = LastGood::new(dir.path(), "namespaces=;selector=".into());
        file.store(&snapshot(1)).expect("store");
        let mode = fs::metadata(file.path())
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn store_then_load_round_trips_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = LastGood::new(dir.path().join("nested"), "namespaces=;selector=".into());
        assert!(file.load().expect("no file is fine").is_none());

        file.store(&snapshot(7)).expect("store");
        assert_eq!(file.load().expect("load"), Some(snapshot(7)));

        // Replacing keeps exactly one file and no temp files behind.
        let mut next = snapshot(9);
        next.remove(&prism_proto::ResourceKey::new(Kind::Route, "demo/root"));
        file.store(&next).expect("store again");
        let loaded = file.load().expect("load").expect("a snapshot");
        assert_eq!(loaded, next);
        assert_eq!(loaded.revision, 9);
        assert!(loaded.iter().any(|v| v.version == "server-chosen-7"));
        assert!(temp_files(&dir.path().join("nested")).is_empty());
    }

    #[test]
    fn corrupt_foreign_or_invalid_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = LastGood::new(dir.path(), "namespaces=;selector=".into());

        fs::write(file.path(), b"\xff\xff\xff garbage").expect("write");
        assert!(
            matches!(file.load(), Err(LoadError::Decode(_))),
            "{:?}",
            file.load()
        );

        // A truncated file (as a torn write would leave) does not decode either.
        let bytes = encode(&snapshot(3), "namespaces=;selector=");
        fs::write(file.path(), &bytes[..bytes.len() - 5]).expect("write");
        assert!(file.load().is_err());

        let other = LastGood::new(dir.path(), "namespaces=a;selector=".into());
        file.store(&snapshot(3)).expect("store");
        assert!(matches!(other.load(), Err(LoadError::Subset { .. })));

        let mut stored = StoredSnapshot::decode(bytes.as_slice()).expect("decode");
        stored.format = 99;
        fs::write(file.path(), stored.encode_to_vec()).expect("write");
        assert!(matches!(file.load(), Err(LoadError::Format { found: 99 })));

        // A route whose backend is missing fails validation.
        let mut invalid = snapshot(4);
        invalid.remove(&prism_proto::ResourceKey::new(
            Kind::Backend,
            "demo/upstream",
        ));
        fs::write(file.path(), encode(&invalid, "namespaces=;selector=")).expect("write");
        assert!(matches!(file.load(), Err(LoadError::Invalid(_))));
    }

    #[tokio::test]
    async fn restore_starts_empty_on_a_corrupt_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = Arc::new(LastGood::new(dir.path(), String::new()));
        fs::write(file.path(), b"not a snapshot").expect("write");
        assert_eq!(restore(Arc::clone(&file)).await, None);
        file.store(&snapshot(5)).expect("store");
        assert_eq!(restore(file).await.map(|s| s.revision), Some(5));
    }

    #[tokio::test]
    async fn write_loop_saves_the_newest_and_finishes_when_the_sender_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = Arc::new(LastGood::new(dir.path(), String::new()));
        let (tx, rx) = watch::channel(None);
        let writer = tokio::spawn(write_loop(Arc::clone(&file), rx, SAVE_EVERY));
        tx.send_replace(Some(snapshot(1)));
        tx.send_replace(Some(snapshot(2)));
        drop(tx);
        writer.await.expect("writer ends");
        assert_eq!(file.load().expect("load").map(|s| s.revision), Some(2));
    }

    /// `revision` once it is on disk, waiting for the writer (whose work
    /// runs on other threads) without letting paused time move; `None` if it
    /// is not there within `within` of real time.
    async fn on_disk(file: &LastGood, revision: u64, within: Duration) -> Option<u64> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(snapshot)) = file.load()
                && snapshot.revision == revision
            {
                return Some(revision);
            }
            tokio::task::yield_now().await;
        }
        None
    }

    #[tokio::test(start_paused = true)]
    async fn writes_are_at_least_save_every_apart_and_the_last_is_written_at_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = Arc::new(LastGood::new(dir.path(), String::new()));
        let (tx, rx) = watch::channel(None);
        let writer = tokio::spawn(write_loop(Arc::clone(&file), rx, SAVE_EVERY));
        tx.send_replace(Some(snapshot(1)));
        let long = Duration::from_secs(10);
        assert_eq!(on_disk(&file, 1, long).await, Some(1), "the first, at once");
        tx.send_replace(Some(snapshot(2)));
        tx.send_replace(Some(snapshot(3)));
        // Half the interval on, the writer still waits; a writer that did
        // not would have written within this spin, during which paused time
        // stands still.
        tokio::time::advance(SAVE_EVERY / 2).await;
        let short = Duration::from_millis(300);
        assert_eq!(on_disk(&file, 3, short).await, None, "written too soon");
        tokio::time::advance(SAVE_EVERY).await;
        assert_eq!(
            on_disk(&file, 3, long).await,
            Some(3),
            "the newest, once due"
        );
        tx.send_replace(Some(snapshot(4)));
        drop(tx);
        writer.await.expect("writer ends");
        assert_eq!(file.load().expect("load").map(|s| s.revision), Some(4));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_failed_write_is_logged_and_the_loop_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A regular file where the directory should be: every write fails.
        let blocker = dir.path().join("blocked");
        fs::write(&blocker, b"").expect("write");
        let file = Arc::new(LastGood::new(&blocker, String::new()));
        let (tx, rx) = watch::channel(None);
        let writer = tokio::spawn(write_loop(Arc::clone(&file), rx, SAVE_EVERY));
        tx.send_replace(Some(snapshot(1)));
        tx.send_replace(Some(snapshot(2)));
        drop(tx);
        writer.await.expect("the writer survives failed writes");
        assert!(file.store(&snapshot(3)).is_err());
    }
}
