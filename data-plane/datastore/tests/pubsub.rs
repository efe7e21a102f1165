//! The PubSub conformance suite: one set of cases, each taking a bus as
//! `Arc<dyn PubSub>` and what that bus promises where buses differ, run
//! against every bus: in memory, NATS JetStream and core NATS (a server on
//! 127.0.0.1:4222, a unique namespace and stream per test) and Kafka
//! (librdkafka's mock cluster, no broker).
//!
//! A test whose server is missing fails and says which server it wanted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prism_datastore::pubsub::MemoryBus;
use prism_datastore::{
    BusKind, BusParams, Delivery, Error, PubSub, Subscription, open_bus, open_subscriptions,
};
use tokio::sync::RwLock;
use tokio::time::timeout;

/// How long a group delivery may go unacked in these tests.
const ACK_WAIT: Duration = Duration::from_millis(500);
/// The longest any single expected event may take.
const WAIT: Duration = Duration::from_secs(10);
/// The longest a subscribe may take: joining a Kafka group waits for the
/// group to rebalance (on the mock cluster 3 s for a new group and 5 s for
/// one with members, longer on a loaded machine).
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(30);

/// `open_subscriptions` counts across the process: the leak check takes
/// this for writing so that no other test opens a subscription meanwhile.
static SUBSCRIPTIONS: RwLock<()> = RwLock::const_new(());

