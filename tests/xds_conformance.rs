//! xDS conformance: the control plane's discovery port driven with raw
//! `DeltaAggregatedResources` and `StreamAggregatedResources` requests, checked
//! against the rules of Envoy's "xDS REST and gRPC protocol" that
//! `DESIGN.md` ("Discovery protocol: xDS v3") commits to. Policy changes go
//! through the admin API. Every receive is bounded by [`RECV`]; "nothing was
//! sent" is shown by a later change whose message must be the next one.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prism_proto::{Kind, Resource};
use prost::Message;
use reqwest::Method;
use support::{Admin, ControlPlane, eventually};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;

const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const CLA: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// The fleet's own cluster and load assignment: they change whenever a
/// proxy (including a test client) connects or leaves, so tests that watch
/// policy changes look past them.
const FLEET: &str = "prism-proxy";

/// Longest wait for any one message.
const RECV: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Policy documents

/// Namespace `shop` (host `shop.test`) with backends `blue` and `green` and a
/// route to each.
const SHOP: &str = "namespaces:
  - name: shop
    hosts: [shop.test]
backends:
  - name: shop/blue
    endpoints: [{address: \"127.0.0.1:9001\"}]
  - name: shop/green
    endpoints: [{address: \"127.0.0.1:9002\"}]
routes:
  - name: shop/blue
    match: {prefix: \"/blue\"}
    backend: blue
  - name: shop/green
    match: {prefix: \"/green\"}
    backend: green
";

/// One backend `shop/<name>` with one endpoint on 127.0.0.1:`port`.
fn backend(name: &str, port: u16) -> String {
    format!(
        "backends:\n  - name: shop/{name}\n    endpoints: [{{address: \"127.0.0.1:{port}\"}}]\n"
    )
}

// ---------------------------------------------------------------------------
// Fixture

/// A control plane with [`SHOP`] applied and published.
struct Setup {
    _dir: tempfile::TempDir,
    cp: ControlPlane,
    admin: Admin,
    revision: u64,
}

impl Setup {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cp = ControlPlane::start(dir.path()).await;
        let admin = cp.client();
        let revision = admin.apply(SHOP).await;
        settle(&cp, revision).await;
        Self {
            _dir: dir,
            cp,
            admin,
            revision,
        }
    }

    async fn delete(&self, path: &str) -> u64 {
        let (status, body) = self.admin.request(Method::DELETE, path, None).await;
        assert_eq!(status, 200, "DELETE {path}: {body}");
        body["revision"].as_u64().expect("revision")
    }

    /// The fleet entry of `node`, once `check` accepts it.
    async fn proxy_where(
        &self,
        node: &str,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually(&format!("{node}: {what}"), || async {
            let fleet = self.admin.proxies().await;
            fleet["proxies"]
                .as_array()?
                .iter()
                .find(|p| p["id"] == node)
                .filter(|p| check(p))
                .cloned()
        })
        .await
    }
}

/// Waits until the discovery server publishes `revision` (the catalog is
/// rebuilt after a debounce), so a stream opened afterwards starts from it.
async fn settle(cp: &ControlPlane, revision: u64) {
    let mut probe = DeltaClient::connect(cp, "settle-probe").await;
    probe.subscribe(Kind::Namespace.type_url(), &[]).await;
    loop {
        let response = probe.next().await;
        probe.ack(&response).await;
        if revision_of(&response) >= revision {
            return;
        }
    }
}

fn node(id: &str) -> Node {
    let address = Value {
        kind: Some(value::Kind::StringValue("127.0.0.1:18080".into())),
    };
    Node {
        id: id.into(),
        locality: Some(Locality {
            region: "region-1".into(),
            zone: "zone-a".into(),
            ..Default::default()
        }),
        metadata: Some(Struct {
            fields: [("advertise_address".to_string(), address)]
                .into_iter()
                .collect(),
        }),
        ..Default::default()
    }
}

fn error(message: &str) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: 3,
        message: message.into(),
        details: vec![],
    })
}

fn revision_of(response: &DeltaDiscoveryResponse) -> u64 {
    response
        .system_version_info
        .parse()
        .unwrap_or_else(|_| panic!("system_version_info is a revision: {response:?}"))
}

// ---------------------------------------------------------------------------
// Decoding

/// The name of an Envoy resource (or `<type_url>` for anything else).
fn resource_name(any: &Any) -> String {
    let bytes = any.value.as_slice();
    match any.type_url.as_str() {
        CLUSTER => Cluster::decode(bytes).expect("Cluster").name,
        CLA => {
            ClusterLoadAssignment::decode(bytes)
                .expect("ClusterLoadAssignment")
                .cluster_name
        }
        LISTENER => Listener::decode(bytes).expect("Listener").name,
        ROUTE => {
            RouteConfiguration::decode(bytes)
                .expect("RouteConfiguration")
                .name
        }
        other => other.to_string(),
    }
}

/// Ports of every endpoint of a ClusterLoadAssignment.
fn cla_ports(any: &Any) -> Vec<u32> {
    let cla = ClusterLoadAssignment::decode(any.value.as_slice()).expect("ClusterLoadAssignment");
    cla.endpoints
        .iter()
        .flat_map(|locality| &locality.lb_endpoints)
        .filter_map(|lb| match &lb.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) => endpoint.address.as_ref(),
            _ => None,
        })
        .filter_map(|a| match &a.address {
            Some(address::Address::SocketAddress(s)) => s.port_specifier.as_ref(),
            _ => None,
        })
        .map(|port| match port {
            socket_address::PortSpecifier::PortValue(p) => *p,
            socket_address::PortSpecifier::NamedPort(_) => 0,
        })
        .collect()
}

