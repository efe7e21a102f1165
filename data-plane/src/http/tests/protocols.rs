//! HTTP/1.1 protocol promises through the real proxy: WebSocket (`Upgrade`)
//! pass-through, `Expect: 100-continue`, the TLS handshake bound, and a host
//! rewrite seen by an HTTP/2 upstream.

use futures::{SinkExt, StreamExt};
use prism_proto::pb::config::v1::{Protocol, Rewrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use super::*;

/// A WebSocket upstream echoing every text and binary message; it reports on
/// `closed` when a connection's close handshake is done.
async fn websocket_echo_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let (listener, addr) = bind().await;
    let (closed, closed_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream)
                    .await
                    .expect("websocket handshake");
                // tungstenite answers a close frame itself; the stream then ends.
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        break;
                    }
                }
                let _ = closed.send(());
            });
        }
    });
    (addr, closed_rx)
}

/// `policy` for `/` to `up`, with a route timeout and optionally an idle timeout.
fn timed_policy(up: SocketAddr, timeout: Duration, idle: Option<Duration>) -> Snapshot {
    let mut snapshot = policy(&[("/", "web", &[up])], Some(timeout));
    edit_route(&mut snapshot, "demo/r0", |r| {
        r.idle_timeout = idle.map(|idle| pbjson_types::Duration {
            seconds: 0,
            nanos: i32::try_from(idle.as_nanos()).expect("short"),
        });
    });
    snapshot
}

type WebSocket = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A WebSocket client connected through the proxy to `ws://demo.local/chat`.
async fn websocket(proxy: &Proxy) -> WebSocket {
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (ws, response) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::client_async("ws://demo.local/chat", stream),
    )
    .await
    .expect("in time")
    .expect("websocket handshake through the proxy");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(header_str(response.headers(), "via"), "1.1 prism");
    ws
}

async fn echoed(ws: &mut WebSocket, message: Message) {
    ws.send(message.clone()).await.expect("send");
    let answer = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("echo in time")
        .expect("open")
        .expect("message");
    assert_eq!(answer, message);
}

#[tokio::test]
async fn websocket_frames_pass_both_ways_and_outlive_the_route_timeout() {
    let (up, mut closed) = websocket_echo_upstream().await;
    let proxy = start_proxy().await;
    let timeout = Duration::from_millis(200);
    proxy.apply(&timed_policy(up, timeout, None));
    let mut ws = websocket(&proxy).await;
    echoed(&mut ws, Message::text("hello")).await;
    echoed(&mut ws, Message::binary(vec![0u8, 1, 2, 254, 255])).await;
    // Past the route timeout the upgraded stream is still open: the timeout
    // bounds the HTTP response, which the 101 was.
    tokio::time::sleep(timeout * 2).await;
    echoed(&mut ws, Message::text("still here")).await;
    ws.close(None).await.expect("close");
    // The upstream's close frame comes back, then the stream ends.
    let rest: Vec<_> = tokio::time::timeout(DEADLINE, ws.collect())
        .await
        .expect("closed in time");
    assert!(
        matches!(rest.as_slice(), [Ok(Message::Close(_))]),
        "{rest:?}"
    );
    tokio::time::timeout(DEADLINE, closed.recv())
        .await
        .expect("the upstream saw the close in time")
        .expect("upstream running");
}

#[tokio::test]
async fn an_upgraded_stream_idle_past_the_idle_timeout_is_closed() {
    let (up, mut closed) = websocket_echo_upstream().await;
    let proxy = start_proxy().await;
    let idle = Duration::from_millis(200);
    proxy.apply(&timed_policy(up, Duration::from_secs(2), Some(idle)));
    let mut ws = websocket(&proxy).await;
    // Bytes last moved during this exchange, after `quiet` began.
    let quiet = tokio::time::Instant::now();
    echoed(&mut ws, Message::text("hello")).await;
    // The proxy closes both sides: the client's stream ends without a close
    // frame, and so does the upstream's.
    let end = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("closed in time");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    assert!(quiet.elapsed() >= idle, "closed before the idle timeout");
    tokio::time::timeout(DEADLINE, closed.recv())
        .await
        .expect("the upstream side closed in time")
        .expect("upstream running");
}

#[tokio::test]
async fn an_upgrade_refused_by_the_upstream_is_an_ordinary_response() {
    // The echo upstream answers an upgrade request as a plain one.
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "web", &[web])], None));
    let request = Request::get(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client().request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    // The upstream was asked to switch: Upgrade and Connection reached it.
    assert_eq!(
        header_str(response.headers(), "x-seen-connection"),
        "upgrade"
    );
}

#[tokio::test]
async fn an_http2_backend_gets_an_upgrade_request_without_the_upgrade() {
    let up = upstream(|request: Request<RequestBody>| async move {
        let upgrade = request.headers().get(header::UPGRADE).cloned();
        Response::builder()
            .header("x-seen-version", format!("{:?}", request.version()))
            .header(
                "x-seen-upgrade",
                upgrade.unwrap_or(HeaderValue::from_static("")),
            )
            .body(boxed(Full::new(Bytes::new())))
            .expect("response")
    })
    .await;
    let proxy = start_proxy().await;
    proxy.apply(&http2_backend(policy(&[("/", "web", &[up])], None)));
    let request = Request::get(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client().request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header_str(response.headers(), "x-seen-version"), "HTTP/2.0");
    assert_eq!(header_str(response.headers(), "x-seen-upgrade"), "");
}

