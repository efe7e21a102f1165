//! One Cluster per Backend: discovery type, load balancing, health checks,
//! outlier detection, circuit breakers and pool limits, upstream TLS.

use std::collections::HashMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection, circuit_breakers, cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    HealthCheck, Http1ProtocolOptions, Http2ProtocolOptions,
    HttpProtocolOptions as CommonHttpProtocolOptions, RoutingPriority, health_check,
};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config,
};
use envoy_types::pb::envoy::r#type::v3::{CodecClientType, Percent};
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value, UInt64Value};
use envoy_types::util::pack_any;
use prism_proto::pb::config::v1::health_check::Check;
use prism_proto::{Backend, LbPolicy, Protocol, defaults};

use super::{Policy, ads, backend_assignment, duration_or, target_names, tls};

/// Key of `Cluster.typed_extension_protocol_options` for upstream HTTP settings.
pub(super) const HTTP_PROTOCOL_OPTIONS: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// The retry budget that the routes forwarding to one backend give its
/// cluster: Envoy keeps the budget on the cluster, Prism on the route, so
/// when several routes retry to one backend the smallest budget (and smallest
/// minimum concurrency) is the cluster's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RetryBudget {
    budget_percent: u32,
    min_retry_concurrency: u32,
}

/// The encoded Clusters and ClusterLoadAssignments of one translation, by
/// backend name, for the next translation to reuse: a write that changes
/// only routes re-encodes only the clusters whose retry budget it changes.
#[derive(Debug, Default)]
pub(super) struct ClusterCache(HashMap<String, CachedCluster>);

/// A backend's cluster with all it was made of: the backend's version and
/// the retry budget of the routes that forward to it.
#[derive(Clone, Debug)]
struct CachedCluster {
    version: String,
    budget: Option<RetryBudget>,
    cluster: Any,
    assignment: Option<Any>,
}

impl ClusterCache {
    /// The encoded cluster (and assignment) of `backend` at `version` with
    /// `budget`, from `previous` when both are unchanged, and recorded here.
    pub(super) fn encoded(
        &mut self,
        previous: &ClusterCache,
        backend: &Backend,
        version: &str,
        budget: Option<RetryBudget>,
    ) -> (Any, Option<Any>) {
        let reused = previous
            .0
            .get(&backend.name)
            .filter(|cached| cached.version == version && cached.budget == budget);
        let cached = match reused {
            Some(cached) => cached.clone(),
            None => {
                let (cluster, assignment) = backend_cluster(backend, budget);
                CachedCluster {
                    version: version.to_string(),
                    budget,
                    cluster: pack_any(cluster),
                    assignment: assignment.map(pack_any),
                }
            }
        };
        let encoded = (cached.cluster.clone(), cached.assignment.clone());
        self.0.insert(backend.name.clone(), cached);
        encoded
    }

    /// How many of these clusters are `previous`'s, not encoded again.
    #[cfg(test)]
    pub(super) fn reused_from(&self, previous: &ClusterCache) -> usize {
        self.0
            .iter()
            .filter(|(name, cached)| {
                previous.0.get(*name).is_some_and(|before| {
                    before.version == cached.version && before.budget == cached.budget
                })
            })
            .count()
    }
}

/// The retry budget of every backend that some route retries to, by the
/// backend's namespace and local name: one pass over the routes, so that a
/// policy write costs one look at each route rather than one per route and
/// backend.
pub(super) fn retry_budgets<'a>(policy: &Policy<'a>) -> HashMap<(&'a str, &'a str), RetryBudget> {
    let mut budgets: HashMap<(&str, &str), RetryBudget> = HashMap::new();
    for route in &policy.routes {
        let Some(retry) = &route.route.retry else {
            continue;
        };
        let budget = RetryBudget {
            budget_percent: defaults::nonzero_or(
                retry.budget_percent,
                defaults::retry::BUDGET_PERCENT,
            ),
            min_retry_concurrency: defaults::nonzero_or(
                retry.min_retry_concurrency,
                defaults::retry::MIN_RETRY_CONCURRENCY,
            ),
        };
        for target in target_names(route.route) {
            budgets
                .entry((route.namespace, target))
                .and_modify(|least| {
                    least.budget_percent = least.budget_percent.min(budget.budget_percent);
                    least.min_retry_concurrency = least
                        .min_retry_concurrency
                        .min(budget.min_retry_concurrency);
                })
                .or_insert(budget);
        }
    }
    budgets
}

