//! The whole loop through public surfaces: policy in through the admin API,
//! pushed over xDS, proxied request out.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use reqwest::Method;
use support::{Admin, ControlPlane, Proxy, Scrape, Upstream, eventually, get, policy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reaches_the_proxy_and_follows_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let proxy = Proxy::start(&cp.xds, "proxy-follow").await;
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let http = reqwest::Client::new();

    let revision = admin
        .apply(&policy("shop", "shop.test", "blue", blue.addr, "/"))
        .await;
    proxy.converge(revision).await;
    let answer = get(&http, &proxy.url, "shop.test", "/cart").await;
    assert_eq!(
        (answer.status, answer.upstream.as_deref()),
        (200, Some("blue")),
        "{answer:?}"
    );
    assert!(
        answer.body.contains("GET /cart host=shop.test"),
        "path and host reach the upstream: {answer:?}"
    );
    // The Host header may carry a port; the route still matches.
    assert_eq!(
        get(&http, &proxy.url, "shop.test:8080", "/")
            .await
            .upstream
            .as_deref(),
        Some("blue")
    );

    // Other hosts and paths the policy does not name get a short 404.
    let unknown = get(&http, &proxy.url, "other.test", "/").await;
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.body.len() < 200 && unknown.body.contains("other.test"),
        "{unknown:?}"
    );

    // Point the route at a new backend: requests follow within the deadline.
    let revision = admin
        .apply(&policy("shop", "shop.test", "green", green.addr, "/"))
        .await;
    eventually("requests reach green", || async {
        (get(&http, &proxy.url, "shop.test", "/")
            .await
            .upstream
            .as_deref()
            == Some("green"))
        .then_some(())
    })
    .await;
    proxy.converge(revision).await;

    // Delete the route: 404.
    let (status, body) = admin
        .request(Method::DELETE, "/v1/routes/shop/root", None)
        .await;
    assert_eq!(status, 200, "{body}");
    eventually("the deleted route answers 404", || async {
        (get(&http, &proxy.url, "shop.test", "/").await.status == 404).then_some(())
    })
    .await;

    // The fleet view shows the proxy at the newest revision.
    let newest = admin.revision().await;
    proxy.converge(newest).await;
    let fleet = eventually("fleet shows the ACK", || async {
        let fleet = admin.proxies().await;
        (fleet["proxies"][0]["acked_revision"].as_u64() == Some(newest)).then_some(fleet)
    })
    .await;
    assert_eq!(fleet["proxies"][0]["id"], "proxy-follow");
    assert_eq!(fleet["proxies"][0]["zone"], "zone-a");
    assert_eq!(fleet["proxies"][0]["lag"], 0);

    proxy.stop().await;
    cp.stop().await;
}

