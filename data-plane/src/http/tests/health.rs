//! Active health checks through the real proxy: probes of real upstreams take
//! endpoints out of the balancer and bring them back; checkers follow their
//! backend across applies. Time is paused: the intervals are the behaviour.

use std::collections::HashMap;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicBool, Ordering};

use prism_proto::Protocol;
use prism_proto::pb::config::v1::{GrpcHealthCheck, HealthCheck, HttpHealthCheck, health_check};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Reported;
use tonic_health::pb::health_client::HealthClient;

use super::backends::edit_backend;
use super::*;

const INTERVAL: Duration = Duration::from_secs(1);

/// An upstream whose `/healthz` answers 200, or 503 while `failing` is set;
/// every other path answers 200 with `x-upstream: name`. It counts the
/// probes it answered by host (Host header or `:authority`) and keeps the
/// last probe's host, user agent and HTTP version.
#[derive(Clone, Default)]
struct Probed {
    failing: Arc<AtomicBool>,
    by_host: Arc<StdMutex<HashMap<String, usize>>>,
    last: Arc<StdMutex<Option<(String, String, Version)>>>,
}

impl Probed {
    async fn start(&self, name: &'static str) -> SocketAddr {
        let me = self.clone();
        upstream(move |request: Request<RequestBody>| {
            let me = me.clone();
            async move {
                if request.uri().path() != "/healthz" {
                    return Response::builder()
                        .header("x-upstream", name)
                        .body(boxed(Full::new(Bytes::new())))
                        .expect("response");
                }
                let seen =
                    |h: header::HeaderName| header_str(request.headers(), h.as_str()).to_string();
                let host = match request.uri().authority() {
                    Some(authority) => authority.to_string(),
                    None => seen(header::HOST),
                };
                *me.by_host
                    .lock()
                    .expect("lock")
                    .entry(host.clone())
                    .or_default() += 1;
                *me.last.lock().expect("lock") =
                    Some((host, seen(header::USER_AGENT), request.version()));
                let status = if me.failing.load(Ordering::Relaxed) {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                Response::builder()
                    .status(status)
                    .body(boxed(Full::new(Bytes::new())))
                    .expect("response")
            }
        })
        .await
    }

    fn probes(&self, host: &str) -> usize {
        self.by_host
            .lock()
            .expect("lock")
            .get(host)
            .copied()
            .unwrap_or(0)
    }
}

fn http_check(host: &str) -> HealthCheck {
    HealthCheck {
        interval: Some(pbjson_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        unhealthy_threshold: 2,
        healthy_threshold: 2,
        check: Some(health_check::Check::Http(HttpHealthCheck {
            path: "/healthz".into(),
            host: host.into(),
        })),
        ..Default::default()
    }
}

/// Whether endpoint `index` of backend `demo/{name}` is in the balancer now.
fn available(proxy: &Proxy, name: &str, index: usize) -> bool {
    let runtime = proxy.runtime.load();
    let backend = runtime.backend(&format!("demo/{name}")).expect("backend");
    backend.endpoints[index].is_available(tokio::time::Instant::now())
}

/// Waits, in steps much shorter than the probe interval, until `done`.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + DEADLINE;
    while !done() {
        assert!(tokio::time::Instant::now() < until, "never: {what}");
        tokio::time::sleep(INTERVAL / 100).await;
    }
}

async fn upstreams_seen(proxy: &Proxy, requests: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..requests {
        let (status, headers, _) = send(proxy, "demo.local", "/", "").await;
        assert_eq!(status, StatusCode::OK);
        seen.push(header_str(&headers, "x-upstream").to_string());
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_failing_its_http_check_leaves_the_balancer_and_comes_back() {
    let (a, b) = (Probed::default(), Probed::default());
    let (a_addr, b_addr) = (a.start("a").await, b.start("b").await);
    let proxy = start_proxy().await;
    let mut snapshot = policy(&[("/", "web", &[a_addr, b_addr])], None);
    edit_backend(&mut snapshot, "web", |b| {
        b.health_check = Some(http_check("check.demo.local"));
    });
    proxy.apply(&snapshot);
    // New endpoints wait for their first passed probe.
    assert!(!available(&proxy, "web", 0) && !available(&proxy, "web", 1));
    wait_until("both healthy", || {
        available(&proxy, "web", 0) && available(&proxy, "web", 1)
    })
    .await;
    // One passed probe each was enough, though healthy_threshold is 2.
    assert_eq!(
        (a.probes("check.demo.local"), b.probes("check.demo.local")),
        (1, 1)
    );
    assert_eq!(
        *b.last.lock().expect("lock"),
        Some((
            "check.demo.local".into(),
            "prism-health-check".into(),
            Version::HTTP_11
        ))
    );
    let mut seen = upstreams_seen(&proxy, 4).await;
    seen.sort();
    assert_eq!(seen, ["a", "a", "b", "b"]);

    let before = b.probes("check.demo.local");
    b.failing.store(true, Ordering::Relaxed);
    wait_until("b unhealthy", || !available(&proxy, "web", 1)).await;
    assert_eq!(
        b.probes("check.demo.local") - before,
        2,
        "unhealthy_threshold failed probes"
    );
    assert_eq!(upstreams_seen(&proxy, 6).await, ["a"; 6]);

    let before = b.probes("check.demo.local");
    b.failing.store(false, Ordering::Relaxed);
    wait_until("b healthy again", || available(&proxy, "web", 1)).await;
    assert_eq!(
        b.probes("check.demo.local") - before,
        2,
        "healthy_threshold passed probes"
    );
    assert!(upstreams_seen(&proxy, 4).await.contains(&"b".to_string()));
}

#[tokio::test(start_paused = true)]
async fn with_every_endpoint_unhealthy_the_answer_is_503() {
    let only = Probed::default();
    only.failing.store(true, Ordering::Relaxed);
    let addr = only.start("only").await;
    let proxy = start_proxy().await;
    let mut snapshot = policy(&[("/", "web", &[addr])], None);
    edit_backend(&mut snapshot, "web", |b| {
        b.health_check = Some(http_check(""));
    });
    proxy.apply(&snapshot);
    // Probed with the endpoint's address as Host when the check names none.
    wait_until("two failed probes", || only.probes(&addr.to_string()) >= 2).await;
    let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "no healthy upstream\n");
}

#[tokio::test(start_paused = true)]
async fn an_http2_backend_is_probed_over_http2() {
    let probed = Probed::default();
    let addr = probed.start("web").await;
    let proxy = start_proxy().await;
    let mut snapshot = policy(&[("/", "web", &[addr])], None);
    edit_backend(&mut snapshot, "web", |b| {
        b.protocol = Protocol::Http2.into();
        b.health_check = Some(http_check("check.demo.local"));
    });
    proxy.apply(&snapshot);
    wait_until("healthy", || available(&proxy, "web", 0)).await;
    assert_eq!(
        *probed.last.lock().expect("lock"),
        Some((
            "check.demo.local".into(),
            "prism-health-check".into(),
            Version::HTTP_2
        ))
    );
}

/// A gRPC upstream serving only `grpc.health.v1.Health`, and its reporter.
async fn grpc_health_upstream() -> (SocketAddr, tonic_health::server::HealthReporter) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let (listener, addr) = bind().await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, reporter)
}

