//! The upgrade stage: HTTP/1.1 `Upgrade` (WebSocket and the like) passed
//! through. [`super::normalize`] keeps `Upgrade` and `Connection: upgrade` on
//! a request that asks for a protocol switch; this stage takes the client's
//! side of the switch out of the request before it goes upstream, and when
//! the upstream answers `101 Switching Protocols` it joins the two upgraded
//! streams in a task of their own, which ends when either side closes or
//! fails.
//!
//! As in Envoy, the route timeout does not apply once the protocol has
//! switched (the `101` is the whole HTTP response); the route's
//! `idle_timeout` does: an upgraded stream with no bytes either way for that
//! long is closed. An HTTP/2 backend cannot take an HTTP/1.1 upgrade, so
//! toward one the request goes without it and the upstream's answer is what
//! the client gets.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::debug;

use super::endpoint::h1;
use super::error::{BoxError, Chain};
use super::route::Routed;

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UpgradeLayer;

#[derive(Clone, Debug)]
pub(crate) struct Upgrade<S> {
    inner: S,
}

pin_project! {
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Only a request that asked for a protocol switch has one.
        upgrade: Option<Pending>,
    }
}

/// The client's side of a requested protocol switch, waiting for the
/// upstream's answer.
struct Pending {
    client: Upgrading,
    idle: Option<Duration>,
}

/// A connection switching protocols: resolves to its upgraded stream once
/// the `101` is through (with bytes read past it first).
pub(crate) type Upgrading = Pin<Box<dyn Future<Output = Result<Upgraded, BoxError>> + Send>>;

/// An upgraded stream, whichever HTTP/1.1 implementation it came from.
pub(crate) type Upgraded = Box<dyn Io>;

/// The upstream connection of a `101` was taken already.
#[derive(Debug, thiserror::Error)]
#[error("the upgraded upstream connection was taken already")]
struct UpgradeTaken;

/// What an upgraded stream is.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An upgraded stream that notes when it last read a byte, for the idle
/// timeout.
struct Watched<'a, T> {
    io: T,
    start: Instant,
    /// Nanoseconds from `start` to the last read that moved bytes.
    last: &'a AtomicU64,
}

impl<S> Layer<S> for UpgradeLayer {
    type Service = Upgrade<S>;

    fn layer(&self, inner: S) -> Upgrade<S> {
        Upgrade { inner }
    }
}

impl<S, B> Service<Routed> for Upgrade<S>
where
    S: Service<Routed, Response = Response<B>, Error = BoxError>,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut routed: Routed) -> Self::Future {
        // Normalize left `Upgrade` on the request only when it asks to switch.
        let upgrade = if !routed.request.headers().contains_key(header::UPGRADE) {
            None
        } else if routed.backend.client.is_http2() {
            let headers = routed.request.headers_mut();
            headers.remove(header::UPGRADE);
            headers.remove(header::CONNECTION);
            None
        } else {
            Some(Pending {
                client: client_upgrade(&mut routed.request),
                idle: routed.route.timeout.idle,
            })
        };
        ResponseFuture {
            inner: self.inner.call(routed),
            upgrade,
        }
    }
}

impl<F, B> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(Pending { client, idle }) = this.upgrade.take()
        {
            let upstream = upstream_upgrade(&mut response);
            tokio::spawn(join(client, upstream, idle));
        }
        Poll::Ready(Ok(response))
    }
}

/// The client's side of the switch `request` asks for: Prism's HTTP/1.1
/// codec's ([`super::h1::OnUpgrade`]) when the request came through it, else
/// hyper's.
fn client_upgrade<B>(request: &mut Request<B>) -> Upgrading {
    if let Some(upgrading) = request
        .extensions_mut()
        .remove::<super::h1::OnUpgrade>()
        .and_then(|on| on.take())
    {
        return upgrading;
    }
    let on = hyper::upgrade::on(request);
    Box::pin(async move { Ok(Box::new(TokioIo::new(on.await?)) as Upgraded) })
}

/// The upstream's side of the switch its `101` answers: the connection
/// Prism's HTTP/1.1 client left in the response, else hyper's.
fn upstream_upgrade<B>(response: &mut Response<B>) -> Upgrading {
    if let Some(on) = response.extensions_mut().remove::<h1::OnUpgrade>() {
        let upgraded = on.take().ok_or(UpgradeTaken);
        return Box::pin(async move { Ok(Box::new(upgraded?) as Upgraded) });
    }
    let on = hyper::upgrade::on(response);
    Box::pin(async move { Ok(Box::new(TokioIo::new(on.await?)) as Upgraded) })
}

/// Copies bytes both ways between the client and the upstream once both
/// have switched protocols, until either side closes or fails, or nothing has
/// moved for `idle`.
async fn join(client: Upgrading, upstream: Upgrading, idle: Option<Duration>) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(error) => {
            debug!(error = %Chain(&*error), "A protocol switch did not complete.");
            return;
        }
    };
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let mut client = Watched {
        io: client,
        start,
        last: &last,
    };
    let mut upstream = Watched {
        io: upstream,
        start,
        last: &last,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    let result = match idle {
        None => copy.await,
        Some(idle) => tokio::select! {
            result = copy => result,
            () = idle_for(idle, start, &last) => {
                debug!("Closing an upgraded connection that was idle past the route's idle timeout.");
                return;
            }
        },
    };
    match result {
        Ok((up, down)) => debug!(up, down, "An upgraded connection closed."),
        Err(error) => debug!(%error, "An upgraded connection failed."),
    }
}

/// Resolves once no read has moved a byte for `idle`.
async fn idle_for(idle: Duration, start: Instant, last: &AtomicU64) {
    loop {
        let at = start + Duration::from_nanos(last.load(Ordering::Relaxed)) + idle;
        if at <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(at).await;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            let since = this.start.elapsed().as_nanos();
            this.last
                .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
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
