//! The chunked transfer coding (RFC 9112 §7.1): an incremental decoder that
//! never copies body bytes, and the few encoders a sender needs.

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// The most chunk extension bytes accepted per chunk.
const MAX_EXTENSION_BYTES: usize = 4096;

/// The most trailer fields accepted.
const MAX_TRAILER_FIELDS: usize = 100;

/// Incremental decoder of a body in the chunked transfer coding (RFC 9112 §7.1):
/// chunk sizes in hex, chunk extensions skipped, the last chunk, trailer fields.
#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    state: State,
    /// The chunk size read so far, then what is left of the chunk's data.
    size: u64,
    /// Hex digits of the size line read so far.
    digits: u8,
    /// Extension bytes of the current chunk skipped so far.
    extension: usize,
    max_trailer_bytes: usize,
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

/// Where the decoder is in the coding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The hex digits of a chunk size.
    Size,
    /// Whitespace and extensions after the size, up to the CR.
    Extension,
    /// The LF that ends the size line.
    SizeLf,
    /// Chunk data; `size` bytes are left.
    Data,
    /// The CR after a chunk's data.
    DataCr,
    /// The LF after a chunk's data.
    DataLf,
    /// The trailer section after the last chunk.
    Trailers,
    /// `End` was returned.
    Done,
}

impl ChunkedDecoder {
    /// A decoder whose trailer section may be at most `max_trailer_bytes` long.
    pub(crate) fn new(max_trailer_bytes: usize) -> Self {
        Self {
            state: State::Size,
            size: 0,
            digits: 0,
            extension: 0,
            max_trailer_bytes,
        }
    }

    /// Decodes from the front of `buf`, removing what it consumed. `Ok(None)`: `buf` holds no
    /// complete item yet (everything usable was consumed; read more and call again).
    /// A `Data` may be shorter than its chunk (whatever of it `buf` holds). After `End`, it
    /// consumes nothing more (bytes after the body stay in `buf`, e.g. a pipelined request).
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, ChunkedError> {
        // Bytes of the framing consumed so far by this call, advanced past
        // at once before returning.
        let mut at = 0;
        let result = loop {
            match self.state {
                State::Data => {
                    buf.advance(at);
                    at = 0;
                    if buf.is_empty() {
                        break Ok(None);
                    }
                    let n = usize::try_from(self.size).map_or(buf.len(), |s| s.min(buf.len()));
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    return Ok(Some(Chunk::Data(buf.split_to(n).freeze())));
                }
                State::Trailers => {
                    buf.advance(at);
                    at = 0;
                    break self.trailers(buf);
                }
                State::Done => break Ok(None),
                _ => {}
            }
            let Some(&byte) = buf.get(at) else {
                break Ok(None);
            };
            at += 1;
            self.step(byte)?;
        };
        buf.advance(at);
        result
    }

    /// Whether `End` was returned.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes one byte of a size line or of the CRLF after chunk data.
    fn step(&mut self, byte: u8) -> Result<(), ChunkedError> {
        match self.state {
            State::Size => match byte {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if self.size >> 60 != 0 {
                        return Err(ChunkedError::SizeOverflow);
                    }
                    // A hex digit: `to_digit` cannot fail.
                    let digit = u64::from((byte as char).to_digit(16).unwrap_or(0));
                    self.size = self.size * 16 + digit;
                    self.digits = self.digits.saturating_add(1);
                }
                _ if self.digits == 0 => return Err(ChunkedError::InvalidSize),
                b'\r' => self.state = State::SizeLf,
                b';' | b' ' | b'\t' => self.state = State::Extension,
                _ => return Err(ChunkedError::InvalidSize),
            },
            State::Extension => match byte {
                b'\r' => self.state = State::SizeLf,
                b'\n' => return Err(ChunkedError::InvalidSize),
                _ => {
                    self.extension += 1;
                    if self.extension > MAX_EXTENSION_BYTES {
                        return Err(ChunkedError::ExtensionsTooLong);
                    }
                }
            },
            State::SizeLf => {
                if byte != b'\n' {
                    return Err(ChunkedError::InvalidSize);
                }
                self.digits = 0;
                self.extension = 0;
                self.state = if self.size == 0 {
                    State::Trailers
                } else {
                    State::Data
                };
            }
            State::DataCr if byte == b'\r' => self.state = State::DataLf,
            State::DataLf if byte == b'\n' => self.state = State::Size,
            State::DataCr | State::DataLf => return Err(ChunkedError::MissingCrlf),
            State::Data | State::Trailers | State::Done => {}
        }
        Ok(())
    }

    /// The trailer section, once `buf` holds all of it.
    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, ChunkedError> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
        let (len, fields) = match httparse::parse_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete(done)) => done,
            Ok(httparse::Status::Partial) if buf.len() > self.max_trailer_bytes => {
                return Err(ChunkedError::TrailersTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(ChunkedError::TrailersTooLarge),
            Err(_) => return Err(ChunkedError::InvalidTrailers),
        };
        if len > self.max_trailer_bytes {
            return Err(ChunkedError::TrailersTooLarge);
        }
        let mut trailers = HeaderMap::with_capacity(fields.len());
        for field in fields.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| ChunkedError::InvalidTrailers)?;
            let value =
                HeaderValue::from_bytes(field.value).map_err(|_| ChunkedError::InvalidTrailers)?;
            trailers.append(name, value);
        }
        buf.advance(len);
        self.state = State::Done;
        Ok(Some(Chunk::End(trailers)))
    }
}

