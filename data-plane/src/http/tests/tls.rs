//! The TLS listener and upstream TLS, through the real proxy with real
//! upstreams and certificates from a test CA.

use std::sync::Arc;

use prism_proto::pb::config::v1::{Protocol, UpstreamTls};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::*;
use crate::runtime::tls::provider;
use crate::test_ca::{Leaf, TestCa};

/// A proxy serving TLS, with the runtime the test applies policy to.
async fn start_tls_proxy() -> Proxy {
    let (listener, addr) = bind().await;
    let runtime = Arc::new(ArcSwap::from_pointee(Runtime::unconfigured()));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve_tls(
        listener,
        Arc::clone(&runtime),
        params(),
        stopped,
        ListenerMetrics::default(),
    ));
    Proxy {
        addr,
        runtime,
        _stop: stop,
    }
}

/// `policy` for an upstream at `up`, with namespace `demo` (`demo.local`)
/// serving `demo_cert` and, if given, namespace `other` (`*.other.test`)
/// serving its own.
fn tls_policy(revision: u64, up: SocketAddr, demo_cert: &Leaf, other: Option<&Leaf>) -> Snapshot {
    let mut snapshot = policy_at(revision, &[("/", "web", &[up])], None);
    snapshot.insert(demo_cert.secret("demo/cert"));
    snapshot.insert(Resource::Namespace(Namespace {
        name: "demo".into(),
        hosts: vec!["demo.local".into()],
        tls_secret: "cert".into(),
        ..Default::default()
    }));
    if let Some(cert) = other {
        snapshot.insert(cert.secret("other/cert"));
        snapshot.insert(Resource::Namespace(Namespace {
            name: "other".into(),
            hosts: vec!["*.other.test".into()],
            tls_secret: "cert".into(),
            ..Default::default()
        }));
    }
    prism_proto::validate_snapshot(&snapshot).expect("valid policy");
    snapshot
}

fn client_config(roots: RootCertStore, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `addr` asking for `server_name`.
async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    TlsConnector::from(config).connect(name, tcp).await
}

/// The certificate the proxy presented on `stream`.
fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("certificates")[0]
        .clone()
}

/// An HTTP/1.1 connection over `stream`.
async fn http1(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http/1.1 handshake");
    tokio::spawn(connection);
    sender
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: &str,
) -> Response<Incoming> {
    let request = Request::get("/")
        .header(header::HOST, host)
        .body(Full::default())
        .expect("request");
    tokio::time::timeout(DEADLINE, sender.send_request(request))
        .await
        .expect("in time")
        .expect("response")
}

#[tokio::test]
async fn the_tls_listener_picks_each_namespaces_certificate_by_sni() {
    let ca = TestCa::new();
    let (demo, other) = (ca.issue(&["demo.local"]), ca.issue(&["*.other.test"]));
    let up = echo_upstream("web").await;
    let proxy = start_tls_proxy().await;
    proxy.apply(&tls_policy(1, up, &demo, Some(&other)));
    let config = client_config(ca.roots(), &[b"http/1.1"]);

    let stream = connect(proxy.addr, Arc::clone(&config), "demo.local")
        .await
        .expect("handshake");
    assert_eq!(presented(&stream), demo.der());
    let response = get(&mut http1(stream).await, "demo.local").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header_str(response.headers(), "x-upstream"), "web");
    assert_eq!(header_str(response.headers(), "x-seen-proto"), "https");

    let stream = connect(proxy.addr, Arc::clone(&config), "a.other.test")
        .await
        .expect("handshake");
    assert_eq!(presented(&stream), other.der());

    // No namespace answers for this host and none is the catch-all `*`.
    let refused = connect(proxy.addr, config, "unknown.test").await;
    assert!(refused.is_err(), "no certificate for unknown.test");
}

