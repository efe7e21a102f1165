//! Prism's own HTTP/1.1 server codec, for the listeners' HTTP/1.1
//! connections (HTTP/2 stays on hyper, see [`super::server`]). It is small on
//! purpose: one task per connection that parses request heads with
//! `httparse` ([`head`]), polls the request's service future itself, reads a
//! request body only as it is polled ([`body`]), writes the response head and
//! small body frames in one write ([`write`]), and holds no buffer while the
//! connection is idle ([`conn`]).

pub(crate) mod body;
pub(crate) mod chunked;
pub(crate) mod conn;
pub(crate) mod head;
pub(crate) mod write;

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::upgrade::{Upgraded, Upgrading};

/// A connection the codec can serve: it can wait to be readable without a
/// buffer, and read into one.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Ready once a read may find bytes (perhaps spuriously). A transport
    /// that buffers what it decrypts is always ready.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Reads into the spare capacity of `buf` (which has some): 0 at the end.
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>>;
}

impl Transport for TcpStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        // Through `AsyncRead`, not `try_read_buf`: a read that leaves the
        // buffer short tells the reactor the socket is drained, so watching
        // for the client's close while its request is served costs no
        // system call (callgrind: 2,900 instructions a request).
        pin!(self.read_buf(buf)).poll(cx)
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_readable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        let filled = buf.len();
        let spare = buf.capacity() - filled;
        // Zeroed rather than uninitialized: the crate has no unsafe code.
        buf.resize(filled + spare, 0);
        let mut read = ReadBuf::new(&mut buf[filled..]);
        let result = Pin::new(&mut *self).poll_read(cx, &mut read);
        let n = read.filled().len();
        buf.truncate(filled + n);
        ready!(result)?;
        Poll::Ready(Ok(n))
    }
}

/// The client's side of a protocol switch on an HTTP/1.1 connection of this
/// codec, in the request's extensions: resolves to the connection once the
/// `101` is written ([`super::upgrade`] takes it).
#[derive(Clone)]
pub(crate) struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    /// The extension and the sender the connection hands itself over by.
    pub(crate) fn new() -> (oneshot::Sender<Upgraded>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, OnUpgrade(Arc::new(Mutex::new(Some(rx)))))
    }

    /// The upgraded connection to come; `None` if it was taken already.
    pub(crate) fn take(&self) -> Option<Upgrading> {
        let rx = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        Some(Box::pin(async move {
            rx.await
                .map_err(|_| "the connection closed before switching protocols".into())
        }))
    }
}

impl fmt::Debug for OnUpgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnUpgrade")
    }
}

/// An upgraded connection that first yields the bytes read past the `101`'s
/// request head.
#[derive(Debug)]
pub(crate) struct Rewind<I> {
    prefix: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    pub(crate) fn new(prefix: Bytes, io: I) -> Self {
        Self { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
