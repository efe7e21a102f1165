//! The Envoy view of Prism's policy: a pure translation of a [`Snapshot`] and
//! the proxy fleet into standard xDS resources (Listener, RouteConfiguration,
//! Cluster, ClusterLoadAssignment, and SDS Secrets), so that a stock Envoy
//! bootstrapped with only an ADS cluster pointing at Prism, or a proxyless
//! gRPC client dialing `xds:///<host>`, routes per Prism policy.
//!
//! It owns no IO and knows nothing of tonic or the store: the discovery server
//! calls [`translate`] once per policy revision or fleet change and serves the
//! result. Every resource is encoded deterministically (sorted input, maps
//! written in key order by hand where they can hold more than one entry),
//! because the discovery server versions a resource by hashing its bytes (the
//! RouteConfiguration by hashing its pieces, see
//! [`EnvoyResources::route_configuration_versions`]) and prost encodes
//! `HashMap`s in random order.
//!
//! The shape, chosen to look like what an Envoy or Istio user expects:
//!
//! - Listener `prism-http` binds [`EnvoyParams::listener_address`] and runs one
//!   HttpConnectionManager whose routes come over ADS as RouteConfiguration
//!   `prism-http`. Listener `prism-https` (at
//!   [`EnvoyParams::tls_listener_address`], only while some namespace has a
//!   `tls_secret`) runs the same manager behind TLS, one filter chain per such
//!   namespace chosen by SNI, its certificate an SDS secret over ADS.
//! - That RouteConfiguration has one VirtualHost per namespace, plus one per
//!   host that a route is restricted to (`match.host`). See `routes.rs`.
//! - Every Backend is a Cluster of the same name (`ns/web`): EDS when all its
//!   endpoints are `ip:port`, STRICT_DNS otherwise (Envoy's EDS accepts only IP
//!   addresses). See `clusters.rs`.
//! - Every Secret is an SDS Secret of the same name (`ns/tls`), served only by
//!   name to the Envoys whose listeners and clusters refer to it. See `tls.rs`.
//! - The fleet of Prism proxies is Cluster `prism-proxy`, by locality.
//! - Every exact host is also an API listener named after it, for gRPC clients
//!   dialing `xds:///<host>`; those are served only when asked for by name.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality,
    SocketAddress, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints, endpoint,
    lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, Listener, filter,
};
use envoy_types::pb::envoy::extensions::filters::http::buffer::v3::Buffer;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use envoy_types::util::pack_any;
use prism_proto::{
    Backend, Namespace, ProtoDuration, Resource, Route, Secret, Snapshot, Versioned, defaults,
};

mod clusters;
mod routes;
mod tls;

#[cfg(test)]
use clusters::HTTP_PROTOCOL_OPTIONS;
use clusters::{ClusterCache, eds_cluster};
#[cfg(test)]
use routes::{BUFFER_FILTER, NAMESPACE_RATE_LIMIT_FILTER, ROUTE_RATE_LIMIT_FILTER};
use routes::{RouteCache, RouteContext};

/// Type URL of `envoy.config.listener.v3.Listener` (LDS).
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of `envoy.config.route.v3.RouteConfiguration` (RDS).
pub const ROUTE_CONFIGURATION: &str =
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Type URL of `envoy.config.cluster.v3.Cluster` (CDS).
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
pub const CLUSTER_LOAD_ASSIGNMENT: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// Type URL of `envoy.extensions.transport_sockets.tls.v3.Secret` (SDS).
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Name of the socket listener, and of the RouteConfiguration it (and every
/// API listener) asks for over RDS.
pub const HTTP_LISTENER: &str = "prism-http";
/// Name of the TLS socket listener.
pub const HTTPS_LISTENER: &str = "prism-https";
/// Name of the one RouteConfiguration.
pub const HTTP_ROUTES: &str = "prism-http";
/// Name of the Cluster (and ClusterLoadAssignment) of Prism's own proxies.
pub const FLEET_CLUSTER: &str = "prism-proxy";

/// `stat_prefix` of every HttpConnectionManager.
const STAT_PREFIX: &str = "prism_http";
/// Well-known name of the router HTTP filter; gRPC and Envoy both require it
/// to be the last filter of the chain.
const ROUTER_FILTER: &str = "envoy.filters.http.router";
/// Well-known name of the HttpConnectionManager network filter.
const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
/// Route timeout when neither the route nor its namespace sets one.
const DEFAULT_ROUTE_TIMEOUT: Duration = envoy_duration(defaults::REQUEST_TIMEOUT);
/// Connect timeout when a backend sets none.
const DEFAULT_CONNECT_TIMEOUT: Duration = envoy_duration(defaults::CONNECT_TIMEOUT);

/// Settings of the Envoy view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvoyParams {
    /// Where the socket listener `prism-http` of every subscribing Envoy binds.
    pub listener_address: SocketAddr,
    /// Where the TLS listener `prism-https` binds, when some namespace has a
    /// `tls_secret`.
    pub tls_listener_address: SocketAddr,
}

