//! NATS buses through async-nats: JetStream when the binding names a
//! stream, core NATS when it does not.
//!
//! Topic `T` of namespace `N` is the subject `prism.N.T`.
//!
//! With a stream (at-least-once):
//! - `open` makes sure the stream exists and takes `prism.N.>` (adding the
//!   subject to a stream that lacks it), with `max_age` the binding's
//!   retention ([`DEFAULT_RETENTION`] when unset).
//! - `publish` waits for the stream's ack; the id is the stream sequence.
//!   An idempotency key is sent as `Nats-Msg-Id`, so the stream drops a
//!   repeat within its duplicate window (two minutes, or the retention if
//!   shorter) and answers with the first message's sequence.
//! - A group is a durable pull consumer per group and topic (explicit ack,
//!   `ack_wait`, filtered on the topic's subject, new messages only when
//!   first made). The server redelivers what is not acked within `ack_wait`
//!   and counts the attempts. A member that goes away gives its deliveries
//!   back after `ack_wait`, not at once: the server cannot tell.
//! - An ungrouped subscriber is an ephemeral consumer of new messages
//!   without acks, deleted when the subscription is dropped (and by the
//!   server after a minute of inactivity if that delete is lost).
//! - Each subscription pulls at most as many messages as its channel has
//!   room for, so a subscriber that stops reading holds `bound` deliveries
//!   and the server keeps the rest.
//!
//! Without a stream (core NATS, at-most-once):
//! - `publish` returns once the server has the message (a flush); nothing
//!   is stored, and a topic without subscribers drops it. The id is made
//!   here and travels in the `Prism-Msg-Id` header. Idempotency keys are
//!   deduped in this process only ([`KEY_WINDOW`], [`MAX_KEYS`]): two
//!   proxies publishing the same key both publish.
//! - A group is a queue group; acks are accepted and do nothing; nothing is
//!   ever delivered again.
//! - A subscriber that stops reading holds `bound` deliveries in its
//!   channel and at most [`CLIENT_BUFFER`] more in the client behind it;
//!   past that the client drops messages for it (NATS's slow consumer).
//!
//! [`KEY_WINDOW`]: super::keys::KEY_WINDOW
//! [`MAX_KEYS`]: super::keys::MAX_KEYS

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::keys::{KeyWindow, publish_once};
use super::{
    Acker, BusParams, Delivery, NoAcker, PubSub, Subscription, check_group, check_subscription,
    check_topic, lock, open_or_closed, unique_suffix, wait_closed,
};
use crate::Error;

/// How long a stream this bus makes keeps a message when the binding does
/// not say.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// The stream's duplicate window, when the retention is not shorter.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 60);
/// How long one pull request waits for messages before the next is sent.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How long the server keeps an ephemeral consumer nobody pulls from.
const EPHEMERAL_INACTIVE: Duration = Duration::from_secs(60);
/// How many messages the client buffers for one of its subscriptions
/// (async-nats's default is 65,536); past it, it drops them and reports a
/// slow consumer. A pull never asks for more than this.
const CLIENT_BUFFER: usize = 4096;
/// The header carrying a core NATS message's id.
const MSG_ID_HEADER: &str = "Prism-Msg-Id";

/// Connects to NATS at `url` and opens the bus of `params`.
pub(super) async fn open(
    params: &BusParams,
    url: &str,
    stream: Option<&str>,
) -> Result<Arc<dyn PubSub>, Error> {
    check_group(&params.namespace).map_err(|_| {
        Error::Invalid(format!(
            "namespace `{}` cannot name NATS subjects",
            params.namespace
        ))
    })?;
    let connecting = async_nats::ConnectOptions::new()
        .connection_timeout(params.connect_timeout)
        .subscription_capacity(CLIENT_BUFFER)
        .connect(url);
    let client = match tokio::time::timeout(params.connect_timeout, connecting).await {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => return Err(Error::unavailable("connect to NATS", error)),
        Err(elapsed) => return Err(Error::unavailable("connect to NATS", elapsed)),
    };
    let prefix = format!("prism.{}", params.namespace);
    let (closed, _) = watch::channel(false);
    Ok(match stream {
        Some(name) => {
            let js = jetstream::new(client.clone());
            let stream = tokio::time::timeout(
                params.connect_timeout,
                ensure_stream(&js, name, &prefix, params.retention),
            )
            .await
            .map_err(|elapsed| Error::unavailable("make the JetStream stream", elapsed))??;
            Arc::new(JetStreamBus {
                client,
                js,
                stream,
                prefix,
                ack_wait: params.ack_wait,
                closed,
            })
        }
        None => Arc::new(CoreBus {
            id_base: id_base(&client),
            client,
            prefix,
            keys: tokio::sync::Mutex::default(),
            next_id: AtomicU64::new(1),
            closed,
        }),
    })
}

