use std::collections::HashMap;

use envoy_types::pb::google::rpc::Status as RpcStatus;
use prism_proto::Resource;
use prism_proto::pb::config::v1::{Backend, Endpoint, Namespace, Route, RouteMatch, route_match};

use super::catalog::TypeKind;
use super::*;
use crate::envoy::EnvoyParams;
use prism_proto::Kind;
use prism_proto::Snapshot;

fn params() -> EnvoyParams {
    EnvoyParams {
        listener_address: "127.0.0.1:10000".parse().expect("addr"),
        tls_listener_address: "127.0.0.1:10443".parse().expect("addr"),
    }
}

fn catalog(snapshot: Snapshot) -> Arc<Catalog> {
    Arc::new(Catalog::build(
        Arc::new(snapshot),
        &[],
        0,
        &params(),
        &Catalog::default(),
    ))
}

/// Where `kind`'s response sits in a batch.
fn at(kind: Kind) -> usize {
    Kind::ALL
        .iter()
        .position(|k| *k == kind)
        .expect("every kind is in ALL")
}

fn policy(revision: u64, port: u16) -> Snapshot {
    Snapshot::from_resources(
        revision,
        [
            Resource::Secret(prism_proto::Secret {
                name: "demo/ca".into(),
                kind: Some(prism_proto::pb::config::v1::secret::Kind::CaBundle(
                    prism_proto::pb::config::v1::CaBundle {
                        certificates: include_str!("../../../tests/support/tls/ca.pem").into(),
                    },
                )),
            }),
            Resource::Namespace(Namespace {
                name: "demo".into(),
                hosts: vec!["demo.local".into()],
                ..Default::default()
            }),
            Resource::Backend(Backend {
                name: "demo/web".into(),
                endpoints: vec![Endpoint {
                    address: format!("127.0.0.1:{port}"),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            Resource::Route(Route {
                name: "demo/root".into(),
                r#match: Some(RouteMatch {
                    host: String::new(),
                    path: Some(route_match::Path::Prefix("/".into())),
                    ..Default::default()
                }),
                backend: "web".into(),
                ..Default::default()
            }),
        ],
    )
}

fn snapshot(revision: u64, port: u16) -> Arc<Catalog> {
    catalog(policy(revision, port))
}

fn subscribe(kind: Kind) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "proxy-1".into(),
            ..Default::default()
        }),
        type_url: kind.type_url().into(),
        ..Default::default()
    }
}

fn ack(response: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

fn nack(response: &DeltaDiscoveryResponse, message: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: message.into(),
            details: vec![],
        }),
        ..ack(response)
    }
}

/// Subscribes to every kind and returns the first batch.
fn connect(state: &mut DeltaState, snap: &Arc<Catalog>) -> Vec<DeltaDiscoveryResponse> {
    Kind::ALL
        .into_iter()
        .flat_map(|kind| state.on_request(subscribe(kind), snap).expect("accepted"))
        .collect()
}

fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    response.resources.iter().map(|r| r.name.as_str()).collect()
}

#[test]
fn first_batch_carries_every_kind_at_one_revision() {
    let fleet = Fleet::default();
    let mut state = DeltaState::new(fleet.clone(), None);
    let snap = snapshot(7, 1000);
    let batch = connect(&mut state, &snap);
    assert_eq!(batch.len(), Kind::ALL.len());
    let kinds: Vec<_> = batch.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(kinds, Kind::ALL.map(Kind::type_url));
    assert!(batch.iter().all(|r| r.system_version_info == "7"));
    assert_eq!(names(&batch[at(Kind::Secret)]), ["demo/ca"]);
    assert_eq!(names(&batch[at(Kind::Backend)]), ["demo/web"]);
    let nonces: std::collections::HashSet<_> = batch.iter().map(|r| r.nonce.clone()).collect();
    assert_eq!(
        nonces.len(),
        Kind::ALL.len(),
        "every response has its own nonce"
    );

    for response in &batch {
        assert!(
            state
                .on_request(ack(response), &snap)
                .expect("ack")
                .is_empty()
        );
    }
    let status = &fleet.list(7)[0];
    assert_eq!(status.acked_revision, Some(7));
    assert_eq!(status.lag, Some(0));
}

#[test]
fn a_change_sends_only_what_changed_and_empty_responses_for_the_rest() {
    let mut state = DeltaState::new(Fleet::default(), None);
    let snap = snapshot(1, 1000);
    for response in connect(&mut state, &snap) {
        state.on_request(ack(&response), &snap).expect("ack");
    }
    let next = snapshot(2, 2000);
    let batch = state.on_catalog(&next);
    assert_eq!(batch.len(), Kind::ALL.len());
    for kind in [Kind::Secret, Kind::Namespace, Kind::Route] {
        let response = &batch[at(kind)];
        assert!(response.resources.is_empty() && response.removed_resources.is_empty());
    }
    assert_eq!(names(&batch[at(Kind::Backend)]), ["demo/web"]);

    // Nothing more until the batch is answered, however far the policy moves.
    assert!(state.on_catalog(&snapshot(3, 3000)).is_empty());
}

