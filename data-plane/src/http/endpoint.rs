//! The endpoint stage, innermost: send the request to the picked endpoint
//! through its backend's own [`Client`], and classify what went wrong.
//!
//! Every backend owns one client, built when the backend is compiled and
//! dropped with it: its pool ([`pool`]), its limits, its connect timeout and
//! its protocol are the backend's alone, and nothing here reads the live
//! runtime. A backend removed from policy drains: its requests in flight
//! keep it alive until their responses end, then its connections close.

mod connect;
pub(crate) mod h1;
pub(crate) mod pool;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tower::Service;

use self::connect::Connector;
use self::pool::{Lease, Limits, Pool};
use super::backend::Picked;
use super::body::ReplayBody;
use super::error::{BoxError, ProxyError};
use crate::access_log::UpstreamLog;
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
    /// `Backend.limits`, idle timeout included.
    pub limits: Limits,
}

/// One backend's upstream client: its pool of connections to its endpoints.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    pool: Arc<Pool>,
}

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
/// `in_flight` and under its backend's `max_requests` from the moment it is
/// sent until its response body ends or fails, or the request is dropped,
/// whichever comes first.
#[derive(Debug)]
pub(crate) struct InFlight {
    backend: Arc<Backend>,
    endpoint: usize,
}

/// The endpoint stage's future. Boxed: the send futures cannot be named,
/// and one allocation per request is what the pooled client it replaces made.
pub(crate) type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, BoxError>> + Send>>;

/// An upstream response body that keeps its request counted in flight
/// until it ends, and then gives its connection back to the pool.
pub(crate) struct ResponseBody {
    body: Upstream,
    in_flight: Option<InFlight>,
}

/// A response body from either client.
pub(crate) enum Upstream {
    /// Prism's HTTP/1.1 client: the body holds its connection and gives it
    /// back once it has ended on a reusable one.
    Http1(h1::Body),
    /// hyper's HTTP/2 client, and the request's share of its connection.
    Http2 {
        body: Incoming,
        lease: Option<Lease>,
    },
}

impl Client {
    /// The client for a backend with `endpoints`, in its order.
    pub(crate) fn new(
        params: &Params,
        endpoints: impl IntoIterator<Item = http::uri::Authority>,
    ) -> Self {
        let connector = Connector::new(params.tls.clone(), params.connect_timeout);
        let pool = Pool::new(
            params.http2,
            params.tls.is_some(),
            connector,
            params.limits,
            endpoints,
        );
        Self {
            pool: Arc::new(pool),
        }
    }

    pub(crate) fn is_http2(&self) -> bool {
        self.pool.is_http2()
    }

    #[cfg(test)]
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.pool.connector().timeout()
    }

    #[cfg(test)]
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }
}

impl InFlight {
    /// Counts a request in, unless its backend is at `max_requests`.
    fn admit(backend: Arc<Backend>, endpoint: usize) -> Result<Self, ProxyError> {
        backend.client.pool.admit()?;
        backend.endpoints[endpoint]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Ok(Self { backend, endpoint })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.endpoints[self.endpoint]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        self.backend.client.pool.release();
    }
}

impl Service<Picked> for Forward {
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each backend's pool has its own limits, and which backend a request
        // goes to is only known in `call`: they are applied there.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, picked: Picked) -> ResponseFuture {
        // A future per protocol, each boxed at its own size: HTTP/2's does
        // not carry the room HTTP/1.1's exchange takes.
        if picked.backend.client.is_http2() {
            Box::pin(forward(picked, |pool, endpoint, request| async move {
                let (response, lease) = pool.send_http2(endpoint, request).await?;
                let lease = Some(Lease::Http2(lease));
                Ok(response.map(|body| Upstream::Http2 { body, lease }))
            }))
        } else {
            Box::pin(forward(picked, |pool, endpoint, request| async move {
                let response = pool.send_http1(endpoint, request).await?;
                Ok(response.map(Upstream::Http1))
            }))
        }
    }
}

/// Sends a picked request through its backend's pool with `send`.
async fn forward<F, Fut>(picked: Picked, send: F) -> Result<Response<ResponseBody>, BoxError>
where
    F: FnOnce(Arc<Pool>, usize, Request<ReplayBody>) -> Fut,
    Fut: Future<Output = Result<Response<Upstream>, ProxyError>>,
{
    let Picked {
        route,
        backend,
        endpoint,
        request,
    } = picked;
    // Only a request of a logging route carries an upstream slot; no other
    // looks for one.
    let logged = route
        .log
        .as_ref()
        .and_then(|_| request.extensions().get::<UpstreamLog>().cloned());
    // The clock is read only when the backend's latency is recorded.
    let started = (backend.series.is_some() || logged.is_some()).then(std::time::Instant::now);
    let sent = match InFlight::admit(Arc::clone(&backend), endpoint) {
        Ok(in_flight) => send(Arc::clone(&backend.client.pool), endpoint, request)
            .await
            .map(|response| (response, in_flight)),
        Err(error) => Err(error),
    };
    if let (Ok(_), Some(started)) = (&sent, started) {
        let took = started.elapsed();
        if let Some(series) = &backend.series {
            series.upstream(took);
        }
        if let (Some(logged), Some(answered)) = (&logged, backend.endpoints.get(endpoint)) {
            logged.answered(&answered.address, took);
        }
    }
    match sent {
        Ok((response, in_flight)) => {
            let (parts, body) = response.into_parts();
            let mut body = ResponseBody {
                body,
                in_flight: Some(in_flight),
            };
            if body.body.is_end_stream() {
                // Nothing to stream: the connection is free already.
                body.finish(true);
            }
            Ok(Response::from_parts(parts, body))
        }
        Err(error) => Err(AtEndpoint {
            route,
            backend,
            endpoint,
            error,
        }
        .into()),
    }
}

impl ResponseBody {
    /// The end of a request: its connection back to the pool when `ended`
    /// cleanly on a reusable one (dropped, and so closed, otherwise), and
    /// out of the in-flight counts.
    fn finish(&mut self, ended: bool) {
        // Taken either way: a lease not checked in is dropped here.
        let lease = match &mut self.body {
            Upstream::Http1(body) => body.take_reusable().map(Lease::Http1),
            Upstream::Http2 { lease, .. } => lease.take(),
        };
        if let (Some(lease), Some(f)) = (lease, self.in_flight.as_ref())
            && ended
        {
            f.backend.client.pool.check_in(f.endpoint, lease);
        }
        self.in_flight.take();
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body never read to its last poll (empty, or read to its end
        // without one) still leaves its connection reusable.
        let ended = self.body.is_end_stream();
        self.finish(ended);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match &mut self.body {
            Upstream::Http1(body) => ready!(Pin::new(body).poll_frame(cx)),
            Upstream::Http2 { body, .. } => {
                ready!(Pin::new(body).poll_frame(cx)).map(|frame| frame.map_err(BoxError::from))
            }
        };
        match &frame {
            Some(Ok(_)) if !self.body.is_end_stream() => {}
            // Ended: the endpoint is done with this request.
            Some(Ok(_)) | None => self.finish(true),
            // Failed: so is its connection.
            Some(Err(_)) => self.finish(false),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Upstream::Http1(body) => body.size_hint(),
            Upstream::Http2 { body, .. } => body.size_hint(),
        }
    }
}

impl Upstream {
    fn is_end_stream(&self) -> bool {
        match self {
            Upstream::Http1(body) => body.is_end_stream(),
            Upstream::Http2 { body, .. } => body.is_end_stream(),
        }
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
