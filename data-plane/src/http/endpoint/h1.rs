//! Prism's own HTTP/1.1 client connection to an upstream, driven in the
//! request's own task: no task per connection and no channel between the
//! request and its connection (hyper's client spends about a third of a
//! proxied request's instructions on those).
//!
//! A request is sent by [`Connection::send`]: its head is encoded into one
//! buffer, with the first body frame when it is already there, and written
//! in one go; the rest of the body streams while the response head is read,
//! both polled together, so an upstream that answers early (a `413`) and
//! stops reading is heard. The response [`Body`] streams from the connection
//! (and goes on sending the request body if the upstream answered before it
//! was through); when it has ended cleanly on a connection that can carry
//! another request, [`Body::take_reusable`] gives the connection back for
//! the pool. A `101` hands the connection, with any bytes read past its head,
//! to the upgrade stage through [`OnUpgrade`].

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::connect::Upstream;
use super::pool::Permit;
use crate::http::body::ReplayBody;
use crate::http::error::BoxError;
use crate::http::h1::chunked::{self, Chunk, ChunkedDecoder, ChunkedError};
use crate::http::h1::{self, Rewind, head};

/// The longest response head accepted. Offsets into a head fit a `u16`
/// (see [`parse_head`]).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields a response head may have.
const MAX_HEADERS: usize = 100;
/// The longest trailer section of a chunked response accepted.
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// The most write buffer an idle connection keeps.
const IDLE_WRITE_BYTES: usize = 4 * 1024;
/// Request body frames are gathered into the write buffer while it holds
/// less than this, so a head and a small body leave in one write.
const GATHER_BYTES: usize = 16 * 1024;

/// An HTTP/1.1 connection to an upstream, idle on its endpoint's stack or
/// lent to one request. It holds its place under the backend's
/// `max_connections` until it is dropped.
pub(crate) struct Connection {
    io: Upstream,
    /// Bytes read and not yet handed out; without capacity while idle.
    read: BytesMut,
    /// Bytes to write: a request head and body frames. Kept between
    /// requests, so a reused connection encodes without allocating.
    write: Vec<u8>,
    /// How much of `write` is written.
    written: usize,
    /// The request body still to be sent, if any.
    sending: Option<Sending>,
    /// Requests sent on it so far.
    pub(super) used: u32,
    /// When it last went back on the stack.
    pub(super) idle_since: Instant,
    _permit: Permit,
}

/// A response body streamed from its connection.
pub(crate) struct Body {
    /// `None` once the connection was given back, failed, or switched
    /// protocols, and for a response that never had a connection.
    conn: Option<Box<Connection>>,
    framing: Framing,
    /// Whether the connection may carry another request once this response
    /// has ended: HTTP/1.1 and no `connection: close` either way.
    keep_alive: bool,
}

/// The upstream's side of a `101 Switching Protocols`, put in the
/// response's extensions for the upgrade stage: its connection, with the
/// bytes read past the `101`'s head.
#[derive(Clone)]
pub(crate) struct OnUpgrade(Arc<Mutex<Option<Rewind<Upstream>>>>);

