//! The proxy's Prometheus metrics: one prometheus-client `Registry`, served
//! as OpenMetrics text by the admin listener's `/metrics`.
//!
//! Nothing is looked up on the request path. Label sets are resolved when a
//! runtime is compiled, off the request path: each compiled route holds an
//! `Arc` to its [`RouteSeries`] (one per backend of its split), each backend
//! its [`BackendSeries`], each rate limit its namespace's
//! [`NamespaceSeries`]. A request adds to plain atomics through them: no
//! lock, no hash lookup, no allocation. Latencies go into [`Histogram`],
//! fixed buckets on atomics, since prometheus-client's own histogram takes a
//! lock per observation and its `Family` one per label lookup.
//!
//! [`Series`] keeps every label set it handed out as a weak reference: a
//! compile that finds one still held gets the same `Arc`, so the counters of
//! a route or backend that survives an apply go on counting; once no runtime
//! and no request holds one any more it leaves the next scrape, so what is
//! exported stays bounded by the policy. The proxy-wide metrics (listeners,
//! configuration) are prometheus-client's own counters and gauges, which are
//! atomics too.
//!
//! With metrics off (`Config::metrics`) no [`Metrics`] exists: the runtime
//! carries `None`, compiled routes and backends hold no series, and the
//! request path records nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::StatusCode;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

use crate::access_log::Pending;
use crate::http::body::BodyEnd;
use crate::trace::RequestSpan;

/// The content type of `/metrics`.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `route` label of requests that matched no route (and of those that
/// came before any configuration).
pub(crate) const UNMATCHED: &str = "unmatched";

/// Upper bounds of the latency histograms' buckets, in nanoseconds: the
/// load reports' (prism-proto's `load`).
const BOUNDS: [u64; 14] = prism_proto::load::LATENCY_BOUNDS_NANOS;

/// `code_class` label values, by [`status_class`].
const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// `state` label values of breaker transitions, by [`BreakerState`].
const BREAKER_STATES: [&str; 3] = ["open", "half_open", "closed"];

/// `result` label values of health checks: passed, failed.
const PROBE_RESULTS: [&str; 2] = ["success", "failure"];

/// One proxy's metrics: the registry `/metrics` encodes, the per-listener
/// and configuration metrics, and the series compiled runtimes resolve.
pub(crate) struct Metrics {
    registry: Registry,
    series: Arc<Series>,
    /// Requests that matched no route, or came before any configuration.
    unmatched: Arc<RouteSeries>,
    revision: Gauge,
    access_log_dropped: Counter,
    acks: Counter,
    nacks: Counter,
    http: ListenerMetrics,
    https: ListenerMetrics,
}

/// What one proxy listener counts. The default is a set of handles that no
/// registry exports, for a proxy with metrics off: the listener counts the
/// same way, and nobody reads it.
#[derive(Clone, Debug, Default)]
pub(crate) struct ListenerMetrics {
    /// Open client connections.
    pub connections: Gauge,
    /// Requests in flight: the concurrency limit's own count.
    pub requests: Gauge,
    /// Requests refused at the concurrency limit.
    pub overloaded: Counter,
}

/// Which proxy listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Listener {
    /// The plain listener: HTTP/1.1 and h2c.
    Http,
    /// The TLS listener.
    Https,
}

/// What the route stage records for one namespace, route and backend: the
/// requests by status class, their duration and their bytes.
#[derive(Debug, Default)]
pub(crate) struct RouteSeries {
    requests: [AtomicU64; 5],
    duration: Histogram,
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
}

/// What happens to one backend: upstream latency, retries, its endpoints'
/// breaker transitions, outlier ejections and health check results.
#[derive(Debug, Default)]
pub(crate) struct BackendSeries {
    upstream: Histogram,
    retries: AtomicU64,
    transitions: [AtomicU64; 3],
    ejections: AtomicU64,
    probes: [AtomicU64; 2],
}

/// What happens to one namespace as a whole: requests its rate limits (or
/// its routes') refused.
#[derive(Debug, Default)]
pub(crate) struct NamespaceSeries {
    rate_limited: AtomicU64,
}

