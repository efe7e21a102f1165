//! Wire limits, overload and drain through the real proxy.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::*;
use crate::Limits;

/// A proxy whose serve task the test holds, to see it end.
struct Served {
    proxy: Proxy,
    task: JoinHandle<()>,
}

async fn start_served(limits: Limits) -> Served {
    let (listener, addr) = bind().await;
    let runtime = Arc::new(ArcSwap::from_pointee(Runtime::unconfigured()));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(serve(
        listener,
        Arc::clone(&runtime),
        server::Params { limits },
        stopped,
        ListenerMetrics::default(),
    ));
    Served {
        proxy: Proxy {
            addr,
            runtime,
            _stop: stop,
        },
        task,
    }
}

/// An upstream that reports each request's arrival, then answers `done` once
/// released (one `notify_one` per request).
async fn held_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<()>, Arc<Notify>) {
    let (arrived_tx, arrived) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let gate = Arc::clone(&release);
    let addr = upstream(move |_request| {
        let (arrived, gate) = (arrived_tx.clone(), Arc::clone(&gate));
        async move {
            let _ = arrived.send(());
            gate.notified().await;
            Response::new(boxed(Full::new(Bytes::from_static(b"done"))))
        }
    })
    .await;
    (addr, arrived, release)
}

async fn arrival(arrived: &mut mpsc::UnboundedReceiver<()>) {
    tokio::time::timeout(DEADLINE, arrived.recv())
        .await
        .expect("the request reaches the upstream")
        .expect("upstream running");
}

