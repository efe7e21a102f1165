//! The Kafka bus through rdkafka (librdkafka, built from source).
//!
//! Topic `T` of namespace `N` is the Kafka topic `prism.N.T`, created with
//! the bus's `partitions` (and the brokers' default replication) the first
//! time this bus publishes or subscribes to it, if missing.
//!
//! - `publish` goes through an idempotent producer (`acks=all`) and returns
//!   once the brokers have the message; its id is `partition:offset`.
//!   Messages carry no key, so they spread over the partitions, and order
//!   holds within a partition only. Idempotency keys are deduped in this
//!   process only ([`KEY_WINDOW`], [`MAX_KEYS`]): two proxies publishing the
//!   same key both publish.
//! - A group `G` is the consumer group `prism.N.G` (no auto commit). The
//!   first time a group subscribes to a topic, its offsets are set to the
//!   partitions' ends, so it starts with what is published after it joined.
//!   An ack commits, per partition, the offset after the highest contiguous
//!   acked one, and returns once the commit is done. What is not acked is
//!   delivered again only when its partition moves: when its member leaves
//!   and the group rebalances, or a member rejoins. There is no redelivery
//!   after `ack_wait` (Kafka has none), and `attempt` is always 1: a
//!   redelivery is not counted.
//! - An ungrouped subscriber reads every partition from its end at the
//!   moment it subscribed (an assignment, not a group: nothing is committed
//!   and no group is left behind on the brokers).
//! - A subscriber's consumer prefetches about `bound` messages a partition
//!   (`queued.min.messages`). One whose channel is full pauses its
//!   partitions, so librdkafka fetches nothing more for it, and keeps
//!   polling, so that it still takes part in its group's rebalances. A
//!   message fetched before the pause took hold is put back by seeking to
//!   it.
//!
//! [`KEY_WINDOW`]: super::keys::KEY_WINDOW
//! [`MAX_KEYS`]: super::keys::MAX_KEYS

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};

use super::keys::{KeyWindow, publish_once};
use super::{
    Acker, BusParams, Delivery, NoAcker, PubSub, Subscription, check_group, check_subscription,
    check_topic, lock, open_or_closed, unique_suffix, wait_closed,
};
use crate::Error;

/// How long a new member may take to be given its partitions.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long librdkafka may try to deliver one message.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to the Kafka brokers of `params` and checks they answer.
pub(super) async fn open(
    params: &BusParams,
    brokers: &str,
    partitions: u32,
) -> Result<Arc<dyn PubSub>, Error> {
    check_group(&params.namespace).map_err(|_| {
        Error::Invalid(format!(
            "namespace `{}` cannot name Kafka topics",
            params.namespace
        ))
    })?;
    let partitions = i32::try_from(partitions)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| Error::Invalid(format!("{partitions} is not a partition count")))?;
    let config = client_config(brokers, params.connect_timeout);
    let producer: FutureProducer = config
        .clone()
        // Topics are made by this bus with its partition count, never by a
        // broker's auto-creation on a metadata request.
        .set("allow.auto.create.topics", "false")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", millis(MESSAGE_TIMEOUT))
        .create()
        .map_err(|error| Error::internal("make a Kafka producer", error))?;
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .map_err(|error| Error::internal("make a Kafka admin client", error))?;
    let probe = producer.clone();
    let timeout = params.connect_timeout;
    blocking(move || probe.client().fetch_metadata(None, timeout).map(|_| ()))
        .await
        .map_err(|error| Error::unavailable("reach the Kafka brokers", error))?;
    let (closed, _) = watch::channel(false);
    Ok(Arc::new(KafkaBus {
        brokers: brokers.to_string(),
        prefix: format!("prism.{}", params.namespace),
        partitions,
        timeout,
        producer,
        admin,
        made: Mutex::default(),
        keys: tokio::sync::Mutex::default(),
        closed,
    }))
}

struct KafkaBus {
    brokers: String,
    prefix: String,
    partitions: i32,
    /// How long one call to the brokers may take.
    timeout: Duration,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics this bus made or found, so each is made once.
    made: Mutex<HashSet<String>>,
    keys: tokio::sync::Mutex<KeyWindow>,
    closed: watch::Sender<bool>,
}

type KafkaConsumer = StreamConsumer<MemberContext>;

/// Tells a subscribe that its member was given partitions, and forgets the
/// deliveries of partitions taken away (their new owner starts from the
/// committed offset).
struct MemberContext {
    assigned: watch::Sender<bool>,
    offsets: Arc<Mutex<Offsets>>,
}

/// A group member's deliveries not yet committed, by partition and offset,
/// with whether each was acked.
#[derive(Default)]
struct Offsets {
    by_partition: HashMap<i32, BTreeMap<i64, bool>>,
}

