//! The proxy's request path end to end: a real listener, real upstreams and
//! a runtime stored the way the discovery client stores it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prism_proto::pb::config::v1::{
    Endpoint, Namespace, RateLimit, RetryPolicy, Route, RouteMatch, route_match,
};
use prism_proto::{Resource, Snapshot};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::body::RequestBody;
use super::server::ClientAddr;
use super::*;
use crate::runtime::OwnAddresses;

mod grpc;
mod lifecycle;
mod protocols;
mod tls;

/// How long any wait in these tests may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, error::BoxError>;

/// A running proxy; dropping it stops the server.
struct Proxy {
    addr: SocketAddr,
    runtime: Arc<ArcSwap<Runtime>>,
    _stop: watch::Sender<bool>,
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

fn params() -> server::Params {
    server::Params {
        limits: crate::Limits::default(),
    }
}

async fn start_proxy() -> Proxy {
    start_proxy_with(params()).await
}

async fn start_proxy_with(params: server::Params) -> Proxy {
    let (listener, addr) = bind().await;
    let runtime = Arc::new(ArcSwap::from_pointee(Runtime::unconfigured()));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve(
        listener,
        Arc::clone(&runtime),
        params,
        stopped,
        ListenerMetrics::default(),
    ));
    Proxy {
        addr,
        runtime,
        _stop: stop,
    }
}

impl Proxy {
    fn apply(&self, snapshot: &Snapshot) {
        let next = Runtime::compile(snapshot, &self.runtime.load(), &OwnAddresses::default())
            .expect("compiles");
        self.runtime.store(Arc::new(next));
    }
}

/// An upstream that answers its one request at once with a body sent chunk
/// by chunk through the returned channel (of `capacity`): a test controls
/// when the body moves, stalls or ends.
async fn streaming_upstream(
    capacity: usize,
) -> (SocketAddr, mpsc::Sender<Result<Frame<Bytes>, Infallible>>) {
    let (chunks, chunk_rx) = mpsc::channel(capacity);
    let chunk_rx = Arc::new(Mutex::new(Some(chunk_rx)));
    let addr = upstream(move |_request: Request<RequestBody>| {
        let chunk_rx = Arc::clone(&chunk_rx);
        async move {
            let rx = chunk_rx.lock().await.take().expect("one request");
            Response::new(boxed(StreamBody::new(ReceiverStream::new(rx))))
        }
    })
    .await;
    (addr, chunks)
}

/// An upstream answering every request with `handler`; it runs until the test ends.
async fn upstream<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<RequestBody>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<BoxBody>> + Send + 'static,
{
    let (listener, addr) = bind().await;
    let (stop, stopped) = watch::channel(false);
    let service = tower::service_fn(move |request| {
        let response = handler(request);
        async move { Ok::<_, Infallible>(response.await) }
    });
    tokio::spawn(async move {
        let _stop = stop;
        server::serve(listener, None, params(), stopped, service).await;
    });
    addr
}

fn boxed<B>(body: B) -> BoxBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<error::BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// An upstream that echoes the request body and reports what it saw in headers.
async fn echo_upstream(name: &'static str) -> SocketAddr {
    upstream(move |request: Request<RequestBody>| async move {
        let seen = |h: &str| {
            request
                .headers()
                .get(h)
                .cloned()
                .unwrap_or(HeaderValue::from_static(""))
        };
        let peer = request
            .extensions()
            .get::<ClientAddr>()
            .map(|c| c.0.to_string())
            .unwrap_or_default();
        let mut response = Response::builder()
            .header("x-upstream", name)
            .header("x-seen-host", seen("host"))
            .header("x-seen-xff", seen("x-forwarded-for"))
            .header("x-seen-proto", seen("x-forwarded-proto"))
            .header("x-seen-path", request.uri().to_string())
            .header("x-seen-connection", seen("connection"))
            .header("x-seen-hop", seen("x-hop"))
            .header("x-seen-te", seen("te"))
            .header("x-seen-peer", peer)
            .header("connection", "keep-alive");
        if request.headers().contains_key("keep-alive") {
            response = response.header("x-seen-keep-alive", "yes");
        }
        response.body(boxed(request.into_body())).expect("response")
    })
    .await
}

