//! The PubSub interface: publish to a topic, subscribe alone or in a consumer
//! group, acknowledge what was handled.
//!
//! Semantics every bus keeps (the conformance suite checks each; where a
//! backend can keep less, its module says so and the suite checks that):
//! - `publish` returns once the bus has taken the message (for NATS
//!   JetStream and Kafka: stored by the broker). With an idempotency key, a
//!   second publish with a key already taken (within the bus's dedupe
//!   window) publishes nothing and returns the first message's id.
//! - `subscribe(topic, None, _)`: this subscriber alone receives every
//!   message published after it subscribed; acks are accepted and ignored.
//! - `subscribe(topic, Some(group), _)`: the group's members share the
//!   topic's messages, each message to one member, from where the group
//!   left off (a new group starts at the messages published after it was
//!   first joined). A message not acked within `BusParams::ack_wait` (or
//!   whose subscriber went away) is delivered again, with `attempt` one
//!   higher: at-least-once.
//! - A subscription holds at most its `bound` deliveries not yet taken by
//!   `next`: a subscriber that stops reading back-pressures its own
//!   delivery, never grows memory. Dropping it frees at once everything it
//!   held: its task, its broker consumer and its buffered deliveries.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
#[cfg(any(feature = "nats", feature = "kafka"))]
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Error;

#[cfg(feature = "kafka")]
mod kafka;
mod keys;
mod memory;
#[cfg(feature = "nats")]
mod nats;

pub use memory::MemoryBus;

/// Subscriptions open in this process, across every bus.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// The number of subscriptions open in this process: what a leak check reads.
pub fn open_subscriptions() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// Where a PubSub binding's messages travel and how it connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusParams {
    /// The namespace whose topics these are: broker-side names are prefixed
    /// with it, so namespaces sharing a broker never see each other's.
    pub namespace: String,
    pub bus: BusKind,
    /// How long a bus keeps a message for groups that have not taken it;
    /// `None` is the bus's own default.
    pub retention: Option<Duration>,
    /// How long a group delivery may go unacknowledged before it is
    /// delivered again.
    pub ack_wait: Duration,
    /// How long connecting may take.
    pub connect_timeout: Duration,
}

/// A PubSub bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusKind {
    /// In this process: the embedded default. Nothing survives a restart.
    Memory,
    /// NATS at `url`; with `stream`, topics are subjects of that JetStream
    /// stream (created if missing) and groups are durable consumers.
    Nats { url: String, stream: Option<String> },
    /// Kafka at `brokers` (comma-separated `host:port`); topics are created
    /// with `partitions` partitions if missing.
    Kafka { brokers: String, partitions: u32 },
}

/// One message handed to a subscriber.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// What [`Subscription::ack`] takes; unique within the topic.
    pub id: String,
    pub topic: String,
    pub payload: Bytes,
    /// 1 on first delivery, higher on each redelivery.
    pub attempt: u32,
}

/// A PubSub bus opened for one namespace.
pub trait PubSub: Send + Sync + fmt::Debug {
    /// Publishes `payload` to `topic`; the message's id.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Bytes,
        idempotency_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, Error>>;

    /// Subscribes to `topic`, alone or as a member of `group`, holding at
    /// most `bound` deliveries not yet taken.
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: Option<&'a str>,
        bound: usize,
    ) -> BoxFuture<'a, Result<Subscription, Error>>;

    /// Ends every subscription and closes the connection.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Acknowledges deliveries of one subscription; shared so that acks may come
/// from another task than the one reading.
pub trait Acker: Send + Sync {
    fn ack<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>>;
}

/// One subscriber's deliveries. Dropping it ends the subscription.
pub struct Subscription {
    deliveries: mpsc::Receiver<Result<Delivery, Error>>,
    acker: Arc<dyn Acker>,
    task: JoinHandle<()>,
}

impl Subscription {
    /// A subscription fed by `task` through `deliveries` (a channel of the
    /// subscriber's bound); the task is aborted when it is dropped.
    pub fn new(
        deliveries: mpsc::Receiver<Result<Delivery, Error>>,
        acker: Arc<dyn Acker>,
        task: JoinHandle<()>,
    ) -> Self {
        OPEN.fetch_add(1, Ordering::Relaxed);
        Subscription {
            deliveries,
            acker,
            task,
        }
    }