struct KafkaAcker {
    /// Weak, so that an acker kept by someone does not keep the member in
    /// its group once the subscription is dropped.
    consumer: Weak<KafkaConsumer>,
    topic: String,
    offsets: Arc<Mutex<Offsets>>,
}

/// Closes the consumer off the runtime when its task ends: closing leaves
/// the group and waits for the brokers.
struct ConsumerGuard(Option<Arc<KafkaConsumer>>);

impl KafkaBus {
    fn topic_name(&self, topic: &str) -> String {
        format!("{}.{topic}", self.prefix)
    }

    /// Creates `name` if it is missing.
    async fn ensure_topic(&self, name: &str) -> Result<(), Error> {
        if lock(&self.made).contains(name) {
            return Ok(());
        }
        let (probe, topic, timeout) = (self.producer.clone(), name.to_string(), self.timeout);
        let exists = blocking(move || {
            let metadata = probe.client().fetch_metadata(Some(&topic), timeout)?;
            Ok(metadata
                .topics()
                .iter()
                .any(|t| t.error().is_none() && !t.partitions().is_empty()))
        })
        .await
        .map_err(|error| Error::unavailable("read Kafka metadata", error))?;
        if exists {
            lock(&self.made).insert(name.to_string());
            return Ok(());
        }
        let topic = NewTopic::new(name, self.partitions, TopicReplication::Fixed(-1));
        let options = AdminOptions::new()
            .operation_timeout(Some(self.timeout))
            .request_timeout(Some(self.timeout));
        let results = self
            .admin
            .create_topics([&topic], &options)
            .await
            .map_err(|error| Error::unavailable("create a Kafka topic", error))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Error::unavailable(
                        "create a Kafka topic",
                        KafkaError::AdminOp(code),
                    ));
                }
            }
        }
        lock(&self.made).insert(name.to_string());
        Ok(())
    }

    /// A consumer of `name`: in `group`, starting where the group left off
    /// (at the end the first time), or alone, starting at the end.
    async fn consumer(
        &self,
        name: &str,
        group: Option<&str>,
        bound: usize,
    ) -> Result<
        (
            Arc<KafkaConsumer>,
            watch::Receiver<bool>,
            Arc<Mutex<Offsets>>,
        ),
        Error,
    > {
        let (assigned, joined) = watch::channel(false);
        let offsets = Arc::new(Mutex::new(Offsets::default()));
        let group_id = match group {
            Some(group) => format!("{}.{group}", self.prefix),
            // Never joined: librdkafka wants a group id all the same.
            None => format!("{}.alone.{}", self.prefix, unique_suffix()),
        };
        let consumer: KafkaConsumer = client_config(&self.brokers, self.timeout)
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            // librdkafka prefetches up to 100,000 messages a partition by
            // default; a subscription asks for about what it can hold.
            .set("queued.min.messages", bound.to_string())
            // A member that vanishes without leaving the group (a crash)
            // has its partitions moved after six seconds (Kafka's default
            // floor), and rebalances wait no longer than that for a member.
            // librdkafka heartbeats from its own thread, so a subscriber
            // that reads slowly is not taken for gone.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create_with_context(MemberContext {
                assigned,
                offsets: Arc::clone(&offsets),
            })
            .map_err(|error| Error::internal("make a Kafka consumer", error))?;
        let consumer = Arc::new(consumer);
        let (setup, name, timeout) = (Arc::clone(&consumer), name.to_string(), self.timeout);
        let grouped = group.is_some();
        blocking(move || {
            let ends = ends_without_commits(&setup, &name, grouped, timeout)?;
            if grouped {
                // The brokers refuse this commit from outside a group that
                // has members; those members have started the group, and
                // `auto.offset.reset=latest` covers a partition they have
                // not committed yet.
                if ends.count() > 0
                    && let Err(error) = setup.commit(&ends, CommitMode::Sync)
                {
                    tracing::debug!(%error, topic = %name, "Could not start a Kafka group at the end.");
                }
                setup.subscribe(&[&name])
            } else {
                setup.assign(&ends)
            }
        })
        .await
        .map_err(|error| Error::unavailable("start a Kafka consumer", error))?;
        Ok((consumer, joined, offsets))
    }
}

