//! The proxy's Prometheus `/metrics` through its admin listener: the text
//! is well-formed OpenMetrics, and the series move by what requests and
//! applies did (a scrape before, requests, a scrape after).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use support::{ControlPlane, Proxy, Upstream, eventually, free_local_addr, get};

/// The OpenMetrics content type the proxy answers `/metrics` with.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every sample of `text`, by `name{labels}` as written, after checking the
/// text is OpenMetrics: each family declared once by `# HELP` and `# TYPE`
/// (and `# UNIT`, whose unit ends its name) before its samples, which are
/// contiguous and named as its type allows; histogram buckets cumulative up
/// to `+Inf`, which equals `_count`; the whole ended by one `# EOF`.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let body = text
        .strip_suffix("# EOF\n")
        .unwrap_or_else(|| panic!("no final `# EOF`:\n{text}"));
    let mut samples = BTreeMap::new();
    let mut declared = BTreeMap::<String, String>::new();
    let mut family: Option<(String, String)> = None;
    let mut helped = None;
    let mut bucket = None::<(String, f64)>;
    let name_ok = |name: &str| {
        !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            assert!(name_ok(name), "bad family name: {line}");
            helped = Some(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name type");
            assert_eq!(helped.as_deref(), Some(name), "TYPE without HELP: {line}");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unexpected type: {line}"
            );
            assert!(
                declared.insert(name.into(), kind.into()).is_none(),
                "family declared twice: {name}"
            );
            family = Some((name.into(), kind.into()));
        } else if let Some(rest) = line.strip_prefix("# UNIT ") {
            let (name, unit) = rest.split_once(' ').expect("UNIT name unit");
            assert_eq!(family.as_ref().map(|f| f.0.as_str()), Some(name), "{line}");
            assert!(name.ends_with(&format!("_{unit}")), "{line}");
        } else {
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.strip_suffix('}').expect("closing }")),
                None => (series, ""),
            };
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let (key, quoted) = pair.split_once('=').expect("label=value");
                assert!(name_ok(key), "bad label name: {line}");
                assert!(
                    quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'),
                    "unquoted label value: {line}"
                );
            }
            let (family_name, kind) = family
                .as_ref()
                .unwrap_or_else(|| panic!("a sample before any TYPE: {line}"));
            let suffix = name
                .strip_prefix(family_name.as_str())
                .unwrap_or_else(|| panic!("{name} outside its family {family_name}"));
            let allowed: &[&str] = match kind.as_str() {
                "counter" => &["_total"],
                "gauge" => &[""],
                _ => &["_bucket", "_sum", "_count"],
            };
            assert!(allowed.contains(&suffix), "{name} in a {kind}: {line}");
            if suffix == "_bucket" {
                // Cumulative within one series: each bound at least the last.
                let le = labels.split(',').next().unwrap_or_default();
                let rest = labels.split_once(',').map_or("", |(_, r)| r).to_string();
                if let Some((previous_rest, previous)) = &bucket
                    && *previous_rest == rest
                {
                    assert!(value >= *previous, "buckets not cumulative: {line}");
                }
                bucket = Some((rest.clone(), value));
                if le == r#"le="+Inf""# {
                    let count = format!("{family_name}_count{{{rest}}}");
                    assert_eq!(
                        samples.get(&count),
                        Some(&value),
                        "+Inf is not _count: {line}"
                    );
                }
            }
            assert!(
                samples.insert(series.to_string(), value).is_none(),
                "sample twice: {line}"
            );
        }
    }
    assert!(!samples.is_empty(), "no samples:\n{text}");
    samples
}

/// The proxy's metrics, checked to be OpenMetrics, by sample.
async fn scrape(proxy: &Proxy) -> BTreeMap<String, f64> {
    let (status, content_type, text) = proxy.metrics().await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(content_type, OPENMETRICS);
    parse(&text)
}

