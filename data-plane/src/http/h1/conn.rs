//! One HTTP/1.1 connection: read a request head, call the service and poll
//! its future in this task, write the response, and again while the
//! connection is kept alive; pipelined requests are answered in order.
//!
//! While idle the connection holds no buffer: it waits for the socket to be
//! readable, then takes a read buffer, and drops both buffers after a
//! response that left nothing unread. One timer per connection, re-armed
//! lazily, bounds the idle wait (`idle_timeout`, or `header_read_timeout`
//! from the accept for the first request) and the reading of a head
//! (`header_read_timeout` from its first byte). On shutdown the connection
//! reads no new request: idle, it closes at once; with a response in flight,
//! that response says `connection: close` and ends the connection.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::header::HeaderMap;
use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body as _, Frame};
use tokio::io::AsyncWrite;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Sleep};
use tower::Service;
use tracing::debug;

use super::body::{Body, BodyError, Reader, Want};
use super::chunked::{CHUNK_TAIL, encode_chunk_head, encode_last_chunk};
use super::head::{self, Framing, Head, HeadError};
use super::write::{self, Asked};
use super::{OnUpgrade, Rewind, Transport, poll_read_into};
use crate::http::body::RequestBody;
use crate::http::error::BoxError;
use crate::http::server::ClientAddr;
use crate::http::tls::Tls;
use crate::http::upgrade::Upgraded;
use crate::{Limits, MIN_MAX_REQUEST_HEADER_BYTES};

/// The most bytes read past a request while its response is pending (a
/// pipelined request), before the connection stops reading.
const PIPELINED_BYTES: usize = 8 * 1024;
/// Response bytes gathered before they are written.
const FLUSH_AT: usize = 64 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Who is on the other end, and the server's limits.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub client: ClientAddr,
    /// Over TLS: with the client's certificate, if it sent one.
    pub tls: Option<Tls>,
    pub limits: Limits,
}

struct Conn<I> {
    io: I,
    read_buf: BytesMut,
    write_buf: Vec<u8>,
    /// How much of `write_buf` is written.
    written: usize,
    timer: Timer,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    draining: bool,
    settings: Settings,
}

/// What follows an exchange.
enum Next {
    KeepAlive,
    Close,
    Upgrade(oneshot::Sender<Upgraded>),
}

/// What ended a wait on the socket.
enum Wake {
    Ready,
    Closed,
    Timeout,
    Stop,
}

/// Serves HTTP/1.1 on `io` with `service` until the connection ends, or
/// shutdown is signalled and the response in flight (if any) is written.
pub(crate) async fn serve<I, S, B>(
    io: I,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
    mut service: S,
) where
    I: Transport,
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>,
    B: hyper::body::Body,
    B::Error: Into<BoxError>,
{
    let limits = settings.limits;
    let opened = Instant::now();
    let mut conn = Conn {
        io,
        read_buf: BytesMut::new(),
        write_buf: Vec::new(),
        written: 0,
        timer: Timer(Box::pin(tokio::time::sleep_until(
            opened + limits.header_read_timeout,
        ))),
        stop: Box::pin(async move {
            // An error means the sender is gone: nobody can stop us then.
            let _ = shutdown.wait_for(|stop| *stop).await;
        }),
        draining: false,
        settings,
    };
    // The first request's head is due a header read timeout after the accept.
    let mut idle_until = opened + limits.header_read_timeout;
    let mut first = true;
    loop {
        let head = match conn.read_head(idle_until, first).await {
            Some(Ok(head)) => head,
            Some(Err(error)) => {
                debug!(%error, remote = %conn.settings.client.0, "Refusing a request.");
                conn.refuse(error.status()).await;
                break;
            }
            None => break,
        };
        first = false;
        // Boxed: an exchange's state (request, service future, response)
        // is most of the connection's, and is not kept while it is idle.
        match Box::pin(conn.exchange(head, &mut service)).await {
            Next::KeepAlive => idle_until = Instant::now() + limits.idle_timeout,
            Next::Close => break,
            Next::Upgrade(tx) => {
                let Conn { io, read_buf, .. } = conn;
                let upgraded: Upgraded = Box::new(Rewind::new(read_buf.freeze(), io));
                // The upgrade stage may have given up on the switch already.
                let _ = tx.send(upgraded);
                return;
            }
        }
    }
    conn.close().await;
}