/// A port nothing listens on.
async fn dead_port() -> SocketAddr {
    let (listener, addr) = bind().await;
    drop(listener);
    addr
}

fn policy(routes: &[(&str, &str, &[SocketAddr])], timeout: Option<Duration>) -> Snapshot {
    policy_at(1, routes, timeout)
}

fn policy_at(
    revision: u64,
    routes: &[(&str, &str, &[SocketAddr])],
    timeout: Option<Duration>,
) -> Snapshot {
    let mut resources = vec![Resource::Namespace(Namespace {
        name: "demo".into(),
        hosts: vec!["demo.local".into()],
        ..Default::default()
    })];
    for (i, (prefix, backend, endpoints)) in routes.iter().enumerate() {
        resources.push(Resource::Backend(prism_proto::Backend {
            name: format!("demo/{backend}"),
            endpoints: endpoints
                .iter()
                .map(|a| Endpoint {
                    address: a.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }));
        resources.push(Resource::Route(Route {
            name: format!("demo/r{i}"),
            r#match: Some(RouteMatch {
                host: String::new(),
                path: Some(route_match::Path::Prefix(prefix.to_string())),
                ..Default::default()
            }),
            backend: backend.to_string(),
            timeout: timeout.map(|t| pbjson_types::Duration {
                seconds: 0,
                nanos: i32::try_from(t.as_nanos()).expect("short timeout"),
            }),
            ..Default::default()
        }));
    }
    let snapshot = Snapshot::from_resources(revision, resources);
    prism_proto::validate_snapshot(&snapshot).expect("valid policy");
    snapshot
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    proxy: &Proxy,
    host: &str,
    path: &str,
    body: &'static str,
) -> (StatusCode, HeaderMap, String) {
    let request = Request::post(format!("http://{}{path}", proxy.addr))
        .header(header::HOST, host)
        .header("keep-alive", "timeout=5")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request");
    let response = client().request(request).await.expect("response");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// An HTTP/2 (prior knowledge) connection to the proxy, sending bodies of `B`.
async fn h2c<B>(proxy: &Proxy) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(connection);
    sender
}

#[tokio::test]
async fn answers_503_before_the_first_configuration() {
    let proxy = start_proxy().await;
    let (status, headers, body) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "no configuration yet\n");
    assert_eq!(header_str(&headers, "via"), "1.1 prism");
}

#[tokio::test]
async fn forwards_to_the_matching_upstream() {
    let (web, api) = (echo_upstream("web").await, echo_upstream("api").await);
    let proxy = start_proxy().await;
    proxy.apply(&policy(
        &[("/", "web", &[web]), ("/api/", "api", &[api])],
        None,
    ));

    let (status, headers, body) = send(&proxy, "Demo.Local:8080", "/api/v1?x=1", "hello").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header_str(&headers, "x-upstream"), "api");
    assert_eq!(body, "hello");
    assert_eq!(header_str(&headers, "x-seen-host"), "Demo.Local:8080");
    assert_eq!(header_str(&headers, "x-seen-path"), "/api/v1?x=1");
    assert_eq!(header_str(&headers, "x-seen-xff"), "127.0.0.1");
    assert_eq!(header_str(&headers, "x-seen-proto"), "http");
    assert!(
        !headers.contains_key("x-seen-keep-alive"),
        "hop-by-hop header forwarded"
    );
    assert_eq!(header_str(&headers, "via"), "1.1 prism");
    assert!(
        !headers.contains_key("connection"),
        "hop-by-hop header returned"
    );

    let (_, headers, _) = send(&proxy, "demo.local", "/index.html", "").await;
    assert_eq!(header_str(&headers, "x-upstream"), "web");
}

#[tokio::test]
async fn headers_named_in_connection_are_not_forwarded() {
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "web", &[web])], None));
    let request = Request::get(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .header(header::CONNECTION, "x-hop")
        .header("x-hop", "for this hop only")
        .header(header::TE, "trailers")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client().request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(
        header_str(headers, "x-seen-hop"),
        "",
        "named header forwarded"
    );
    // hyper's client pool adds nothing here, so the upstream saw no Connection.
    assert_eq!(header_str(headers, "x-seen-connection"), "");
    // `te: trailers` is for HTTP/2 upstreams only.
    assert_eq!(header_str(headers, "x-seen-te"), "");
}

