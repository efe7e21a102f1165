//! The last-known-good snapshot: a proxy restarted while the control plane is
//! down serves what it last accepted, straight from its data directory, and
//! follows the control plane again once it is back.

mod support;

use std::time::Duration;

use support::{ControlPlane, Proxy, Upstream, eventually, get, policy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_serves_its_last_good_snapshot_without_the_control_plane() {
    let cp_dir = tempfile::tempdir().expect("tempdir");
    let proxy_dir = tempfile::tempdir().expect("tempdir");
    let (one, two) = (Upstream::start("one").await, Upstream::start("two").await);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");

    let cp = ControlPlane::start(cp_dir.path()).await;
    let admin = cp.client();
    let proxy = Proxy::start_with(&cp.xds, "proxy-lkg", proxy_dir.path()).await;
    let revision = admin
        .apply(&policy("app", "app.test", "web", one.addr, "/"))
        .await;
    proxy.converge(revision).await;
    assert_eq!(
        get(&http, &proxy.url, "app.test", "/")
            .await
            .upstream
            .as_deref(),
        Some("one")
    );
    let resources_before = proxy.config_dump().await.expect("config dump")["resources"].clone();

    // Stop both; the proxy saved its snapshot on the way out.
    proxy.stop().await;
    let (admin_addr, xds_addr, xds) = (cp.admin_addr, cp.xds_addr, cp.xds.clone());
    cp.stop().await;
    assert!(
        proxy_dir
            .path()
            .join(prism_data_plane::LAST_GOOD_FILE)
            .is_file()
    );

    // Started again with nothing listening on the discovery address, it is
    // ready at once and serves the old policy.
    let proxy = Proxy::start_with(&xds, "proxy-lkg", proxy_dir.path()).await;
    assert_eq!(proxy.ready().await, Some(200));
    let dump = proxy.config_dump().await.expect("config dump");
    assert_eq!(dump["revision"].as_u64(), Some(revision));
    assert_eq!(dump["resources"], resources_before);
    for _ in 0..5 {
        let answer = get(&http, &proxy.url, "app.test", "/").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.upstream.as_deref(), Some("one"));
    }

    // The control plane comes back on the same store and addresses: the proxy
    // reconnects, resumes, and is ACKed at the revision it already held.
    let cp = ControlPlane::start_on(cp_dir.path(), admin_addr, xds_addr).await;
    let admin = cp.client();
    assert_eq!(admin.revision().await, revision);
    eventually("the restarted proxy ACKs the current revision", || async {
        let entry = admin.proxy("proxy-lkg").await?;
        (entry["connected"] == true && entry["acked_revision"].as_u64() == Some(revision))
            .then_some(())
    })
    .await;

    // And it follows the next change.
    let next = admin
        .apply(&policy("app", "app.test", "web", two.addr, "/"))
        .await;
    proxy.converge(next).await;
    assert_eq!(
        get(&http, &proxy.url, "app.test", "/")
            .await
            .upstream
            .as_deref(),
        Some("two")
    );

    proxy.stop().await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_file_is_ignored_and_the_proxy_starts_empty() {
    let proxy_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        proxy_dir.path().join(prism_data_plane::LAST_GOOD_FILE),
        b"definitely not a snapshot",
    )
    .expect("write");
    // Nothing listens on port 1 of loopback: the control plane is down.
    let proxy = Proxy::start_with("http://127.0.0.1:1", "proxy-corrupt", proxy_dir.path()).await;
    let status = eventually("the proxy admin answers", || proxy.ready()).await;
    assert_eq!(status, 503, "no configuration to serve");
    let http = reqwest::Client::new();
    assert_eq!(get(&http, &proxy.url, "app.test", "/").await.status, 503);
    proxy.stop().await;
}