impl<I: Transport> Conn<I> {
    /// The next request head: `None` when the connection ends first (closed,
    /// idle or too slow, or shut down).
    async fn read_head(
        &mut self,
        idle_until: Instant,
        first: bool,
    ) -> Option<Result<Head, HeadError>> {
        if self.draining {
            return None;
        }
        let limits = self.settings.limits;
        let max_bytes = usize::try_from(
            limits
                .max_request_header_bytes
                .max(MIN_MAX_REQUEST_HEADER_BYTES),
        )
        .unwrap_or(usize::MAX);
        let max_headers = usize::try_from(limits.max_request_headers).unwrap_or(usize::MAX);
        // Set once bytes of the head arrived.
        let mut head_until = None;
        loop {
            let deadline = if self.read_buf.is_empty() {
                idle_until
            } else {
                match head::parse(&mut self.read_buf, max_bytes, max_headers) {
                    Ok(None) => {}
                    done => return done.transpose(),
                }
                *head_until.get_or_insert_with(|| {
                    if first {
                        idle_until
                    } else {
                        Instant::now() + limits.header_read_timeout
                    }
                })
            };
            match poll_fn(|cx| self.poll_wait(cx, deadline)).await {
                Wake::Ready => {}
                Wake::Timeout if head_until.is_some() => {
                    debug!(remote = %self.settings.client.0, "Closing a connection slow to send its request head.");
                    return None;
                }
                Wake::Timeout => {
                    debug!(remote = %self.settings.client.0, "Closing an idle connection.");
                    return None;
                }
                Wake::Closed | Wake::Stop => return None,
            }
        }
    }

