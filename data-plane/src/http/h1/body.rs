//! The request body of an HTTP/1.1 request. A request without a body, or
//! whose whole `Content-Length` body came with its head, holds its bytes (or
//! nothing); any other body is a pipe from the connection, which reads and
//! decodes the next frame from the socket only once the body asks for one
//! (so the body is never buffered beyond one frame, and a slow upstream
//! slows the client down), and which sends `100 Continue` on the first ask
//! when the client expects it.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};

use super::chunked::{Chunk, ChunkedDecoder, ChunkedError};
use super::head::Framing;

/// The largest trailer section a chunked request body may end with.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// The body of one HTTP/1.1 request.
#[derive(Debug)]
pub(crate) struct Body(Kind);

#[derive(Debug)]
enum Kind {
    Empty,
    Full(Option<Bytes>),
    Streaming(Arc<Mutex<Pipe>>),
}

/// A request body that could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the client closed the connection before the request body ended")]
    Closed,
    #[error("invalid chunked request body: {0}")]
    Chunked(#[from] ChunkedError),
    #[error("failed to read the request body: {0}")]
    Io(#[from] std::io::Error),
}

/// The body's side and the connection's side of a streaming body.
#[derive(Debug)]
struct Pipe {
    /// The next frame, read but not yet taken by the body.
    frame: Option<Frame<Bytes>>,
    /// The body asked for a frame that is not there yet.
    want: bool,
    end: End,
    /// Body bytes still to come, when the body has a `Content-Length`.
    remaining: Option<u64>,
    body: Option<Waker>,
    connection: Option<Waker>,
}

#[derive(Debug)]
enum End {
    Open,
    /// The last frame is in `frame` or taken.
    Done,
    Failed(Option<BodyError>),
    /// The body was dropped before its end.
    Dropped,
}

/// The connection's side of a streaming body: decodes frames from the read
/// buffer into the pipe when the body wants one.
#[derive(Debug)]
pub(crate) struct Reader {
    pipe: Arc<Mutex<Pipe>>,
    decoder: Decoder,
}

#[derive(Debug)]
enum Decoder {
    Length(u64),
    Chunked(ChunkedDecoder),
}

/// What the body wants of the connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Want {
    /// Its next frame.
    Frame,
    /// Nothing yet (the connection's waker is registered).
    Nothing,
    /// Nothing ever: the body ended, failed or was dropped.
    Done,
}

impl Body {
    /// No body.
    pub(crate) fn empty() -> Self {
        Body(Kind::Empty)
    }

    /// A body that came whole with its head.
    pub(crate) fn full(data: Bytes) -> Self {
        Body(Kind::Full(Some(data)))
    }