/// Makes sure stream `name` exists and takes the namespace's subjects.
async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
    retention: Option<Duration>,
) -> Result<stream::Stream, Error> {
    let subjects = format!("{prefix}.>");
    let max_age = retention.unwrap_or(DEFAULT_RETENTION);
    let config = stream::Config {
        name: name.to_string(),
        subjects: vec![subjects.clone()],
        max_age,
        duplicate_window: DUPLICATE_WINDOW.min(max_age),
        ..Default::default()
    };
    let mut stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|error| Error::unavailable("make the JetStream stream", error))?;
    let mut config = stream
        .info()
        .await
        .map_err(|error| Error::unavailable("read the JetStream stream", error))?
        .config
        .clone();
    if !config.subjects.contains(&subjects) {
        // A stream shared by namespaces: add this one's subjects.
        config.subjects.push(subjects);
        js.update_stream(config)
            .await
            .map_err(|error| Error::unavailable("add subjects to the JetStream stream", error))?;
    }
    Ok(stream)
}

/// A bus whose topics are subjects of one JetStream stream.
struct JetStreamBus {
    client: Client,
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
    ack_wait: Duration,
    closed: watch::Sender<bool>,
}

/// A bus on core NATS: at most once.
struct CoreBus {
    client: Client,
    prefix: String,
    /// Held across a keyed publish, so that two publishes of one key cannot
    /// both find it absent.
    keys: tokio::sync::Mutex<KeyWindow>,
    /// What makes this bus's message ids unique among publishers.
    id_base: String,
    next_id: AtomicU64,
    closed: watch::Sender<bool>,
}

/// Holds a group subscription's deliveries until they are acked.
struct JetStreamAcker {
    held: Mutex<HashMap<u64, (jetstream::Message, Instant)>>,
    /// Past this a held delivery was given to someone again by the server;
    /// forgetting it keeps the map bounded by what one `ack_wait` brings.
    keep: Duration,
}

/// Deletes an ephemeral consumer when its subscription's task ends.
struct EphemeralGuard {
    stream: stream::Stream,
    name: String,
}

impl JetStreamBus {
    async fn consumer(&self, topic: &str, group: Option<&str>) -> Result<PullConsumer, Error> {
        let filter_subject = format!("{}.{topic}", self.prefix);
        let result = match group {
            Some(group) => {
                let durable = durable_name(group, topic);
                let config = pull::Config {
                    durable_name: Some(durable.clone()),
                    deliver_policy: DeliverPolicy::New,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    filter_subject,
                    ..Default::default()
                };
                self.stream.get_or_create_consumer(&durable, config).await
            }
            None => {
                let config = pull::Config {
                    name: Some(format!("prism-{}", unique_suffix())),
                    deliver_policy: DeliverPolicy::New,
                    ack_policy: AckPolicy::None,
                    filter_subject,
                    inactive_threshold: EPHEMERAL_INACTIVE,
                    ..Default::default()
                };
                self.stream.create_consumer(config).await
            }
        };
        result.map_err(|error| Error::unavailable("make a JetStream consumer", error))
    }
}

