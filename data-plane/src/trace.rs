//! Traces: a span per proxied request, when the process exports traces.
//!
//! The route stage starts the span once it knows where the request goes
//! (the route and backend, or none), named after the route, a child of the
//! client's W3C `traceparent` when it sent a valid one (its `tracestate`
//! kept), else the root of a new trace. A routed request's
//! `traceparent`/`tracestate` are rewritten to name this span: the upstream
//! continues the trace under it, and the access log line takes its trace id
//! from there. The span learns the status as the response head comes back,
//! and ends with the request's [`Recorder`](crate::metrics::Recorder), as
//! the response body ends. Everything is given when the span is made: one
//! `new_span`, no `record` but the status.
//!
//! The span is a `tracing` span of the `prism_trace` target, which
//! `tracing-opentelemetry` turns into an OpenTelemetry span in the binary
//! that installs it (see the `prism` package's `telemetry` module). With no
//! exporter, no subscriber wants that target: [`RequestSpan::start`] finds
//! its `enabled!` callsite disabled and returns `None`, and the request
//! pays that one check.

use http::{HeaderName, Request, StatusCode, Version};
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

/// Where the route stage sent a request: the route it matched, and the
/// backend picked when the route forwards.
pub(crate) type Matched<'a> = Option<(&'a Route, Option<&'a Backend>)>;

impl RequestSpan {
    /// The span of `request`, which went to `matched` (`None`: no route);
    /// `None` when traces are off. A routed request carries the span as its
    /// trace context from now on.
    pub(crate) fn start<B>(request: &mut Request<B>, matched: Matched<'_>) -> Option<Self> {
        // Off, nothing below is computed: the span's own check comes after
        // its name is made.
        if !tracing::enabled!(target: "prism_trace", tracing::Level::INFO) {
            return None;
        }
        let method = request.method().as_str();
        let route = matched.map(|(route, _)| route.name.as_str());
        let name = route.map(|route| format!("{method} {route}"));
        let span = tracing::info_span!(
            target: "prism_trace",
            "proxy",
            otel.name = name.as_deref().unwrap_or(method),
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = method,
            url.path = request.uri().path(),
            server.address = crate::http::route::request_host(request),
            network.protocol.version = protocol(request.version()),
            http.route = route,
            prism.namespace = route.map(|r| r.split_once('/').map_or(r, |(ns, _)| ns)),
            prism.backend = matched.and_then(|(_, b)| b).map(|b| b.name.as_str()),
            http.response.status_code = Empty,
        );
        if span.is_disabled() {
            return None;
        }
        let propagator = TraceContextPropagator::new();
        let parent = propagator.extract(&HeaderExtractor(request.headers()));
        // Only a span already built refuses a parent: this one is new.
        let _ = span.set_parent(parent);
        if matched.is_some() {
            let headers = request.headers_mut();
            headers.remove(TRACEPARENT);
            headers.remove(TRACESTATE);
            propagator.inject_context(&span.context(), &mut HeaderInjector(headers));
        }
        Some(Self(span))
    }

    /// The request was answered with `status`; a 5xx marks the span failed.
    pub(crate) fn answered(&self, status: StatusCode) {
        self.0.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            self.0.record("otel.status_code", "error");
        }
    }
}

/// `network.protocol.version` of an HTTP version.
fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}
