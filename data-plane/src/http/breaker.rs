//! The circuit-breaker stage, between balance and endpoint: asks the picked
//! endpoint's breaker ([`crate::runtime::breaker::Breaker`]) to let the
//! request through and tells it how the request went. A 5xx response or any
//! error (connect failure, reset, timeout of the upstream) is a failure;
//! a request dropped before its response head (the route timeout, a client
//! gone) tells the breaker nothing. An open breaker also takes the endpoint
//! out of the balancer, so a refusal here is only a race with another
//! request taking the last half-open probe slot.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::backend::Picked;
use super::error::{BoxError, ProxyError};
use crate::runtime::Route;
use crate::runtime::breaker::Admit;

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BreakerLayer;

#[derive(Clone, Debug)]
pub(crate) struct CircuitBreaker<S> {
    inner: S,
}

/// A request the breaker let through, until its outcome is recorded.
struct Pass {
    route: Arc<Route>,
    endpoint: usize,
    admit: Admit,
    /// Set once the outcome is recorded; a pass dropped without one gives
    /// its probe slot back.
    recorded: bool,
}

pin_project! {
    #[project = ResponseFutureProj]
    pub(crate) enum ResponseFuture<F> {
        Passed { #[pin] inner: F, pass: Option<Pass> },
        Refused,
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker { inner }
    }
}

impl<S, B> Service<Picked> for CircuitBreaker<S>
where
    S: Service<Picked, Response = Response<B>, Error = BoxError>,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, picked: Picked) -> Self::Future {
        let Some(breaker) = picked.route.backend.endpoints[picked.endpoint]
            .breaker
            .as_ref()
        else {
            return ResponseFuture::Passed {
                inner: self.inner.call(picked),
                pass: None,
            };
        };
        match breaker.admit(Instant::now()) {
            Some(admit) => {
                let pass = Pass {
                    route: Arc::clone(&picked.route),
                    endpoint: picked.endpoint,
                    admit,
                    recorded: false,
                };
                ResponseFuture::Passed {
                    inner: self.inner.call(picked),
                    pass: Some(pass),
                }
            }
            None => ResponseFuture::Refused,
        }
    }
}

impl<F, B> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Passed { inner, pass } => {
                let result = ready!(inner.poll(cx));
                if let Some(pass) = pass.take() {
                    let success = matches!(&result, Ok(r) if !r.status().is_server_error());
                    pass.record(success);
                }
                Poll::Ready(result)
            }
            ResponseFutureProj::Refused => Poll::Ready(Err(ProxyError::NoHealthyUpstream.into())),
        }
    }
}

impl Pass {
    fn breaker(&self) -> Option<&crate::runtime::breaker::Breaker> {
        self.route.backend.endpoints[self.endpoint].breaker.as_ref()
    }

    fn record(mut self, success: bool) {
        self.recorded = true;
        if let Some(breaker) = self.breaker() {
            breaker.record(self.admit, success, Instant::now());
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if !self.recorded
            && let Some(breaker) = self.breaker()
        {
            breaker.abandon(self.admit);
        }
    }
}
