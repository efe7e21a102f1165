//! A span per admin API write, when the process exports traces: a server
//! span named by the method and the route's path template, a child of the
//! caller's W3C `traceparent` when it sent one, naming the token's subject
//! and the status. The store's commit span (with the revision) is its
//! child. Reads are not traced.
//!
//! Spans of the `prism_trace` target are traces only; with no exporter
//! none is recorded (see the `prism` package's `telemetry` module).

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument as _;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::auth::Caller;

/// Middleware on the admin API's routes, inside authentication: runs a
/// write in its span.
pub async fn write_span(request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| request.uri().path(), MatchedPath::as_str);
    let span = tracing::info_span!(
        target: "prism_trace",
        "admin write",
        otel.name = format!("{} {route}", request.method()),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %request.method(),
        http.route = route,
        url.path = request.uri().path(),
        enduser.id = request.extensions().get::<Caller>().map(|c| c.subject.as_str()),
        http.response.status_code = Empty,
    );
    if span.is_disabled() {
        return next.run(request).await;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    // Only a span not yet built refuses a parent: this one is new.
    let _ = span.set_parent(parent);
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    response
}
