use std::net::SocketAddr;

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource as WireResource,
};
use envoy_types::pb::google::protobuf::Any;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;

use prism_proto::Resource;
use prism_proto::pb::config::v1::{Endpoint, Namespace, Route, RouteMatch, route_match};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;

use super::*;

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn backoff_doubles_to_a_cap_with_jitter_and_resets() {
    let mut backoff = Backoff::new();
    let mut ceiling = Backoff::BASE;
    for _ in 0..10 {
        let delay = backoff.delay();
        assert!(
            delay >= ceiling / 2 && delay <= ceiling,
            "{delay:?} vs {ceiling:?}"
        );
        ceiling = (ceiling * 2).min(Backoff::CAP);
    }
    assert!(backoff.delay() <= Backoff::CAP);
    backoff.reset();
    assert!(backoff.delay() <= Backoff::BASE);
}

#[test]
fn nack_carries_invalid_argument_and_the_reason() {
    let request = answer(Reply {
        type_url: Kind::Route.type_url().into(),
        nonce: "7".into(),
        error: Some("Route demo/root: backend: missing".into()),
    });
    let detail = request.error_detail.expect("a NACK");
    assert_eq!(detail.code, INVALID_ARGUMENT);
    assert_eq!(detail.message, "Route demo/root: backend: missing");
    assert_eq!(request.response_nonce, "7");
    let ack = answer(Reply {
        type_url: Kind::Route.type_url().into(),
        nonce: "8".into(),
        error: None,
    });
    assert!(ack.error_detail.is_none());
}

/// One delta stream as the fake control plane sees it.
struct Session {
    requests: tonic::Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, tonic::Status>>,
}

/// A control plane that hands every delta stream to the test.
struct FakeControlPlane {
    sessions: mpsc::Sender<Session>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeControlPlane {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaAggregatedResourcesStream =
        ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn stream_aggregated_resources(
        &self,
        _request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let (responses, rx) = mpsc::channel(16);
        let session = Session {
            requests: request.into_inner(),
            responses,
        };
        self.sessions
            .send(session)
            .await
            .map_err(|_| tonic::Status::unavailable("test is gone"))?;
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

impl Session {
    async fn next_request(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(WAIT, self.requests.message())
            .await
            .expect("a request in time")
            .expect("stream ok")
            .expect("stream open")
    }

    /// Sends one batch (one response per kind) and returns the proxy's answers.
    async fn batch(
        &mut self,
        revision: u64,
        per_kind: [Vec<Resource>; 4],
    ) -> Vec<DeltaDiscoveryRequest> {
        for (kind, resources) in every_kind(per_kind) {
            let response = DeltaDiscoveryResponse {
                system_version_info: revision.to_string(),
                type_url: kind.type_url().into(),
                nonce: format!("{revision}-{kind}"),
                resources: resources.iter().map(wire).collect(),
                ..Default::default()
            };
            self.responses.send(Ok(response)).await.expect("send");
        }
        let mut answers = Vec::new();
        for _ in 0..Kind::ALL.len() {
            answers.push(self.next_request().await);
        }
        answers
    }
}

fn wire(resource: &Resource) -> WireResource {
    WireResource {
        name: resource.name().into(),
        version: resource.clone().versioned().version,
        resource: Some(Any {
            type_url: resource.kind().type_url().into(),
            value: resource.encode_to_vec(),
        }),
        ..Default::default()
    }
}

/// Secrets, namespaces, backends and routes, in `Kind::ALL` order.
/// Secrets, namespaces, backends and routes, in push order (no data
/// bindings).
fn policy(backend: &str, address: SocketAddr) -> [Vec<Resource>; 4] {
    [
        vec![],
        vec![Resource::Namespace(Namespace {
            name: "demo".into(),
            hosts: vec!["demo.local".into()],
            ..Default::default()
        })],
        vec![Resource::Backend(prism_proto::Backend {
            name: "demo/upstream".into(),
            endpoints: vec![Endpoint {
                address: address.to_string(),
                ..Default::default()
            }],
            ..Default::default()
        })],
        vec![Resource::Route(Route {
            name: "demo/root".into(),
            r#match: Some(RouteMatch {
                host: String::new(),
                path: Some(route_match::Path::Prefix("/".into())),
                ..Default::default()
            }),
            backend: backend.into(),
            ..Default::default()
        })],
    ]
}

/// `per_kind` for every kind: no data bindings.
fn every_kind(per_kind: [Vec<Resource>; 4]) -> impl Iterator<Item = (Kind, Vec<Resource>)> {
    Kind::ALL
        .into_iter()
        .zip(per_kind.into_iter().chain([Vec::new()]))
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::get(format!("http://{addr}{path}"))
        .header(http::header::HOST, host)
        .body(Empty::new())
        .expect("request");
    let response = client.request(request).await.expect("response");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

#[tokio::test]
async fn run_subscribes_applies_nacks_and_resumes() {
    let (cp_listener, cp_addr) = bind().await;
    let (sessions_tx, mut sessions) = mpsc::channel(4);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(FakeControlPlane {
                sessions: sessions_tx,
            }))
            .serve_with_incoming(TcpListenerStream::new(cp_listener)),
    );