    /// Reads from the socket until `deadline` or shutdown. With nothing read
    /// yet, it waits without a buffer ([`poll_read_into`]).
    fn poll_wait(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<Wake> {
        match poll_read_into(&mut self.io, cx, &mut self.read_buf) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Wake::Closed),
            Poll::Ready(Ok(_)) => return Poll::Ready(Wake::Ready),
            Poll::Pending if self.read_buf.is_empty() => self.read_buf = BytesMut::new(),
            Poll::Pending => {}
        }
        if self.poll_stop(cx) {
            return Poll::Ready(Wake::Stop);
        }
        if self.timer.poll_until(cx, deadline).is_ready() {
            return Poll::Ready(Wake::Timeout);
        }
        Poll::Pending
    }

    /// Whether shutdown was signalled.
    fn poll_stop(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.draining && self.stop.as_mut().poll(cx).is_ready() {
            self.draining = true;
        }
        self.draining
    }

    /// Serves one request: calls `service`, feeds the request body as it is
    /// polled, writes the response.
    async fn exchange<S, B>(&mut self, head: Head, service: &mut S) -> Next
    where
        S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>,
        B: hyper::body::Body,
        B::Error: Into<BoxError>,
    {
        let Head {
            request,
            framing,
            mut keep_alive,
            expect_continue,
            upgrade,
            trailers,
            mut rest,
        } = head;
        let asked = Asked {
            version: request.version(),
            head: request.method() == Method::HEAD,
            trailers,
        };
        let (body, mut reader) = match framing {
            Framing::Length(0) => (Body::empty(), None),
            Framing::Length(length) if rest.len() as u64 >= length => {
                // Fits in `rest`, so in a usize.
                (Body::full(rest.split_to(length as usize)), None)
            }
            _ => {
                let (body, reader) = Body::streaming(framing);
                (body, Some(reader))
            }
        };
        if !rest.is_empty() {
            self.read_buf = BytesMut::from(&rest[..]);
        }
        drop(rest);
        let mut request = request.map(|()| RequestBody::Http1(body));
        let extensions = request.extensions_mut();
        extensions.insert(self.settings.client);
        if let Some(tls) = &self.settings.tls {
            extensions.insert(tls.clone());
        }
        let upgrade = upgrade.then(|| {
            let (tx, on_upgrade) = OnUpgrade::new();
            extensions.insert(on_upgrade);
            tx
        });
        let mut pump = Pump {
            continue_at: (expect_continue && reader.is_some()).then_some(0),
            broken: false,
        };
        let Ok(()) = poll_fn(|cx| service.poll_ready(cx)).await;
        let mut future = pin!(service.call(request));
        let response = poll_fn(|cx| {
            self.pump(cx, &mut reader, &mut pump);
            self.poll_stop(cx);
            if let Poll::Ready(Ok(response)) = future.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            // Without a body to read, a client that closes the connection
            // meanwhile has given up: the request is dropped, as hyper does.
            if reader.is_none() && self.poll_gone(cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        let Some(response) = response else {
            debug!(remote = %self.settings.client.0, "The client closed the connection before its response.");
            return Next::Close;
        };
        if self.draining || pump.broken {
            keep_alive = false;
        }
        // No `100 Continue` once the final response is on its way.
        pump.continue_at = None;
        let (parts, body) = response.into_parts();
        let mut body = pin!(body);
        self.write_buf.clear();
        self.written = 0;
        let framing = write::encode_head(
            parts.status,
            &parts.headers,
            &body.size_hint(),
            asked,
            &mut keep_alive,
            &mut self.write_buf,
        );
        let mut out = Out {
            framing,
            left: match framing {
                write::Framing::Length(length) => length,
                _ => 0,
            },
            trailers: None,
            done: framing == write::Framing::None,
        };
        let written = poll_fn(|cx| {
            self.pump(cx, &mut reader, &mut pump);
            self.poll_stop(cx);
            self.poll_body(cx, body.as_mut(), &mut out)
        })
        .await;
        if let Err(error) = written {
            debug!(error = %crate::http::error::Chain(&*error), remote = %self.settings.client.0, "A response failed mid-way; closing its connection.");
            return Next::Close;
        }
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            return match upgrade {
                Some(tx) => Next::Upgrade(tx),
                None => Next::Close,
            };
        }
        if !keep_alive || self.draining || pump.broken || reader.is_some_and(|r| !r.is_done()) {
            return Next::Close;
        }
        // Idle: no buffers held.
        if self.read_buf.is_empty() {
            self.read_buf = BytesMut::new();
        }
        self.write_buf = Vec::new();
        Next::KeepAlive
    }

    /// Feeds the request body what it asked for: `100 Continue` first if
    /// the client expects it, then the next frame, read from the socket if
    /// the buffer has none.
    fn pump(&mut self, cx: &mut Context<'_>, reader: &mut Option<Reader>, pump: &mut Pump) {
        let Some(reader) = reader else {
            return;
        };
        while reader.want(cx) == Want::Frame {
            if let Some(at) = &mut pump.continue_at {
                match poll_write_all(&mut self.io, cx, CONTINUE, at) {
                    Poll::Ready(Ok(())) => pump.continue_at = None,
                    Poll::Ready(Err(error)) => {
                        reader.fail(BodyError::Io(error));
                        pump.broken = true;
                        return;
                    }
                    Poll::Pending => return,
                }
            }
            match reader.decode(&mut self.read_buf) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(error) => {
                    debug!(%error, remote = %self.settings.client.0, "Invalid request body.");
                    reader.fail(error);
                    pump.broken = true;
                    return;
                }
            }
            match poll_read_into(&mut self.io, cx, &mut self.read_buf) {
                Poll::Pending => return,
                Poll::Ready(Ok(0)) => {
                    reader.fail(BodyError::Closed);
                    pump.broken = true;
                    return;
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => {
                    reader.fail(BodyError::Io(error));
                    pump.broken = true;
                    return;
                }
            }
        }
    }

    /// Whether the client closed the connection (or it failed). Reads what
    /// it sends meanwhile (a pipelined request) up to [`PIPELINED_BYTES`].
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> bool {
        while self.read_buf.len() < PIPELINED_BYTES {
            match poll_read_into(&mut self.io, cx, &mut self.read_buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return true,
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return false,
            }
        }
        false
    }

    /// Writes the response: what is in the write buffer, then the body's
    /// frames, gathered while they come at once (up to [`FLUSH_AT`]).
    fn poll_body<B>(
        &mut self,
        cx: &mut Context<'_>,
        mut body: Pin<&mut B>,
        out: &mut Out,
    ) -> Poll<Result<(), BoxError>>
    where
        B: hyper::body::Body,
        B::Error: Into<BoxError>,
    {
        loop {
            if !out.done && self.write_buf.len() < FLUSH_AT {
                match body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        out.encode(frame, &mut self.write_buf)?;
                        continue;
                    }
                    Poll::Ready(None) => {
                        out.finish(&mut self.write_buf)?;
                        out.done = true;
                    }
                    Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                    Poll::Pending if self.written == self.write_buf.len() => return Poll::Pending,
                    Poll::Pending => {}
                }
            }
            ready!(poll_write_all(
                &mut self.io,
                cx,
                &self.write_buf,
                &mut self.written
            ))?;
            self.write_buf.clear();
            self.written = 0;
            if out.done {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Answers a refused request head with `status` and nothing else,
    /// within the header read timeout (on the connection's own timer).
    async fn refuse(&mut self, status: StatusCode) {
        self.write_buf.clear();
        self.written = 0;
        write::encode_refusal(status, &mut self.write_buf);
        let deadline = Instant::now() + self.settings.limits.header_read_timeout;
        let Conn {
            io,
            write_buf,
            written,
            timer,
            ..
        } = self;
        poll_fn(|cx| {
            if poll_write_all(io, cx, write_buf, written).is_ready() {
                return Poll::Ready(());
            }
            timer.poll_until(cx, deadline)
        })
        .await;
    }

    /// Closes the connection (TLS: with its close_notify), bounded by the
    /// connection's own timer.
    async fn close(&mut self) {
        let bound = self
            .settings
            .limits
            .header_read_timeout
            .min(Duration::from_secs(1));
        let deadline = Instant::now() + bound;
        let Conn { io, timer, .. } = self;
        poll_fn(|cx| {
            if Pin::new(&mut *io).poll_shutdown(cx).is_ready() {
                return Poll::Ready(());
            }
            timer.poll_until(cx, deadline)
        })
        .await;
    }
}

/// The request body's side of an exchange.
struct Pump {
    /// How much of `100 Continue` is written, while it is owed.
    continue_at: Option<usize>,
    /// The body could not be read to its end: the connection cannot go on.
    broken: bool,
}

/// A response body on its way out.
struct Out {
    framing: write::Framing,
    /// Bytes still due under a `content-length`.
    left: u64,
    trailers: Option<HeaderMap>,
    done: bool,
}

/// A response body that does not match its `content-length`.
#[derive(Debug, thiserror::Error)]
#[error("the response body does not match its content-length")]
struct LengthMismatch;

impl Out {
    /// Appends `frame` to `dst` as the framing has it.
    fn encode<D: Buf>(&mut self, frame: Frame<D>, dst: &mut Vec<u8>) -> Result<(), BoxError> {
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    self.trailers = Some(trailers);
                }
                return Ok(());
            }
        };
        let len = data.remaining();
        if len == 0 {
            return Ok(());
        }
        match self.framing {
            write::Framing::None => return Ok(()),
            write::Framing::Length(_) => {
                self.left = self.left.checked_sub(len as u64).ok_or(LengthMismatch)?;
            }
            write::Framing::Chunked { .. } => encode_chunk_head(len, dst),
            write::Framing::Close => {}
        }
        while data.has_remaining() {
            let chunk = data.chunk();
            dst.extend_from_slice(chunk);
            let n = chunk.len();
            data.advance(n);
        }
        if matches!(self.framing, write::Framing::Chunked { .. }) {
            dst.extend_from_slice(CHUNK_TAIL);
        }
        Ok(())
    }

    /// Appends the end of the body to `dst`.
    fn finish(&mut self, dst: &mut Vec<u8>) -> Result<(), BoxError> {
        match self.framing {
            write::Framing::Chunked { trailers } => {
                let trailers = self.trailers.as_ref().filter(|_| trailers);
                encode_last_chunk(trailers, dst);
            }
            write::Framing::Length(_) if self.left > 0 => return Err(LengthMismatch.into()),
            _ => {}
        }
        Ok(())
    }
}

/// Writes `buf` from `*at` on, moving `at`, and flushes.
fn poll_write_all<I: AsyncWrite + Unpin>(
    io: &mut I,
    cx: &mut Context<'_>,
    buf: &[u8],
    at: &mut usize,
) -> Poll<io::Result<()>> {
    while *at < buf.len() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, &buf[*at..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *at += n;
    }
    Pin::new(io).poll_flush(cx)
}

/// The connection's one timer, re-armed only when it would fire late, or
/// when it fired early.
struct Timer(Pin<Box<Sleep>>);

impl Timer {
    fn poll_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        if self.0.deadline() > deadline {
            self.0.as_mut().reset(deadline);
        }
        loop {
            ready!(self.0.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            self.0.as_mut().reset(deadline);
        }
    }
}