/// Appends the head of a chunk of `len` (> 0) bytes, `{len:x}\r\n`, to `dst`.
pub(crate) fn encode_chunk_head(len: usize, dst: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        dst.push(HEX[(len >> (i * 4)) & 0xf]);
    }
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

    /// Decodes `input` fed in pieces of `step` bytes: the data, and the
    /// trailers or the error it ended with.
    fn decode(input: &[u8], step: usize) -> (Vec<u8>, Result<HeaderMap, ChunkedError>) {
        let mut decoder = ChunkedDecoder::new(1024);
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut rest = input;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Chunk::Data(bytes))) => {
                    assert!(!bytes.is_empty());
                    data.extend_from_slice(&bytes);
                }
                Ok(Some(Chunk::End(trailers))) => {
                    assert!(decoder.is_done());
                    return (data, Ok(trailers));
                }
                Ok(None) if rest.is_empty() => return (data, Err(ChunkedError::MissingCrlf)),
                Ok(None) => {
                    let n = step.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
                Err(error) => return (data, Err(error)),
            }
        }
    }

    #[test]
    fn a_body_decodes_the_same_whatever_pieces_it_arrives_in() {
        let input = b"5;name=value\r\nhello\r\nA\r\n, chunked!\r\n0\r\nx-sum: 42\r\n\r\n";
        for step in [1, 2, 3, 7, input.len()] {
            let (data, trailers) = decode(input, step);
            assert_eq!(data, b"hello, chunked!", "step {step}");
            let trailers = trailers.expect("complete");
            assert_eq!(
                trailers.get("x-sum").map(|v| v.as_bytes()),
                Some(&b"42"[..])
            );
        }
    }

    #[test]
    fn the_end_leaves_what_follows_in_the_buffer() {
        let mut decoder = ChunkedDecoder::new(1024);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n"[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Chunk::Data(Bytes::from_static(b"abc"))))
        );
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Chunk::End(HeaderMap::new())))
        );
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn broken_codings_and_limits_are_errors() {
        let cases: [(&[u8], ChunkedError); 7] = [
            (b"x\r\n", ChunkedError::InvalidSize),
            (b"\r\n", ChunkedError::InvalidSize),
            (b"5\n", ChunkedError::InvalidSize),
            (b"3\r\nabcX", ChunkedError::MissingCrlf),
            (b"fffffffffffffffff\r\n", ChunkedError::SizeOverflow),
            (b"0\r\nbad header\r\n\r\n", ChunkedError::InvalidTrailers),
            (b"0\r\nx-long: ", ChunkedError::TrailersTooLarge),
        ];
        for (input, expected) in cases {
            let mut input = input.to_vec();
            if expected == ChunkedError::TrailersTooLarge {
                input.extend_from_slice(&[b'a'; 2048]);
            }
            assert_eq!(decode(&input, 4).1, Err(expected), "{input:?}");
        }
        let mut long = b"1;".to_vec();
        long.extend_from_slice(&[b'e'; MAX_EXTENSION_BYTES + 1]);
        assert_eq!(decode(&long, 64).1, Err(ChunkedError::ExtensionsTooLong));
    }

    #[test]
    fn encoding_round_trips() {
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
        let (data, decoded) = decode(&wire, 5);
        assert_eq!(data.len(), 301);
        assert_eq!(decoded, Ok(trailers));
        let mut empty = Vec::new();
        encode_last_chunk(None, &mut empty);
        assert_eq!(empty, b"0\r\n\r\n");
    }
}