/// The Cluster of `backend`, and its ClusterLoadAssignment when it is EDS.
///
/// EDS when every endpoint is `ip:port` (the assignment served separately, as
/// gRPC clients need: they support EDS and LOGICAL_DNS clusters only);
/// otherwise STRICT_DNS with the assignment inline, resolving IPv4 first.
/// Every cluster carries explicit HTTP protocol options (HTTP/2 for HTTP2 and
/// GRPC backends; Envoy would otherwise speak HTTP/1.1 to them) with the
/// backend's pool idle timeout and requests per connection.
fn backend_cluster(
    backend: &Backend,
    budget: Option<RetryBudget>,
) -> (Cluster, Option<ClusterLoadAssignment>) {
    let connect_timeout = duration_or(backend.connect_timeout.as_ref(), defaults::CONNECT_TIMEOUT);
    let assignment = backend_assignment(backend);
    let all_ip = backend
        .endpoints
        .iter()
        .all(|e| e.address.parse::<SocketAddr>().is_ok());
    let (mut cluster, assignment) = if all_ip {
        (
            eds_cluster(&backend.name, connect_timeout),
            Some(assignment),
        )
    } else {
        let cluster = Cluster {
            name: backend.name.clone(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::StrictDns as i32,
            )),
            connect_timeout: Some(connect_timeout),
            dns_lookup_family: cluster::DnsLookupFamily::V4Preferred as i32,
            load_assignment: Some(assignment),
            ..Default::default()
        };
        (cluster, None)
    };
    cluster.lb_policy = lb_policy(backend) as i32;
    cluster.health_checks = backend
        .health_check
        .iter()
        .map(|h| health(h, backend))
        .collect();
    cluster.outlier_detection = outlier_detection(backend);
    cluster.circuit_breakers = Some(circuit_breakers(backend, budget));
    cluster.common_lb_config = common_lb_config(backend);
    cluster.transport_socket = tls::upstream_tls(backend);
    // One entry only: prost encodes a HashMap in random order.
    cluster.typed_extension_protocol_options = HashMap::from([(
        HTTP_PROTOCOL_OPTIONS.to_string(),
        pack_any(http_options(backend)),
    )]);
    (cluster, assignment)
}

pub(super) fn eds_cluster(name: &str, connect_timeout: Duration) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.to_string(),
        }),
        connect_timeout: Some(connect_timeout),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    }
}

fn lb_policy(backend: &Backend) -> cluster::LbPolicy {
    match backend.lb_policy() {
        LbPolicy::LeastRequest => cluster::LbPolicy::LeastRequest,
        LbPolicy::Random => cluster::LbPolicy::Random,
        LbPolicy::RingHash => cluster::LbPolicy::RingHash,
        LbPolicy::Maglev => cluster::LbPolicy::Maglev,
        LbPolicy::RoundRobin | LbPolicy::Unspecified => cluster::LbPolicy::RoundRobin,
    }
}

/// Whether the backend speaks HTTP/2 to its endpoints.
pub(super) fn is_http2(backend: &Backend) -> bool {
    matches!(backend.protocol(), Protocol::Http2 | Protocol::Grpc)
}