#[tokio::test]
async fn a_rotated_secret_reaches_new_handshakes_and_open_connections_stay() {
    let ca = TestCa::new();
    let (old, new) = (ca.issue(&["demo.local"]), ca.issue(&["demo.local"]));
    let up = echo_upstream("web").await;
    let proxy = start_tls_proxy().await;
    proxy.apply(&tls_policy(1, up, &old, None));
    let config = client_config(ca.roots(), &[b"http/1.1"]);
    let stream = connect(proxy.addr, Arc::clone(&config), "demo.local")
        .await
        .expect("handshake");
    assert_eq!(presented(&stream), old.der());
    let mut open = http1(stream).await;
    assert_eq!(get(&mut open, "demo.local").await.status(), StatusCode::OK);

    proxy.apply(&tls_policy(2, up, &new, None));

    // A fresh client, so the handshake is a full one rather than a resumption
    // of the session made with the old certificate.
    let config = client_config(ca.roots(), &[b"http/1.1"]);
    let stream = connect(proxy.addr, config, "demo.local")
        .await
        .expect("handshake");
    assert_eq!(presented(&stream), new.der());
    // The connection opened before the rotation still serves requests.
    assert_eq!(get(&mut open, "demo.local").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn alpn_h2_serves_http2_over_tls() {
    let ca = TestCa::new();
    let demo = ca.issue(&["demo.local"]);
    let up = echo_upstream("web").await;
    let proxy = start_tls_proxy().await;
    proxy.apply(&tls_policy(1, up, &demo, None));
    let config = client_config(ca.roots(), &[b"h2", b"http/1.1"]);
    let stream = connect(proxy.addr, config, "demo.local")
        .await
        .expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let request = Request::get("https://demo.local/")
        .body(Full::<Bytes>::default())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(header_str(response.headers(), "x-seen-proto"), "https");
}

/// A TLS upstream for `upstream.test` that requires a client certificate
/// signed by `ca`, answering with the HTTP version it saw: Prism's own TLS
/// listener, with a namespace that sets `require_client_certificate`.
pub(super) async fn mtls_upstream(ca: &TestCa) -> SocketAddr {
    let leaf = ca.issue(&["upstream.test"]);
    let snapshot = Snapshot::from_resources(
        1,
        [
            leaf.secret("upstream/cert"),
            ca.secret("upstream/clients"),
            Resource::Namespace(Namespace {
                name: "upstream".into(),
                hosts: vec!["upstream.test".into()],
                tls_secret: "cert".into(),
                client_ca_secret: "clients".into(),
                require_client_certificate: true,
                ..Default::default()
            }),
        ],
    );
    prism_proto::validate_snapshot(&snapshot).expect("valid policy");
    let runtime = Runtime::compile(
        &snapshot,
        &Runtime::unconfigured(),
        &OwnAddresses::default(),
    )
    .expect("compiles");
    let (listener, addr) = bind().await;
    let (stop, stopped) = watch::channel(false);
    let service = tower::service_fn(|request: Request<RequestBody>| async move {
        let version = format!("{:?}", request.version());
        Ok::<_, Infallible>(
            Response::builder()
                .header("x-seen-version", version)
                .body(boxed(Full::new(Bytes::from_static(b"secure"))))
                .expect("response"),
        )
    });
    let runtime = Arc::new(ArcSwap::from_pointee(runtime));
    tokio::spawn(async move {
        let _stop = stop;
        server::serve(listener, Some(runtime), params(), stopped, service).await;
    });
    addr
}

/// `policy` whose backend `web` speaks `protocol` over TLS to `up`.
pub(super) fn upstream_tls_policy(
    up: SocketAddr,
    protocol: Protocol,
    ca: &TestCa,
    client: Option<&Leaf>,
) -> Snapshot {
    let mut snapshot = policy(&[("/", "web", &[up])], None);
    snapshot.insert(ca.secret("demo/ca"));
    if let Some(client) = client {
        snapshot.insert(client.secret("demo/client"));
    }
    snapshot.insert(Resource::Backend(prism_proto::Backend {
        name: "demo/web".into(),
        protocol: protocol.into(),
        endpoints: vec![Endpoint {
            address: up.to_string(),
            ..Default::default()
        }],
        tls: Some(UpstreamTls {
            ca_secret: "ca".into(),
            sni: "upstream.test".into(),
            client_certificate_secret: if client.is_some() { "client" } else { "" }.into(),
        }),
        ..Default::default()
    }));
    prism_proto::validate_snapshot(&snapshot).expect("valid policy");
    snapshot
}

#[tokio::test]
async fn a_tls_backend_verifies_the_upstream_and_presents_its_client_certificate() {
    let ca = TestCa::new();
    let client = ca.issue(&["proxy.test"]);
    let up = mtls_upstream(&ca).await;
    let proxy = start_proxy().await;
    for (protocol, version) in [(Protocol::Http1, "HTTP/1.1"), (Protocol::Http2, "HTTP/2.0")] {
        proxy.apply(&upstream_tls_policy(up, protocol, &ca, Some(&client)));
        let (status, headers, body) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "secure"));
        assert_eq!(header_str(&headers, "x-seen-version"), version);
    }
}

#[tokio::test]
async fn a_tls_backend_fails_without_its_client_certificate_or_with_another_ca() {
    let ca = TestCa::new();
    let up = mtls_upstream(&ca).await;
    let proxy = start_proxy().await;
    proxy.apply(&upstream_tls_policy(up, Protocol::Http1, &ca, None));
    let (status, _, _) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    let stranger = TestCa::new();
    let client = stranger.issue(&["proxy.test"]);
    proxy.apply(&upstream_tls_policy(
        up,
        Protocol::Http1,
        &stranger,
        Some(&client),
    ));
    let (status, _, _) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
}