#[tokio::test]
async fn round_robins_across_endpoints() {
    let (a, b) = (echo_upstream("a").await, echo_upstream("b").await);
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "web", &[a, b])], None));
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (_, headers, _) = send(&proxy, "demo.local", "/", "").await;
        seen.push(header_str(&headers, "x-upstream").to_string());
    }
    assert_eq!(seen, ["a", "b", "a", "b"]);
}

#[tokio::test]
async fn an_unchanged_backend_keeps_its_pooled_connection_across_applies() {
    let (web, api) = (echo_upstream("web").await, echo_upstream("api").await);
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "web", &[web])], None));
    let (_, first, _) = send(&proxy, "demo.local", "/", "").await;
    // A new revision that adds a route and backend but leaves `web` alone.
    proxy.apply(&policy_at(
        2,
        &[("/", "web", &[web]), ("/api/", "api", &[api])],
        None,
    ));
    let (_, second, _) = send(&proxy, "demo.local", "/", "").await;
    let peer = |h: &HeaderMap| header_str(h, "x-seen-peer").to_string();
    assert!(!peer(&first).is_empty());
    assert_eq!(peer(&first), peer(&second), "the pool was not kept");
}

#[tokio::test]
async fn h2c_clients_are_served_and_keep_their_authority() {
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "web", &[web])], None));
    let mut sender = h2c(&proxy).await;
    let request = Request::post("http://demo.local/h2")
        .body(Full::new(Bytes::from_static(b"over h2")))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(header_str(response.headers(), "x-upstream"), "web");
    assert_eq!(header_str(response.headers(), "x-seen-host"), "demo.local");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, "over h2");
}

#[tokio::test]
async fn grpc_callers_get_errors_as_grpc_statuses() {
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/app/", "web", &[dead_port().await])], None));
    let mut sender = h2c(&proxy).await;
    let call = |path: &str| {
        Request::post(format!("http://demo.local{path}"))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    for (path, code, message) in [
        (
            "/pkg.Svc/Call",
            "12",
            "no route for host demo.local path /pkg.Svc/Call",
        ),
        ("/app/Call", "14", "upstream connect error"),
    ] {
        let response = sender.send_request(call(path)).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let headers = response.headers();
        assert_eq!(header_str(headers, "grpc-status"), code, "{path}");
        assert_eq!(header_str(headers, "grpc-message"), message, "{path}");
        assert!(response.body().is_end_stream(), "trailers-only: no body");
    }
}

#[tokio::test]
async fn response_body_streams_without_buffering() {
    let (upstream, chunks) = streaming_upstream(1).await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "web", &[upstream])], None));

    let request = Request::get(format!("http://{}/stream", proxy.addr))
        .header(header::HOST, "demo.local")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = tokio::spawn(client().request(request));
    chunks
        .send(Ok(Frame::data(Bytes::from_static(b"first"))))
        .await
        .expect("send");
    let mut body = response.await.expect("task").expect("response").into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("first chunk arrives before the upstream finishes")
        .expect("frame")
        .expect("data");
    assert_eq!(first.into_data().expect("data"), "first");
    chunks
        .send(Ok(Frame::data(Bytes::from_static(b"second"))))
        .await
        .expect("send");
    drop(chunks);
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(rest, "second");
}

#[tokio::test]
async fn unknown_host_or_path_is_404() {
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/app/", "web", &[web])], None));
    let (status, headers, body) = send(&proxy, "other.local", "/x", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "no route for host other.local path /x\n");
    assert!(header_str(&headers, "content-type").starts_with("text/plain"));
    let (status, _, body) = send(&proxy, "demo.local", "/x", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "no route for host demo.local path /x\n");
}

#[tokio::test]
async fn closed_upstream_port_is_502() {
    let dead = dead_port().await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "web", &[dead])], None));
    let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body, "upstream connect error\n");
}

