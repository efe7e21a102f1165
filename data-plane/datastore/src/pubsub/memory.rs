//! The in-memory bus: the embedded default, in this process only.
//!
//! Each topic keeps a retained log of its messages, bounded by time
//! ([`BusParams::retention`], [`DEFAULT_RETENTION`] when unset) and by count
//! ([`MAX_RETAINED`], the oldest dropped first). A publish appends to the log
//! and wakes the topic's subscriber tasks through a `watch`.
//!
//! - A group keeps a cursor into the log and the set of its deliveries in
//!   flight, each with a deadline of `ack_wait` from the moment it was handed
//!   to a member's channel. A delivery not acked by then, or whose member
//!   went away, is handed again to any member with `attempt` one higher,
//!   before anything new. A group outlives its members: rejoining resumes
//!   where it left off. Messages the log dropped before the group took them
//!   are lost to it (that is what retention means).
//! - An ungrouped subscriber keeps its own cursor, starting at the next
//!   message published. One that falls so far behind that the log dropped
//!   messages it had not taken skips ahead to the oldest retained message
//!   and a warning says how many it missed: a live stream prefers the
//!   present to an error, and the log stays bounded whatever a reader does.
//! - Idempotency keys are remembered per topic for [`KEY_WINDOW`], at most
//!   [`MAX_KEYS`] of them (the oldest forgotten first).
//! - Each subscription is fed by one task that first waits for room in the
//!   subscription's channel (`bound` deep) and only then takes a message, so
//!   a subscriber that stops reading holds `bound` deliveries and the bus
//!   holds nothing more for it.
//!
//! Nothing survives a restart.
//!
//! [`KEY_WINDOW`]: super::keys::KEY_WINDOW
//! [`MAX_KEYS`]: super::keys::MAX_KEYS

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::keys::KeyWindow;
use super::{
    Acker, BusParams, Delivery, NoAcker, PubSub, Subscription, check_subscription, check_topic,
    lock,
};
use crate::Error;

/// How long a topic keeps a message when the binding does not say.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(60 * 60);
/// The most messages a topic retains; past it the oldest is dropped.
pub const MAX_RETAINED: usize = 10_000;

/// The in-memory bus of one namespace.
pub struct MemoryBus {
    retention: Duration,
    ack_wait: Duration,
    topics: Mutex<Topics>,
    next_member: AtomicU64,
    stats: Arc<Stats>,
}

/// The topics, and whether the bus was closed: one lock, so that no topic
/// is made after `close` went through them.
#[derive(Default)]
struct Topics {
    by_name: HashMap<String, Arc<Topic>>,
    closed: bool,
}

/// What a test reads to see that subscriptions cost what they should.
#[derive(Default)]
struct Stats {
    feeders: AtomicUsize,
    handed: AtomicU64,
}

struct Topic {
    name: String,
    state: Mutex<TopicState>,
    /// Bumped whenever a subscriber task may find something new to do: a
    /// publish, a delivery given back, the bus closed.
    changed: watch::Sender<()>,
}

struct TopicState {
    log: VecDeque<Message>,
    /// The sequence number the next publish takes; the first is 1.
    next_seq: u64,
    keys: KeyWindow,
    groups: HashMap<String, Group>,
    closed: bool,
}

struct Message {
    seq: u64,
    payload: Bytes,
    at: Instant,
}

struct Group {
    /// The next sequence number the group has not taken.
    cursor: u64,
    in_flight: BTreeMap<u64, InFlight>,
    /// Deliveries given back (expired or their member gone), by sequence
    /// number, with the attempt they were last handed at.
    given_back: BTreeMap<u64, (Bytes, u32)>,
}

struct InFlight {
    member: u64,
    deadline: Instant,
    attempt: u32,
    /// Kept here so that a redelivery does not depend on the log still
    /// holding the message.
    payload: Bytes,
}

/// Who a subscriber task feeds.
enum Member {
    Alone { cursor: u64 },
    Grouped { group: String, id: u64 },
}

/// What a subscriber task does next.
enum Step {
    Deliver(Delivery),
    /// Nothing to hand now; look again when the topic changes or, for a
    /// group, when the earliest delivery in flight expires.
    Wait(Option<Instant>),
    Closed,
}

/// Gives back a member's deliveries and counts its task gone when the task
/// ends, however it ends: dropped with the subscription or closed.
struct FeederGuard {
    topic: Arc<Topic>,
    group_member: Option<(String, u64)>,
    stats: Arc<Stats>,
}

struct GroupAcker {
    topic: Arc<Topic>,
    group: String,
}

impl MemoryBus {
    /// An empty bus with the retention and `ack_wait` of `params`.
    pub fn new(params: &BusParams) -> Self {
        MemoryBus {
            retention: params.retention.unwrap_or(DEFAULT_RETENTION),
            ack_wait: params.ack_wait,
            topics: Mutex::default(),
            next_member: AtomicU64::new(1),
            stats: Arc::default(),
        }
    }