/// Why an exchange on an upstream HTTP/1.1 connection failed; the
/// connection is not reused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("upstream connection failed")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before the response was complete")]
    Closed,
    #[error("upstream response head is longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("upstream response head has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed upstream response head")]
    InvalidHead(#[source] httparse::Error),
    #[error("malformed upstream response status")]
    InvalidStatus,
    #[error("malformed upstream response header field")]
    InvalidHeader,
    #[error("malformed upstream response content-length")]
    InvalidContentLength,
    #[error("malformed chunked upstream response body")]
    Chunked(#[from] ChunkedError),
    #[error("the request body failed")]
    RequestBody(#[source] BoxError),
    #[error("the request body's length differs from its content-length")]
    RequestLength,
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    fields: Fields,
}

/// What a response head's fields say about its body and connection, noted
/// as they are read rather than looked up again.
#[derive(Debug)]
struct Fields {
    /// `connection: close`.
    close: bool,
    /// With a `transfer-encoding`: whether its last coding is chunked.
    chunked: Option<bool>,
    /// The `content-length`, if any.
    length: Result<Option<u64>, Error>,
}

/// A request body being sent, and its framing.
struct Sending {
    body: ReplayBody,
    encode: Encode,
}

/// How a request body is framed on the wire.
enum Encode {
    /// `content-length`: the bytes still to come.
    Length(u64),
    /// `transfer-encoding: chunked`, with the trailer fields the request's
    /// `trailer` header announces (only those are sent, as hyper does).
    Chunked(Vec<HeaderName>),
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug)]
enum Framing {
    /// No body (a `HEAD`'s response, 1xx, 204, 304), or one read to its end.
    Empty,
    /// `content-length`: the bytes still to come.
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Until the upstream closes the connection.
    Close,
}

impl Connection {
    /// A new connection, boxed: it moves between the pool, the request and
    /// the response body on every request, as one pointer.
    pub(super) fn new(io: Upstream, permit: Permit) -> Box<Self> {
        Box::new(Self {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            written: 0,
            sending: None,
            used: 0,
            idle_since: Instant::now(),
            _permit: permit,
        })
    }

    /// Whether an idle connection can no longer carry a request: the
    /// upstream closed it, reset it, or sent bytes nobody asked for. One
    /// read attempt that does not wait (and usually makes no system call:
    /// the reactor knows the socket is not readable).
    pub(super) fn is_closed(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_ready()
    }

    /// Readies a connection going back on its stack: no read buffer is held
    /// while idle, nor a write buffer grown past a request head's size.
    pub(super) fn idle(&mut self) {
        self.read = BytesMut::new();
        if self.write.capacity() > IDLE_WRITE_BYTES {
            self.write = Vec::new();
        }
        self.idle_since = Instant::now();
    }

    /// Sends `request` (its URI in origin form) and reads the response head.
    pub(crate) async fn send(
        mut self: Box<Self>,
        request: Request<ReplayBody>,
    ) -> Result<Response<Body>, Error> {
        let (mut parts, body) = request.into_parts();
        let head_request = parts.method == Method::HEAD;
        let encode = request_framing(
            &parts.method,
            &mut parts.headers,
            body.is_end_stream(),
            body.size_hint(),
        );
        self.write.clear();
        self.written = 0;
        let mut keep_alive =
            !encode_head(&parts.method, &parts.uri, &parts.headers, &mut self.write);
        self.sending = encode.map(|encode| Sending { body, encode });
        let mut write_failed = false;
        let head = poll_fn(|cx| {
            if !write_failed && self.is_sending() {
                match self.poll_send(cx) {
                    Poll::Ready(Err(Error::Io(_))) => {
                        // The upstream may have answered and stopped reading
                        // (a `413`): its response is still read.
                        write_failed = true;
                        self.stop_sending();
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            self.poll_head(cx)
        })
        .await?;
        let Head {
            status,
            version,
            headers,
            fields,
        } = head;
        let framing = response_framing(head_request, status, &fields)?;
        keep_alive &= !write_failed
            && version == Version::HTTP_11
            && !fields.close
            && !matches!(framing, Framing::Close);
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            // What was read past the `101`'s head is the new protocol's.
            let Connection { io, read, .. } = *self;
            let upgraded = Rewind::new(read.freeze(), io);
            response
                .extensions_mut()
                .insert(OnUpgrade(Arc::new(Mutex::new(Some(upgraded)))));
            return Ok(response.map(|()| Body::empty()));
        }
        Ok(response.map(|()| Body {
            conn: Some(self),
            framing,
            keep_alive,
        }))
    }

    /// Whether request bytes are still to be written.
    fn is_sending(&self) -> bool {
        self.sending.is_some() || self.written < self.write.len()
    }

    fn stop_sending(&mut self) {
        self.sending = None;
        self.write.clear();
        self.written = 0;
    }

    /// Writes the request: gathers body frames that are ready while the
    /// buffer is small, writes, and flushes once the body has ended.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            if let Some(sending) = self.sending.as_mut()
                && self.write.len() < GATHER_BYTES
                && let Poll::Ready(frame) = Pin::new(&mut sending.body).poll_frame(cx)
            {
                self.encode_frame(frame)?;
                continue;
            }
            if self.written < self.write.len() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                self.written += n;
                if self.written == self.write.len() {
                    self.write.clear();
                    self.written = 0;
                }
                continue;
            }
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            // Waiting for the body (its waker is registered), or done.
            return if self.sending.is_some() {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            };
        }
    }

    /// Appends one request body frame (or its end) to the write buffer.
    fn encode_frame(&mut self, frame: Option<Result<Frame<Bytes>, BoxError>>) -> Result<(), Error> {
        let Some(sending) = self.sending.as_mut() else {
            return Ok(());
        };
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                self.sending = None;
                return Err(Error::RequestBody(error));
            }
            None => {
                let end = match &sending.encode {
                    Encode::Length(0) => Ok(()),
                    Encode::Length(_) => Err(Error::RequestLength),
                    Encode::Chunked(_) => {
                        chunked::encode_last_chunk(None, &mut self.write);
                        Ok(())
                    }
                };
                self.sending = None;
                return end;
            }
        };
        match (frame.into_data(), &mut sending.encode) {
            (Ok(data), Encode::Length(left)) => {
                *left = left
                    .checked_sub(data.len() as u64)
                    .ok_or(Error::RequestLength)?;
                self.write.extend_from_slice(&data);
            }
            (Ok(data), Encode::Chunked(_)) if data.is_empty() => {}
            (Ok(data), Encode::Chunked(_)) => {
                chunked::encode_chunk_head(data.len(), &mut self.write);
                self.write.extend_from_slice(&data);
                self.write.extend_from_slice(chunked::CHUNK_TAIL);
            }
            (Err(frame), Encode::Chunked(allowed)) => {
                // Trailers end a chunked body.
                let trailers = frame.into_trailers().ok().map(|t| announced(t, allowed));
                chunked::encode_last_chunk(trailers.as_ref(), &mut self.write);
                self.sending = None;
            }
            // A `content-length` body cannot carry trailers.
            (Err(_), Encode::Length(_)) => {}
        }
        Ok(())
    }

    /// Reads until a final response head (1xx other than `101` skipped).
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Head, Error>> {
        loop {
            if !self.read.is_empty() {
                match parse_head(&mut self.read)? {
                    Some(head)
                        if head.status.is_informational()
                            && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        continue;
                    }
                    Some(head) => return Poll::Ready(Ok(head)),
                    None if self.read.len() >= MAX_HEAD_BYTES => {
                        return Poll::Ready(Err(Error::HeadTooLarge));
                    }
                    None => {}
                }
            }
            if ready!(self.poll_read(cx))? == 0 {
                return Poll::Ready(Err(Error::Closed));
            }
        }
    }

    /// Reads what the upstream has into the read buffer; `0` at its end.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        h1::poll_read_into(&mut self.io, cx, &mut self.read)
    }
}

