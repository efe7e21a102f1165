//! The proxy-wide concurrency limit, at the top of the stack: a request
//! beyond `max_concurrent_requests` in flight fails at once with
//! [`ProxyError::Overloaded`] (`503`, gRPC `UNAVAILABLE`) instead of waiting
//! in a queue that grows without bound. A request is in flight until its
//! response body ends ([`super::inflight`]), so long streams count too.
//! One shared atomic counter, no lock: the listener's
//! `prism_proxy_active_requests` gauge itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::{info, warn};

use super::error::{BoxError, ProxyError};
use super::inflight;
use crate::metrics::ListenerMetrics;

#[derive(Clone, Debug)]
pub(crate) struct ConcurrencyLimitLayer {
    counter: Arc<Counter>,
}

/// Refuses requests beyond the limit shared by all its clones.
#[derive(Clone, Debug)]
pub(crate) struct ConcurrencyLimit<S> {
    inner: S,
    counter: Arc<Counter>,
}

#[derive(Debug)]
struct Counter {
    /// Requests in flight (an atomic behind an `Arc`, as the metric it is).
    in_flight: prometheus_client::metrics::gauge::Gauge,
    /// Requests refused.
    refused: prometheus_client::metrics::counter::Counter,
    max: i64,
    /// Whether the last request was refused: each episode of saturation is
    /// logged once as it starts and once as it ends, not once a request.
    saturated: AtomicBool,
}

/// One request's place under the limit, given back on drop.
#[derive(Debug)]
pub(crate) struct Permit(Arc<Counter>);

pin_project! {
    #[project = ResponseFutureProj]
    pub(crate) enum ResponseFuture<F> {
        Admitted { #[pin] inner: inflight::ResponseFuture<F, Permit> },
        Refused,
    }
}

impl ConcurrencyLimitLayer {
    /// At most `max` requests in flight, counted in `metrics`' active
    /// requests and overload rejections.
    pub(crate) fn new(max: u32, metrics: &ListenerMetrics) -> Self {
        ConcurrencyLimitLayer {
            counter: Arc::new(Counter {
                in_flight: metrics.requests.clone(),
                refused: metrics.overloaded.clone(),
                max: i64::from(max),
                saturated: AtomicBool::new(false),
            }),
        }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit {
            inner,
            counter: Arc::clone(&self.counter),
        }
    }
}

impl Counter {
    /// A permit, or `None` when `max` requests are already in flight.
    fn acquire(self: &Arc<Self>) -> Option<Permit> {
        // Relaxed (the gauge's ordering): the count guards no other memory,
        // it only has to be exact.
        if self.in_flight.inc() >= self.max {
            self.in_flight.dec();
            self.refused.inc();
            if !self.saturated.swap(true, Ordering::Relaxed) {
                warn!(
                    max_concurrent_requests = self.max,
                    "Overloaded: refusing new requests with 503 until some finish."
                );
            }
            return None;
        }
        if self.saturated.load(Ordering::Relaxed) && self.saturated.swap(false, Ordering::Relaxed) {
            info!("No longer overloaded: admitting requests again.");
        }
        Some(Permit(Arc::clone(self)))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

impl<S, ReqB, B> Service<Request<ReqB>> for ConcurrencyLimit<S>
where
    S: Service<Request<ReqB>, Response = Response<B>, Error = BoxError>,
{
    type Response = Response<inflight::Body<B, Permit>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        match self.counter.acquire() {
            Some(permit) => ResponseFuture::Admitted {
                inner: inflight::ResponseFuture::new(self.inner.call(request), permit),
            },
            None => ResponseFuture::Refused,
        }
    }
}

impl<F, B> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<inflight::Body<B, Permit>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Admitted { inner } => inner.poll(cx),
            ResponseFutureProj::Refused => Poll::Ready(Err(ProxyError::Overloaded.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_stop_at_the_limit_and_come_back_on_drop() {
        let metrics = ListenerMetrics::default();
        let layer = ConcurrencyLimitLayer::new(2, &metrics);
        let counter = &layer.counter;
        let first = counter.acquire().expect("first");
        let second = counter.acquire().expect("second");
        assert!(counter.acquire().is_none(), "a third is refused");
        assert_eq!(counter.in_flight.get(), 2, "a refusal holds nothing");
        assert_eq!(metrics.overloaded.get(), 1, "the refusal is counted");
        drop(first);
        let third = counter.acquire().expect("a freed place is taken again");
        drop((second, third));
        assert_eq!(metrics.requests.get(), 0);
    }
}
