//! Request heads: the request line and header fields parsed by `httparse`
//! into a `Request<()>` whose header values share the read buffer's bytes,
//! with what the connection needs to know of them: how the body is framed
//! (RFC 9112 §6), whether the connection stays open, and whether the client
//! expects `100 Continue`, asks for a protocol switch or takes trailers.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

use crate::DEFAULT_MAX_REQUEST_HEADERS;

/// Fields a request gains on its way through the proxy (`x-forwarded-for`,
/// `x-forwarded-proto`, `via`, and one to spare), made room for when its
/// header map is built: growing a map rehashes it.
const FORWARDING_ROOM: usize = 4;

/// Header slots parsed on the stack; a larger `max_request_headers` takes
/// them from the heap.
const STACK_HEADERS: usize = DEFAULT_MAX_REQUEST_HEADERS as usize;

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Head {
    pub request: Request<()>,
    pub framing: Framing,
    /// The connection may carry another request after this one's response.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1).
    pub expect_continue: bool,
    /// `Upgrade` named by `Connection` (HTTP/1.1): a `101` hands the
    /// connection over.
    pub upgrade: bool,
    /// `TE: trailers`: a chunked response may end with trailer fields.
    pub trailers: bool,
    /// What was read past the head: body bytes, or a pipelined request.
    pub rest: Bytes,
}

/// How a request body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `Content-Length` bytes (0 without a body).
    Length(u64),
    Chunked,
}

/// A request head the server refuses; the connection closes after the answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HeadError {
    #[error("request head larger than the limit")]
    TooLarge,
    #[error("more request headers than the limit")]
    TooManyHeaders,
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
}

impl HeadError {
    /// The status the client is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            HeadError::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Parses a request head from the front of `buf`, taking all of `buf` (what
/// follows the head is [`Head::rest`]): `Ok(None)`, with `buf` as it was,
/// while the head is not complete (and shorter than `max_bytes`).
pub(crate) fn parse(
    buf: &mut BytesMut,
    max_bytes: usize,
    max_headers: usize,
) -> Result<Option<Head>, HeadError> {
    // Frozen, so header values can be slices of it rather than copies; it
    // goes back to `buf` while the head is incomplete.
    let bytes = buf.split().freeze();
    let parsed = if max_headers <= STACK_HEADERS {
        let mut slots = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        parse_bytes(&bytes, max_bytes, &mut slots[..max_headers])
    } else {
        let mut slots = Vec::new();
        slots.resize_with(max_headers, MaybeUninit::uninit);
        parse_bytes(&bytes, max_bytes, &mut slots)
    };
    if let Ok(None) = parsed {
        *buf = bytes.into();
    }
    parsed
}

fn parse_bytes<'b>(
    bytes: &'b Bytes,
    max_bytes: usize,
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<Head>, HeadError> {
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(bytes, slots) {
        Ok(httparse::Status::Complete(len)) if len <= max_bytes => len,
        Ok(httparse::Status::Complete(_)) => return Err(HeadError::TooLarge),
        // A buffer full of an incomplete head is too large (as hyper has it).
        Ok(httparse::Status::Partial) if bytes.len() >= max_bytes => {
            return Err(HeadError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(error) => return Err(HeadError::Malformed(parse_error(error))),
    };
    let mut head = build(&request, bytes)?;
    head.rest = bytes.slice(len..);
    Ok(Some(head))
}

/// What is wrong with a head `httparse` refused.
fn parse_error(error: httparse::Error) -> &'static str {
    match error {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status | httparse::Error::Token => "invalid request line",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

/// What the header fields say about the message, besides the fields.
#[derive(Default)]
struct Fields {
    content_length: Option<u64>,
    transfer_encoding: bool,
    /// The last transfer coding seen is `chunked`.
    chunked: bool,
    close: bool,
    keep_alive: bool,
    upgrade_token: bool,
    upgrade: bool,
    expect_continue: bool,
    trailers: bool,
}

/// The request and its framing from a complete parse of `bytes`.
fn build(parsed: &httparse::Request<'_, '_>, bytes: &Bytes) -> Result<Head, HeadError> {
    let method = parsed.method.unwrap_or_default();
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    let path = parsed.path.unwrap_or_default();
    let uri = Uri::from_maybe_shared(bytes.slice_ref(path.as_bytes()))
        .map_err(|_| HeadError::Malformed("invalid request target"))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len() + FORWARDING_ROOM);
    let mut fields = Fields::default();
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Malformed("invalid header name"))?;
        let value = if field.value.is_empty() {
            HeaderValue::from_static("")
        } else {
            HeaderValue::from_maybe_shared(bytes.slice_ref(field.value))
                .map_err(|_| HeadError::Malformed("invalid header value"))?
        };
        fields.note(&name, &value)?;
        headers.append(name, value);
    }
    let framing = fields.framing(version)?;
    let http11 = version == Version::HTTP_11;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Head {
        request,
        framing,
        keep_alive: !fields.close && (http11 || fields.keep_alive),
        expect_continue: http11 && fields.expect_continue,
        upgrade: http11 && fields.upgrade && fields.upgrade_token,
        trailers: fields.trailers,
        rest: Bytes::new(),
    })
}