/// A bus under test and what it promises.
struct Backend {
    bus: Arc<dyn PubSub>,
    promises: Promises,
    /// The memory bus itself, for the counters only it has.
    memory: Option<Arc<MemoryBus>>,
    /// Params of the same bus pointed at a port nothing listens on; `None`
    /// for a bus that connects to nothing.
    dead: Option<BusParams>,
    /// What must live as long as the bus (Kafka's mock cluster).
    _keep: Option<Box<dyn std::any::Any>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Promises {
    redelivery: Redelivery,
    /// Each member of a group receives part of a burst; false where the
    /// broker's partitions decide who gets what.
    splits_between_members: bool,
    /// Redeliveries carry an attempt count above 1.
    counts_attempts: bool,
    /// One subscriber receives a topic's messages in publish order (Kafka
    /// keeps order within a partition only).
    in_order: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Redelivery {
    /// An unacked group delivery comes back after `ack_wait`, and when its
    /// member leaves.
    AfterAckWait,
    /// An unacked group delivery comes back once its member left and the
    /// group is joined again (Kafka: a rebalance).
    OnRejoin,
    /// At most once: nothing comes back (core NATS).
    Never,
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn params(bus: BusKind) -> BusParams {
    BusParams {
        namespace: unique("ns"),
        bus,
        retention: Some(Duration::from_secs(120)),
        ack_wait: ACK_WAIT,
        connect_timeout: Duration::from_secs(2),
    }
}

async fn memory() -> Backend {
    let memory = Arc::new(MemoryBus::new(&params(BusKind::Memory)));
    Backend {
        bus: memory.clone(),
        promises: Promises {
            redelivery: Redelivery::AfterAckWait,
            splits_between_members: true,
            counts_attempts: true,
            in_order: true,
        },
        memory: Some(memory),
        dead: None,
        _keep: None,
    }
}

/// The streams these tests make (and the bus's own unit tests).
#[cfg(feature = "nats")]
const STREAM_PREFIX: &str = "prism-conformance";

/// Deletes the streams that runs of these tests made more than ten minutes
/// ago: a test cannot delete its own through the trait, and the server
/// keeps them across runs. Younger ones may belong to a run going on.
#[cfg(feature = "nats")]
async fn sweep_old_streams() {
    use futures::StreamExt;
    let Ok(client) = async_nats::connect("nats://127.0.0.1:4222").await else {
        return; // The test itself says the server is missing.
    };
    let js = async_nats::jetstream::new(client);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut old = Vec::new();
    let mut streams = js.streams();
    while let Some(Ok(info)) = streams.next().await {
        let created = u64::try_from(info.created.unix_timestamp()).unwrap_or(0);
        let ours = ["prism-conformance-", "prism-unit-"]
            .iter()
            .any(|prefix| info.config.name.starts_with(prefix));
        if ours && now.saturating_sub(created) > 600 {
            old.push(info.config.name);
        }
    }
    for name in old {
        let _ = js.delete_stream(&name).await;
    }
}

#[cfg(feature = "nats")]
async fn nats(jetstream: bool) -> Backend {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT.get_or_init(sweep_old_streams).await;
    let stream = jetstream.then(|| unique(STREAM_PREFIX));
    let url = "nats://127.0.0.1:4222".to_string();
    let live = params(BusKind::Nats {
        url,
        stream: stream.clone(),
    });
    let bus = open_bus(&live).await.unwrap_or_else(|error| {
        panic!("these tests need NATS with JetStream on 127.0.0.1:4222 (nats-server -js): {error}")
    });
    Backend {
        bus,
        promises: Promises {
            redelivery: if jetstream {
                Redelivery::AfterAckWait
            } else {
                Redelivery::Never
            },
            splits_between_members: true,
            counts_attempts: jetstream,
            in_order: true,
        },
        memory: None,
        dead: Some(params(BusKind::Nats {
            url: "nats://127.0.0.1:1".into(),
            stream,
        })),
        _keep: None,
    }
}

/// Every topic a case publishes or subscribes to.
#[cfg(feature = "kafka")]
const KAFKA_TOPICS: &[&str] = &[
    "orders.created",
    "news",
    "jobs",
    "payments",
    "mail",
    "audit",
    "invoices",
    "ticks",
    "leak",
];

#[cfg(feature = "kafka")]
async fn kafka() -> Backend {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("start librdkafka's mock cluster");
    // The mock cluster cannot create topics through the admin API (a real
    // one can, and the bus does): make the topics the cases use up front.
    let live = params(BusKind::Kafka {
        brokers: cluster.bootstrap_servers(),
        partitions: 2,
    });
    for topic in KAFKA_TOPICS {
        cluster
            .create_topic(&format!("prism.{}.{topic}", live.namespace), 2, 1)
            .expect("make a topic on the mock cluster");
    }
    let bus = open_bus(&live)
        .await
        .unwrap_or_else(|error| panic!("open Kafka on the mock cluster: {error}"));
    Backend {
        bus,
        promises: Promises {
            redelivery: Redelivery::OnRejoin,
            splits_between_members: false,
            counts_attempts: false,
            in_order: false,
        },
        memory: None,
        dead: Some(params(BusKind::Kafka {
            brokers: "127.0.0.1:1".into(),
            partitions: 1,
        })),
        _keep: Some(Box::new(cluster)),
    }
}

async fn next(sub: &mut Subscription) -> Delivery {
    next_within(sub, WAIT).await
}

async fn next_within(sub: &mut Subscription, within: Duration) -> Delivery {
    match timeout(within, sub.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(error))) => panic!("the subscription failed: {error}"),
        Ok(None) => panic!("the subscription ended"),
        Err(_) => panic!("no delivery within {within:?}"),
    }
}

/// Checks that nothing is delivered for `within`: the one wait here for an
/// absence, so it is bounded by the time that absence is promised for.
async fn nothing_within(sub: &mut Subscription, within: Duration) {
    if let Ok(got) = timeout(within, sub.next()).await {
        panic!("expected nothing within {within:?}, got {got:?}");
    }
}

async fn publish(bus: &dyn PubSub, topic: &str, payload: &str) -> String {
    match timeout(
        WAIT,
        bus.publish(topic, Bytes::from(payload.to_string()), None),
    )
    .await
    {
        Ok(Ok(id)) => id,
        Ok(Err(error)) => panic!("publish to {topic} failed: {error}"),
        Err(_) => panic!("publish to {topic} took more than {WAIT:?}"),
    }
}

async fn subscribe(
    bus: &dyn PubSub,
    topic: &str,
    group: Option<&str>,
    bound: usize,
) -> Subscription {
    match timeout(SUBSCRIBE_WAIT, bus.subscribe(topic, group, bound)).await {
        Ok(Ok(sub)) => sub,
        Ok(Err(error)) => panic!("subscribe to {topic} failed: {error}"),
        Err(_) => panic!("subscribe to {topic} took more than {SUBSCRIBE_WAIT:?}"),
    }
}

async fn ack(sub: &Subscription, delivery: &Delivery) {
    sub.ack(&delivery.id)
        .await
        .unwrap_or_else(|error| panic!("ack {} failed: {error}", delivery.id));
}

mod cases {
    use super::*;

