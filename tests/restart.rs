//! The control plane as a separate process: killed with SIGKILL and started
//! again on the same data directory, it keeps every acknowledged write and
//! its revision keeps increasing; the proxy serves throughout and converges.

mod support;

use reqwest::Method;
use support::{ControlPlaneProcess as Process, Proxy, Upstream, eventually, get, policy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_and_the_proxy_reconverges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = Process::start(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    eventually("admin API up", || async {
        reqwest::get(format!("{}/healthz", cp.admin)).await.ok()
    })
    .await;
    let admin = cp.client();
    let proxy = Proxy::start(&cp.xds, "proxy-restart").await;
    let (one, two) = (Upstream::start("one").await, Upstream::start("two").await);
    let http = reqwest::Client::new();

    let mut last = 0;
    for i in 0..5 {
        let up = if i % 2 == 0 { &one } else { &two };
        last = admin
            .apply(&policy("app", "app.test", &format!("web{i}"), up.addr, "/"))
            .await;
    }
    proxy.converge(last).await;
    let (_, routes_before) = admin.request(Method::GET, "/v1/routes", None).await;

    // Kill without warning, right after the last acknowledged write.
    let (admin_addr, xds_addr) = (
        cp.admin.replace("http://", ""),
        cp.xds.replace("http://", ""),
    );
    cp.kill();

    // The proxy keeps serving the last config while the control plane is gone.
    for _ in 0..10 {
        assert_eq!(
            get(&http, &proxy.url, "app.test", "/")
                .await
                .upstream
                .as_deref(),
            Some("one")
        );
    }

    let cp = Process::start(dir.path(), &admin_addr, &xds_addr);
    eventually("admin API back", || async {
        reqwest::get(format!("{}/healthz", cp.admin)).await.ok()
    })
    .await;
    let admin = cp.client();
    assert_eq!(
        admin.revision().await,
        last,
        "every acknowledged revision is there"
    );
    assert_eq!(
        admin.request(Method::GET, "/v1/routes", None).await.1,
        routes_before
    );
    let (status, backends) = admin.request(Method::GET, "/v1/backends", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        backends["items"].as_array().map(Vec::len),
        Some(5),
        "{backends}"
    );

    // The next write continues the sequence and reaches the reconnected proxy.
    let next = admin
        .apply(&policy("app", "app.test", "web9", two.addr, "/"))
        .await;
    assert_eq!(next, last + 1);
    proxy.converge(next).await;
    assert_eq!(
        get(&http, &proxy.url, "app.test", "/")
            .await
            .upstream
            .as_deref(),
        Some("two")
    );
    let fleet = eventually("the proxy is back in the fleet", || async {
        let fleet = admin.proxies().await;
        (fleet["proxies"][0]["acked_revision"].as_u64() == Some(next)).then_some(fleet)
    })
    .await;
    assert_eq!(fleet["proxies"][0]["connected"], true);

    proxy.stop().await;
    cp.kill();
}
