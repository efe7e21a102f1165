//! One policy, two data planes: one control plane feeds a Prism proxy and a
//! real Envoy (ADS), and the same requests sent through both reach the same
//! backend with the same rewrites, or get the same redirect or direct
//! answer; weighted splits are compared by share. Also the user-facing
//! example `deploy/examples/l7.yaml`: both planes take it (the proxy ACKs, Envoy
//! rejects no update) and answer its routes as the README says.
//!
//! These need `envoy` from `.tools/venv` (`cargo xtask test` installs it); see
//! `tests/support/envoy.rs`.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prism::demo::UPSTREAM_HEADER;
use serde_json::Value;
use support::envoy::{Ads, Envoy, acked_envoy_types};
use support::{Admin, ControlPlane, Proxy, Upstream, eventually, free_local_addr};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Requests sent through each plane to measure a weighted split.
const SPLIT_REQUESTS: u32 = 1000;
/// Requests sent through each plane to a backend with a dead endpoint.
const RETRY_REQUESTS: u32 = 200;
/// Probability, per share compared, that a correct split is still reported
/// as wrong; the tolerance follows from it (see [`share_tolerance`]).
const SPLIT_FALSE_ALARM: f64 = 1e-9;

/// The tolerance on a share measured over `n` independent draws such that a
/// correct split lands outside it with probability at most
/// [`SPLIT_FALSE_ALARM`]: Hoeffding's bound, `P(|X/n - p| >= t) <= 2
/// exp(-2 n t²)`, holds for any `p`. For 1,000 draws it is 0.103: a 3:1 split
/// served 1:1 (off by 0.25) cannot pass, and a correct one cannot fail.
fn share_tolerance(n: u32) -> f64 {
    ((2.0 / SPLIT_FALSE_ALARM).ln() / (2.0 * f64::from(n))).sqrt()
}

/// A plane under test: where to send requests.
struct Plane {
    name: &'static str,
    url: String,
}

