use super::*;

const INTERVAL: Duration = Duration::from_secs(2);
/// A time at the start of an interval.
const T0: i64 = 1_800_000_000_000;

fn series(node: &str, namespace: &str, route: &str, backend: &str) -> Series {
    Series {
        node: node.to_string(),
        namespace: namespace.to_string(),
        route: format!("{namespace}/{route}"),
        backend: if backend.is_empty() {
            String::new()
        } else {
            format!("{namespace}/{backend}")
        },
    }
}

/// `requests`, `errors` of them 5xx, all timed in latency bucket `bucket`.
fn load(requests: u64, errors: u64, bucket: usize) -> Load {
    let mut latency = [0; LATENCY_BUCKETS.len()];
    latency[bucket] = requests;
    Load {
        requests,
        errors,
        latency,
    }
}

fn everything(_: &str) -> bool {
    true
}

#[test]
fn complete_intervals_sum_up_per_namespace_route_backend_and_proxy() {
    let traffic = Traffic::new(INTERVAL);
    traffic.record_at(
        T0 + 100,
        [
            (series("a", "demo", "root", "web"), load(10, 1, 1)),
            (series("a", "demo", "teapot", ""), load(4, 0, 0)),
        ],
    );
    traffic.record_at(
        T0 + 900,
        [(series("b", "demo", "root", "web"), load(6, 1, 1))],
    );
    // Still in the interval the reports arrived in: nothing is complete.
    let filling = traffic.summary_at(T0 + 1_500, everything);
    assert!(filling.namespaces.is_empty(), "{filling:?}");

    let summary = traffic.summary_at(T0 + 2_100, everything);
    assert_eq!(summary.summary_seconds, 10.0);
    let [demo] = &summary.namespaces[..] else {
        panic!("one namespace: {summary:?}");
    };
    assert_eq!((demo.figures.requests, demo.figures.errors), (20, 2));
    assert!((demo.figures.rps - 2.0).abs() < 1e-9);
    assert!((demo.figures.error_rate - 0.1).abs() < 1e-9);
    let routes: Vec<_> = summary
        .routes
        .iter()
        .map(|r| (r.route.as_str(), r.backend.as_str(), r.figures.requests))
        .collect();
    assert_eq!(routes, [("root", "web", 16), ("teapot", "", 4)]);
    let backends: Vec<_> = summary
        .backends
        .iter()
        .map(|b| (b.backend.as_str(), b.figures.requests, b.figures.errors))
        .collect();
    assert_eq!(backends, [("web", 16, 2)]);
    let proxies: Vec<_> = summary
        .proxies
        .iter()
        .map(|p| (p.node.as_str(), p.figures.requests))
        .collect();
    assert_eq!(proxies, [("a", 14), ("b", 6)]);

    // One chart point per interval of the window, the last one the
    // interval that holds the reports.
    assert_eq!(demo.series.len(), 150);
    let last = demo.series.last().expect("points");
    assert_eq!(last.t_unix_ms, T0 + 2_000);
    assert!((last.rps - 10.0).abs() < 1e-9);
    assert!(
        demo.series[..149]
            .iter()
            .all(|p| p.rps == 0.0 && p.p50_ms.is_none())
    );
}

#[test]
fn quantiles_interpolate_within_their_bucket() {
    // All in 0.5–1 ms: the median halfway, p99 near the top.
    let figures = load(100, 0, 1).figures(1.0);
    assert!((figures.p50_ms.expect("p50") - 0.75).abs() < 1e-9);
    assert!((figures.p99_ms.expect("p99") - 0.995).abs() < 1e-9);
    // Half fast, half slower than every bound: p99 is the last bound.
    let mut mixed = load(50, 0, 0);
    mixed += load(50, 0, LATENCY_BUCKETS.len() - 1);
    let figures = mixed.figures(1.0);
    assert!((figures.p50_ms.expect("p50") - 0.5).abs() < 1e-9);
    assert_eq!(figures.p99_ms, Some(10_000.0));
    assert_eq!(Load::default().figures(1.0).p50_ms, None);
}

