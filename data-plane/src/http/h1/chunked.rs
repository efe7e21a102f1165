//! The chunked transfer coding (RFC 9112 §7.1), both ways: an incremental
//! decoder that splits body bytes off the read buffer without copying them,
//! and the few encoders a writer needs around its own data.

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// The most bytes of chunk extensions accepted on one chunk size line.
const MAX_EXTENSIONS: usize = 4096;
/// Hex digits of the largest chunk size (`u64::MAX`).
const MAX_SIZE_DIGITS: usize = 16;
/// The most trailer fields parsed (beyond them the section is too large).
const MAX_TRAILERS: usize = 64;

/// Incremental decoder of a body in the chunked transfer coding (RFC 9112 §7.1):
/// chunk sizes in hex, chunk extensions skipped, the last chunk, trailer fields.
#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    state: State,
    max_trailer_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a chunk size line.
    Size,
    /// Inside a chunk's data, with this many bytes of it to come.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: the trailer section and its final CRLF.
    Trailers,
    Done,
}

/// What one call to [`ChunkedDecoder::decode`] got.
#[derive(Debug, PartialEq)]
pub(crate) enum Chunk {
    /// Body bytes, split off the front of the buffer (never empty).
    Data(Bytes),
    /// The last chunk and the trailer section were read; the body is complete.
    /// The map is empty when there were no trailers.
    End(HeaderMap),
}

/// A chunked body that breaks the coding or a limit; the connection cannot be reused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ChunkedError {
    #[error("invalid chunk size line")]
    InvalidSize,
    #[error("chunk size too large")]
    SizeOverflow,
    #[error("chunk extensions too long")]
    ExtensionsTooLong,
    #[error("missing CRLF after chunk data")]
    MissingCrlf,
    #[error("invalid trailer section")]
    InvalidTrailers,
    #[error("trailer section too large")]
    TrailersTooLarge,
}

impl ChunkedDecoder {
    /// A decoder whose trailer section may be at most `max_trailer_bytes` long.
    pub(crate) fn new(max_trailer_bytes: usize) -> Self {
        Self {
            state: State::Size,
            max_trailer_bytes,
        }
    }

    /// Decodes from the front of `buf`, removing what it consumed. `Ok(None)`: `buf` holds no
    /// complete item yet (everything usable was consumed; read more and call again).
    /// A `Data` may be shorter than its chunk (whatever of it `buf` holds). After `End`, it
    /// consumes nothing more (bytes after the body stay in `buf`, e.g. a pipelined request).
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, ChunkedError> {
        loop {
            match self.state {
                State::Size => match size_line(buf)? {
                    None => return Ok(None),
                    Some(0) => self.state = State::Trailers,
                    Some(size) => self.state = State::Data(size),
                },
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()));
                    let rest = left - n as u64;
                    self.state = if rest == 0 {
                        State::DataEnd
                    } else {
                        State::Data(rest)
                    };
                    return Ok(Some(Chunk::Data(buf.split_to(n).freeze())));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|b| *b != b'\r') {
                            return Err(ChunkedError::MissingCrlf);
                        }
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkedError::MissingCrlf);
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers => {
                    let Some(trailers) = trailers(buf, self.max_trailer_bytes)? else {
                        return Ok(None);
                    };
                    self.state = State::Done;
                    return Ok(Some(Chunk::End(trailers)));
                }
                State::Done => return Ok(None),
            }
        }
    }

    /// Whether `End` was returned.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }
}

/// Parses and consumes one chunk size line: the size, or `None` while the
/// line is not complete.
fn size_line(buf: &mut BytesMut) -> Result<Option<u64>, ChunkedError> {
    let digits = buf.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits > MAX_SIZE_DIGITS {
        return Err(ChunkedError::SizeOverflow);
    }
    if digits == buf.len() {
        return Ok(None);
    }
    if digits == 0 {
        return Err(ChunkedError::InvalidSize);
    }
    let Some(lf) = buf.iter().position(|b| *b == b'\n') else {
        if buf.len() - digits > MAX_EXTENSIONS + 1 {
            return Err(ChunkedError::ExtensionsTooLong);
        }
        check_extensions(&buf[digits..])?;
        return Ok(None);
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(ChunkedError::InvalidSize);
    }
    let extensions = &buf[digits..lf - 1];
    if extensions.len() > MAX_EXTENSIONS {
        return Err(ChunkedError::ExtensionsTooLong);
    }
    check_extensions(extensions)?;
    let mut size: u64 = 0;
    for digit in &buf[..digits] {
        let value = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => digit - b'A' + 10,
        };
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(value)))
            .ok_or(ChunkedError::SizeOverflow)?;
    }
    buf.advance(lf + 1);
    Ok(Some(size))
}

