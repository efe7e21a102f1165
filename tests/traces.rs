//! Traces through OTLP: `prism up --otlp-endpoint` exports to a collector
//! run here in-process (the OTLP/gRPC trace service, from
//! opentelemetry-proto). A proxied request's span continues the client's
//! trace, or starts one, and the upstream receives the proxy's span as its
//! parent; admin writes, store commits and discovery pushes have spans too.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::{Admin, PrismUp, admin_token, eventually, get};
use tokio_stream::wrappers::TcpListenerStream;

/// The collector: every span exported to it, with its service's name.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start() -> (Self, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let collector = Self::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (collector, addr)
    }

    /// The first span exported so far that `matches`.
    fn find(&self, matches: impl Fn(&Span) -> bool) -> Option<Span> {
        let spans = self.0.lock().expect("lock");
        spans.iter().map(|(_, s)| s).find(|s| matches(s)).cloned()
    }

    /// Waits for a span that `matches`.
    async fn wait(&self, what: &str, matches: impl Fn(&Span) -> bool) -> Span {
        eventually(what, || async { self.find(&matches) }).await
    }

    fn services(&self) -> Vec<String> {
        let spans = self.0.lock().expect("lock");
        spans.iter().map(|(service, _)| service.clone()).collect()
    }
}

fn text(value: &AnyValue) -> Option<String> {
    match value {
        AnyValue::StringValue(text) => Some(text.clone()),
        _ => None,
    }
}

/// A span's attributes, as text (numbers written out).
fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|a| {
            let value = match a.value.as_ref()?.value.as_ref()? {
                AnyValue::IntValue(n) => n.to_string(),
                other => text(other)?,
            };
            Some((a.key.clone(), value))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `traceparent` the demo upstream echoed: trace id, parent span id,
/// flags.
fn echoed_traceparent(body: &str) -> (String, String, String) {
    let value = body
        .lines()
        .find_map(|l| l.strip_prefix("traceparent="))
        .unwrap_or_else(|| panic!("the upstream got a traceparent: {body}"));
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_the_proxy_with_the_right_parent() {
    let (collector, otlp) = Collector::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("http://{otlp}");
    let up = PrismUp::start(
        dir.path(),
        &["--otlp-endpoint", &endpoint],
        // Export within 50 ms instead of the default 5 s.
        &[("OTEL_BSP_SCHEDULE_DELAY", "50")],
    );
    let data_dir = dir.path().join("prism-data");
    let admin = Admin::new(&up.admin(), &admin_token(&data_dir.join("admin-token")));
    let revision = admin
        .apply(&format!(
            "namespaces:\n  - {{name: demo, hosts: [demo.local], access_log: {{enabled: true}}}}\n\
             backends:\n  - name: demo/web\n    endpoints: [{{address: \"{}\"}}]\n\
             routes:\n  - name: demo/root\n    match: {{prefix: \"/\"}}\n    backend: web\n",
            up.demo_addr()
        ))
        .await;
    let http = reqwest::Client::new();
    let proxy = &up.urls["proxy"];
    eventually("the proxy serves the policy", || async {
        (get(&http, proxy, "demo.local", "/").await.status == 200).then_some(())
    })
    .await;

    // The client's trace continues: the proxy's span is a child of the
    // client's, and the upstream's parent is the proxy's span.
    let (trace, client_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let response = http
        .get(format!("{proxy}/cart"))
        .header("host", "demo.local")
        .header("traceparent", format!("00-{trace}-{client_span}-01"))
        .header("tracestate", "vendor=opaque")
        .send()
        .await
        .expect("the proxy answers");
    assert_eq!(response.status(), 200);
    let body = response.text().await.expect("body");
    let (upstream_trace, proxy_span, flags) = echoed_traceparent(&body);
    assert_eq!(upstream_trace, trace, "the same trace: {body}");
    assert_ne!(proxy_span, client_span, "the proxy's own span: {body}");
    assert_eq!(flags, "01", "still sampled: {body}");
    assert!(
        body.lines().any(|l| l == "tracestate=vendor=opaque"),
        "tracestate passed on: {body}"
    );
    let span = collector
        .wait("the proxy's span is exported", |s| {
            hex(&s.span_id) == proxy_span
        })
        .await;
    assert_eq!(hex(&span.trace_id), trace);
    assert_eq!(
        hex(&span.parent_span_id),
        client_span,
        "the client's span is its parent"
    );
    assert_eq!(span.name, "GET demo/root");
    let attrs = attributes(&span);
    assert_eq!(attrs["http.request.method"], "GET");
    assert_eq!(attrs["url.path"], "/cart");
    assert_eq!(attrs["http.route"], "demo/root");
    assert_eq!(attrs["prism.namespace"], "demo");
    assert_eq!(attrs["prism.backend"], "demo/web");
    assert_eq!(attrs["http.response.status_code"], "200");
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);

    // No traceparent from the client: the proxy starts a trace.
    let answer = get(&http, proxy, "demo.local", "/new").await;
    assert_eq!(answer.status, 200);
    let (new_trace, root_span, _) = echoed_traceparent(&answer.body);
    assert_ne!(new_trace, trace);
    let root = collector
        .wait("the new trace's root span", |s| {
            hex(&s.span_id) == root_span
        })
        .await;
    assert_eq!(hex(&root.trace_id), new_trace);
    assert!(root.parent_span_id.is_empty(), "a root span: {root:?}");
    // The access log line carries the trace id of the span.
    let log = eventually("the access log has the request", || async {
        let text = std::fs::read_to_string(data_dir.join("access.log")).ok()?;
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
            .find(|l| l["path"] == "/new")
    })
    .await;
    assert_eq!(log["trace_id"], new_trace.as_str());

    // An error the proxy answers itself is traced too, marked as failed.
    let answer = get(&http, proxy, "nowhere.test", "/").await;
    assert_eq!(answer.status, 404);
    let unmatched = collector
        .wait("the unmatched request's span", |s| {
            attributes(s).get("server.address").map(String::as_str) == Some("nowhere.test")
        })
        .await;
    assert_eq!(attributes(&unmatched)["http.response.status_code"], "404");

    // The admin write and its commit, and the push of its revision.
    let write = collector
        .wait("the admin write's span", |s| s.name == "POST /v1/apply")
        .await;
    assert_eq!(attributes(&write)["enduser.id"], "admin");
    assert_eq!(attributes(&write)["http.response.status_code"], "200");
    let commit = collector
        .wait("the store commit's span", |s| s.name == "store commit")
        .await;
    assert_eq!(
        commit.parent_span_id, write.span_id,
        "the commit is the write's child"
    );
    assert_eq!(commit.trace_id, write.trace_id);
    assert_eq!(attributes(&commit)["prism.revision"], revision.to_string());
    assert_eq!(attributes(&commit)["prism.author"], "admin");
    let push = collector
        .wait("the push of the revision", |s| {
            s.name == "xds push"
                && attributes(s).get("prism.revision") == Some(&revision.to_string())
        })
        .await;
    assert!(attributes(&push)["prism.node"].len() > 1);
    assert!(collector.services().iter().all(|s| s == "prism"));
}
