//! The control plane killed under load: two proxies keep answering every
//! request while the control plane process is SIGKILLed and started again on
//! the same data directory and addresses; it comes back with every
//! acknowledged write, and both proxies follow the next change.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::Method;
use support::{Admin, ControlPlaneProcess, DEADLINE, Proxy, Upstream, eventually, policy};
use tokio::task::JoinSet;

/// Concurrent clients, each alternating between the two proxies.
const CLIENTS: usize = 2;

/// What the load saw.
#[derive(Debug, Default)]
struct Tally {
    /// Answers per upstream name.
    upstreams: std::collections::BTreeMap<String, u64>,
    /// Every request that did not get a 200 from an upstream.
    failures: Vec<String>,
}

/// Counters the test watches while the load runs.
#[derive(Default)]
struct Progress {
    requests: AtomicU64,
    from_two: AtomicU64,
    stop: AtomicBool,
}

/// One client: requests through the proxies in turn until told to stop (or
/// the deadline passes), recording every outcome instead of panicking.
async fn client(urls: Vec<String>, progress: Arc<Progress>) -> Tally {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let mut tally = Tally::default();
    let started = tokio::time::Instant::now();
    for url in urls.iter().cycle() {
        if progress.stop.load(Ordering::Relaxed) || started.elapsed() > DEADLINE {
            break;
        }
        let outcome = http
            .get(format!("{url}/"))
            .header("host", "app.test")
            .send()
            .await;
        progress.requests.fetch_add(1, Ordering::Relaxed);
        let response = match outcome {
            Ok(response) => response,
            Err(error) => {
                tally.failures.push(format!("{url}: {error}"));
                continue;
            }
        };
        let status = response.status().as_u16();
        let upstream = response
            .headers()
            .get(prism::demo::UPSTREAM_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        match (status, upstream) {
            (200, Some(name)) => {
                if name == "two" {
                    progress.from_two.fetch_add(1, Ordering::Relaxed);
                }
                *tally.upstreams.entry(name).or_default() += 1;
            }
            (status, upstream) => tally
                .failures
                .push(format!("{url}: status {status}, upstream {upstream:?}")),
        }
    }
    tally
}

/// Every resource of every kind, as the admin API lists them.
async fn everything(admin: &Admin) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    for kind in ["namespaces", "backends", "routes"] {
        let (status, body) = admin
            .request(Method::GET, &format!("/v1/{kind}"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        all.push(body);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_answer_every_request_while_the_control_plane_is_killed_and_restarted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlaneProcess::start(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    cp.healthy().await;
    let admin = cp.client();
    let (one, two) = (Upstream::start("one").await, Upstream::start("two").await);
    let proxies = [
        Proxy::start(&cp.xds, "proxy-f1").await,
        Proxy::start(&cp.xds, "proxy-f2").await,
    ];

    let mut last = 0;
    for i in 0..3 {
        last = admin
            .apply(&policy(
                "app",
                "app.test",
                &format!("web{i}"),
                one.addr,
                "/",
            ))
            .await;
    }
    for proxy in &proxies {
        proxy.converge(last).await;
    }
    let before = everything(&admin).await;

    let progress = Arc::new(Progress::default());
    let urls: Vec<String> = proxies.iter().map(|p| p.url.clone()).collect();
    let mut load = JoinSet::new();
    for i in 0..CLIENTS {
        let mut urls = urls.clone();
        let by = i % urls.len();
        urls.rotate_left(by);
        load.spawn(client(urls, Arc::clone(&progress)));
    }
    let requests = || progress.requests.load(Ordering::Relaxed);
    eventually("load is flowing", || async {
        (requests() >= 300).then_some(())
    })
    .await;

    // SIGKILL in the middle of the load.
    let (admin_addr, xds_addr) = (cp.admin_addr(), cp.xds_addr());
    cp.kill();
    let at_kill = requests();
    eventually("the load goes on without a control plane", || async {
        (requests() >= at_kill + 300).then_some(())
    })
    .await;

    // Back on the same store and addresses, with every acknowledged write.
    let cp = ControlPlaneProcess::start(dir.path(), &admin_addr, &xds_addr);
    cp.healthy().await;
    let admin = cp.client();
    assert_eq!(admin.revision().await, last, "the acknowledged revision");
    assert_eq!(
        everything(&admin).await,
        before,
        "the acknowledged resources"
    );

    // One more change, still under load: both proxies follow it.
    let next = admin
        .apply(&policy("app", "app.test", "web9", two.addr, "/"))
        .await;
    assert_eq!(next, last + 1);
    for proxy in &proxies {
        proxy.converge(next).await;
    }
    eventually("the load reaches the new upstream", || async {
        (progress.from_two.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;
    progress.stop.store(true, Ordering::Relaxed);

    let mut tally = Tally::default();
    while let Some(done) = load.join_next().await {
        let done = done.expect("a load client");
        tally.failures.extend(done.failures);
        for (name, count) in done.upstreams {
            *tally.upstreams.entry(name).or_default() += count;
        }
    }
    assert!(
        tally.failures.is_empty(),
        "failed requests: {:?}",
        tally.failures
    );
    let total: u64 = tally.upstreams.values().sum();
    assert_eq!(total, requests(), "every request is counted once");
    assert!(
        tally
            .upstreams
            .keys()
            .all(|name| name == "one" || name == "two"),
        "{tally:?}"
    );
    assert!(
        tally.upstreams.get("one").is_some_and(|n| *n >= 200),
        "{tally:?}"
    );

    // The restarted control plane sees both proxies at the new revision.
    eventually("both proxies ACKed the new revision", || async {
        let fleet = admin.proxies().await;
        let acked = fleet["proxies"]
            .as_array()?
            .iter()
            .filter(|p| p["connected"] == true && p["acked_revision"].as_u64() == Some(next))
            .count();
        (acked == proxies.len()).then_some(())
    })
    .await;

    for proxy in proxies {
        proxy.stop().await;
    }
    cp.kill();
}
