use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use prism_proto::Snapshot;

use super::*;
use crate::runtime::tests::{backend, compile, namespace, prefix, route, sample};
use crate::runtime::{Action, Runtime};

/// The value of the sample `name{labels}` in `text`, if it is there.
fn sample_value(text: &str, name: &str, labels: &str) -> Option<f64> {
    let head = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&head))
        .map(|value| value.parse().expect("a number"))
}

/// A runtime of `snapshot` recording into `metrics`.
fn compiled(snapshot: &Snapshot, metrics: &Arc<Metrics>) -> Runtime {
    compile(
        snapshot,
        &Runtime::unconfigured().with_metrics(Some(Arc::clone(metrics))),
    )
}

/// The series of the first backend of the route `host` + `path` takes.
fn split_series(runtime: &Runtime, host: &str, path: &str) -> Arc<RouteSeries> {
    let route = crate::runtime::tests::lookup(runtime, host, path).expect("route");
    match &route.action {
        Action::Forward(forward) => Arc::clone(forward.pick().series.as_ref().expect("series")),
        _ => panic!("{} does not forward", route.name),
    }
}

#[test]
fn a_histogram_counts_each_observation_in_the_first_bucket_it_fits() {
    let metrics = Metrics::new();
    let series = metrics.backend("n/b");
    series.upstream(Duration::from_micros(300));
    // A bound is inclusive: `le`.
    series.upstream(Duration::from_millis(1));
    series.upstream(Duration::from_secs(20));
    let text = metrics.encode();
    let bucket = |le: &str| {
        let labels = format!(r#"le="{le}",namespace="n",backend="b""#);
        sample_value(
            &text,
            "prism_proxy_upstream_duration_seconds_bucket",
            &labels,
        )
    };
    assert_eq!(bucket("0.0005"), Some(1.0), "{text}");
    assert_eq!(bucket("0.001"), Some(2.0), "cumulative: {text}");
    assert_eq!(bucket("10.0"), Some(2.0));
    assert_eq!(bucket("+Inf"), Some(3.0), "{text}");
    let labels = r#"namespace="n",backend="b""#;
    assert_eq!(
        sample_value(&text, "prism_proxy_upstream_duration_seconds_count", labels),
        Some(3.0)
    );
    let sum =
        sample_value(&text, "prism_proxy_upstream_duration_seconds_sum", labels).expect("a sum");
    assert!((sum - 20.0013).abs() < 1e-9, "{sum}");
}

#[test]
fn every_family_has_help_and_type_and_the_text_ends_in_eof() {
    let metrics = Metrics::new();
    let _held = (
        metrics.route("n/r", Some("n/b")),
        metrics.backend("n/b"),
        metrics.namespace("n"),
    );
    let text = metrics.encode();
    assert!(text.ends_with("# EOF\n"), "{text}");
    for family in [
        "prism_proxy_requests",
        "prism_proxy_request_duration_seconds",
        "prism_proxy_request_bytes",
        "prism_proxy_response_bytes",
        "prism_proxy_upstream_duration_seconds",
        "prism_proxy_retries",
        "prism_proxy_breaker_transitions",
        "prism_proxy_outlier_ejections",
        "prism_proxy_health_checks",
        "prism_proxy_ratelimit_rejections",
        "prism_proxy_config_revision",
        "prism_proxy_config_applies",
        "prism_proxy_active_connections",
        "prism_proxy_active_requests",
        "prism_proxy_overload_rejections",
    ] {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family}: {text}"
        );
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family}: {text}"
        );
    }
    // Counters carry `_total`, and each status class is there from the start.
    for class in CODE_CLASSES {
        let labels = format!(r#"namespace="n",route="r",backend="b",code_class="{class}""#);
        assert_eq!(
            sample_value(&text, "prism_proxy_requests_total", &labels),
            Some(0.0),
            "{text}"
        );
    }
}