impl Body {
    /// A response without a body or a connection.
    fn empty() -> Self {
        Self {
            conn: None,
            framing: Framing::Empty,
            keep_alive: false,
        }
    }

    /// The connection, once the response has ended cleanly on one that can
    /// carry another request: request body sent, framing complete, no
    /// stray bytes after it. `None` otherwise, and then the connection
    /// closes when this body is dropped.
    pub(super) fn take_reusable(&mut self) -> Option<Box<Connection>> {
        let conn = self.conn.as_ref()?;
        if !self.keep_alive
            || !self.framing.is_complete()
            || conn.is_sending()
            || !conn.read.is_empty()
        {
            return None;
        }
        self.conn.take()
    }

    /// The next frame of the response body, reading as needed.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame<Bytes>>, Error>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        loop {
            if self.framing.is_complete() {
                return Poll::Ready(Ok(None));
            }
            match &mut self.framing {
                Framing::Length(left) if !conn.read.is_empty() => {
                    let n =
                        usize::try_from(*left).map_or(conn.read.len(), |l| l.min(conn.read.len()));
                    *left -= n as u64;
                    return Poll::Ready(Ok(Some(Frame::data(conn.read.split_to(n).freeze()))));
                }
                Framing::Chunked(decoder) => match decoder.decode(&mut conn.read)? {
                    Some(Chunk::Data(data)) => return Poll::Ready(Ok(Some(Frame::data(data)))),
                    Some(Chunk::End(trailers)) if trailers.is_empty() => {
                        return Poll::Ready(Ok(None));
                    }
                    Some(Chunk::End(trailers)) => {
                        return Poll::Ready(Ok(Some(Frame::trailers(trailers))));
                    }
                    None => {}
                },
                Framing::Close if !conn.read.is_empty() => {
                    return Poll::Ready(Ok(Some(Frame::data(conn.read.split().freeze()))));
                }
                _ => {}
            }
            if ready!(conn.poll_read(cx))? == 0 {
                if !matches!(self.framing, Framing::Close) {
                    return Poll::Ready(Err(Error::Closed));
                }
                self.framing = Framing::Empty;
                return Poll::Ready(Ok(None));
            }
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        // The request body goes on while the response streams; once the
        // response is complete, what is left of it no longer matters.
        if let Some(conn) = this.conn.as_mut()
            && conn.is_sending()
            && !this.framing.is_complete()
        {
            match conn.poll_send(cx) {
                Poll::Ready(Err(Error::Io(_))) => {
                    // The upstream stopped reading; its answer still counts.
                    conn.stop_sending();
                    this.keep_alive = false;
                }
                Poll::Ready(Err(error)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(error.into())));
                }
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        match ready!(this.poll_body(cx)) {
            Ok(frame) => Poll::Ready(frame.map(Ok)),
            Err(error) => {
                this.conn = None;
                Poll::Ready(Some(Err(error.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.framing.is_complete()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(left) => SizeHint::with_exact(left),
            Framing::Chunked(_) | Framing::Close => SizeHint::default(),
        }
    }
}

impl Framing {
    /// Whether the body has been read to its end.
    fn is_complete(&self) -> bool {
        match self {
            Framing::Empty => true,
            Framing::Length(left) => *left == 0,
            Framing::Chunked(decoder) => decoder.is_done(),
            Framing::Close => false,
        }
    }
}

impl Default for Fields {
    fn default() -> Self {
        Self {
            close: false,
            chunked: None,
            length: Ok(None),
        }
    }
}

impl Fields {
    /// Notes one field of the head.
    fn note(&mut self, name: &HeaderName, value: &[u8]) {
        if *name == header::CONTENT_LENGTH {
            let length = std::mem::replace(&mut self.length, Ok(None));
            self.length = add_length(length, value);
        } else if *name == header::TRANSFER_ENCODING {
            // The last value holds the last coding.
            self.chunked = Some(ends_chunked(value));
        } else if *name == header::CONNECTION {
            self.close |= says_close(value);
        }
    }
}

impl OnUpgrade {
    /// The upgraded connection; `None` if it was taken already.
    pub(crate) fn take(&self) -> Option<Rewind<Upstream>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Frames a request body as hyper did: none when the body is empty; the
/// request's own valid `content-length`; the body's exact length as one;
/// else chunked, except for `GET`, `HEAD` and `CONNECT`, which then go
/// without a body. `None`: no body is sent.
fn request_framing(
    method: &Method,
    headers: &mut HeaderMap,
    empty: bool,
    hint: SizeHint,
) -> Option<Encode> {
    if empty {
        headers.remove(header::TRANSFER_ENCODING);
        return None;
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
        if !is_chunked(headers) {
            headers.append(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        return Some(Encode::Chunked(trailer_names(headers)));
    }
    if let Ok(Some(length)) = content_length(headers) {
        return Some(Encode::Length(length));
    }
    if let Some(length) = hint.exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        return Some(Encode::Length(length));
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) {
        return None;
    }
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    Some(Encode::Chunked(trailer_names(headers)))
}

/// The request head: request line in origin form, then the header fields
/// as the stack left them. Returns whether they ask for `connection: close`
/// (noted on the way rather than looked up).
fn encode_head(method: &Method, uri: &Uri, headers: &HeaderMap, dst: &mut Vec<u8>) -> bool {
    let mut close = false;
    dst.extend_from_slice(method.as_str().as_bytes());
    dst.push(b' ');
    let target = uri.path_and_query().map_or("/", |target| target.as_str());
    dst.extend_from_slice(target.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        close |= *name == header::CONNECTION && says_close(value.as_bytes());
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    close
}

/// Parses a response head off the front of `read`; `None` until it is all
/// there. Header values share the head's bytes rather than copy them.
fn parse_head(read: &mut BytesMut) -> Result<Option<Head>, Error> {
    // Left uninitialized: httparse fills what it uses.
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        read,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::TooManyHeaders),
        Err(error) => return Err(Error::InvalidHead(error)),
    };
    if len > MAX_HEAD_BYTES {
        return Err(Error::HeadTooLarge);
    }
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Error::InvalidStatus)?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where each name and value lies in the head, to slice them out of it
    // once it is split off the buffer. The head is at most `MAX_HEAD_BYTES`
    // (64 KiB) long, so every offset into it and every length within it
    // fits a `u16`; small spans keep the array's zeroing cheap.
    let base = read.as_ptr().addr();
    let offset = |field: &[u8]| (field.as_ptr().addr() - base) as u16;
    let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
    let count = response.headers.len();
    for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
        let (name, value) = (offset(field.name.as_bytes()), offset(field.value));
        *span = (
            name,
            field.name.len() as u16,
            value,
            field.value.len() as u16,
        );
    }
    let head = read.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let mut fields = Fields::default();
    for &(name, name_len, value, value_len) in &spans[..count] {
        let name = usize::from(name)..usize::from(name) + usize::from(name_len);
        let value = usize::from(value)..usize::from(value) + usize::from(value_len);
        let name = HeaderName::from_bytes(&head[name]).map_err(|_| Error::InvalidHeader)?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value)).map_err(|_| Error::InvalidHeader)?;
        fields.note(&name, value.as_bytes());
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        fields,
    }))
}