/// Whether what follows the size digits can be chunk extensions
/// (`*( BWS ";" ... )`): optional whitespace, then `;` and visible text. A
/// bare CR that is not the line's end is refused with the rest.
fn check_extensions(extensions: &[u8]) -> Result<(), ChunkedError> {
    let start = extensions
        .iter()
        .take_while(|b| **b == b' ' || **b == b'\t')
        .count();
    let rest = &extensions[start..];
    let Some(rest) = rest.strip_prefix(b";").or(rest.is_empty().then_some(rest)) else {
        // A CR at the end of a partial line is the start of its CRLF.
        if rest == b"\r" {
            return Ok(());
        }
        return Err(ChunkedError::InvalidSize);
    };
    let body = rest.strip_suffix(b"\r").unwrap_or(rest);
    if body
        .iter()
        .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
    {
        return Err(ChunkedError::InvalidSize);
    }
    Ok(())
}

/// Parses and consumes the trailer section and its final CRLF, or `None`
/// while it is not complete.
fn trailers(buf: &mut BytesMut, max: usize) -> Result<Option<HeaderMap>, ChunkedError> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Some(HeaderMap::new()));
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
    let (len, map) = match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete((len, fields))) => {
            if len > max {
                return Err(ChunkedError::TrailersTooLarge);
            }
            let mut map = HeaderMap::with_capacity(fields.len());
            for field in fields.iter() {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| ChunkedError::InvalidTrailers)?;
                let value = HeaderValue::from_bytes(field.value)
                    .map_err(|_| ChunkedError::InvalidTrailers)?;
                map.append(name, value);
            }
            (len, map)
        }
        Ok(httparse::Status::Partial) => {
            if buf.len() > max {
                return Err(ChunkedError::TrailersTooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(ChunkedError::TrailersTooLarge),
        Err(_) => return Err(ChunkedError::InvalidTrailers),
    };
    buf.advance(len);
    Ok(Some(map))
}

/// Appends the head of a chunk of `len` (> 0) bytes, `{len:x}\r\n`, to `dst`.
pub(crate) fn encode_chunk_head(len: usize, dst: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 2 * size_of::<usize>()];
    let mut at = digits.len();
    let mut rest = len;
    loop {
        at -= 1;
        digits[at] = HEX[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    dst.extend_from_slice(&digits[at..]);
    dst.extend_from_slice(CHUNK_TAIL);
}

/// The CRLF that follows a chunk's data.
pub(crate) const CHUNK_TAIL: &[u8] = b"\r\n";

/// Appends the last chunk, the trailer fields (if any) and the final CRLF to `dst`.
pub(crate) fn encode_last_chunk(trailers: Option<&HeaderMap>, dst: &mut Vec<u8>) {
    dst.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes all of `input` fed one byte at a time: the data, the trailers.
    fn decode_bytewise(input: &[u8]) -> Result<(Vec<u8>, HeaderMap), ChunkedError> {
        let mut decoder = ChunkedDecoder::new(1024);
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for byte in input {
            buf.extend_from_slice(&[*byte]);
            while let Some(chunk) = decoder.decode(&mut buf)? {
                match chunk {
                    Chunk::Data(bytes) => {
                        assert!(!bytes.is_empty());
                        data.extend_from_slice(&bytes);
                    }
                    Chunk::End(trailers) => return Ok((data, trailers)),
                }
            }
        }
        panic!("no end in {:?}", String::from_utf8_lossy(input));
    }

    fn decode_whole(input: &[u8]) -> Result<(Vec<u8>, HeaderMap, BytesMut), ChunkedError> {
        let mut decoder = ChunkedDecoder::new(1024);
        let mut buf = BytesMut::from(input);
        let mut data = Vec::new();
        loop {
            match decoder.decode(&mut buf)? {
                Some(Chunk::Data(bytes)) => data.extend_from_slice(&bytes),
                Some(Chunk::End(trailers)) => {
                    assert!(decoder.is_done());
                    assert_eq!(decoder.decode(&mut buf), Ok(None), "nothing after the end");
                    return Ok((data, trailers, buf));
                }
                None => panic!("incomplete"),
            }
        }
    }

    #[test]
    fn chunks_extensions_and_trailers_decode_whole_or_byte_by_byte() {
        let input = b"5;name=value\r\nhello\r\n6 ; x\r\n world\r\nA\r\n0123456789\r\n\
                      0\r\ngrpc-status: 0\r\nx-b: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let (data, trailers, rest) = decode_whole(input).expect("valid");
        assert_eq!(data, b"hello world0123456789");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers.len(), 2);
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n", "the next request stays");
        let body_end = input.len() - rest.len();
        let (data, trailers) = decode_bytewise(&input[..body_end]).expect("valid");
        assert_eq!(data, b"hello world0123456789");
        assert_eq!(trailers.len(), 2);
    }

    #[test]
    fn no_trailers_is_an_empty_map() {
        let (data, trailers, rest) = decode_whole(b"3\r\nabc\r\n0\r\n\r\n").expect("valid");
        assert_eq!(data, b"abc");
        assert!(trailers.is_empty());
        assert!(rest.is_empty());
    }

    #[test]
    fn broken_codings_are_refused() {
        let cases: [(&[u8], ChunkedError); 9] = [
            (b"x\r\n", ChunkedError::InvalidSize),
            (b"\r\n", ChunkedError::InvalidSize),
            (b"-1\r\n", ChunkedError::InvalidSize),
            (b"5\nhello\r\n", ChunkedError::InvalidSize),
            (b"5 x\r\n", ChunkedError::InvalidSize),
            (b"11111111111111111\r\n", ChunkedError::SizeOverflow),
            (b"3\r\nabcX\r\n", ChunkedError::MissingCrlf),
            (b"0\r\nbad header\r\n\r\n", ChunkedError::InvalidTrailers),
            (
                b"1\r\na\r\n0\r\n\x01: x\r\n\r\n",
                ChunkedError::InvalidTrailers,
            ),
        ];
        for (input, expected) in cases {
            let mut decoder = ChunkedDecoder::new(1024);
            let mut buf = BytesMut::from(input);
            let error = loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("{:?} was accepted", String::from_utf8_lossy(input)),
                    Err(error) => break error,
                }
            };
            assert_eq!(error, expected, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn limits_on_extensions_and_trailers() {
        let mut long = b"1;".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_EXTENSIONS + 8));
        let mut decoder = ChunkedDecoder::new(64);
        assert_eq!(
            decoder.decode(&mut BytesMut::from(&long[..])),
            Err(ChunkedError::ExtensionsTooLong)
        );
        let mut trailer = b"0\r\nx-long: ".to_vec();
        trailer.extend(std::iter::repeat_n(b'y', 100));
        let mut decoder = ChunkedDecoder::new(64);
        assert_eq!(
            decoder.decode(&mut BytesMut::from(&trailer[..])),
            Err(ChunkedError::TrailersTooLarge)
        );
    }

    #[test]
    fn the_largest_size_parses_and_one_more_digit_overflows() {
        let mut buf = BytesMut::from(&b"ffffffffffffffff\r\nab"[..]);
        let mut decoder = ChunkedDecoder::new(64);
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Chunk::Data(Bytes::from_static(b"ab"))))
        );
        assert_eq!(decoder.state, State::Data(u64::MAX - 2));
    }

    #[test]
    fn encoding_round_trips_through_the_decoder() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let mut wire = Vec::new();
        for piece in [&b"a"[..], &[b'z'; 300][..]] {
            encode_chunk_head(piece.len(), &mut wire);
            wire.extend_from_slice(piece);
            wire.extend_from_slice(CHUNK_TAIL);
        }
        encode_last_chunk(Some(&trailers), &mut wire);
        assert!(wire.starts_with(b"1\r\na\r\n12c\r\n"));
        let (data, decoded, _) = decode_whole(&wire).expect("valid");
        assert_eq!(data.len(), 301);
        assert_eq!(decoded, trailers);
        let mut last = Vec::new();
        encode_last_chunk(None, &mut last);
        assert_eq!(last, b"0\r\n\r\n");
    }
}
