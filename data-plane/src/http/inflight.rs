//! A request counts as in flight from the call until its response body ends
//! (or is dropped): [`ResponseFuture`] carries a guard `G` to the response and
//! [`Body`] holds it until the body is done with. The concurrency limit
//! ([`super::overload`]) and the server's idle timeout ([`super::idle`])
//! count requests this way, each with its own guard.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use hyper::body::{Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The inner service's future, holding `guard` until its response's body
    /// is done with.
    pub(crate) struct ResponseFuture<F, G> {
        #[pin]
        inner: F,
        guard: Option<G>,
    }
}

pin_project! {
    /// A response body that holds `guard` until it is dropped.
    pub(crate) struct Body<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<F, G> ResponseFuture<F, G> {
    pub(crate) fn new(inner: F, guard: G) -> Self {
        ResponseFuture {
            inner,
            guard: Some(guard),
        }
    }
}

impl<F, G, B, E> Future for ResponseFuture<F, G>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Body<B, G>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|inner| Body { inner, guard })))
    }
}

impl<B, G> hyper::body::Body for Body<B, G>
where
    B: hyper::body::Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if frame.is_none() {
            // The body is done: release the guard now, not when hyper
            // gets round to dropping the body.
            this.guard.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