impl Fields {
    /// Takes note of one header field.
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) -> Result<(), HeadError> {
        match *name {
            header::CONTENT_LENGTH => {
                let length = content_length(value.as_bytes())
                    .ok_or(HeadError::Malformed("invalid content-length"))?;
                if self.content_length.is_some_and(|known| known != length) {
                    return Err(HeadError::Malformed("conflicting content-length"));
                }
                self.content_length = Some(length);
            }
            header::TRANSFER_ENCODING => {
                self.transfer_encoding = true;
                for coding in tokens(value) {
                    if self.chunked {
                        return Err(HeadError::Malformed(
                            "chunked is not the last transfer coding",
                        ));
                    }
                    self.chunked = coding.eq_ignore_ascii_case(b"chunked");
                }
            }
            header::CONNECTION => {
                for token in tokens(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        self.keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        self.upgrade_token = true;
                    }
                }
            }
            header::UPGRADE => self.upgrade = true,
            header::EXPECT => {
                self.expect_continue |= value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            }
            header::TE => {
                self.trailers |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
            }
            _ => {}
        }
        Ok(())
    }

    /// The body's framing (RFC 9112 §6.3): anything that could be read two
    /// ways by two servers is refused (request smuggling).
    fn framing(&self, version: Version) -> Result<Framing, HeadError> {
        if !self.transfer_encoding {
            return Ok(Framing::Length(self.content_length.unwrap_or(0)));
        }
        if version == Version::HTTP_10 {
            return Err(HeadError::Malformed(
                "transfer-encoding in an HTTP/1.0 request",
            ));
        }
        if self.content_length.is_some() {
            return Err(HeadError::Malformed(
                "both transfer-encoding and content-length",
            ));
        }
        if !self.chunked {
            return Err(HeadError::Malformed(
                "transfer-encoding without chunked last",
            ));
        }
        Ok(Framing::Chunked)
    }
}

