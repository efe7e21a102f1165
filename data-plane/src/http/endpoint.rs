//! The endpoint stage, innermost: send the request to the picked endpoint
//! through its backend's own pooled [`Client`], and classify what went wrong.
//!
//! Every backend owns one client, built when the backend is compiled and
//! dropped with it: its pool, its connect timeout and its protocol are the
//! backend's alone, and nothing here reads the live runtime.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::uri::{self, PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tower::Service;

use super::backend::Picked;
use super::body::{BodyTooLarge, ReplayBody};
use super::error::{BoxError, ProxyError};
use crate::runtime::tls;
use crate::runtime::{Backend, Route};

/// How a backend's client connects and speaks.
#[derive(Clone, Debug)]
pub(crate) struct Params {
    /// HTTP/2 with prior knowledge (HTTP2 and GRPC backends), else HTTP/1.1.
    pub http2: bool,
    /// TLS to the endpoints after the TCP connect; plaintext when `None`.
    pub tls: Option<tls::UpstreamParams>,
    pub connect_timeout: Duration,
    /// A pooled connection idle this long is closed (`limits.idle_timeout`).
    pub idle_timeout: Duration,
}

/// One backend's pooled upstream client.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    inner: legacy::Client<Connector, ReplayBody>,
    http2: bool,
    #[cfg(test)]
    connect_timeout: Duration,
}

/// Opens a backend's upstream connections: TCP and, for a TLS backend, the
/// TLS handshake, together within the backend's connect timeout.
#[derive(Clone, Debug)]
pub(crate) struct Connector {
    tcp: HttpConnector,
    tls: Option<tls::UpstreamParams>,
    timeout: Duration,
}

/// An upstream connection, plain or TLS.
#[derive(Debug)]
pub(crate) enum Upstream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The endpoint's host is not a valid TLS server name (and the backend's
/// `tls.sni` names none).
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a valid TLS server name; set the backend's tls.sni")]
struct InvalidServerName(String);

/// The upstream connect timed out (the backend's `connect_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("connect timed out")]
struct ConnectTimedOut;

/// The innermost service: forwards a [`Picked`] request with its backend's client.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Forward;

/// Where an upstream error happened: context for the log, wrapped around the
/// [`ProxyError`] that the client's answer is made from.
#[derive(Debug, thiserror::Error)]
#[error("route {}, backend {}, endpoint {}", .route.name, .backend.name, .backend.endpoints[*.endpoint].address)]
struct AtEndpoint {
    route: Arc<Route>,
    backend: Arc<Backend>,
    endpoint: usize,
    #[source]
    error: ProxyError,
}

/// One request in flight to one endpoint: counted in the endpoint's
/// `in_flight` from the moment it is sent until its response body ends or
/// fails, or the request is dropped, whichever comes first.
#[derive(Debug)]
pub(crate) struct InFlight {
    backend: Arc<Backend>,
    endpoint: usize,
}

pin_project! {
    pub(crate) struct ResponseFuture {
        #[pin]
        state: State,
        route: Option<(Arc<Route>, Arc<Backend>)>,
        endpoint: usize,
        in_flight: Option<InFlight>,
    }
}

pin_project! {
    /// An upstream response body that keeps its request counted in flight
    /// until it ends.
    pub(crate) struct ResponseBody {
        #[pin]
        body: Incoming,
        in_flight: Option<InFlight>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sent { #[pin] inner: legacy::ResponseFuture },
        Failed { error: Option<ProxyError> },
    }
}

impl Client {
    pub(crate) fn new(params: &Params) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        // The timeout is the connector's own, below, so it can be told apart.
        tcp.set_connect_timeout(None);
        let connector = Connector {
            tcp,
            tls: params.tls.clone(),
            timeout: params.connect_timeout,
        };
        let inner = legacy::Client::builder(TokioExecutor::new())
            .http2_only(params.http2)
            .pool_idle_timeout(params.idle_timeout)
            // The timer lets the pool close idle connections on time, not
            // only when it next looks at them.
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            inner,
            http2: params.http2,
            #[cfg(test)]
            connect_timeout: params.connect_timeout,
        }
    }

    pub(crate) fn is_http2(&self) -> bool {
        self.http2
    }

    #[cfg(test)]
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
}

impl Service<Uri> for Connector {
    type Response = TokioIo<Upstream>;
    type Error = BoxError;
    // Boxed: this runs once per new connection, not per request.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri.host().unwrap_or_default().to_string();
        let connecting = self.tcp.call(uri);
        let tls = self.tls.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let connect = async move {
                let tcp = connecting.await?.into_inner();
                let Some(tls) = tls else {
                    return Ok(Upstream::Plain(tcp));
                };
                let server_name = match tls.server_name {
                    Some(name) => name,
                    None => server_name_of(&host)?,
                };
                let stream = TlsConnector::from(tls.config)
                    .connect(server_name, tcp)
                    .await?;
                Ok::<_, BoxError>(Upstream::Tls(Box::new(stream)))
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(result) => result.map(TokioIo::new),
                Err(_) => Err(ConnectTimedOut.into()),
            }
        })
    }
}