    /// The next delivery; `None` once the bus has ended the subscription.
    pub async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        self.deliveries.recv().await
    }

    /// Acknowledges the delivery `id`.
    pub fn ack<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        self.acker.ack(id)
    }

    /// The acknowledger, for acks sent from another task.
    pub fn acker(&self) -> Arc<dyn Acker> {
        Arc::clone(&self.acker)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

/// Opens the bus of `params`: connects (within `connect_timeout`) and
/// checks it can serve, so the first publish finds it ready.
pub async fn open_bus(params: &BusParams) -> Result<Arc<dyn PubSub>, Error> {
    match &params.bus {
        BusKind::Memory => Ok(Arc::new(MemoryBus::new(params))),
        BusKind::Nats { .. } => open_nats(params).await,
        BusKind::Kafka { .. } => open_kafka(params).await,
    }
}

/// Checks a topic name: tokens of `[A-Za-z0-9_-]` separated by `.`, so
/// that it is one subject of NATS (no wildcard) and a legal Kafka name
/// (at most 249 characters with the `prism.` prefix and a namespace of at
/// most 100).
pub(crate) fn check_topic(topic: &str) -> Result<(), Error> {
    let token_ok = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if topic.len() <= 140 && topic.split('.').all(token_ok) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "topic `{topic}` must be `.`-separated tokens of letters, digits, `_` and `-` (140 characters at most)"
        )))
    }
}

/// Checks a group name: one token of `[A-Za-z0-9_-]`, so that it may name a
/// JetStream durable consumer and a Kafka consumer group.
pub(crate) fn check_group(group: &str) -> Result<(), Error> {
    if !group.is_empty()
        && group.len() <= 100
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "group `{group}` must be letters, digits, `_` and `-` (100 characters at most)"
        )))
    }
}

/// Checks what a subscribe names: its topic, its group and its bound.
pub(crate) fn check_subscription(
    topic: &str,
    group: Option<&str>,
    bound: usize,
) -> Result<(), Error> {
    check_topic(topic)?;
    if let Some(group) = group {
        check_group(group)?;
    }
    if bound == 0 {
        return Err(Error::Invalid(
            "a subscription's bound must be at least 1".into(),
        ));
    }
    Ok(())
}

/// The acker of subscriptions whose acks mean nothing: ungrouped ones, and
/// every one of an at-most-once bus.
pub(crate) struct NoAcker;

impl Acker for NoAcker {
    fn ack<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
}

/// Locks `mutex`, recovering from poisoning: every section the buses run
/// under their locks leaves the state whole between statements (none calls
/// out while holding one), so a panic elsewhere cannot leave it
/// half-changed.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A suffix no other name made by this process has, and that names made by
/// other processes are unlikely to share: the process id, the time and a
/// counter.
#[cfg(any(feature = "nats", feature = "kafka"))]
pub(crate) fn unique_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `Closed` once the bus of `closed` was closed.
#[cfg(any(feature = "nats", feature = "kafka"))]
pub(crate) fn open_or_closed(closed: &watch::Sender<bool>) -> Result<(), Error> {
    if *closed.borrow() {
        Err(Error::Closed)
    } else {
        Ok(())
    }
}

/// Returns once the bus of `closed` was closed.
#[cfg(any(feature = "nats", feature = "kafka"))]
pub(crate) async fn wait_closed(mut closed: watch::Receiver<bool>) {
    // An error means the bus itself is gone: closed as well.
    let _ = closed.wait_for(|closed| *closed).await;
}

#[cfg(not(feature = "nats"))]
async fn open_nats(_: &BusParams) -> Result<Arc<dyn PubSub>, Error> {
    Err(Error::Invalid(
        "this proxy was built without the `nats` feature".into(),
    ))
}

#[cfg(not(feature = "kafka"))]
async fn open_kafka(_: &BusParams) -> Result<Arc<dyn PubSub>, Error> {
    Err(Error::Invalid(
        "this proxy was built without the `kafka` feature".into(),
    ))
}

#[cfg(feature = "nats")]
async fn open_nats(params: &BusParams) -> Result<Arc<dyn PubSub>, Error> {
    match &params.bus {
        BusKind::Nats { url, stream } => nats::open(params, url, stream.as_deref()).await,
        _ => Err(Error::Invalid("not a NATS bus".into())),
    }
}

#[cfg(feature = "kafka")]
async fn open_kafka(params: &BusParams) -> Result<Arc<dyn PubSub>, Error> {
    match &params.bus {
        BusKind::Kafka {
            brokers,
            partitions,
        } => kafka::open(params, brokers, *partitions).await,
        _ => Err(Error::Invalid("not a Kafka bus".into())),
    }
}