/// Every cluster the routes of a RouteConfiguration send traffic to.
fn route_clusters(any: &Any) -> BTreeSet<String> {
    let config = RouteConfiguration::decode(any.value.as_slice()).expect("RouteConfiguration");
    let mut clusters = BTreeSet::new();
    for route in config.virtual_hosts.iter().flat_map(|vh| &vh.routes) {
        let Some(route::Action::Route(action)) = &route.action else {
            continue;
        };
        match &action.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(name)) => {
                clusters.insert(name.clone());
            }
            Some(route_action::ClusterSpecifier::WeightedClusters(weighted)) => {
                clusters.extend(weighted.clusters.iter().map(|c| c.name.clone()));
            }
            _ => {}
        }
    }
    clusters
}

fn names(anys: &[Any]) -> BTreeSet<String> {
    anys.iter().map(resource_name).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// Upserted and removed names of a delta response, the fleet's own left out.
fn policy_changes(response: &DeltaDiscoveryResponse) -> (BTreeSet<String>, BTreeSet<String>) {
    let upserts = response
        .resources
        .iter()
        .map(|r| r.name.clone())
        .filter(|n| n != FLEET)
        .collect();
    let removals = response
        .removed_resources
        .iter()
        .filter(|n| *n != FLEET)
        .cloned()
        .collect();
    (upserts, removals)
}

fn upserted<'a>(response: &'a DeltaDiscoveryResponse, name: &str) -> &'a Any {
    response
        .resources
        .iter()
        .find(|r| r.name == name)
        .and_then(|r| r.resource.as_ref())
        .unwrap_or_else(|| panic!("{name} is upserted by {response:?}"))
}

// ---------------------------------------------------------------------------
// Delta client

/// A raw `DeltaAggregatedResources` stream.
struct DeltaClient {
    node: Node,
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
    /// Every nonce received on this stream, in order.
    nonces: Vec<String>,
}

impl DeltaClient {
    async fn connect(cp: &ControlPlane, node_id: &str) -> Self {
        let mut client = AggregatedDiscoveryServiceClient::connect(cp.xds.clone())
            .await
            .expect("the discovery port accepts connections");
        let (tx, rx) = mpsc::channel(16);
        let responses = timeout(
            RECV,
            client.delta_aggregated_resources(ReceiverStream::new(rx)),
        )
        .await
        .expect("the delta stream opens in time")
        .expect("the delta stream opens")
        .into_inner();
        Self {
            node: node(node_id),
            tx,
            responses,
            nonces: Vec::new(),
        }
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.tx.send(request).await.expect("the stream is open");
    }

    fn request(&self, type_url: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.into(),
            ..Default::default()
        }
    }

    /// Subscribes to `names` of `type_url` (the first request of a type with
    /// no names is a wildcard subscription).
    async fn subscribe(&self, type_url: &str, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..self.request(type_url)
        })
        .await;
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            response_nonce: response.nonce.clone(),
            ..self.request(&response.type_url)
        })
        .await;
    }

    async fn nack(&self, response: &DeltaDiscoveryResponse, message: &str) {
        self.send(DeltaDiscoveryRequest {
            response_nonce: response.nonce.clone(),
            error_detail: error(message),
            ..self.request(&response.type_url)
        })
        .await;
    }

    /// The next response, within [`RECV`].
    async fn next(&mut self) -> DeltaDiscoveryResponse {
        let response = match timeout(RECV, self.responses.message()).await {
            Ok(Ok(Some(response))) => response,
            Ok(Ok(None)) => panic!("the server ended the delta stream"),
            Ok(Err(status)) => panic!("the server failed the delta stream: {status}"),
            Err(_) => panic!("no delta response within {RECV:?}"),
        };
        self.nonces.push(response.nonce.clone());
        response
    }

    /// The next response that changes anything but the fleet's own resources.
    async fn next_policy(&mut self) -> DeltaDiscoveryResponse {
        loop {
            let response = self.next().await;
            let (upserts, removals) = policy_changes(&response);
            if !upserts.is_empty() || !removals.is_empty() {
                return response;
            }
        }
    }

    /// The status the server ends the stream with, within [`RECV`].
    async fn end(&mut self) -> tonic::Status {
        match timeout(RECV, self.responses.message()).await {
            Ok(Err(status)) => status,
            Ok(Ok(Some(response))) => panic!("expected the stream to fail, got {response:?}"),
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Err(_) => panic!("the stream did not end within {RECV:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// State-of-the-world client

/// A raw `StreamAggregatedResources` stream.
struct SotwClient {
    node: Node,
    tx: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
    /// The latest response per type URL.
    latest: HashMap<String, DiscoveryResponse>,
}

impl SotwClient {
    async fn connect(cp: &ControlPlane, node_id: &str) -> Self {
        let mut client = AggregatedDiscoveryServiceClient::connect(cp.xds.clone())
            .await
            .expect("the discovery port accepts connections");
        let (tx, rx) = mpsc::channel(16);
        let responses = timeout(
            RECV,
            client.stream_aggregated_resources(ReceiverStream::new(rx)),
        )
        .await
        .expect("the SotW stream opens in time")
        .expect("the SotW stream opens")
        .into_inner();
        Self {
            node: node(node_id),
            tx,
            responses,
            latest: HashMap::new(),
        }
    }

    /// Sends a request for `names` of `type_url`, replying to `to` if given.
    async fn request(&self, type_url: &str, names: &[&str], to: Option<&DiscoveryResponse>) {
        self.send(DiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            version_info: to.map(|r| r.version_info.clone()).unwrap_or_default(),
            response_nonce: to.map(|r| r.nonce.clone()).unwrap_or_default(),
            ..Default::default()
        })
        .await;
    }

    async fn send(&self, request: DiscoveryRequest) {
        self.tx.send(request).await.expect("the stream is open");
    }

    async fn nack(&self, names: &[&str], to: &DiscoveryResponse, message: &str) {
        self.send(DiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: to.type_url.clone(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            // The version the client still holds is the previous one; what
            // matters is the nonce and the error.
            version_info: String::new(),
            response_nonce: to.nonce.clone(),
            error_detail: error(message),
            ..Default::default()
        })
        .await;
    }

    /// The next response, within [`RECV`].
    async fn next_raw(&mut self) -> DiscoveryResponse {
        match timeout(RECV, self.responses.message()).await {
            Ok(Ok(Some(response))) => response,
            Ok(Ok(None)) => panic!("the server ended the SotW stream"),
            Ok(Err(status)) => panic!("the server failed the SotW stream: {status}"),
            Err(_) => panic!("no SotW response within {RECV:?}"),
        }
    }

    /// The next response that differs from the previous one of its type in
    /// more than the fleet's own resource.
    async fn next(&mut self) -> DiscoveryResponse {
        loop {
            let response = self.next_raw().await;
            let fleet_only = self.latest.get(&response.type_url).is_some_and(|previous| {
                without_fleet(previous) == without_fleet(&response)
                    && fleet_part(previous) != fleet_part(&response)
            });
            self.latest
                .insert(response.type_url.clone(), response.clone());
            if !fleet_only {
                return response;
            }
        }
    }

    async fn end(&mut self) -> tonic::Status {
        match timeout(RECV, self.responses.message()).await {
            Ok(Err(status)) => status,
            Ok(Ok(Some(response))) => panic!("expected the stream to fail, got {response:?}"),
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Err(_) => panic!("the stream did not end within {RECV:?}"),
        }
    }
}

fn without_fleet(response: &DiscoveryResponse) -> Vec<&Any> {
    response
        .resources
        .iter()
        .filter(|a| resource_name(a) != FLEET)
        .collect()
}

fn fleet_part(response: &DiscoveryResponse) -> Vec<&Any> {
    response
        .resources
        .iter()
        .filter(|a| resource_name(a) == FLEET)
        .collect()
}

fn find<'a>(response: &'a DiscoveryResponse, name: &str) -> &'a Any {
    response
        .resources
        .iter()
        .find(|a| resource_name(a) == name)
        .unwrap_or_else(|| panic!("{name} is in {}", summary(response)))
}

