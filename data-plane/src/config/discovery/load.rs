//! Load reports: the proxy's traffic, per namespace, route and backend, sent
//! to the control plane over xDS's Load Reporting Service
//! (`StreamLoadStats`), on the connection the discovery stream holds.
//!
//! The control plane's first response says how often to report and which
//! clusters it wants; from then on each report carries what the route
//! series counted since the one before (prism-proto's `load` says how it is
//! written). The counters are the Prometheus metrics' own, read off the
//! request path: with metrics off there is nothing to count. Each report
//! also gives every backend's endpoints' state: health, breaker, ejection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::{
    Address, Node, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterStats, EndpointLoadMetricStats, UpstreamEndpointStats, UpstreamLocalityStats,
};
use envoy_types::pb::envoy::service::load_stats::v3::LoadStatsRequest;
use envoy_types::pb::envoy::service::load_stats::v3::LoadStatsResponse;
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use prism_proto::load;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::metrics::{RouteKey, RouteTotals};
use crate::runtime::breaker::State;
use crate::runtime::{Endpoint, Runtime};

/// The shortest interval the proxy reports at, whatever the control plane
/// asks: ten reports a second is more than any view of them needs.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Reports this proxy's load as `node` over `channel` until the control
/// plane ends the stream (`Ok`) or it fails.
pub(super) async fn report(
    channel: Channel,
    node: Node,
    runtime: Arc<ArcSwap<Runtime>>,
) -> Result<(), tonic::Status> {
    let mut reader = Reader::default();
    // What was counted before the stream opened is nobody's interval.
    reader.read(&runtime);
    let (requests, outgoing) = mpsc::channel(2);
    let hello = LoadStatsRequest {
        node: Some(node),
        cluster_stats: Vec::new(),
    };
    // The receiver is the request stream below: it cannot be gone yet.
    let _ = requests.try_send(hello);
    let mut responses = LoadReportingServiceClient::new(channel)
        .stream_load_stats(ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    let Some(first) = responses.message().await? else {
        return Ok(());
    };
    let mut plan = Plan::from(first);
    let mut ticks = ticks(plan.interval);
    let mut since = Instant::now();
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let now = Instant::now();
                let mut cluster_stats = plan.stats(reader.read(&runtime), now - since);
                cluster_stats.extend(plan.endpoints(&runtime.load(), now));
                let report = LoadStatsRequest {
                    node: None,
                    cluster_stats,
                };
                since = now;
                if requests.send(report).await.is_err() {
                    return Ok(());
                }
            }
            response = responses.message() => {
                let Some(response) = response? else {
                    return Ok(());
                };
                let next = Plan::from(response);
                if next.interval != plan.interval {
                    ticks = self::ticks(next.interval);
                }
                plan = next;
            }
        }
    }
}

fn ticks(interval: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks
}

/// What the control plane asked for: how often, and which clusters (`None`:
/// all of them).
#[derive(Debug, PartialEq)]
struct Plan {
    interval: Duration,
    clusters: Option<HashSet<String>>,
}

impl From<LoadStatsResponse> for Plan {
    fn from(response: LoadStatsResponse) -> Self {
        let interval = response
            .load_reporting_interval
            .map(|d| {
                // A negative or broken duration reads as none: the minimum.
                let nanos = u32::try_from(d.nanos).unwrap_or(0);
                Duration::new(
                    u64::try_from(d.seconds).unwrap_or(0),
                    nanos.min(999_999_999),
                )
            })
            .unwrap_or_default()
            .max(MIN_INTERVAL);
        let clusters =
            (!response.send_all_clusters).then(|| response.clusters.into_iter().collect());
        Self { interval, clusters }
    }
}

impl Plan {
    fn wants(&self, cluster: &str) -> bool {
        self.clusters.as_ref().is_none_or(|c| c.contains(cluster))
    }