#[test]
fn removals_are_named() {
    let mut state = DeltaState::new(Fleet::default(), None);
    let snap = snapshot(1, 1000);
    for response in connect(&mut state, &snap) {
        state.on_request(ack(&response), &snap).expect("ack");
    }
    let mut smaller = policy(2, 1000);
    smaller.remove(&prism_proto::ResourceKey::new(Kind::Route, "demo/root"));
    let batch = state.on_catalog(&catalog(smaller));
    assert_eq!(batch[at(Kind::Route)].removed_resources, ["demo/root"]);

    // A secret is removed like any other resource.
    let mut smaller = policy(3, 1000);
    smaller.remove(&prism_proto::ResourceKey::new(Kind::Route, "demo/root"));
    smaller.remove(&prism_proto::ResourceKey::new(Kind::Secret, "demo/ca"));
    for response in &batch {
        state.on_request(ack(response), &snap).expect("ack");
    }
    let batch = state.on_catalog(&catalog(smaller));
    assert_eq!(batch[at(Kind::Secret)].removed_resources, ["demo/ca"]);
}

#[test]
fn a_nack_is_recorded_and_the_rejected_revision_is_not_resent() {
    let fleet = Fleet::default();
    let mut state = DeltaState::new(fleet.clone(), None);
    let snap = snapshot(1, 1000);
    for response in connect(&mut state, &snap) {
        state.on_request(ack(&response), &snap).expect("ack");
    }
    let bad = snapshot(2, 2000);
    let batch = state.on_catalog(&bad);
    for response in &batch {
        let more = state
            .on_request(nack(response, "backend demo/web: no"), &bad)
            .expect("nack");
        assert!(more.is_empty(), "the rejected revision must not be resent");
    }
    let status = &fleet.list(2)[0];
    let last_nack = status.last_nack.as_ref().expect("nack recorded");
    assert_eq!(last_nack.message, "backend demo/web: no");
    assert_eq!(status.acked_revision, Some(1));
    assert_eq!(status.lag, Some(1));

    // The next revision is diffed against what the proxy really holds.
    let fixed = snapshot(3, 3000);
    let batch = state.on_catalog(&fixed);
    assert_eq!(names(&batch[at(Kind::Backend)]), ["demo/web"]);
}

#[test]
fn a_resumed_stream_gets_only_what_changed() {
    let snap = snapshot(5, 1000);
    let mut state = DeltaState::new(Fleet::default(), None);
    let batch: Vec<_> = Kind::ALL
        .into_iter()
        .flat_map(|kind| {
            let held: HashMap<String, String> = snap
                .snapshot
                .of_kind(kind)
                .map(|v| (v.resource.name().to_string(), v.version.clone()))
                .collect();
            let request = DeltaDiscoveryRequest {
                initial_resource_versions: held,
                ..subscribe(kind)
            };
            state.on_request(request, &snap).expect("accepted")
        })
        .collect();
    assert_eq!(batch.len(), Kind::ALL.len());
    assert!(
        batch
            .iter()
            .all(|r| r.resources.is_empty() && r.removed_resources.is_empty())
    );

    let mut state = DeltaState::new(Fleet::default(), None);
    let stale = DeltaDiscoveryRequest {
        initial_resource_versions: HashMap::from([("demo/gone".to_string(), "1".to_string())]),
        ..subscribe(Kind::Backend)
    };
    let batch = state.on_request(stale, &snap).expect("accepted");
    assert_eq!(batch[0].removed_resources, ["demo/gone"]);
    assert_eq!(names(&batch[0]), ["demo/web"]);
}

#[test]
fn bad_requests_end_the_stream_with_a_clear_status() {
    let snap = snapshot(1, 1000);
    let mut state = DeltaState::new(Fleet::default(), None);
    let no_node = DeltaDiscoveryRequest {
        node: None,
        ..subscribe(Kind::Route)
    };
    let status = state.on_request(no_node, &snap).unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("node.id"));

    let unknown = DeltaDiscoveryRequest {
        type_url: "type.googleapis.com/nope.Widget".into(),
        ..subscribe(Kind::Route)
    };
    let status = state.on_request(unknown, &snap).unwrap_err();
    assert!(status.message().contains("nope.Widget"));
}

#[test]
fn stale_nonces_are_ignored() {
    let snap = snapshot(1, 1000);
    let mut state = DeltaState::new(Fleet::default(), None);
    let batch = connect(&mut state, &snap);
    let stale = DeltaDiscoveryRequest {
        response_nonce: "0-999".into(),
        ..ack(&batch[0])
    };
    assert!(state.on_request(stale, &snap).expect("ignored").is_empty());
    assert!(state.batch.is_some());
}

