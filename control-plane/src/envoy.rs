//! The Envoy view of Prism's policy: a pure translation of a [`Snapshot`] and
//! the proxy fleet into standard xDS resources (Listener, RouteConfiguration,
//! Cluster, ClusterLoadAssignment), so that a stock Envoy bootstrapped with
//! only an ADS cluster pointing at Prism, or a proxyless gRPC client dialing
//! `xds:///<host>`, routes per Prism policy.
//!
//! It owns no IO and knows nothing of tonic or the store: the discovery server
//! calls [`translate`] once per policy revision or fleet change and serves the
//! result. Every resource is encoded deterministically (sorted input, no map
//! field with more than one entry), because the discovery server versions a
//! resource by hashing its bytes and prost encodes `HashMap`s in random order.
//!
//! The shape, chosen to look like what an Envoy or Istio user expects:
//!
//! - Listener `prism-http` binds [`EnvoyParams::listener_address`] and runs one
//!   HttpConnectionManager whose routes come over ADS as RouteConfiguration
//!   `prism-http`.
//! - That RouteConfiguration has one VirtualHost per namespace, plus one per
//!   host that a route is restricted to (`match.host`).
//! - Every Backend is a Cluster of the same name (`ns/web`): EDS when all its
//!   endpoints are `ip:port`, STRICT_DNS otherwise (Envoy's EDS accepts only IP
//!   addresses).
//! - The fleet of Prism proxies is Cluster `prism-proxy`, by locality.
//! - Every exact host is also an API listener named after it, for gRPC clients
//!   dialing `xds:///<host>`; those are served only when asked for by name.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Http2ProtocolOptions,
    Locality, SocketAddress, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, Listener, filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route as EnvoyRoute, RouteAction, RouteConfiguration, RouteMatch as EnvoyRouteMatch,
    VirtualHost, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config,
};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use envoy_types::util::pack_any;
use prism_proto::pb::config::v1::route_match::Path;
use prism_proto::{Backend, Endpoint, Kind, Namespace, Protocol, Resource, Route, Snapshot};

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

/// Name of the socket listener, and of the RouteConfiguration it (and every
/// API listener) asks for over RDS.
pub const HTTP_LISTENER: &str = "prism-http";
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
/// Key of `Cluster.typed_extension_protocol_options` for upstream HTTP settings.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// Route timeout when neither the route nor its namespace sets one.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration {
    seconds: 15,
    nanos: 0,
};
/// Connect timeout when a backend sets none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration {
    seconds: 5,
    nanos: 0,
};

/// Settings of the Envoy view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvoyParams {
    /// Where the socket listener `prism-http` of every subscribing Envoy binds.
    pub listener_address: SocketAddr,
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
    /// What a wildcard LDS subscription gets: the socket listener `prism-http`.
    pub listeners: BTreeMap<String, Any>,
    /// API listeners for proxyless gRPC (`xds:///<host>`), one per exact host,
    /// named after it. Served only to those who ask for them by name: an Envoy
    /// rejects a dynamic listener that has no address.
    pub api_listeners: BTreeMap<String, Any>,
    /// The RouteConfiguration `prism-http`.
    pub route_configurations: BTreeMap<String, Any>,
    /// One Cluster per Backend, plus `prism-proxy`.
    pub clusters: BTreeMap<String, Any>,
    /// One ClusterLoadAssignment per EDS cluster, plus `prism-proxy`.
    pub cluster_load_assignments: BTreeMap<String, Any>,
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
    let namespaces: Vec<&Namespace> = snapshot
        .of_kind(Kind::Namespace)
        .filter_map(|v| match &v.resource {
            Resource::Namespace(ns) => Some(ns),
            _ => None,
        })
        .collect();
    let routes: Vec<(&str, &Route)> = snapshot
        .of_kind(Kind::Route)
        .filter_map(|v| match &v.resource {
            Resource::Route(route) => Some((v.resource.namespace(), route)),
            _ => None,
        })
        .collect();

    let mut resources = EnvoyResources::default();
    resources.listeners.insert(
        HTTP_LISTENER.to_string(),
        pack_any(http_listener(params.listener_address)),
    );
    resources.route_configurations.insert(
        HTTP_ROUTES.to_string(),
        pack_any(route_configuration(&namespaces, &routes)),
    );
    for host in api_listener_hosts(&namespaces, &routes) {
        resources
            .api_listeners
            .insert(host.to_string(), api_listener(host));
    }
    for versioned in snapshot.of_kind(Kind::Backend) {
        let Resource::Backend(backend) = &versioned.resource else {
            continue;
        };
        let (cluster, assignment) = backend_cluster(backend);
        resources
            .clusters
            .insert(backend.name.clone(), pack_any(cluster));
        if let Some(assignment) = assignment {
            resources
                .cluster_load_assignments
                .insert(backend.name.clone(), pack_any(assignment));
        }
    }
    resources.clusters.insert(
        FLEET_CLUSTER.to_string(),
        pack_any(eds_cluster(FLEET_CLUSTER, DEFAULT_CONNECT_TIMEOUT)),
    );
    resources
        .cluster_load_assignments
        .insert(FLEET_CLUSTER.to_string(), pack_any(fleet_assignment(fleet)));
    resources
}