    let (proxy, proxy_addr) = bind().await;
    let (admin, admin_addr) = bind().await;
    let (_, dead) = bind().await; // dropped at once: a port nothing listens on
    let config = Config {
        control_plane: format!("http://{cp_addr}"),
        node_id: "proxy-1".into(),
        zone: "zone-a".into(),
        region: "region-1".into(),
        advertise_address: proxy_addr.to_string(),
        data_dir: None,
        namespaces: vec![],
        selector: Default::default(),
        limits: Default::default(),
        access_log: None,
        control_plane_tls: None,
        metrics: true,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(crate::run(
        config,
        crate::Listeners {
            proxy,
            tls: None,
            admin,
        },
        async move {
            let _ = stopped.await;
        },
    ));

    let mut session = tokio::time::timeout(WAIT, sessions.recv())
        .await
        .expect("proxy connects")
        .expect("session");
    for kind in Kind::ALL {
        let subscribe = session.next_request().await;
        assert_eq!(subscribe.type_url, kind.type_url());
        assert!(subscribe.resource_names_subscribe.is_empty(), "wildcard");
        assert!(subscribe.initial_resource_versions.is_empty());
        let node = subscribe.node.expect("node");
        assert_eq!(node.id, "proxy-1");
        assert_eq!(node.cluster, "prism-proxy");
        assert_eq!(node.locality.expect("locality").zone, "zone-a");
    }
    assert_eq!(get(proxy_addr, "demo.local", "/").await.0, 503);
    assert_eq!(get(admin_addr, "", "/ready").await.0, 503);

    // A valid batch is applied, then ACKed.
    let answers = session.batch(1, policy("upstream", dead)).await;
    for (answer, kind) in answers.iter().zip(Kind::ALL) {
        assert_eq!(answer.type_url, kind.type_url());
        assert_eq!(answer.response_nonce, format!("1-{kind}"));
        assert!(answer.error_detail.is_none(), "{answer:?}");
    }
    assert_eq!(get(admin_addr, "", "/ready").await.0, 200);
    let (status, body) = get(proxy_addr, "demo.local", "/").await;
    assert_eq!((status, body.as_str()), (502, "upstream connect error\n"));

    // An invalid batch is NACKed and the old configuration keeps serving.
    let answers = session.batch(2, policy("missing", dead)).await;
    for answer in &answers {
        let detail = answer.error_detail.as_ref().expect("NACK");
        assert_eq!(detail.code, INVALID_ARGUMENT);
        assert_eq!(
            detail.message,
            "Route demo/root: backend: backend `demo/missing` does not exist"
        );
    }
    assert_eq!(get(proxy_addr, "demo.local", "/").await.0, 502);
    let (_, dump) = get(admin_addr, "", "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    assert_eq!(dump["revision"], 1);
    assert_eq!(dump["last_nack"]["revision"], 2);
    assert_eq!(dump["resources"].as_array().map(Vec::len), Some(3));
    // `/status` counts the one applied change, not the rejected one.
    let (_, summary) = get(admin_addr, "", "/status").await;
    let summary: serde_json::Value = serde_json::from_str(&summary).expect("json");
    assert_eq!(summary["revision"], 1);
    assert_eq!(summary["applied"], 1);
    assert!(
        summary["last_apply_seconds"].as_f64().is_some(),
        "{summary}"
    );

    // The control plane goes away; the proxy reconnects and resumes from
    // what it accepted.
    drop(session);
    let mut session = tokio::time::timeout(WAIT, sessions.recv())
        .await
        .expect("proxy reconnects")
        .expect("session");
    let subscribe = session.next_request().await;
    assert_eq!(subscribe.type_url, Kind::Secret.type_url());
    let subscribe = session.next_request().await;
    assert_eq!(subscribe.type_url, Kind::Namespace.type_url());
    let versions = subscribe.initial_resource_versions;
    assert_eq!(versions.keys().collect::<Vec<_>>(), ["demo"]);
    session.next_request().await;
    session.next_request().await;
    assert_eq!(get(proxy_addr, "demo.local", "/").await.0, 502);

    let _ = stop.send(());
    tokio::time::timeout(WAIT, running)
        .await
        .expect("run stops")
        .expect("task")
        .expect("run ok");
}

#[tokio::test]
async fn a_restored_snapshot_is_served_at_once_and_resumed_from() {
    let (cp_listener, cp_addr) = bind().await;
    let (sessions_tx, mut sessions) = mpsc::channel(4);
    let (proxy, proxy_addr) = bind().await;
    let (admin, admin_addr) = bind().await;
    let (_, dead) = bind().await; // dropped at once: a port nothing listens on
    let dir = tempfile::tempdir().expect("tempdir");
    let namespaces = vec!["demo".to_string()];
    let selector: std::collections::BTreeMap<_, _> =
        [("env".to_string(), "prod".to_string())].into();
    let file = crate::config::last_good::LastGood::new(
        dir.path(),
        crate::config::subset::describe(&namespaces, &selector),
    );
    let [_, namespaces_v, backends_v, routes_v] = policy("upstream", dead);
    let restored = Snapshot::from_resources(
        6,
        namespaces_v.into_iter().chain(backends_v).chain(routes_v),
    );
    file.store(&restored).expect("store");

    let config = Config {
        control_plane: format!("http://{cp_addr}"),
        node_id: "proxy-2".into(),
        zone: "zone-a".into(),
        region: "region-1".into(),
        advertise_address: proxy_addr.to_string(),
        data_dir: Some(dir.path().to_path_buf()),
        namespaces,
        selector,
        limits: Default::default(),
        access_log: None,
        control_plane_tls: None,
        metrics: true,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(crate::run(
        config,
        crate::Listeners {
            proxy,
            tls: None,
            admin,
        },
        async move {
            let _ = stopped.await;
        },
    ));

    // Nothing answers on the discovery port yet, and the proxy already serves
    // the restored revision.
    assert_eq!(get(admin_addr, "", "/ready").await.0, 200);
    let (_, dump) = get(admin_addr, "", "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    assert_eq!(dump["revision"], 6);
    assert_eq!(get(proxy_addr, "demo.local", "/").await.0, 502);

    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(FakeControlPlane {
                sessions: sessions_tx,
            }))
            .serve_with_incoming(TcpListenerStream::new(cp_listener)),
    );
    let mut session = tokio::time::timeout(WAIT, sessions.recv())
        .await
        .expect("proxy connects")
        .expect("session");
    for kind in Kind::ALL {
        let subscribe = session.next_request().await;
        assert_eq!(subscribe.type_url, kind.type_url());
        let expected: HashMap<String, String> = restored
            .of_kind(kind)
            .map(|v| (v.resource.name().to_string(), v.version.clone()))
            .collect();
        assert_eq!(subscribe.initial_resource_versions, expected);
        let metadata = subscribe.node.and_then(|n| n.metadata).expect("metadata");
        let string = |key: &str| match metadata.fields.get(key).and_then(|v| v.kind.clone()) {
            Some(value::Kind::StringValue(text)) => text,
            other => panic!("{key}: {other:?}"),
        };
        assert_eq!(string("prism_namespaces"), "demo");
        assert_eq!(string("prism_selector"), "env=prod");
        assert_eq!(string("advertise_address"), proxy_addr.to_string());
    }

    // Nothing changed: empty responses are ACKed and the revision moves on.
    let answers = session.batch(7, [vec![], vec![], vec![], vec![]]).await;
    assert!(
        answers.iter().all(|a| a.error_detail.is_none()),
        "{answers:?}"
    );
    // A change is applied and saved; shutdown waits for the save.
    let (_, upstream) = bind().await;
    let answers = session
        .batch(
            8,
            [
                vec![],
                vec![],
                policy("upstream", upstream)[2].clone(),
                vec![],
            ],
        )
        .await;
    assert!(
        answers.iter().all(|a| a.error_detail.is_none()),
        "{answers:?}"
    );
    let _ = stop.send(());
    tokio::time::timeout(WAIT, running)
        .await
        .expect("run stops")
        .expect("task")
        .expect("run ok");
    let saved = file.load().expect("load").expect("a snapshot");
    assert_eq!(saved.revision, 8);
    assert_ne!(saved, restored);
}

#[tokio::test]
async fn an_invalid_subset_is_refused_before_starting() {
    let (proxy, _) = bind().await;
    let (admin, _) = bind().await;
    let config = Config {
        control_plane: "http://127.0.0.1:1".into(),
        node_id: "proxy-3".into(),
        zone: String::new(),
        region: String::new(),
        advertise_address: String::new(),
        data_dir: None,
        namespaces: vec!["a,b".into()],
        selector: Default::default(),
        limits: Default::default(),
        access_log: None,
        control_plane_tls: None,
        metrics: true,
    };
    let result = crate::run(
        config,
        crate::Listeners {
            proxy,
            tls: None,
            admin,
        },
        async {},
    )
    .await;
    assert!(
        matches!(result, Err(crate::Error::InvalidSubset(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn work_stores_a_complete_batch_and_hands_back_the_runtime_it_replaced() {
    let unconfigured = Arc::new(Runtime::unconfigured());
    let runtime = Arc::new(ArcSwap::new(Arc::clone(&unconfigured)));
    let upstream: SocketAddr = "127.0.0.1:9".parse().expect("address");
    let mut stager = Stager::default();
    let mut outcomes = Vec::new();
    for (kind, resources) in every_kind(policy("upstream", upstream)) {
        let response = DeltaDiscoveryResponse {
            system_version_info: "1".into(),
            type_url: kind.type_url().into(),
            nonce: format!("1-{kind}"),
            resources: resources.iter().map(wire).collect(),
            ..Default::default()
        };
        let work = Work {
            stager,
            runtime: Arc::clone(&runtime),
            own: OwnAddresses::default(),
            data_dir: None,
        };
        let (back, outcome) = work.run(response);
        stager = back;
        outcomes.push(outcome);
    }
    let last = outcomes.pop().expect("five outcomes");
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Waiting)));
    let Outcome::Applied {
        revision: 1,
        changed: true,
        accepted: Some(accepted),
        retired: Some(retired),
    } = last
    else {
        panic!("the batch was not applied");
    };
    // The live runtime is the new one; the old one came back to be retired
    // off the event loop rather than dropped wherever its last user is.
    assert!(runtime.load().is_configured());
    assert!(Arc::ptr_eq(&retired, &unconfigured));
    assert_eq!(accepted.status.revision, 1);
    assert_eq!(accepted.last_good.map(|s| s.revision), Some(1));
    let replies = stager.take_replies();
    assert_eq!(replies.len(), Kind::ALL.len());
    assert!(replies.iter().all(|r| r.error.is_none()), "{replies:?}");
}