/// What one route's series has counted since it was made: what the load
/// reporter reads, and subtracts from its previous reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RouteTotals {
    /// Requests answered, by status class (1xx to 5xx).
    pub requests: [u64; 5],
    /// Requests by latency bucket ([`BOUNDS`], then the unbounded one).
    pub latency: [u64; BOUNDS.len() + 1],
    /// The sum of their durations.
    pub latency_sum_nanos: u64,
}

/// A circuit breaker's state, as a transition enters it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BreakerState {
    /// Refusing requests after failures.
    Open = 0,
    /// Letting probes through once its open timeout has passed.
    HalfOpen = 1,
    /// Letting every request through again.
    Closed = 2,
}

/// A latency histogram on atomics: one counter per bucket (not cumulative;
/// the encoding adds them up, and their total is the count) and the sum in
/// nanoseconds. Observing is a search of [`BOUNDS`] and two relaxed adds.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

/// One request's record, from the route stage's call to the end of its
/// response body: the request's one completion point. Dropped, it adds the
/// request to its series (with metrics on) — its status class (once the
/// response head or the error is known), its duration and its bytes —,
/// finishes its access log line (for a namespace with access logs on) and
/// ends its span (with traces on). A request whose client gave up before
/// the response head is neither counted nor logged; its span ends then.
#[derive(Debug)]
pub(crate) struct Recorder {
    series: Option<Arc<RouteSeries>>,
    log: Option<Pending>,
    span: Option<RequestSpan>,
    start: Instant,
    /// The status answered, once known.
    status: Option<StatusCode>,
    /// The request body's shared state, read for its size at the end.
    request: Option<BodyEnd>,
    response_bytes: u64,
}

pin_project! {
    /// A response body that counts the bytes it yields into its request's
    /// [`Recorder`] and records the request when it ends or is dropped.
    /// Without a recorder (metrics off, no access log) it only passes
    /// frames through.
    pub(crate) struct Metered<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }
}

/// The label sets handed out, as weak references: alive while a runtime
/// or a request holds them.
#[derive(Debug, Default)]
struct Series {
    routes: Mutex<BTreeMap<RouteKey, Weak<RouteSeries>>>,
    backends: Mutex<BTreeMap<BackendKey, Weak<BackendSeries>>>,
    namespaces: Mutex<BTreeMap<String, Weak<NamespaceSeries>>>,
}

/// Namespace, route and backend (names within the namespace; the backend
/// empty for a route that answers itself).
pub(crate) type RouteKey = (String, String, String);
/// Namespace and backend name within it.
type BackendKey = (String, String);

impl Metrics {
    /// A registry with every metric of the proxy, nothing counted yet.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let series = Arc::new(Series::default());
        let unmatched = series.route("", UNMATCHED, "");