#[test]
fn the_catch_all_host_answers_any_name_a_grpc_client_dials() {
    let mut snapshot = policy(1, 1000);
    assert!(
        catalog(snapshot.clone())
            .api_listener_for("other.test:50051")
            .is_none()
    );
    snapshot.insert(Resource::Namespace(Namespace {
        name: "fallback".into(),
        hosts: vec!["*".into()],
        ..Default::default()
    }));
    assert!(
        catalog(snapshot)
            .api_listener_for("other.test:50051")
            .is_some()
    );
}

#[test]
fn envoy_secrets_are_served_by_name_only() {
    let snap = snapshot(1, 1000);
    let secrets = snap.resources(TypeKind::Secret).expect("the SDS type");
    assert!(
        secrets.wildcard.is_empty(),
        "no key to a wildcard subscriber"
    );
    assert!(secrets.get("demo/ca").is_some());
    assert_eq!(
        TypeKind::from_url(crate::envoy::SECRET),
        Some(TypeKind::Secret)
    );
}

/// Route `demo/root` of [`policy`], renamed `demo/{name}`, on path `/{name}/`.
fn root_as(snapshot: &Snapshot, name: &str) -> Route {
    let key = prism_proto::ResourceKey::new(Kind::Route, "demo/root");
    let Some(Resource::Route(root)) = snapshot.get(&key).map(|v| &v.resource) else {
        panic!("the policy has route demo/root");
    };
    Route {
        name: format!("demo/{name}"),
        r#match: Some(RouteMatch {
            path: Some(route_match::Path::Prefix(format!("/{name}/"))),
            ..Default::default()
        }),
        ..root.clone()
    }
}

/// A write of routes alone (one changed, one added, one removed) changes the
/// route types only: every other type is the previous catalog's, shared, and
/// a route the write left alone keeps its entry. Everything comes out as a
/// build afresh would make it.
#[test]
fn a_routes_write_shares_what_it_did_not_change() {
    let mut before = policy(1, 1000);
    for name in ["kept", "gone"] {
        before.insert(Resource::Route(root_as(&before, name)));
    }
    let first = catalog(before);
    // Built anew, so every resource is another `Arc` at the same version.
    let mut after = policy(2, 1000);
    for name in ["kept", "added"] {
        after.insert(Resource::Route(root_as(&after, name)));
    }
    after.insert(Resource::Route(Route {
        timeout: Some(prism_proto::ProtoDuration {
            seconds: 29,
            nanos: 0,
        }),
        ..root_as(&after, "root")
    }));
    let second = Catalog::build(Arc::new(after.clone()), &[], 0, &params(), &first);
    let fresh = catalog(after);

    for kind in TypeKind::ALL {
        let entries = |catalog: &Catalog| {
            let resources = catalog.resources(kind).expect("every type is built");
            [&resources.wildcard, &resources.named_only].map(|map| {
                map.iter()
                    .map(|(name, e)| {
                        (
                            name.clone(),
                            e.version.clone(),
                            e.any.clone(),
                            e.namespace.clone(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(entries(&second), entries(&fresh), "{kind:?}");
        // `resources` lends the type from its `Arc`: the same address is
        // the same, shared map.
        let shared = std::ptr::eq(
            first.resources(kind).expect("every type is built"),
            second.resources(kind).expect("every type is built"),
        );
        let changed = matches!(kind, TypeKind::Prism(Kind::Route) | TypeKind::Route);
        assert_eq!(
            shared, !changed,
            "{kind:?} is shared unless the write changed it"
        );
    }
    let entry = |catalog: &Catalog, name: &str| {
        let routes = catalog.resources(TypeKind::Prism(Kind::Route));
        Arc::clone(routes.and_then(|r| r.get(name)).expect("the route"))
    };
    assert!(Arc::ptr_eq(
        &entry(&first, "demo/kept"),
        &entry(&second, "demo/kept")
    ));
    assert!(!Arc::ptr_eq(
        &entry(&first, "demo/root"),
        &entry(&second, "demo/root")
    ));
    let routes = second
        .resources(TypeKind::Prism(Kind::Route))
        .expect("routes");
    assert!(routes.get("demo/gone").is_none());
    assert!(routes.get("demo/added").is_some());
}

#[test]
fn every_prism_kind_is_a_served_type_in_push_order() {
    let prism: Vec<Kind> = TypeKind::ALL
        .into_iter()
        .filter_map(|t| match t {
            TypeKind::Prism(kind) => Some(kind),
            _ => None,
        })
        .collect();
    assert_eq!(
        prism,
        Kind::ALL,
        "a Prism kind the discovery server would not serve"
    );
}