/// Sends `head` (and nothing more) and reads what the proxy answers until it
/// closes the connection.
async fn raw_exchange(proxy: &Proxy, head: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream.write_all(head).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the proxy answers and closes the connection")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

fn request_with_headers(extra: usize, value: &str) -> Vec<u8> {
    let mut head = String::from("GET / HTTP/1.1\r\nhost: demo.local\r\n");
    for i in 0..extra {
        head.push_str(&format!("x-h{i}: {value}\r\n"));
    }
    head.push_str("connection: close\r\n\r\n");
    head.into_bytes()
}

#[tokio::test]
async fn a_header_block_over_64_kib_is_431_and_the_connection_closes() {
    let up = echo_upstream("a").await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "a", &[up])], None));
    // 60 KiB of headers pass.
    let answer = raw_exchange(&proxy, &request_with_headers(60, &"v".repeat(1000))).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // 64 KiB without the end of the header block: refused, and closed (the
    // read above ends only at the close).
    let mut head = b"GET / HTTP/1.1\r\nhost: demo.local\r\nx-big: ".to_vec();
    head.resize(64 * 1024, b'a');
    let answer = raw_exchange(&proxy, &head).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn more_than_100_headers_is_431_and_the_connection_closes() {
    // Unconfigured, the proxy answers itself (503): no upstream limit interferes.
    let proxy = start_proxy().await;
    // host, connection and 98 more: 100.
    let answer = raw_exchange(&proxy, &request_with_headers(98, "v")).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let answer = raw_exchange(&proxy, &request_with_headers(99, "v")).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn past_the_concurrency_limit_requests_get_503_at_once() {
    let (up, mut arrived, release) = held_upstream().await;
    let served = start_served(Limits {
        max_concurrent_requests: 1,
        ..Default::default()
    })
    .await;
    let proxy = &served.proxy;
    proxy.apply(&policy(&[("/", "a", &[up])], None));
    let held = tokio::spawn({
        let addr = proxy.addr;
        async move {
            let request = Request::get(format!("http://{addr}/"))
                .header(header::HOST, "demo.local")
                .body(Full::default())
                .expect("request");
            let response = client().request(request).await.expect("response");
            let body = response.into_body().collect().await.expect("body");
            body.to_bytes()
        }
    });
    arrival(&mut arrived).await;

    let (status, headers, body) = send(proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "proxy overloaded\n");
    assert_eq!(header_str(&headers, "via"), "1.1 prism");
    let mut h2 = h2c::<Full<Bytes>>(proxy).await;
    let grpc = Request::post("http://demo.local/pkg.Svc/Call")
        .header(header::CONTENT_TYPE, "application/grpc")
        .body(Full::default())
        .expect("request");
    let response = h2.send_request(grpc).await.expect("response");
    assert_eq!(header_str(response.headers(), "grpc-status"), "14");

    // The place comes back once the held response has ended.
    release.notify_one();
    let body = tokio::time::timeout(DEADLINE, held)
        .await
        .expect("the held request ends")
        .expect("task");
    assert_eq!(body, "done");
    let next = tokio::spawn({
        let addr = proxy.addr;
        async move {
            let request = Request::get(format!("http://{addr}/"))
                .header(header::HOST, "demo.local")
                .body(Full::default())
                .expect("request");
            client().request(request).await.expect("response").status()
        }
    });
    arrival(&mut arrived).await;
    release.notify_one();
    let status = tokio::time::timeout(DEADLINE, next)
        .await
        .expect("answered")
        .expect("task");
    assert_eq!(status, StatusCode::OK);
}

/// Frames of HTTP/2 written by hand, for a client that ignores the server's
/// SETTINGS.
mod frame {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const SETTINGS: u8 = 0x4;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const GOAWAY: u8 = 0x7;
    pub const REFUSED_STREAM: u32 = 0x7;

    pub fn encode(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len())
            .expect("short frame")
            .to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// `GET /` for `demo.local`, HPACK from the static table and literals.
    pub fn get(stream: u32) -> Vec<u8> {
        // :method GET, :scheme http, :path /, :authority (literal, no index).
        let mut block = vec![0x82, 0x86, 0x84, 0x01, 10];
        block.extend_from_slice(b"demo.local");
        // END_HEADERS | END_STREAM
        encode(HEADERS, 0x4 | 0x1, stream, &block)
    }
}

/// Reads one frame: (type, stream, payload).
async fn read_frame(stream: &mut TcpStream) -> (u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.expect("frame header");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    stream
        .read_exact(&mut payload)
        .await
        .expect("frame payload");
    (head[3], id, payload)
}

#[tokio::test]
async fn an_h2_client_past_max_concurrent_streams_is_refused() {
    let (up, mut arrived, release) = held_upstream().await;
    let served = start_served(Limits {
        max_concurrent_streams: 2,
        ..Default::default()
    })
    .await;
    let proxy = &served.proxy;
    proxy.apply(&policy(&[("/", "a", &[up])], None));
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream.write_all(frame::PREFACE).await.expect("preface");
    stream
        .write_all(&frame::encode(frame::SETTINGS, 0, 0, &[]))
        .await
        .expect("settings");
    // The server's SETTINGS advertise the limit: (id 0x3, value 2).
    let (kind, _, settings) = tokio::time::timeout(DEADLINE, read_frame(&mut stream))
        .await
        .expect("server settings");
    assert_eq!(kind, frame::SETTINGS);
    let advertised = settings
        .chunks(6)
        .find(|s| s[..2] == [0, 3])
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    assert_eq!(advertised, Some(2));
    // ACK them, then open three streams at once.
    stream
        .write_all(&frame::encode(frame::SETTINGS, 0x1, 0, &[]))
        .await
        .expect("ack");
    for id in [1, 3, 5] {
        stream.write_all(&frame::get(id)).await.expect("headers");
    }
    let refused = tokio::time::timeout(DEADLINE, async {
        loop {
            let (kind, id, payload) = read_frame(&mut stream).await;
            assert_ne!(kind, frame::GOAWAY, "the connection stays up");
            if kind == frame::RST_STREAM {
                let code = u32::from_be_bytes(payload[..4].try_into().expect("code"));
                return (id, code);
            }
        }
    })
    .await
    .expect("the third stream is reset");
    assert_eq!(refused, (5, frame::REFUSED_STREAM));
    arrival(&mut arrived).await;
    arrival(&mut arrived).await;
    release.notify_waiters();
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let up = echo_upstream("a").await;
    let idle = Duration::from_millis(300);
    let served = start_served(Limits {
        idle_timeout: idle,
        ..Default::default()
    })
    .await;
    let proxy = &served.proxy;
    proxy.apply(&policy(&[("/", "a", &[up])], None));
    // HTTP/1.1: after a response, nothing more; closed well before the
    // 10 s header read timeout would.
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: demo.local\r\n\r\n")
        .await
        .expect("write");
    let mut answer = [0u8; 12];
    stream.read_exact(&mut answer).await.expect("status line");
    assert_eq!(&answer, b"HTTP/1.1 200");
    let waited = closed_by_proxy(stream).await;
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // HTTP/2: the connection ends (GOAWAY) once idle.
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    let connection = tokio::spawn(connection);
    let request = Request::get("http://demo.local/")
        .body(Full::<Bytes>::default())
        .expect("request");
    let start = tokio::time::Instant::now();
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.expect("body");
    tokio::time::timeout(DEADLINE, connection)
        .await
        .expect("the proxy ends the idle h2 connection")
        .expect("task")
        .expect("a clean end");
    assert!(start.elapsed() >= idle);
}

/// Connecting fails once the proxy has stopped listening.
async fn refused(addr: SocketAddr) {
    tokio::time::timeout(DEADLINE, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("new connections are refused");
}

#[tokio::test]
async fn on_shutdown_in_flight_requests_finish_and_new_connections_are_refused() {
    let (up, mut arrived, release) = held_upstream().await;
    let served = start_served(Limits::default()).await;
    let proxy = &served.proxy;
    proxy.apply(&policy(&[("/", "a", &[up])], None));
    // One HTTP/1.1 and one HTTP/2 request in flight.
    let h1 = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut h1, h1_conn) = hyper::client::conn::http1::handshake(TokioIo::new(h1))
        .await
        .expect("h1 handshake");
    let h1_conn = tokio::spawn(h1_conn);
    let request = |uri: &str| {
        Request::get(uri)
            .header(header::HOST, "demo.local")
            .body(Full::<Bytes>::default())
            .expect("request")
    };
    let h1_response = tokio::spawn(h1.send_request(request("/")));
    arrival(&mut arrived).await;
    let h2 = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut h2, h2_conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2))
            .await
            .expect("h2c handshake");
    let h2_conn = tokio::spawn(h2_conn);
    let h2_response = tokio::spawn(h2.send_request(request("http://demo.local/")));
    arrival(&mut arrived).await;

    served.proxy._stop.send(true).expect("serving");
    refused(proxy.addr).await;
    release.notify_one();
    release.notify_one();
    let h1_response = tokio::time::timeout(DEADLINE, h1_response)
        .await
        .expect("answered")
        .expect("task")
        .expect("response");
    assert_eq!(h1_response.status(), StatusCode::OK);
    assert_eq!(header_str(h1_response.headers(), "connection"), "close");
    let body = h1_response.into_body().collect().await.expect("body");
    assert_eq!(body.to_bytes(), "done");
    let h2_response = tokio::time::timeout(DEADLINE, h2_response)
        .await
        .expect("answered")
        .expect("task")
        .expect("response");
    assert_eq!(h2_response.status(), StatusCode::OK);
    let body = h2_response.into_body().collect().await.expect("body");
    assert_eq!(body.to_bytes(), "done");
    // Both connections end cleanly: HTTP/1.1 by `connection: close`, HTTP/2
    // by GOAWAY; then the server is done.
    for conn in [h1_conn, h2_conn] {
        tokio::time::timeout(DEADLINE, conn)
            .await
            .expect("the proxy ends the connection")
            .expect("task")
            .expect("a clean end");
    }
    tokio::time::timeout(DEADLINE, served.task)
        .await
        .expect("the server ends once drained")
        .expect("task");
}

