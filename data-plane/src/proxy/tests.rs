use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use prism_proto::pb::config::v1::{Endpoint, Namespace, Route, RouteMatch, route_match};
use prism_proto::{Resource, Snapshot};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::*;

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

async fn start_proxy() -> Proxy {
    let (listener, addr) = bind().await;
    let runtime = Arc::new(ArcSwap::from_pointee(Runtime::unconfigured()));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve(listener, Arc::clone(&runtime), stopped));
    Proxy {
        addr,
        runtime,
        _stop: stop,
    }
}

impl Proxy {
    fn apply(&self, snapshot: &Snapshot) {
        let next = Runtime::compile(snapshot, &self.runtime.load()).expect("compiles");
        self.runtime.store(Arc::new(next));
    }
}

/// An upstream that echoes the request body and reports what it saw in headers.
async fn echo_upstream(name: &'static str) -> SocketAddr {
    let (listener, addr) = bind().await;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        let _stop = stop;
        server::serve(
            listener,
            stopped,
            move |request: Request<Incoming>, _| async move {
                let seen = |h: &str| {
                    request
                        .headers()
                        .get(h)
                        .cloned()
                        .unwrap_or(HeaderValue::from_static(""))
                };
                let mut response = Response::builder()
                    .header("x-upstream", name)
                    .header("x-seen-host", seen("host"))
                    .header("x-seen-xff", seen("x-forwarded-for"))
                    .header("x-seen-proto", seen("x-forwarded-proto"))
                    .header("x-seen-path", request.uri().to_string())
                    .header("x-seen-connection", seen("connection"))
                    .header("connection", "keep-alive");
                if request.headers().contains_key("keep-alive") {
                    response = response.header("x-seen-keep-alive", "yes");
                }
                response
                    .body(request.into_body().boxed_unsync())
                    .expect("response")
            },
        )
        .await;
    });
    addr
}

/// A port nothing listens on.
async fn dead_port() -> SocketAddr {
    let (listener, addr) = bind().await;
    drop(listener);
    addr
}

fn policy(routes: &[(&str, &str, &[SocketAddr])], timeout: Option<Duration>) -> Snapshot {
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
    let snapshot = Snapshot::from_resources(1, resources);
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

#[tokio::test]
async fn answers_503_before_the_first_configuration() {
    let proxy = start_proxy().await;
    let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "no configuration yet\n");
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
async fn h2c_clients_are_served_and_keep_their_authority() {
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "web", &[web])], None));
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(connection);
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
async fn response_body_streams_without_buffering() {
    let (listener, upstream) = bind().await;
    let (chunks, chunk_rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
    let chunk_rx = Arc::new(Mutex::new(Some(chunk_rx)));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(server::serve(listener, stopped, move |_request, _| {
        let chunk_rx = Arc::clone(&chunk_rx);
        async move {
            let rx = chunk_rx.lock().await.take().expect("one request");
            Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed_unsync())
        }
    }));
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
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
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
    drop(stop);
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
    let (listener, slow) = bind().await;
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(server::serve(listener, stopped, |_request, _| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(server::full("late"))
    }));
    let proxy = start_proxy().await;
    proxy.apply(&policy(
        &[("/", "web", &[slow])],
        Some(Duration::from_millis(200)),
    ));
    let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "upstream request timeout\n");
}