/// `grpc.health.v1.Health/Check` about the whole server, called through
/// the proxy for host `demo.local`.
async fn check_through(proxy: &Proxy) -> Result<Reported, tonic::Status> {
    let sender = h2c::<tonic::body::Body>(proxy).await;
    let channel = tower::service_fn(move |request| {
        let mut sender: hyper::client::conn::http2::SendRequest<tonic::body::Body> = sender.clone();
        async move { sender.send_request(request).await }
    });
    let mut client =
        HealthClient::with_origin(channel, "http://demo.local".parse().expect("origin"));
    client
        .check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status())
}

#[tokio::test(start_paused = true)]
async fn a_grpc_check_takes_a_not_serving_endpoint_out() {
    let (addr, reporter) = grpc_health_upstream().await;
    reporter
        .set_service_status("demo.Echo", ServingStatus::Serving)
        .await;
    let proxy = start_proxy().await;
    let mut snapshot = policy(&[("/", "web", &[addr])], None);
    edit_backend(&mut snapshot, "web", |b| {
        b.protocol = Protocol::Grpc.into();
        b.health_check = Some(HealthCheck {
            check: Some(health_check::Check::Grpc(GrpcHealthCheck {
                service_name: "demo.Echo".into(),
            })),
            ..http_check("")
        });
    });
    proxy.apply(&snapshot);
    wait_until("serving", || available(&proxy, "web", 0)).await;
    assert_eq!(
        check_through(&proxy).await.expect("call"),
        Reported::Serving
    );

    reporter
        .set_service_status("demo.Echo", ServingStatus::NotServing)
        .await;
    wait_until("not serving", || !available(&proxy, "web", 0)).await;
    let status = check_through(&proxy)
        .await
        .expect_err("no healthy upstream");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), "no healthy upstream");

    reporter
        .set_service_status("demo.Echo", ServingStatus::Serving)
        .await;
    wait_until("serving again", || available(&proxy, "web", 0)).await;
    assert_eq!(
        check_through(&proxy).await.expect("call"),
        Reported::Serving
    );
}