    /// The subscriber tasks alive on this bus: what a leak check reads.
    pub fn feeders(&self) -> usize {
        self.stats.feeders.load(Ordering::Relaxed)
    }

    /// The deliveries handed to subscriptions' channels so far: what a
    /// back-pressure check reads.
    pub fn handed(&self) -> u64 {
        self.stats.handed.load(Ordering::Relaxed)
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, Error> {
        let mut topics = lock(&self.topics);
        if topics.closed {
            return Err(Error::Closed);
        }
        let topic = topics.by_name.entry(name.to_string()).or_insert_with(|| {
            Arc::new(Topic {
                name: name.to_string(),
                state: Mutex::new(TopicState {
                    log: VecDeque::new(),
                    next_seq: 1,
                    keys: KeyWindow::default(),
                    groups: HashMap::new(),
                    closed: false,
                }),
                changed: watch::Sender::new(()),
            })
        });
        Ok(Arc::clone(topic))
    }

    fn publish_now(
        &self,
        topic: &str,
        payload: Bytes,
        idempotency_key: Option<&str>,
    ) -> Result<String, Error> {
        check_topic(topic)?;
        let topic = self.topic(topic)?;
        let now = Instant::now();
        let mut state = lock(&topic.state);
        if state.closed {
            return Err(Error::Closed);
        }
        if let Some(id) = idempotency_key.and_then(|key| state.keys.get(key, now)) {
            return Ok(id);
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.log.push_back(Message {
            seq,
            payload,
            at: now,
        });
        state.drop_old(now, self.retention);
        if let Some(key) = idempotency_key {
            state.keys.remember(key, seq.to_string(), now);
        }
        drop(state);
        topic.changed.send_replace(());
        Ok(seq.to_string())
    }

    fn subscribe_now(
        &self,
        topic: &str,
        group: Option<&str>,
        bound: usize,
    ) -> Result<Subscription, Error> {
        check_subscription(topic, group, bound)?;
        let topic = self.topic(topic)?;
        let member = {
            let mut state = lock(&topic.state);
            if state.closed {
                return Err(Error::Closed);
            }
            let next_seq = state.next_seq;
            match group {
                None => Member::Alone { cursor: next_seq },
                Some(group) => {
                    state
                        .groups
                        .entry(group.to_string())
                        .or_insert_with(|| Group {
                            cursor: next_seq,
                            in_flight: BTreeMap::new(),
                            given_back: BTreeMap::new(),
                        });
                    Member::Grouped {
                        group: group.to_string(),
                        id: self.next_member.fetch_add(1, Ordering::Relaxed),
                    }
                }
            }
        };
        let acker: Arc<dyn Acker> = match group {
            None => Arc::new(NoAcker),
            Some(group) => Arc::new(GroupAcker {
                topic: Arc::clone(&topic),
                group: group.to_string(),
            }),
        };
        let (tx, rx) = mpsc::channel(bound);
        // The guard is made before the task is spawned and moved into it,
        // so that it runs even when the subscription is dropped before the
        // task was first polled.
        self.stats.feeders.fetch_add(1, Ordering::Relaxed);
        let guard = FeederGuard {
            topic: Arc::clone(&topic),
            group_member: match &member {
                Member::Alone { .. } => None,
                Member::Grouped { group, id } => Some((group.clone(), *id)),
            },
            stats: Arc::clone(&self.stats),
        };
        let stats = Arc::clone(&self.stats);
        let (ack_wait, retention) = (self.ack_wait, self.retention);
        let task = tokio::spawn(async move {
            let _guard = guard;
            feed(topic, member, tx, ack_wait, retention, &stats).await;
        });
        Ok(Subscription::new(rx, acker, task))
    }

    fn close_now(&self) {
        let mut topics = lock(&self.topics);
        topics.closed = true;
        for topic in topics.by_name.values() {
            lock(&topic.state).closed = true;
            topic.changed.send_replace(());
        }
    }
}

impl PubSub for MemoryBus {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Bytes,
        idempotency_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, Error>> {
        let result = self.publish_now(topic, payload, idempotency_key);
        Box::pin(async move { result })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: Option<&'a str>,
        bound: usize,
    ) -> BoxFuture<'a, Result<Subscription, Error>> {
        let result = self.subscribe_now(topic, group, bound);
        Box::pin(async move { result })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.close_now();
        Box::pin(async {})
    }
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus")
            .field("retention", &self.retention)
            .field("ack_wait", &self.ack_wait)
            .finish_non_exhaustive()
    }
}