        let revision = Gauge::default();
        // The registry adds the help texts' final full stop.
        registry.register(
            "prism_proxy_config_revision",
            "Revision of the policy the proxy serves (0 before the first)",
            revision.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "prism_proxy_access_log_dropped",
            "Access log lines dropped because the writer's queue was full (the request was not held up)",
            access_log_dropped.clone(),
        );
        let applies = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "prism_proxy_config_applies",
            "Complete revisions the proxy answered, by outcome: ack (served) or nack (refused, the previous one kept)",
            applies.clone(),
        );
        let acks = applies.get_or_create(&[("outcome", "ack")]).clone();
        let nacks = applies.get_or_create(&[("outcome", "nack")]).clone();

        let connections = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        registry.register(
            "prism_proxy_active_connections",
            "Open client connections, by listener",
            connections.clone(),
        );
        let requests = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        registry.register(
            "prism_proxy_active_requests",
            "Requests in flight (until their response body ends), by listener",
            requests.clone(),
        );
        let overloaded = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "prism_proxy_overload_rejections",
            "Requests refused with 503 at the proxy-wide max_concurrent_requests, by listener",
            overloaded.clone(),
        );
        let listener = |name: &'static str| {
            let labels = [("listener", name)];
            ListenerMetrics {
                connections: connections.get_or_create(&labels).clone(),
                requests: requests.get_or_create(&labels).clone(),
                overloaded: overloaded.get_or_create(&labels).clone(),
            }
        };
        let (http, https) = (listener("http"), listener("https"));

        registry.register_collector(Box::new(Arc::clone(&series)));
        Self {
            registry,
            series,
            unmatched,
            revision,
            access_log_dropped,
            acks,
            nacks,
            http,
            https,
        }
    }

    /// Everything registered, as OpenMetrics text ending in `# EOF`.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail, and no metric here fails to encode.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// The handles of `listener`.
    pub(crate) fn listener(&self, listener: Listener) -> ListenerMetrics {
        match listener {
            Listener::Http => self.http.clone(),
            Listener::Https => self.https.clone(),
        }
    }

    /// The count of access log lines dropped at a full queue.
    pub(crate) fn access_log_dropped(&self) -> Counter {
        self.access_log_dropped.clone()
    }

    /// The series of requests that matched no route.
    pub(crate) fn unmatched(&self) -> &Arc<RouteSeries> {
        &self.unmatched
    }

    /// The series of route `route` (full name, `namespace/name`) forwarding
    /// to `backend` (full name), or answering itself when `None`.
    pub(crate) fn route(&self, route: &str, backend: Option<&str>) -> Arc<RouteSeries> {
        let (namespace, name) = split(route);
        let backend = backend.map_or("", |b| split(b).1);
        self.series.route(namespace, name, backend)
    }

    /// The series of backend `backend` (full name).
    pub(crate) fn backend(&self, backend: &str) -> Arc<BackendSeries> {
        let (namespace, name) = split(backend);
        let key = (namespace.to_string(), name.to_string());
        get_or_create(&self.series.backends, key)
    }

    /// The series of namespace `namespace`.
    pub(crate) fn namespace(&self, namespace: &str) -> Arc<NamespaceSeries> {
        get_or_create(&self.series.namespaces, namespace.to_string())
    }

    /// Every route series' totals but the unmatched requests', by
    /// namespace, route and backend.
    pub(crate) fn route_totals(&self) -> Vec<(RouteKey, RouteTotals)> {
        live(&self.series.routes)
            .into_iter()
            .filter(|(_, series)| !Arc::ptr_eq(series, &self.unmatched))
            .map(|(key, series)| (key, series.totals()))
            .collect()
    }

    /// A complete revision was served (or kept: an unchanged one).
    pub(crate) fn acked(&self, revision: u64) {
        self.acks.inc();
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    /// A complete revision was refused.
    pub(crate) fn nacked(&self) {
        self.nacks.inc();
    }

    /// The proxy serves `revision`, restored from disk at start.
    pub(crate) fn restored(&self, revision: u64) {
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl RouteSeries {
    /// One request: its response's `status` class, how long it took and
    /// the bytes of its request and response bodies.
    fn record(&self, class: usize, took: Duration, request_bytes: u64, response_bytes: u64) {
        self.requests[class].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(took);
        if request_bytes > 0 {
            self.request_bytes
                .fetch_add(request_bytes, Ordering::Relaxed);
        }
        if response_bytes > 0 {
            self.response_bytes
                .fetch_add(response_bytes, Ordering::Relaxed);
        }
    }
}

impl RouteSeries {
    fn totals(&self) -> RouteTotals {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RouteTotals {
            requests: self.requests.each_ref().map(read),
            latency: self.duration.buckets.each_ref().map(read),
            latency_sum_nanos: read(&self.duration.sum_nanos),
        }
    }
}

impl BackendSeries {
    /// How long an upstream took to answer with its response head.
    pub(crate) fn upstream(&self, took: Duration) {
        self.upstream.observe(took);
    }

    /// A request was sent again.
    pub(crate) fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// An endpoint's circuit breaker entered `state`.
    pub(crate) fn breaker(&self, state: BreakerState) {
        self.transitions[state as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Outlier detection ejected an endpoint.
    pub(crate) fn ejected(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// A health check probe `passed` or not.
    pub(crate) fn probed(&self, passed: bool) {
        self.probes[usize::from(!passed)].fetch_add(1, Ordering::Relaxed);
    }
}

impl NamespaceSeries {
    /// A rate limit refused a request.
    pub(crate) fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }
}

impl Histogram {
    /// Counts one observation of `took`.
    #[inline]
    pub(crate) fn observe(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS.partition_point(|&bound| bound < nanos);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), fmt::Error> {
        let mut buckets = [(0.0, 0); BOUNDS.len() + 1];
        let mut count = 0;
        for (i, (bound, n)) in buckets.iter_mut().enumerate() {
            // The last bucket is `+Inf`.
            *bound = BOUNDS.get(i).map_or(f64::INFINITY, |&b| seconds(b));
            *n = self.buckets[i].load(Ordering::Relaxed);
            count += *n;
        }
        let sum = seconds(self.sum_nanos.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Recorder {
    /// A request's record into `series`, access log line `log` and `span`,
    /// from now; `request` tells its body's size at the end, `None` when it
    /// had none. `None` when there is no series, line or span: nothing to
    /// record.
    pub(crate) fn start(
        series: Option<Arc<RouteSeries>>,
        log: Option<Pending>,
        span: Option<RequestSpan>,
        request: Option<BodyEnd>,
    ) -> Option<Self> {
        if series.is_none() && log.is_none() && span.is_none() {
            return None;
        }
        Some(Self {
            series,
            log,
            span,
            start: Instant::now(),
            status: None,
            request,
            response_bytes: 0,
        })
    }

    /// The request was answered with `status` (its head, or an error's
    /// status: the class an HTTP caller would see, gRPC callers too).
    pub(crate) fn answered(&mut self, status: StatusCode) {
        self.status = Some(status);
        if let Some(span) = &self.span {
            span.answered(status);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let Some(status) = self.status else {
            return;
        };
        let took = self.start.elapsed();
        let request_bytes = self.request.as_ref().map_or(0, BodyEnd::received);
        if let Some(series) = &self.series {
            series.record(
                status_class(status),
                took,
                request_bytes,
                self.response_bytes,
            );
        }
        if let Some(log) = self.log.take() {
            log.finish(status, took, request_bytes, self.response_bytes);
        }
    }
}

impl<B> Metered<B> {
    /// `inner`, recorded by `recorder` if any.
    pub(crate) fn new(inner: B, recorder: Option<Recorder>) -> Self {
        Self { inner, recorder }
    }
}

impl<B> Body for Metered<B>
where
    B: Body,
    B::Data: bytes::Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(recorder) = this.recorder {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        recorder.response_bytes += bytes::Buf::remaining(data) as u64;
                    }
                }
                // Ended or failed: record now, not when the body is dropped.
                Some(Err(_)) | None => drop(this.recorder.take()),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Series {
    fn route(&self, namespace: &str, route: &str, backend: &str) -> Arc<RouteSeries> {
        let key = (
            namespace.to_string(),
            route.to_string(),
            backend.to_string(),
        );
        get_or_create(&self.routes, key)
    }
}

impl Collector for Series {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let routes = live(&self.routes);
        let backends = live(&self.backends);
        let namespaces = live(&self.namespaces);

        let mut family = encoder.encode_descriptor(
            "prism_proxy_requests",
            "Requests by namespace, route, backend and status class (an error the proxy answers counts as its HTTP status, for gRPC callers too).",
            None,
            MetricType::Counter,
        )?;
        for ((namespace, route, backend), series) in &routes {
            for (class, count) in CODE_CLASSES.iter().zip(&series.requests) {
                let labels = [
                    ("namespace", namespace.as_str()),
                    ("route", route.as_str()),
                    ("backend", backend.as_str()),
                    ("code_class", class),
                ];
                counter(&mut family, &labels, count)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "prism_proxy_request_duration",
            "Time from routing a request to the end of its response body.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for ((namespace, route, backend), series) in &routes {
            let labels = route_labels(namespace, route, backend);
            series.duration.encode(family.encode_family(&labels)?)?;
        }

        for (name, help, pick) in [
            (
                "prism_proxy_request",
                "Request body bytes received from clients.",
                (|s: &RouteSeries| &s.request_bytes) as fn(&RouteSeries) -> &AtomicU64,
            ),
            (
                "prism_proxy_response",
                "Response body bytes sent to clients.",
                |s: &RouteSeries| &s.response_bytes,
            ),
        ] {
            let mut family =
                encoder.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Counter)?;
            for ((namespace, route, backend), series) in &routes {
                let labels = route_labels(namespace, route, backend);
                counter(&mut family, &labels, pick(series))?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "prism_proxy_upstream_duration",
            "Time from sending a request to an endpoint to its response head, per try.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for ((namespace, backend), series) in &backends {
            let labels = backend_labels(namespace, backend);
            series.upstream.encode(family.encode_family(&labels)?)?;
        }

        for (name, help, pick) in [
            (
                "prism_proxy_retries",
                "Requests sent again by a route's retry policy.",
                (|s: &BackendSeries| &s.retries) as fn(&BackendSeries) -> &AtomicU64,
            ),
            (
                "prism_proxy_outlier_ejections",
                "Endpoints ejected by outlier detection.",
                |s: &BackendSeries| &s.ejections,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((namespace, backend), series) in &backends {
                let labels = backend_labels(namespace, backend);
                counter(&mut family, &labels, pick(series))?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "prism_proxy_breaker_transitions",
            "Endpoint circuit breakers entering a state.",
            None,
            MetricType::Counter,
        )?;
        for ((namespace, backend), series) in &backends {
            for (state, count) in BREAKER_STATES.iter().zip(&series.transitions) {
                let labels = [
                    ("namespace", namespace.as_str()),
                    ("backend", backend.as_str()),
                    ("state", state),
                ];
                counter(&mut family, &labels, count)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "prism_proxy_health_checks",
            "Active health check probes, by result.",
            None,
            MetricType::Counter,
        )?;
        for ((namespace, backend), series) in &backends {
            for (result, count) in PROBE_RESULTS.iter().zip(&series.probes) {
                let labels = [
                    ("namespace", namespace.as_str()),
                    ("backend", backend.as_str()),
                    ("result", result),
                ];
                counter(&mut family, &labels, count)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "prism_proxy_ratelimit_rejections",
            "Requests refused with 429 by a rate limit of the namespace or one of its routes.",
            None,
            MetricType::Counter,
        )?;
        for (namespace, series) in &namespaces {
            let labels = [("namespace", namespace.as_str())];
            counter(&mut family, &labels, &series.rate_limited)?;
        }
        Ok(())
    }
}

/// The `code_class` index of `status`: 1xx to 5xx (anything above 599,
/// which no proxy answer is, counts as 5xx).
fn status_class(status: StatusCode) -> usize {
    usize::from((status.as_u16() / 100).clamp(1, 5)) - 1
}

/// `namespace/name` as its two parts (an unqualified name in namespace "").
fn split(full: &str) -> (&str, &str) {
    full.split_once('/').unwrap_or(("", full))
}

fn seconds(nanos: u64) -> f64 {
    Duration::from_nanos(nanos).as_secs_f64()
}

fn route_labels<'a>(
    namespace: &'a str,
    route: &'a str,
    backend: &'a str,
) -> [(&'static str, &'a str); 3] {
    [
        ("namespace", namespace),
        ("route", route),
        ("backend", backend),
    ]
}

fn backend_labels<'a>(namespace: &'a str, backend: &'a str) -> [(&'static str, &'a str); 2] {
    [("namespace", namespace), ("backend", backend)]
}

/// One counter sample of `family` with `labels`.
fn counter<const N: usize>(
    family: &mut MetricEncoder<'_>,
    labels: &[(&'static str, &str); N],
    value: &AtomicU64,
) -> Result<(), fmt::Error> {
    family
        .encode_family(labels)?
        .encode_counter::<NoLabelSet, _, u64>(&value.load(Ordering::Relaxed), None)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The series of `key` in `map`: the one still held, else a new one.
fn get_or_create<K: Ord, T: Default>(map: &Mutex<BTreeMap<K, Weak<T>>>, key: K) -> Arc<T> {
    let mut map = lock(map);
    let slot = map.entry(key).or_default();
    if let Some(held) = slot.upgrade() {
        return held;
    }
    let series = Arc::new(T::default());
    *slot = Arc::downgrade(&series);
    series
}

/// The series of `map` still held, in label order; the others are
/// forgotten.
fn live<K: Ord + Clone, T>(map: &Mutex<BTreeMap<K, Weak<T>>>) -> Vec<(K, Arc<T>)> {
    let mut map = lock(map);
    map.retain(|_, series| series.strong_count() > 0);
    map.iter()
        .filter_map(|(key, series)| Some((key.clone(), series.upgrade()?)))
        .collect()
}

#[cfg(test)]
mod tests;