/// The server name of an endpoint host: a DNS name or an IP address (an IPv6
/// one without its brackets).
fn server_name_of(host: &str) -> Result<ServerName<'static>, BoxError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string()).map_err(|_| InvalidServerName(host.to_string()).into())
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        match self {
            Upstream::Plain(tcp) => tcp.connected(),
            Upstream::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                let connected = tcp.connected();
                if session.alpn_protocol() == Some(b"h2") {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Plain(s) => s.is_write_vectored(),
            Upstream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl InFlight {
    fn new(backend: Arc<Backend>, endpoint: usize) -> Self {
        backend.endpoints[endpoint]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Self { backend, endpoint }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.endpoints[self.endpoint]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Service<Picked> for Forward {
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each backend's pool takes any number of requests; there is nothing
        // to wait for before knowing which backend a request goes to.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, picked: Picked) -> ResponseFuture {
        let Picked {
            route,
            backend,
            endpoint,
            mut request,
        } = picked;
        let mut parts = uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        // `endpoint` came from the backend's own balancer: it is in range.
        parts.authority = Some(backend.endpoints[endpoint].address.clone());
        parts.path_and_query = Some(
            request
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        let state = match Uri::from_parts(parts) {
            Ok(uri) => {
                *request.uri_mut() = uri;
                State::Sent {
                    inner: send(&backend.client, request),
                }
            }
            Err(error) => State::Failed {
                error: Some(ProxyError::Upstream(error.into())),
            },
        };
        ResponseFuture {
            state,
            in_flight: Some(InFlight::new(Arc::clone(&backend), endpoint)),
            route: Some((route, backend)),
            endpoint,
        }
    }
}

/// Sends `request`, already addressed to an endpoint, with `client`.
fn send(client: &Client, mut request: Request<ReplayBody>) -> legacy::ResponseFuture {
    if client.is_http2() {
        *request.version_mut() = Version::HTTP_2;
    } else {
        *request.version_mut() = Version::HTTP_11;
        // `te: trailers` only means something to HTTP/2 (gRPC) upstreams.
        request.headers_mut().remove(header::TE);
    }
    client.inner.request(request)
}

impl Future for ResponseFuture {
    type Output = Result<Response<ResponseBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let error = match this.state.project() {
            StateProj::Sent { inner } => match ready!(inner.poll(cx)) {
                Ok(response) => {
                    let in_flight = this.in_flight.take();
                    return Poll::Ready(Ok(response.map(|body| ResponseBody { body, in_flight })));
                }
                Err(error) => classify(error),
            },
            StateProj::Failed { error } => error.take().unwrap_or(ProxyError::Internal),
        };
        Poll::Ready(Err(match this.route.take() {
            Some((route, backend)) => AtEndpoint {
                route,
                backend,
                endpoint: *this.endpoint,
                error,
            }
            .into(),
            None => error.into(),
        }))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let mut body = this.body;
        let frame = ready!(body.as_mut().poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) || body.is_end_stream() {
            // Ended or failed: the endpoint is done with this request.
            this.in_flight.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What an upstream client error means, found by walking its cause chain.
fn classify(error: legacy::Error) -> ProxyError {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(&error);
    while let Some(e) = cause {
        if e.is::<ConnectTimedOut>() {
            return ProxyError::ConnectTimeout;
        }
        if e.is::<BodyTooLarge>() {
            return ProxyError::BodyTooLarge;
        }
        cause = e.source();
    }
    if error.is_connect() {
        ProxyError::Connect(error.into())
    } else {
        ProxyError::Upstream(error.into())
    }
}

#[cfg(test)]
mod tests {
    use prism_proto::Snapshot;

    use super::*;
    use crate::http::error::Chain;
    use crate::runtime::Runtime;
    use crate::runtime::tests::{backend, compile, namespace, prefix, route};

    #[tokio::test]
    async fn an_upstream_error_says_where_it_happened_and_keeps_its_cause() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dead = listener.local_addr().expect("addr");
        drop(listener);
        let snapshot = Snapshot::from_resources(
            1,
            [
                namespace("demo", &["demo.local"]),
                backend("demo/web", &[&dead.to_string()]),
                route("demo/root", "", prefix("/"), "web"),
            ],
        );
        let runtime = compile(&snapshot, &Runtime::unconfigured());
        let route =
            Arc::clone(crate::runtime::tests::lookup(&runtime, "demo.local", "/").expect("route"));
        let request = Request::get("/x")
            .body(ReplayBody::empty())
            .expect("request");
        let backend = Arc::clone(route.backend());
        let error = Forward
            .call(Picked {
                route,
                backend,
                endpoint: 0,
                request,
            })
            .await
            .map(|_| ())
            .expect_err("nothing listens");
        assert_eq!(ProxyError::classify(&*error).kind(), "connect");
        let chain = Chain(&*error).to_string();
        let expected =
            format!("route demo/root, backend demo/web, endpoint {dead}: upstream connect error: ");
        assert!(chain.starts_with(&expected), "{chain}");
        assert!(chain.len() > expected.len(), "the cause is kept: {chain}");
    }
}