/// Feeds one subscription until its receiver is dropped or the bus closes.
async fn feed(
    topic: Arc<Topic>,
    mut member: Member,
    tx: mpsc::Sender<Result<Delivery, Error>>,
    ack_wait: Duration,
    retention: Duration,
    stats: &Stats,
) {
    let mut changed = topic.changed.subscribe();
    loop {
        // Room first, then a message: a message is taken (and, for a group,
        // put in flight) only when the subscriber can hold it.
        let Ok(permit) = tx.reserve().await else {
            return;
        };
        let delivery = loop {
            changed.borrow_and_update();
            match topic.step(&mut member, ack_wait, retention) {
                Step::Deliver(delivery) => break delivery,
                Step::Closed => return,
                // `changed` cannot fail: its sender lives in the topic this
                // task holds, so waiting on it never spins.
                Step::Wait(None) => {
                    let _ = changed.changed().await;
                }
                Step::Wait(Some(deadline)) => {
                    tokio::select! {
                        _ = changed.changed() => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
            }
        };
        permit.send(Ok(delivery));
        stats.handed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Topic {
    fn step(&self, member: &mut Member, ack_wait: Duration, retention: Duration) -> Step {
        let now = Instant::now();
        let mut state = lock(&self.state);
        if state.closed {
            return Step::Closed;
        }
        state.drop_old(now, retention);
        let oldest = state.oldest_seq();
        let TopicState {
            log,
            next_seq,
            groups,
            ..
        } = &mut *state;
        let message = |seq: u64| {
            usize::try_from(seq - oldest)
                .ok()
                .and_then(|index| log.get(index))
        };
        match member {
            Member::Alone { cursor } => {
                if *cursor < oldest {
                    tracing::warn!(
                        topic = %self.name,
                        skipped = oldest - *cursor,
                        "A subscriber fell behind the retained log and skips ahead."
                    );
                    *cursor = oldest;
                }
                match message(*cursor) {
                    Some(found) if *cursor < *next_seq => {
                        *cursor += 1;
                        Step::Deliver(self.delivery(found.seq, found.payload.clone(), 1))
                    }
                    _ => Step::Wait(None),
                }
            }
            Member::Grouped { group, id } => {
                let Some(group) = groups.get_mut(group.as_str()) else {
                    // Groups are made before their first member's task and
                    // never removed; without one there is nothing to feed.
                    return Step::Closed;
                };
                group.expire(now);
                let (seq, payload, attempt) =
                    if let Some((seq, (payload, attempt))) = group.given_back.pop_first() {
                        (seq, payload, attempt + 1)
                    } else {
                        if group.cursor < oldest {
                            group.cursor = oldest;
                        }
                        match message(group.cursor) {
                            Some(found) if group.cursor < *next_seq => {
                                group.cursor += 1;
                                (found.seq, found.payload.clone(), 1)
                            }
                            _ => {
                                let earliest = group.in_flight.values().map(|f| f.deadline).min();
                                return Step::Wait(earliest);
                            }
                        }
                    };
                group.in_flight.insert(
                    seq,
                    InFlight {
                        member: *id,
                        deadline: now + ack_wait,
                        attempt,
                        payload: payload.clone(),
                    },
                );
                Step::Deliver(self.delivery(seq, payload, attempt))
            }
        }
    }

    fn delivery(&self, seq: u64, payload: Bytes, attempt: u32) -> Delivery {
        Delivery {
            id: seq.to_string(),
            topic: self.name.clone(),
            payload,
            attempt,
        }
    }
}

impl TopicState {
    /// The sequence number of the oldest retained message (the next one
    /// when none is retained).
    fn oldest_seq(&self) -> u64 {
        self.log.front().map_or(self.next_seq, |m| m.seq)
    }

    /// Drops what retention no longer keeps: messages past the count bound
    /// or older than `retention`.
    fn drop_old(&mut self, now: Instant, retention: Duration) {
        while self.log.len() > MAX_RETAINED
            || self
                .log
                .front()
                .is_some_and(|m| now.duration_since(m.at) > retention)
        {
            self.log.pop_front();
        }
    }
}

impl Group {
    /// Gives back every delivery whose ack deadline has passed.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            if let Some(f) = self.in_flight.remove(&seq) {
                self.given_back.insert(seq, (f.payload, f.attempt));
            }
        }
    }
}

impl Drop for FeederGuard {
    fn drop(&mut self) {
        if let Some((group, member)) = &self.group_member {
            let mut state = lock(&self.topic.state);
            if let Some(group) = state.groups.get_mut(group) {
                let mine: Vec<u64> = group
                    .in_flight
                    .iter()
                    .filter(|(_, f)| f.member == *member)
                    .map(|(seq, _)| *seq)
                    .collect();
                for seq in mine {
                    if let Some(f) = group.in_flight.remove(&seq) {
                        group.given_back.insert(seq, (f.payload, f.attempt));
                    }
                }
            }
            drop(state);
            self.topic.changed.send_replace(());
        }
        self.stats.feeders.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Acker for GroupAcker {
    fn ack<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        let result = id
            .parse::<u64>()
            .map_err(|_| Error::Invalid(format!("`{id}` is not a delivery id of this bus")))
            .map(|seq| {
                let mut state = lock(&self.topic.state);
                if let Some(group) = state.groups.get_mut(&self.group) {
                    // An ack that comes after the deadline but before the
                    // redelivery still counts: the message was handled.
                    group.in_flight.remove(&seq);
                    group.given_back.remove(&seq);
                }
            });
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pubsub::keys::KEY_WINDOW;

    fn params(ack_wait: Duration, retention: Option<Duration>) -> BusParams {
        BusParams {
            namespace: "test".into(),
            bus: super::super::BusKind::Memory,
            retention,
            ack_wait,
            connect_timeout: Duration::from_secs(1),
        }
    }

    async fn next(sub: &mut Subscription) -> Delivery {
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    /// A bus whose group `g` on topic `t` has one member, that received one
    /// message and did not ack it.
    async fn one_delivered(ack_wait: Duration) -> (MemoryBus, Subscription) {
        let bus = MemoryBus::new(&params(ack_wait, None));
        let mut sub = bus.subscribe("t", Some("g"), 1).await.unwrap();
        bus.publish("t", Bytes::from_static(b"m"), None)
            .await
            .unwrap();
        assert_eq!(next(&mut sub).await.attempt, 1);
        (bus, sub)
    }

    #[tokio::test(start_paused = true)]
    async fn the_log_keeps_at_most_max_retained_and_a_laggard_skips_ahead() {
        let bus = MemoryBus::new(&params(Duration::from_secs(30), None));
        let mut sub = bus.subscribe("t", None, 1).await.unwrap();
        for i in 0..MAX_RETAINED + 10 {
            bus.publish("t", Bytes::from(i.to_string()), None)
                .await
                .unwrap();
        }
        // The subscriber's task did not run while the publishes went on
        // (none of them waits), so the log dropped the first ten before it
        // looked: it skips to the oldest retained, in order from there.
        assert_eq!(next(&mut sub).await.id, "11");
        assert_eq!(next(&mut sub).await.id, "12");
    }

    #[tokio::test(start_paused = true)]
    async fn messages_past_retention_are_not_delivered_to_a_group() {
        let bus = MemoryBus::new(&params(
            Duration::from_secs(30),
            Some(Duration::from_secs(5)),
        ));
        drop(bus.subscribe("t", Some("g"), 1).await.unwrap());
        bus.publish("t", Bytes::from_static(b"old"), None)
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        bus.publish("t", Bytes::from_static(b"new"), None)
            .await
            .unwrap();
        let mut sub = bus.subscribe("t", Some("g"), 1).await.unwrap();
        assert_eq!(next(&mut sub).await.payload, "new");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idempotency_key_is_forgotten_after_the_window() {
        let bus = MemoryBus::new(&params(Duration::from_secs(30), None));
        let first = bus.publish("t", Bytes::new(), Some("k")).await.unwrap();
        assert_eq!(
            bus.publish("t", Bytes::new(), Some("k")).await.unwrap(),
            first
        );
        tokio::time::advance(KEY_WINDOW + Duration::from_secs(1)).await;
        assert_ne!(
            bus.publish("t", Bytes::new(), Some("k")).await.unwrap(),
            first
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unacked_delivery_comes_back_after_ack_wait_and_not_before() {
        let (_bus, mut sub) = one_delivered(Duration::from_secs(10)).await;
        let early = tokio::time::timeout(Duration::from_secs(9), sub.next()).await;
        assert!(early.is_err(), "redelivered before ack_wait: {early:?}");
        let again = next(&mut sub).await;
        assert_eq!((again.id.as_str(), again.attempt), ("1", 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_members_delivery_goes_to_another_at_once() {
        let (bus, leaving) = one_delivered(Duration::from_secs(60)).await;
        let mut staying = bus.subscribe("t", Some("g"), 1).await.unwrap();
        drop(leaving);
        // Far sooner than ack_wait: the drop gave it back.
        let again = tokio::time::timeout(Duration::from_secs(1), staying.next()).await;
        let again = again.expect("given back at once").unwrap().unwrap();
        assert_eq!((again.id.as_str(), again.attempt), ("1", 2));
        assert_eq!(bus.feeders(), 1);
    }

    #[tokio::test]
    async fn close_ends_subscriptions_and_refuses_publishes() {
        let bus = MemoryBus::new(&params(Duration::from_secs(10), None));
        let mut sub = bus.subscribe("t", Some("g"), 4).await.unwrap();
        bus.close().await;
        let end = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
        assert!(matches!(
            bus.publish("t", Bytes::new(), None).await,
            Err(Error::Closed)
        ));
    }
}