impl PubSub for JetStreamBus {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Bytes,
        idempotency_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, Error>> {
        Box::pin(async move {
            check_topic(topic)?;
            open_or_closed(&self.closed)?;
            let mut message = PublishMessage::build().payload(payload);
            if let Some(key) = idempotency_key {
                message = message.message_id(key);
            }
            let subject = format!("{}.{topic}", self.prefix);
            let ack = self
                .js
                .send_publish(subject, message)
                .await
                .map_err(publish_error)?
                .await
                .map_err(publish_error)?;
            Ok(ack.sequence.to_string())
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
            let consumer = self.consumer(topic, group).await?;
            let (tx, rx) = mpsc::channel(bound);
            let guard = match group {
                Some(_) => None,
                None => Some(EphemeralGuard {
                    stream: self.stream.clone(),
                    name: consumer.cached_info().name.clone(),
                }),
            };
            let acks = group.map(|_| {
                Arc::new(JetStreamAcker {
                    held: Mutex::default(),
                    keep: self.ack_wait * 2,
                })
            });
            let acker: Arc<dyn Acker> = match &acks {
                Some(acks) => acks.clone(),
                None => Arc::new(NoAcker),
            };
            let closed = self.closed.subscribe();
            let topic = topic.to_string();
            let task = tokio::spawn(async move {
                let _guard = guard;
                tokio::select! {
                    () = pull(consumer, topic, acks, &tx) => {}
                    () = wait_closed(closed) => {}
                }
            });
            Ok(Subscription::new(rx, acker, task))
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(close(&self.client, &self.closed))
    }
}

/// Pulls from `consumer` into `tx`, never more than `tx` has room for.
async fn pull(
    consumer: PullConsumer,
    topic: String,
    acks: Option<Arc<JetStreamAcker>>,
    tx: &mpsc::Sender<Result<Delivery, Error>>,
) {
    loop {
        let Ok(permit) = tx.reserve().await else {
            return;
        };
        // Only this task sends, so the room counted here stays free.
        let room = (1 + tx.capacity()).min(CLIENT_BUFFER);
        let batch = consumer
            .batch()
            .max_messages(room)
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                permit.send(Err(Error::unavailable("pull from JetStream", error)));
                return;
            }
        };
        let mut permit = Some(permit);
        while let Some(message) = batch.next().await {
            let delivery = message
                .map_err(|error| Error::unavailable("pull from JetStream", error))
                .and_then(|message| {
                    let info = message
                        .info()
                        .map_err(|error| Error::internal("read a JetStream delivery", error))?;
                    let (seq, attempt) = (info.stream_sequence, info.delivered);
                    let delivery = Delivery {
                        id: seq.to_string(),
                        topic: topic.clone(),
                        payload: message.payload.clone(),
                        attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                    };
                    if let Some(acks) = &acks {
                        acks.hold(seq, message);
                    }
                    Ok(delivery)
                });
            let failed = delivery.is_err();
            let sent = match permit.take() {
                Some(permit) => {
                    permit.send(delivery);
                    true
                }
                None => tx.send(delivery).await.is_ok(),
            };
            if failed || !sent {
                return;
            }
        }
    }
}

impl PubSub for CoreBus {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Bytes,
        idempotency_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, Error>> {
        Box::pin(async move {
            check_topic(topic)?;
            open_or_closed(&self.closed)?;
            let publish = async {
                let id = format!(
                    "{}-{}",
                    self.id_base,
                    self.next_id.fetch_add(1, Ordering::Relaxed)
                );
                let mut headers = HeaderMap::new();
                headers.insert(MSG_ID_HEADER, id.as_str());
                let subject = format!("{}.{topic}", self.prefix);
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|error| Error::unavailable("publish to NATS", error))?;
                self.client
                    .flush()
                    .await
                    .map_err(|error| Error::unavailable("publish to NATS", error))?;
                Ok(id)
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
            let subject = format!("{}.{topic}", self.prefix);
            let subscribed = match group {
                Some(group) => {
                    self.client
                        .queue_subscribe(subject, group.to_string())
                        .await
                }
                None => self.client.subscribe(subject).await,
            };
            let mut subscriber =
                subscribed.map_err(|error| Error::unavailable("subscribe on NATS", error))?;
            // The server registers a subscription when it reads the SUB; a
            // flush makes sure it has, so a publish right after subscribe
            // reaches this subscriber.
            self.client
                .flush()
                .await
                .map_err(|error| Error::unavailable("subscribe on NATS", error))?;
            let (tx, rx) = mpsc::channel(bound);
            let closed = self.closed.subscribe();
            let topic = topic.to_string();
            // Dropping the subscriber (with the task) unsubscribes.
            let task = tokio::spawn(async move {
                let forward = async {
                    while let Some(message) = subscriber.next().await {
                        let id = message
                            .headers
                            .as_ref()
                            .and_then(|headers| headers.get(MSG_ID_HEADER))
                            .map(|id| id.as_str().to_string())
                            .unwrap_or_default();
                        let delivery = Delivery {
                            id,
                            topic: topic.clone(),
                            payload: message.payload,
                            attempt: 1,
                        };
                        if tx.send(Ok(delivery)).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    () = forward => {}
                    () = wait_closed(closed) => {}
                }
            });
            Ok(Subscription::new(rx, Arc::new(NoAcker), task))
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(close(&self.client, &self.closed))
    }
}

impl JetStreamAcker {
    fn hold(&self, seq: u64, message: jetstream::Message) {
        let now = Instant::now();
        let mut held = lock(&self.held);
        held.retain(|_, (_, at)| now.duration_since(*at) < self.keep);
        held.insert(seq, (message, now));
    }
}

impl Acker for JetStreamAcker {
    fn ack<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let seq = id
                .parse::<u64>()
                .map_err(|_| Error::Invalid(format!("`{id}` is not a delivery id of this bus")))?;
            let message = lock(&self.held).remove(&seq).map(|(message, _)| message);
            // An id not held was acked already or given to another member:
            // acking it again is harmless, so it is not an error.
            if let Some(message) = message {
                message
                    .double_ack()
                    .await
                    .map_err(|error| Error::unavailable("ack on JetStream", error))?;
            }
            Ok(())
        })
    }
}

