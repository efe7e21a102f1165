//! How a Prism proxy writes its traffic into xDS Load Reporting Service
//! messages (`envoy.service.load_stats.v3`), and how the control plane reads
//! them back: the names both planes must agree on.
//!
//! One `ClusterStats` per namespace, route and backend that served requests
//! in the interval:
//! - `cluster_name` is the backend's full name (`namespace/backend`), which
//!   is also its Envoy cluster's name, so an Envoy's reports read the same
//!   way; empty for a route that answers itself;
//! - `cluster_service_name` is [`route_service_name`]: `route:` and the
//!   route's full name (an Envoy reports its EDS service name there, which
//!   never starts with `route:`);
//! - one `UpstreamLocalityStats` with the requests issued and those that
//!   failed (a 5xx answer, as Envoy counts errors), and in its
//!   `load_metric_stats` the latency: [`LATENCY_SUM`] (count and sum of the
//!   durations in seconds) and one indicator metric per non-empty bucket of
//!   [`LATENCY_BOUNDS_NANOS`] ([`LATENCY_BUCKETS`]), each request adding 1.
//!
//! And one more `ClusterStats` per backend, with no `cluster_service_name`
//! and no requests, whose `upstream_endpoint_stats` give each endpoint's
//! state in the proxy: its address, and in its `metadata` the health
//! check's verdict ([`HEALTH`], absent without a health check), the circuit
//! breaker's state ([`BREAKER`], absent without a breaker) and whether
//! outlier detection has ejected it ([`EJECTED`]).

/// Upper bounds of the latency buckets, in nanoseconds: from half a
/// millisecond (a proxy hop on a LAN) to ten seconds, roughly 1-2.5-5 per
/// decade; slower goes to the last, unbounded bucket. The proxy's
/// Prometheus histograms use the same bounds.
pub const LATENCY_BOUNDS_NANOS: [u64; 14] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// The load metric of each latency bucket, by index: `le` its upper bound
/// in seconds, the last one unbounded.
pub const LATENCY_BUCKETS: [&str; LATENCY_BOUNDS_NANOS.len() + 1] = [
    "prism.latency.le_0.0005",
    "prism.latency.le_0.001",
    "prism.latency.le_0.0025",
    "prism.latency.le_0.005",
    "prism.latency.le_0.01",
    "prism.latency.le_0.025",
    "prism.latency.le_0.05",
    "prism.latency.le_0.1",
    "prism.latency.le_0.25",
    "prism.latency.le_0.5",
    "prism.latency.le_1",
    "prism.latency.le_2.5",
    "prism.latency.le_5",
    "prism.latency.le_10",
    "prism.latency.le_inf",
];

/// The load metric whose count is the requests timed and whose total is
/// the sum of their durations in seconds.
pub const LATENCY_SUM: &str = "prism.latency_seconds";

/// Endpoint metadata key: `healthy` or `unhealthy`.
pub const HEALTH: &str = "health";
/// Endpoint metadata key: `closed`, `open` or `half_open`.
pub const BREAKER: &str = "breaker";
/// Endpoint metadata key: true while ejected.
pub const EJECTED: &str = "ejected";

/// Prefix of [`route_service_name`].
const ROUTE_PREFIX: &str = "route:";

/// The `cluster_service_name` a Prism proxy reports a route's load under.
pub fn route_service_name(route: &str) -> String {
    format!("{ROUTE_PREFIX}{route}")
}

/// The route's full name in a `cluster_service_name`, `None` if it names no
/// route (an Envoy's report).
pub fn route_of_service_name(service_name: &str) -> Option<&str> {
    service_name.strip_prefix(ROUTE_PREFIX)
}

/// The index of a latency bucket's load metric.
pub fn latency_bucket(metric_name: &str) -> Option<usize> {
    LATENCY_BUCKETS.iter().position(|name| *name == metric_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_state_their_bounds_in_seconds() {
        for (name, nanos) in LATENCY_BUCKETS.iter().zip(LATENCY_BOUNDS_NANOS) {
            let seconds: f64 = name
                .strip_prefix("prism.latency.le_")
                .and_then(|s| s.parse().ok())
                .expect("a bound");
            assert_eq!(seconds, nanos as f64 / 1e9, "{name}");
        }
        assert_eq!(latency_bucket("prism.latency.le_inf"), Some(14));
        assert_eq!(latency_bucket(LATENCY_SUM), None);
    }

    #[test]
    fn routes_round_trip_through_the_service_name() {
        assert_eq!(
            route_of_service_name(&route_service_name("demo/root")),
            Some("demo/root")
        );
        assert_eq!(route_of_service_name("demo/web"), None);
    }
}
