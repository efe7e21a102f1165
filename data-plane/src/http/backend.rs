//! The backend stage: balance a routed request over its backend's endpoints.
//! The balancer's state is the backend's ([`crate::runtime::Backend`] owns a
//! [`crate::runtime::balance::Balancer`]), so it survives applies that leave
//! the backend unchanged. When no endpoint is available the request fails
//! with [`ProxyError::NoHealthyUpstream`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::body::ReplayBody;
use super::error::{BoxError, ProxyError};
use super::retry::Tried;
use super::route::Routed;
use crate::runtime::balance::Endpoints as _;
use crate::runtime::{Backend, Route};

/// A request below the backend stage: routed, with its endpoint picked.
#[derive(Debug)]
pub(crate) struct Picked {
    pub route: Arc<Route>,
    /// The backend the route stage picked.
    pub backend: Arc<Backend>,
    /// Index into the backend's endpoints, from its balancer.
    pub endpoint: usize,
    pub request: Request<ReplayBody>,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BalanceLayer;

#[derive(Clone, Debug)]
pub(crate) struct Balance<S> {
    inner: S,
}

pin_project! {
    #[project = ResponseFutureProj]
    pub(crate) enum ResponseFuture<F> {
        Picked { #[pin] inner: F },
        Unavailable { backend: Option<String> },
    }
}

/// Every endpoint of a backend is out of its balancer; context for the log.
#[derive(Debug, thiserror::Error)]
#[error("backend {backend}")]
struct AtBackend {
    backend: String,
    #[source]
    error: ProxyError,
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Balance<S> {
        Balance { inner }
    }
}

impl<S, R> Service<Routed> for Balance<S>
where
    S: Service<Picked, Response = R, Error = BoxError>,
{
    type Response = R;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let Routed {
            route,
            backend,
            request,
        } = routed;
        let picked = {
            let candidates = backend.candidates();
            let key = backend.balancer.hash(&request);
            backend.balancer.pick(&candidates, key).map(|endpoint| {
                // A retry goes to an available endpoint its request has not
                // tried, where one exists.
                match request.extensions().get::<Tried>() {
                    Some(tried) => tried.avoid(endpoint, backend.endpoints.len(), |i| {
                        candidates.available(i)
                    }),
                    None => endpoint,
                }
            })
        };
        match picked {
            Some(endpoint) => ResponseFuture::Picked {
                inner: self.inner.call(Picked {
                    route,
                    backend,
                    endpoint,
                    request,
                }),
            },
            None => ResponseFuture::Unavailable {
                backend: Some(backend.name.clone()),
            },
        }
    }
}
impl<F, R> Future for ResponseFuture<F>
where
    F: Future<Output = Result<R, BoxError>>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Picked { inner } => inner.poll(cx),
            ResponseFutureProj::Unavailable { backend } => Poll::Ready(Err(AtBackend {
                backend: backend.take().unwrap_or_default(),
                error: ProxyError::NoHealthyUpstream,
            }
            .into())),
        }
    }
}