/// The API listener for a gRPC client dialing `xds:///<host>`: a Listener
/// named `host` whose HttpConnectionManager takes RouteConfiguration
/// `prism-http` over ADS, where a VirtualHost has `host` among its domains.
///
/// Public so that the discovery server can answer for a host that
/// [`translate`] cannot enumerate (one covered only by a wildcard namespace
/// host such as `*.demo.test`).
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
fn api_listener_hosts<'a>(
    namespaces: &[&'a Namespace],
    routes: &[(&str, &'a Route)],
) -> BTreeSet<&'a str> {
    let namespace_hosts = namespaces.iter().flat_map(|ns| ns.hosts.iter());
    let route_hosts = routes
        .iter()
        .filter_map(|(_, r)| r.r#match.as_ref())
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
            filters: vec![Filter {
                name: HCM_FILTER.to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(
                    http_connection_manager(),
                ))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The HttpConnectionManager shared by the socket listener and every API
/// listener: routes by RDS over ADS, router as the last (only) filter. Codec
/// AUTO, so HTTP/1.1 and prior-knowledge HTTP/2 (gRPC) both work in clear text.
fn http_connection_manager() -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: STAT_PREFIX.to_string(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: HTTP_ROUTES.to_string(),
        })),
        http_filters: vec![HttpFilter {
            name: ROUTER_FILTER.to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..Default::default()
        }],
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

/// Routes of one namespace: those for every host, and those restricted to
/// one host, each in match order.
#[derive(Default)]
struct NamespaceRoutes<'a> {
    wide: Vec<&'a Route>,
    by_host: BTreeMap<&'a str, Vec<&'a Route>>,
}

/// RouteConfiguration `prism-http`.
///
/// One VirtualHost per namespace (named after it), whose domains are its hosts,
/// each also as `host:*` so a Host header with a port matches; wildcard hosts
/// stay Envoy suffix wildcards (`*.demo.test`), and `ignore_port_in_host_matching`
/// lets those match with a port too. A host that routes are restricted to gets
/// its own VirtualHost `ns/host` (domains `host`, `host:*`) holding those routes
/// first and then the namespace-wide ones, and leaves the namespace's
/// VirtualHost. Envoy rejects a RouteConfiguration in which two VirtualHosts
/// share a domain, or one has no domain, so a domain is given once (namespace
/// hosts before route hosts, then in name order) and a VirtualHost left without
/// domains is dropped: a namespace with no hosts cannot be reached anyway.
fn route_configuration(namespaces: &[&Namespace], routes: &[(&str, &Route)]) -> RouteConfiguration {
    let mut grouped: BTreeMap<&str, NamespaceRoutes<'_>> = BTreeMap::new();
    for (ns, route) in routes {
        let Some(m) = &route.r#match else { continue };
        let group = grouped.entry(ns).or_default();
        match m.host.as_str() {
            "" => group.wide.push(route),
            host => group.by_host.entry(host).or_default().push(route),
        }
    }
    for group in grouped.values_mut() {
        group
            .wide
            .sort_by(|a, b| match_order(a).cmp(&match_order(b)));
        for host_routes in group.by_host.values_mut() {
            host_routes.sort_by(|a, b| match_order(a).cmp(&match_order(b)));
        }
    }

    let empty = NamespaceRoutes::default();
    let mut claimed = BTreeSet::new();
    let mut namespace_hosts = Vec::new();
    let mut host_vhosts = Vec::new();
    for ns in namespaces {
        let group = grouped.get(ns.name.as_str()).unwrap_or(&empty);
        let timeout = ns
            .default_timeout
            .as_ref()
            .map_or(DEFAULT_ROUTE_TIMEOUT, |d| duration(d.seconds, d.nanos));
        let envoy_routes = |routes: &[&Route]| -> Vec<EnvoyRoute> {
            routes
                .iter()
                .filter_map(|r| envoy_route(&ns.name, r, &timeout))
                .collect()
        };
        let wide = envoy_routes(&group.wide);
        let own_hosts = ns
            .hosts
            .iter()
            .filter(|h| !group.by_host.contains_key(h.as_str()));
        let domains = claim(&mut claimed, own_hosts.flat_map(|h| domains_of(h)));
        namespace_hosts.push(VirtualHost {
            name: ns.name.clone(),
            domains,
            routes: wide.clone(),
            ..Default::default()
        });
        for (host, routes) in &group.by_host {
            let mut routes = envoy_routes(routes);
            routes.extend(wide.iter().cloned());
            host_vhosts.push(VirtualHost {
                name: format!("{}/{host}", ns.name),
                domains: domains_of(host),
                routes,
                ..Default::default()
            });
        }
    }
    // Namespace hosts were claimed above; route hosts take what is left.
    for vhost in &mut host_vhosts {
        vhost.domains = claim(&mut claimed, std::mem::take(&mut vhost.domains));
    }
    let mut virtual_hosts = namespace_hosts;
    virtual_hosts.extend(host_vhosts);
    virtual_hosts.retain(|vhost| !vhost.domains.is_empty());
    virtual_hosts.sort_by(|a, b| a.name.cmp(&b.name));
    RouteConfiguration {
        name: HTTP_ROUTES.to_string(),
        virtual_hosts,
        ignore_port_in_host_matching: true,
        ..Default::default()
    }
}

/// `host` and, for an exact host, `host:*`. A second wildcard in a domain
/// would never match, so a wildcard host stays as it is.
fn domains_of(host: &str) -> Vec<String> {
    if host.contains('*') {
        vec![host.to_string()]
    } else {
        vec![host.to_string(), format!("{host}:*")]
    }
}

/// The domains of `wanted` that no VirtualHost holds yet, now claimed.
fn claim(claimed: &mut BTreeSet<String>, wanted: impl IntoIterator<Item = String>) -> Vec<String> {
    wanted
        .into_iter()
        .filter(|d| claimed.insert(d.clone()))
        .collect()
}

/// Envoy takes the first route that matches, so exact paths go first, then
/// prefixes longest first; ties (which validation forbids) fall to the name.
fn match_order(route: &Route) -> (u8, Reverse<usize>, &str, &str) {
    let path = route.r#match.as_ref().and_then(|m| m.path.as_ref());
    match path {
        Some(Path::Exact(p)) => (0, Reverse(p.len()), p, &route.name),
        Some(Path::Prefix(p)) => (1, Reverse(p.len()), p, &route.name),
        Some(Path::Regex(p)) => (2, Reverse(0), p, &route.name),
        None => (3, Reverse(0), "", &route.name),
    }
}

/// A Prism route as an Envoy route to cluster `<ns>/<backend>`. A route
/// without a path (which validation rejects) is left out: Envoy requires one.
fn envoy_route(namespace: &str, route: &Route, namespace_timeout: &Duration) -> Option<EnvoyRoute> {
    let path = match route.r#match.as_ref()?.path.as_ref()? {
        Path::Exact(p) => route_match::PathSpecifier::Path(p.clone()),
        Path::Prefix(p) => route_match::PathSpecifier::Prefix(p.clone()),
        Path::Regex(p) => route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: p.clone(),
            ..Default::default()
        }),
    };
    let timeout = route
        .timeout
        .as_ref()
        .map_or(*namespace_timeout, |d| duration(d.seconds, d.nanos));
    Some(EnvoyRoute {
        name: route.name.clone(),
        r#match: Some(EnvoyRouteMatch {
            path_specifier: Some(path),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(format!(
                "{namespace}/{}",
                route.backend
            ))),
            timeout: Some(timeout),
            ..Default::default()
        })),
        ..Default::default()
    })
}