/// The end offset of each partition of `name` that has no committed offset
/// (every partition when `grouped` is false).
fn ends_without_commits(
    consumer: &KafkaConsumer,
    name: &str,
    grouped: bool,
    timeout: Duration,
) -> KafkaResult<TopicPartitionList> {
    let metadata = consumer.fetch_metadata(Some(name), timeout)?;
    let mut all = TopicPartitionList::new();
    for topic in metadata.topics() {
        for partition in topic.partitions() {
            all.add_partition(name, partition.id());
        }
    }
    let missing = if grouped {
        consumer.committed_offsets(all, timeout)?
    } else {
        all
    };
    let mut ends = TopicPartitionList::new();
    for element in missing.elements() {
        if !grouped || element.offset() == Offset::Invalid {
            let (_, high) = consumer.fetch_watermarks(name, element.partition(), timeout)?;
            ends.add_partition_offset(name, element.partition(), Offset::Offset(high))?;
        }
    }
    Ok(ends)
}

impl PubSub for KafkaBus {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Bytes,
        idempotency_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, Error>> {
        Box::pin(async move {
            check_topic(topic)?;
            open_or_closed(&self.closed)?;
            let name = self.topic_name(topic);
            self.ensure_topic(&name).await?;
            let publish = async {
                let record = FutureRecord::<(), [u8]>::to(&name).payload(&payload[..]);
                let delivered = self
                    .producer
                    .send(record, self.timeout)
                    .await
                    .map_err(|(error, _)| Error::unavailable("publish to Kafka", error))?;
                Ok(format!("{}:{}", delivered.partition, delivered.offset))
            };
            publish_once(&self.keys, idempotency_key, publish).await
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: Option<&'a str>,
        bound: usize,
    ) -> BoxFuture<'a, Result<Subscription, Error>> {
        Box::pin(async move {
            check_subscription(topic, group, bound)?;
            open_or_closed(&self.closed)?;
            let name = self.topic_name(topic);
            self.ensure_topic(&name).await?;
            let (consumer, mut joined, offsets) = self.consumer(&name, group, bound).await?;
            let acker: Arc<dyn Acker> = match group {
                Some(_) => Arc::new(KafkaAcker {
                    consumer: Arc::downgrade(&consumer),
                    topic: name,
                    offsets: Arc::clone(&offsets),
                }),
                None => Arc::new(NoAcker),
            };
            let tracked = group.map(|_| offsets);
            let (tx, rx) = mpsc::channel(bound);
            let closed = self.closed.subscribe();
            let topic = topic.to_string();
            let guard = ConsumerGuard(Some(consumer));
            let task = tokio::spawn(async move {
                if let Some(consumer) = &guard.0 {
                    tokio::select! {
                        () = consume(consumer, topic, tracked, &tx) => {}
                        () = wait_closed(closed) => {}
                    }
                }
            });
            let subscription = Subscription::new(rx, acker, task);
            if group.is_some() {
                // The group's rebalance is served by the task's polling; a
                // subscription is ready once its member has partitions (or
                // was told it gets none), so that what is published next is
                // not fetched by a member about to give its partition up.
                match tokio::time::timeout(JOIN_TIMEOUT, joined.wait_for(|joined| *joined)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return Err(Error::internal("join a Kafka group", error)),
                    Err(elapsed) => return Err(Error::unavailable("join a Kafka group", elapsed)),
                }
            }
            Ok(subscription)
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.closed.send_replace(true);
            let (producer, timeout) = (self.producer.clone(), self.timeout);
            if let Err(error) = blocking(move || producer.flush(timeout)).await {
                tracing::debug!(%error, "Flushing the Kafka producer failed.");
            }
        })
    }
}

/// Feeds `tx` from `consumer`, never fetching past what `tx` has room for.
async fn consume(
    consumer: &KafkaConsumer,
    topic: String,
    tracked: Option<Arc<Mutex<Offsets>>>,
    tx: &mpsc::Sender<Result<Delivery, Error>>,
) {
    loop {
        let permit = match tx.try_reserve() {
            Ok(permit) => permit,
            Err(TrySendError::Closed(())) => return,
            Err(TrySendError::Full(())) => match wait_for_room(consumer, tx).await {
                Some(permit) => permit,
                None => return,
            },
        };
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(error) => {
                // librdkafka reports broker trouble here and recovers by
                // itself; the subscription goes on.
                tracing::warn!(%error, %topic, "A Kafka consumer reported an error.");
                continue;
            }
        };
        let (partition, offset) = (message.partition(), message.offset());
        if let Some(offsets) = &tracked {
            lock(offsets)
                .by_partition
                .entry(partition)
                .or_default()
                .insert(offset, false);
        }
        permit.send(Ok(Delivery {
            id: format!("{partition}:{offset}"),
            topic: topic.clone(),
            payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            attempt: 1,
        }));
    }
}

