//! The backend stage: balance a routed request over its backend's endpoints.
//! The balancer's state is the backend's ([`crate::runtime::Backend`] owns a
//! [`Balancer`]), so it survives applies that leave the backend unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use super::body::ReplayBody;
use super::retry::Tried;
use super::route::Routed;
use crate::runtime::{Backend, Route};

/// Round robin over a backend's endpoints.
#[derive(Debug, Default)]
pub(crate) struct Balancer {
    next: AtomicUsize,
}

/// A request below the backend stage: routed, with its endpoint picked.
#[derive(Debug)]
pub(crate) struct Picked {
    pub route: Arc<Route>,
    /// The backend the route stage picked.
    pub backend: Arc<Backend>,
    /// Index into the backend's endpoints, from [`Balancer::pick`].
    pub endpoint: usize,
    pub request: Request<ReplayBody>,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BalanceLayer;

#[derive(Clone, Debug)]
pub(crate) struct Balance<S> {
    inner: S,
}

impl Balancer {
    /// The index of the next endpoint out of `endpoints` (at least one).
    pub(crate) fn pick(&self, endpoints: usize) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % endpoints
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Balance<S> {
        Balance { inner }
    }
}

impl<S> Service<Routed> for Balance<S>
where
    S: Service<Picked>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed) -> S::Future {
        let Routed {
            route,
            backend,
            request,
        } = routed;
        // A compiled backend always has at least one endpoint.
        let endpoints = backend.endpoints.len();
        let mut endpoint = backend.balancer.pick(endpoints);
        // A retry goes to an endpoint its request has not tried, where one exists.
        if let Some(tried) = request.extensions().get::<Tried>() {
            endpoint = tried.avoid(endpoint, endpoints);
        }
        self.inner.call(Picked {
            route,
            backend,
            endpoint,
            request,
        })
    }
}