#[tokio::test]
async fn slow_upstream_is_504_after_the_route_timeout() {
    let slow = upstream(|_request| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(boxed(Full::new(Bytes::from_static(b"late"))))
    })
    .await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(
        &[("/", "web", &[slow])],
        Some(Duration::from_millis(200)),
    ));
    let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "upstream request timeout\n");
}

#[tokio::test]
async fn the_route_timeout_starts_once_the_request_has_been_received() {
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(
        &[("/", "web", &[web])],
        Some(Duration::from_millis(300)),
    ));
    let (chunks, chunk_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let request = Request::post(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .body(StreamBody::new(ReceiverStream::new(chunk_rx)))
        .expect("request");
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::spawn(client.request(request));
    // The upload takes twice the route timeout; as with Envoy, the timer only
    // starts once it is complete, and the echoed response then finishes.
    for chunk in ["a", "b", "c", "d"] {
        tokio::time::sleep(Duration::from_millis(150)).await;
        chunks
            .send(Ok(Frame::data(Bytes::from(chunk))))
            .await
            .expect("send");
    }
    drop(chunks);
    let response = tokio::time::timeout(DEADLINE, response)
        .await
        .expect("in time")
        .expect("task")
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the body is not cut")
        .to_bytes();
    assert_eq!(body, "abcd");
}

#[tokio::test]
async fn the_route_timeout_cuts_a_body_that_is_still_streaming() {
    // The head and a first chunk come at once; the rest never does.
    let (stalls, chunks) = streaming_upstream(4).await;
    chunks
        .send(Ok(Frame::data(Bytes::from_static(b"start"))))
        .await
        .expect("send");
    let proxy = start_proxy().await;
    proxy.apply(&policy(
        &[("/", "web", &[stalls])],
        Some(Duration::from_millis(300)),
    ));
    let request = Request::get(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client().request(request).await.expect("response head");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.expect("frame").expect("data");
    assert_eq!(first.into_data().expect("data"), "start");
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("the body ends by the route timeout");
    assert!(rest.is_err(), "a cut body is an error, not a clean end");
    drop(chunks);
}

/// Reads until the proxy closes the connection, failing after [`DEADLINE`].
async fn closed_by_proxy(mut stream: TcpStream) -> Duration {
    use tokio::io::AsyncReadExt;
    let start = tokio::time::Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut sink))
        .await
        .expect("the proxy closes the connection")
        .ok();
    start.elapsed()
}

#[tokio::test]
async fn a_client_that_dribbles_its_headers_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let limit = Duration::from_millis(200);
    let proxy = start_proxy_with(server::Params {
        limits: crate::Limits {
            header_read_timeout: limit,
            ..Default::default()
        },
    })
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream.write_all(b"GET / HT").await.expect("write");
    assert!(closed_by_proxy(stream).await >= limit);
    // One that sends nothing at all is cut off too.
    let silent = TcpStream::connect(proxy.addr).await.expect("connect");
    assert!(closed_by_proxy(silent).await >= limit);
}

/// `snapshot` with route `name` changed by `edit`.
fn edit_route(snapshot: &mut Snapshot, name: &str, edit: impl FnOnce(&mut Route)) {
    let key = prism_proto::ResourceKey::new(prism_proto::Kind::Route, name);
    let Some(Resource::Route(mut route)) = snapshot.get(&key).map(|e| e.resource.clone()) else {
        panic!("no route {name}");
    };
    edit(&mut route);
    snapshot.insert(Resource::Route(route));
    prism_proto::validate_snapshot(snapshot).expect("valid policy");
}

/// `snapshot` with namespace `demo` changed by `edit`.
fn edit_namespace(snapshot: &mut Snapshot, edit: impl FnOnce(&mut Namespace)) {
    let key = prism_proto::ResourceKey::new(prism_proto::Kind::Namespace, "demo");
    let Some(Resource::Namespace(mut ns)) = snapshot.get(&key).map(|e| e.resource.clone()) else {
        panic!("no namespace demo");
    };
    edit(&mut ns);
    snapshot.insert(Resource::Namespace(ns));
    prism_proto::validate_snapshot(snapshot).expect("valid policy");
}

