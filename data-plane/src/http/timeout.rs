//! The timeout stage: the route timeout means what Envoy's route `timeout`
//! means. It starts once the whole request has been received (at once for a
//! request without a body) and bounds the whole response, head and body. A
//! response head that does not come in time becomes `504`; a body still
//! streaming at the deadline is cut (the connection or HTTP/2 stream is reset),
//! since its status has already gone out. The route's `idle_timeout`, when
//! set, also cuts a response body that has not moved for that long, unless
//! the request body is still moving.
//!
//! A gRPC call may ask for less with `grpc-timeout`: the proxy bounds it by
//! the smaller of the two. A `grpc-timeout` shorter than the route timeout
//! runs from the moment the call arrives, as the caller's deadline does; a
//! longer one is lowered to the route timeout on its way upstream, so the
//! upstream knows the deadline the proxy keeps. A gRPC call past its deadline
//! gets `DEADLINE_EXCEEDED`: trailers-only before the response head, or as
//! the trailers that end a response already streaming.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http::header::{HeaderName, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};
use tower::{Layer, Service};
use tracing::debug;

use super::body::BodyEnd;
use super::error::{BoxError, ProxyError};
use super::respond::{grpc_trailers, is_grpc};
use super::route::Routed;

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// `grpc-timeout` has at most 8 digits.
const GRPC_TIMEOUT_MAX: u64 = 99_999_999;

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
        grpc: bool,
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
        // A gRPC response cut at the deadline ends with these trailers.
        grpc: Option<Cut>,
    }
}

/// How a gRPC response body ends when the deadline cuts it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Cut {
    Streaming,
    /// The deadline trailers went out; the body has ended.
    Ended,
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

    fn call(&mut self, mut routed: Routed) -> Self::Future {
        let route = routed.route.timeout.response;
        let grpc = is_grpc(&routed.request);
        let headers = routed.request.headers_mut();
        let asked = match headers.get(GRPC_TIMEOUT) {
            Some(value) if grpc => grpc_timeout(value.as_bytes()),
            _ => None,
        };
        let deadline = match asked {
            // The caller's deadline runs from now, whatever the request body does.
            Some(asked) if asked <= route => Deadline {
                timeout: asked,
                body: None,
            },
            _ => {
                if asked.is_some() {
                    headers.insert(GRPC_TIMEOUT, encode_grpc_timeout(route));
                }
                Deadline {
                    timeout: route,
                    body: routed.request.body().end(),
                }
            }
        };
        // The soonest the timeout can run out: the request cannot end earlier.
        let sleep = sleep_until(Instant::now() + deadline.timeout);
        let idle = routed.route.timeout.idle;
        ResponseFuture {
            inner: self.inner.call(routed),
            sleep,
            deadline,
            idle,
            grpc,
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
            let grpc = this.grpc.then_some(Cut::Streaming);
            return Poll::Ready(result.map(|response| {
                response.map(|body| TimeoutBody {
                    body,
                    sleep: sleep_until(at),
                    deadline,
                    idle,
                    grpc,
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
        if matches!(this.grpc, Some(Cut::Ended)) {
            return Poll::Ready(None);
        }
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
        if let Some(cut) = this.grpc {
            *cut = Cut::Ended;
            return Poll::Ready(Some(Ok(Frame::trailers(grpc_trailers(
                &ProxyError::Timeout,
            )))));
        }
        Poll::Ready(Some(Err(ProxyError::Timeout.into())))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.grpc, Some(Cut::Ended)) || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A `grpc-timeout` value: up to 8 digits and a unit (gRPC over HTTP/2,
/// "Requests"); `None` when malformed.
pub(crate) fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `timeout` as a `grpc-timeout` value, in the finest unit that fits 8 digits
/// (rounded up, so the upstream never gets less than the proxy allows).
fn encode_grpc_timeout(timeout: Duration) -> HeaderValue {
    let millis = timeout.as_nanos().div_ceil(1_000_000);
    let value = match u64::try_from(millis) {
        Ok(millis) if millis <= GRPC_TIMEOUT_MAX => format!("{millis}m"),
        _ => format!("{}S", timeout.as_secs().min(GRPC_TIMEOUT_MAX)),
    };
    // Digits and a letter are always a valid header value.
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("1m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_refuse_the_malformed() {
        for (value, expected) in [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("250m", Duration::from_millis(250)),
            ("99999999u", Duration::from_micros(99_999_999)),
            ("5n", Duration::from_nanos(5)),
        ] {
            assert_eq!(grpc_timeout(value.as_bytes()), Some(expected), "{value}");
        }
        for bad in ["", "m", "100", "123456789m", "1x", "-1S", "1.5S", " 1S"] {
            assert_eq!(grpc_timeout(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn a_lowered_grpc_timeout_is_rounded_up_and_fits_eight_digits() {
        assert_eq!(encode_grpc_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(encode_grpc_timeout(Duration::from_micros(1)), "1m");
        assert_eq!(encode_grpc_timeout(Duration::from_secs(200_000)), "200000S");
        let parsed = grpc_timeout(encode_grpc_timeout(Duration::from_secs(30)).as_bytes());
        assert_eq!(parsed, Some(Duration::from_secs(30)));
    }
}