/// `snapshot` with backend `demo/web` speaking HTTP/2.
fn http2_backend(mut snapshot: Snapshot) -> Snapshot {
    let key = prism_proto::ResourceKey::new(prism_proto::Kind::Backend, "demo/web");
    let Some(Resource::Backend(mut backend)) = snapshot.get(&key).map(|e| e.resource.clone())
    else {
        panic!("no backend demo/web");
    };
    backend.protocol = Protocol::Http2.into();
    snapshot.insert(Resource::Backend(backend));
    snapshot
}

/// An upstream that reads the whole body, then answers with it and with the
/// `expect` header it saw.
async fn expect_upstream() -> SocketAddr {
    upstream(|request: Request<RequestBody>| async move {
        let expect = request.headers().get(header::EXPECT).cloned();
        let body = request
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let mut response = Response::builder();
        if let Some(expect) = expect {
            response = response.header("x-seen-expect", expect);
        }
        response.body(boxed(Full::new(body))).expect("response")
    })
    .await
}

/// Reads from `stream` until a whole response head (up to the blank line)
/// has come, failing after [`DEADLINE`].
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut byte))
            .await
            .expect("a response head in time")
            .expect("read");
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn expecting(host: &str, length: usize) -> String {
    format!(
        "POST /upload HTTP/1.1\r\nhost: {host}\r\ncontent-length: {length}\r\n\
         expect: 100-continue\r\n\r\n"
    )
}

#[tokio::test]
async fn expect_100_continue_gets_100_then_the_body_reaches_the_upstream() {
    let up = expect_upstream().await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "web", &[up])], None));
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(expecting("demo.local", 5).as_bytes())
        .await
        .expect("write");
    assert_eq!(
        read_head(&mut stream).await,
        "HTTP/1.1 100 Continue\r\n\r\n"
    );
    stream.write_all(b"hello").await.expect("write body");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("content-length: 5\r\n"), "{head}");
    // The proxy answered the expectation itself; the upstream got the body.
    assert!(!head.contains("x-seen-expect"), "{head}");
    let mut body = [0u8; 5];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut body))
        .await
        .expect("body in time")
        .expect("body");
    assert_eq!(&body, b"hello");
}

#[tokio::test]
async fn a_request_refused_before_its_body_gets_no_100_continue() {
    let up = expect_upstream().await;
    let proxy = start_proxy().await;
    let mut snapshot = policy(&[("/", "web", &[up])], None);
    edit_route(&mut snapshot, "demo/r0", |r| r.max_request_body_bytes = 4);
    proxy.apply(&snapshot);
    for (host, status) in [
        ("demo.local", "HTTP/1.1 413 Payload Too Large\r\n"),
        ("nowhere.local", "HTTP/1.1 404 Not Found\r\n"),
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        stream
            .write_all(expecting(host, 100).as_bytes())
            .await
            .expect("write");
        // The final answer comes first, and the body was never asked for.
        let head = read_head(&mut stream).await;
        assert!(head.starts_with(status), "{host}: {head}");
    }
}

#[tokio::test]
async fn a_tls_client_that_never_finishes_its_handshake_is_cut_off() {
    let limit = Duration::from_millis(200);
    let (listener, addr) = bind().await;
    let runtime = Arc::new(ArcSwap::from_pointee(Runtime::unconfigured()));
    let (_stop, stopped) = watch::channel(false);
    let params = server::Params {
        limits: crate::Limits {
            header_read_timeout: limit,
            ..Default::default()
        },
    };
    tokio::spawn(serve_tls(
        listener,
        runtime,
        params,
        stopped,
        ListenerMetrics::default(),
    ));
    // Silent after connecting.
    let started = tokio::time::Instant::now();
    let silent = TcpStream::connect(addr).await.expect("connect");
    closed_by_proxy(silent).await;
    assert!(started.elapsed() >= limit);
    // The first bytes of a ClientHello record, then nothing.
    let started = tokio::time::Instant::now();
    let mut partial = TcpStream::connect(addr).await.expect("connect");
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    closed_by_proxy(partial).await;
    assert!(started.elapsed() >= limit);
}

#[tokio::test]
async fn a_host_rewrite_reaches_an_http2_upstream_as_its_authority() {
    let up = upstream(|request: Request<RequestBody>| async move {
        let authority = request
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        Response::builder()
            .header("x-seen-version", format!("{:?}", request.version()))
            .header("x-seen-authority", authority)
            .body(boxed(Full::new(Bytes::new())))
            .expect("response")
    })
    .await;
    let proxy = start_proxy().await;
    let mut snapshot = http2_backend(policy(&[("/", "web", &[up])], None));
    edit_route(&mut snapshot, "demo/r0", |r| {
        r.rewrite = Some(Rewrite {
            host: "rewritten.internal".into(),
            ..Default::default()
        });
    });
    proxy.apply(&snapshot);
    let (status, headers, _) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header_str(&headers, "x-seen-version"), "HTTP/2.0");
    assert_eq!(
        header_str(&headers, "x-seen-authority"),
        "rewritten.internal"
    );
}