#[tokio::test]
async fn the_drain_ends_at_the_drain_timeout() {
    let (up, mut arrived, _release) = held_upstream().await;
    let drain = Duration::from_millis(300);
    let served = start_served(Limits {
        drain_timeout: drain,
        ..Default::default()
    })
    .await;
    let proxy = &served.proxy;
    proxy.apply(&policy(&[("/", "a", &[up])], None));
    let request = Request::get(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .body(Full::default())
        .expect("request");
    let stuck = tokio::spawn(client().request(request));
    arrival(&mut arrived).await;
    let start = tokio::time::Instant::now();
    served.proxy._stop.send(true).expect("serving");
    tokio::time::timeout(DEADLINE, served.task)
        .await
        .expect("the server ends at the drain timeout")
        .expect("task");
    assert!(start.elapsed() >= drain);
    let outcome = tokio::time::timeout(DEADLINE, stuck)
        .await
        .expect("the stuck request ends")
        .expect("task");
    assert!(outcome.is_err(), "its connection was closed");
}

/// An upstream whose requests wait until released, and that reports each of
/// its connections closing.
async fn watched_upstream() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<()>,
    Arc<Notify>,
    mpsc::UnboundedReceiver<()>,
) {
    let (listener, addr) = bind().await;
    let (arrived_tx, arrived) = mpsc::unbounded_channel();
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let gate = Arc::clone(&release);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (arrived, gate, closed) =
                (arrived_tx.clone(), Arc::clone(&gate), closed_tx.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    let (arrived, gate) = (arrived.clone(), Arc::clone(&gate));
                    async move {
                        let _ = arrived.send(());
                        gate.notified().await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                let _ = closed.send(());
            });
        }
    });
    (addr, arrived, release, closed)
}

