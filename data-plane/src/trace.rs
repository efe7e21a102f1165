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

use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Version};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanContext, TraceContextExt as _, TraceFlags};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::runtime::{Backend, Route};

const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The span of one proxied request. Boxed: every request's record has a
/// place for one, and with traces off it stays a null pointer (a bare
/// `Span` would add 32 bytes to every response future and body moved
/// through the stack, which callgrind counted as memcpy).
#[derive(Debug)]
pub(crate) struct RequestSpan(Box<tracing::Span>);

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
            let context = span.context();
            inject(request.headers_mut(), context.span().span_context());
        }
        Some(Self(Box::new(span)))
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

/// Makes `context` the W3C trace context of a request with `headers`: what
/// `TraceContextPropagator::inject_context` writes, without its formatting
/// machinery (callgrind: 2,500 instructions a request) and without an
/// empty `tracestate`.
fn inject(headers: &mut HeaderMap, context: &SpanContext) {
    headers.remove(TRACEPARENT);
    headers.remove(TRACESTATE);
    if !context.is_valid() {
        return;
    }
    // `00-<trace id>-<span id>-<flags>`, in lowercase hex.
    let mut value = [0u8; 55];
    value[..3].copy_from_slice(b"00-");
    hex(&context.trace_id().to_bytes(), &mut value[3..35]);
    value[35] = b'-';
    hex(&context.span_id().to_bytes(), &mut value[36..52]);
    value[52] = b'-';
    let flags = context.trace_flags() & TraceFlags::SAMPLED;
    hex(&[flags.to_u8()], &mut value[53..]);
    if let Ok(value) = HeaderValue::from_bytes(&value) {
        headers.insert(TRACEPARENT, value);
    }
    let state = context.trace_state().header();
    if !state.is_empty()
        && let Ok(value) = HeaderValue::try_from(state)
    {
        headers.insert(TRACESTATE, value);
    }
}

/// `bytes` as lowercase hex into `out`, two digits a byte.
fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (byte, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceId, TraceState};

    use super::*;

    #[test]
    fn the_trace_context_is_written_as_the_w3c_propagator_writes_it() {
        let state = TraceState::from_key_value([("vendor", "opaque")]).expect("state");
        for (flags, state) in [
            (TraceFlags::SAMPLED, state),
            (TraceFlags::default(), TraceState::default()),
        ] {
            let context = SpanContext::new(
                TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("trace id"),
                SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
                flags,
                true,
                state,
            );
            let mut ours = HeaderMap::new();
            ours.insert(TRACEPARENT, HeaderValue::from_static("00-stale"));
            inject(&mut ours, &context);
            let mut theirs = HeaderMap::new();
            let cx = opentelemetry::Context::new().with_remote_span_context(context.clone());
            TraceContextPropagator::new()
                .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(&mut theirs));
            assert_eq!(ours.get(TRACEPARENT), theirs.get(TRACEPARENT));
            // Theirs writes an empty `tracestate`; ours leaves it out.
            match theirs.get(TRACESTATE).filter(|v| !v.is_empty()) {
                Some(state) => assert_eq!(ours.get(TRACESTATE), Some(state)),
                None => assert_eq!(ours.get(TRACESTATE), None),
            }
        }
        let mut headers = HeaderMap::new();
        headers.insert(TRACESTATE, HeaderValue::from_static("stale=1"));
        inject(&mut headers, &SpanContext::empty_context());
        assert!(headers.is_empty(), "no context: none passed on");
    }
}
