//! The timeout stage: the route timeout means what Envoy's route `timeout`
//! means. It starts once the whole request has been received (at once for a
//! request without a body) and bounds the whole response, head and body. A
//! response head that does not come in time becomes `504`; a body still
//! streaming at the deadline is cut (the connection or HTTP/2 stream is reset),
//! since its status has already gone out. The route's `idle_timeout`, when
//! set, also cuts a response body that has not moved for that long, unless
//! the request body is still moving.

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

use super::body::BodyEnd;
use super::error::{BoxError, ProxyError};
use super::route::Routed;

/// The timeout stage's part of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Params {
    /// How long the whole response may take, from the end of the request to
    /// the end of the response body.
    pub response: Duration,
    /// The route's `idle_timeout`: how long the streams may go without a
    /// body frame either way once the response head is out.
    pub idle: Option<Duration>,
}

/// When the route timeout runs out: `timeout` after the request ended.
#[derive(Clone, Debug)]
struct Deadline {
    timeout: Duration,
    /// The request body, still streaming when the request was sent on; `None`
    /// when it had already ended, so the timer started with the request.
    body: Option<BodyEnd>,
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
        deadline: Deadline,
        idle: Option<Duration>,
    }
}

pin_project! {
    /// A response body that must end by the route's deadline.
    pub(crate) struct TimeoutBody<B> {
        #[pin]
        body: B,
        #[pin]
        sleep: Sleep,
        deadline: Deadline,
        // Only routes with an `idle_timeout` pay for this timer.
        idle: Option<Idle>,
    }
}

/// The idle timer of a response body.
#[derive(Debug)]
pub(crate) struct Idle {
    after: Duration,
    sleep: Pin<Box<Sleep>>,
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
        let timeout = routed.route.timeout.response;
        // The soonest the timeout can run out: the request cannot end earlier.
        let sleep = sleep_until(Instant::now() + timeout);
        let deadline = Deadline {
            timeout,
            body: routed.request.body().end(),
        };
        let idle = routed.route.timeout.idle;
        ResponseFuture {
            inner: self.inner.call(routed),
            sleep,
            deadline,
            idle,
        }
    }
}

impl<F, B> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<TimeoutBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The inner future first: a response that is ready wins, and the timer
        // is only registered when something actually has to wait.
        if let Poll::Ready(result) = this.inner.poll(cx) {
            let (at, deadline) = (this.sleep.deadline(), this.deadline.clone());
            let idle = this.idle.map(|after| Idle {
                after,
                sleep: Box::pin(sleep_until(Instant::now() + after)),
            });
            return Poll::Ready(result.map(|response| {
                response.map(|body| TimeoutBody {
                    body,
                    sleep: sleep_until(at),
                    deadline,
                    idle,
                })
            }));
        }
        ready!(this.deadline.poll_expired(this.sleep.as_mut(), cx));
        Poll::Ready(Err(ProxyError::Timeout.into()))
    }
}

impl Deadline {
    /// Ready once the route timeout has run out. When `sleep` fires while the
    /// request is still streaming, or ended later than it was armed for, it
    /// is moved to the real deadline instead.
    fn poll_expired(&self, mut sleep: Pin<&mut Sleep>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(sleep.as_mut().poll(cx));
            let Some(body) = &self.body else {
                return Poll::Ready(());
            };
            let now = Instant::now();
            let next = match body.at() {
                Some(end) => end + self.timeout,
                None => now + self.timeout,
            };
            if next <= now {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(next);
        }
    }
}

impl Idle {
    /// Ready once neither the response nor the request body (while it still
    /// streams) has moved for the idle timeout.
    fn poll_expired(&mut self, deadline: &Deadline, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            let request = deadline
                .body
                .as_ref()
                .filter(|b| b.at().is_none())
                .and_then(BodyEnd::last_frame);
            match request.map(|last| last + self.after) {
                Some(next) if next > Instant::now() => self.sleep.as_mut().reset(next),
                _ => return Poll::Ready(()),
            }
        }
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
            if let Some(idle) = this.idle {
                idle.sleep.as_mut().reset(Instant::now() + idle.after);
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if let Some(idle) = this.idle
            && idle.poll_expired(this.deadline, cx).is_ready()
        {
            debug!("The route idle timeout cut a response body.");
            return Poll::Ready(Some(Err(ProxyError::Timeout.into())));
        }
        ready!(this.deadline.poll_expired(this.sleep, cx));
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