#[tokio::test(start_paused = true)]
async fn a_changed_or_removed_backends_checker_stops() {
    let probed = Probed::default();
    let addr = probed.start("web").await;
    let other = echo_upstream("other").await;
    let proxy = start_proxy().await;
    let checked = |revision: u64, host: &str| {
        let mut snapshot = policy_at(revision, &[("/", "web", &[addr])], None);
        edit_backend(&mut snapshot, "web", |b| {
            b.health_check = Some(http_check(host));
        });
        snapshot
    };
    proxy.apply(&checked(1, "v1.check"));
    wait_until("healthy", || available(&proxy, "web", 0)).await;

    // A changed check: the new version probes, the old one stops, and the
    // endpoint keeps its health across the change instead of starting new.
    proxy.apply(&checked(2, "v2.check"));
    assert!(available(&proxy, "web", 0), "health not kept");
    let v1 = probed.probes("v1.check");
    wait_until("probed by v2", || probed.probes("v2.check") >= 1).await;
    tokio::time::sleep(INTERVAL * 5).await;
    assert_eq!(probed.probes("v1.check"), v1, "the old checker still runs");
    assert!(probed.probes("v2.check") >= 4, "the new checker stopped");

    // Removed: the route now goes to a backend without a check.
    proxy.apply(&policy_at(3, &[("/", "other", &[other])], None));
    let v2 = probed.probes("v2.check");
    tokio::time::sleep(INTERVAL * 5).await;
    assert_eq!(probed.probes("v2.check"), v2, "a removed backend is probed");
}

#[tokio::test(start_paused = true)]
async fn an_unrelated_apply_keeps_the_checker_and_its_state() {
    let (a, b) = (Probed::default(), Probed::default());
    let (a_addr, b_addr) = (a.start("a").await, b.start("b").await);
    let other = echo_upstream("other").await;
    let proxy = start_proxy().await;
    let checked = |revision: u64, routes: &[(&str, &str, &[SocketAddr])]| {
        let mut snapshot = policy_at(revision, routes, None);
        edit_backend(&mut snapshot, "web", |b| {
            b.health_check = Some(http_check("check"));
        });
        snapshot
    };
    proxy.apply(&checked(1, &[("/", "web", &[a_addr, b_addr])]));
    b.failing.store(true, Ordering::Relaxed);
    wait_until("b unhealthy", || {
        available(&proxy, "web", 0) && !available(&proxy, "web", 1) && b.probes("check") >= 2
    })
    .await;
    let web = Arc::clone(proxy.runtime.load().backend("demo/web").expect("web"));

    proxy.apply(&checked(
        2,
        &[
            ("/", "web", &[a_addr, b_addr]),
            ("/other/", "other", &[other]),
        ],
    ));
    let kept = proxy
        .runtime
        .load()
        .backend("demo/web")
        .expect("web")
        .clone();
    assert!(Arc::ptr_eq(&web, &kept), "the backend was rebuilt");
    drop(kept);
    assert!(
        web.health_check.as_ref().is_some_and(|c| c.is_running()),
        "the checker stopped"
    );
    assert!(!available(&proxy, "web", 1), "b's state was lost");
    // A new checker would probe at once; the kept one waits its interval.
    let probes = b.probes("check");
    tokio::time::sleep(INTERVAL / 2).await;
    assert_eq!(b.probes("check"), probes);
    drop(web);
    assert_eq!(upstreams_seen(&proxy, 4).await, ["a"; 4]);
}

#[tokio::test(start_paused = true)]
async fn probes_use_the_backends_protocol_and_upstream_tls() {
    use super::tls::{mtls_upstream, upstream_tls_policy};
    use crate::test_ca::{Leaf, TestCa};

    let ca = TestCa::new();
    let client = ca.issue(&["proxy.test"]);
    let up = mtls_upstream(&ca).await;
    let checked = |protocol: Protocol, client: Option<&Leaf>| {
        let mut snapshot = upstream_tls_policy(up, protocol, &ca, client);
        edit_backend(&mut snapshot, "web", |b| {
            b.health_check = Some(http_check(""));
        });
        snapshot
    };
    // HTTP/1.1, and HTTP/2 with ALPN h2, over TLS: the probe verifies the
    // upstream with the backend's CA and SNI and presents its client
    // certificate. A proxy each, so the endpoint starts new.
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let proxy = start_proxy().await;
        proxy.apply(&checked(protocol, Some(&client)));
        wait_until("healthy over TLS", || available(&proxy, "web", 0)).await;

        // Without its client certificate the upstream refuses every probe.
        proxy.apply(&checked(protocol, None));
        assert!(available(&proxy, "web", 0), "kept from the last version");
        wait_until("unhealthy without a client certificate", || {
            !available(&proxy, "web", 0)
        })
        .await;
        let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n"),
            "{protocol:?}"
        );
    }
}