/// Config A sends `/a` to upstream A; config B sends `/b` to upstream B; both
/// through one backend `web` whose endpoint flips with the route. A mix of the
/// two (route of one, backend of the other) would send `/a` to B or `/b` to A.
fn flip(addr: std::net::SocketAddr, prefix: &str) -> String {
    policy("flip", "flip.test", "web", addr, prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_are_atomic_under_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let proxy = Proxy::start(&cp.xds, "proxy-flip").await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let revision = admin.apply(&flip(a.addr, "/a")).await;
    proxy.converge(revision).await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let client = {
        let (stop, seen, url) = (Arc::clone(&stop), Arc::clone(&seen), proxy.url.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut mixes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for path in ["/a", "/b"] {
                    let answer = get(&http, &url, "flip.test", path).await;
                    match (path, answer.status, answer.upstream.as_deref()) {
                        ("/a", 200, Some("a")) => seen[0].fetch_add(1, Ordering::Relaxed),
                        ("/b", 200, Some("b")) => seen[1].fetch_add(1, Ordering::Relaxed),
                        (_, 404, None) => seen[2].fetch_add(1, Ordering::Relaxed),
                        _ => {
                            mixes.push(format!("{path} -> {answer:?}"));
                            0
                        }
                    };
                }
            }
            mixes
        })
    };

    for i in 0..30 {
        let document = if i % 2 == 0 {
            flip(b.addr, "/b")
        } else {
            flip(a.addr, "/a")
        };
        let revision = admin.apply(&document).await;
        proxy.converge(revision).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mixes = client.await.expect("client task");
    assert!(
        mixes.is_empty(),
        "responses from a half-applied config: {mixes:?}"
    );
    let counts: Vec<usize> = seen.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert!(
        counts.iter().all(|c| *c > 0),
        "the client saw both configs and the gaps between them: {counts:?}"
    );

    proxy.stop().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_config_is_nacked_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let proxy = Proxy::start(&cp.xds, "proxy-nack").await;
    let good = Upstream::start("good").await;
    let http = reqwest::Client::new();
    let accepted = admin
        .apply(&policy("app", "app.test", "web", good.addr, "/"))
        .await;
    proxy.converge(accepted).await;

    // The control plane cannot know the proxy's own address; the proxy can, and
    // refuses a backend that would send requests back into itself.
    let looping = admin
        .apply(&policy("app", "app.test", "web", proxy.addr, "/"))
        .await;
    assert!(looping > accepted);
    let nack = eventually("the control plane records the NACK", || async {
        let fleet = admin.proxies().await;
        let nack = fleet["proxies"][0]["last_nack"].clone();
        (nack["revision"].as_u64() == Some(looping)).then_some(nack)
    })
    .await;
    let message = nack["message"].as_str().expect("message");
    assert!(
        message.contains(&proxy.addr.to_string()) && message.contains("loop"),
        "{message}"
    );

    // The proxy still serves the accepted revision.
    assert_eq!(proxy.revision().await, Some(accepted));
    for _ in 0..20 {
        assert_eq!(
            get(&http, &proxy.url, "app.test", "/")
                .await
                .upstream
                .as_deref(),
            Some("good")
        );
    }
    let fleet = admin.proxies().await;
    assert_eq!(
        fleet["proxies"][0]["acked_revision"].as_u64(),
        Some(accepted)
    );
    assert_eq!(
        fleet["proxies"][0]["lag"].as_u64(),
        Some(looping - accepted)
    );

    // A fixed policy is accepted again.
    let other = Upstream::start("other").await;
    let fixed = admin
        .apply(&policy("app", "app.test", "web", other.addr, "/"))
        .await;
    proxy.converge(fixed).await;
    assert_eq!(
        get(&http, &proxy.url, "app.test", "/")
            .await
            .upstream
            .as_deref(),
        Some("other")
    );

    proxy.stop().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_input_is_refused_with_the_field_named_and_nothing_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let up = Upstream::start("up").await;
    let revision = admin
        .apply(&policy("app", "app.test", "web", up.addr, "/"))
        .await;
    let snapshot_before = admin.request(Method::GET, "/v1/backends", None).await;

    // (method, path, body, expected status, text the error must contain)
    type Case<'a> = (Method, &'a str, Option<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            Method::POST,
            "/v1/backends",
            Some(("application/json", "{\"name\": \"app/x\",".into())),
            400,
            "EOF",
        ),
        (
            Method::POST,
            "/v1/apply",
            Some(("application/yaml", "backends: [name: {".into())),
            400,
            "",
        ),
        (
            Method::POST,
            "/v1/apply",
            Some(("application/yaml", "widgets:\n  - name: x\n".into())),
            400,
            "widgets",
        ),
        (Method::GET, "/v1/widgets", None, 404, "widgets"),
        (
            Method::POST,
            "/v1/widgets",
            Some(("application/json", "{}".into())),
            404,
            "widgets",
        ),
        (
            Method::POST,
            "/v1/backends",
            Some(("application/json", "{\"name\": \"app/empty\"}".into())),
            400,
            "endpoints",
        ),
        (
            Method::POST,
            "/v1/routes",
            Some((
                "application/json",
                "{\"name\": \"app/r2\", \"match\": {\"prefix\": \"/x\"}, \"backend\": \"ghost\"}"
                    .into(),
            )),
            400,
            "app/ghost",
        ),
        (
            Method::POST,
            "/v1/apply",
            Some((
                "application/yaml",
                format!(
                    "{}routes:\n  - name: app/r3\n    match: {{prefix: /y}}\n    backend: nope\n",
                    "backends:\n  - name: app/web2\n    endpoints: [{address: \"127.0.0.1:1\"}]\n"
                ),
            )),
            400,
            "app/nope",
        ),
        (Method::DELETE, "/v1/backends/app/web", None, 400, "backend"),
        (
            Method::DELETE,
            "/v1/routes/app/missing",
            None,
            404,
            "app/missing",
        ),
    ];
    for (method, path, body, want_status, want_text) in cases {
        let (status, answer) = admin.request(method.clone(), path, body).await;
        assert_eq!(status, want_status, "{method} {path}: {answer}");
        let error = &answer["error"];
        assert!(
            error["message"].is_string(),
            "{method} {path}: error shape: {answer}"
        );
        assert!(
            answer.to_string().contains(want_text),
            "{method} {path}: expected `{want_text}` in {answer}"
        );
    }
    // Missing fields are named by path.
    let (_, answer) = admin
        .request(
            Method::POST,
            "/v1/backends",
            Some((
                "application/json",
                "{\"name\": \"app/x\", \"endpoints\": [{\"address\": \"nope\"}]}".into(),
            )),
        )
        .await;
    assert_eq!(answer["error"]["field"], "endpoints[0].address", "{answer}");

    assert_eq!(
        admin.revision().await,
        revision,
        "a refused write changes nothing"
    );
    assert_eq!(
        admin.request(Method::GET, "/v1/backends", None).await,
        snapshot_before
    );
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_shows_the_diff_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin: Admin = cp.client();
    let up = Upstream::start("up").await;
    let document = policy("app", "app.test", "web", up.addr, "/");
    let (status, answer) = admin
        .request(
            Method::POST,
            "/v1/apply?dry_run=true",
            Some(("application/yaml", document.clone())),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["changes"].as_array().map(Vec::len),
        Some(3),
        "{answer}"
    );
    assert_eq!(admin.revision().await, 0);
    let revision = admin.apply(&document).await;
    assert_eq!(revision, 1);
    // Applying the same document again is not a new revision.
    assert_eq!(admin.apply(&document).await, 1);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_metrics_move_with_writes_pushes_acks_and_nacks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let metrics = format!("{}/metrics", cp.admin);
    let up = Upstream::start("up").await;
    let before = Scrape::of(&metrics).await;
    assert_eq!(before.get("prism_control_plane_revision"), 0.0);
    assert_eq!(before.get("prism_control_plane_proxies_connected"), 0.0);

    let proxy = Proxy::start(&cp.xds, "proxy-metrics").await;
    let accepted = admin
        .apply(&policy("app", "app.test", "web", up.addr, "/"))
        .await;
    proxy.converge(accepted).await;
    let (status, _) = admin
        .request(
            Method::POST,
            "/v1/namespaces",
            Some((
                "application/json",
                r#"{"name": "app", "hosts": ["x.test"]}"#.into(),
            )),
        )
        .await;
    assert_eq!(status, 409, "a second namespace `app` is refused");
    // The proxy refuses a backend that loops back into itself: a NACK.
    let looping = admin
        .apply(&policy("app", "app.test", "web", proxy.addr, "/"))
        .await;
    eventually("the NACK is recorded", || async {
        let fleet = admin.proxies().await;
        (fleet["proxies"][0]["last_nack"]["revision"].as_u64() == Some(looping)).then_some(())
    })
    .await;

    let after = Scrape::of(&metrics).await;
    assert_eq!(after.get("prism_control_plane_revision"), looping as f64);
    assert_eq!(after.get("prism_control_plane_proxies_connected"), 1.0);
    assert_eq!(after.get("prism_control_plane_proxies_behind"), 1.0);
    let writes = |outcome: &str| {
        after.get(&format!(
            "prism_control_plane_writes_total{{action=\"apply\",outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(writes("committed"), 2.0, "{after:?}");
    assert_eq!(
        after.get("prism_control_plane_writes_total{action=\"create\",outcome=\"refused\"}"),
        1.0
    );
    assert_eq!(
        after.get("prism_control_plane_discovery_streams{variant=\"delta\"}"),
        1.0
    );
    let pushes = after.sum(
        "prism_control_plane_discovery_pushes_total",
        &[r#"variant="delta""#],
    );
    assert!(
        pushes >= 10.0,
        "two batches of five kinds at least: {pushes}"
    );
    assert!(
        after.sum(
            "prism_control_plane_discovery_replies_total",
            &[r#"outcome="ack""#]
        ) >= 5.0
    );
    // The proxy answers each response of the rejected batch: five NACKs.
    assert_eq!(
        after.sum(
            "prism_control_plane_discovery_replies_total",
            &[r#"outcome="nack""#]
        ),
        5.0,
        "{after:?}"
    );
    assert!(after.get("prism_control_plane_discovery_push_to_ack_seconds_count") >= 1.0);
    assert_eq!(
        after.get("prism_control_plane_store_flush_seconds_count"),
        2.0
    );

    proxy.stop().await;
    let gone = eventually("the stream is closed", || async {
        let scrape = Scrape::of(&metrics).await;
        (scrape.get("prism_control_plane_discovery_streams{variant=\"delta\"}") == 0.0)
            .then_some(scrape)
    })
    .await;
    assert_eq!(gone.get("prism_control_plane_proxies_connected"), 0.0);
    cp.stop().await;
}

/// The issue's proof: apply A, apply B, roll back to A; the proxy serves A
/// again and the change log shows the three revisions and who made them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_to_an_earlier_revision_is_what_the_proxy_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let proxy = Proxy::start(&cp.xds, "proxy-rollback").await;
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let http = reqwest::Client::new();
    let serves = |upstream: &'static str| {
        let (http, url) = (http.clone(), proxy.url.clone());
        async move {
            eventually(&format!("requests reach {upstream}"), || async {
                let answer = get(&http, &url, "shop.test", "/").await;
                (answer.upstream.as_deref() == Some(upstream)).then_some(())
            })
            .await;
        }
    };
    let (alice, bob, carol) = (
        admin.token("alice", "editor").await,
        admin.token("bob", "editor").await,
        admin.token("carol", "editor").await,
    );
    let apply = |token: &str, yaml: String| {
        let (admin, token) = (admin.clone(), token.to_string());
        async move {
            let (status, body) = admin
                .request_as(
                    &token,
                    Method::POST,
                    "/v1/apply",
                    Some(("application/yaml", yaml)),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            body["revision"].as_u64().expect("a revision")
        }
    };

    let a = apply(&alice, policy("shop", "shop.test", "blue", blue.addr, "/")).await;
    serves("blue").await;
    let b = apply(&bob, policy("shop", "shop.test", "green", green.addr, "/")).await;
    serves("green").await;
    assert_eq!((a, b), (1, 2));

    // What B changed: the route's backend, and a new backend.
    let (status, diff) = admin
        .request(Method::GET, &format!("/v1/diff?from={a}&to={b}"), None)
        .await;
    assert_eq!(status, 200, "{diff}");
    let changed: Vec<(&str, &str)> = diff["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            (
                c["op"].as_str().unwrap_or(""),
                c["name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(changed, [("create", "shop/green"), ("update", "shop/root")]);
    let route = diff["changes"][1]["diff"].as_str().unwrap_or_default();
    assert!(
        route.contains("\n-  backend: blue\n+  backend: green\n"),
        "{route}"
    );

    let (status, rolled) = admin
        .request_as(&carol, Method::POST, &format!("/v1/rollback?to={a}"), None)
        .await;
    assert_eq!(status, 200, "{rolled}");
    let revision = rolled["revision"].as_u64().expect("a revision");
    assert_eq!(revision, 3);
    serves("blue").await;
    proxy.converge(revision).await;
    let answer = get(&http, &proxy.url, "shop.test", "/").await;
    assert_eq!(
        (answer.status, answer.upstream.as_deref()),
        (200, Some("blue")),
        "{answer:?}"
    );
    // The policy is A's again: nothing between them.
    let (_, same) = admin
        .request(Method::GET, &format!("/v1/diff?from={a}"), None)
        .await;
    assert_eq!(same["changes"], serde_json::json!([]), "{same}");

    let (_, history) = admin.request(Method::GET, "/v1/history", None).await;
    let entries: Vec<(&str, &str, &str)> = history["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            let text = |k: &str| item[k].as_str().unwrap_or("");
            (text("revision"), text("actor"), text("action"))
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("3", "carol", "rollback"),
            ("2", "bob", "apply"),
            ("1", "alice", "apply"),
        ]
    );

    proxy.stop().await;
    cp.stop().await;
}