#[tokio::test]
async fn a_backend_removed_from_policy_finishes_its_requests_then_closes_its_pool() {
    let (a, mut arrived, release, mut closed) = watched_upstream().await;
    let b = echo_upstream("b").await;
    let proxy = start_proxy().await;
    proxy.apply(&policy_at(1, &[("/", "a", &[a])], None));
    let request = Request::get(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .body(Full::default())
        .expect("request");
    let in_flight = tokio::spawn(async move {
        let response = client().request(request).await.expect("response");
        let status = response.status();
        let body = response.into_body().collect().await.expect("body");
        (status, body.to_bytes())
    });
    arrival(&mut arrived).await;

    // Backend a leaves the policy: new requests go to b at once.
    proxy.apply(&policy_at(2, &[("/", "b", &[b])], None));
    let (status, headers, _) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header_str(&headers, "x-upstream"), "b");
    assert!(closed.try_recv().is_err(), "a's connection is still in use");

    // The request in flight on a finishes, then a's pool closes.
    release.notify_one();
    let (status, body) = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .expect("the request finishes")
        .expect("task");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"done"[..]));
    tokio::time::timeout(DEADLINE, closed.recv())
        .await
        .expect("a's pooled connection is closed")
        .expect("upstream running");
}

#[tokio::test]
async fn an_h2_header_list_over_64_kib_is_431_for_that_stream_only() {
    let up = echo_upstream("a").await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "a", &[up])], None));
    let mut sender = h2c(&proxy).await;
    let request = |headers: usize| {
        let mut request = Request::get("http://demo.local/").body(Full::<Bytes>::default());
        let value = HeaderValue::from_str(&"v".repeat(1000)).expect("value");
        if let Ok(request) = &mut request {
            for i in 0..headers {
                let name = http::HeaderName::try_from(format!("x-h{i}")).expect("name");
                request.headers_mut().insert(name, value.clone());
            }
        }
        request.expect("request")
    };
    let status =
        |response: Result<Response<Incoming>, hyper::Error>| response.expect("response").status();
    assert_eq!(status(sender.send_request(request(70)).await), 431);
    // The connection stays up, and a header list under the limit passes.
    assert_eq!(
        status(sender.send_request(request(60)).await),
        StatusCode::OK
    );
}