impl Drop for EphemeralGuard {
    fn drop(&mut self) {
        let (stream, name) = (self.stream.clone(), std::mem::take(&mut self.name));
        // Outside a runtime there is nothing to delete with; the server's
        // inactivity threshold deletes the consumer then.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = stream.delete_consumer(&name).await {
                    tracing::debug!(%error, consumer = %name, "Deleting an ephemeral consumer failed.");
                }
            });
        }
    }
}

impl fmt::Debug for JetStreamBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamBus")
            .field("prefix", &self.prefix)
            .field("ack_wait", &self.ack_wait)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for CoreBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreBus")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Ends the bus's subscriptions, then drains and closes its connection.
async fn close(client: &Client, closed: &watch::Sender<bool>) {
    closed.send_replace(true);
    if let Err(error) = client.drain().await {
        tracing::debug!(%error, "Draining the NATS connection failed.");
    }
}

fn publish_error(error: jetstream::context::PublishError) -> Error {
    match error.kind() {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxAckPending => Error::unavailable("publish to JetStream", error),
        PublishErrorKind::MaxPayloadExceeded => Error::Invalid(error.to_string()),
        _ => Error::internal("publish to JetStream", error),
    }
}

/// The durable consumer of `group` on `topic`: both in one name, escaped so
/// that no two pairs share one (`_` doubled, `.` as `_d`, `_g` between).
fn durable_name(group: &str, topic: &str) -> String {
    let escape = |s: &str| s.replace('_', "__").replace('.', "_d");
    format!("{}_g{}", escape(group), escape(topic))
}

/// What sets this connection's message ids apart from other publishers':
/// the server's id for the client and when it connected.
fn id_base(client: &Client) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}{nanos:x}", client.server_info().client_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusKind;

    const URL: &str = "nats://127.0.0.1:4222";

    /// Polls `read` until `done` holds of what it returns, for at most ten
    /// seconds.
    async fn eventually<T: fmt::Debug, F: Future<Output = T>>(
        mut read: impl FnMut() -> F,
        done: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let value = read().await;
            if done(&value) || Instant::now() > deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the suite in `tests/pubsub.rs` cannot see through the trait:
    /// the server holds back what a stalled subscriber has no room for, and
    /// an ungrouped subscriber's consumer goes when it is dropped.
    #[tokio::test]
    async fn a_stalled_member_pulls_at_most_bound_and_a_dropped_lone_consumer_is_deleted() {
        let stream = format!("prism-unit-{}", unique_suffix());
        let params = BusParams {
            namespace: format!("unit-{}", unique_suffix()),
            bus: BusKind::Nats {
                url: URL.into(),
                stream: Some(stream.clone()),
            },
            retention: Some(Duration::from_secs(60)),
            ack_wait: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
        };
        let bus = open(&params, URL, Some(&stream)).await.unwrap_or_else(|error| {
            panic!("this test needs NATS with JetStream on 127.0.0.1:4222 (nats-server -js): {error}")
        });
        let js = jetstream::new(async_nats::connect(URL).await.unwrap());
        let server_stream = js.get_stream(&stream).await.unwrap();

        let _stalled = bus.subscribe("t", Some("g"), 4).await.unwrap();
        for i in 0..20 {
            bus.publish("t", Bytes::from(format!("{i}")), None)
                .await
                .unwrap();
        }
        let durable = durable_name("g", "t");
        let pending = || async {
            let info = server_stream.consumer_info(&durable).await.unwrap();
            (info.num_ack_pending, info.num_pending)
        };
        eventually(pending, |(in_flight, _)| *in_flight >= 4).await;
        // Every chance to pull more; it must not have.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            pending().await,
            (4, 16),
            "(handed out, held back by the server)"
        );

        let consumers = || async {
            let mut info = js.get_stream(&stream).await.unwrap();
            info.info().await.unwrap().state.consumer_count
        };
        let lone = bus.subscribe("t", None, 4).await.unwrap();
        assert_eq!(consumers().await, 2);
        drop(lone);
        assert_eq!(eventually(consumers, |count| *count == 1).await, 1);

        bus.close().await;
        js.delete_stream(&stream).await.unwrap();
    }

    #[test]
    fn durable_names_of_different_pairs_differ() {
        let pairs = [
            ("a", "b_c"),
            ("a_b", "c"),
            ("a", "b.c"),
            ("a_gb", "c"),
            ("a", "gb_c"),
        ];
        let names: Vec<String> = pairs.iter().map(|(g, t)| durable_name(g, t)).collect();
        for (i, a) in names.iter().enumerate() {
            assert!(!a.contains('.'), "{a}");
            for b in &names[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
