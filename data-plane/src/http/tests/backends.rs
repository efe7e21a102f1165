//! Balancing through the real proxy: consistent hashing, requests in flight.

use std::sync::atomic::Ordering;

use prism_proto::pb::config::v1::{HashPolicy, hash_policy};
use prism_proto::{Kind, LbPolicy, ResourceKey};

use super::*;

/// `snapshot` with backend `demo/{name}` changed by `change`.
pub(super) fn with_backend(
    mut snapshot: Snapshot,
    name: &str,
    change: impl FnOnce(&mut prism_proto::Backend),
) -> Snapshot {
    edit_backend(&mut snapshot, name, change);
    snapshot
}

/// Changes backend `demo/{name}` of `snapshot` with `change`.
pub(super) fn edit_backend(
    snapshot: &mut Snapshot,
    name: &str,
    change: impl FnOnce(&mut prism_proto::Backend),
) {
    let key = ResourceKey::new(Kind::Backend, format!("demo/{name}"));
    let Some(Resource::Backend(mut backend)) = snapshot.get(&key).map(|v| v.resource.clone())
    else {
        panic!("no backend {name}");
    };
    change(&mut backend);
    snapshot.insert(Resource::Backend(backend));
    prism_proto::validate_snapshot(snapshot).expect("valid policy");
}

async fn upstream_for(proxy: &Proxy, user: &str) -> String {
    let request = Request::get(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .header("x-user", user)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client().request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    header_str(response.headers(), "x-upstream").to_string()
}

#[tokio::test]
async fn consistent_hashing_sends_each_key_to_one_endpoint() {
    let upstreams = [
        echo_upstream("a").await,
        echo_upstream("b").await,
        echo_upstream("c").await,
    ];
    for policy in [LbPolicy::RingHash, LbPolicy::Maglev] {
        let proxy = start_proxy().await;
        proxy.apply(&with_backend(
            super::policy(&[("/", "web", &upstreams)], None),
            "web",
            |b| {
                b.lb_policy = policy.into();
                b.hash_policy = Some(HashPolicy {
                    key: Some(hash_policy::Key::Header("x-user".into())),
                });
            },
        ));
        let mut used = std::collections::HashSet::new();
        for n in 0..12 {
            let user = format!("user-{n}");
            let first = upstream_for(&proxy, &user).await;
            for _ in 0..3 {
                assert_eq!(
                    upstream_for(&proxy, &user).await,
                    first,
                    "{policy:?} {user}"
                );
            }
            used.insert(first);
        }
        assert!(used.len() > 1, "{policy:?}: every key on {used:?}");
    }
}

#[tokio::test]
async fn a_request_counts_as_in_flight_until_its_response_body_ends() {
    let (upstream, chunks) = streaming_upstream(1).await;
    let proxy = start_proxy().await;
    proxy.apply(&with_backend(
        policy(&[("/", "web", &[upstream])], None),
        "web",
        |b| b.lb_policy = LbPolicy::LeastRequest.into(),
    ));
    let runtime = proxy.runtime.load_full();
    let backend = runtime.backend("demo/web").expect("backend");
    let in_flight = || backend.endpoints[0].in_flight.load(Ordering::Relaxed);

    let request = Request::get(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = tokio::spawn(client().request(request));
    chunks
        .send(Ok(Frame::data(Bytes::from_static(b"first"))))
        .await
        .expect("send");
    let mut body = response.await.expect("task").expect("response").into_body();
    tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("first chunk")
        .expect("frame")
        .expect("data");
    assert_eq!(in_flight(), 1, "the body is still streaming");
    drop(chunks);
    body.collect().await.expect("rest");
    // The proxy may finish its side just after the client saw the end.
    let until = tokio::time::Instant::now() + DEADLINE;
    while in_flight() != 0 {
        assert!(
            tokio::time::Instant::now() < until,
            "still counted in flight"
        );
        tokio::task::yield_now().await;
    }
}

/// An upstream answering `status` while `failing` is set, else 200.
async fn flaky_upstream(
    name: &'static str,
    failing: Arc<std::sync::atomic::AtomicBool>,
) -> SocketAddr {
    upstream(move |_request| {
        let failing = Arc::clone(&failing);
        async move {
            let status = if failing.load(Ordering::Relaxed) {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            Response::builder()
                .status(status)
                .header("x-upstream", name)
                .body(boxed(Full::new(Bytes::new())))
                .expect("response")
        }
    })
    .await
}

fn breaker(open_timeout: Duration) -> impl FnOnce(&mut prism_proto::Backend) {
    move |b| {
        b.circuit_breaker = Some(prism_proto::pb::config::v1::CircuitBreaker {
            failure_threshold: 2,
            open_timeout: Some(pbjson_types::Duration {
                seconds: i64::try_from(open_timeout.as_secs()).expect("seconds"),
                nanos: i32::try_from(open_timeout.subsec_nanos()).expect("nanos"),
            }),
            half_open_max_requests: 1,
            success_threshold: 1,
        });
    }
}

#[tokio::test]
async fn an_open_circuit_breaker_takes_its_endpoint_out_of_the_balancer() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let bad = flaky_upstream("bad", Arc::clone(&failing)).await;
    let good = echo_upstream("good").await;
    let proxy = start_proxy().await;
    proxy.apply(&with_backend(
        policy(&[("/", "web", &[bad, good])], None),
        "web",
        breaker(Duration::from_secs(60)),
    ));
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (status, headers, _) = send(&proxy, "demo.local", "/", "").await;
        seen.push((
            status.as_u16(),
            header_str(&headers, "x-upstream").to_string(),
        ));
    }
    // Round robin: bad, good, bad (the second failure opens it), then good only.
    let bad_count = seen.iter().filter(|(_, u)| u == "bad").count();
    assert_eq!(bad_count, 2, "{seen:?}");
    assert!(
        seen[3..].iter().all(|(s, u)| *s == 200 && u == "good"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn with_every_breaker_open_the_answer_is_503_until_a_probe_succeeds() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let only = flaky_upstream("only", Arc::clone(&failing)).await;
    let proxy = start_proxy().await;
    let open_timeout = Duration::from_millis(300);
    proxy.apply(&with_backend(
        policy(&[("/", "web", &[only])], None),
        "web",
        breaker(open_timeout),
    ));
    for _ in 0..2 {
        let (status, _, _) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "no healthy upstream\n");

    // The upstream recovers; once the open timeout has passed a probe goes
    // through, succeeds, and the breaker closes.
    failing.store(false, Ordering::Relaxed);
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, _, _) = send(&proxy, "demo.local", "/", "").await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            tokio::time::Instant::now() < until,
            "the breaker never closed"
        );
        tokio::time::sleep(open_timeout / 4).await;
    }
    for _ in 0..3 {
        let (status, _, _) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!(status, StatusCode::OK);
    }
}

