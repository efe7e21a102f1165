//! The control plane's Prometheus metrics, served as OpenMetrics text at the
//! admin API's `/metrics` (prometheus-client).
//!
//! The store and the fleet each own the handles they record into
//! ([`StoreMetrics`], [`DiscoveryMetrics`]: counters and histograms that
//! clones share); a scrape registers clones of them in a fresh registry,
//! with the gauges read off the store and the fleet at that moment. Every
//! label has a bounded set of values: actions, outcomes, variants and
//! resource types, never a name a client chose.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::fleet::Fleet;
use crate::store::Store;

/// Content type of the answer of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of a write: what it was and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// `apply`, `create`, `replace`, `delete`, `rollback`, ….
    pub action: String,
    /// `committed`, `unchanged` or `refused`.
    pub outcome: &'static str,
}

/// What the store records.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    /// Writes by action and outcome.
    pub writes: Family<WriteLabels, Counter>,
    /// How long each commit's flush to disk took.
    pub flush: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            writes: Family::default(),
            // 100 µs to about 3.3 s.
            flush: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }
}

/// Labels of a discovery stream: its variant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `sotw` (StreamAggregatedResources) or `delta` (DeltaAggregatedResources).
    pub variant: &'static str,
}

/// Labels of a response sent on a stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    /// `sotw` or `delta`.
    pub variant: &'static str,
    /// The resource type, e.g. `Route` or `envoy.config.cluster.v3.Cluster`.
    pub r#type: String,
}

/// Labels of a client's answer to a response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplyLabels {
    /// The resource type.
    pub r#type: String,
    /// `ack` or `nack`.
    pub outcome: &'static str,
}

/// What discovery records, kept by the fleet.
#[derive(Clone, Debug)]
pub struct DiscoveryMetrics {
    /// Open streams of registered clients, by variant.
    pub streams: Family<StreamLabels, Gauge>,
    /// Responses sent, by variant and type.
    pub pushes: Family<PushLabels, Counter>,
    /// ACKs and NACKs, by type.
    pub replies: Family<ReplyLabels, Counter>,
    /// From a push of a revision until the client holds it in full.
    pub push_to_ack: Histogram,
}

impl Default for DiscoveryMetrics {
    fn default() -> Self {
        Self {
            streams: Family::default(),
            pushes: Family::default(),
            replies: Family::default(),
            // 1 ms to about 33 s.
            push_to_ack: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        }
    }
}

impl DiscoveryMetrics {
    /// Counts one response of `type_url` sent on a `variant` stream.
    pub fn pushed(&self, variant: &'static str, type_url: &str) {
        self.pushes
            .get_or_create(&PushLabels {
                variant,
                r#type: short_type(type_url).to_string(),
            })
            .inc();
    }

    /// Counts an ACK (`error` is `None`) or a NACK of `type_url`.
    pub fn replied(&self, type_url: &str, nack: bool) {
        self.replies
            .get_or_create(&ReplyLabels {
                r#type: short_type(type_url).to_string(),
                outcome: if nack { "nack" } else { "ack" },
            })
            .inc();
    }

    /// Records that a client took `elapsed` to hold a pushed revision.
    pub fn acked_after(&self, elapsed: Duration) {
        self.push_to_ack.observe(elapsed.as_secs_f64());
    }
}

/// `type.googleapis.com/prism.config.v1.Route` → `Route`; an Envoy type
/// keeps its package: `envoy.config.cluster.v3.Cluster`.
fn short_type(type_url: &str) -> &str {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    name.strip_prefix("prism.config.v1.").unwrap_or(name)
}

/// The OpenMetrics text of every control-plane metric, now.
pub fn encode(store: &Store, fleet: &Fleet) -> String {
    let mut registry = Registry::with_prefix("prism_control_plane");
    let revision = Gauge::<i64>::default();
    revision.set(i64::try_from(store.revision()).unwrap_or(i64::MAX));
    registry.register("revision", "The newest committed policy revision", revision);
    let proxies = fleet.list(store.revision());
    let connected = Gauge::<i64>::default();
    connected.set(count(proxies.iter().filter(|p| p.connected)));
    registry.register(
        "proxies_connected",
        "Proxies with at least one discovery stream open",
        connected,
    );
    let behind = Gauge::<i64>::default();
    behind.set(count(
        proxies
            .iter()
            .filter(|p| p.connected && p.lag.is_none_or(|lag| lag > 0)),
    ));
    registry.register(
        "proxies_behind",
        "Connected proxies that do not hold the newest revision",
        behind,
    );

    let store_metrics = store.metrics();
    registry.register(
        "writes",
        "Admin writes by action and outcome (committed, unchanged, refused)",
        store_metrics.writes.clone(),
    );
    registry.register_with_unit(
        "store_flush",
        "Time to flush a committed revision to disk",
        Unit::Seconds,
        store_metrics.flush.clone(),
    );

    let discovery = fleet.metrics();
    registry.register(
        "discovery_streams",
        "Open discovery streams of registered clients, by variant",
        discovery.streams.clone(),
    );
    registry.register(
        "discovery_pushes",
        "Discovery responses sent, by variant and resource type",
        discovery.pushes.clone(),
    );
    registry.register(
        "discovery_replies",
        "ACKs and NACKs received, by resource type",
        discovery.replies.clone(),
    );
    registry.register_with_unit(
        "discovery_push_to_ack",
        "From pushing a revision to a client until it holds all of it",
        Unit::Seconds,
        discovery.push_to_ack.clone(),
    );

    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

fn count<T>(items: impl Iterator<Item = T>) -> i64 {
    i64::try_from(items.count()).unwrap_or(i64::MAX)
}
