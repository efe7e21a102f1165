//! Response heads and body framing: the status line, the headers as given,
//! a `date` like hyper's (formatted once a second per thread), and how the
//! body is delimited: its exact size as `content-length`, else chunked to an
//! HTTP/1.1 client, else the end of the connection (HTTP/1.0).

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap};
use http::{StatusCode, Version};
use hyper::body::SizeHint;

use super::head;

/// How a response body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body at all (`HEAD`, 1xx, 204, 304).
    None,
    /// This many bytes, announced by `content-length`.
    Length(u64),
    /// The chunked coding; trailers are written when the client takes them.
    Chunked { trailers: bool },
    /// Until the connection closes.
    Close,
}

/// A body of known size up to this is reserved for with its head.
const SMALL_BODY_BYTES: usize = 16 * 1024;

/// What the request says about its response's head.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Asked {
    pub version: Version,
    pub head: bool,
    /// `TE: trailers`.
    pub trailers: bool,
}

/// Appends the head of a response to `dst` and says how its body goes.
/// `keep_alive` turns false when the body can only end with the connection;
/// when it is false the head says `connection: close`.
pub(crate) fn encode_head(
    status: StatusCode,
    headers: &HeaderMap,
    hint: &SizeHint,
    asked: Asked,
    keep_alive: &mut bool,
    dst: &mut Vec<u8>,
) -> Framing {
    let framing = framing(status, headers, hint, asked);
    if framing == Framing::Close {
        *keep_alive = false;
    }
    // Room for the head and a small body of known size, which follows it
    // into the same buffer: one allocation, no regrowth.
    let body = hint
        .exact()
        .map_or(0, |n| n.min(SMALL_BODY_BYTES as u64) as usize);
    dst.reserve(128 + headers.len() * 32 + body);
    status_line(asked.version, status, dst);
    let own_length = matches!(framing, Framing::Length(_)) && hint.exact().is_some();
    for (name, value) in headers {
        let skip = match *name {
            header::CONTENT_LENGTH => own_length,
            header::TRANSFER_ENCODING => true,
            header::CONNECTION => status != StatusCode::SWITCHING_PROTOCOLS,
            _ => false,
        };
        if !skip {
            field(name.as_str().as_bytes(), value.as_bytes(), dst);
        }
    }
    match framing {
        Framing::Length(length) if own_length => {
            field(b"content-length", decimal(length, &mut [0; 20]), dst);
        }
        Framing::Chunked { .. } => field(b"transfer-encoding", b"chunked", dst),
        // A `HEAD` answered with the body a `GET` would get: its length.
        Framing::None if asked.head && !headers.contains_key(header::CONTENT_LENGTH) => {
            if let Some(length) = hint.exact().filter(|n| *n > 0) {
                field(b"content-length", decimal(length, &mut [0; 20]), dst);
            }
        }
        _ => {}
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if !*keep_alive {
            field(b"connection", b"close", dst);
        } else if asked.version == Version::HTTP_10 {
            field(b"connection", b"keep-alive", dst);
        }
    }
    if !headers.contains_key(header::DATE) {
        DATE.with(|date| field(b"date", date.borrow_mut().now(), dst));
    }
    dst.extend_from_slice(b"\r\n");
    framing
}

/// A bare response to a request the server refused (its head broke a rule
/// or a limit): the status, `content-length: 0`, and the connection closes.
pub(crate) fn encode_refusal(status: StatusCode, dst: &mut Vec<u8>) {
    status_line(Version::HTTP_11, status, dst);
    field(b"content-length", b"0", dst);
    field(b"connection", b"close", dst);
    DATE.with(|date| field(b"date", date.borrow_mut().now(), dst));
    dst.extend_from_slice(b"\r\n");
}

/// The body's framing for `status` and `headers` (RFC 9112 §6.3).
fn framing(status: StatusCode, headers: &HeaderMap, hint: &SizeHint, asked: Asked) -> Framing {
    if asked.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Framing::None;
    }
    if let Some(length) = hint.exact() {
        return Framing::Length(length);
    }
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| head::content_length(v.as_bytes()))
    {
        return Framing::Length(length);
    }
    if asked.version == Version::HTTP_11 {
        Framing::Chunked {
            trailers: asked.trailers,
        }
    } else {
        Framing::Close
    }
}