    pub async fn a_group_member_receives_what_is_published(b: Backend) {
        let _shared = SUBSCRIPTIONS.read().await;
        let mut sub = subscribe(&*b.bus, "orders.created", Some("billing"), 8).await;
        let id = publish(&*b.bus, "orders.created", "hello").await;
        let got = next(&mut sub).await;
        assert_eq!(got.payload, "hello");
        assert_eq!(got.topic, "orders.created");
        assert_eq!(got.attempt, 1);
        assert_eq!(got.id, id, "a delivery carries the id publish returned");
        ack(&sub, &got).await;
    }

    pub async fn two_lone_subscribers_both_receive(b: Backend) {
        let _shared = SUBSCRIPTIONS.read().await;
        let mut one = subscribe(&*b.bus, "news", None, 8).await;
        let mut two = subscribe(&*b.bus, "news", None, 8).await;
        publish(&*b.bus, "news", "extra").await;
        assert_eq!(next(&mut one).await.payload, "extra");
        assert_eq!(next(&mut two).await.payload, "extra");
    }

    pub async fn a_group_splits_messages_between_members(b: Backend) {
        let _shared = SUBSCRIPTIONS.read().await;
        let mut one = subscribe(&*b.bus, "jobs", Some("workers"), 2).await;
        let mut two = subscribe(&*b.bus, "jobs", Some("workers"), 2).await;
        const N: usize = 12;
        for i in 0..N {
            publish(&*b.bus, "jobs", &format!("job-{i}")).await;
        }
        let mut seen: Vec<String> = Vec::new();
        let (mut by_one, mut by_two) = (0, 0);
        while seen.len() < N {
            let got = tokio::select! {
                got = next(&mut one) => { by_one += 1; ack(&one, &got).await; got }
                got = next(&mut two) => { by_two += 1; ack(&two, &got).await; got }
            };
            seen.push(String::from_utf8_lossy(&got.payload).into_owned());
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), N, "each message once, none twice");
        if b.promises.splits_between_members {
            assert!(
                by_one > 0 && by_two > 0,
                "one member got everything: {by_one} / {by_two}"
            );
        }
        // Everything was acked: nothing more comes to either member.
        nothing_within(&mut one, ACK_WAIT * 3).await;
        nothing_within(&mut two, ACK_WAIT / 2).await;
    }

    pub async fn an_unacked_delivery_comes_back(b: Backend) {
        let _shared = SUBSCRIPTIONS.read().await;
        let mut sub = subscribe(&*b.bus, "payments", Some("ledger"), 4).await;
        publish(&*b.bus, "payments", "pay-1").await;
        let first = next(&mut sub).await;
        assert_eq!(first.attempt, 1);
        match b.promises.redelivery {
            Redelivery::AfterAckWait => {
                let again = next_within(&mut sub, ACK_WAIT + WAIT).await;
                assert_eq!((again.id.as_str(), again.attempt), (first.id.as_str(), 2));
                ack(&sub, &again).await;
                nothing_within(&mut sub, ACK_WAIT * 3).await;
            }
            Redelivery::OnRejoin => {
                drop(sub);
                let mut sub = subscribe(&*b.bus, "payments", Some("ledger"), 4).await;
                let again = next(&mut sub).await;
                assert_eq!(again.payload, first.payload);
                assert_eq!(again.id, first.id);
                if b.promises.counts_attempts {
                    assert_eq!(again.attempt, 2);
                }
                ack(&sub, &again).await;
            }
            Redelivery::Never => nothing_within(&mut sub, ACK_WAIT * 3).await,
        }
    }

