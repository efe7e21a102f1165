//! The request body limit: a route's `max_request_body_bytes`. A request that
//! announces a longer body (`content-length`) is refused with `413` before
//! anything goes upstream. A body without a length is counted as it streams
//! ([`super::body::ReplayBody::limit`]): crossing the limit fails it with
//! [`super::body::BodyTooLarge`], which becomes `413` while the upstream has
//! not answered yet; once the response head has come back, the upstream
//! stream is reset instead, since a status has already gone out.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Response, header};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::error::{BoxError, ProxyError};
use super::route::Routed;

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BodyLimitLayer;

#[derive(Clone, Debug)]
pub(crate) struct BodyLimit<S> {
    inner: S,
}

pin_project! {
    #[project = ResponseFutureProj]
    pub(crate) enum ResponseFuture<F> {
        Passed { #[pin] inner: F },
        Refused,
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit { inner }
    }
}

impl<S, B> Service<Routed> for BodyLimit<S>
where
    S: Service<Routed, Response = Response<B>, Error = BoxError>,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut routed: Routed) -> Self::Future {
        if let Some(max) = routed.route.max_request_body_bytes {
            let announced = routed
                .request
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if announced.is_some_and(|length| length > max) {
                return ResponseFuture::Refused;
            }
            routed.request.body_mut().limit(max);
        }
        ResponseFuture::Passed {
            inner: self.inner.call(routed),
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
            ResponseFutureProj::Passed { inner } => inner.poll(cx),
            ResponseFutureProj::Refused => Poll::Ready(Err(ProxyError::BodyTooLarge.into())),
        }
    }
}