/// The upstream protocol (explicit, so Envoy speaks HTTP/2 to HTTP2 and GRPC
/// backends), and the pool's idle timeout and requests per connection.
pub(super) fn http_options(backend: &Backend) -> HttpProtocolOptions {
    let limits = backend.limits.unwrap_or_default();
    let protocol = if is_http2(backend) {
        explicit_http_config::ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())
    } else {
        explicit_http_config::ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default())
    };
    HttpProtocolOptions {
        common_http_protocol_options: Some(CommonHttpProtocolOptions {
            idle_timeout: Some(duration_or(
                limits.idle_timeout.as_ref(),
                defaults::limits::IDLE_TIMEOUT,
            )),
            max_requests_per_connection: (limits.max_requests_per_connection > 0)
                .then_some(limits.max_requests_per_connection)
                .or(defaults::limits::MAX_REQUESTS_PER_CONNECTION)
                .map(|value| UInt32Value { value }),
            ..Default::default()
        }),
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(protocol),
            },
        )),
        ..Default::default()
    }
}

/// An HTTP probe (`GET path`, 2xx passes; over HTTP/2 to an HTTP/2 backend)
/// or a gRPC health check.
fn health(check: &prism_proto::pb::config::v1::HealthCheck, backend: &Backend) -> HealthCheck {
    use defaults::health_check as d;
    let checker = match &check.check {
        Some(Check::Grpc(grpc)) => {
            health_check::HealthChecker::GrpcHealthCheck(health_check::GrpcHealthCheck {
                service_name: grpc.service_name.clone(),
                ..Default::default()
            })
        }
        Some(Check::Http(http)) => {
            health_check::HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
                path: http.path.clone(),
                host: http.host.clone(),
                codec_client_type: if is_http2(backend) {
                    CodecClientType::Http2
                } else {
                    CodecClientType::Http1
                } as i32,
                ..Default::default()
            })
        }
        // Validation requires one; probing `/` is the harmless reading.
        None => health_check::HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
            path: "/".to_string(),
            ..Default::default()
        }),
    };
    HealthCheck {
        timeout: Some(duration_or(check.timeout.as_ref(), d::TIMEOUT)),
        interval: Some(duration_or(check.interval.as_ref(), d::INTERVAL)),
        // A Prism proxy probes at `interval` whether or not traffic flows;
        // Envoy would slow to 60 s on a cluster without traffic.
        no_traffic_interval: Some(duration_or(check.interval.as_ref(), d::INTERVAL)),
        unhealthy_threshold: Some(UInt32Value {
            value: defaults::nonzero_or(check.unhealthy_threshold, d::UNHEALTHY_THRESHOLD),
        }),
        healthy_threshold: Some(UInt32Value {
            value: defaults::nonzero_or(check.healthy_threshold, d::HEALTHY_THRESHOLD),
        }),
        health_checker: Some(checker),
        ..Default::default()
    }
}

