//! The upstream pool through the real proxy: connection reuse, HTTP/2
//! multiplexing, the backend limits, idle close and drain, each seen from an
//! upstream that counts its connections.

use std::sync::atomic::{AtomicUsize, Ordering};

use hyper_util::server::conn::auto;
use prism_proto::Protocol;
use prism_proto::pb::config::v1::BackendLimits;
use tokio::sync::Semaphore;

use super::backends::with_backend;
use super::*;

/// An upstream (HTTP/1.1 and h2c on one port) that counts the connections
/// it accepts, reports each request's arrival and each connection's end, and
/// answers a request only once the gate lets it through.
struct Counted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    arrived: mpsc::UnboundedReceiver<()>,
    closed: mpsc::UnboundedReceiver<()>,
    gate: Arc<Semaphore>,
}

/// Lets every request through.
const OPEN: usize = Semaphore::MAX_PERMITS;

async fn counted(permits: usize) -> Counted {
    let (listener, addr) = bind().await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let (arrived_tx, arrived) = mpsc::unbounded_channel();
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(permits));
    let (count, pass) = (Arc::clone(&accepted), Arc::clone(&gate));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let (arrived, pass, closed) =
                (arrived_tx.clone(), Arc::clone(&pass), closed_tx.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request: Request<Incoming>| {
                    let (arrived, pass) = (arrived.clone(), Arc::clone(&pass));
                    async move {
                        let _ = arrived.send(());
                        pass.acquire().await.expect("gate open").forget();
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                let _ = closed.send(());
            });
        }
    });
    Counted {
        addr,
        accepted,
        arrived,
        closed,
        gate,
    }
}

impl Counted {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    async fn arrival(&mut self) {
        tokio::time::timeout(DEADLINE, self.arrived.recv())
            .await
            .expect("a request arrives upstream")
            .expect("upstream running");
    }

    async fn close(&mut self) {
        tokio::time::timeout(DEADLINE, self.closed.recv())
            .await
            .expect("an upstream connection closes")
            .expect("upstream running");
    }
}

/// One backend `web` on `endpoints` speaking `protocol`, with `limits`.
fn limited(endpoints: &[SocketAddr], protocol: Protocol, limits: BackendLimits) -> Snapshot {
    with_backend(policy(&[("/", "web", endpoints)], None), "web", |b| {
        b.protocol = protocol.into();
        b.limits = Some(limits);
    })
}

/// A request through `proxy`, sent from its own task.
fn spawn_get(proxy: &Proxy, grpc: bool) -> tokio::task::JoinHandle<(StatusCode, HeaderMap)> {
    let mut request =
        Request::post(format!("http://{}/", proxy.addr)).header(header::HOST, "demo.local");
    if grpc {
        request = request.header(header::CONTENT_TYPE, "application/grpc");
    }
    let request = request.body(Full::new(Bytes::new())).expect("request");
    tokio::spawn(async move {
        let response = client().request(request).await.expect("response");
        let status = response.status();
        let headers = response.headers().clone();
        response.into_body().collect().await.expect("body");
        (status, headers)
    })
}

async fn joined(task: tokio::task::JoinHandle<(StatusCode, HeaderMap)>) -> (StatusCode, HeaderMap) {
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the request ends")
        .expect("task")
}

#[tokio::test]
async fn sequential_requests_share_one_http1_connection() {
    let up = counted(OPEN).await;
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "web", &[up.addr])], None));
    for _ in 0..5 {
        let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "done"));
    }
    assert_eq!(
        up.accepted(),
        1,
        "every request after the first reused its connection"
    );
}

#[tokio::test]
async fn a_connection_closes_after_max_requests_per_connection() {
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let mut up = counted(OPEN).await;
        let proxy = start_proxy().await;
        proxy.apply(&limited(
            &[up.addr],
            protocol,
            BackendLimits {
                max_requests_per_connection: 2,
                ..Default::default()
            },
        ));
        for _ in 0..5 {
            let (status, _, _) = send(&proxy, "demo.local", "/", "").await;
            assert_eq!(status, StatusCode::OK, "{protocol:?}");
        }
        assert_eq!(up.accepted(), 3, "{protocol:?}: 2 + 2 + 1 requests");
        // The two spent connections close; the third stays pooled.
        up.close().await;
        up.close().await;
        assert!(
            up.closed.try_recv().is_err(),
            "{protocol:?}: the third is kept"
        );
    }
}

