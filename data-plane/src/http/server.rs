//! The accept loop shared by the proxy, TLS and admin listeners: HTTP/1.1 and
//! h2c on one port (told apart by the HTTP/2 preface), or the same after a
//! TLS handshake ([`super::tls`], by ALPN); HTTP/1.1 is served by Prism's own
//! codec ([`super::h1`]), HTTP/2 by hyper; with the server's wire limits
//! ([`crate::Limits`]), the client address put into every request's
//! extensions, an idle timeout per connection, and a bounded drain on
//! shutdown: stop accepting, `Connection: close` on HTTP/1.1 and GOAWAY on
//! HTTP/2, let in-flight requests finish until the drain timeout, then close.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::Service;
use tracing::{debug, warn};

use super::body::RequestBody;
use super::error::{BoxError, Chain};
use super::h1;
use super::idle::{Active, Activity};
use super::inflight;
use super::tls::{self, Tls};
use crate::runtime::Runtime;
use crate::{Limits, MIN_MAX_REQUEST_HEADER_BYTES};

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
/// of one HTTP/2 connection, and counts the request in the connection's
/// [`Activity`] until its response ends. (The HTTP/1.1 codec puts them in
/// itself, and keeps its own timer.)
#[derive(Clone, Debug)]
struct SetClientAddr<S> {
    client: ClientAddr,
    tls: Option<Tls>,
    activity: Arc<Activity>,
    inner: S,
}

/// A connection counted open in a gauge until it is dropped.
struct Open(Gauge);

/// Serves `service` on `listener` (over TLS with `tls`, the runtime whose
/// namespaces' certificates the handshakes use) until `shutdown` turns true,
/// then stops accepting, lets open connections finish (bounded) and returns.
pub(crate) async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<Arc<ArcSwap<Runtime>>>,
    params: Params,
    shutdown: watch::Receiver<bool>,
    service: S,
) where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    serve_counted(listener, tls, params, shutdown, service, None).await;
}

/// [`serve`], counting the open connections in `open`, if given.
pub(crate) async fn serve_counted<S, B>(
    listener: TcpListener,
    tls: Option<Arc<ArcSwap<Runtime>>>,
    params: Params,
    mut shutdown: watch::Receiver<bool>,
    service: S,
    open: Option<Gauge>,
) where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
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
                    let counted = open.as_ref().map(Open::new);
                    let served = connection(
                        stream,
                        remote,
                        tls.clone(),
                        Arc::clone(&builder),
                        params,
                        shutdown.clone(),
                        service.clone(),
                    );
                    connections.spawn(async move {
                        // Counted until the connection ends or is aborted.
                        let _counted = counted;
                        served.await;
                    });
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

impl Open {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The HTTP/2 connection builder with `limits` applied.
fn builder(limits: &Limits) -> http2::Builder<TokioExecutor> {
    let header_bytes = limits
        .max_request_header_bytes
        .max(MIN_MAX_REQUEST_HEADER_BYTES);
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
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
    tls: Option<Arc<ArcSwap<Runtime>>>,
    builder: Arc<http2::Builder<TokioExecutor>>,
    params: Params,
    mut shutdown: watch::Receiver<bool>,
    service: S,
) where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    if let Some(runtime) = tls {
        // Boxed, as HTTP/2 below: their state is large, and would otherwise
        // be part of every plain HTTP/1.1 connection's task.
        Box::pin(tls_connection(
            stream, remote, runtime, builder, params, shutdown, service,
        ))
        .await;
        return;
    }
    // A client that sends nothing at all is bound by the header read
    // timeout too, from the accept.
    let deadline = Instant::now() + params.limits.header_read_timeout;
    let http2 = tokio::select! {
        sniffed = tokio::time::timeout_at(deadline, is_http2(&stream)) => match sniffed {
            Ok(Ok(http2)) => http2,
            Ok(Err(_)) => return,
            Err(_) => {
                debug!(%remote, "Closing a connection that sent nothing.");
                return;
            }
        },
        () = stopped(&mut shutdown) => return,
    };
    if http2 {
        Box::pin(serve_http2(
            stream, remote, None, &builder, params, shutdown, service,
        ))
        .await;
    } else {
        h1::conn::serve(stream, h1_settings(remote, None, params), shutdown, service).await;
    }
}

/// The HTTP/1.1 codec's settings for a connection from `remote`.
fn h1_settings(remote: SocketAddr, tls: Option<Tls>, params: Params) -> h1::conn::Settings {
    h1::conn::Settings {
        client: ClientAddr(remote),
        tls,
        limits: params.limits,
    }
}

/// Serves a connection over TLS: HTTP/2 when ALPN says so, else HTTP/1.1.
async fn tls_connection<S, B>(
    stream: TcpStream,
    remote: SocketAddr,
    runtime: Arc<ArcSwap<Runtime>>,
    builder: Arc<http2::Builder<TokioExecutor>>,
    params: Params,
    mut shutdown: watch::Receiver<bool>,
    service: S,
) where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (stream, tls) = tokio::select! {
        accepted = tls::handshake(&runtime, stream, params.limits.header_read_timeout) => {
            match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(error = %Chain(&error), %remote, "Closing a TLS connection.");
                    return;
                }
            }
        }
        () = stopped(&mut shutdown) => return,
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        serve_http2(
            stream,
            remote,
            Some(tls),
            &builder,
            params,
            shutdown,
            service,
        )
        .await;
    } else {
        h1::conn::serve(
            stream,
            h1_settings(remote, Some(tls), params),
            shutdown,
            service,
        )
        .await;
    }
}

/// Whether the client starts with the HTTP/2 preface: peeks at as many of
/// its first bytes as it takes to tell.
async fn is_http2(stream: &TcpStream) -> io::Result<bool> {
    let mut first = [0u8; PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if first[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // Only a part of the preface yet. A peek returns at once while
        // bytes wait unread, so look again a little later (rare: clients
        // send the preface in one segment).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves one accepted HTTP/2 connection, plain or TLS (`tls`, with the
/// client's certificate if it sent one), until it
/// ends or, after shutdown, has finished its in-flight requests.
async fn serve_http2<I, S, B>(
    io: I,
    remote: SocketAddr,
    tls: Option<Tls>,
    builder: &http2::Builder<TokioExecutor>,
    params: Params,
    mut shutdown: watch::Receiver<bool>,
    service: S,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
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
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            // The connection first: the other two rarely fire, and a poll of
            // each is wasted work on every wake-up of a busy connection.
            biased;
            result = conn.as_mut() => {
                if let Err(error) = result {
                    debug!(error = %Chain(&error), %remote, "Connection ended with an error.");
                }
                break;
            }
            () = stopped(&mut shutdown), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            () = activity.idle(params.limits.idle_timeout, params.limits.header_read_timeout), if !draining => {
                debug!(%remote, "Closing an idle connection.");
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

impl<S, ResB> Service<Request<Incoming>> for SetClientAddr<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResB>>,
{
    type Response = Response<inflight::Body<ResB, Active>>;
    type Error = S::Error;
    type Future = inflight::ResponseFuture<S::Future, Active>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let mut request = request.map(RequestBody::Http2);
        request.extensions_mut().insert(self.client);
        if let Some(tls) = &self.tls {
            request.extensions_mut().insert(tls.clone());
        }
        let active = self.activity.start(request.version());
        inflight::ResponseFuture::new(self.inner.call(request), active)
    }
}
