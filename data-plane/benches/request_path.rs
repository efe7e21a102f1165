//! The whole request path in one process and on one thread: a keep-alive
//! HTTP/1.1 client, the proxy and mock upstreams share a current-thread
//! tokio runtime and talk over loopback (the route stage takes a listener's
//! `RequestBody`, so the stack is driven through its listener). Four
//! cases, one request in flight at a time:
//!
//! - `direct`: the client asks an upstream itself, no proxy; the floor.
//! - `bare_forwarding`: through the proxy, a route with nothing but a backend
//!   of one endpoint; every stage is there but has nothing to do. Metrics
//!   are on, as the proxy runs by default: each request is recorded.
//! - `bare_forwarding_metrics_off`: the same with metrics off; the pair is
//!   what recording costs (the issue's bound: within 5 %).
//! - `every_layer`: through the proxy, every stage configured: namespace and
//!   route rate limits (shared and per client IP, never empty), a match on
//!   prefix + method + header, a weighted split over two least-request
//!   backends of two endpoints each with circuit breakers, outlier
//!   detection and pool limits, path rewrite, request and response header
//!   mutations, route timeout, idle timeout, retries with a per-try timeout,
//!   and a body limit. Metrics on.
//!
//! Each figure is the CPU of client, proxy and upstream together per
//! request; `every_layer − bare_forwarding` is what the stages cost,
//! `bare_forwarding − direct` what a proxy hop costs. Every response is
//! checked to be the upstream's `200`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use prism_data_plane::bench::{Proxy, Upstream};
use prism_proto::{Snapshot, parse_policy, validate_snapshot};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

fn bare(web: &[String]) -> String {
    format!(
        r#"
namespaces: [{{name: bench, hosts: [bench.test]}}]
backends: [{{name: bench/web, endpoints: [{{address: "{}"}}]}}]
routes: [{{name: bench/api, match: {{prefix: /}}, backend: web}}]
"#,
        web[0]
    )
}

fn every_layer(web: &[String]) -> String {
    // Rates no single thread can reach: the buckets are checked and taken
    // from on every request, but never refuse one.
    let unlimited = "requests_per_second: 1000000000";
    let backend = |name: &str, a: &str, b: &str| {
        format!(
            r#"
  - name: bench/{name}
    lb_policy: LEAST_REQUEST
    connect_timeout: 1s
    circuit_breaker: {{failure_threshold: 5, open_timeout: 30s}}
    outlier_detection: {{consecutive_5xx: 5, base_ejection_time: 30s, max_ejection_percent: 50}}
    limits: {{max_connections: 64, max_pending_requests: 64, max_requests: 1024, idle_timeout: 60s}}
    endpoints: [{{address: "{a}"}}, {{address: "{b}"}}]"#
        )
    };
    format!(
        r#"
namespaces:
  - name: bench
    hosts: [bench.test]
    rate_limits: [{{{unlimited}}}, {{{unlimited}, per_client_ip: true}}]
backends:{}{}
routes:
  - name: bench/api
    match:
      prefix: /api/
      methods: [GET]
      headers: [{{name: x-env, exact: bench}}]
    backends: [{{name: web, weight: 90}}, {{name: canary, weight: 10}}]
    rewrite: {{prefix: /}}
    request_headers: {{add: [{{name: x-prism, value: "1"}}], remove: [x-internal]}}
    response_headers: {{set: [{{name: cache-control, value: no-store}}]}}
    timeout: 10s
    idle_timeout: 60s
    retry: {{num_retries: 2, retry_on: [5xx, reset, connect-failure], per_try_timeout: 5s}}
    rate_limits: [{{{unlimited}, per_client_ip: true}}]
    max_request_body_bytes: 1048576
"#,
        backend("web", &web[0], &web[1]),
        backend("canary", &web[2], &web[3]),
    )
}

fn snapshot(policy: &str) -> Snapshot {
    let resources = parse_policy(policy).expect("the bench policy parses");
    let snapshot = Snapshot::from_resources(1, resources);
    validate_snapshot(&snapshot).expect("the bench policy is valid");
    snapshot
}

/// A keep-alive HTTP/1.1 connection to `addr`.
async fn connect(addr: std::net::SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}

/// One request, its whole response read; panics unless it is the
/// upstream's `200`, so a bench never times refusals.
async fn call(sender: &mut SendRequest<Empty<Bytes>>) {
    let request = Request::get("/api/items?page=1")
        .header(header::HOST, "bench.test")
        .header("x-env", "bench")
        .body(Empty::new())
        .expect("request");
    sender.ready().await.expect("connection ready");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.expect("body");
    assert_eq!(body.to_bytes(), "ok");
}

fn request_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (upstreams, web) = rt.block_on(async {
        let mut upstreams = Vec::new();
        for _ in 0..4 {
            upstreams.push(Upstream::start().await.expect("upstream"));
        }
        let web: Vec<String> = upstreams.iter().map(|u| u.addr().to_string()).collect();
        (upstreams, web)
    });
    let mut group = c.benchmark_group("request_path");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(10));

    bench(&mut group, &rt, "direct", upstreams[0].addr());
    for (name, policy, metrics) in [
        ("bare_forwarding", bare(&web), true),
        ("bare_forwarding_metrics_off", bare(&web), false),
        ("every_layer", every_layer(&web), true),
    ] {
        let proxy = rt
            .block_on(Proxy::start(&snapshot(&policy), metrics))
            .expect("proxy starts");
        bench(&mut group, &rt, name, proxy.addr());
        // What was timed with metrics on did record every request.
        if let Some(scrape) = proxy.scrape() {
            let ok = r#"code_class="2xx"} "#;
            let counted = scrape
                .lines()
                .filter(|l| l.starts_with("prism_proxy_requests_total{") && l.contains(ok))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>();
            assert!(counted > 0, "{name}: no request recorded:\n{scrape}");
        }
    }
    group.finish();
}

fn bench(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    name: &str,
    addr: std::net::SocketAddr,
) {
    let mut sender = rt.block_on(connect(addr));
    // The first request through opens the proxy's upstream connection.
    rt.block_on(call(&mut sender));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    call(&mut sender).await;
                }
                start.elapsed()
            })
        })
    });
}

criterion_group!(benches, request_path);
criterion_main!(benches);
