//! Live traffic: what the fleet's load reports say, kept in memory for a
//! short window and summed up for the console, the SSE stream and `prism
//! top`.
//!
//! Discovery's Load Reporting Service records each report here, into the
//! bucket of the interval it arrived in. The window is bounded three ways:
//! [`WINDOW`] of buckets at most; each bucket keeps its reports by node,
//! namespace, route and backend for [`DETAIL`] only, then only by namespace
//! (what the charts draw); and a bucket takes at most [`MAX_SERIES`] keys,
//! dropping (and counting) the rest. Beside it, the latest state of each
//! backend endpoint as each proxy sees it (health, breaker, ejection), kept
//! for [`DETAIL`] and shown while fresher than [`SUMMARY`]. Nothing here is
//! persisted: after a restart the window fills again as reports arrive.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::AddAssign;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prism_proto::load::{LATENCY_BOUNDS_NANOS, LATENCY_BUCKETS};
use serde::Serialize;
use tracing::warn;

use crate::store::unix_millis_now;

/// How far back the charts reach.
pub const WINDOW: Duration = Duration::from_secs(300);
/// How far back reports keep their node, route and backend.
pub const DETAIL: Duration = Duration::from_secs(60);
/// What the current figures (rates, quantiles) are taken over.
pub const SUMMARY: Duration = Duration::from_secs(10);
/// Most keys (node, namespace, route, backend) one bucket holds.
pub const MAX_SERIES: usize = 10_000;
/// How often proxies report unless configured otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// The fleet's recent traffic. Cheap to clone: clones share one window.
#[derive(Clone, Debug)]
pub struct Traffic {
    window: Arc<Mutex<Window>>,
    interval: Duration,
}

/// What a report says of one series: requests, those that failed (5xx),
/// and their latency by bucket of [`LATENCY_BOUNDS_NANOS`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    pub requests: u64,
    pub errors: u64,
    pub latency: [u64; LATENCY_BUCKETS.len()],
}

/// How one proxy sees one endpoint of a backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointState {
    /// The health check's verdict; `None` without a health check.
    pub healthy: Option<bool>,
    /// The circuit breaker's state (`closed`, `open`, `half_open`); `None`
    /// without a breaker.
    pub breaker: Option<String>,
    /// Whether outlier detection has ejected it.
    pub ejected: bool,
}

/// Whose endpoint state: a proxy's, of one endpoint (`host:port`) of one
/// backend (full name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub node: String,
    pub backend: String,
    pub address: String,
}

/// Whose load: a proxy's, for one namespace, route and backend (full names;
/// route or backend empty where the report names none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Series {
    pub node: String,
    pub namespace: String,
    pub route: String,
    pub backend: String,
}

/// The traffic the admin API answers with (`GET /v1/traffic`), as the
/// caller may see it. Rates are per second; quantiles in milliseconds,
/// `null` without requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Summary {
    /// How often proxies report, and the charts' step.
    pub interval_seconds: f64,
    /// How far back `series` reach.
    pub window_seconds: f64,
    /// What the current figures are taken over.
    pub summary_seconds: f64,
    /// When this was computed.
    pub updated_unix_ms: i64,
    /// Report entries dropped because a bucket was full (since start).
    pub dropped_series: u64,
    pub namespaces: Vec<NamespaceTraffic>,
    pub routes: Vec<RouteTraffic>,
    pub backends: Vec<BackendTraffic>,
    pub proxies: Vec<ProxyTraffic>,
}

/// Current figures of one slice of the traffic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Figures {
    pub rps: f64,
    /// Failed (5xx) ÷ all requests; 0 without requests.
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests over the summary period.
    pub requests: u64,
    pub errors: u64,
}

/// A namespace: current figures and one chart point per interval.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct NamespaceTraffic {
    pub namespace: String,
    #[serde(flatten)]
    pub figures: Figures,
    /// Oldest first, one per interval over the window, ending with the
    /// last complete interval.
    pub series: Vec<Point>,
}

