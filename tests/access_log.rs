//! The proxy's access log through its public surfaces: a proxy writing to
//! a file, a namespace with access logs on and one with them off, real
//! requests through the proxy; every line parses as JSON with the request's
//! values, and the quiet namespace's requests leave none.

mod support;

use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;
use support::{ControlPlane, Proxy, Scrape, Upstream, eventually, free_local_addr, get};

/// A W3C `traceparent` and the trace id in it.
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Namespace `shop` (logged) on `shop.test`: `/` to upstream `web`,
/// `/broken` to a backend where nothing listens (502), `/retrying` to the
/// same with two retries on connect failures, `/gone` answered 404 by the
/// route itself. Namespace `quiet` (not logged) on `quiet.test`:
/// `/` to `web` too.
fn policy(web: SocketAddr, dead: SocketAddr) -> String {
    format!(
        r#"
namespaces:
  - {{name: shop, hosts: [shop.test], access_log: {{enabled: true}}}}
  - {{name: quiet, hosts: [quiet.test]}}
backends:
  - {{name: shop/web, endpoints: [{{address: "{web}"}}]}}
  - {{name: shop/dead, endpoints: [{{address: "{dead}"}}]}}
  - {{name: quiet/web, endpoints: [{{address: "{web}"}}]}}
routes:
  - {{name: shop/root, match: {{prefix: /}}, backend: web}}
  - {{name: shop/broken, match: {{prefix: /broken}}, backend: dead}}
  - name: shop/retrying
    match: {{prefix: /retrying}}
    backend: dead
    retry: {{num_retries: 2, retry_on: [connect-failure], base_interval: 0.001s}}
  - {{name: shop/gone, match: {{prefix: /gone}}, direct_response: {{status: 404, body: "gone"}}}}
  - {{name: quiet/root, match: {{prefix: /}}, backend: web}}
"#
    )
}

/// Every line of the access log so far, each parsed as a JSON object.
fn lines(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            assert!(value.is_object(), "not an object: {line}");
            value
        })
        .collect()
}

/// The one line whose `path` is `path`.
fn line<'a>(lines: &'a [Value], path: &str) -> &'a Value {
    let found: Vec<&Value> = lines.iter().filter(|l| l["path"] == path).collect();
    assert_eq!(found.len(), 1, "lines for {path}: {lines:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logged_namespaces_write_one_json_line_per_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("access.log");
    let cp = ControlPlane::start(dir.path()).await;
    let proxy = Proxy::start_with_access_log(&cp.xds, "proxy-access-log", &file).await;
    let web = Upstream::start("web").await;
    let revision = cp
        .client()
        .apply(&policy(web.addr, free_local_addr()))
        .await;
    proxy.converge(revision).await;

    // The proxy's config_dump shows each namespace's switch.
    let dump = proxy.config_dump().await.expect("config_dump");
    let switch = |name: &str| {
        dump["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .find(|r| r["kind"] == "Namespace" && r["name"] == name)
            .map(|r| r["access_log"].clone())
    };
    assert_eq!(switch("shop"), Some(Value::Bool(true)), "{dump}");
    assert_eq!(switch("quiet"), Some(Value::Bool(false)), "{dump}");

    // The quiet namespace first; once its requests are counted, they have
    // passed the point where a line would have been queued.
    let http = reqwest::Client::new();
    for _ in 0..2 {
        assert_eq!(get(&http, &proxy.url, "quiet.test", "/q").await.status, 200);
    }
    eventually("the quiet requests are recorded", || async {
        let scrape = Scrape::of(&format!("{}/metrics", proxy.admin)).await;
        let done = scrape.sum("prism_proxy_requests_total", &[r#"namespace="quiet""#]);
        (done == 2.0).then_some(())
    })
    .await;

    let ok = get(&http, &proxy.url, "shop.test", "/items?page=2").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let posted = http
        .post(format!("{}/orders", proxy.url))
        .header("host", "shop.test")
        .header("traceparent", TRACEPARENT)
        .body("hello")
        .send()
        .await
        .expect("the proxy answers");
    assert_eq!(posted.status(), 200);
    let posted_bytes = posted.bytes().await.expect("body").len();
    assert_eq!(
        get(&http, &proxy.url, "shop.test", "/broken").await.status,
        502
    );
    assert_eq!(
        get(&http, &proxy.url, "shop.test", "/gone").await.status,
        404
    );
    assert_eq!(
        get(&http, &proxy.url, "shop.test", "/retrying")
            .await
            .status,
        502
    );

    let lines = eventually("five lines in the access log", || async {
        let lines = lines(&file);
        (lines.len() >= 5).then_some(lines)
    })
    .await;
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert!(
        lines.iter().all(|l| l["namespace"] == "shop"),
        "a line of a namespace without access logs: {lines:#?}"
    );

    let items = line(&lines, "/items?page=2");
    assert_eq!(items["route"], "root");
    assert_eq!(items["backend"], "web");
    assert_eq!(items["endpoint"], web.addr.to_string());
    assert_eq!(items["method"], "GET");
    assert_eq!(items["authority"], "shop.test");
    assert_eq!(items["protocol"], "HTTP/1.1");
    assert_eq!(items["status"], 200);
    assert_eq!(items["response_bytes"], ok.body.len());
    assert_eq!(items["request_bytes"], 0);
    assert_eq!(items["retries"], 0);
    assert_eq!(items["trace_id"], Value::Null);
    assert_eq!(items["listener"], "http");
    let client = items["client_address"].as_str().expect("a client address");
    assert!(client.starts_with("127.0.0.1:"), "{client}");
    let time = items["time"].as_str().expect("a time");
    // RFC 3339, UTC, milliseconds: 2026-11-28T13:05:09.042Z.
    assert_eq!(time.len(), 24, "{time}");
    assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
    let total = items["duration_ms"].as_f64().expect("a duration");
    let upstream = items["upstream_duration_ms"]
        .as_f64()
        .expect("an upstream duration");
    assert!(upstream > 0.0 && upstream <= total, "{items}");

    let orders = line(&lines, "/orders");
    assert_eq!(orders["method"], "POST");
    assert_eq!(orders["trace_id"], TRACE_ID);
    assert_eq!(orders["request_bytes"], 5);
    assert_eq!(orders["response_bytes"], posted_bytes);

    let broken = line(&lines, "/broken");
    assert_eq!(broken["status"], 502);
    assert_eq!(broken["route"], "broken");
    assert_eq!(broken["backend"], "dead");
    // Nothing answered: no endpoint, no upstream time.
    assert_eq!(broken["endpoint"], Value::Null);
    assert_eq!(broken["upstream_duration_ms"], Value::Null);
    assert_eq!(broken["retries"], 0);

    // Sent three times in all: the first try and two retries.
    let retrying = line(&lines, "/retrying");
    assert_eq!(retrying["status"], 502);
    assert_eq!(retrying["retries"], 2);

    let gone = line(&lines, "/gone");
    assert_eq!(gone["status"], 404);
    assert_eq!(gone["route"], "gone");
    assert_eq!(gone["backend"], Value::Null);
    assert_eq!(gone["response_bytes"], 4);

    // Nothing was dropped, and the counter is exported.
    let scrape = Scrape::of(&format!("{}/metrics", proxy.admin)).await;
    assert!(
        scrape
            .0
            .contains_key("prism_proxy_access_log_dropped_total"),
        "{scrape:?}"
    );
    assert_eq!(scrape.get("prism_proxy_access_log_dropped_total"), 0.0);
    proxy.stop().await;
}