#[tokio::test]
async fn a_recorded_request_counts_its_class_duration_and_bytes_when_its_body_ends() {
    let metrics = Metrics::new();
    let series = metrics.route("n/r", Some("n/b"));
    let mut recorder =
        Recorder::start(Some(Arc::clone(&series)), None, None, None).expect("a recorder");
    recorder.answered(StatusCode::BAD_GATEWAY);
    let body = Metered::new(Full::new(Bytes::from_static(b"hello")), Some(recorder));
    let labels = r#"namespace="n",route="r",backend="b",code_class="5xx""#;
    assert_eq!(
        sample_value(&metrics.encode(), "prism_proxy_requests_total", labels),
        Some(0.0),
        "nothing before the body ends"
    );
    body.collect().await.expect("body");
    let text = metrics.encode();
    assert_eq!(
        sample_value(&text, "prism_proxy_requests_total", labels),
        Some(1.0),
        "{text}"
    );
    let labels = r#"namespace="n",route="r",backend="b""#;
    assert_eq!(
        sample_value(&text, "prism_proxy_response_bytes_total", labels),
        Some(5.0)
    );
    assert_eq!(
        sample_value(&text, "prism_proxy_request_duration_seconds_count", labels),
        Some(1.0)
    );
}

#[test]
fn a_request_given_up_before_its_answer_is_not_counted() {
    let metrics = Metrics::new();
    let series = metrics.route("n/r", Some("n/b"));
    drop(Recorder::start(Some(Arc::clone(&series)), None, None, None).expect("a recorder"));
    let labels = r#"namespace="n",route="r",backend="b""#;
    assert_eq!(
        sample_value(
            &metrics.encode(),
            "prism_proxy_request_duration_seconds_count",
            labels
        ),
        Some(0.0)
    );
}

#[test]
fn status_classes_run_from_1xx_to_5xx() {
    let class = |code: u16| CODE_CLASSES[status_class(StatusCode::from_u16(code).expect("status"))];
    assert_eq!(class(101), "1xx");
    assert_eq!(class(204), "2xx");
    assert_eq!(class(308), "3xx");
    assert_eq!(class(404), "4xx");
    assert_eq!(class(503), "5xx");
    assert_eq!(class(999), "5xx");
}

#[test]
fn a_route_that_survives_an_apply_keeps_counting_and_a_removed_one_leaves_the_scrape() {
    let metrics = Arc::new(Metrics::new());
    let first = compiled(&sample(), &metrics);
    let series = split_series(&first, "demo.local", "/");
    let mut recorder =
        Recorder::start(Some(Arc::clone(&series)), None, None, None).expect("a recorder");
    recorder.answered(StatusCode::OK);
    drop(recorder);

    // A changed backend compiles the whole policy again.
    let mut changed = sample();
    changed.revision = 8;
    changed.insert(backend("demo/web", &["127.0.0.1:1002"]));
    let second = Runtime::compile(&changed, &first, &Default::default()).expect("compiles");
    assert!(Arc::ptr_eq(
        &series,
        &split_series(&second, "demo.local", "/")
    ));
    let labels = r#"namespace="demo",route="root",backend="web",code_class="2xx""#;
    drop((first, series));
    assert_eq!(
        sample_value(&metrics.encode(), "prism_proxy_requests_total", labels),
        Some(1.0),
        "the count survived the apply"
    );

    let gone = Snapshot::from_resources(
        9,
        [
            namespace("demo", &["demo.local"]),
            backend("demo/web", &["127.0.0.1:1002"]),
            route("demo/other", "", prefix("/"), "web"),
        ],
    );
    let third = Runtime::compile(&gone, &second, &Default::default()).expect("compiles");
    let text = metrics.encode();
    assert!(
        text.contains(r#"route="root""#),
        "the old runtime still holds it: {text}"
    );
    drop(second);
    let text = metrics.encode();
    assert!(!text.contains(r#"route="root""#), "{text}");
    assert!(!text.contains(r#"namespace="api""#), "{text}");
    assert!(text.contains(r#"route="other""#), "{text}");
    drop(third);
}

#[test]
fn without_metrics_nothing_is_compiled_in() {
    let runtime = compile(&sample(), &Runtime::unconfigured());
    assert!(runtime.metrics().is_none());
    let route = crate::runtime::tests::lookup(&runtime, "demo.local", "/").expect("route");
    assert!(route.backend().series.is_none());
    match &route.action {
        Action::Forward(forward) => assert!(forward.pick().series.is_none()),
        _ => panic!("forwards"),
    }
}
