//! Live traffic from the fleet: the proxy of `prism up` reports its load to
//! the control plane over xDS's Load Reporting Service, and the admin API
//! serves it as JSON (`/v1/traffic`), as Server-Sent Events
//! (`/v1/traffic/stream`) and through `prism top`.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::{Admin, PrismUp, admin_token, eventually, get};
use tokio::io::AsyncBufReadExt as _;

/// The namespace `name` of a traffic summary.
fn namespace<'a>(summary: &'a Value, name: &str) -> Option<&'a Value> {
    summary["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["namespace"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_traffic_reaches_the_api_the_stream_and_top() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = PrismUp::start(dir.path(), &["--load-report-interval", "200ms"], &[]);
    let token = admin_token(&dir.path().join("prism-data/admin-token"));
    let admin = Admin::new(&up.admin(), &token);
    // A route to the demo upstream (health checked), and one to a port
    // nothing listens on (behind a circuit breaker): every request there
    // fails with a 5xx, and the breaker opens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    admin
        .apply(&format!(
            "namespaces:\n  - {{name: demo, hosts: [demo.local]}}\n  - {{name: shop, hosts: [shop.local]}}\n\
             backends:\n  - name: demo/web\n    endpoints: [{{address: \"{}\"}}]\n\
             \x20   health_check: {{interval: 1s, http: {{path: /}}}}\n\
             \x20 - name: demo/gone\n    endpoints: [{{address: \"{dead_addr}\"}}]\n\
             \x20   circuit_breaker: {{failure_threshold: 3, open_timeout: 60s}}\n\
             routes:\n  - name: demo/broken\n    match: {{prefix: \"/broken\"}}\n    backend: gone\n\
             \x20 - name: demo/root\n    match: {{prefix: \"/\"}}\n    backend: web\n",
            up.demo_addr()
        ))
        .await;
    let http = reqwest::Client::new();
    let proxy = &up.urls["proxy"];
    eventually("the proxy serves the policy", || async {
        (get(&http, proxy, "demo.local", "/").await.status == 200).then_some(())
    })
    .await;

    // Open the event stream first: it must carry the traffic that follows.
    let mut stream = http
        .get(format!("{}/v1/traffic/stream", up.admin()))
        .bearer_auth(&token)
        .send()
        .await
        .expect("the stream opens");
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream.headers()["content-type"],
        "text/event-stream",
        "{:?}",
        stream.headers()
    );

    for _ in 0..40 {
        assert_eq!(get(&http, proxy, "demo.local", "/").await.status, 200);
    }
    for _ in 0..10 {
        let status = get(&http, proxy, "demo.local", "/broken").await.status;
        assert!(status >= 500, "{status}");
    }

    // The 50 requests (and the one that waited for the policy) arrive in
    // the summary within a few reports.
    let summary = eventually("the traffic is reported", || async {
        let (status, summary) = admin
            .request(reqwest::Method::GET, "/v1/traffic", None)
            .await;
        assert_eq!(status, 200, "{summary}");
        let demo = namespace(&summary, "demo")?;
        (demo["requests"].as_u64() >= Some(50) && demo["errors"] == 10).then_some(summary)
    })
    .await;
    let demo = namespace(&summary, "demo").expect("demo");
    assert!(demo["rps"].as_f64().expect("rps") > 0.0, "{demo}");
    let error_rate = demo["error_rate"].as_f64().expect("error rate");
    assert!((0.15..0.25).contains(&error_rate), "10 of about 51: {demo}");
    let (p50, p99) = (
        demo["p50_ms"].as_f64().expect("p50"),
        demo["p99_ms"].as_f64().expect("p99"),
    );
    assert!(0.0 < p50 && p50 <= p99, "{demo}");
    assert!(
        demo["series"]
            .as_array()
            .expect("series")
            .iter()
            .any(|point| point["rps"].as_f64() > Some(0.0)),
        "a chart point with the traffic: {demo}"
    );
    let routes: Vec<(&str, &str, u64)> = summary["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .map(|r| {
            (
                r["route"].as_str().expect("route"),
                r["backend"].as_str().expect("backend"),
                r["errors"].as_u64().expect("errors"),
            )
        })
        .collect();
    assert_eq!(
        routes,
        [("broken", "gone", 10), ("root", "web", 0)],
        "{summary}"
    );
    let backends: Vec<&str> = summary["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["backend"].as_str().expect("backend"))
        .collect();
    assert_eq!(backends, ["gone", "web"]);
    // Each backend's endpoint as the proxy sees it.
    let endpoint = |backend: &str| {
        summary["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .find(|b| b["backend"] == backend)
            .map(|b| b["endpoints"][0].clone())
            .expect("an endpoint")
    };
    let gone = endpoint("gone");
    assert_eq!(gone["address"], dead_addr.to_string(), "{gone}");
    assert_eq!(
        (&gone["proxies"], &gone["breaker_open"], &gone["healthy"]),
        (&Value::from(1), &Value::from(1), &Value::from(0)),
        "one proxy sees its breaker open: {gone}"
    );
    let web = eventually("the health check passes", || async {
        let (_, summary) = admin
            .request(reqwest::Method::GET, "/v1/traffic", None)
            .await;
        let web = summary["backends"]
            .as_array()?
            .iter()
            .find(|b| b["backend"] == "web")?["endpoints"][0]
            .clone();
        (web["healthy"] == 1).then_some(web)
    })
    .await;
    assert_eq!(
        (&web["unhealthy"], &web["breaker_open"]),
        (&Value::from(0), &Value::from(0)),
        "{web}"
    );
    let proxies = summary["proxies"].as_array().expect("proxies");
    assert_eq!(proxies.len(), 1, "one proxy reports: {summary}");
    assert!(namespace(&summary, "shop").is_none(), "no traffic, no row");

    // The stream carries the same summaries as events.
    let mut seen = String::new();
    let event = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let chunk = stream
                .chunk()
                .await
                .expect("the stream goes on")
                .expect("a chunk");
            seen.push_str(&String::from_utf8_lossy(&chunk));
            // Complete events only: the last piece may be half of one.
            let complete = seen.rsplit_once("\n\n").map_or("", |(events, _)| events);
            let found = complete.split("\n\n").find_map(|event| {
                let data = event
                    .lines()
                    .find(|l| l.starts_with("event: traffic"))
                    .and(event.lines().find_map(|l| l.strip_prefix("data: ")))?;
                let summary: Value = serde_json::from_str(data).expect("JSON data");
                namespace(&summary, "demo")
                    .is_some_and(|d| d["errors"] == 10)
                    .then_some(summary)
            });
            if let Some(summary) = found {
                return summary;
            }
        }
    })
    .await
    .expect("an event with the traffic within 20 s");
    assert_eq!(event["interval_seconds"], 0.2);

    // `prism top --once` prints the table.
    let output = Command::new(env!("CARGO_BIN_EXE_prism"))
        .args(["top", "--once"])
        .env("PRISM_ADMIN_URL", up.admin())
        .env("PRISM_TOKEN", &token)
        .output()
        .expect("prism top runs");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        table.starts_with("traffic over the last 10 s, 1 proxy reporting\n"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("  broken -> gone "))
        .unwrap_or_else(|| panic!("a row for the broken route: {table}"));
    assert!(row.contains("100.0%"), "every request failed: {row}");

    // Live, `prism top` redraws from the event stream: piped, the tables
    // follow one another.
    let mut top = tokio::process::Command::new(env!("CARGO_BIN_EXE_prism"))
        .arg("top")
        .env("PRISM_ADMIN_URL", up.admin())
        .env("PRISM_TOKEN", &token)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("prism top starts");
    let mut lines = tokio::io::BufReader::new(top.stdout.take().expect("stdout")).lines();
    let tables = tokio::time::timeout(Duration::from_secs(20), async {
        let mut tables = 0;
        while let Some(line) = lines.next_line().await.expect("a line") {
            tables += usize::from(line.starts_with("traffic over the last"));
            if tables >= 2 && line.starts_with("  broken -> gone ") {
                return tables;
            }
        }
        panic!("prism top ended");
    })
    .await
    .expect("prism top redraws within 20 s");
    assert!(tables >= 2);
    drop(top);

    // A token for another namespace sees none of it.
    let (status, answer) = admin
        .request(
            reqwest::Method::POST,
            "/v1/tokens",
            Some((
                "application/json",
                r#"{"subject":"shop-team","role":"viewer","namespaces":["shop"]}"#.to_string(),
            )),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let shop = answer["token"].as_str().expect("token");
    let (status, scoped) = admin
        .request_as(shop, reqwest::Method::GET, "/v1/traffic", None)
        .await;
    assert_eq!(status, 200);
    assert!(namespace(&scoped, "demo").is_none(), "{scoped}");
    assert_eq!(scoped["proxies"], Value::Array(Vec::new()), "{scoped}");
}