/// Waits for room in `tx` with the consumer's partitions paused, polling
/// all the while so that the member keeps taking part in rebalances.
async fn wait_for_room<'a>(
    consumer: &KafkaConsumer,
    tx: &'a mpsc::Sender<Result<Delivery, Error>>,
) -> Option<mpsc::Permit<'a, Result<Delivery, Error>>> {
    pause(consumer);
    let permit = loop {
        tokio::select! {
            permit = tx.reserve() => break permit.ok(),
            received = consumer.recv() => {
                if let Ok(message) = received {
                    // Fetched before the pause took hold, or from a
                    // partition given since: pause again and put it back.
                    pause(consumer);
                    let put_back = consumer.seek(
                        message.topic(),
                        message.partition(),
                        Offset::Offset(message.offset()),
                        Duration::ZERO,
                    );
                    if let Err(error) = put_back {
                        tracing::warn!(%error, "A Kafka consumer could not seek back to a paused message.");
                    }
                }
            }
        }
    };
    if let Ok(assignment) = consumer.assignment()
        && let Err(error) = consumer.resume(&assignment)
    {
        tracing::warn!(%error, "A Kafka consumer could not resume its partitions.");
    }
    permit
}

fn pause(consumer: &KafkaConsumer) {
    if let Ok(assignment) = consumer.assignment()
        && let Err(error) = consumer.pause(&assignment)
    {
        tracing::warn!(%error, "A Kafka consumer could not pause its partitions.");
    }
}

impl ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(_) => {
                self.assigned.send_replace(true);
            }
            Rebalance::Revoke(partitions) => {
                let mut offsets = lock(&self.offsets);
                for element in partitions.elements() {
                    offsets.by_partition.remove(&element.partition());
                }
            }
            Rebalance::Error(error) => {
                tracing::warn!(%error, "A Kafka group rebalance failed.");
            }
        }
    }
}

impl Offsets {
    /// Marks `offset` of `partition` acked; the offset to commit when that
    /// makes the acked run from the oldest delivery longer.
    fn ack(&mut self, partition: i32, offset: i64) -> Option<i64> {
        let delivered = self.by_partition.get_mut(&partition)?;
        *delivered.get_mut(&offset)? = true;
        let mut commit = None;
        while let Some((&oldest, true)) = delivered.first_key_value().map(|(o, a)| (o, *a)) {
            delivered.pop_first();
            commit = Some(oldest + 1);
        }
        commit
    }
}

impl Acker for KafkaAcker {
    fn ack<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let (partition, offset) = id
                .split_once(':')
                .and_then(|(p, o)| Some((p.parse::<i32>().ok()?, o.parse::<i64>().ok()?)))
                .ok_or_else(|| {
                    Error::Invalid(format!("`{id}` is not a delivery id of this bus"))
                })?;
            // An offset not tracked was acked already or its partition
            // moved to another member: nothing to commit.
            let Some(next) = lock(&self.offsets).ack(partition, offset) else {
                return Ok(());
            };
            let consumer = self.consumer.upgrade().ok_or(Error::Closed)?;
            let mut commit = TopicPartitionList::new();
            commit
                .add_partition_offset(&self.topic, partition, Offset::Offset(next))
                .map_err(|error| Error::internal("commit a Kafka offset", error))?;
            blocking(move || consumer.commit(&commit, CommitMode::Sync))
                .await
                .map_err(|error| Error::unavailable("commit a Kafka offset", error))
        })
    }
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        let Some(consumer) = self.0.take() else {
            return;
        };
        // Outside a runtime the consumer closes here, on this thread.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(move || drop(consumer));
        }
    }
}

impl fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBus")
            .field("brokers", &self.brokers)
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

fn client_config(brokers: &str, connect_timeout: Duration) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        // librdkafka's floor for this setting is one second.
        .set(
            "socket.connection.setup.timeout.ms",
            millis(connect_timeout.max(Duration::from_secs(1))),
        );
    config
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// Runs a blocking librdkafka call off the runtime's threads.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> KafkaResult<T> + Send + 'static,
) -> KafkaResult<T> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or_else(|_| Err(KafkaError::Canceled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_waits_for_the_oldest_delivery_to_be_acked() {
        let mut offsets = Offsets::default();
        for offset in 10..14 {
            offsets
                .by_partition
                .entry(0)
                .or_default()
                .insert(offset, false);
        }
        assert_eq!(offsets.ack(0, 11), None, "10 is not acked yet");
        assert_eq!(offsets.ack(0, 10), Some(12), "10 and 11 are");
        assert_eq!(offsets.ack(0, 13), None);
        assert_eq!(offsets.ack(0, 12), Some(14));
        assert_eq!(offsets.ack(0, 12), None, "acked twice");
        assert_eq!(offsets.ack(1, 0), None, "a partition not held");
    }
}
