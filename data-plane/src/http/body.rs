//! The request body as the proxy forwards it. While it streams to the first
//! upstream it is recorded, up to [`REPLAY_LIMIT`] bytes, so a retry can send
//! it again ([`ReplayBody::replay`]); a longer body streams through unrecorded
//! and cannot be replayed. It also notes when the request ended
//! ([`BodyEnd`]), which is where Envoy's route timeout starts.
//!
//! A request without a body costs nothing here; one with a body shares one
//! `Arc<Mutex<_>>` between its copies, taken once per frame.
//!
//! What the listeners hand the stack is a [`RequestBody`]: hyper's for
//! HTTP/2, Prism's own ([`super::h1::body`]) for HTTP/1.1.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use super::error::BoxError;
use super::h1;

/// The most of a request body kept for replay.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// A request body that can be sent again while it is short enough.
///
/// Copies share one source: they are meant to be sent one after another (a
/// retry's copy once the previous attempt has failed), not at the same time.
#[derive(Debug)]
pub(crate) struct ReplayBody<B = RequestBody> {
    state: State<B>,
    /// The source's size hint when the request arrived: every copy is the
    /// whole body.
    hint: SizeHint,
}

/// When a request body ended.
#[derive(Debug)]
pub(crate) struct BodyEnd<B = RequestBody>(Arc<Mutex<Shared<B>>>);

/// The body went past the route's `max_request_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the route allows")]
pub(crate) struct BodyTooLarge;

/// A copy could not be served: the body went past [`REPLAY_LIMIT`] or failed
/// while an earlier copy read it.
#[derive(Debug, thiserror::Error)]
#[error("the request body can no longer be replayed")]
pub(crate) struct NotReplayable;

/// A request body as a listener received it.
#[derive(Debug)]
pub(crate) enum RequestBody {
    /// HTTP/2, by hyper.
    Http2(Incoming),
    /// HTTP/1.1, by [`super::h1`].
    Http1(h1::body::Body),
}

#[derive(Debug)]
enum State<B> {
    /// No body: nothing to record, every copy is empty.
    Empty,
    Shared {
        shared: Arc<Mutex<Shared<B>>>,
        /// Data frames this copy has yielded.
        next: usize,
        trailers_sent: bool,
    },
}

#[derive(Debug)]
struct Shared<B> {
    source: B,
    /// Data frames read from `source` so far, while they fit the limit.
    frames: Vec<Bytes>,
    /// Bytes in `frames`.
    recorded: usize,
    /// Data frames read from `source` so far, kept or not.
    read: usize,
    /// More than the limit was read (or announced): nothing is kept.
    capped: bool,
    failed: bool,
    trailers: Option<HeaderMap>,
    /// When `source` reached its end.
    ended: Option<Instant>,
    /// When a frame last came from `source`.
    last: Option<Instant>,
    /// Bytes read from `source` so far, and the most it may yield.
    total: u64,
    limit: u64,
}

impl<B> ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(source: B) -> Self {
        let hint = source.size_hint();
        let state = if source.is_end_stream() {
            State::Empty
        } else {
            State::Shared {
                shared: Arc::new(Mutex::new(Shared {
                    source,
                    frames: Vec::new(),
                    recorded: 0,
                    read: 0,
                    capped: hint.lower() > REPLAY_LIMIT as u64,
                    failed: false,
                    trailers: None,
                    ended: None,
                    last: None,
                    total: 0,
                    limit: u64::MAX,
                })),
                next: 0,
                trailers_sent: false,
            }
        };
        Self { state, hint }
    }

    /// A copy that yields the whole body again from its start, or `None` when
    /// the body is too long (or broke) to be replayed.
    pub(crate) fn replay(&self) -> Option<Self> {
        let state = match &self.state {
            State::Empty => State::Empty,
            State::Shared { shared, .. } => {
                let guard = lock(shared);
                if guard.capped || guard.failed {
                    return None;
                }
                State::Shared {
                    shared: Arc::clone(shared),
                    next: 0,
                    trailers_sent: false,
                }
            }
        };
        Some(Self {
            state,
            hint: self.hint,
        })
    }

    /// Fails the body with [`BodyTooLarge`] once more than `max` bytes have
    /// come from the client.
    pub(crate) fn limit(&mut self, max: u64) {
        if let State::Shared { shared, .. } = &self.state {
            lock(shared).limit = max;
        }
    }

    /// Tells when the body ends; `None` when it had ended on arrival.
    pub(crate) fn end(&self) -> Option<BodyEnd<B>> {
        match &self.state {
            State::Empty => None,
            State::Shared { shared, .. } => Some(BodyEnd(Arc::clone(shared))),
        }
    }
}

impl<B> BodyEnd<B> {
    /// When the body ended, if it has.
    pub(crate) fn at(&self) -> Option<Instant> {
        lock(&self.0).ended
    }

    /// When the client last sent a frame of the body, if it has.
    pub(crate) fn last_frame(&self) -> Option<Instant> {
        lock(&self.0).last
    }

    /// The bytes of the body received from the client so far.
    pub(crate) fn received(&self) -> u64 {
        lock(&self.0).total
    }
}

