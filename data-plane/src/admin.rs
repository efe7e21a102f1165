//! The proxy's own admin listener: readiness, liveness, a dump of the
//! accepted configuration, a short status (revision, applies and how long
//! the last one took) that is cheap to poll, `/data`: what the data
//! gateway holds (subscriptions, tasks, memory), for leak checks, and
//! `/metrics`: the Prometheus metrics as OpenMetrics text (`404` with
//! metrics off). Read-only; it never changes the runtime.

use std::convert::Infallible;
use std::future::ready;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::Full;
use hyper::{Request, Response};
use prism_proto::{Resource, Snapshot};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::discovery::Status;
use crate::http::server;
use crate::metrics::{self, Metrics};

type Body = Full<Bytes>;

/// Serves the admin endpoints on `listener` until `shutdown` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    params: server::Params,
    node_id: Arc<str>,
    status: watch::Receiver<Status>,
    metrics: Option<Arc<Metrics>>,
    shutdown: watch::Receiver<bool>,
) {
    let service = tower::service_fn(move |request: Request<_>| {
        let response = if request.uri().path() == "/metrics" {
            scrape(&request, metrics.as_deref())
        } else {
            respond(&request, &node_id, &status.borrow())
        };
        ready(Ok::<_, Infallible>(response))
    });
    server::serve(listener, None, params, shutdown, service).await;
}

fn respond<B>(request: &Request<B>, node_id: &str, status: &Status) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/ready" if status.accepted.is_some() => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "no configuration yet\n"),
        "/config_dump" => json_response(&config_dump(node_id, status)),
        "/status" => json_response(&summary(node_id, status)),
        "/data" => json_response(&crate::data::stats()),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `/metrics`: every metric as OpenMetrics text, encoded on the admin
/// listener's event loop (a scrape reads atomics and takes only the
/// series map's lock, never one the request path takes).
fn scrape<B>(request: &Request<B>, metrics: Option<&Metrics>) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let Some(metrics) = metrics else {
        return text(
            StatusCode::NOT_FOUND,
            "metrics are off (the proxy runs with --metrics=false)\n",
        );
    };
    let mut response = Response::new(Body::from(metrics.encode()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    response
}

fn config_dump(node_id: &str, status: &Status) -> serde_json::Value {
    let resources: Vec<serde_json::Value> = status
        .accepted
        .iter()
        .flat_map(|s| s.iter())
        .map(|v| {
            let mut resource = json!({
                "kind": v.resource.kind().as_str(),
                "name": v.resource.name(),
                "version": v.version,
            });
            // What the proxy does with a namespace's requests beyond
            // routing them: whether it logs them.
            if let Resource::Namespace(ns) = &v.resource {
                resource["access_log"] = json!(ns.access_log.as_ref().is_some_and(|a| a.enabled));
            }
            resource
        })
        .collect();
    json!({
        "node_id": node_id,
        "revision": status.accepted.as_ref().map(|s| s.revision),
        "resources": resources,
        "last_nack": status.last_nack.as_ref().map(|n| json!({
            "revision": n.revision,
            "message": n.message,
        })),
    })
}

/// What `/status` shows: `/config_dump` without the resources, plus how
/// many changed revisions were applied and how long the last one took.
fn summary(node_id: &str, status: &Status) -> serde_json::Value {
    json!({
        "node_id": node_id,
        "revision": status.accepted.as_ref().map(|s| s.revision),
        "resources": status.accepted.as_ref().map_or(0, Snapshot::len),
        "applied": status.applied,
        "last_apply_seconds": status.last_apply.map(|d| d.as_secs_f64()),
        "last_nack": status.last_nack.as_ref().map(|n| json!({
            "revision": n.revision,
            "message": n.message,
        })),
    })
}

fn json_response(value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Body::from(format!("{value:#}\n")));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use prism_proto::pb::config::v1::Namespace;
    use prism_proto::{Resource, Snapshot};

    use super::*;
    use crate::config::discovery::Nack;

    async fn get(path: &str, status: &Status) -> (StatusCode, String) {
        let request = Request::get(path).body(()).expect("request");
        let response = respond(&request, "node-1", status);
        let code = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn ready_follows_the_first_accepted_config() {
        let mut status = Status::default();
        assert_eq!(
            get("/ready", &status).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get("/healthz", &status).await.0, StatusCode::OK);
        status.accepted = Some(Snapshot::empty(1));
        assert_eq!(get("/ready", &status).await.0, StatusCode::OK);
        assert_eq!(get("/nope", &status).await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn config_dump_lists_resources_and_the_last_nack() {
        let mut status = Status::default();
        let (_, body) = get("/config_dump", &status).await;
        let dump: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(dump["revision"], serde_json::Value::Null);
        assert_eq!(dump["last_nack"], serde_json::Value::Null);

        status.accepted = Some(Snapshot::from_resources(
            4,
            [Resource::Namespace(Namespace {
                name: "demo".into(),
                ..Default::default()
            })],
        ));
        status.last_nack = Some(Nack {
            revision: Some(5),
            message: "Route demo/r: backend: missing".into(),
        });
        let (_, body) = get("/config_dump", &status).await;
        let dump: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(dump["node_id"], "node-1");
        assert_eq!(dump["revision"], 4);
        assert_eq!(dump["resources"][0]["kind"], "Namespace");
        assert_eq!(dump["resources"][0]["name"], "demo");
        assert_eq!(dump["last_nack"]["revision"], 5);
        assert_eq!(
            dump["last_nack"]["message"],
            "Route demo/r: backend: missing"
        );
    }

    #[tokio::test]
    async fn status_counts_applies_without_listing_resources() {
        let mut status = Status::default();
        let (code, body) = get("/status", &status).await;
        assert_eq!(code, StatusCode::OK);
        let summary: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(summary["revision"], serde_json::Value::Null);
        assert_eq!(summary["applied"], 0);
        assert_eq!(summary["last_apply_seconds"], serde_json::Value::Null);

        status.accepted = Some(Snapshot::from_resources(
            9,
            [Resource::Namespace(Namespace {
                name: "demo".into(),
                ..Default::default()
            })],
        ));
        status.applied = 3;
        status.last_apply = Some(std::time::Duration::from_millis(250));
        let (_, body) = get("/status", &status).await;
        let summary: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(summary["node_id"], "node-1");
        assert_eq!(summary["revision"], 9);
        assert_eq!(summary["resources"], 1);
        assert_eq!(summary["applied"], 3);
        assert_eq!(summary["last_apply_seconds"], 0.25);
        assert!(!body.contains("Namespace"), "{body}");
    }

    #[tokio::test]
    async fn config_dump_names_secrets_without_their_key_material() {
        let leaf = crate::test_ca::TestCa::new().issue(&["demo.local"]);
        let status = Status {
            accepted: Some(Snapshot::from_resources(1, [leaf.secret("demo/cert")])),
            ..Status::default()
        };
        let (_, body) = get("/config_dump", &status).await;
        assert!(body.contains("demo/cert"), "{body}");
        assert!(
            !body.contains("PRIVATE") && !body.contains("BEGIN"),
            "{body}"
        );
    }
}