/// Passive ejection. Envoy's success-rate detection (on by default there)
/// is turned off: Prism ejects on consecutive failures only.
///
/// Envoy has no per-endpoint circuit breaker (its `circuit_breakers` are
/// cluster-wide limits, see [`circuit_breakers`]); the nearest equivalent of
/// Prism's `circuit_breaker` is outlier detection: after `failure_threshold`
/// consecutive 5xx or gateway failures the endpoint is ejected for
/// `open_timeout` (not growing), and any share of the endpoints may be. There
/// is no half-open state in Envoy: after the ejection the endpoint takes its
/// full share again, so `half_open_max_requests` and `success_threshold` have
/// no equivalent. When a backend sets both, `outlier_detection` wins.
fn outlier_detection(backend: &Backend) -> Option<OutlierDetection> {
    let percent = |value: u32| Some(UInt32Value { value });
    if let Some(o) = &backend.outlier_detection {
        use defaults::outlier as d;
        return Some(OutlierDetection {
            consecutive_5xx: percent(defaults::nonzero_or(o.consecutive_5xx, d::CONSECUTIVE_5XX)),
            consecutive_gateway_failure: percent(defaults::nonzero_or(
                o.consecutive_gateway_failure,
                d::CONSECUTIVE_GATEWAY_FAILURE,
            )),
            enforcing_consecutive_gateway_failure: percent(100),
            enforcing_success_rate: percent(0),
            base_ejection_time: Some(duration_or(
                o.base_ejection_time.as_ref(),
                d::BASE_EJECTION_TIME,
            )),
            max_ejection_time: Some(duration_or(
                o.max_ejection_time.as_ref(),
                d::MAX_EJECTION_TIME,
            )),
            max_ejection_percent: percent(defaults::nonzero_or(
                o.max_ejection_percent,
                d::MAX_EJECTION_PERCENT,
            )),
            ..Default::default()
        });
    }
    let breaker = backend.circuit_breaker.as_ref()?;
    use defaults::circuit_breaker as d;
    let failures = defaults::nonzero_or(breaker.failure_threshold, d::FAILURE_THRESHOLD);
    let open = duration_or(breaker.open_timeout.as_ref(), d::OPEN_TIMEOUT);
    Some(OutlierDetection {
        consecutive_5xx: percent(failures),
        consecutive_gateway_failure: percent(failures),
        enforcing_consecutive_gateway_failure: percent(100),
        enforcing_success_rate: percent(0),
        base_ejection_time: Some(open),
        max_ejection_time: Some(open),
        max_ejection_percent: percent(100),
        ..Default::default()
    })
}

/// The backend's limits as the default-priority thresholds, and the retry
/// budget of the routes that forward to it (see [`RetryBudget`]).
fn circuit_breakers(backend: &Backend, budget: Option<RetryBudget>) -> CircuitBreakers {
    use defaults::limits as d;
    let limits = backend.limits.unwrap_or_default();
    let value = |v: u32, default: u32| {
        Some(UInt32Value {
            value: defaults::nonzero_or(v, default),
        })
    };
    let retry_budget = budget.map(|budget| circuit_breakers::thresholds::RetryBudget {
        budget_percent: Some(Percent {
            value: f64::from(budget.budget_percent),
        }),
        min_retry_concurrency: Some(UInt32Value {
            value: budget.min_retry_concurrency,
        }),
        ..Default::default()
    });
    CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            priority: RoutingPriority::Default as i32,
            max_connections: value(limits.max_connections, d::MAX_CONNECTIONS),
            max_pending_requests: value(limits.max_pending_requests, d::MAX_PENDING_REQUESTS),
            max_requests: value(limits.max_requests, d::MAX_REQUESTS),
            retry_budget,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Zone-aware routing and panic mode. Zone-aware routing, Envoy's way:
/// enabled for all requests on a cluster of any size. Envoy compares the
/// upstream's zones with its own fleet's (the bootstrap's
/// `cluster_manager.local_cluster_name`; without one it routes as if
/// zone-unaware) and spills out of the zone as its share of healthy endpoints
/// drops; `min_healthy_percent` has no Envoy equivalent. A Prism proxy has no
/// panic mode — with every endpoint failing its health check a request gets
/// `503` — so a health-checked backend turns Envoy's (routing to all
/// endpoints once fewer than half are healthy) off.
fn common_lb_config(backend: &Backend) -> Option<cluster::CommonLbConfig> {
    let locality = backend.zone_aware.as_ref().map(|_| {
        cluster::common_lb_config::LocalityConfigSpecifier::ZoneAwareLbConfig(
            cluster::common_lb_config::ZoneAwareLbConfig {
                routing_enabled: Some(Percent { value: 100.0 }),
                min_cluster_size: Some(UInt64Value { value: 1 }),
                fail_traffic_on_panic: false,
            },
        )
    });
    let panic = backend
        .health_check
        .as_ref()
        .map(|_| Percent { value: 0.0 });
    if locality.is_none() && panic.is_none() {
        return None;
    }
    Some(cluster::CommonLbConfig {
        healthy_panic_threshold: panic,
        locality_config_specifier: locality,
        ..Default::default()
    })
}