fn rate_limit(per_second: u32, burst: u32, per_client_ip: bool) -> RateLimit {
    RateLimit {
        requests_per_second: per_second,
        burst,
        per_client_ip,
    }
}

#[tokio::test]
async fn a_route_rate_limit_answers_429_with_retry_after_and_grpc_resource_exhausted() {
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    let mut snapshot = policy(&[("/", "web", &[web])], None);
    edit_route(&mut snapshot, "demo/r0", |r| {
        r.rate_limits = vec![rate_limit(1, 2, false)];
    });
    proxy.apply(&snapshot);

    for _ in 0..2 {
        let (status, headers, _) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(header_str(&headers, "x-upstream"), "web");
    }
    let (status, headers, body) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header_str(&headers, "retry-after"), "1");
    assert_eq!(body, "rate limited\n");
    assert!(!headers.contains_key("x-upstream"), "reached the upstream");

    let request = Request::post(format!("http://{}/pkg.Svc/Call", proxy.addr))
        .header(header::HOST, "demo.local")
        .header(header::CONTENT_TYPE, "application/grpc")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client().request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header_str(response.headers(), "grpc-status"), "8");
    assert_eq!(
        header_str(response.headers(), "grpc-message"),
        "rate limited"
    );
}

#[tokio::test]
async fn a_namespace_rate_limit_is_shared_by_its_routes_and_survives_applies() {
    let (web, api) = (echo_upstream("web").await, echo_upstream("api").await);
    let proxy = start_proxy().await;
    let limited = |revision, api_endpoints: &[SocketAddr]| {
        let mut snapshot = policy_at(
            revision,
            &[("/", "web", &[web]), ("/api/", "api", api_endpoints)],
            None,
        );
        edit_namespace(&mut snapshot, |ns| {
            ns.rate_limits = vec![rate_limit(1, 1, false)];
        });
        snapshot
    };
    proxy.apply(&limited(1, &[api]));
    let (status, _, _) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(&proxy, "demo.local", "/api/x", "").await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "one bucket per namespace"
    );
    // A change elsewhere in the policy leaves the namespace's bucket as it was.
    proxy.apply(&limited(2, &[api, web]));
    let (status, _, _) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the bucket was refilled"
    );
}