    /// One `ClusterStats` per backend asked for, with its endpoints' state
    /// at `now` and no requests.
    fn endpoints(&self, runtime: &Runtime, now: Instant) -> Vec<ClusterStats> {
        runtime
            .backends()
            .filter(|backend| self.wants(&backend.name))
            .map(|backend| ClusterStats {
                cluster_name: backend.name.clone(),
                upstream_locality_stats: vec![UpstreamLocalityStats {
                    upstream_endpoint_stats: backend
                        .endpoints
                        .iter()
                        .map(|endpoint| endpoint_stats(endpoint, now))
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect()
    }

    /// One `ClusterStats` per series that counted requests, of the clusters
    /// asked for, each covering `interval`.
    fn stats(
        &self,
        counted: Vec<(RouteKey, RouteTotals)>,
        interval: Duration,
    ) -> Vec<ClusterStats> {
        counted
            .into_iter()
            .map(|((namespace, route, backend), totals)| {
                let cluster = if backend.is_empty() {
                    String::new()
                } else {
                    format!("{namespace}/{backend}")
                };
                (cluster, format!("{namespace}/{route}"), totals)
            })
            .filter(|(cluster, ..)| self.wants(cluster))
            .map(|(cluster, route, totals)| cluster_stats(cluster, &route, &totals, interval))
            .collect()
    }
}

/// The route series' totals at the last reading, to subtract from the next.
#[derive(Debug, Default)]
struct Reader {
    last: BTreeMap<RouteKey, RouteTotals>,
}

impl Reader {
    /// What each live series counted since the last reading, for those that
    /// counted something. A series made anew since (its route left the
    /// policy and came back) counts from zero again.
    fn read(&mut self, runtime: &ArcSwap<Runtime>) -> Vec<(RouteKey, RouteTotals)> {
        let now: BTreeMap<_, _> = runtime
            .load()
            .metrics()
            .map(|metrics| metrics.route_totals())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let counted = now
            .iter()
            .filter_map(|(key, totals)| {
                let since = match self.last.get(key) {
                    Some(last) if !restarted(last, totals) => minus(totals, last),
                    _ => *totals,
                };
                (since.requests.iter().sum::<u64>() > 0).then(|| (key.clone(), since))
            })
            .collect();
        self.last = now;
        counted
    }
}

fn restarted(last: &RouteTotals, now: &RouteTotals) -> bool {
    now.requests.iter().sum::<u64>() < last.requests.iter().sum::<u64>()
}

fn minus(now: &RouteTotals, last: &RouteTotals) -> RouteTotals {
    RouteTotals {
        requests: std::array::from_fn(|i| now.requests[i].saturating_sub(last.requests[i])),
        latency: std::array::from_fn(|i| now.latency[i].saturating_sub(last.latency[i])),
        latency_sum_nanos: now.latency_sum_nanos.saturating_sub(last.latency_sum_nanos),
    }
}

/// One endpoint's address and state.
fn endpoint_stats(endpoint: &Endpoint, now: Instant) -> UpstreamEndpointStats {
    let text = |text: &str| Value {
        kind: Some(value::Kind::StringValue(text.to_string())),
    };
    let mut state = HashMap::new();
    if let Some(health) = &endpoint.health {
        let verdict = if health.is_healthy() {
            "healthy"
        } else {
            "unhealthy"
        };
        state.insert(load::HEALTH.to_string(), text(verdict));
    }
    if let Some(breaker) = &endpoint.breaker {
        let name = match breaker.state() {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        };
        state.insert(load::BREAKER.to_string(), text(name));
    }
    let ejected = endpoint
        .outlier
        .as_ref()
        .is_some_and(|outlier| outlier.is_ejected(now));
    state.insert(
        load::EJECTED.to_string(),
        Value {
            kind: Some(value::Kind::BoolValue(ejected)),
        },
    );
    UpstreamEndpointStats {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: endpoint.address.host().to_string(),
                port_specifier: endpoint
                    .address
                    .port_u16()
                    .map(|port| socket_address::PortSpecifier::PortValue(u32::from(port))),
                ..Default::default()
            })),
        }),
        metadata: Some(Struct { fields: state }),
        ..Default::default()
    }
}