/// One proxy of the fleet, published as an endpoint of cluster `prism-proxy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetEndpoint {
    /// The proxy's node id.
    pub id: String,
    /// `ip:port` the proxy serves on. EDS accepts only IP addresses, so a proxy
    /// that advertises a DNS name (or nothing) is left out.
    pub address: String,
    /// Availability zone, from the proxy's node locality.
    pub zone: String,
    /// Region, from the proxy's node locality.
    pub region: String,
    /// Whether the proxy is connected and current.
    pub healthy: bool,
}

/// Every Envoy resource of one policy revision, by type, then name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EnvoyResources {
    /// What a wildcard LDS subscription gets: the socket listener
    /// `prism-http`, and `prism-https` when some namespace serves TLS.
    pub listeners: BTreeMap<String, Any>,
    /// API listeners for proxyless gRPC (`xds:///<host>`), one per exact host,
    /// named after it. Served only to those who ask for them by name: an Envoy
    /// rejects a dynamic listener that has no address.
    pub api_listeners: BTreeMap<String, Any>,
    /// The RouteConfiguration `prism-http`.
    pub route_configurations: BTreeMap<String, Any>,
    /// The version of each RouteConfiguration. It is assembled from routes
    /// encoded (and hashed) once each, so its version is a hash of the
    /// pieces' hashes and of the bytes between them: deterministic, changed
    /// exactly when its bytes are, and not a second pass over its bytes
    /// (some 620 KB at 10,000 routes) on every policy write.
    pub route_configuration_versions: BTreeMap<String, String>,
    /// One Cluster per Backend, plus `prism-proxy`.
    pub clusters: BTreeMap<String, Any>,
    /// One ClusterLoadAssignment per EDS cluster, plus `prism-proxy`.
    pub cluster_load_assignments: BTreeMap<String, Any>,
    /// One SDS Secret per Prism Secret, named alike. Served only by name.
    pub secrets: BTreeMap<String, Any>,
}

/// What one translation leaves for the next to reuse: its encoded routes
/// and clusters. Holds the resources of one policy, replaced per translation.
#[derive(Debug, Default)]
pub struct TranslationCache {
    routes: RouteCache,
    clusters: ClusterCache,
}

/// The policy sorted for translation: what each part of the Envoy view needs
/// to look up.
struct Policy<'a> {
    namespaces: Vec<&'a Namespace>,
    /// In name order.
    routes: Vec<PolicyRoute<'a>>,
    /// Each backend and its version (its content hash), by full name,
    /// `namespace/name`.
    backends: BTreeMap<&'a str, (&'a Backend, &'a str)>,
    secrets: Vec<&'a Secret>,
}

/// A route of the policy, with its namespace and the snapshot's resource it
/// is, whose version (and identity) tells the route cache whether it changed.
struct PolicyRoute<'a> {
    namespace: &'a str,
    route: &'a Route,
    versioned: &'a Arc<Versioned>,
}

impl<'a> Policy<'a> {
    fn of(snapshot: &'a Snapshot) -> Self {
        let mut policy = Policy {
            namespaces: Vec::new(),
            // Routes are most of a large policy: room for all at once.
            routes: Vec::with_capacity(snapshot.len()),
            backends: BTreeMap::new(),
            secrets: Vec::new(),
        };
        for versioned in snapshot.iter() {
            match &versioned.resource {
                Resource::Namespace(ns) => policy.namespaces.push(ns),
                Resource::Route(route) => policy.routes.push(PolicyRoute {
                    namespace: versioned.resource.namespace(),
                    route,
                    versioned,
                }),
                Resource::Backend(backend) => {
                    policy
                        .backends
                        .insert(&backend.name, (backend, &versioned.version));
                }
                Resource::Secret(secret) => policy.secrets.push(secret),
                // Served by Prism's proxies only: Envoy has no data APIs.
                Resource::DataBinding(_) => {}
            }
        }
        policy
    }