#[tokio::test]
async fn a_per_client_ip_limit_keeps_a_bucket_per_address() {
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    let mut snapshot = policy(&[("/", "web", &[web])], None);
    edit_route(&mut snapshot, "demo/r0", |r| {
        r.rate_limits = vec![rate_limit(1, 1, true)];
    });
    proxy.apply(&snapshot);
    let from = |ip: [u8; 4]| {
        let mut connector = HttpConnector::new();
        connector.set_local_address(Some(std::net::IpAddr::from(ip)));
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        let request = Request::get(format!("http://{}/", proxy.addr))
            .header(header::HOST, "demo.local")
            .body(Full::new(Bytes::new()))
            .expect("request");
        async move { client.request(request).await.expect("response").status() }
    };
    assert_eq!(from([127, 0, 0, 1]).await, StatusCode::OK);
    assert_eq!(from([127, 0, 0, 1]).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(from([127, 0, 0, 2]).await, StatusCode::OK, "another client");
}

/// An upstream that reads the whole request body before it answers with its length.
async fn counting_upstream() -> SocketAddr {
    upstream(|request: Request<RequestBody>| async move {
        let length = match request.into_body().collect().await {
            Ok(body) => body.to_bytes().len().to_string(),
            Err(_) => "broken".to_string(),
        };
        Response::new(boxed(Full::new(Bytes::from(length))))
    })
    .await
}

#[tokio::test]
async fn a_body_over_the_route_limit_gets_413() {
    let web = counting_upstream().await;
    let proxy = start_proxy().await;
    let mut snapshot = policy(&[("/", "web", &[web])], None);
    edit_route(&mut snapshot, "demo/r0", |r| r.max_request_body_bytes = 4);
    proxy.apply(&snapshot);

    let (status, _, body) = send(&proxy, "demo.local", "/", "four").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "4"));
    // Announced by content-length: refused before anything goes upstream.
    let (status, _, body) = send(&proxy, "demo.local", "/", "fives").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body, "request body too large\n");

    // Streamed without a length: refused once it crosses the limit.
    let (chunks, chunk_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let request = Request::post(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .body(StreamBody::new(ReceiverStream::new(chunk_rx)))
        .expect("request");
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::spawn(client.request(request));
    for chunk in ["abc", "def"] {
        // The proxy may stop reading once it has refused the body.
        let _ = chunks.send(Ok(Frame::data(Bytes::from(chunk)))).await;
    }
    drop(chunks);
    let response = tokio::time::timeout(DEADLINE, response)
        .await
        .expect("in time")
        .expect("task")
        .expect("response");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

/// An upstream that answers `503` to its first `failures` requests, then
/// like [`echo_upstream`]; it counts the requests it saw.
async fn flaky_upstream(
    name: &'static str,
    failures: usize,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let addr = upstream(move |request: Request<RequestBody>| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let status = if n < failures {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            Response::builder()
                .status(status)
                .header("x-upstream", name)
                .body(boxed(request.into_body()))
                .expect("response")
        }
    })
    .await;
    (addr, seen)
}

fn retrying(endpoints: &[SocketAddr], edit: impl FnOnce(&mut RetryPolicy)) -> Snapshot {
    let mut snapshot = policy(&[("/", "web", endpoints)], None);
    edit_route(&mut snapshot, "demo/r0", |r| {
        let mut retry = RetryPolicy {
            num_retries: 2,
            retry_on: vec!["5xx".into()],
            base_interval: Some(pbjson_types::Duration {
                seconds: 0,
                nanos: 1_000_000,
            }),
            ..Default::default()
        };
        edit(&mut retry);
        r.retry = Some(retry);
    });
    snapshot
}

#[tokio::test]
async fn a_failed_try_is_retried_on_another_endpoint() {
    let (bad, bad_seen) = flaky_upstream("bad", usize::MAX).await;
    let (good, good_seen) = flaky_upstream("good", 0).await;
    let proxy = start_proxy().await;
    proxy.apply(&retrying(&[bad, good], |_| {}));
    for _ in 0..2 {
        let request = Request::put(format!("http://{}/", proxy.addr))
            .header(header::HOST, "demo.local")
            .body(Full::new(Bytes::from_static(b"payload")))
            .expect("request");
        let response = client().request(request).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header_str(response.headers(), "x-upstream"), "good");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, "payload", "the body was replayed");
    }
    let count = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(count(&good_seen), 2);
    assert!(
        count(&bad_seen) >= 1,
        "round robin sent one try to the bad endpoint"
    );
    assert!(
        count(&bad_seen) <= 2,
        "a retry went back to the bad endpoint"
    );
}

#[tokio::test]
async fn a_flaky_upstream_succeeds_within_the_retries() {
    let (web, seen) = flaky_upstream("web", 2).await;
    let proxy = start_proxy().await;
    proxy.apply(&retrying(&[web], |_| {}));
    let (status, _, _) = send_get(&proxy).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_post_is_retried_only_when_the_route_allows_it() {
    let (web, seen) = flaky_upstream("web", 1).await;
    let proxy = start_proxy().await;
    proxy.apply(&retrying(&[web], |_| {}));
    let (status, _, _) = send(&proxy, "demo.local", "/", "order").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);

    let (web, seen) = flaky_upstream("web", 1).await;
    proxy.apply(&retrying(&[web], |r| r.retry_non_idempotent = true));
    let (status, _, body) = send(&proxy, "demo.local", "/", "order").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "order"));
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
}