/// The Cluster of `backend`, and its ClusterLoadAssignment when it is EDS.
///
/// EDS when every endpoint is `ip:port` (the assignment served separately, as
/// gRPC clients need: they support EDS and LOGICAL_DNS clusters only);
/// otherwise STRICT_DNS with the assignment inline, resolving IPv4 first.
/// HTTP2 and GRPC backends get explicit HTTP/2 upstream options; Envoy would
/// otherwise speak HTTP/1.1 to them.
fn backend_cluster(backend: &Backend) -> (Cluster, Option<ClusterLoadAssignment>) {
    let connect_timeout = backend
        .connect_timeout
        .as_ref()
        .map_or(DEFAULT_CONNECT_TIMEOUT, |d| duration(d.seconds, d.nanos));
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
            lb_policy: cluster::LbPolicy::RoundRobin as i32,
            dns_lookup_family: cluster::DnsLookupFamily::V4Preferred as i32,
            load_assignment: Some(assignment),
            ..Default::default()
        };
        (cluster, None)
    };
    if matches!(backend.protocol(), Protocol::Http2 | Protocol::Grpc) {
        // One entry only: prost encodes a HashMap in random order.
        cluster.typed_extension_protocol_options =
            HashMap::from([(HTTP_PROTOCOL_OPTIONS.to_string(), pack_any(http2_options()))]);
    }
    (cluster, assignment)
}

/// Prism's (pbjson) Duration as Envoy's.
fn duration(seconds: i64, nanos: i32) -> Duration {
    Duration { seconds, nanos }
}

fn eds_cluster(name: &str, connect_timeout: Duration) -> Cluster {
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

fn http2_options() -> HttpProtocolOptions {
    HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                    Http2ProtocolOptions::default(),
                )),
            },
        )),
        ..Default::default()
    }
}

/// The endpoints of `backend` by zone (one LocalityLbEndpoints each, zones in
/// order), each with its weight (0 means 1). Every locality carries the sum of
/// its weights: gRPC ignores a locality without weight.
fn backend_assignment(backend: &Backend) -> ClusterLoadAssignment {
    let mut by_zone: BTreeMap<&str, Vec<&Endpoint>> = BTreeMap::new();
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
                    Some(lb_endpoint(
                        &host,
                        port,
                        e.weight.max(1),
                        HealthStatus::Unknown,
                    ))
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