/// The comma-separated, trimmed, non-empty tokens of a header value.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A Content-Length value: digits, or a list of the same digits repeated.
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for item in value.split(|b| *b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let mut n: u64 = 0;
        for digit in item {
            n = n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
        }
        if length.is_some_and(|known| known != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 8192;

    fn parse_str(input: &str) -> Result<Option<Head>, HeadError> {
        parse(&mut BytesMut::from(input), MAX, STACK_HEADERS)
    }

    fn framing(input: &str) -> Result<Framing, HeadError> {
        Ok(parse_str(input)?.expect("complete").framing)
    }

    #[test]
    fn a_get_parses_with_shared_values_and_leaves_the_next_request() {
        let mut buf = BytesMut::from(
            "GET /a?b=c HTTP/1.1\r\nHost: demo.local\r\nX-Empty:\r\nx-a: 1\r\nx-a: 2\r\n\r\nGET /next",
        );
        let head = parse(&mut buf, MAX, STACK_HEADERS)
            .expect("valid")
            .expect("complete");
        let request = &head.request;
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().path(), "/a");
        assert_eq!(request.uri().query(), Some("b=c"));
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.headers()[header::HOST], "demo.local");
        assert_eq!(request.headers()["x-empty"], "");
        assert_eq!(request.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(head.framing, Framing::Length(0));
        assert!(head.keep_alive);
        assert!(!head.expect_continue && !head.upgrade && !head.trailers);
        assert_eq!(&head.rest[..], b"GET /next");
        assert!(buf.is_empty());
    }

    #[test]
    fn a_partial_head_is_kept_whole_until_complete() {
        let mut buf = BytesMut::from("GET / HTTP/1.1\r\nhost: a\r\n");
        assert!(
            parse(&mut buf, MAX, STACK_HEADERS)
                .expect("valid")
                .is_none()
        );
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\nhost: a\r\n");
        buf.extend_from_slice(b"\r\n");
        assert!(
            parse(&mut buf, MAX, STACK_HEADERS)
                .expect("valid")
                .is_some()
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn limits_are_431_and_garbage_is_400() {
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(MAX));
        assert_eq!(parse_str(&big).unwrap_err(), HeadError::TooLarge);
        let partial_big = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(MAX));
        assert_eq!(parse_str(&partial_big).unwrap_err(), HeadError::TooLarge);
        let many: String = (0..3).map(|i| format!("x-{i}: 1\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let error = parse(&mut BytesMut::from(&many[..]), MAX, 2).unwrap_err();
        assert_eq!(error, HeadError::TooManyHeaders);
        assert_eq!(error.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let lots: String = (0..150).map(|i| format!("x-{i}: 1\r\n")).collect();
        let lots = format!("GET / HTTP/1.1\r\n{lots}\r\n");
        assert!(
            parse(&mut BytesMut::from(&lots[..]), MAX, 200)
                .expect("fits")
                .is_some()
        );
        for garbage in [
            "\x00\x01\r\n\r\n",
            "GET / HTTP/9.9\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header\r\n\r\n",
            "GET / HTTP/1.1\r\nx: a\rb\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
        ] {
            let error = parse_str(garbage).unwrap_err();
            assert_eq!(error.status(), StatusCode::BAD_REQUEST, "{garbage:?}");
        }
    }

    #[test]
    fn framing_follows_rfc_9112_and_refuses_what_could_be_smuggled() {
        let head = |fields: &str| format!("POST / HTTP/1.1\r\n{fields}\r\n");
        assert_eq!(
            framing(&head("content-length: 5\r\n")),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing(&head("content-length: 5, 5\r\ncontent-length: 5\r\n")),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing(&head("transfer-encoding: chunked\r\n")),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing(&head(
                "transfer-encoding: gzip\r\ntransfer-encoding: Chunked\r\n"
            )),
            Ok(Framing::Chunked)
        );
        for smuggled in [
            "content-length: 5\r\ntransfer-encoding: chunked\r\n",
            "transfer-encoding: chunked\r\ncontent-length: 0\r\n",
            "transfer-encoding: gzip\r\n",
            "transfer-encoding: chunked, gzip\r\n",
            "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
            "content-length: 5\r\ncontent-length: 6\r\n",
            "content-length: 5, 6\r\n",
            "content-length: -5\r\n",
            "content-length: +5\r\n",
            "content-length: 0x5\r\n",
            "content-length: \r\n",
            "content-length: 99999999999999999999999\r\n",
        ] {
            let result = framing(&head(smuggled));
            assert!(
                matches!(result, Err(HeadError::Malformed(_))),
                "{smuggled:?}: {result:?}"
            );
        }
        let chunked_10 = "POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(framing(chunked_10).is_err(), "no chunked in HTTP/1.0");
    }

    #[test]
    fn keep_alive_expect_upgrade_and_trailers() {
        let head = |text: &str| parse_str(text).expect("valid").expect("complete");
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.1\r\nconnection: Keep-Alive, close\r\n\r\n").keep_alive);
        assert!(head("POST / HTTP/1.1\r\nexpect: 100-Continue\r\n\r\n").expect_continue);
        assert!(!head("POST / HTTP/1.0\r\nexpect: 100-continue\r\n\r\n").expect_continue);
        assert!(head("GET / HTTP/1.1\r\nte: gzip, trailers\r\n\r\n").trailers);
        let upgrade = "GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n";
        assert!(head(upgrade).upgrade);
        assert!(!head("GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n").upgrade);
    }
}