fn outlier(max_ejection_percent: u32) -> impl FnOnce(&mut prism_proto::Backend) {
    move |b| {
        b.outlier_detection = Some(prism_proto::pb::config::v1::OutlierDetection {
            consecutive_5xx: 2,
            max_ejection_percent,
            ..Default::default()
        });
    }
}

#[tokio::test]
async fn an_endpoint_that_keeps_failing_is_ejected_from_the_balancer() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let bad = flaky_upstream("bad", Arc::clone(&failing)).await;
    let good = echo_upstream("good").await;
    let proxy = start_proxy().await;
    proxy.apply(&with_backend(
        policy(&[("/", "web", &[bad, good])], None),
        "web",
        outlier(50),
    ));
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (status, headers, _) = send(&proxy, "demo.local", "/", "").await;
        seen.push((
            status.as_u16(),
            header_str(&headers, "x-upstream").to_string(),
        ));
    }
    // bad, good, bad (second 5xx in a row: ejected for 30 s), then good only.
    assert_eq!(
        seen.iter().filter(|(_, u)| u == "bad").count(),
        2,
        "{seen:?}"
    );
    assert!(
        seen[3..].iter().all(|(s, u)| *s == 200 && u == "good"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn no_more_than_the_ejection_cap_is_ejected() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let a = flaky_upstream("a", Arc::clone(&failing)).await;
    let b = flaky_upstream("b", Arc::clone(&failing)).await;
    let proxy = start_proxy().await;
    // 10% of two endpoints: still one may be ejected, never both.
    proxy.apply(&with_backend(
        policy(&[("/", "web", &[a, b])], None),
        "web",
        outlier(10),
    ));
    let mut seen = Vec::new();
    for _ in 0..10 {
        let (status, headers, _) = send(&proxy, "demo.local", "/", "").await;
        seen.push((
            status.as_u16(),
            header_str(&headers, "x-upstream").to_string(),
        ));
    }
    assert!(seen.iter().all(|(s, _)| *s == 500), "never 503: {seen:?}");
    let last = &seen[9].1;
    assert!(
        seen[5..].iter().all(|(_, u)| u == last),
        "one ejected, the other takes all: {seen:?}"
    );
}

#[tokio::test]
async fn a_pooled_connection_idle_past_the_backends_idle_timeout_is_closed() {
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    let idle = Duration::from_millis(200);
    proxy.apply(&with_backend(
        policy(&[("/", "web", &[web])], None),
        "web",
        |b| {
            b.limits = Some(prism_proto::pb::config::v1::BackendLimits {
                idle_timeout: Some(pbjson_types::Duration {
                    seconds: 0,
                    nanos: i32::try_from(idle.as_nanos()).expect("short"),
                }),
                ..Default::default()
            });
        },
    ));
    let peer = |h: &HeaderMap| header_str(h, "x-seen-peer").to_string();
    let (_, first, _) = send(&proxy, "demo.local", "/", "").await;
    let (_, second, _) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!(peer(&first), peer(&second), "reused while fresh");
    // Idle time is the behaviour under test: let it pass.
    tokio::time::sleep(idle * 3).await;
    let (_, third, _) = send(&proxy, "demo.local", "/", "").await;
    assert_ne!(peer(&second), peer(&third), "an idle connection was reused");
}
