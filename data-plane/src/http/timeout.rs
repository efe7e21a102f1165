//! The timeout stage: the route timeout bounds the whole response, head and
//! body, as Envoy's route `timeout` does. A response head that does not come
//! in time becomes `504`; a body still streaming at the deadline is cut (the
//! connection or HTTP/2 stream is reset), since its status has already gone out.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};
use tower::{Layer, Service};
use tracing::debug;

use super::error::{BoxError, ProxyError};
use super::route::Routed;

/// The timeout stage's part of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Params {
    /// How long the whole response may take, from the request to the end of
    /// the response body.
    pub response: Duration,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TimeoutLayer;

#[derive(Clone, Debug)]
pub(crate) struct Timeout<S> {
    inner: S,
}

pin_project! {
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Sleep,
    }
}

pin_project! {
    /// A response body that must end by the route's deadline.
    pub(crate) struct TimeoutBody<B> {
        #[pin]
        body: B,
        #[pin]
        sleep: Sleep,
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner }
    }
}

impl<S, B> Service<Routed> for Timeout<S>
where
    S: Service<Routed, Response = Response<B>, Error = BoxError>,
{
    type Response = Response<TimeoutBody<B>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let deadline = Instant::now() + routed.route.timeout.response;
        ResponseFuture {
            inner: self.inner.call(routed),
            sleep: sleep_until(deadline),
        }
    }
}

impl<F, B> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<TimeoutBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The inner future first: a response that is ready wins, and the timer
        // is only registered when something actually has to wait.
        if let Poll::Ready(result) = this.inner.poll(cx) {
            let deadline = this.sleep.deadline();
            return Poll::Ready(result.map(|response| {
                response.map(|body| TimeoutBody {
                    body,
                    sleep: sleep_until(deadline),
                })
            }));
        }
        ready!(this.sleep.poll(cx));
        Poll::Ready(Err(ProxyError::Timeout.into()))
    }
}

impl<B> Body for TimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        ready!(this.sleep.poll(cx));
        debug!("The route timeout cut a response body.");
        Poll::Ready(Some(Err(ProxyError::Timeout.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