#[tokio::test]
async fn http2_requests_share_one_connection_concurrently() {
    let mut up = counted(0).await;
    let proxy = start_proxy().await;
    proxy.apply(&limited(
        &[up.addr],
        Protocol::Http2,
        BackendLimits::default(),
    ));
    let requests: Vec<_> = (0..8).map(|_| spawn_get(&proxy, false)).collect();
    for _ in 0..8 {
        up.arrival().await;
    }
    assert_eq!(
        up.accepted(),
        1,
        "eight streams in flight on one connection"
    );
    up.gate.add_permits(8);
    for request in requests {
        assert_eq!(joined(request).await.0, StatusCode::OK);
    }
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn past_max_connections_requests_wait_and_past_max_pending_they_get_503() {
    let mut up = counted(0).await;
    let proxy = start_proxy().await;
    proxy.apply(&limited(
        &[up.addr],
        Protocol::Http1,
        BackendLimits {
            max_connections: 1,
            max_pending_requests: 1,
            ..Default::default()
        },
    ));
    let first = spawn_get(&proxy, false);
    up.arrival().await;
    // The one connection is busy: the second waits for it.
    let second = spawn_get(&proxy, false);
    let runtime = proxy.runtime.load_full();
    let pool = runtime.backend("demo/web").expect("backend").client.pool();
    let until = tokio::time::Instant::now() + DEADLINE;
    while pool.pending_requests() == 0 {
        assert!(
            tokio::time::Instant::now() < until,
            "the second never waited"
        );
        tokio::task::yield_now().await;
    }
    // The third finds the one pending place taken: 503 at once.
    let (status, headers) = joined(spawn_get(&proxy, false)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header_str(&headers, "x-prism-overloaded"), "true");
    let (status, headers) = joined(spawn_get(&proxy, true)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        header_str(&headers, "grpc-status"),
        "14",
        "gRPC UNAVAILABLE"
    );

    up.gate.add_permits(2);
    assert_eq!(joined(first).await.0, StatusCode::OK);
    assert_eq!(joined(second).await.0, StatusCode::OK);
    assert_eq!(
        up.accepted(),
        1,
        "the second went out on the first's connection"
    );
}

#[tokio::test]
async fn past_max_requests_requests_get_503_at_once() {
    let mut up = counted(0).await;
    let proxy = start_proxy().await;
    proxy.apply(&limited(
        &[up.addr],
        Protocol::Http2,
        BackendLimits {
            max_requests: 2,
            ..Default::default()
        },
    ));
    let held = [spawn_get(&proxy, false), spawn_get(&proxy, false)];
    up.arrival().await;
    up.arrival().await;
    let (status, headers) = joined(spawn_get(&proxy, false)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header_str(&headers, "x-prism-overloaded"), "true");
    up.gate.add_permits(OPEN - 2);
    for request in held {
        assert_eq!(joined(request).await.0, StatusCode::OK);
    }
    // Their places are free again.
    let (status, _, _) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn at_max_connections_an_idle_connection_to_another_endpoint_makes_room() {
    let mut a = counted(OPEN).await;
    let b = counted(OPEN).await;
    let proxy = start_proxy().await;
    proxy.apply(&limited(
        &[a.addr, b.addr],
        Protocol::Http1,
        BackendLimits {
            max_connections: 1,
            ..Default::default()
        },
    ));
    // Round robin: a, then b, whose request closes a's idle connection.
    for _ in 0..2 {
        let (status, _, _) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!(status, StatusCode::OK);
    }
    a.close().await;
    assert_eq!((a.accepted(), b.accepted()), (1, 1));
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let mut up = counted(OPEN).await;
        let proxy = start_proxy().await;
        let idle = Duration::from_millis(200);
        proxy.apply(&limited(
            &[up.addr],
            protocol,
            BackendLimits {
                idle_timeout: Some(pbjson_types::Duration {
                    seconds: 0,
                    nanos: i32::try_from(idle.as_nanos()).expect("short"),
                }),
                ..Default::default()
            },
        ));
        let sent_at = tokio::time::Instant::now();
        let (status, _, _) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!(status, StatusCode::OK);
        up.close().await;
        assert!(
            sent_at.elapsed() >= idle,
            "{protocol:?}: closed before its idle timeout"
        );
        let runtime = proxy.runtime.load_full();
        let pool = runtime.backend("demo/web").expect("backend").client.pool();
        let until = tokio::time::Instant::now() + DEADLINE;
        while pool.open_connections() != 0 {
            assert!(
                tokio::time::Instant::now() < until,
                "{protocol:?}: still counted open"
            );
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test]
async fn an_http2_backend_removed_from_policy_finishes_its_streams_then_closes() {
    let mut up = counted(0).await;
    let other = echo_upstream("other").await;
    let proxy = start_proxy().await;
    proxy.apply(&limited(
        &[up.addr],
        Protocol::Http2,
        BackendLimits::default(),
    ));
    let in_flight = spawn_get(&proxy, false);
    up.arrival().await;
    proxy.apply(&policy_at(2, &[("/", "other", &[other])], None));
    let (status, headers, _) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(
        (status, header_str(&headers, "x-upstream")),
        (StatusCode::OK, "other")
    );
    assert!(
        up.closed.try_recv().is_err(),
        "its connection is still in use"
    );
    up.gate.add_permits(1);
    assert_eq!(joined(in_flight).await.0, StatusCode::OK);
    up.close().await;
}

#[tokio::test]
async fn requests_waiting_for_a_shared_http2_connect_fail_with_it() {
    // It accepts TCP and never answers the TLS handshake: every connect
    // times out.
    let (silent, addr) = bind().await;
    let proxy = start_proxy().await;
    let connect_timeout = Duration::from_millis(500);
    proxy.apply(&with_backend(
        policy(&[("/", "web", &[addr])], None),
        "web",
        |b| {
            b.protocol = Protocol::Http2.into();
            b.tls = Some(prism_proto::pb::config::v1::UpstreamTls::default());
            b.connect_timeout = Some(pbjson_types::Duration {
                seconds: 0,
                nanos: i32::try_from(connect_timeout.as_nanos()).expect("short"),
            });
        },
    ));
    let started = tokio::time::Instant::now();
    let requests: Vec<_> = (0..4).map(|_| spawn_get(&proxy, false)).collect();
    let mut statuses = Vec::new();
    for request in requests {
        statuses.push(joined(request).await.0);
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [
            StatusCode::BAD_GATEWAY,
            StatusCode::BAD_GATEWAY,
            StatusCode::BAD_GATEWAY,
            StatusCode::GATEWAY_TIMEOUT
        ],
        "one timed out connecting, the three that waited for it failed with it"
    );
    // One connect timeout for all, not one each in turn.
    assert!(
        started.elapsed() < connect_timeout * 2,
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

#[tokio::test]
async fn a_request_refused_by_a_backend_limit_does_not_count_against_the_endpoint() {
    let mut up = counted(0).await;
    let proxy = start_proxy().await;
    proxy.apply(&with_backend(
        limited(
            &[up.addr],
            Protocol::Http1,
            BackendLimits {
                max_requests: 1,
                ..Default::default()
            },
        ),
        "web",
        |b| {
            b.circuit_breaker = Some(prism_proto::pb::config::v1::CircuitBreaker {
                failure_threshold: 1,
                open_timeout: Some(pbjson_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            });
        },
    ));
    let held = spawn_get(&proxy, false);
    up.arrival().await;
    let (status, headers) = joined(spawn_get(&proxy, false)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header_str(&headers, "x-prism-overloaded"), "true");
    up.gate.add_permits(OPEN);
    assert_eq!(joined(held).await.0, StatusCode::OK);
    // A breaker that counted the refusal would be open now (threshold 1).
    let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "done"));
}