    pub async fn a_leaving_member_gives_its_deliveries_back(b: Backend) {
        if b.promises.redelivery == Redelivery::Never {
            return;
        }
        let _shared = SUBSCRIPTIONS.read().await;
        let mut leaving = subscribe(&*b.bus, "mail", Some("senders"), 4).await;
        publish(&*b.bus, "mail", "letter").await;
        let first = next(&mut leaving).await;
        drop(leaving);
        let mut staying = subscribe(&*b.bus, "mail", Some("senders"), 4).await;
        let again = next_within(&mut staying, ACK_WAIT + WAIT).await;
        assert_eq!(
            (again.id.as_str(), &again.payload),
            (first.id.as_str(), &first.payload)
        );
        if b.promises.counts_attempts {
            assert_eq!(again.attempt, 2);
        }
    }

    pub async fn an_acked_delivery_never_comes_back(b: Backend) {
        let _shared = SUBSCRIPTIONS.read().await;
        let mut sub = subscribe(&*b.bus, "audit", Some("archive"), 4).await;
        publish(&*b.bus, "audit", "a-1").await;
        let first = next(&mut sub).await;
        ack(&sub, &first).await;
        nothing_within(&mut sub, ACK_WAIT * 3).await;
        publish(&*b.bus, "audit", "a-2").await;
        let second = next(&mut sub).await;
        assert_eq!(second.payload, "a-2");
        ack(&sub, &second).await;
        if b.promises.redelivery == Redelivery::OnRejoin {
            // Rejoining starts after what was acked.
            drop(sub);
            let mut sub = subscribe(&*b.bus, "audit", Some("archive"), 4).await;
            publish(&*b.bus, "audit", "a-3").await;
            assert_eq!(next(&mut sub).await.payload, "a-3");
        }
    }

    pub async fn an_idempotency_key_publishes_once(b: Backend) {
        let _shared = SUBSCRIPTIONS.read().await;
        let mut sub = subscribe(&*b.bus, "invoices", Some("mailer"), 8).await;
        let first = b
            .bus
            .publish("invoices", Bytes::from_static(b"inv-1"), Some("key-1"))
            .await
            .expect("publish with a key");
        let second = b
            .bus
            .publish(
                "invoices",
                Bytes::from_static(b"inv-1 again"),
                Some("key-1"),
            )
            .await
            .expect("publish with the same key");
        assert_eq!(first, second, "the second publish returns the first's id");
        publish(&*b.bus, "invoices", "inv-2").await;
        let got = next(&mut sub).await;
        assert_eq!(got.payload, "inv-1");
        ack(&sub, &got).await;
        let got = next(&mut sub).await;
        assert_eq!(got.payload, "inv-2", "the duplicate was not published");
        ack(&sub, &got).await;
    }