impl<B> Clone for BodyEnd<B> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<B> Shared<B> {
    /// Keeps `data` for replay while the whole body fits the limit.
    fn record(&mut self, data: &Bytes) {
        self.read += 1;
        if self.capped {
            return;
        }
        if self.recorded + data.len() <= REPLAY_LIMIT {
            self.recorded += data.len();
            self.frames.push(data.clone());
        } else {
            self.capped = true;
            self.frames = Vec::new();
            self.recorded = 0;
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let State::Shared {
            shared,
            next,
            trailers_sent,
        } = &mut this.state
        else {
            return Poll::Ready(None);
        };
        let mut shared = lock(shared);
        // First what an earlier copy already read from the source.
        if *next < shared.read {
            let Some(data) = shared.frames.get(*next).cloned() else {
                return Poll::Ready(Some(Err(NotReplayable.into())));
            };
            *next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if shared.failed {
            return Poll::Ready(Some(Err(NotReplayable.into())));
        }
        if shared.ended.is_some() {
            if !*trailers_sent && let Some(trailers) = &shared.trailers {
                *trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
            }
            return Poll::Ready(None);
        }
        // Then the source itself.
        let frame = match ready!(Pin::new(&mut shared.source).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                shared.failed = true;
                return Poll::Ready(Some(Err(error.into())));
            }
            None => {
                shared.ended = Some(Instant::now());
                return Poll::Ready(None);
            }
        };
        shared.last = Some(Instant::now());
        if let Some(data) = frame.data_ref() {
            shared.total += data.len() as u64;
            if shared.total > shared.limit {
                shared.failed = true;
                return Poll::Ready(Some(Err(BodyTooLarge.into())));
            }
            shared.record(data);
            *next += 1;
        } else if let Some(trailers) = frame.trailers_ref() {
            shared.trailers = Some(trailers.clone());
            shared.ended = Some(Instant::now());
            *trailers_sent = true;
        }
        // A sender of a sized body does not poll again after the last byte.
        if shared.ended.is_none() && shared.source.is_end_stream() {
            shared.ended = Some(Instant::now());
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Empty => true,
            State::Shared {
                shared,
                next,
                trailers_sent,
            } => {
                let shared = lock(shared);
                *next >= shared.read
                    && shared.ended.is_some()
                    && (shared.trailers.is_none() || *trailers_sent)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Http2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            RequestBody::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Http2(body) => body.is_end_stream(),
            RequestBody::Http1(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Http2(body) => body.size_hint(),
            RequestBody::Http1(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
impl ReplayBody<RequestBody> {
    /// A request body with nothing in it, for tests below the route stage.
    pub(crate) fn empty() -> Self {
        Self {
            state: State::Empty,
            hint: SizeHint::with_exact(0),
        }
    }
}

fn lock<B>(shared: &Mutex<Shared<B>>) -> MutexGuard<'_, Shared<B>> {
    // A panic while the lock was held leaves nothing half-written that a
    // later reader could trip on: each field is updated in one step.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::HeaderValue;
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    type Source =
        StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    fn source(chunks: &[&'static [u8]], trailers: bool) -> Source {
        let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if trailers {
            let mut map = HeaderMap::new();
            map.insert("grpc-status", HeaderValue::from_static("0"));
            frames.push(Ok(Frame::trailers(map)));
        }
        StreamBody::new(tokio_stream::iter(frames))
    }

    async fn read<B>(body: ReplayBody<B>) -> (Bytes, Option<HeaderMap>)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let collected = body.collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn a_short_body_replays_whole_with_its_trailers() {
        let body = ReplayBody::new(source(&[b"hello ", b"world"], true));
        let copy = body.replay().expect("replayable");
        let end = body.end().expect("a body with data");
        assert_eq!(end.at(), None);
        let (data, trailers) = read(body).await;
        assert_eq!(data, "hello world");
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
        assert!(end.at().is_some(), "the end is noted");
        let (again, trailers) = read(copy).await;
        assert_eq!(again, "hello world");
        assert!(trailers.is_some());
    }

    #[tokio::test]
    async fn a_copy_made_midway_replays_what_was_read_then_reads_on() {
        let mut first = ReplayBody::new(source(&[b"a", b"b", b"c"], false));
        let frame = first.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "a");
        let second = first.replay().expect("replayable");
        drop(first);
        let (data, _) = read(second).await;
        assert_eq!(data, "abc");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_streams_through_but_cannot_be_replayed() {
        static CHUNK: [u8; 40 * 1024] = [b'x'; 40 * 1024];
        let body = ReplayBody::new(source(&[&CHUNK, &CHUNK], false));
        let early = body.replay().expect("nothing read yet");
        let (data, _) = read(body).await;
        assert_eq!(data.len(), 80 * 1024);
        assert!(early.replay().is_none(), "capped once past the limit");
        let error = read_error(early).await;
        assert!(error.is::<NotReplayable>(), "{error}");
    }

    async fn read_error(body: ReplayBody<Source>) -> BoxError {
        body.collect().await.map(|_| ()).expect_err("an error")
    }

    #[tokio::test]
    async fn a_body_announced_longer_than_the_limit_is_not_recorded() {
        let big = Full::new(Bytes::from(vec![0u8; REPLAY_LIMIT + 1]));
        let body = ReplayBody::new(big);
        assert!(body.replay().is_none());
        assert_eq!(body.size_hint().exact(), Some(REPLAY_LIMIT as u64 + 1));
        let collected = body.collect().await.expect("body").to_bytes();
        assert_eq!(collected.len(), REPLAY_LIMIT + 1);
    }

    #[tokio::test]
    async fn no_body_costs_nothing_and_replays_empty() {
        let body = ReplayBody::new(Full::new(Bytes::new()));
        assert!(body.is_end_stream());
        assert!(body.end().is_none());
        let copy = body.replay().expect("replayable");
        assert!(copy.is_end_stream());
        assert_eq!(read(copy).await.0, "");
    }

    #[tokio::test]
    async fn a_sized_body_ends_with_its_last_byte() {
        let body = ReplayBody::new(Full::new(Bytes::from_static(b"sized")));
        let end = body.end().expect("a body with data");
        let mut body = body;
        let frame = body.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "sized");
        // Nobody polls a finished sized body again; its end is still noted.
        assert!(body.is_end_stream());
        assert!(end.at().is_some());
    }
}
