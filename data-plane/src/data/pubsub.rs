//! The PubSub operations behind both APIs: admit the call, publish, and
//! subscriptions that a client acknowledges by id.
//!
//! A subscription is registered under a fresh id for as long as its stream
//! lives, so that an Ack (a separate call, maybe on another connection of
//! the same proxy) finds it; dropping the stream (the client went away or
//! cancelled) drops the bus's subscription, its task and its buffered
//! deliveries, and takes it out of the registry, at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use bytes::Bytes;
use prism_datastore::{Acker, Delivery, PubSub, Subscription};

use super::bindings::Binding;
use super::{Caller, DataError};
use crate::runtime::Runtime;

/// Deliveries a subscriber holds unless it asks otherwise, and at most.
const MAX_IN_FLIGHT: usize = 64;
const MAX_IN_FLIGHT_LIMIT: usize = 1024;

/// A PubSub binding, admitted for one call.
pub(crate) type Bus = Arc<Binding<dyn PubSub>>;

/// Every subscription open on this proxy's listeners, by id. One registry
/// for the process: an Ack may come over another listener (plain or TLS)
/// than its subscription's stream.
static OPEN: LazyLock<Mutex<HashMap<String, Registered>>> = LazyLock::new(Default::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Registered {
    namespace: String,
    acker: Arc<dyn Acker>,
}

/// A subscription as the APIs hand it out: its id and its deliveries. It
/// leaves the registry when dropped.
pub(crate) struct Open {
    pub id: String,
    subscription: Subscription,
}

/// The namespace's PubSub binding, if `caller` may call it now.
pub(crate) fn admit(runtime: &Runtime, caller: &Caller, namespace: &str) -> Result<Bus, DataError> {
    let binding = super::admit(runtime, caller, namespace, "PubSub", |b| b.bus(namespace))?;
    Ok(Arc::clone(binding))
}

pub(crate) async fn publish(
    bus: &Bus,
    topic: &str,
    payload: Bytes,
    idempotency_key: &str,
) -> Result<String, DataError> {
    super::check_size(&bus.settings, "the payload", payload.len())?;
    let key = super::idempotency_key(idempotency_key)?;
    Ok(bus.store.publish(topic, payload, key).await?)
}

/// Subscribes to `topic` (as a member of `group` unless empty) and registers
/// the subscription for acks.
pub(crate) async fn subscribe(
    bus: &Bus,
    namespace: &str,
    topic: &str,
    group: &str,
    max_in_flight: u32,
) -> Result<Open, DataError> {
    let bound = super::bounded(
        max_in_flight,
        MAX_IN_FLIGHT,
        MAX_IN_FLIGHT_LIMIT,
        "max_in_flight",
    )?;
    let group = (!group.is_empty()).then_some(group);
    let subscription = bus.store.subscribe(topic, group, bound).await?;
    let id = format!(
        "{:016x}{:016x}",
        NEXT_ID.fetch_add(1, Ordering::Relaxed),
        rand::random::<u64>()
    );
    registry().insert(
        id.clone(),
        Registered {
            namespace: namespace.to_string(),
            acker: subscription.acker(),
        },
    );
    Ok(Open { id, subscription })
}

/// Acknowledges `ids` of the subscription `subscription` of `namespace`.
pub(crate) async fn ack(
    namespace: &str,
    subscription: &str,
    ids: &[String],
) -> Result<(), DataError> {
    let acker = registry()
        .get(subscription)
        .filter(|r| r.namespace == namespace)
        .map(|r| Arc::clone(&r.acker))
        .ok_or_else(|| DataError::NoSubscription(subscription.to_string()))?;
    for id in ids {
        acker.ack(id).await?;
    }
    Ok(())
}

impl Open {
    /// The next delivery; `None` once the bus ended the subscription.
    pub(crate) async fn next(&mut self) -> Option<Result<Delivery, DataError>> {
        Some(self.subscription.next().await?.map_err(DataError::from))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        registry().remove(&self.id);
    }
}

fn registry() -> std::sync::MutexGuard<'static, HashMap<String, Registered>> {
    // Nothing panics while holding the lock; a poisoned one is still sound.
    OPEN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Subscriptions registered on this proxy, for its admin status.
pub(crate) fn registered() -> usize {
    registry().len()
}