    pub async fn a_subscriber_that_stops_reading_holds_at_most_bound(b: Backend) {
        let _shared = SUBSCRIPTIONS.read().await;
        const BOUND: usize = 4;
        let mut sub = subscribe(&*b.bus, "ticks", None, BOUND).await;
        // Each publish returns (within WAIT) although nobody reads.
        for i in 0..BOUND * 5 {
            publish(&*b.bus, "ticks", &format!("{i:02}")).await;
        }
        if let Some(memory) = &b.memory {
            let deadline = tokio::time::Instant::now() + WAIT;
            while memory.handed() < BOUND as u64 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the subscriber was never fed"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The feeder had every chance to hand more; it must not have.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(memory.handed(), BOUND as u64, "the bus fed past the bound");
        }
        let mut got = Vec::new();
        for _ in 0..BOUND * 5 {
            got.push(String::from_utf8_lossy(&next(&mut sub).await.payload).into_owned());
        }
        if !b.promises.in_order {
            got.sort();
        }
        let published: Vec<String> = (0..BOUND * 5).map(|i| format!("{i:02}")).collect();
        assert_eq!(got, published, "every message, in order");
    }

    pub async fn dropping_subscriptions_frees_them(b: Backend) {
        let _alone = SUBSCRIPTIONS.write().await;
        let baseline = open_subscriptions();
        let subs = vec![
            subscribe(&*b.bus, "leak", None, 4).await,
            subscribe(&*b.bus, "leak", Some("g"), 4).await,
            subscribe(&*b.bus, "leak", Some("g"), 4).await,
        ];
        assert_eq!(open_subscriptions(), baseline + 3);
        publish(&*b.bus, "leak", "x").await;
        drop(subs);
        assert_eq!(open_subscriptions(), baseline);
        if let Some(memory) = &b.memory {
            let deadline = tokio::time::Instant::now() + WAIT;
            while memory.feeders() > 0 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a subscriber task outlived its subscription"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    pub async fn a_dead_port_is_unavailable_within_the_timeout(b: Backend) {
        let Some(dead) = b.dead else {
            return;
        };
        let started = tokio::time::Instant::now();
        let result = timeout(
            dead.connect_timeout + Duration::from_secs(3),
            open_bus(&dead),
        )
        .await;
        match result {
            Ok(Err(Error::Unavailable { .. })) => {}
            Ok(other) => panic!("expected Unavailable, got {other:?}"),
            Err(_) => panic!("open_bus outlived its connect timeout by 3 s"),
        }
        assert!(started.elapsed() < dead.connect_timeout + Duration::from_secs(3));
    }

    pub async fn a_bad_topic_is_invalid(b: Backend) {
        for topic in ["", "a.*", "a.>", "a..b", "a b", ".a", "a."] {
            let published = b.bus.publish(topic, Bytes::new(), None).await;
            assert!(
                matches!(published, Err(Error::Invalid(_))),
                "publish to {topic:?}: {published:?}"
            );
            let subscribed = b.bus.subscribe(topic, None, 1).await;
            assert!(
                matches!(subscribed, Err(Error::Invalid(_))),
                "subscribe to {topic:?}: {subscribed:?}"
            );
        }
        let grouped = b.bus.subscribe("fine", Some("a.b"), 1).await;
        assert!(
            matches!(grouped, Err(Error::Invalid(_))),
            "group a.b: {grouped:?}"
        );
    }
}

/// One test per case for the bus that `$make` opens.
macro_rules! conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;

            conformance!(@cases $make;
                a_group_member_receives_what_is_published,
                two_lone_subscribers_both_receive,
                a_group_splits_messages_between_members,
                an_unacked_delivery_comes_back,
                a_leaving_member_gives_its_deliveries_back,
                an_acked_delivery_never_comes_back,
                an_idempotency_key_publishes_once,
                a_subscriber_that_stops_reading_holds_at_most_bound,
                dropping_subscriptions_frees_them,
                a_dead_port_is_unavailable_within_the_timeout,
                a_bad_topic_is_invalid,
            );
        }
    };
    (@cases $make:expr; $($case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                cases::$case($make.await).await;
            }
        )*
    };
}

conformance!(memory_bus, memory());
#[cfg(feature = "nats")]
conformance!(nats_jetstream, nats(true));
#[cfg(feature = "nats")]
conformance!(nats_core, nats(false));
#[cfg(feature = "kafka")]
conformance!(kafka_bus, kafka());
