//! The circuit-breaker stage, between balance and endpoint. It also feeds
//! outlier detection ([`crate::runtime::outlier`]) the same outcomes: a 5xx
//! response, a gateway failure (an error) or a success. It asks the picked
//! endpoint's breaker ([`crate::runtime::breaker::Breaker`]) to let the
//! request through and tells it how the request went. A 5xx response or any
//! error (connect failure, reset, timeout of the upstream) is a failure;
//! a request dropped before its response head (the route timeout, a client
//! gone) or refused by a backend limit tells the breaker nothing. An open breaker also takes the endpoint
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
use crate::runtime::Backend;
use crate::runtime::breaker::Admit;
use crate::runtime::outlier::Outcome;

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BreakerLayer;

#[derive(Clone, Debug)]
pub(crate) struct CircuitBreaker<S> {
    inner: S,
}

/// A request the breaker let through, until its outcome is recorded.
struct Pass {
    backend: Arc<Backend>,
    endpoint: usize,
    /// `None` when the endpoint has no breaker (only outlier detection).
    admit: Option<Admit>,
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
        let endpoint = &picked.backend.endpoints[picked.endpoint];
        if endpoint.breaker.is_none() && endpoint.outlier.is_none() {
            return ResponseFuture::Passed {
                inner: self.inner.call(picked),
                pass: None,
            };
        }
        let admitted = match endpoint.breaker.as_ref() {
            Some(breaker) => breaker.admit(Instant::now).map(Some),
            None => Some(None),
        };
        match admitted {
            Some(admit) => {
                let pass = Pass {
                    backend: Arc::clone(&picked.backend),
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
                    let outcome = match &result {
                        Ok(r) if r.status().is_server_error() => Outcome::ServerError {
                            gateway: matches!(r.status().as_u16(), 502..=504),
                        },
                        Ok(_) => Outcome::Success,
                        // A backend limit refused it before it reached the
                        // endpoint: that says nothing about the endpoint.
                        Err(e)
                            if matches!(
                                ProxyError::classify(&**e),
                                ProxyError::PendingOverflow | ProxyError::RequestsOverflow
                            ) =>
                        {
                            return Poll::Ready(result);
                        }
                        Err(_) => Outcome::GatewayFailure,
                    };
                    pass.record(outcome);
                }
                Poll::Ready(result)
            }
            ResponseFutureProj::Refused => Poll::Ready(Err(ProxyError::NoHealthyUpstream.into())),
        }
    }
}

impl Pass {
    fn breaker(&self) -> Option<&crate::runtime::breaker::Breaker> {
        self.backend.endpoints[self.endpoint].breaker.as_ref()
    }

    fn record(mut self, outcome: Outcome) {
        self.recorded = true;
        let now = Instant::now();
        if let (Some(breaker), Some(admit)) = (self.breaker(), self.admit) {
            breaker.record(admit, outcome == Outcome::Success, || now);
        }
        self.backend.record_outcome(self.endpoint, outcome, now);
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if !self.recorded
            && let (Some(breaker), Some(admit)) = (self.breaker(), self.admit)
        {
            breaker.abandon(admit);
        }
    }
}