/// The value of `name{labels}`, failing the test when the series is missing.
fn value(samples: &BTreeMap<String, f64>, name: &str, labels: &str) -> f64 {
    let key = match labels {
        "" => name.to_string(),
        labels => format!("{name}{{{labels}}}"),
    };
    *samples
        .get(&key)
        .unwrap_or_else(|| panic!("no {key} in {samples:#?}"))
}

/// How much `name{labels}` grew from `before` to `after`.
fn grew(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    name: &str,
    labels: &str,
) -> f64 {
    value(after, name, labels) - value(before, name, labels)
}

/// Namespace `shop` on `shop.test`: `/` to upstream `web`, `/broken` to a
/// backend where nothing listens (502).
fn shop(web: SocketAddr, dead: SocketAddr) -> String {
    format!(
        r#"
namespaces: [{{name: shop, hosts: [shop.test]}}]
backends:
  - {{name: shop/web, endpoints: [{{address: "{web}"}}]}}
  - {{name: shop/dead, endpoints: [{{address: "{dead}"}}]}}
routes:
  - {{name: shop/root, match: {{prefix: /}}, backend: web}}
  - {{name: shop/broken, match: {{prefix: /broken}}, backend: dead}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_series_move_by_what_the_requests_did() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let proxy = Proxy::start(&cp.xds, "proxy-metrics").await;
    let web = Upstream::start("web").await;
    let revision = admin.apply(&shop(web.addr, free_local_addr())).await;
    proxy.converge(revision).await;
    let before = scrape(&proxy).await;

    let http = reqwest::Client::new();
    let mut response_bytes = 0;
    for _ in 0..3 {
        let answer = get(&http, &proxy.url, "shop.test", "/items").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        response_bytes += answer.body.len();
    }
    let posted = http
        .post(format!("{}/orders", proxy.url))
        .header("host", "shop.test")
        .body("hello")
        .send()
        .await
        .expect("the proxy answers");
    assert_eq!(posted.status(), 200);
    response_bytes += posted.bytes().await.expect("body").len();
    assert_eq!(
        get(&http, &proxy.url, "shop.test", "/broken").await.status,
        502
    );
    assert_eq!(
        get(&http, &proxy.url, "nowhere.test", "/").await.status,
        404
    );

    // A request is recorded when its response body has ended at the proxy,
    // which may come a moment after the client has read it.
    let root = r#"namespace="shop",route="root",backend="web""#;
    let after = eventually("the requests are recorded", || async {
        let now = scrape(&proxy).await;
        let done = grew(
            &before,
            &now,
            "prism_proxy_request_duration_seconds_count",
            root,
        );
        (done == 4.0).then_some(now)
    })
    .await;
    let requests = |labels: &str| grew(&before, &after, "prism_proxy_requests_total", labels);
    assert_eq!(requests(&format!(r#"{root},code_class="2xx""#)), 4.0);
    assert_eq!(requests(&format!(r#"{root},code_class="5xx""#)), 0.0);
    assert_eq!(
        requests(r#"namespace="shop",route="broken",backend="dead",code_class="5xx""#),
        1.0
    );
    assert_eq!(
        requests(r#"namespace="",route="unmatched",backend="",code_class="4xx""#),
        1.0
    );
    assert_eq!(
        grew(&before, &after, "prism_proxy_request_bytes_total", root),
        5.0
    );
    assert_eq!(
        grew(&before, &after, "prism_proxy_response_bytes_total", root),
        response_bytes as f64
    );
    // Four tries reached upstream `web`; the dead one never answered.
    assert_eq!(
        grew(
            &before,
            &after,
            "prism_proxy_upstream_duration_seconds_count",
            r#"namespace="shop",backend="web""#
        ),
        4.0
    );
    assert_eq!(
        grew(
            &before,
            &after,
            "prism_proxy_upstream_duration_seconds_count",
            r#"namespace="shop",backend="dead""#
        ),
        0.0
    );
    assert_eq!(
        value(&after, "prism_proxy_config_revision", ""),
        revision as f64
    );
    // reqwest keeps its connection open: it is counted on the listener.
    assert!(
        value(
            &after,
            "prism_proxy_active_connections",
            r#"listener="http""#
        ) >= 1.0
    );

    // A removed route's series leave the scrape once no request holds them.
    admin
        .request(reqwest::Method::DELETE, "/v1/routes/shop/broken", None)
        .await;
    eventually("the removed route's series go", || async {
        let now = scrape(&proxy).await;
        (!now.keys().any(|k| k.contains(r#"route="broken""#))).then_some(())
    })
    .await;
    let now = scrape(&proxy).await;
    assert_eq!(
        value(
            &now,
            "prism_proxy_requests_total",
            &format!(r#"{root},code_class="2xx""#)
        ),
        value(
            &after,
            "prism_proxy_requests_total",
            &format!(r#"{root},code_class="2xx""#)
        ),
        "a route that survives an apply keeps its counts"
    );

    proxy.stop().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_are_counted_by_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let proxy = Proxy::start(&cp.xds, "proxy-applies").await;
    let web = Upstream::start("web").await;
    let accepted = admin.apply(&shop(web.addr, free_local_addr())).await;
    proxy.converge(accepted).await;
    let acked = |samples: &BTreeMap<String, f64>| {
        value(
            samples,
            "prism_proxy_config_applies_total",
            r#"outcome="ack""#,
        )
    };
    let nacked = |samples: &BTreeMap<String, f64>| {
        value(
            samples,
            "prism_proxy_config_applies_total",
            r#"outcome="nack""#,
        )
    };
    // The ACK is counted as the proxy sends it, after /config_dump moved.
    let before = eventually("the ACK is counted", || async {
        let now = scrape(&proxy).await;
        (acked(&now) >= 1.0).then_some(now)
    })
    .await;
    assert_eq!(
        value(&before, "prism_proxy_config_revision", ""),
        accepted as f64
    );

    // A backend that points back at the proxy passes the control plane but
    // not the proxy: a NACK, and the revision served stays.
    let looping = admin.apply(&shop(web.addr, proxy.addr)).await;
    let after = eventually("the NACK is counted", || async {
        let now = scrape(&proxy).await;
        (nacked(&now) > nacked(&before)).then_some(now)
    })
    .await;
    assert!(looping > accepted);
    assert_eq!(nacked(&after) - nacked(&before), 1.0);
    assert_eq!(acked(&after), acked(&before));
    assert_eq!(
        value(&after, "prism_proxy_config_revision", ""),
        accepted as f64
    );

    // The next good revision is served and ACKed.
    let fixed = admin.apply(&shop(web.addr, free_local_addr())).await;
    let later = eventually("the next ACK is counted", || async {
        let now = scrape(&proxy).await;
        (value(&now, "prism_proxy_config_revision", "") == fixed as f64).then_some(now)
    })
    .await;
    assert_eq!(acked(&later) - acked(&after), 1.0);

    proxy.stop().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilience_features_count_where_they_act() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let proxy = Proxy::start(&cp.xds, "proxy-resilience").await;
    let web = Upstream::start("web").await;
    let dead = free_local_addr();
    let policy = format!(
        r#"
namespaces: [{{name: ops, hosts: [ops.test]}}]
backends:
  - name: ops/checked
    endpoints: [{{address: "{web}"}}]
    health_check: {{http: {{path: /healthz}}}}
  - name: ops/breaking
    endpoints: [{{address: "{dead}"}}]
    circuit_breaker: {{failure_threshold: 1}}
  - name: ops/ejecting
    endpoints: [{{address: "{dead}"}}]
    outlier_detection: {{consecutive_gateway_failure: 1, max_ejection_percent: 100}}
  - name: ops/retrying
    endpoints: [{{address: "{dead}"}}]
routes:
  - {{name: ops/checked, match: {{prefix: /checked}}, backend: checked}}
  - {{name: ops/breaking, match: {{prefix: /breaking}}, backend: breaking}}
  - {{name: ops/ejecting, match: {{prefix: /ejecting}}, backend: ejecting}}
  - name: ops/retrying
    match: {{prefix: /retrying}}
    backend: retrying
    retry: {{num_retries: 2, retry_on: [connect-failure], base_interval: 0.001s}}
  - name: ops/limited
    match: {{prefix: /limited}}
    backend: checked
    rate_limits: [{{requests_per_second: 1, burst: 1}}]
"#,
        web = web.addr
    );
    let revision = admin.apply(&policy).await;
    proxy.converge(revision).await;
    let backend = |name: &str| format!(r#"namespace="ops",backend="{name}""#);

    // The health checker probes at once: a pass, no failure.
    let probed = eventually("a health check passes", || async {
        let now = scrape(&proxy).await;
        let label = format!(r#"{},result="success""#, backend("checked"));
        (value(&now, "prism_proxy_health_checks_total", &label) >= 1.0).then_some(now)
    })
    .await;
    let label = format!(r#"{},result="failure""#, backend("checked"));
    assert_eq!(
        value(&probed, "prism_proxy_health_checks_total", &label),
        0.0
    );
    let before = probed;

    let http = reqwest::Client::new();
    // One connect failure opens the breaker, and ejects the outlier.
    assert_eq!(
        get(&http, &proxy.url, "ops.test", "/breaking").await.status,
        502
    );
    assert_eq!(
        get(&http, &proxy.url, "ops.test", "/ejecting").await.status,
        502
    );
    // Two retries after the first try, all refused.
    assert_eq!(
        get(&http, &proxy.url, "ops.test", "/retrying").await.status,
        502
    );
    // One token a second: of three requests at once, the refused ones.
    let mut limited = 0.0;
    for _ in 0..3 {
        if get(&http, &proxy.url, "ops.test", "/limited").await.status == 429 {
            limited += 1.0;
        }
    }
    assert!(limited >= 1.0, "a burst of one refuses some of three");

    let after = scrape(&proxy).await;
    let transitions = |state: &str| {
        let label = format!(r#"{},state="{state}""#, backend("breaking"));
        grew(
            &before,
            &after,
            "prism_proxy_breaker_transitions_total",
            &label,
        )
    };
    assert_eq!(transitions("open"), 1.0);
    assert_eq!(transitions("half_open"), 0.0);
    assert_eq!(transitions("closed"), 0.0);
    assert_eq!(
        grew(
            &before,
            &after,
            "prism_proxy_outlier_ejections_total",
            &backend("ejecting")
        ),
        1.0
    );
    assert_eq!(
        grew(
            &before,
            &after,
            "prism_proxy_outlier_ejections_total",
            &backend("breaking")
        ),
        0.0
    );
    assert_eq!(
        grew(
            &before,
            &after,
            "prism_proxy_retries_total",
            &backend("retrying")
        ),
        2.0
    );
    assert_eq!(
        grew(
            &before,
            &after,
            "prism_proxy_ratelimit_rejections_total",
            r#"namespace="ops""#
        ),
        limited
    );

    proxy.stop().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_metrics_off_the_proxy_serves_and_metrics_answer_404() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let proxy = Proxy::start_without_metrics(&cp.xds, "proxy-quiet").await;
    let web = Upstream::start("web").await;
    let revision = admin.apply(&shop(web.addr, free_local_addr())).await;
    proxy.converge(revision).await;
    let http = reqwest::Client::new();
    assert_eq!(get(&http, &proxy.url, "shop.test", "/").await.status, 200);
    let (status, _, text) = proxy.metrics().await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("metrics are off"), "{text}");

    proxy.stop().await;
    cp.stop().await;
}
