use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Request, StatusCode};
use prometheus_client::metrics::counter::Counter;

use super::*;

fn route_log(log: &Arc<AccessLog>) -> RouteLog {
    RouteLog {
        log: Arc::clone(log),
        namespace: Arc::from("shop"),
        route: Arc::from("root"),
    }
}

/// A finished line of a `GET` to `uri`.
fn finish(log: &RouteLog, uri: &str) {
    let request = Request::get(uri).body(()).expect("request");
    Pending::start(log, Some("shop/web"), &request).finish(
        StatusCode::OK,
        Duration::from_millis(3),
        0,
        5,
    );
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let dropped = Counter::default();
    // No writer drains this queue: every line past its two places must be
    // dropped, at once.
    let (log, queue) = AccessLog::with_capacity(2, dropped.clone());
    let route = route_log(&log);
    let started = Instant::now();
    for _ in 0..10 {
        finish(&route, "/items");
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "pushing blocked"
    );
    assert_eq!(dropped.get(), 8);
    assert_eq!(queue.try_iter().count(), 2);

    // Room again: the next line is queued, not dropped.
    finish(&route, "/items");
    assert_eq!(dropped.get(), 8);
    assert_eq!(queue.try_iter().count(), 1);
}

#[test]
fn the_writer_writes_one_json_object_per_line() {
    let (log, queue) = AccessLog::with_capacity(8, Counter::default());
    let route = route_log(&log);
    let request = Request::post("http://shop.test/orders?id=7")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(())
        .expect("request");
    let pending = Pending::start(&route, Some("shop/web"), &request);
    let upstream = pending.upstream();
    upstream.retried();
    upstream.answered(
        &Authority::from_static("127.0.0.1:9000"),
        Duration::from_millis(2),
    );
    pending.finish(StatusCode::CREATED, Duration::from_millis(4), 5, 11);
    finish(&route, "/plain");
    drop((route, log));

    let mut out = Vec::new();
    write_loop(&queue, &mut out);
    let text = String::from_utf8(out).expect("UTF-8");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let first = &lines[0];
    assert_eq!(first["namespace"], "shop");
    assert_eq!(first["route"], "root");
    assert_eq!(first["backend"], "web");
    assert_eq!(first["endpoint"], "127.0.0.1:9000");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["authority"], "shop.test");
    assert_eq!(first["path"], "/orders?id=7");
    assert_eq!(first["status"], 201);
    assert_eq!(first["duration_ms"], 4.0);
    assert_eq!(first["upstream_duration_ms"], 2.0);
    assert_eq!(first["request_bytes"], 5);
    assert_eq!(first["response_bytes"], 11);
    assert_eq!(first["retries"], 1);
    assert_eq!(first["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(first["listener"], "http");
    let second = &lines[1];
    assert_eq!(second["trace_id"], serde_json::Value::Null);
    assert_eq!(second["endpoint"], serde_json::Value::Null);
    assert_eq!(second["upstream_duration_ms"], serde_json::Value::Null);
}

#[test]
fn trace_ids_come_only_from_valid_traceparents() {
    let id = |value: &str| {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_str(value).expect("value"));
        trace_id(&headers)
    };
    assert_eq!(
        id("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").as_deref(),
        Some("0af7651916cd43dd8448eb211c80319c")
    );
    // All zeros, uppercase, too short, version ff: invalid.
    assert_eq!(
        id("00-00000000000000000000000000000000-b7ad6b7169203331-01"),
        None
    );
    assert_eq!(
        id("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"),
        None
    );
    assert_eq!(id("00-0af76519-b7ad6b7169203331-01"), None);
    assert_eq!(
        id("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        None
    );
    assert_eq!(trace_id(&HeaderMap::new()), None);
}

#[test]
fn paths_are_capped_at_a_character_boundary() {
    assert_eq!(capped("/short", 10), "/short");
    assert_eq!(capped("/ab", 2), "/a");
    // `é` is two bytes: a cut inside it moves before it.
    assert_eq!(capped("/é", 2), "/");
}

#[test]
fn times_are_rfc3339_utc_with_milliseconds() {
    let time = UNIX_EPOCH + Duration::from_millis(1_764_335_109_042);
    assert_eq!(rfc3339_millis(time), "2025-11-28T13:05:09.042Z");
}