/// An upstream that names itself (`x-prism-upstream`) and echoes what
/// reached it: method, path and query, host, and every `x-t-*` header.
struct Echo {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Echo {
    async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, mut stopped) = oneshot::channel::<()>();
        let name: Arc<str> = name.into();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    _ = &mut stopped => return,
                };
                let name = Arc::clone(&name);
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let name = Arc::clone(&name);
                        async move { Ok::<_, Infallible>(echo(&name, request).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            stop: Some(stop),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The echo of `request`, after `x-t-delay-ms` milliseconds when it says so.
async fn echo(name: &str, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let delay = request
        .headers()
        .get("x-t-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    if let Some(delay) = delay {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let host = request
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(request.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default()
        // Both planes route `host.` as `host`; Envoy (`strip_trailing_host_dot`)
        // also forwards it without the dot, the Prism proxy as sent.
        .trim_end_matches('.');
    let target = request.uri().path_and_query().map_or("", |p| p.as_str());
    let mut headers: Vec<String> = request
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-t-"))
        .map(|(name, value)| format!("{name}: {}", String::from_utf8_lossy(value.as_bytes())))
        .collect();
    headers.sort();
    let body = format!(
        "{} {target}\nhost={host}\n{}",
        request.method(),
        headers.join("\n")
    );
    Response::builder()
        .header(UPSTREAM_HEADER, name)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// What a client sees of one answer, as far as the policy decides it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    status: u16,
    /// The upstream that answered, if one did.
    upstream: Option<String>,
    /// What reached the upstream (its echo), or the body of an answer made
    /// by the proxy itself (a direct response; the proxies' own error pages
    /// differ and are left out).
    body: String,
    location: Option<String>,
    /// The media type of an answer made by the proxy itself, without
    /// parameters (`text/plain`, whatever the charset).
    content_type: Option<String>,
    /// `x-t-*` response headers, in order.
    headers: Vec<(String, String)>,
}

/// One request of the parity table.
struct Case {
    what: &'static str,
    method: &'static str,
    host: &'static str,
    target: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// Bytes of request body.
    body: usize,
    /// The upstream that must answer, or the status the proxy must give.
    expect: Expect,
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    Upstream(&'static str),
    Status(u16),
}

async fn send(http: &reqwest::Client, plane: &Plane, case: &Case) -> Option<Seen> {
    let method = reqwest::Method::from_bytes(case.method.as_bytes()).expect("a method");
    let mut request = http
        .request(method, format!("{}{}", plane.url, case.target))
        .header("host", case.host);
    for (name, value) in case.headers {
        request = request.header(*name, *value);
    }
    if case.body > 0 {
        request = request.body(vec![b'x'; case.body]);
    }
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let upstream = header(UPSTREAM_HEADER);
    let location = header("location");
    let content_type = header("content-type")
        .filter(|_| upstream.is_none())
        .map(|t| t.split(';').next().unwrap_or_default().trim().to_string());
    let headers = response
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-t-"))
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response.text().await.ok()?;
    let proxy_error = upstream.is_none() && status >= 400 && !is_direct(case);
    Some(Seen {
        status,
        upstream,
        body: if proxy_error { String::new() } else { body },
        location,
        content_type: content_type.filter(|_| !proxy_error),
        headers,
    })
}

/// Direct responses of the parity policy live under `/dr/`; every other
/// error without an upstream is a proxy's own (404, ...).
fn is_direct(case: &Case) -> bool {
    case.target.starts_with("/dr/")
}

/// The parity policy: every match kind and action, one echo upstream per
/// backend, so an answer names the route that took it.
fn parity_policy(upstreams: &BTreeMap<&str, Echo>, dead: SocketAddr) -> String {
    let backends: String = upstreams
        .iter()
        .map(|(name, echo)| {
            let ns = if name.starts_with("wild") {
                "wild"
            } else if *name == "catchall" {
                "other"
            } else {
                "par"
            };
            format!(
                "  - name: {ns}/{name}\n    endpoints: [{{address: \"{}\"}}]\n",
                echo.addr
            )
        })
        .collect();
    format!(
        r#"namespaces:
  - name: par
    hosts: [parity.test, "*.par.test"]
  - name: wild
    hosts: ["*.wild.test"]
  - name: other
    hosts: ["*"]
backends:
{backends}  - name: par/sticky
    lb_policy: RING_HASH
    hash_policy: {{header: x-t-user}}
    endpoints: [{{address: "{s1}"}}, {{address: "{s2}"}}, {{address: "{s3}"}}]
  - name: par/flaky
    lb_policy: RANDOM
    endpoints: [{{address: "{dead}"}}, {{address: "{live}"}}]
routes:
  - name: par/exact
    match: {{exact: /exact}}
    backend: exact
  - name: par/prefix
    match: {{prefix: /p/}}
    backend: prefix
  - name: par/prefix-long
    match: {{prefix: /p/long/}}
    backend: prefix-long
  - name: par/regex
    match: {{regex: "/r/[0-9]+"}}
    backend: regex
  - name: par/regex-alt
    match: {{regex: "/r/[a-z]+(/.*)?"}}
    backend: regex-alt
  - name: par/method-write
    match: {{exact: /m, methods: [POST, PUT]}}
    backend: method-write
  - name: par/method-any
    match: {{exact: /m}}
    backend: method-any
  - name: par/h-none
    match:
      prefix: /h/
      headers:
        - {{name: x-t-env, absent: true}}
        - {{name: x-t-ver, absent: true}}
        - {{name: x-t-flag, absent: true}}
    backend: h-none
  - name: par/h-exact
    match: {{prefix: /h/, headers: [{{name: x-t-env, exact: prod}}]}}
    backend: h-exact
  - name: par/h-regex
    match: {{prefix: /h/, headers: [{{name: x-t-ver, regex: "v[0-9]+"}}]}}
    backend: h-regex
  - name: par/h-present
    match: {{prefix: /h/, headers: [{{name: X-T-Flag, present: true}}]}}
    backend: h-present
  - name: par/q-none
    match:
      prefix: /q/
      query_params:
        - {{name: a, absent: true}}
        - {{name: b, absent: true}}
        - {{name: c, absent: true}}
    backend: q-none
  - name: par/q-exact
    match: {{prefix: /q/, query_params: [{{name: a, exact: "1"}}]}}
    backend: q-exact
  - name: par/q-regex
    match: {{prefix: /q/, query_params: [{{name: b, regex: "[a-z]+"}}]}}
    backend: q-regex
  - name: par/q-present
    match: {{prefix: /q/, query_params: [{{name: c, present: true}}]}}
    backend: q-present
  - name: par/rw-prefix
    match: {{prefix: /rw/p/}}
    backend: rewrite
    rewrite: {{prefix: /new/}}
  - name: par/rw-prefix-root
    match: {{prefix: /rw/root/}}
    backend: rewrite
    rewrite: {{prefix: /}}
  - name: par/rw-regex
    match: {{prefix: /rw/r/}}
    backend: rewrite
    rewrite: {{regex: {{pattern: "/rw/r/([a-z]+)/([0-9]+)", substitution: "/\\2/\\1"}}}}
  - name: par/rw-regex-all
    match: {{prefix: /rw/all/}}
    backend: rewrite
    rewrite: {{regex: {{pattern: "o", substitution: "0"}}}}
  - name: par/rw-host
    match: {{prefix: /rw/h/}}
    backend: rewrite
    rewrite: {{host: rewritten.test}}
    request_headers:
      set: [{{name: x-t-set, value: set}}]
      add: [{{name: x-t-add, value: added}}]
      remove: [x-t-remove]
    response_headers:
      set: [{{name: x-t-r-set, value: set}}]
      add: [{{name: x-t-r-add, value: added}}]
  - name: par/rd-https
    match: {{exact: /rd/https}}
    redirect: {{scheme: https, status: 301}}
  - name: par/rd-elsewhere
    match: {{exact: /rd/elsewhere}}
    redirect: {{host: other.test, port: 8443, path: /landing, status: 307}}
  - name: par/rd-path
    match: {{exact: /rd/path}}
    redirect: {{path: /moved}}
  - name: par/rd-port
    match: {{exact: /rd/port}}
    redirect: {{port: 9090, status: 308}}
  - name: par/rd-port80
    match: {{exact: /rd/port80}}
    redirect: {{port: 80}}
  - name: par/dr-teapot
    match: {{exact: /dr/teapot}}
    direct_response: {{status: 418, body: "short and stout"}}
  - name: par/dr-json
    match: {{exact: /dr/json}}
    direct_response: {{status: 200, body: "{{}}"}}
    response_headers:
      set: [{{name: content-type, value: application/json}}, {{name: x-t-direct, value: "yes"}}]
  - name: par/dr-empty
    match: {{exact: /dr/empty}}
    direct_response: {{status: 204}}
  - name: par/split
    match: {{prefix: /split/}}
    backends: [{{name: split-a, weight: 3}}, {{name: split-b, weight: 1}}]
  - name: par/retry
    match: {{prefix: /retry/}}
    backend: flaky
    retry: {{num_retries: 1, retry_on: [connect-failure]}}
  - name: par/slow
    match: {{prefix: /slow/}}
    backend: slow
    timeout: 0.5s
  - name: par/upload
    match: {{exact: /upload}}
    backend: upload
    max_request_body_bytes: 1024
  - name: par/sticky
    match: {{prefix: /sticky/}}
    backend: sticky
  - name: par/host-only
    match: {{host: only.par.test, prefix: /}}
    backend: host-only
  - name: wild/all
    match: {{prefix: /}}
    backend: wild
  - name: wild/special
    match: {{host: special.wild.test, prefix: /}}
    backend: wild-special
  - name: other/all
    match: {{prefix: /}}
    backend: catchall
"#,
        live = upstreams["retry-live"].addr,
        s1 = upstreams["sticky-1"].addr,
        s2 = upstreams["sticky-2"].addr,
        s3 = upstreams["sticky-3"].addr,
    )
}

/// The requests both planes must answer alike.
#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let case = |what, method, host, target, headers, expect| Case {
        what,
        method,
        host,
        target,
        headers,
        body: 0,
        expect,
    };
    use Expect::{Status, Upstream as Up};
    vec![
        // Hosts: exact (any case, with a port), wildcard, a route's own host,
        // the catch-all.
        case("exact host", "GET", "parity.test", "/exact", &[], Up("exact")),
        case("host in capitals", "GET", "PARITY.Test", "/exact", &[], Up("exact")),
        case("host with a port", "GET", "parity.test:8080", "/exact", &[], Up("exact")),
        case("wildcard host", "GET", "a.wild.test", "/x", &[], Up("wild")),
        case("wildcard, two labels", "GET", "a.b.wild.test", "/x", &[], Up("wild")),
        case("wildcard's own domain", "GET", "wild.test", "/x", &[], Up("catchall")),
        case("route host", "GET", "special.wild.test", "/x", &[], Up("wild-special")),
        case("route host under a namespace wildcard", "GET", "only.par.test", "/exact", &[], Up("host-only")),
        case("namespace wildcard", "GET", "any.par.test", "/exact", &[], Up("exact")),
        case("catch-all host", "GET", "nobody.test", "/anything", &[], Up("catchall")),
        case("host with a trailing dot", "GET", "parity.test.", "/exact", &[], Up("exact")),
        // Paths.
        case("exact path with a query", "GET", "parity.test", "/exact?x=1", &[], Up("exact")),
        case("exact path, trailing slash", "GET", "parity.test", "/exact/", &[], Status(404)),
        case("prefix", "GET", "parity.test", "/p/x", &[], Up("prefix")),
        case("longest prefix", "GET", "parity.test", "/p/long/x", &[], Up("prefix-long")),
        case("prefix is case-sensitive", "GET", "parity.test", "/P/x", &[], Status(404)),
        case("regex path", "GET", "parity.test", "/r/42", &[], Up("regex")),
        case("regex matches the whole path", "GET", "parity.test", "/r/42/x", &[], Status(404)),
        case("second regex", "GET", "parity.test", "/r/abc/def", &[], Up("regex-alt")),
        case("regex with a query", "GET", "parity.test", "/r/7?y=2", &[], Up("regex")),
        case("percent-encoded path", "GET", "parity.test", "/r/%34%32", &[], Status(404)),
        // Methods.
        case("method POST", "POST", "parity.test", "/m", &[], Up("method-write")),
        case("method PUT", "PUT", "parity.test", "/m", &[], Up("method-write")),
        case("method GET", "GET", "parity.test", "/m", &[], Up("method-any")),
        case("method DELETE", "DELETE", "parity.test", "/m", &[], Up("method-any")),
        // Headers.
        case("no header", "GET", "parity.test", "/h/x", &[], Up("h-none")),
        case("header exact", "GET", "parity.test", "/h/x", &[("x-t-env", "prod")], Up("h-exact")),
        case("header exact, other value", "GET", "parity.test", "/h/x", &[("x-t-env", "dev")], Status(404)),
        case("header exact, other case", "GET", "parity.test", "/h/x", &[("x-t-env", "PROD")], Status(404)),
        case("header regex", "GET", "parity.test", "/h/x", &[("x-t-ver", "v12")], Up("h-regex")),
        case("header regex, whole value", "GET", "parity.test", "/h/x", &[("x-t-ver", "v12-rc")], Status(404)),
        case("header present", "GET", "parity.test", "/h/x", &[("x-t-flag", "")], Up("h-present")),
        case("header present, any value", "GET", "parity.test", "/h/x", &[("x-t-flag", "on")], Up("h-present")),
        case("header repeated", "GET", "parity.test", "/h/x", &[("x-t-env", "prod"), ("x-t-env", "prod")], Up("h-exact")),
        case("header repeated, other value first", "GET", "parity.test", "/h/x", &[("x-t-env", "dev"), ("x-t-env", "prod")], Up("h-exact")),
        case("headers, first route wins", "GET", "parity.test", "/h/x", &[("x-t-env", "prod"), ("x-t-flag", "1")], Up("h-exact")),
        // Query parameters.
        case("no parameter", "GET", "parity.test", "/q/x", &[], Up("q-none")),
        case("empty query", "GET", "parity.test", "/q/x?", &[], Up("q-none")),
        case("parameter exact", "GET", "parity.test", "/q/x?a=1", &[], Up("q-exact")),
        case("parameter exact, other value", "GET", "parity.test", "/q/x?a=2", &[], Status(404)),
        case("parameter exact among others", "GET", "parity.test", "/q/x?z=0&a=1&y", &[], Up("q-exact")),
        case("parameter repeated: the first value counts", "GET", "parity.test", "/q/x?a=2&a=1", &[], Status(404)),
        case("parameter repeated, the first matches", "GET", "parity.test", "/q/x?a=1&a=2", &[], Up("q-exact")),
        case("parameter percent-encoded", "GET", "parity.test", "/q/x?a=%31", &[], Status(404)),
        case("parameter regex", "GET", "parity.test", "/q/x?b=abc", &[], Up("q-regex")),
        case("parameter regex, whole value", "GET", "parity.test", "/q/x?b=abc1", &[], Status(404)),
        case("parameter present", "GET", "parity.test", "/q/x?c=", &[], Up("q-present")),
        case("parameter present, no '='", "GET", "parity.test", "/q/x?c", &[], Up("q-present")),
        case("parameter name is exact", "GET", "parity.test", "/q/x?A=1", &[], Up("q-none")),
        // Rewrites and header changes.
        case("prefix rewrite", "GET", "parity.test", "/rw/p/a/b?k=v", &[], Up("rewrite")),
        case("prefix rewrite to /", "GET", "parity.test", "/rw/root/a", &[], Up("rewrite")),
        case("prefix rewrite of the prefix itself", "GET", "parity.test", "/rw/root/", &[], Up("rewrite")),
        case("regex rewrite", "GET", "parity.test", "/rw/r/abc/42?k=v", &[], Up("rewrite")),
        case("regex rewrite, no match", "GET", "parity.test", "/rw/r/42/abc", &[], Up("rewrite")),
        case("regex rewrite, every match", "GET", "parity.test", "/rw/all/foo/boo", &[], Up("rewrite")),
        case(
            "host rewrite and header changes",
            "GET",
            "parity.test",
            "/rw/h/x",
            &[("x-t-remove", "gone"), ("x-t-set", "old"), ("x-t-add", "first"), ("x-t-keep", "kept")],
            Up("rewrite"),
        ),
        // Redirects.
        case("redirect to https", "GET", "parity.test", "/rd/https?k=v", &[], Status(301)),
        case("redirect to https, with a port", "GET", "parity.test:8080", "/rd/https", &[], Status(301)),
        case("redirect to https, from port 80", "GET", "parity.test:80", "/rd/https", &[], Status(301)),
        case("redirect to https, from port 443", "GET", "parity.test:443", "/rd/https", &[], Status(301)),
        case("redirect elsewhere", "GET", "parity.test", "/rd/elsewhere?k=v", &[], Status(307)),
        case("redirect of the path", "GET", "parity.test:8080", "/rd/path?k=v", &[], Status(302)),
        case("redirect of the path, port 80", "GET", "parity.test:80", "/rd/path", &[], Status(302)),
        case("redirect of the port", "GET", "parity.test:8080", "/rd/port", &[], Status(308)),
        case("redirect to port 80", "GET", "parity.test:8080", "/rd/port80", &[], Status(302)),
        case("redirect of a POST", "POST", "parity.test", "/rd/path", &[], Status(302)),
        // Timeouts and body limits.
        case("within the timeout", "GET", "parity.test", "/slow/x", &[("x-t-delay-ms", "10")], Up("slow")),
        case("past the timeout", "GET", "parity.test", "/slow/x", &[("x-t-delay-ms", "2000")], Status(504)),
        Case { body: 1024, ..case("body at the limit", "POST", "parity.test", "/upload", &[], Up("upload")) },
        Case { body: 4096, ..case("body over the limit", "POST", "parity.test", "/upload", &[], Status(413)) },
        // Direct responses.
        case("direct response", "GET", "parity.test", "/dr/teapot", &[], Status(418)),
        case("direct response with headers", "GET", "parity.test", "/dr/json", &[], Status(200)),
        case("direct response without a body", "GET", "parity.test", "/dr/empty", &[], Status(204)),
        case("direct response to HEAD", "HEAD", "parity.test", "/dr/teapot", &[], Status(418)),
    ]
}

/// Waits until `plane` serves the parity policy: the first case of the
/// table through it reaches its upstream.
async fn until_serving(http: &reqwest::Client, plane: &Plane) {
    let probe = &cases()[0];
    eventually(
        &format!("{} serves the parity policy", plane.name),
        || async {
            send(http, plane, probe)
                .await
                .filter(|seen| seen.upstream.as_deref() == Some("exact"))
        },
    )
    .await;
}

/// The fleet entry of `node_id` once it has ACKed `revision` with no NACK.
async fn acked(admin: &Admin, node_id: &str, revision: u64) -> Option<Value> {
    let node = admin.proxy(node_id).await?;
    (node["acked_revision"].as_u64() == Some(revision)).then_some(node)
}

/// Waits until the Envoy `node_id` has ACKed every type at `revision` and
/// has rejected no update, by the control plane's account and its own.
async fn envoy_accepts(admin: &Admin, envoy: &Envoy, node_id: &str, revision: u64) {
    let node = eventually(
        &format!("Envoy {node_id} ACKs every type at revision {revision}"),
        || async {
            acked_envoy_types(admin, node_id)
                .await
                .filter(|node| node["acked_revision"].as_u64() == Some(revision))
        },
    )
    .await;
    assert!(node["last_nack"].is_null(), "Envoy rejected a push: {node}");
    let rejected = eventually("Envoy's update_rejected counters", || {
        envoy.rejected_updates()
    })
    .await;
    assert_eq!(rejected, 0, "Envoy's update_rejected counters");
}

/// One control plane, a Prism proxy and an Envoy; the parity policy; the
/// table sent through both, answer by answer; the split by share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prism_and_envoy_route_one_policy_alike() {
    const ENVOY_NODE: &str = "envoy-parity";
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = free_local_addr();
    let cp = ControlPlane::start_for_envoy(dir.path(), listener).await;
    let admin = cp.client();
    let mut upstreams = BTreeMap::new();
    for name in [
        "exact",
        "prefix",
        "prefix-long",
        "regex",
        "regex-alt",
        "method-write",
        "method-any",
        "h-none",
        "h-exact",
        "h-regex",
        "h-present",
        "q-none",
        "q-exact",
        "q-regex",
        "q-present",
        "rewrite",
        "split-a",
        "split-b",
        "retry-live",
        "slow",
        "upload",
        "sticky-1",
        "sticky-2",
        "sticky-3",
        "host-only",
        "wild",
        "wild-special",
        "catchall",
    ] {
        upstreams.insert(name, Echo::start(name).await);
    }
    // An address nothing listens on: connecting to it fails at once.
    let dead = free_local_addr();
    let revision = admin.apply(&parity_policy(&upstreams, dead)).await;

    let proxy = Proxy::start(&cp.xds, "prism-parity").await;
    let envoy = Envoy::start(cp.xds_addr, ENVOY_NODE, Ads::Delta);
    let prism = Plane {
        name: "Prism",
        url: proxy.url.clone(),
    };
    let envoy_plane = Plane {
        name: "Envoy",
        url: format!("http://{listener}"),
    };
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    proxy.converge(revision).await;
    let node = eventually("the Prism proxy ACKs the policy", || {
        acked(&admin, "prism-parity", revision)
    })
    .await;
    assert!(node["last_nack"].is_null(), "the proxy NACKed: {node}");
    envoy_accepts(&admin, &envoy, ENVOY_NODE, revision).await;
    until_serving(&http, &prism).await;
    until_serving(&http, &envoy_plane).await;

    let mut unexpected = Vec::new();
    let mut differences = Vec::new();
    for case in cases() {
        let on_prism = send(&http, &prism, &case).await.expect("Prism answers");
        let on_envoy = send(&http, &envoy_plane, &case)
            .await
            .expect("Envoy answers");
        let expected = match case.expect {
            Expect::Upstream(name) => on_prism.upstream.as_deref() == Some(name),
            Expect::Status(status) => on_prism.status == status && on_prism.upstream.is_none(),
        };
        if !expected {
            unexpected.push(format!(
                "{}: expected {:?}, Prism answered {on_prism:?}",
                case.what, case.expect
            ));
        }
        if on_prism != on_envoy {
            differences.push(format!(
                "{} ({} {} {}):\n  Prism {on_prism:?}\n  Envoy {on_envoy:?}",
                case.what, case.method, case.host, case.target
            ));
        }
    }
    assert!(
        unexpected.is_empty() && differences.is_empty(),
        "{} of {} requests answered against the policy:\n{}\n\
         {} answered differently by Prism and Envoy:\n{}",
        unexpected.len(),
        cases().len(),
        unexpected.join("\n"),
        differences.len(),
        differences.join("\n")
    );

    // The 3:1 split, by share, on each plane.
    let tolerance = share_tolerance(SPLIT_REQUESTS);
    let split = Case {
        what: "split",
        method: "GET",
        host: "parity.test",
        target: "/split/x",
        headers: &[],
        body: 0,
        expect: Expect::Upstream("split-a"),
    };
    for plane in [&prism, &envoy_plane] {
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for _ in 0..SPLIT_REQUESTS {
            let seen = send(&http, plane, &split).await.expect("an answer");
            assert_eq!(seen.status, 200, "{}: {seen:?}", plane.name);
            *counts.entry(seen.upstream.unwrap_or_default()).or_default() += 1;
        }
        assert!(
            counts.keys().all(|k| k == "split-a" || k == "split-b"),
            "{}: only the split's backends answer: {counts:?}",
            plane.name
        );
        let share = f64::from(counts.get("split-a").copied().unwrap_or_default())
            / f64::from(SPLIT_REQUESTS);
        assert!(
            (share - 0.75).abs() < tolerance,
            "{}: split-a took {share:.3} of {SPLIT_REQUESTS} requests, weight says 0.75 \
             (± {tolerance:.3}): {counts:?}",
            plane.name
        );
    }

    // A retry goes to an endpoint the request has not tried: with one dead
    // endpoint of two and one retry on connect failure, every request is
    // answered by the live one.
    let retry = Case {
        what: "retry",
        method: "GET",
        host: "parity.test",
        target: "/retry/x",
        headers: &[],
        body: 0,
        expect: Expect::Upstream("retry-live"),
    };
    for plane in [&prism, &envoy_plane] {
        let mut failed = 0;
        for _ in 0..RETRY_REQUESTS {
            let seen = send(&http, plane, &retry).await.expect("an answer");
            if seen.upstream.as_deref() != Some("retry-live") {
                failed += 1;
            }
        }
        assert_eq!(
            failed, 0,
            "{}: {failed} of {RETRY_REQUESTS} requests failed although their retry could go \
             to the live endpoint",
            plane.name
        );
    }

    // Consistent hashing on a header: each user sticks to one endpoint, and
    // the users spread over more than one (all 16 on one of three endpoints
    // by chance: once in 14 million runs). The two planes hash differently,
    // so which endpoint a user gets is not compared.
    for plane in [&prism, &envoy_plane] {
        let mut endpoints = std::collections::BTreeSet::new();
        for user in USERS {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..5 {
                let answer = http
                    .get(format!("{}/sticky/x", plane.url))
                    .header("host", "parity.test")
                    .header("x-t-user", user)
                    .send()
                    .await
                    .expect("an answer");
                seen.extend(
                    answer
                        .headers()
                        .get(UPSTREAM_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                );
            }
            assert_eq!(
                seen.len(),
                1,
                "{}: user {user} went to {seen:?}",
                plane.name
            );
            endpoints.extend(seen);
        }
        assert!(
            endpoints.len() > 1,
            "{}: every user went to {endpoints:?}",
            plane.name
        );
    }

    drop(envoy);
    proxy.stop().await;
    cp.stop().await;
}

/// Users of the consistent-hash check.
const USERS: [&str; 16] = [
    "ada",
    "alan",
    "barbara",
    "claude",
    "donald",
    "edsger",
    "frances",
    "grace",
    "john",
    "ken",
    "leslie",
    "margaret",
    "niklaus",
    "radia",
    "tony",
    "whitfield",
];

/// `deploy/examples/l7.yaml` with its endpoints moved to the test's
/// upstreams: 8081 (`demo`) and 8082 (`canary`), the discovery port (gRPC
/// health), and the proxy's TLS port (nothing listens: the upstream-TLS
/// route is not called here).
fn l7_example(demo: SocketAddr, canary: SocketAddr, xds: SocketAddr) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/l7.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/examples/l7.yaml");
    for endpoint in [
        "127.0.0.1:8081",
        "127.0.0.1:8082",
        "127.0.0.1:18000",
        "127.0.0.1:8443",
    ] {
        assert!(text.contains(endpoint), "l7.yaml names {endpoint}");
    }
    text.replace("127.0.0.1:8081", &demo.to_string())
        .replace("127.0.0.1:8082", &canary.to_string())
        .replace("127.0.0.1:18000", &xds.to_string())
        .replace("127.0.0.1:8443", &free_local_addr().to_string())
}

/// A request through `url` with `Host: host`: status, the named response
/// header, the upstream that answered, the body.
async fn l7_get(
    http: &reqwest::Client,
    url: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    header: &str,
) -> (u16, Option<String>, Option<String>, String) {
    let mut request = http.get(format!("{url}{path}")).header("host", host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("an answer");
    let value = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (status, header, upstream) = (
        response.status().as_u16(),
        value(header),
        value(UPSTREAM_HEADER),
    );
    (
        status,
        header,
        upstream,
        response.text().await.unwrap_or_default(),
    )
}

/// The answers the README shows for the L7 example, through `url`.
async fn l7_answers_as_documented(http: &reqwest::Client, plane: &str, url: &str) {
    let get =
        |host: &'static str,
         path: &'static str,
         headers: &'static [(&'static str, &'static str)],
         header: &'static str| { l7_get(http, url, host, path, headers, header) };
    // Redirect to the TLS listener.
    let (status, location, ..) = get("demo.local", "/old", &[], "location").await;
    assert_eq!(
        (status, location.as_deref()),
        (301, Some("https://demo.local:8443/")),
        "{plane}: /old"
    );
    // Direct response (a regex path).
    let (status, _, upstream, body) = get("demo.local", "/teapot", &[], "").await;
    assert_eq!(
        (status, upstream, body.as_str()),
        (418, None, "I'm a teapot, short and stout.\n"),
        "{plane}: /teapot"
    );
    // Header match: API v2 callers reach `canary`, path and host rewritten,
    // response headers changed; others reach `demo` as they asked.
    let (status, cache, upstream, body) = get(
        "demo.local",
        "/api/items",
        &[("x-version", "2")],
        "cache-control",
    )
    .await;
    assert_eq!(
        (status, cache.as_deref(), upstream.as_deref()),
        (200, Some("no-store"), Some("canary")),
        "{plane}: /api/items, x-version: 2"
    );
    assert!(
        body.contains("GET /v2/items host=api.internal"),
        "{plane}: {body}"
    );
    let (status, _, upstream, body) = get("demo.local", "/api/items", &[], "").await;
    assert_eq!(
        (status, upstream.as_deref()),
        (200, Some("demo")),
        "{plane}"
    );
    assert!(
        body.contains("GET /api/items host=demo.local"),
        "{plane}: {body}"
    );
    // Regex path rewritten by regex.
    let (_, _, upstream, body) = get("demo.local", "/users/42", &[], "").await;
    assert_eq!(upstream.as_deref(), Some("demo"), "{plane}: /users/42");
    assert!(
        body.contains("GET /people/42 host=demo.local"),
        "{plane}: {body}"
    );
    // A route for one host under the wildcard, and the catch-all host.
    let (status, _, _, body) = get("admin.demo.local", "/", &[], "").await;
    assert_eq!(
        (status, body.as_str()),
        (403, "admin.demo.local is closed.\n"),
        "{plane}"
    );
    let (status, served_by, upstream, _) = get("example.org", "/hello", &[], "x-served-by").await;
    assert_eq!(
        (status, served_by.as_deref(), upstream.as_deref()),
        (200, Some("fallback"), Some("demo")),
        "{plane}: another host"
    );
    // The canary split: both backends answer, with the prefix taken off.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let (status, _, upstream, body) = get("demo.local", "/shop/cart", &[], "").await;
        assert_eq!(status, 200, "{plane}: /shop/cart");
        assert!(
            body.contains("GET /cart host=demo.local"),
            "{plane}: {body}"
        );
        seen.extend(upstream);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["canary", "demo"],
        "{plane}: the canary split reaches both backends"
    );
}

/// The L7 example: the Prism proxy ACKs it and answers as the README says;
/// an Envoy fed by the same control plane rejects none of it and answers
/// alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_example_is_served_by_prism_and_envoy() {
    const ENVOY_NODE: &str = "envoy-l7-example";
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = free_local_addr();
    let cp = ControlPlane::start_for_envoy(dir.path(), listener).await;
    let admin = cp.client();
    let (demo, canary) = (
        Upstream::start("demo").await,
        Upstream::start("canary").await,
    );
    let revision = admin
        .apply(&l7_example(demo.addr, canary.addr, cp.xds_addr))
        .await;

    let proxy = Proxy::start(&cp.xds, "prism-l7-example").await;
    let envoy = Envoy::start(cp.xds_addr, ENVOY_NODE, Ads::Sotw);
    proxy.converge(revision).await;
    let node = eventually("the Prism proxy ACKs the L7 example", || {
        acked(&admin, "prism-l7-example", revision)
    })
    .await;
    assert!(node["last_nack"].is_null(), "the proxy NACKed: {node}");
    envoy_accepts(&admin, &envoy, ENVOY_NODE, revision).await;

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    l7_answers_as_documented(&http, "Prism", &proxy.url).await;
    let envoy_url = format!("http://{listener}");
    eventually("Envoy serves the L7 example", || async {
        let response = http
            .get(format!("{envoy_url}/"))
            .header("host", "demo.local")
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    l7_answers_as_documented(&http, "Envoy", &envoy_url).await;

    drop(envoy);
    proxy.stop().await;
    cp.stop().await;
}