/// One interval of a namespace's chart.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Point {
    /// The end of the interval.
    pub t_unix_ms: i64,
    pub rps: f64,
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A route, per backend of it (empty for a route that answers itself).
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RouteTraffic {
    pub namespace: String,
    /// The route's name within its namespace; empty where the reporter
    /// names no route (an Envoy).
    pub route: String,
    pub backend: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// A backend, over all routes to it, and its endpoints as the proxies see
/// them.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BackendTraffic {
    pub namespace: String,
    pub backend: String,
    #[serde(flatten)]
    pub figures: Figures,
    /// By address.
    pub endpoints: Vec<EndpointHealth>,
}

/// One endpoint of a backend: how many proxies report it, and how many of
/// them see it healthy, unhealthy (health checks), with an open or
/// half-open breaker, or ejected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EndpointHealth {
    pub address: String,
    pub proxies: u32,
    pub healthy: u32,
    pub unhealthy: u32,
    pub breaker_open: u32,
    pub breaker_half_open: u32,
    pub ejected: u32,
}

/// A reporting proxy, over all it served.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ProxyTraffic {
    pub node: String,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Debug, Default)]
struct Window {
    /// Oldest first, by index (arrival time ÷ interval); none empty.
    buckets: VecDeque<Bucket>,
    dropped: u64,
    /// Each proxy's latest view of each endpoint, and when it came.
    endpoints: HashMap<EndpointKey, (EndpointState, i64)>,
}

#[derive(Debug)]
struct Bucket {
    index: i64,
    /// Whether its keys were reduced to namespaces.
    compacted: bool,
    loads: HashMap<Series, Load>,
}

impl Traffic {
    /// An empty window for reports every `interval` (at least 100 ms).
    pub fn new(interval: Duration) -> Self {
        Self {
            window: Arc::default(),
            interval: interval.max(Duration::from_millis(100)),
        }
    }

    /// How often proxies are asked to report.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Adds one report's entries, arrived now.
    pub fn record(&self, entries: impl IntoIterator<Item = (Series, Load)>) {
        self.record_at(unix_millis_now(), entries);
    }

    /// Replaces what `node` said of endpoints with `states`, arrived now.
    pub fn record_endpoints(&self, node: &str, states: Vec<(EndpointKey, EndpointState)>) {
        self.record_endpoints_at(unix_millis_now(), node, states);
    }

    /// The traffic of the namespaces `visible` lets through, now.
    pub fn summary(&self, visible: impl Fn(&str) -> bool) -> Summary {
        self.summary_at(unix_millis_now(), visible)
    }

    fn interval_ms(&self) -> i64 {
        i64::try_from(self.interval.as_millis()).unwrap_or(i64::MAX)
    }

    /// Intervals in `span`, at least one.
    fn intervals(&self, span: Duration) -> i64 {
        (span.as_millis() as i64 / self.interval_ms()).max(1)
    }

    fn record_at(&self, now_ms: i64, entries: impl IntoIterator<Item = (Series, Load)>) {
        let index = now_ms / self.interval_ms();
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let window = &mut *window;
        if window.buckets.back().is_none_or(|b| b.index < index) {
            window.buckets.push_back(Bucket {
                index,
                compacted: false,
                loads: HashMap::new(),
            });
        }
        // A report that raced a newer one into the window goes into the
        // newest bucket: a few milliseconds late is still its interval.
        let bucket = window.buckets.back_mut().expect("pushed above if empty");
        let mut dropped = 0;
        for (series, load) in entries {
            let full = bucket.loads.len() >= MAX_SERIES;
            match bucket.loads.get_mut(&series) {
                Some(sum) => *sum += load,
                None if full => dropped += 1,
                None => {
                    bucket.loads.insert(series, load);
                }
            }
        }
        if dropped > 0 {
            if window.dropped == 0 {
                warn!(
                    max = MAX_SERIES,
                    "Load reports name more series than the traffic window keeps; the rest are dropped."
                );
            }
            window.dropped += dropped;
        }
        let (oldest, detailed) = (
            index - self.intervals(WINDOW),
            index - self.intervals(DETAIL),
        );
        while window.buckets.front().is_some_and(|b| b.index <= oldest) {
            window.buckets.pop_front();
        }
        for bucket in window.buckets.iter_mut().filter(|b| b.index < detailed) {
            bucket.compact();
        }
    }

