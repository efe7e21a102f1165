//! Namespace subsets: a proxy started with `namespaces: ["a"]` holds and
//! serves only namespace a, while an unfiltered proxy serves every namespace.
//! The filtering itself is the control plane's (by the `prism_namespaces`
//! node metadata); this test checks the whole path.

mod support;

use support::{ControlPlane, Proxy, Upstream, get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_filtered_proxy_holds_and_serves_only_its_namespaces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let (up_a, up_b) = (Upstream::start("up-a").await, Upstream::start("up-b").await);
    let filtered = Proxy::start_subset(&cp.xds, "proxy-a-only", &["a"]).await;
    let everything = Proxy::start(&cp.xds, "proxy-all").await;

    let revision = admin
        .apply(&format!(
            "namespaces:\n  - name: a\n    hosts: [a.test]\n  - name: b\n    hosts: [b.test]\n\
             backends:\n  - name: a/web\n    endpoints: [{{address: \"{}\"}}]\n\
             \x20 - name: b/web\n    endpoints: [{{address: \"{}\"}}]\n\
             routes:\n  - name: a/root\n    match: {{prefix: \"/\"}}\n    backend: web\n\
             \x20 - name: b/root\n    match: {{prefix: \"/\"}}\n    backend: web\n",
            up_a.addr, up_b.addr
        ))
        .await;
    filtered.converge(revision).await;
    everything.converge(revision).await;

    let names = |dump: serde_json::Value| -> Vec<String> {
        dump["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .map(|r| {
                format!(
                    "{}:{}",
                    r["kind"].as_str().unwrap_or(""),
                    r["name"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let held = names(filtered.config_dump().await.expect("config dump"));
    assert_eq!(
        held,
        ["Namespace:a", "Backend:a/web", "Route:a/root"],
        "only namespace a's resources"
    );
    assert_eq!(
        names(everything.config_dump().await.expect("config dump")).len(),
        6
    );

    let http = reqwest::Client::new();
    let a = get(&http, &filtered.url, "a.test", "/").await;
    assert_eq!((a.status, a.upstream.as_deref()), (200, Some("up-a")));
    assert_eq!(get(&http, &filtered.url, "b.test", "/").await.status, 404);
    for (host, upstream) in [("a.test", "up-a"), ("b.test", "up-b")] {
        let answer = get(&http, &everything.url, host, "/").await;
        assert_eq!(
            (answer.status, answer.upstream.as_deref()),
            (200, Some(upstream))
        );
    }

    filtered.stop().await;
    everything.stop().await;
    cp.stop().await;
}