/// How the response to a request is delimited (RFC 9112 §6.3).
fn response_framing(
    head_request: bool,
    status: StatusCode,
    fields: &Fields,
) -> Result<Framing, Error> {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if let Some(chunked) = fields.chunked {
        // A last coding other than chunked: the body ends with the
        // connection.
        return Ok(if chunked {
            Framing::Chunked(ChunkedDecoder::new(MAX_TRAILER_BYTES))
        } else {
            Framing::Close
        });
    }
    Ok(match fields.length {
        Ok(Some(length)) => Framing::Length(length),
        Ok(None) => Framing::Close,
        Err(_) => return Err(Error::InvalidContentLength),
    })
}

/// The `content-length`, if any: every value (comma-separated lists
/// included) must be the same number.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    let mut length = Ok(None);
    for value in headers.get_all(header::CONTENT_LENGTH) {
        length = add_length(length, value.as_bytes());
    }
    length
}

/// `length` with one more `content-length` value: the same number again,
/// or an error.
fn add_length(length: Result<Option<u64>, Error>, value: &[u8]) -> Result<Option<u64>, Error> {
    let parsed = head::content_length(value).ok_or(Error::InvalidContentLength)?;
    match length? {
        Some(known) if known != parsed => Err(Error::InvalidContentLength),
        _ => Ok(Some(parsed)),
    }
}

/// Whether the last transfer coding is `chunked`.
fn is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .is_some_and(|value| ends_chunked(value.as_bytes()))
}

/// Whether a `transfer-encoding` value's last coding is `chunked`.
fn ends_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether a `connection` value has the `close` option.
fn says_close(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// The trailer fields a request's `trailer` header announces.
fn trailer_names(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::TRAILER)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect()
}

/// The trailers among `trailers` that were announced.
fn announced(mut trailers: HeaderMap, allowed: &[HeaderName]) -> HeaderMap {
    let names: Vec<HeaderName> = trailers
        .keys()
        .filter(|name| !allowed.contains(name))
        .cloned()
        .collect();
    for name in names {
        trailers.remove(name);
    }
    trailers
}

#[cfg(test)]
mod tests;