    /// A body the connection reads as it is polled, with its reader.
    pub(crate) fn streaming(framing: Framing) -> (Self, Reader) {
        let (remaining, decoder) = match framing {
            Framing::Length(length) => (Some(length), Decoder::Length(length)),
            Framing::Chunked => (
                None,
                Decoder::Chunked(ChunkedDecoder::new(MAX_TRAILER_BYTES)),
            ),
        };
        let pipe = Arc::new(Mutex::new(Pipe {
            frame: None,
            want: false,
            end: End::Open,
            remaining,
            body: None,
            connection: None,
        }));
        let reader = Reader {
            pipe: Arc::clone(&pipe),
            decoder,
        };
        (Body(Kind::Streaming(pipe)), reader)
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Streaming(pipe) => {
                let mut pipe = lock(pipe);
                if let Some(frame) = pipe.frame.take() {
                    if let (Some(data), Some(remaining)) = (frame.data_ref(), &mut pipe.remaining) {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                match &mut pipe.end {
                    End::Done | End::Dropped => Poll::Ready(None),
                    End::Failed(error) => Poll::Ready(error.take().map(Err)),
                    End::Open => {
                        pipe.want = true;
                        if !pipe.body.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            pipe.body = Some(cx.waker().clone());
                        }
                        if let Some(connection) = pipe.connection.take() {
                            connection.wake();
                        }
                        Poll::Pending
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty | Kind::Full(None) => true,
            Kind::Full(Some(_)) => false,
            Kind::Streaming(pipe) => {
                let pipe = lock(pipe);
                pipe.frame.is_none() && matches!(pipe.end, End::Done)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty | Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            Kind::Streaming(pipe) => match lock(pipe).remaining {
                Some(remaining) => SizeHint::with_exact(remaining),
                None => SizeHint::default(),
            },
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Kind::Streaming(pipe) = &self.0 {
            let mut pipe = lock(pipe);
            if matches!(pipe.end, End::Open) {
                pipe.end = End::Dropped;
            }
            if let Some(connection) = pipe.connection.take() {
                connection.wake();
            }
        }
    }
}

impl Reader {
    /// What the body wants now; with [`Want::Nothing`] the connection is
    /// woken when that changes.
    pub(crate) fn want(&self, cx: &mut Context<'_>) -> Want {
        let mut pipe = lock(&self.pipe);
        if !matches!(pipe.end, End::Open) {
            return Want::Done;
        }
        if pipe.want && pipe.frame.is_none() {
            return Want::Frame;
        }
        if !pipe
            .connection
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            pipe.connection = Some(cx.waker().clone());
        }
        Want::Nothing
    }

    /// Whether the whole body was read from the connection.
    pub(crate) fn is_done(&self) -> bool {
        matches!(lock(&self.pipe).end, End::Done)
    }

    /// Decodes the next frame from `buf` into the pipe: `Ok(false)` when
    /// `buf` holds none yet.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<bool, BodyError> {
        let (frame, end) = match &mut self.decoder {
            Decoder::Length(left) => {
                if buf.is_empty() {
                    return Ok(false);
                }
                let n = usize::try_from(*left).map_or(buf.len(), |left| left.min(buf.len()));
                *left -= n as u64;
                (Some(Frame::data(buf.split_to(n).freeze())), *left == 0)
            }
            Decoder::Chunked(decoder) => {
                let frame = match decoder.decode(buf)? {
                    None => return Ok(false),
                    Some(Chunk::Data(data)) => Some(Frame::data(data)),
                    Some(Chunk::End(trailers)) if trailers.is_empty() => None,
                    Some(Chunk::End(trailers)) => Some(Frame::trailers(trailers)),
                };
                (frame, decoder.is_done())
            }
        };
        let mut pipe = lock(&self.pipe);
        pipe.frame = frame;
        pipe.want = false;
        if end {
            pipe.end = End::Done;
        }
        if let Some(body) = pipe.body.take() {
            body.wake();
        }
        Ok(true)
    }

    /// Fails the body with `error`.
    pub(crate) fn fail(&mut self, error: BodyError) {
        let mut pipe = lock(&self.pipe);
        if matches!(pipe.end, End::Open) {
            pipe.end = End::Failed(Some(error));
        }
        if let Some(body) = pipe.body.take() {
            body.wake();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.fail(BodyError::Closed);
    }
}

fn lock(pipe: &Mutex<Pipe>) -> MutexGuard<'_, Pipe> {
    // Each field is updated in one step: nothing half-written to trip on.
    pipe.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use hyper::body::Body as _;

    use super::*;

    #[tokio::test]
    async fn a_streaming_body_gets_frames_as_the_reader_decodes_them() {
        let (mut body, mut reader) = Body::streaming(Framing::Chunked);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(reader.want(&mut cx), Want::Nothing, "not asked yet");
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        assert_eq!(reader.want(&mut cx), Want::Frame);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"[..]);
        assert!(reader.decode(&mut buf).expect("valid"));
        assert_eq!(reader.want(&mut cx), Want::Nothing, "one frame at a time");
        let frame = body.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "abc");
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        assert!(reader.decode(&mut buf).expect("valid"));
        assert_eq!(reader.want(&mut cx), Want::Done);
        assert!(reader.is_done());
        let trailers = body.frame().await.expect("frame").expect("trailers");
        assert_eq!(trailers.into_trailers().expect("trailers")["x-t"], "1");
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_sized_body_ends_with_its_last_byte_and_fails_when_cut() {
        let (body, mut reader) = Body::streaming(Framing::Length(4));
        assert_eq!(body.size_hint().exact(), Some(4));
        let mut buf = BytesMut::from(&b"abcdGET"[..]);
        assert!(reader.decode(&mut buf).expect("valid"));
        assert_eq!(&buf[..], b"GET", "the next request stays");
        assert_eq!(body.collect().await.expect("body").to_bytes(), "abcd");

        let (body, reader) = Body::streaming(Framing::Length(4));
        drop(reader);
        let error = body.collect().await.expect_err("cut");
        assert!(matches!(error, BodyError::Closed), "{error}");
    }
}
