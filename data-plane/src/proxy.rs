//! The proxy listener: match each request against the runtime, pick an
//! endpoint, forward through the shared pooled upstream client and stream the
//! response back. Every failure becomes a response in [`ProxyError::into_response`].

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::debug;

use crate::runtime::Runtime;
use crate::server::{self, Body, full};

type BoxError = Box<dyn StdError + Send + Sync>;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const VIA: HeaderValue = HeaderValue::from_static("1.1 prism");

/// Why a request could not be forwarded. Each variant maps to one status and
/// one short body; nothing internal reaches the client.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("no configuration yet")]
    NotConfigured,
    #[error("no route for host {host} path {path}")]
    NoRoute { host: String, path: String },
    #[error("backend {0} has no endpoints")]
    NoEndpoints(String),
    #[error("upstream connect error")]
    Connect(#[source] BoxError),
    #[error("upstream connect timeout")]
    ConnectTimeout,
    #[error("upstream request timeout")]
    Timeout,
    #[error("upstream request failed")]
    Upstream(#[source] BoxError),
    #[error("cannot build the upstream request")]
    Internal(#[from] http::Error),
}

/// The upstream connect timed out (the backend's `connect_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("connect timed out")]
struct ConnectTimedOut;

/// Opens upstream connections with the connect timeout of the backend that
/// owns the endpoint, read from the current runtime.
#[derive(Clone)]
pub(crate) struct Connector {
    http: HttpConnector,
    runtime: Arc<ArcSwap<Runtime>>,
}

/// The shared pooled upstream clients: one for HTTP/1.1 backends and one for
/// HTTP/2 (prior knowledge) backends such as gRPC, over one connector.
#[derive(Clone)]
pub(crate) struct Upstream {
    http1: Client<Connector, Incoming>,
    http2: Client<Connector, Incoming>,
}

impl ProxyError {
    /// A static name for logs and metric labels.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ProxyError::NotConfigured => "not_configured",
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::NoEndpoints(_) => "no_endpoints",
            ProxyError::Connect(_) => "connect",
            ProxyError::ConnectTimeout => "connect_timeout",
            ProxyError::Timeout => "timeout",
            ProxyError::Upstream(_) => "upstream",
            ProxyError::Internal(_) => "internal",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ProxyError::NotConfigured | ProxyError::NoEndpoints(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::Connect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout | ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The one place errors become responses.
    pub(crate) fn into_response(self) -> Response<Body> {
        let body = match &self {
            ProxyError::NoEndpoints(_) => "no healthy upstream".to_string(),
            ProxyError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        };
        let mut response = Response::new(full(format!("{body}\n")));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::VIA, VIA);
        response
    }

    /// Classifies an upstream client error by walking its cause chain.
    fn from_client(error: hyper_util::client::legacy::Error) -> ProxyError {
        let mut cause: Option<&(dyn StdError + 'static)> = Some(&error);
        while let Some(e) = cause {
            if e.is::<ConnectTimedOut>() {
                return ProxyError::ConnectTimeout;
            }
            cause = e.source();
        }
        if error.is_connect() {
            ProxyError::Connect(error.into())
        } else {
            ProxyError::Upstream(error.into())
        }
    }
}

impl Connector {
    fn new(runtime: Arc<ArcSwap<Runtime>>) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        // The timeout is applied per endpoint in `call`.
        http.set_connect_timeout(None);
        Self { http, runtime }
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self
            .runtime
            .load()
            .connect_timeout(uri.authority().map_or("", |a| a.as_str()));
        let connecting = self.http.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(ConnectTimedOut.into()),
            }
        })
    }
}

impl Upstream {
    /// The shared clients, reading connect timeouts from `runtime`.
    pub(crate) fn new(runtime: Arc<ArcSwap<Runtime>>) -> Self {
        let connector = Connector::new(runtime);
        let http1 = Client::builder(TokioExecutor::new()).build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Self { http1, http2 }
    }
}

/// Serves the proxy on `listener` until `shutdown` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    runtime: Arc<ArcSwap<Runtime>>,
    shutdown: watch::Receiver<bool>,
) {
    let upstream = Upstream::new(Arc::clone(&runtime));
    server::serve(listener, shutdown, move |request, remote| {
        let view = runtime.load_full();
        let upstream = upstream.clone();
        async move {
            match forward(&upstream, &view, remote, request).await {
                Ok(response) => response,
                Err(error) => {
                    debug!(%error, kind = error.kind(), %remote, "Request failed.");
                    error.into_response()
                }
            }
        }
    })
    .await;
}

/// Forwards one request using one runtime view from start to end.
async fn forward(
    upstream: &Upstream,
    runtime: &Runtime,
    remote: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    if !runtime.is_configured() {
        return Err(ProxyError::NotConfigured);
    }
    let host = request_host(&request);
    let target = runtime
        .route(&host, request.uri().path())
        .ok_or_else(|| ProxyError::NoRoute {
            host: host.clone(),
            path: request.uri().path().to_string(),
        })?;
    let backend = &target.backend;
    let endpoint = backend
        .pick()
        .ok_or_else(|| ProxyError::NoEndpoints(backend.name.clone()))?;

    let path_and_query = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // HTTP/2 clients send `:authority`, not Host; keep what the client asked
    // for as the upstream Host rather than the endpoint address.
    if !request.headers().contains_key(header::HOST)
        && let Some(authority) = request.uri().authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        request.headers_mut().insert(header::HOST, value);
    }
    *request.uri_mut() = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(endpoint.clone())
        .path_and_query(path_and_query)
        .build()?;
    let headers = request.headers_mut();
    strip_hop_by_hop(headers, backend.is_http2());
    append_forwarded_for(headers, remote);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));

    let client = if backend.is_http2() {
        *request.version_mut() = Version::HTTP_2;
        &upstream.http2
    } else {
        *request.version_mut() = Version::HTTP_11;
        &upstream.http1
    };
    // The route timeout bounds the wait for the response head; the body then
    // streams for as long as the upstream sends it.
    let response = tokio::time::timeout(target.timeout, client.request(request))
        .await
        .map_err(|_| ProxyError::Timeout)?
        .map_err(ProxyError::from_client)?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    parts.headers.append(header::VIA, VIA);
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// The host a request is for: `:authority` (HTTP/2, or an absolute-form
/// HTTP/1 target), else the Host header.
fn request_host<B>(request: &Request<B>) -> String {
    if let Some(authority) = request.uri().authority() {
        return authority.as_str().to_string();
    }
    request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Removes hop-by-hop headers and those the Connection header names. `te:
/// trailers` survives toward HTTP/2 upstreams, where gRPC requires it.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let te_trailers = keep_te_trailers
        && headers
            .get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, remote: SocketAddr) {
    let ip = remote.ip().to_string();
    let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {ip}"),
        _ => ip,
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

#[cfg(test)]
mod tests;