#[test]
fn the_window_is_bounded_in_time_detail_and_series() {
    let traffic = Traffic::new(INTERVAL);
    traffic.record_at(
        T0,
        [
            (series("a", "demo", "root", "web"), load(1, 0, 0)),
            (series("b", "demo", "root", "web"), load(1, 0, 0)),
            (series("a", "shop", "cart", "api"), load(1, 0, 0)),
        ],
    );
    // Past the detail period, the bucket keeps only its namespaces.
    traffic.record_at(
        T0 + 62_000,
        [(series("a", "demo", "root", "web"), load(1, 0, 0))],
    );
    {
        let window = traffic.window.lock().expect("lock");
        let oldest = &window.buckets[0];
        assert!(oldest.compacted);
        let mut namespaces: Vec<_> = oldest
            .loads
            .iter()
            .map(|(s, l)| {
                (
                    s.namespace.as_str(),
                    s.node.as_str(),
                    s.route.as_str(),
                    l.requests,
                )
            })
            .collect();
        namespaces.sort();
        assert_eq!(namespaces, [("demo", "", "", 2), ("shop", "", "", 1)]);
    }
    // Past the window, it is gone; the one after it stays.
    traffic.record_at(
        T0 + 301_000,
        [(series("a", "demo", "root", "web"), load(1, 0, 0))],
    );
    let indices: Vec<i64> = traffic
        .window
        .lock()
        .expect("lock")
        .buckets
        .iter()
        .map(|b| b.index)
        .collect();
    assert_eq!(indices, [(T0 + 62_000) / 2_000, (T0 + 301_000) / 2_000]);

    // A bucket takes so many keys and drops the rest.
    let many = (0..MAX_SERIES + 5).map(|i| {
        (
            series(&format!("n{i}"), "demo", "root", "web"),
            load(1, 0, 0),
        )
    });
    traffic.record_at(T0 + 400_000, many);
    let summary = traffic.summary_at(T0 + 402_000, everything);
    assert_eq!(summary.dropped_series, 5);
    assert_eq!(summary.namespaces[0].figures.requests, MAX_SERIES as u64);
}

#[test]
fn a_caller_sees_only_its_namespaces() {
    let traffic = Traffic::new(INTERVAL);
    traffic.record_at(
        T0,
        [
            (series("a", "demo", "root", "web"), load(1, 0, 0)),
            (series("a", "shop", "cart", "api"), load(1, 0, 0)),
        ],
    );
    let summary = traffic.summary_at(T0 + 2_000, |namespace| namespace == "shop");
    let namespaces: Vec<_> = summary
        .namespaces
        .iter()
        .map(|n| n.namespace.as_str())
        .collect();
    assert_eq!(namespaces, ["shop"]);
    assert!(summary.routes.iter().all(|r| r.namespace == "shop"));
    assert!(summary.backends.iter().all(|b| b.namespace == "shop"));
}

#[test]
fn endpoints_sum_up_the_proxies_latest_views() {
    let traffic = Traffic::new(INTERVAL);
    let key = |node: &str, address: &str| EndpointKey {
        node: node.to_string(),
        backend: "demo/web".to_string(),
        address: address.to_string(),
    };
    let state = |healthy, breaker: &str, ejected| EndpointState {
        healthy,
        breaker: Some(breaker.to_string()),
        ejected,
    };
    traffic.record_endpoints_at(
        T0,
        "a",
        vec![
            (key("a", "10.0.0.1:80"), state(Some(true), "closed", false)),
            (key("a", "10.0.0.2:80"), state(Some(false), "open", true)),
        ],
    );
    traffic.record_endpoints_at(
        T0,
        "b",
        vec![(key("b", "10.0.0.1:80"), state(None, "half_open", false))],
    );
    // Proxy a's next report replaces its last: 10.0.0.2 left its policy.
    traffic.record_endpoints_at(
        T0 + 2_000,
        "a",
        vec![(key("a", "10.0.0.1:80"), state(Some(false), "closed", false))],
    );

    let summary = traffic.summary_at(T0 + 4_000, everything);
    let [web] = &summary.backends[..] else {
        panic!("one backend, listed without traffic: {summary:?}");
    };
    assert_eq!((web.backend.as_str(), web.figures.requests), ("web", 0));
    assert_eq!(
        web.endpoints,
        [EndpointHealth {
            address: "10.0.0.1:80".to_string(),
            proxies: 2,
            healthy: 0,
            unhealthy: 1,
            breaker_open: 0,
            breaker_half_open: 1,
            ejected: 0,
        }]
    );
    // A proxy that stopped reporting drops out once its view is stale.
    let later = traffic.summary_at(T0 + 11_000, everything);
    assert_eq!(later.backends[0].endpoints[0].proxies, 1);
    assert!(
        traffic
            .summary_at(T0 + 4_000, |ns| ns == "shop")
            .backends
            .is_empty()
    );
}