    fn record_endpoints_at(
        &self,
        now_ms: i64,
        node: &str,
        states: Vec<(EndpointKey, EndpointState)>,
    ) {
        let stale = now_ms - DETAIL.as_millis() as i64;
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        window
            .endpoints
            .retain(|key, (_, at)| key.node != node && *at > stale);
        for (key, state) in states {
            if window.endpoints.len() >= MAX_SERIES {
                window.dropped += 1;
                continue;
            }
            window.endpoints.insert(key, (state, now_ms));
        }
    }

    fn summary_at(&self, now_ms: i64, visible: impl Fn(&str) -> bool) -> Summary {
        let current = now_ms / self.interval_ms();
        let interval = self.interval.as_secs_f64();
        let summary_from = current - self.intervals(SUMMARY);
        let summary_seconds = (current - summary_from) as f64 * interval;
        let window = self.window.lock().unwrap_or_else(PoisonError::into_inner);

        // Only complete intervals count: the current one is still filling.
        let complete = || {
            window
                .buckets
                .iter()
                .filter(move |b| b.index < current)
                .flat_map(|b| b.loads.iter().map(move |(s, l)| (b.index, s, l)))
                .filter(|(_, series, _)| visible(&series.namespace))
        };
        let mut namespaces: BTreeMap<&str, (Load, BTreeMap<i64, Load>)> = BTreeMap::new();
        let mut routes: BTreeMap<(&str, &str, &str), Load> = BTreeMap::new();
        let mut backends: BTreeMap<(&str, &str), Load> = BTreeMap::new();
        let mut proxies: BTreeMap<&str, Load> = BTreeMap::new();
        for (index, series, load) in complete() {
            let (now, points) = namespaces.entry(&series.namespace).or_default();
            *points.entry(index).or_default() += *load;
            if index < summary_from {
                continue;
            }
            *now += *load;
            let route = local(&series.namespace, &series.route);
            let backend = local(&series.namespace, &series.backend);
            *routes
                .entry((&series.namespace, route, backend))
                .or_default() += *load;
            if !backend.is_empty() {
                *backends.entry((&series.namespace, backend)).or_default() += *load;
            }
            *proxies.entry(&series.node).or_default() += *load;
        }

        // The endpoints as the proxies that reported lately see them; their
        // backends are listed even without traffic.
        let fresh = now_ms - SUMMARY.as_millis() as i64;
        let mut endpoints: BTreeMap<(&str, &str), BTreeMap<&str, EndpointHealth>> = BTreeMap::new();
        for (key, (state, at)) in &window.endpoints {
            let Some((namespace, _)) = key.backend.split_once('/') else {
                continue;
            };
            if *at <= fresh || !visible(namespace) {
                continue;
            }
            let backend = local(namespace, &key.backend);
            backends.entry((namespace, backend)).or_default();
            let health = endpoints
                .entry((namespace, backend))
                .or_default()
                .entry(&key.address)
                .or_insert_with(|| EndpointHealth {
                    address: key.address.clone(),
                    ..EndpointHealth::default()
                });
            health.proxies += 1;
            match state.healthy {
                Some(true) => health.healthy += 1,
                Some(false) => health.unhealthy += 1,
                None => {}
            }
            match state.breaker.as_deref() {
                Some("open") => health.breaker_open += 1,
                Some("half_open") => health.breaker_half_open += 1,
                _ => {}
            }
            health.ejected += u32::from(state.ejected);
        }

        let steps = self.intervals(WINDOW);
        let figures = |load: &Load| load.figures(summary_seconds);
        Summary {
            interval_seconds: interval,
            window_seconds: steps as f64 * interval,
            summary_seconds,
            updated_unix_ms: now_ms,
            dropped_series: window.dropped,
            namespaces: namespaces
                .into_iter()
                .map(|(namespace, (now, points))| NamespaceTraffic {
                    namespace: namespace.to_string(),
                    figures: figures(&now),
                    series: (current - steps..current)
                        .map(|index| {
                            let load = points.get(&index).copied().unwrap_or_default();
                            let Figures {
                                rps,
                                error_rate,
                                p50_ms,
                                p99_ms,
                                ..
                            } = load.figures(interval);
                            Point {
                                t_unix_ms: (index + 1) * self.interval_ms(),
                                rps,
                                error_rate,
                                p50_ms,
                                p99_ms,
                            }
                        })
                        .collect(),
                })
                .collect(),
            routes: routes
                .into_iter()
                .map(|((namespace, route, backend), load)| RouteTraffic {
                    namespace: namespace.to_string(),
                    route: route.to_string(),
                    backend: backend.to_string(),
                    figures: figures(&load),
                })
                .collect(),
            backends: backends
                .into_iter()
                .map(|((namespace, backend), load)| BackendTraffic {
                    namespace: namespace.to_string(),
                    backend: backend.to_string(),
                    figures: figures(&load),
                    endpoints: endpoints
                        .remove(&(namespace, backend))
                        .map(|by_address| by_address.into_values().collect())
                        .unwrap_or_default(),
                })
                .collect(),
            proxies: proxies
                .into_iter()
                .map(|(node, load)| ProxyTraffic {
                    node: node.to_string(),
                    figures: figures(&load),
                })
                .collect(),
        }
    }
}

