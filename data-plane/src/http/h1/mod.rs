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

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use super::upgrade::{Upgraded, Upgrading};

/// A connection the codec can serve.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Transport for T {}

/// Bytes one read takes at most through the scratch buffer.
const SCRATCH_BYTES: usize = 16 * 1024;
/// A buffer with at least this much room is read into directly.
const DIRECT_READ_BYTES: usize = 4 * 1024;

thread_local! {
    /// The thread's scratch read buffer, for [`poll_read_into`].
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// Reads what `io` has into `buf`: the number of bytes, `0` at its end.
///
/// A buffer with little room (an idle connection's has none) is not grown
/// before the read, which may find nothing: the bytes land in the thread's
/// scratch buffer and only those that came are copied into `buf`. So a
/// connection waits without a read buffer, and a request or response head
/// allocates its own size instead of a read buffer's. Through `AsyncRead`
/// rather than `try_read`: a short read tells the reactor the socket is
/// drained, so waiting on it afterwards (for the client's close while its
/// request is served) costs no system call.
pub(crate) fn poll_read_into<R>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>>
where
    R: AsyncRead + Unpin + ?Sized,
{
    if buf.capacity() - buf.len() >= DIRECT_READ_BYTES {
        return pin!(io.read_buf(buf)).poll(cx);
    }
    SCRATCH.with_borrow_mut(|scratch| {
        let mut read = ReadBuf::new(scratch);
        ready!(Pin::new(io).poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    })
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

/// An upgraded connection that first yields the bytes read past the `101`
/// (past the request's head on a listener, the response's upstream).
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

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
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
