//! The accept loop shared by the proxy, TLS and admin listeners: HTTP/1.1 and
//! h2c on one port (hyper-util's auto builder), or the same after a TLS
//! handshake ([`super::tls`]), with the server's wire limits
//! ([`crate::Limits`]), the client address put into every request's
//! extensions, an idle timeout per connection, and a bounded drain on
//! shutdown: stop accepting, `Connection: close` on HTTP/1.1 and GOAWAY on
//! HTTP/2, let in-flight requests finish until the drain timeout, then close.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Body;
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::Service;
use tracing::{debug, warn};

use super::error::{BoxError, Chain};
use super::idle::{Active, Activity};
use super::inflight;
use super::tls::{self, Tls};
use crate::{DEFAULT_MAX_REQUEST_HEADERS, Limits, MIN_MAX_REQUEST_HEADER_BYTES};

/// HTTP/2 rapid-reset defence (CVE-2023-44487): streams a client may open and
/// reset before the server has accepted them, before GOAWAY. h2's default.
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// HTTP/2: streams the server may reset for a client's protocol errors
/// before GOAWAY (RUSTSEC-2024-0003). hyper's default.
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// The server's settings, from the proxy's bootstrap [`crate::Config`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Params {
    /// Wire limits, timeouts and the drain.
    pub limits: Limits,
}

/// The address of the client that opened the connection, in every request's
/// extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClientAddr(pub SocketAddr);

/// Puts [`ClientAddr`] (and [`Tls`] on a TLS connection) into each request
/// of one connection, and counts the request in the connection's
/// [`Activity`] until its response ends.
#[derive(Clone, Debug)]
struct SetClientAddr<S> {
    client: ClientAddr,
    tls: bool,
    activity: Arc<Activity>,
    inner: S,
}

/// Serves `service` on `listener` (over TLS with `tls`) until `shutdown`
/// turns true, then stops accepting, lets open connections finish (bounded)
/// and returns.
pub(crate) async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    params: Params,
    mut shutdown: watch::Receiver<bool>,
    service: S,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builder = Arc::new(builder(&params.limits));
    let drain_timeout = params.limits.drain_timeout;
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    if let Err(error) = stream.set_nodelay(true) {
                        debug!(%error, "Failed to set TCP_NODELAY.");
                    }
                    connections.spawn(connection(
                        stream,
                        remote,
                        tls.clone(),
                        Arc::clone(&builder),
                        params,
                        shutdown.clone(),
                        service.clone(),
                    ));
                }
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    warn!(%error, "Failed to accept a connection.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(drain_timeout, drain).await.is_err() {
        debug!("Connections still open after the drain timeout; closing them.");
        connections.abort_all();
    }
}

/// The connection builder with `limits` applied.
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let header_bytes = limits
        .max_request_header_bytes
        .max(MIN_MAX_REQUEST_HEADER_BYTES);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The header read timeout is the connection's own, in
        // [`Activity::idle`]: hyper's arms a new timer for every request.
        .header_read_timeout(None)
        // Request line and headers beyond the read buffer: hyper answers 431
        // and closes. (hyper panics below its minimum, hence the max above.)
        .max_buf_size(usize::try_from(header_bytes).unwrap_or(usize::MAX));
    // More headers: 431 and closed too. hyper's own limit is the default of
    // 100; setting it, even to 100, makes hyper fill a 100-slot array for
    // every request head it parses, so it is only set when it differs.
    if limits.max_request_headers != DEFAULT_MAX_REQUEST_HEADERS {
        builder
            .http1()
            .max_headers(usize::try_from(limits.max_request_headers).unwrap_or(usize::MAX));
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        // A larger header list gets 431 on its stream; CONTINUATION frames
        // are bounded by it too (h2 ≥ 0.4.4).
        .max_header_list_size(header_bytes)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS);
    builder
}

/// Resolves once shutdown is signalled (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is dropped: nobody can keep us running.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[allow(clippy::too_many_arguments)]
async fn connection<S, B>(
    stream: TcpStream,
    remote: SocketAddr,
    tls: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    params: Params,
    mut shutdown: watch::Receiver<bool>,
    service: S,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    if let Some(acceptor) = tls {
        let stream = tokio::select! {
            accepted = tls::handshake(&acceptor, stream, params.limits.header_read_timeout) => {
                match accepted {
                    Ok(stream) => stream,
                    Err(error) => {
                        debug!(error = %Chain(&error), %remote, "Closing a TLS connection.");
                        return;
                    }
                }
            }
            () = stopped(&mut shutdown) => return,
        };
        let io = TokioIo::new(stream);
        serve_connection(io, remote, true, &builder, params, shutdown, service).await;
        return;
    }
    // hyper's header read timeout starts once the connection is known to be
    // HTTP/1; a client that sends nothing at all never gets that far, so the
    // first byte gets the same bound.
    // (`readable()` may wake spuriously; a peek really waits for a byte.)
    let mut first = [0u8; 1];
    tokio::select! {
        peeked = tokio::time::timeout(params.limits.header_read_timeout, stream.peek(&mut first)) => {
            if peeked.is_err() {
                debug!(%remote, "Closing a connection that sent nothing.");
                return;
            }
        }
        () = stopped(&mut shutdown) => return,
    }
    let io = TokioIo::new(stream);
    serve_connection(io, remote, false, &builder, params, shutdown, service).await;
}

/// Serves one accepted connection, plain or TLS (`tls`), until it ends or,
/// after shutdown, has finished its in-flight requests.
async fn serve_connection<I, S, B>(
    io: I,
    remote: SocketAddr,
    tls: bool,
    builder: &auto::Builder<TokioExecutor>,
    params: Params,
    mut shutdown: watch::Receiver<bool>,
    service: S,
) where
    I: Read + Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Activity::new();
    let service = SetClientAddr {
        client: ClientAddr(remote),
        tls,
        activity: Arc::clone(&activity),
        inner: service,
    };
    // With upgrades: a `101` hands the connection to [`super::upgrade`].
    let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            // The connection first: the other two rarely fire, and a poll of
            // each is wasted work on every wake-up of a busy connection.
            biased;
            result = conn.as_mut() => {
                if let Err(error) = result {
                    debug!(error = %Chain(&*error), %remote, "Connection ended with an error.");
                }
                break;
            }
            () = stopped(&mut shutdown), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            () = activity.idle(params.limits.idle_timeout, params.limits.header_read_timeout), if !draining => {
                if activity.is_http2() {
                    debug!(%remote, "Closing an idle connection.");
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                } else {
                    // No request in flight: idle, or a request head not
                    // complete in time, which hyper would go on reading
                    // after a graceful shutdown. Either way, close now.
                    debug!(%remote, "Closing an idle HTTP/1 connection or one slow to send its headers.");
                    break;
                }
            }
        }
    }
}

impl<S, B, ResB> Service<Request<B>> for SetClientAddr<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
{
    type Response = Response<inflight::Body<ResB, Active>>;
    type Error = S::Error;
    type Future = inflight::ResponseFuture<S::Future, Active>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.client);
        if self.tls {
            request.extensions_mut().insert(Tls);
        }
        let active = self.activity.start(request.version());
        inflight::ResponseFuture::new(self.inner.call(request), active)
    }
}