fn summary(response: &DiscoveryResponse) -> String {
    format!(
        "{} version {} nonce {} {:?}",
        response.type_url,
        response.version_info,
        response.nonce,
        names(&response.resources)
    )
}

// ===========================================================================
// Delta

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_every_response_has_a_fresh_nonce_and_an_ack_shows_in_the_fleet() {
    let s = Setup::new().await;
    let mut d = DeltaClient::connect(&s.cp, "delta-ack").await;
    d.subscribe(CLUSTER, &[]).await;
    let clusters = d.next_policy().await;
    assert_eq!(clusters.type_url, CLUSTER);
    d.subscribe(CLA, &[]).await;
    let endpoints = d.next_policy().await;
    assert_eq!(endpoints.type_url, CLA);

    d.ack(&clusters).await;
    let node = s
        .proxy_where("delta-ack", "Cluster ACK recorded", |p| {
            p["acked_by_type"][CLUSTER].as_u64() == Some(s.revision)
        })
        .await;
    assert!(
        node["acked_by_type"].get(CLA).is_none(),
        "the unanswered ClusterLoadAssignment response is not counted as ACKed: {node}"
    );
    d.ack(&endpoints).await;
    s.proxy_where("delta-ack", "ClusterLoadAssignment ACK recorded", |p| {
        p["acked_by_type"][CLA].as_u64() == Some(s.revision)
    })
    .await;

    // Changes bring more responses; every nonce ever sent is new.
    let revision = s.admin.apply(&backend("blue", 9101)).await;
    let changed = d.next_policy().await;
    assert_eq!(revision_of(&changed), revision, "{changed:?}");
    let revision = s.admin.apply(&backend("red", 9201)).await;
    while !policy_changes(&d.next_policy().await)
        .0
        .contains("shop/red")
    {}
    d.ack(&changed).await;
    s.proxy_where("delta-ack", "ACK of the newer revision recorded", |p| {
        p["acked_by_type"][changed.type_url.as_str()].as_u64() == Some(revision_of(&changed))
    })
    .await;
    assert!(revision > s.revision);
    assert!(d.nonces.len() >= 4, "{:?}", d.nonces);
    let unique: BTreeSet<&String> = d.nonces.iter().collect();
    assert_eq!(
        unique.len(),
        d.nonces.len(),
        "nonces repeat: {:?}",
        d.nonces
    );
    assert!(d.nonces.iter().all(|n| !n.is_empty()), "{:?}", d.nonces);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_wildcard_gets_every_cluster_and_a_change_sends_only_that_backend() {
    let s = Setup::new().await;
    let mut d = DeltaClient::connect(&s.cp, "delta-wildcard").await;
    d.subscribe(CLUSTER, &[]).await;
    let clusters = d.next_policy().await;
    assert_eq!(clusters.type_url, CLUSTER);
    let got: BTreeSet<String> = clusters.resources.iter().map(|r| r.name.clone()).collect();
    assert_eq!(
        got,
        set(&["shop/blue", "shop/green", FLEET]),
        "{clusters:?}"
    );
    for r in &clusters.resources {
        assert!(!r.version.is_empty(), "per-resource version on {r:?}");
        assert_eq!(resource_name(r.resource.as_ref().expect("body")), r.name);
    }
    d.subscribe(CLA, &[]).await;
    let endpoints = d.next_policy().await;
    assert_eq!(endpoints.type_url, CLA);
    let (upserts, _) = policy_changes(&endpoints);
    assert_eq!(upserts, set(&["shop/blue", "shop/green"]), "{endpoints:?}");
    d.ack(&clusters).await;
    d.ack(&endpoints).await;

    // Change blue only (endpoint and connect timeout); then add a marker
    // backend, whose push must be the next thing sent: everything before it
    // is about blue alone.
    let change = "backends:
  - name: shop/blue
    endpoints: [{address: \"127.0.0.1:9111\"}]
    connectTimeout: 3s
";
    s.admin.apply(change).await;
    let mut blue_push = Vec::new();
    let cla = loop {
        let response = d.next_policy().await;
        let (upserts, removals) = policy_changes(&response);
        assert_eq!(
            (upserts, removals),
            (set(&["shop/blue"]), set(&[])),
            "only blue changes: {response:?}"
        );
        blue_push.push(response.type_url.clone());
        if response.type_url == CLA {
            break response;
        }
    };
    assert!(
        blue_push.iter().all(|t| t == CLUSTER || t == CLA),
        "{blue_push:?}"
    );
    assert_eq!(cla_ports(upserted(&cla, "shop/blue")), vec![9111]);
    s.admin.apply(&backend("marker", 9999)).await;
    let marker = d.next_policy().await;
    assert_eq!(
        policy_changes(&marker),
        (set(&["shop/marker"]), set(&[])),
        "nothing but the new backend is sent: {marker:?}"
    );
    let old_version = &endpoints
        .resources
        .iter()
        .find(|r| r.name == "shop/blue")
        .expect("blue")
        .version;
    let new_version = &cla.resources[0].version;
    assert_ne!(
        old_version, new_version,
        "a changed resource has a new version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_api_listeners_are_sent_only_to_those_who_ask_by_name() {
    let s = Setup::new().await;
    let mut d = DeltaClient::connect(&s.cp, "delta-listeners").await;
    d.subscribe(LISTENER, &[]).await;
    let listeners = d.next_policy().await;
    let (wildcard, _) = policy_changes(&listeners);
    assert!(wildcard.contains("prism-http"), "{listeners:?}");
    assert!(
        !wildcard.contains("shop.test"),
        "API listeners are not part of the wildcard: {listeners:?}"
    );
    d.subscribe(LISTENER, &["shop.test"]).await;
    let named = d.next_policy().await;
    assert_eq!(named.type_url, LISTENER);
    assert_eq!(policy_changes(&named), (set(&["shop.test"]), set(&[])));
    assert_eq!(resource_name(upserted(&named, "shop.test")), "shop.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_nack_is_recorded_and_the_rejected_version_is_not_resent_until_it_changes() {
    let s = Setup::new().await;
    let mut d = DeltaClient::connect(&s.cp, "delta-nack").await;
    d.subscribe(CLA, &[]).await;
    let first = d.next_policy().await;
    d.ack(&first).await;

    s.admin.apply(&backend("blue", 9301)).await;
    let rejected = d.next_policy().await;
    assert_eq!(policy_changes(&rejected).0, set(&["shop/blue"]));
    let rejected_version = rejected.resources[0].version.clone();
    d.nack(&rejected, "endpoint 127.0.0.1:9301 is refused by policy")
        .await;
    let node = s
        .proxy_where("delta-nack", "NACK recorded", |p| {
            p["last_nack"]["message"] == "endpoint 127.0.0.1:9301 is refused by policy"
        })
        .await;
    assert_eq!(node["last_nack"]["type_url"], CLA, "{node}");
    assert_eq!(
        node["last_nack"]["revision"].as_u64(),
        Some(revision_of(&rejected))
    );

    // Another change must be the next thing sent: blue is not resent.
    s.admin.apply(&backend("marker", 9998)).await;
    let next = d.next_policy().await;
    assert_eq!(
        policy_changes(&next),
        (set(&["shop/marker"]), set(&[])),
        "the rejected version is not sent again: {next:?}"
    );

    // Once blue changes again, it is sent.
    s.admin.apply(&backend("blue", 9302)).await;
    let resent = d.next_policy().await;
    assert_eq!(policy_changes(&resent).0, set(&["shop/blue"]));
    assert_ne!(resent.resources[0].version, rejected_version);
    assert_eq!(cla_ports(upserted(&resent, "shop/blue")), vec![9302]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_subscribe_and_unsubscribe_are_honoured_with_a_stale_nonce() {
    let s = Setup::new().await;
    let mut d = DeltaClient::connect(&s.cp, "delta-stale").await;
    d.subscribe(CLA, &["shop/blue"]).await;
    let blue = d.next_policy().await;
    assert_eq!(policy_changes(&blue), (set(&["shop/blue"]), set(&[])));
    d.ack(&blue).await;

    // Subscribe with a nonce the server never sent.
    d.send(DeltaDiscoveryRequest {
        resource_names_subscribe: vec!["shop/green".into()],
        response_nonce: "no-such-nonce".into(),
        ..d.request(CLA)
    })
    .await;
    let green = d.next_policy().await;
    assert_eq!(
        policy_changes(&green),
        (set(&["shop/green"]), set(&[])),
        "subscribe with a stale nonce is honoured"
    );

    // Unsubscribe with the nonce of an old, already answered response.
    d.send(DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec!["shop/blue".into()],
        response_nonce: blue.nonce.clone(),
        ..d.request(CLA)
    })
    .await;
    let both = "backends:
  - name: shop/blue
    endpoints: [{address: \"127.0.0.1:9401\"}]
  - name: shop/green
    endpoints: [{address: \"127.0.0.1:9402\"}]
";
    s.admin.apply(both).await;
    let next = d.next_policy().await;
    assert_eq!(
        policy_changes(&next),
        (set(&["shop/green"]), set(&[])),
        "unsubscribe with a stale nonce is honoured: {next:?}"
    );
    assert_eq!(cla_ports(upserted(&next, "shop/green")), vec![9402]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_a_missing_name_is_reported_removed_and_sent_once_created() {
    let s = Setup::new().await;
    let mut d = DeltaClient::connect(&s.cp, "delta-missing").await;
    d.subscribe(CLA, &["shop/later"]).await;
    let absent = d.next().await;
    assert_eq!(absent.type_url, CLA);
    assert!(absent.resources.is_empty(), "{absent:?}");
    assert_eq!(
        absent.removed_resources,
        vec!["shop/later".to_string()],
        "a name that does not exist is reported removed"
    );
    d.ack(&absent).await;

    s.admin.apply(&backend("later", 9501)).await;
    let created = d.next().await;
    assert_eq!(
        (created.type_url.as_str(), policy_changes(&created)),
        (CLA, (set(&["shop/later"]), set(&[]))),
        "the next response sends the new resource (and the absence was reported once): {created:?}"
    );
    assert_eq!(cla_ports(upserted(&created, "shop/later")), vec![9501]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_resume_from_initial_versions_sends_only_what_changed() {
    let s = Setup::new().await;
    s.admin.apply(&backend("old", 9601)).await;
    let mut a = DeltaClient::connect(&s.cp, "delta-resume-a").await;
    a.subscribe(CLUSTER, &[]).await;
    let mut held: HashMap<String, String> = HashMap::new();
    while !held.contains_key("shop/old") {
        let r = a.next().await;
        for resource in &r.resources {
            held.insert(resource.name.clone(), resource.version.clone());
        }
    }
    let with_old = held.clone();
    let revision = s.delete("/v1/backends/shop/old").await;
    settle(&s.cp, revision).await;
    while held.contains_key("shop/old") {
        let r = a.next().await;
        for name in &r.removed_resources {
            held.remove(name);
        }
        for resource in &r.resources {
            held.insert(resource.name.clone(), resource.version.clone());
        }
    }
    let current = held;

    let resume = |client: &DeltaClient, versions: &HashMap<String, String>| DeltaDiscoveryRequest {
        initial_resource_versions: versions.clone(),
        ..client.request(CLUSTER)
    };

    // A resource that no longer exists is reported removed, and only it.
    let mut gone = DeltaClient::connect(&s.cp, "delta-resume-gone").await;
    gone.send(resume(&gone, &with_old)).await;
    let removed = gone.next_policy().await;
    assert_eq!(
        policy_changes(&removed),
        (set(&[]), set(&["shop/old"])),
        "{removed:?}"
    );

    // A stale version gets just that resource.
    let mut stale_versions = current.clone();
    stale_versions.insert("shop/blue".into(), "stale".into());
    let mut stale = DeltaClient::connect(&s.cp, "delta-resume-stale").await;
    stale.send(resume(&stale, &stale_versions)).await;
    let resent = stale.next_policy().await;
    assert_eq!(
        policy_changes(&resent),
        (set(&["shop/blue"]), set(&[])),
        "{resent:?}"
    );
    assert_eq!(resent.resources[0].version, current["shop/blue"]);

    // Holding what the server has: nothing until the next change.
    let mut same = DeltaClient::connect(&s.cp, "delta-resume-same").await;
    same.send(resume(&same, &current)).await;
    s.admin.apply(&backend("marker", 9602)).await;
    let next = same.next_policy().await;
    assert_eq!(
        policy_changes(&next),
        (set(&["shop/marker"]), set(&[])),
        "a resumed stream that is up to date gets only later changes: {next:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_removal_comes_after_the_upserts_that_stop_using_it() {
    let s = Setup::new().await;
    let mut d = DeltaClient::connect(&s.cp, "delta-removal").await;
    for type_url in [CLUSTER, CLA, LISTENER, ROUTE] {
        d.subscribe(type_url, &[]).await;
        let initial = d.next_policy().await;
        assert_eq!(initial.type_url, type_url, "{initial:?}");
        d.ack(&initial).await;
    }

    // In one burst: add red, stop routing to green, delete green.
    s.admin.apply(&backend("red", 9701)).await;
    s.delete("/v1/routes/shop/green").await;
    let last = s.delete("/v1/backends/shop/green").await;

    // Read until the whole burst is in: green removed from both types, the
    // route table without green, red's load assignment.
    let mut seen = Vec::new();
    let mut removed: BTreeSet<(String, String)> = BTreeSet::new();
    let (mut routes_updated, mut red_sent) = (false, false);
    while removed.len() < 2 || !routes_updated || !red_sent {
        let r = d.next_policy().await;
        for name in &r.removed_resources {
            removed.insert((r.type_url.clone(), name.clone()));
        }
        routes_updated |= r.type_url == ROUTE
            && r.resources.iter().any(|res| {
                !route_clusters(res.resource.as_ref().expect("body")).contains("shop/green")
            });
        red_sent |= r.type_url == CLA && r.resources.iter().any(|res| res.name == "shop/red");
        seen.push(r);
    }
    assert_eq!(
        removed,
        [
            (CLUSTER.to_string(), "shop/green".to_string()),
            (CLA.to_string(), "shop/green".to_string())
        ]
        .into_iter()
        .collect(),
        "deleting a backend removes its cluster and load assignment"
    );
    assert_eq!(seen.iter().map(revision_of).max(), Some(last), "{seen:#?}");

    // Make before break: within each push, upserts in Cluster, CLA, Listener,
    // Route order, removals after every upsert.
    let rank = |t: &str| [CLUSTER, CLA, LISTENER, ROUTE].iter().position(|u| *u == t);
    let mut i = 0;
    while i < seen.len() {
        let push = revision_of(&seen[i]);
        let group: Vec<&DeltaDiscoveryResponse> = seen[i..]
            .iter()
            .take_while(|r| revision_of(r) == push)
            .collect();
        i += group.len();
        let mut removing = false;
        let mut last_rank = None;
        for r in &group {
            let (upserts, removals) = (!r.resources.is_empty(), !r.removed_resources.is_empty());
            assert!(
                !(upserts && removals),
                "upserts and removals travel apart: {r:?}"
            );
            if upserts {
                assert!(
                    !removing,
                    "an upsert after a removal in push {push}: {group:#?}"
                );
                assert!(
                    rank(&r.type_url) >= last_rank,
                    "upsert order in push {push}: {group:#?}"
                );
                last_rank = rank(&r.type_url);
            }
            removing |= removals;
        }
    }
    // The route table stopped sending traffic to green before green went.
    let route_update = seen
        .iter()
        .position(|r| {
            r.type_url == ROUTE
                && r.resources.iter().any(|res| {
                    !route_clusters(res.resource.as_ref().expect("body")).contains("shop/green")
                })
        })
        .expect("the route table is updated");
    let first_removal = seen
        .iter()
        .position(|r| r.removed_resources.iter().any(|n| n == "shop/green"))
        .expect("removal");
    assert!(route_update < first_removal, "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_prism_kinds_arrive_as_one_batch_per_revision() {
    let s = Setup::new().await;
    let mut d = DeltaClient::connect(&s.cp, "delta-batch").await;
    for kind in Kind::ALL {
        d.subscribe(kind.type_url(), &[]).await;
    }
    let mut batch = Vec::new();
    for _ in Kind::ALL {
        batch.push(d.next().await);
    }
    let urls: Vec<&str> = batch.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(urls, Kind::ALL.map(Kind::type_url).to_vec());
    for r in &batch {
        assert_eq!(revision_of(r), s.revision, "{r:?}");
    }
    let decoded: Vec<BTreeSet<String>> = batch
        .iter()
        .map(|r| r.resources.iter().map(|res| res.name.clone()).collect())
        .collect();
    assert_eq!(
        decoded,
        vec![
            set(&[]),
            set(&["shop"]),
            set(&["shop/blue", "shop/green"]),
            set(&["shop/blue", "shop/green"]),
            set(&[])
        ],
        "secrets (none here), namespaces, backends, routes, data bindings (none here)"
    );
    for r in &batch {
        d.ack(r).await;
    }
    s.proxy_where("delta-batch", "batch ACK recorded", |p| {
        p["acked_revision"].as_u64() == Some(s.revision)
    })
    .await;

    let revision = s.admin.apply(&backend("blue", 9801)).await;
    let mut batch = Vec::new();
    for _ in Kind::ALL {
        batch.push(d.next().await);
    }
    let summary: Vec<(&str, u64, BTreeSet<String>, usize)> = batch
        .iter()
        .map(|r| {
            (
                r.type_url.as_str(),
                revision_of(r),
                r.resources.iter().map(|res| res.name.clone()).collect(),
                r.removed_resources.len(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (Kind::Secret.type_url(), revision, set(&[]), 0),
            (Kind::Namespace.type_url(), revision, set(&[]), 0),
            (Kind::Backend.type_url(), revision, set(&["shop/blue"]), 0),
            (Kind::Route.type_url(), revision, set(&[]), 0),
            (Kind::DataBinding.type_url(), revision, set(&[]), 0),
        ],
        "one response per kind, all at the new revision, unchanged kinds empty"
    );
    let nonces: BTreeSet<&String> = batch.iter().map(|r| &r.nonce).collect();
    assert_eq!(nonces.len(), Kind::ALL.len());
}

/// The endpoint addresses of Prism backend `name` in a Backend response.
fn prism_backend_addresses(response: &DeltaDiscoveryResponse, name: &str) -> Vec<String> {
    let any = upserted(response, name);
    match Resource::decode(Kind::Backend, &any.value).expect("Backend") {
        Resource::Backend(b) => b.endpoints.into_iter().map(|e| e.address).collect(),
        other => panic!("not a backend: {other:?}"),
    }
}

/// Receives one full batch and ACKs it.
async fn batch_and_ack(d: &mut DeltaClient) -> Vec<DeltaDiscoveryResponse> {
    let mut batch = Vec::new();
    for _ in Kind::ALL {
        batch.push(d.next().await);
    }
    for r in &batch {
        d.ack(r).await;
    }
    batch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_slow_client_gets_one_batch_at_the_newest_revision_after_a_burst() {
    let s = Setup::new().await;
    let mut slow = DeltaClient::connect(&s.cp, "delta-slow").await;
    let mut fast = DeltaClient::connect(&s.cp, "delta-fast").await;
    for kind in Kind::ALL {
        slow.subscribe(kind.type_url(), &[]).await;
        fast.subscribe(kind.type_url(), &[]).await;
    }
    let mut pending = Vec::new();
    for _ in Kind::ALL {
        pending.push(slow.next().await);
    }
    assert!(pending.iter().all(|r| revision_of(r) == s.revision));
    batch_and_ack(&mut fast).await;

    // Ten writes, each one published and taken up by the fast proxy before
    // the next, so the slow one misses ten distinct revisions; the fast proxy
    // is not held back by the slow one.
    let mut newest = 0;
    for i in 0..10 {
        newest = s.admin.apply(&backend("blue", 9900 + i)).await;
        while revision_of(&batch_and_ack(&mut fast).await[0]) < newest {}
    }

    // The slow proxy answers its batch: the next batch is the newest revision.
    for r in &pending {
        slow.ack(r).await;
    }
    let batch = batch_and_ack(&mut slow).await;
    let revisions: Vec<u64> = batch.iter().map(revision_of).collect();
    assert_eq!(
        revisions,
        vec![newest; Kind::ALL.len()],
        "nothing was queued during the burst: the first batch after the ACK is the newest"
    );
    assert_eq!(
        prism_backend_addresses(&batch[backend_index()], "shop/blue"),
        vec!["127.0.0.1:9909".to_string()]
    );

    // And only one batch was sent: the next message is the next revision.
    let after = s.admin.apply(&backend("blue", 9950)).await;
    let next = slow.next().await;
    assert_eq!(revision_of(&next), after, "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_unknown_type_url_ends_the_stream_with_invalid_argument() {
    let s = Setup::new().await;
    let mut d = DeltaClient::connect(&s.cp, "delta-bad-type").await;
    d.subscribe("type.googleapis.com/example.v1.Nope", &[])
        .await;
    let status = d.end().await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("type.googleapis.com/example.v1.Nope"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_first_request_without_node_id_is_invalid_argument() {
    let s = Setup::new().await;
    for node in [None, Some(Node::default())] {
        let mut d = DeltaClient::connect(&s.cp, "unused").await;
        d.send(DeltaDiscoveryRequest {
            node,
            type_url: CLUSTER.into(),
            ..Default::default()
        })
        .await;
        let status = d.end().await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("node.id"), "{status:?}");
    }
}

// ===========================================================================
// State of the world

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_wildcard_cds_and_lds_carry_every_resource_with_version_and_nonce() {
    let s = Setup::new().await;
    let mut c = SotwClient::connect(&s.cp, "sotw-wildcard").await;
    c.request(CLUSTER, &[], None).await;
    let clusters = c.next().await;
    assert_eq!(clusters.type_url, CLUSTER);
    assert!(!clusters.version_info.is_empty() && !clusters.nonce.is_empty());
    assert_eq!(
        names(&clusters.resources),
        set(&["shop/blue", "shop/green", FLEET])
    );
    c.request(CLUSTER, &[], Some(&clusters)).await;

    c.request(LISTENER, &[], None).await;
    let listeners = c.next().await;
    assert_eq!(listeners.type_url, LISTENER);
    assert!(!listeners.version_info.is_empty() && !listeners.nonce.is_empty());
    let listener_names = names(&listeners.resources);
    assert!(
        listener_names.contains("prism-http"),
        "{}",
        summary(&listeners)
    );
    assert!(
        !listener_names.contains("shop.test"),
        "{}",
        summary(&listeners)
    );
    assert_ne!(listeners.nonce, clusters.nonce);
    c.request(LISTENER, &[], Some(&listeners)).await;

    // One cluster added: the response carries all of them.
    s.admin.apply(&backend("red", 9011)).await;
    let next = c.next().await;
    assert_eq!(next.type_url, CLUSTER, "{}", summary(&next));
    assert_eq!(
        names(&next.resources),
        set(&["shop/blue", "shop/green", "shop/red", FLEET])
    );
    assert_ne!(next.version_info, clusters.version_info);
    assert!(!next.nonce.is_empty());
    assert!(next.nonce != clusters.nonce && next.nonce != listeners.nonce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_eds_sends_exactly_the_names_asked_and_remembers_missing_ones() {
    let s = Setup::new().await;
    let mut c = SotwClient::connect(&s.cp, "sotw-eds").await;
    let asked = ["shop/blue", "shop/later"];
    c.request(CLA, &asked, None).await;
    let first = c.next().await;
    assert_eq!(first.type_url, CLA);
    assert_eq!(names(&first.resources), set(&["shop/blue"]));
    c.request(CLA, &asked, Some(&first)).await;

    s.admin.apply(&backend("later", 9021)).await;
    let next = c.next().await;
    assert_eq!(next.type_url, CLA);
    let got = names(&next.resources);
    assert!(got.contains("shop/later"), "{}", summary(&next));
    assert!(got.is_subset(&set(&asked)), "{}", summary(&next));
    assert_eq!(cla_ports(find(&next, "shop/later")), vec![9021]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_stale_nonce_is_ignored_and_a_nacked_content_is_not_resent() {
    let s = Setup::new().await;
    let mut c = SotwClient::connect(&s.cp, "sotw-nack").await;
    let both = ["shop/blue", "shop/green"];
    c.request(CLA, &both, None).await;
    let first = c.next().await;
    assert_eq!(names(&first.resources), set(&both));
    c.request(CLA, &both, Some(&first)).await;

    // A request with a nonce the server never sent is ignored, names and all.
    c.send(DiscoveryRequest {
        node: Some(c.node.clone()),
        type_url: CLA.into(),
        resource_names: vec!["shop/blue".into()],
        version_info: first.version_info.clone(),
        response_nonce: "no-such-nonce".into(),
        ..Default::default()
    })
    .await;
    // ACKed, then a change: a new response, still for both names.
    s.admin.apply(&backend("green", 9032)).await;
    let changed = c.next().await;
    assert_eq!(
        names(&changed.resources),
        set(&both),
        "the stale request did not narrow the subscription: {}",
        summary(&changed)
    );
    assert_eq!(cla_ports(find(&changed, "shop/green")), vec![9032]);
    assert_ne!(changed.version_info, first.version_info);

    c.nack(&both, &changed, "green endpoints refused").await;
    let node = s
        .proxy_where("sotw-nack", "NACK recorded", |p| {
            p["last_nack"]["message"] == "green endpoints refused"
        })
        .await;
    assert_eq!(node["last_nack"]["type_url"], CLA);

    // The rejected content is not sent again; the next change is.
    s.admin.apply(&backend("blue", 9031)).await;
    let after = c.next().await;
    assert_ne!(
        after.version_info,
        changed.version_info,
        "the NACKed content was resent: {}",
        summary(&after)
    );
    assert_eq!(cla_ports(find(&after, "shop/blue")), vec![9031]);
    assert_eq!(cla_ports(find(&after, "shop/green")), vec![9032]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_removal_is_make_before_break() {
    let s = Setup::new().await;
    let mut c = SotwClient::connect(&s.cp, "sotw-removal").await;
    c.request(CLUSTER, &[], None).await;
    let clusters = c.next().await;
    c.request(CLUSTER, &[], Some(&clusters)).await;
    c.request(ROUTE, &["prism-http"], None).await;
    let routes = c.next().await;
    assert_eq!(routes.type_url, ROUTE);
    c.request(ROUTE, &["prism-http"], Some(&routes)).await;
    let routed = route_clusters(find(&routes, "prism-http"));
    assert!(routed.contains("shop/green"), "{routed:?}");

    // In one burst: add red, stop routing to green, delete green.
    s.admin.apply(&backend("red", 9041)).await;
    s.delete("/v1/routes/shop/green").await;
    s.delete("/v1/backends/shop/green").await;

    let mut cds = names(&clusters.resources);
    let mut rds = routed;
    let mut order = Vec::new();
    loop {
        let r = c.next().await;
        c.request(
            &r.type_url,
            if r.type_url == ROUTE {
                &["prism-http"]
            } else {
                &[]
            },
            Some(&r),
        )
        .await;
        match r.type_url.as_str() {
            CLUSTER => cds = names(&r.resources),
            ROUTE => rds = route_clusters(find(&r, "prism-http")),
            other => panic!("unasked type {other}"),
        }
        order.push((
            r.type_url.clone(),
            cds.contains("shop/green"),
            rds.contains("shop/green"),
        ));
        assert!(
            rds.is_subset(&cds),
            "routes point at clusters the client does not have: routes {rds:?}, clusters {cds:?}, so far {order:?}"
        );
        if !cds.contains("shop/green") {
            break;
        }
    }
    assert!(
        cds.contains("shop/red") && cds.contains("shop/blue"),
        "{cds:?}"
    );
    // Whether or not the three writes land in one push, the client sees the
    // cluster list grow (red added, green kept), then the routes drop green,
    // then green goes.
    assert_eq!(
        order,
        vec![
            (CLUSTER.to_string(), true, true),
            (ROUTE.to_string(), true, false),
            (CLUSTER.to_string(), false, false),
        ],
        "(type, green in clusters, green in routes) as received"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_unknown_type_url_ends_the_stream_with_invalid_argument() {
    let s = Setup::new().await;
    let mut c = SotwClient::connect(&s.cp, "sotw-bad-type").await;
    c.request("type.googleapis.com/example.v1.Nope", &[], None)
        .await;
    let status = c.end().await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("example.v1.Nope"), "{status:?}");
}

// ===========================================================================
// Health and reflection

const ADS: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";

async fn channel(cp: &ControlPlane) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(cp.xds.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("the discovery port accepts connections")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_reports_the_discovery_service_serving() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let s = Setup::new().await;
    let mut health = HealthClient::new(channel(&s.cp).await);
    for service in ["", ADS] {
        let response = timeout(
            RECV,
            health.check(HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await
        .expect("in time")
        .unwrap_or_else(|e| panic!("health of `{service}`: {e}"));
        assert_eq!(
            response.into_inner().status,
            ServingStatus::Serving as i32,
            "`{service}`"
        );
    }
    let unknown = timeout(
        RECV,
        health.check(HealthCheckRequest {
            service: "no.such.Service".into(),
        }),
    )
    .await
    .expect("in time");
    assert_eq!(
        unknown.expect_err("unknown service").code(),
        tonic::Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_reflection_lists_and_describes_the_discovery_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let s = Setup::new().await;
    let mut client = ServerReflectionClient::new(channel(&s.cp).await);
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(ADS.into())),
    ];
    let mut responses = timeout(
        RECV,
        client.server_reflection_info(tokio_stream::iter(requests)),
    )
    .await
    .expect("in time")
    .expect("reflection answers")
    .into_inner();
    let mut next = async || -> ServerReflectionResponse {
        timeout(RECV, responses.message())
            .await
            .expect("in time")
            .expect("no error")
            .expect("a response")
    };

    let Some(MessageResponse::ListServicesResponse(list)) = next().await.message_response else {
        panic!("a service list");
    };
    let services: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(services.contains(ADS), "{services:?}");
    assert!(services.contains("grpc.health.v1.Health"), "{services:?}");

    let Some(MessageResponse::FileDescriptorResponse(files)) = next().await.message_response else {
        panic!("the file that defines {ADS}");
    };
    assert!(
        files
            .file_descriptor_proto
            .iter()
            .any(|f| f.windows(26).any(|w| w == b"AggregatedDiscoveryService")),
        "the descriptor names the service"
    );
}

/// Where the Backend response sits in a Prism batch.
fn backend_index() -> usize {
    Kind::ALL
        .iter()
        .position(|k| *k == Kind::Backend)
        .expect("Backend is a kind")
}