async fn send_get(proxy: &Proxy) -> (StatusCode, HeaderMap, String) {
    let request = Request::get(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client().request(request).await.expect("response");
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm() {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    // An outage: every answer is a slow 503, so tries overlap.
    let web = upstream(move |_request: Request<RequestBody>| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(boxed(Full::new(Bytes::new())))
                .expect("response")
        }
    })
    .await;
    let proxy = start_proxy().await;
    proxy.apply(&retrying(&[web], |r| {
        r.num_retries = 3;
        r.budget_percent = 1;
        r.min_retry_concurrency = 1;
    }));
    let requests: Vec<_> = (0..10)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let request = Request::get(format!("http://{addr}/"))
                    .header(header::HOST, "demo.local")
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                client().request(request).await.expect("response").status()
            })
        })
        .collect();
    for request in requests {
        let status = tokio::time::timeout(DEADLINE, request)
            .await
            .expect("in time")
            .expect("task");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    // Without a budget 10 requests would make 40 tries; with one retry in
    // flight at a time, about 10 + 3.
    let tries = seen.load(std::sync::atomic::Ordering::SeqCst);
    assert!(tries <= 16, "{tries} tries");
    let runtime = proxy.runtime.load();
    let backend = runtime.backend("demo/web").expect("backend");
    assert!(backend.retry_budget.is_idle(), "the budget leaked");
}

#[tokio::test]
async fn a_try_slower_than_per_try_timeout_is_retried() {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    // The first try hangs far past the per-try timeout; the second is quick.
    let web = upstream(move |_request: Request<RequestBody>| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n == 0 {
                tokio::time::sleep(DEADLINE).await;
            }
            Response::new(boxed(Full::new(Bytes::from_static(b"quick"))))
        }
    })
    .await;
    let proxy = start_proxy().await;
    proxy.apply(&retrying(&[web], |r| {
        r.per_try_timeout = Some(pbjson_types::Duration {
            seconds: 0,
            nanos: 100_000_000,
        });
    }));
    let (status, _, body) = tokio::time::timeout(DEADLINE / 2, send_get(&proxy))
        .await
        .expect("in time");
    assert_eq!((status, body.as_str()), (StatusCode::OK, "quick"));
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_response_idle_past_the_idle_timeout_is_cut() {
    // The head and one chunk come at once, then the body stalls.
    let (web, chunks) = streaming_upstream(4).await;
    chunks
        .send(Ok(Frame::data(Bytes::from_static(b"first"))))
        .await
        .expect("send");
    let proxy = start_proxy().await;
    let mut snapshot = policy(&[("/", "web", &[web])], None);
    edit_route(&mut snapshot, "demo/r0", |r| {
        r.idle_timeout = Some(pbjson_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        });
    });
    proxy.apply(&snapshot);
    let request = Request::get(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client().request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(DEADLINE, response.into_body().collect())
        .await
        .expect("cut in time, long before the route timeout");
    assert!(body.is_err(), "the stalled body was not cut");
    drop(chunks);
}

#[tokio::test]
async fn a_request_body_still_streaming_keeps_the_idle_timeout_off() {
    // Answers at once with a body that never moves, and drains the request.
    let web = upstream(|request: Request<RequestBody>| async move {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        tokio::spawn(async move {
            let _tx = tx;
            let _ = request.into_body().collect().await;
            tokio::time::sleep(DEADLINE).await;
        });
        Response::new(boxed(StreamBody::new(ReceiverStream::new(rx))))
    })
    .await;
    let proxy = start_proxy().await;
    let mut snapshot = policy(&[("/", "web", &[web])], None);
    edit_route(&mut snapshot, "demo/r0", |r| {
        r.idle_timeout = Some(pbjson_types::Duration {
            seconds: 0,
            nanos: 300_000_000,
        });
    });
    proxy.apply(&snapshot);
    let (chunks, chunk_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let request = Request::post(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .body(StreamBody::new(ReceiverStream::new(chunk_rx)))
        .expect("request");
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.expect("response");
    let started = tokio::time::Instant::now();
    let body = tokio::spawn(response.into_body().collect());
    // The upload moves every 100 ms for 900 ms: three idle timeouts' worth.
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        chunks
            .send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .expect("send");
    }
    let result = tokio::time::timeout(DEADLINE, body)
        .await
        .expect("cut in time")
        .expect("task");
    assert!(result.is_err(), "the stalled body was not cut");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut while the request was still moving"
    );
    drop(chunks);
}

mod backends;
mod health;
mod pool;
mod routing;
mod upstream_h1;