    /// A backend of `namespace` by its local name.
    fn backend(&self, namespace: &str, name: &str) -> Option<&'a Backend> {
        self.backends
            .get(format!("{namespace}/{name}").as_str())
            .map(|(backend, _)| *backend)
    }

    /// The backends a route forwards to, by local name, in listing order.
    fn targets(&self, namespace: &str, route: &'a Route) -> Vec<&'a Backend> {
        target_names(route)
            .filter_map(|name| self.backend(namespace, name))
            .collect()
    }
}

/// The local names of the backends a route forwards to, in listing order,
/// whether or not they exist.
fn target_names(route: &Route) -> impl Iterator<Item = &str> {
    std::iter::once(route.backend.as_str())
        .filter(|b| !b.is_empty())
        .chain(route.backends.iter().map(|w| w.name.as_str()))
}

/// Translates `snapshot` and `fleet` into Envoy resources.
///
/// Total: resources a valid snapshot cannot hold (a route without a path or
/// outside any namespace, an endpoint address without a port) are left out
/// rather than failing the whole translation.
pub fn translate(
    snapshot: &Snapshot,
    fleet: &[FleetEndpoint],
    params: &EnvoyParams,
) -> EnvoyResources {
    translate_reusing(snapshot, fleet, params, &TranslationCache::default()).0
}

/// [`translate`], reusing the encoded routes and clusters of `previous` that
/// did not change, and the cache of this translation for the next one. The
/// output is byte for byte that of [`translate`].
pub fn translate_reusing(
    snapshot: &Snapshot,
    fleet: &[FleetEndpoint],
    params: &EnvoyParams,
    previous: &TranslationCache,
) -> (EnvoyResources, TranslationCache) {
    let policy = Policy::of(snapshot);
    let mut resources = EnvoyResources::default();
    resources.listeners.insert(
        HTTP_LISTENER.to_string(),
        pack_any(http_listener(params.listener_address)),
    );
    if let Some(listener) = tls::https_listener(&policy, params.tls_listener_address) {
        resources
            .listeners
            .insert(HTTPS_LISTENER.to_string(), pack_any(listener));
    }
    let (route_configuration, version, routes) =
        routes::route_configuration(&policy, &RouteContext::of(snapshot), &previous.routes);
    resources
        .route_configurations
        .insert(HTTP_ROUTES.to_string(), route_configuration);
    resources
        .route_configuration_versions
        .insert(HTTP_ROUTES.to_string(), version);
    for host in api_listener_hosts(&policy) {
        resources
            .api_listeners
            .insert(host.to_string(), api_listener(host));
    }
    let budgets = clusters::retry_budgets(&policy);
    let mut clusters = ClusterCache::default();
    for (backend, version) in policy.backends.values() {
        let budget = backend
            .name
            .split_once('/')
            .and_then(|key| budgets.get(&key).copied());
        let (cluster, assignment) = clusters.encoded(&previous.clusters, backend, version, budget);
        resources.clusters.insert(backend.name.clone(), cluster);
        if let Some(assignment) = assignment {
            resources
                .cluster_load_assignments
                .insert(backend.name.clone(), assignment);
        }
    }
    for secret in &policy.secrets {
        if let Some(sds) = tls::envoy_secret(secret) {
            resources.secrets.insert(secret.name.clone(), pack_any(sds));
        }
    }
    resources.clusters.insert(
        FLEET_CLUSTER.to_string(),
        pack_any(eds_cluster(FLEET_CLUSTER, DEFAULT_CONNECT_TIMEOUT)),
    );
    resources
        .cluster_load_assignments
        .insert(FLEET_CLUSTER.to_string(), pack_any(fleet_assignment(fleet)));
    (resources, TranslationCache { routes, clusters })
}

/// The API listener for a gRPC client dialing `xds:///<host>`: a Listener
/// named `host` whose HttpConnectionManager takes RouteConfiguration
/// `prism-http` over ADS, where a VirtualHost has `host` among its domains.
///
/// Public so that the discovery server can answer for a host that
/// [`translate`] cannot enumerate (one covered only by a wildcard namespace
/// host such as `*.demo.test`, or by the catch-all `*`).
pub fn api_listener(host: &str) -> Any {
    pack_any(Listener {
        name: host.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(http_connection_manager())),
        }),
        ..Default::default()
    })
}

