//! Traces: a span per proxied request, when the process exports traces.
//!
//! The route stage starts the span as a request reaches it, a child of the
//! client's W3C `traceparent` when it sent a valid one (its `tracestate`
//! kept), else the root of a new trace. Once the request's route (and
//! backend) is known, the span is named after it and the request's
//! `traceparent`/`tracestate` are rewritten to name this span: the upstream
//! continues the trace under it, and the access log line takes its trace id
//! from there. The span learns the status as the response head comes back,
//! and ends with the request's [`Recorder`](crate::metrics::Recorder), as
//! the response body ends.
//!
//! The span is a `tracing` span of the `prism_trace` target, which
//! `tracing-opentelemetry` turns into an OpenTelemetry span in the binary
//! that installs it (see the `prism` package's `telemetry` module). With no
//! exporter, no subscriber wants that target: [`RequestSpan::start`] finds
//! its callsite disabled and returns `None`, and the request pays that one
//! check.

use http::{HeaderName, Request, StatusCode};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::runtime::{Backend, Route};

const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The span of one proxied request.
#[derive(Debug)]
pub(crate) struct RequestSpan(tracing::Span);

impl RequestSpan {
    /// The span of `request`, from now on; `None` when traces are off.
    pub(crate) fn start<B>(request: &Request<B>) -> Option<Self> {
        let span = tracing::info_span!(
            target: "prism_trace",
            "proxy",
            otel.name = %request.method(),
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = %request.method(),
            url.path = request.uri().path(),
            server.address = crate::http::route::request_host(request),
            network.protocol.version = ?request.version(),
            http.route = Empty,
            http.response.status_code = Empty,
            prism.namespace = Empty,
            prism.backend = Empty,
        );
        if span.is_disabled() {
            return None;
        }
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
        // Only a span already built refuses a parent: this one is new.
        let _ = span.set_parent(parent);
        Some(Self(span))
    }

    /// `request` matched `route` and goes to `backend`, if it forwards: the
    /// span is named after the route, and the request carries it as its
    /// trace context from now on.
    pub(crate) fn routed<B>(
        &self,
        request: &mut Request<B>,
        route: &Route,
        backend: Option<&Backend>,
    ) {
        let namespace = route.name.split_once('/').map_or("", |(ns, _)| ns);
        // Named before it is built (by `context` below): a built span keeps
        // its name.
        self.0
            .record("otel.name", format!("{} {}", request.method(), route.name));
        self.0.record("http.route", route.name.as_str());
        self.0.record("prism.namespace", namespace);
        if let Some(backend) = backend {
            self.0.record("prism.backend", backend.name.as_str());
        }
        let headers = request.headers_mut();
        headers.remove(TRACEPARENT);
        headers.remove(TRACESTATE);
        TraceContextPropagator::new()
            .inject_context(&self.0.context(), &mut HeaderInjector(headers));
    }

    /// The request was answered with `status`; a 5xx marks the span failed.
    pub(crate) fn answered(&self, status: StatusCode) {
        self.0.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            self.0.record("otel.status_code", "error");
        }
    }
}