/// One series' report: requests and 5xx errors, and their latency.
fn cluster_stats(
    cluster: String,
    route: &str,
    totals: &RouteTotals,
    interval: Duration,
) -> ClusterStats {
    let issued = totals.requests.iter().sum::<u64>();
    let errors = totals.requests[4];
    let timed = totals.latency.iter().sum::<u64>();
    let mut metrics = vec![EndpointLoadMetricStats {
        metric_name: load::LATENCY_SUM.to_string(),
        num_requests_finished_with_metric: timed,
        total_metric_value: Duration::from_nanos(totals.latency_sum_nanos).as_secs_f64(),
    }];
    metrics.extend(
        totals
            .latency
            .iter()
            .zip(load::LATENCY_BUCKETS)
            .filter(|(count, _)| **count > 0)
            .map(|(&count, name)| EndpointLoadMetricStats {
                metric_name: name.to_string(),
                num_requests_finished_with_metric: count,
                total_metric_value: count as f64,
            }),
    );
    ClusterStats {
        cluster_name: cluster,
        cluster_service_name: load::route_service_name(route),
        upstream_locality_stats: vec![UpstreamLocalityStats {
            total_successful_requests: issued - errors,
            total_error_requests: errors,
            total_issued_requests: issued,
            load_metric_stats: metrics,
            ..Default::default()
        }],
        load_report_interval: Some(ProtoDuration {
            // An interval is seconds long: the cast cannot truncate.
            seconds: interval.as_secs() as i64,
            nanos: interval.subsec_nanos() as i32,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(requests: [u64; 5], latency_bucket: usize) -> RouteTotals {
        let mut latency = [0; 15];
        latency[latency_bucket] = requests.iter().sum();
        RouteTotals {
            requests,
            latency,
            latency_sum_nanos: 1_000_000 * requests.iter().sum::<u64>(),
        }
    }

    #[test]
    fn a_series_is_written_with_its_backend_route_errors_and_latency() {
        let plan = Plan {
            interval: Duration::from_secs(2),
            clusters: None,
        };
        let key = ("demo".to_string(), "root".to_string(), "web".to_string());
        let stats = plan.stats(
            vec![(key, totals([0, 7, 0, 1, 2], 1))],
            Duration::from_secs(2),
        );
        let [cluster] = &stats[..] else {
            panic!("one cluster: {stats:?}");
        };
        assert_eq!(cluster.cluster_name, "demo/web");
        assert_eq!(cluster.cluster_service_name, "route:demo/root");
        let locality = &cluster.upstream_locality_stats[0];
        assert_eq!(
            (
                locality.total_issued_requests,
                locality.total_successful_requests,
                locality.total_error_requests
            ),
            (10, 8, 2)
        );
        let names: Vec<_> = locality
            .load_metric_stats
            .iter()
            .map(|m| (m.metric_name.as_str(), m.num_requests_finished_with_metric))
            .collect();
        assert_eq!(
            names,
            [
                ("prism.latency_seconds", 10),
                ("prism.latency.le_0.001", 10)
            ]
        );
        assert!((locality.load_metric_stats[0].total_metric_value - 0.01).abs() < 1e-9);
    }

    #[test]
    fn only_the_clusters_asked_for_are_reported() {
        let plan = Plan::from(LoadStatsResponse {
            clusters: vec!["demo/web".to_string()],
            load_reporting_interval: Some(ProtoDuration {
                seconds: 0,
                nanos: 10_000_000,
            }),
            ..Default::default()
        });
        assert_eq!(plan.interval, MIN_INTERVAL);
        let series = |backend: &str| {
            (
                ("demo".to_string(), "root".to_string(), backend.to_string()),
                totals([0, 1, 0, 0, 0], 0),
            )
        };
        let stats = plan.stats(
            vec![series("web"), series("other"), series("")],
            MIN_INTERVAL,
        );
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].cluster_name, "demo/web");
    }

    #[test]
    fn readings_subtract_the_last_and_restart_with_a_new_series() {
        let last = totals([0, 5, 0, 0, 1], 2);
        let now = totals([0, 8, 0, 0, 1], 2);
        assert!(!restarted(&last, &now));
        let since = minus(&now, &last);
        assert_eq!(since.requests, [0, 3, 0, 0, 0]);
        assert_eq!(since.latency[2], 3);
        assert_eq!(since.latency_sum_nanos, 3_000_000);
        assert!(restarted(&now, &totals([0, 2, 0, 0, 0], 0)));
    }
}
