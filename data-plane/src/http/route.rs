//! The route stage: the request's one `load_full()` of the runtime, then
//! host + path → [`Route`]. Below this stage a request travels as [`Routed`]:
//! the route it matched (and through it its backend, pool and parameters)
//! stays with it to the end, whatever is applied meanwhile.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response, header};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::body::ReplayBody;
use super::error::{BoxError, ProxyError};
use crate::runtime::{Probe, Route, Runtime};

/// A request below the route stage.
#[derive(Debug)]
pub(crate) struct Routed {
    pub route: Arc<Route>,
    pub request: Request<ReplayBody>,
}

#[derive(Clone, Debug)]
pub(crate) struct RouteLayer {
    runtime: Arc<ArcSwap<Runtime>>,
}

#[derive(Clone, Debug)]
pub(crate) struct Router<S> {
    runtime: Arc<ArcSwap<Runtime>>,
    inner: S,
}

pin_project! {
    #[project = ResponseFutureProj]
    pub(crate) enum ResponseFuture<F> {
        Routed { #[pin] inner: F },
        Failed { error: Option<ProxyError> },
    }
}

impl RouteLayer {
    pub(crate) fn new(runtime: Arc<ArcSwap<Runtime>>) -> Self {
        Self { runtime }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Router<S>;

    fn layer(&self, inner: S) -> Router<S> {
        Router {
            runtime: Arc::clone(&self.runtime),
            inner,
        }
    }
}

impl<S, B> Service<Request<Incoming>> for Router<S>
where
    S: Service<Routed, Response = Response<B>, Error = BoxError>,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let runtime = self.runtime.load_full();
        let route = if !runtime.is_configured() {
            Err(ProxyError::NotConfigured)
        } else {
            let host = request_host(&request);
            let path = request.uri().path();
            let probe = Probe {
                method: request.method(),
                path,
                query: request.uri().query(),
                headers: request.headers(),
            };
            runtime
                .route(host, &probe)
                .cloned()
                .ok_or_else(|| ProxyError::NoRoute {
                    host: host.to_string(),
                    path: path.to_string(),
                })
        };
        match route {
            Ok(route) => ResponseFuture::Routed {
                inner: self.inner.call(Routed {
                    route,
                    request: request.map(ReplayBody::new),
                }),
            },
            Err(error) => ResponseFuture::Failed { error: Some(error) },
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
            ResponseFutureProj::Routed { inner } => inner.poll(cx),
            ResponseFutureProj::Failed { error } => {
                Poll::Ready(Err(error.take().unwrap_or(ProxyError::Internal).into()))
            }
        }
    }
}

/// The host a request is for: `:authority` (HTTP/2, or an absolute-form
/// HTTP/1 target), else the Host header.
fn request_host<B>(request: &Request<B>) -> &str {
    if let Some(authority) = request.uri().authority() {
        return authority.as_str();
    }
    request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}