impl Bucket {
    /// Keeps only each namespace's sum.
    fn compact(&mut self) {
        if self.compacted {
            return;
        }
        let mut by_namespace: HashMap<Series, Load> = HashMap::new();
        for (series, load) in self.loads.drain() {
            let key = Series {
                namespace: series.namespace,
                ..Series::default()
            };
            *by_namespace.entry(key).or_default() += load;
        }
        self.loads = by_namespace;
        self.compacted = true;
    }
}

impl AddAssign for Load {
    fn add_assign(&mut self, other: Self) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (sum, add) in self.latency.iter_mut().zip(other.latency) {
            *sum += add;
        }
    }
}

impl Load {
    /// Rates over `seconds`, and quantiles.
    fn figures(&self, seconds: f64) -> Figures {
        Figures {
            rps: self.requests as f64 / seconds,
            error_rate: if self.requests == 0 {
                0.0
            } else {
                self.errors as f64 / self.requests as f64
            },
            p50_ms: self.quantile_ms(0.5),
            p99_ms: self.quantile_ms(0.99),
            requests: self.requests,
            errors: self.errors,
        }
    }

    /// The `q` quantile of the latency, interpolated within its bucket as
    /// Prometheus' `histogram_quantile` does (the unbounded bucket answers
    /// its lower bound); `None` without timed requests.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut below = 0.0;
        for (i, &count) in self.latency.iter().enumerate() {
            let count = count as f64;
            let lower = if i == 0 {
                0
            } else {
                LATENCY_BOUNDS_NANOS[i - 1]
            };
            let Some(&upper) = LATENCY_BOUNDS_NANOS.get(i) else {
                return Some(lower as f64 / 1e6);
            };
            if count > 0.0 && below + count >= rank {
                let within = (rank - below) / count;
                return Some((lower as f64 + (upper - lower) as f64 * within) / 1e6);
            }
            below += count;
        }
        None
    }
}

/// A full name's part within `namespace` (`demo/root` → `root`).
fn local<'a>(namespace: &str, full: &'a str) -> &'a str {
    full.strip_prefix(namespace)
        .and_then(|rest| rest.strip_prefix('/'))
        .unwrap_or(full)
}

#[cfg(test)]
mod tests;