fn status_line(version: Version, status: StatusCode, dst: &mut Vec<u8>) {
    if version == Version::HTTP_11 && status == StatusCode::OK {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    dst.extend_from_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    dst.extend_from_slice(status.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    dst.extend_from_slice(b"\r\n");
}

fn field(name: &[u8], value: &[u8], dst: &mut Vec<u8>) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

/// `n`'s decimal digits, written into `buf` without the formatting machinery.
fn decimal(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    let mut rest = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    &buf[at..]
}

thread_local! {
    static DATE: RefCell<CachedDate> = const { RefCell::new(CachedDate { second: u64::MAX, text: [0; DATE_LEN] }) };
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`: the IMF-fixdate of RFC 9110 §5.6.7.
const DATE_LEN: usize = 29;

/// The `date` of the current second, formatted when the second changes.
struct CachedDate {
    second: u64,
    text: [u8; DATE_LEN],
}

impl CachedDate {
    fn now(&mut self) -> &[u8] {
        let second = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second {
            self.second = second;
            self.text = imf_fixdate(second);
        }
        &self.text
    }
}

/// The IMF-fixdate of `secs` after the Unix epoch.
fn imf_fixdate(secs: u64) -> [u8; DATE_LEN] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let in_day = secs % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm), from 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut text = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    text[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    two(day, &mut text[5..7]);
    text[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    two(year / 100 % 100, &mut text[12..14]);
    two(year % 100, &mut text[14..16]);
    two(in_day / 3600, &mut text[17..19]);
    two(in_day / 60 % 60, &mut text[20..22]);
    two(in_day % 60, &mut text[23..25]);
    text
}

fn two(n: u64, dst: &mut [u8]) {
    dst[0] = b'0' + (n / 10 % 10) as u8;
    dst[1] = b'0' + (n % 10) as u8;
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    const GET_11: Asked = Asked {
        version: Version::HTTP_11,
        head: false,
        trailers: false,
    };

    fn encode(
        status: StatusCode,
        headers: &HeaderMap,
        hint: SizeHint,
        asked: Asked,
    ) -> (String, Framing, bool) {
        let mut keep_alive = true;
        let mut dst = Vec::new();
        let framing = encode_head(status, headers, &hint, asked, &mut keep_alive, &mut dst);
        (String::from_utf8(dst).expect("text"), framing, keep_alive)
    }

    #[test]
    fn dates_are_imf_fixdates() {
        assert_eq!(&imf_fixdate(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&imf_fixdate(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&imf_fixdate(951_782_400), b"Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(
            &imf_fixdate(4_102_444_799),
            b"Thu, 31 Dec 2099 23:59:59 GMT"
        );
    }

    #[test]
    fn a_sized_body_gets_its_length_and_the_headers_as_given() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let (head, framing, keep_alive) =
            encode(StatusCode::OK, &headers, SizeHint::with_exact(5), GET_11);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: "));
        assert!(head.ends_with(" GMT\r\n\r\n"), "{head}");
        assert_eq!(framing, Framing::Length(5));
        assert!(keep_alive);
    }

    #[test]
    fn an_unsized_body_is_chunked_to_http11_and_close_delimited_to_http10() {
        let headers = HeaderMap::new();
        let asked = Asked {
            trailers: true,
            ..GET_11
        };
        let (head, framing, _) = encode(StatusCode::OK, &headers, SizeHint::new(), asked);
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        assert_eq!(framing, Framing::Chunked { trailers: true });
        let asked = Asked {
            version: Version::HTTP_10,
            ..GET_11
        };
        let (head, framing, keep_alive) =
            encode(StatusCode::NOT_FOUND, &headers, SizeHint::new(), asked);
        assert!(head.starts_with("HTTP/1.0 404 Not Found\r\n"), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert_eq!(framing, Framing::Close);
        assert!(!keep_alive);
        let (head, _, _) = encode(StatusCode::OK, &headers, SizeHint::with_exact(0), asked);
        assert!(head.contains("connection: keep-alive\r\n"), "{head}");
    }

    #[test]
    fn no_body_for_head_1xx_204_and_304() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        let head_request = Asked {
            head: true,
            ..GET_11
        };
        let (head, framing, _) = encode(
            StatusCode::OK,
            &headers,
            SizeHint::with_exact(0),
            head_request,
        );
        assert_eq!(framing, Framing::None);
        assert!(
            head.contains("content-length: 10\r\n"),
            "HEAD keeps the length: {head}"
        );
        let (head, _, _) = encode(
            StatusCode::OK,
            &HeaderMap::new(),
            SizeHint::with_exact(7),
            head_request,
        );
        assert!(
            head.contains("content-length: 7\r\n"),
            "HEAD gets the GET's length: {head}"
        );
        for status in [StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED] {
            let (_, framing, _) = encode(status, &HeaderMap::new(), SizeHint::new(), GET_11);
            assert_eq!(framing, Framing::None);
        }
        let mut upgrade = HeaderMap::new();
        upgrade.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        upgrade.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let (head, framing, _) = encode(
            StatusCode::SWITCHING_PROTOCOLS,
            &upgrade,
            SizeHint::new(),
            GET_11,
        );
        assert_eq!(framing, Framing::None);
        assert!(head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(
            head.contains("connection: upgrade\r\nupgrade: websocket\r\n"),
            "{head}"
        );
    }

    #[test]
    fn a_refusal_closes() {
        let mut dst = Vec::new();
        encode_refusal(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, &mut dst);
        let text = String::from_utf8(dst).expect("text");
        assert!(text.starts_with(
            "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n"
        ));
    }
}