/// Hosts that get an API listener: every exact namespace host and every host a
/// route is restricted to (which may sit under a wildcard namespace host).
/// Wildcards cannot be dialed, so they get none.
fn api_listener_hosts<'a>(policy: &Policy<'a>) -> BTreeSet<&'a str> {
    let namespace_hosts = policy.namespaces.iter().flat_map(|ns| ns.hosts.iter());
    let route_hosts = policy
        .routes
        .iter()
        .filter_map(|r| r.route.r#match.as_ref())
        .map(|m| &m.host);
    namespace_hosts
        .chain(route_hosts)
        .map(String::as_str)
        .filter(|host| !host.is_empty() && !host.starts_with('*'))
        .collect()
}

fn http_listener(at: SocketAddr) -> Listener {
    Listener {
        name: HTTP_LISTENER.to_string(),
        address: Some(socket_address(&at.ip().to_string(), at.port())),
        filter_chains: vec![FilterChain {
            filters: vec![hcm_filter()],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The HttpConnectionManager as a listener's network filter.
fn hcm_filter() -> Filter {
    Filter {
        name: HCM_FILTER.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(
            http_connection_manager(),
        ))),
    }
}

/// The HttpConnectionManager shared by the socket listeners and every API
/// listener: routes by RDS over ADS; codec AUTO, so HTTP/1.1 and
/// prior-knowledge HTTP/2 (gRPC) both work in clear text.
///
/// Filters, in order: the namespace rate limit, the route rate limit, the
/// request body limit (buffer), the router. The first three are off unless a
/// virtual host or route turns them on with its own config, and optional, so
/// a proxyless gRPC client (which knows none of them) skips them instead of
/// rejecting the listener.
fn http_connection_manager() -> HttpConnectionManager {
    let optional = |name: &str, config: Any| HttpFilter {
        name: name.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        is_optional: true,
        disabled: true,
    };
    HttpConnectionManager {
        stat_prefix: STAT_PREFIX.to_string(),
        // `demo.local.` is `demo.local`, as the Prism proxy matches hosts.
        // Envoy forwards it without the dot too.
        strip_trailing_host_dot: true,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: HTTP_ROUTES.to_string(),
        })),
        http_filters: vec![
            optional(
                routes::NAMESPACE_RATE_LIMIT_FILTER,
                pack_any(LocalRateLimit {
                    stat_prefix: "prism_namespace_rate_limit".to_string(),
                    ..Default::default()
                }),
            ),
            optional(
                routes::ROUTE_RATE_LIMIT_FILTER,
                pack_any(LocalRateLimit {
                    stat_prefix: "prism_route_rate_limit".to_string(),
                    ..Default::default()
                }),
            ),
            optional(
                routes::BUFFER_FILTER,
                pack_any(Buffer {
                    max_request_bytes: Some(UInt32Value { value: u32::MAX }),
                }),
            ),
            HttpFilter {
                name: ROUTER_FILTER.to_string(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                    Router::default(),
                ))),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

/// "Over the same ADS stream", in xDS v3.
fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn socket_address(host: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// A std duration as Envoy's.
pub(crate) const fn envoy_duration(d: std::time::Duration) -> Duration {
    Duration {
        // Policy durations are validated to at most 24h, and defaults are
        // small: neither cast can truncate.
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// An optional policy duration as Envoy's, `default` when unset.
fn duration_or(value: Option<&ProtoDuration>, default: std::time::Duration) -> Duration {
    envoy_duration(defaults::duration_or(value, default))
}

/// A set policy duration as Envoy's.
fn some_duration(value: Option<&ProtoDuration>) -> Option<Duration> {
    value.and_then(defaults::to_std).map(envoy_duration)
}

/// Whether `backend`'s health check names each endpoint by its address (an
/// HTTP check without `host`, or a gRPC check), as a Prism proxy's probes
/// do; Envoy would send the cluster's name, so each endpoint carries it.
fn probes_by_address(backend: &Backend) -> bool {
    use prism_proto::pb::config::v1::health_check::Check;
    backend
        .health_check
        .as_ref()
        .is_some_and(|check| match &check.check {
            Some(Check::Http(http)) => http.host.is_empty(),
            Some(Check::Grpc(_)) | None => true,
        })
}

/// The endpoints of `backend` by zone (one LocalityLbEndpoints each, zones in
/// order), each with its weight (0 means 1). Every locality carries the sum of
/// its weights: gRPC ignores a locality without weight.
fn backend_assignment(backend: &Backend) -> ClusterLoadAssignment {
    let mut by_zone: BTreeMap<&str, Vec<&prism_proto::Endpoint>> = BTreeMap::new();
    for endpoint in &backend.endpoints {
        by_zone.entry(&endpoint.zone).or_default().push(endpoint);
    }
    let endpoints = by_zone
        .into_iter()
        .map(|(zone, endpoints)| {
            let lb_endpoints = endpoints
                .iter()
                .filter_map(|e| {
                    let (host, port) = split_host_port(&e.address)?;
                    let mut lb = lb_endpoint(
                        &host,
                        port,
                        defaults::nonzero_or(e.weight, defaults::ENDPOINT_WEIGHT),
                        HealthStatus::Unknown,
                    );
                    if probes_by_address(backend)
                        && let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) =
                            &mut lb.host_identifier
                    {
                        endpoint.health_check_config = Some(endpoint::HealthCheckConfig {
                            hostname: e.address.clone(),
                            ..Default::default()
                        });
                    }
                    Some(lb)
                })
                .collect();
            locality_endpoints("", zone, lb_endpoints)
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: backend.name.clone(),
        endpoints,
        ..Default::default()
    }
}

/// ClusterLoadAssignment `prism-proxy`: one LocalityLbEndpoints per (region,
/// zone), proxies in id order, healthy or not as the fleet says. Emitted even
/// for an empty fleet, so a subscriber is told "no endpoints" rather than
/// waiting for a resource that never comes.
fn fleet_assignment(fleet: &[FleetEndpoint]) -> ClusterLoadAssignment {
    let mut proxies: Vec<&FleetEndpoint> = fleet.iter().collect();
    proxies.sort_by(|a, b| (&a.id, &a.address).cmp(&(&b.id, &b.address)));
    let mut by_locality: BTreeMap<(&str, &str), Vec<LbEndpoint>> = BTreeMap::new();
    for proxy in proxies {
        let Ok(address) = proxy.address.parse::<SocketAddr>() else {
            continue;
        };
        let health = if proxy.healthy {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        };
        by_locality
            .entry((&proxy.region, &proxy.zone))
            .or_default()
            .push(lb_endpoint(
                &address.ip().to_string(),
                address.port(),
                1,
                health,
            ));
    }
    let endpoints = by_locality
        .into_iter()
        .map(|((region, zone), lb_endpoints)| locality_endpoints(region, zone, lb_endpoints))
        .collect();
    ClusterLoadAssignment {
        cluster_name: FLEET_CLUSTER.to_string(),
        endpoints,
        ..Default::default()
    }
}

fn locality_endpoints(
    region: &str,
    zone: &str,
    lb_endpoints: Vec<LbEndpoint>,
) -> LocalityLbEndpoints {
    let weight: u32 = lb_endpoints
        .iter()
        .filter_map(|e| e.load_balancing_weight.as_ref())
        .fold(0u32, |sum, w| sum.saturating_add(w.value));
    LocalityLbEndpoints {
        locality: Some(Locality {
            region: region.to_string(),
            zone: zone.to_string(),
            ..Default::default()
        }),
        lb_endpoints,
        load_balancing_weight: Some(UInt32Value {
            value: weight.max(1),
        }),
        ..Default::default()
    }
}

fn lb_endpoint(host: &str, port: u16, weight: u32, health: HealthStatus) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
            address: Some(socket_address(host, port)),
            ..Default::default()
        })),
        health_status: health as i32,
        load_balancing_weight: Some(UInt32Value { value: weight }),
        ..Default::default()
    }
}

/// `host:port` split, the host of `[v6]:port` unbracketed; `None` without a
/// valid port or host.
fn split_host_port(address: &str) -> Option<(String, u16)> {
    if let Ok(at) = address.parse::<SocketAddr>() {
        return Some((at.ip().to_string(), at.port()));
    }
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty() && !host.contains([':', '[', ']'])).then(|| (host.to_string(), port))
}

#[cfg(test)]
mod tests;
