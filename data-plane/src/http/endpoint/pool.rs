//! A backend's connection pool, on Prism's own HTTP/1.1 client ([`super::h1`])
//! and hyper's HTTP/2 one, and the Envoy-style limits of `Backend.limits`
//! enforced on it.
//!
//! Per endpoint, HTTP/1.1 keeps a LIFO stack of idle connections: a request
//! takes the most recently used one (unless the upstream has closed it
//! meanwhile), and its connection goes back on the stack when its response
//! body ends (not before). An HTTP/1.1 connection is driven by the request
//! it carries and holds its place under `max_connections` itself. HTTP/2
//! shares one connection per endpoint, its sender cloned per request; a new
//! one is opened when it closes or has carried `max_requests_per_connection`
//! requests. Each HTTP/2 connection is driven by its own task, which holds
//! the connection's place under `max_connections` until the connection ends.
//!
//! Written here rather than taken from hyper-util's pooled client: that one
//! costs a shared-map lookup, a spawned task and a channel hop per request,
//! and has no connection or pending-request limits.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::header;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prism_proto::defaults;
use prism_proto::pb::config::v1::BackendLimits;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use super::connect::{ConnectTimedOut, Connector};
use super::h1;
use crate::http::body::{BodyTooLarge, ReplayBody};
use crate::http::error::{BoxError, ProxyError};

/// A backend's pool limits (`Backend.limits`, defaults from prism-proto).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Open connections to all endpoints together.
    pub max_connections: u32,
    /// Requests waiting for a connection because `max_connections` is
    /// reached; beyond it a request fails at once.
    pub max_pending_requests: u32,
    /// Requests in flight to the backend, waiting for a connection or not;
    /// beyond it a request fails at once.
    pub max_requests: u32,
    /// A connection is closed after this many requests; `None`: never.
    pub max_requests_per_connection: Option<NonZeroU32>,
    /// An idle connection is closed after this.
    pub idle_timeout: Duration,
}

/// One backend's pool.
#[derive(Debug)]
pub(crate) struct Pool {
    http2: bool,
    scheme: Scheme,
    connector: Connector,
    limits: Limits,
    endpoints: Box<[Slot]>,
    gauge: Arc<Gauge>,
    /// Requests admitted under `max_requests` and not yet done.
    requests: AtomicU32,
    /// Whether the task that closes idle connections runs.
    sweeping: AtomicBool,
    http2_builder: http2::Builder<TokioExecutor>,
}

/// A connection handed out for one request; its [`Lease`] goes back to the
/// pool with [`Pool::check_in`] once the response has ended.
pub(crate) enum Lease {
    /// The connection itself, given back by the response body
    /// ([`h1::Body::take_reusable`]).
    Http1(Box<h1::Connection>),
    Http2(Http2Lease),
}

/// One request's share of an HTTP/2 connection: counted among its streams
/// until dropped.
pub(crate) struct Http2Lease(Arc<Http2Conn>);

/// One endpoint's connections.
#[derive(Debug)]
struct Slot {
    authority: Authority,
    /// `http://host:port`, what the connector resolves and connects to.
    connect_to: Uri,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    /// HTTP/1.1: idle connections, the most recently used last.
    #[expect(
        clippy::vec_box,
        reason = "a connection moves between this stack, its request and its response as one pointer"
    )]
    http1: Vec<Box<h1::Connection>>,
    /// HTTP/2: the connection new requests share.
    http2: Option<Shared>,
    /// HTTP/2: a request is opening the connection the others will share.
    connecting: bool,
    /// HTTP/2: connects that failed so far, so that the requests that
    /// waited for one fail with it rather than each trying in turn.
    failures: u64,
}

/// The HTTP/2 connection an endpoint's requests share.
struct Shared {
    conn: Arc<Http2Conn>,
    /// Requests sent on it so far.
    used: u32,
}

struct Http2Conn {
    send: http2::SendRequest<ReplayBody>,
    /// Requests on it whose response has not ended.
    streams: AtomicU32,
    opened: Instant,
    /// When its last stream ended, in milliseconds after `opened`.
    last_end_ms: AtomicU64,
}

/// The counts the connection tasks share with the pool, and the signal that
/// something a waiting request may use came free.
#[derive(Debug, Default)]
struct Gauge {
    open: AtomicU32,
    pending: AtomicU32,
    changed: Notify,
}

/// A connection's place under `max_connections`, held by the HTTP/1.1
/// connection itself or by the task that drives an HTTP/2 one.
pub(super) struct Permit(Arc<Gauge>);

/// A request's place under `max_pending_requests` while it waits.
struct Pending(Arc<Gauge>);

/// A connection checked out for one request.
enum Conn {
    Http1(Box<h1::Connection>),
    Http2(http2::SendRequest<ReplayBody>, Http2Lease),
}

/// What a request found at its endpoint.
enum Take {
    /// An idle HTTP/1.1 connection, or the shared HTTP/2 one.
    Pooled(Conn),
    /// Nothing idle, and room for a new connection.
    Connect(Permit),
    /// Nothing idle and no room: wait for a connection to come free.
    Wait,
}

/// Clears an endpoint's `connecting` mark however the connect ends: done,
/// failed, or dropped with its request (then another waiting takes over).
struct Connecting<'a> {
    pool: &'a Pool,
    endpoint: usize,
    failed: bool,
}

/// The HTTP/2 connect a request waited for failed.
#[derive(Debug, thiserror::Error)]
#[error("the shared connection this request waited for failed to open")]
struct SharedConnectFailed;

impl Limits {
    pub(crate) fn compile(limits: Option<&BackendLimits>) -> Self {
        use defaults::limits as d;
        let value = |f: fn(&BackendLimits) -> u32| limits.map_or(0, f);
        Self {
            max_connections: defaults::nonzero_or(value(|l| l.max_connections), d::MAX_CONNECTIONS),
            max_pending_requests: defaults::nonzero_or(
                value(|l| l.max_pending_requests),
                d::MAX_PENDING_REQUESTS,
            ),
            max_requests: defaults::nonzero_or(value(|l| l.max_requests), d::MAX_REQUESTS),
            max_requests_per_connection: NonZeroU32::new(value(|l| l.max_requests_per_connection))
                .or(d::MAX_REQUESTS_PER_CONNECTION.and_then(NonZeroU32::new)),
            idle_timeout: defaults::duration_or(
                limits.and_then(|l| l.idle_timeout.as_ref()),
                d::IDLE_TIMEOUT,
            ),
        }
    }

    fn spent(&self, used: u32) -> bool {
        self.max_requests_per_connection
            .is_some_and(|max| used >= max.get())
    }
}

impl Pool {
    /// A pool for `endpoints`, in the backend's order. Opens nothing yet.
    pub(crate) fn new(
        http2: bool,
        tls: bool,
        connector: Connector,
        limits: Limits,
        endpoints: impl IntoIterator<Item = Authority>,
    ) -> Self {
        let endpoints = endpoints
            .into_iter()
            .map(|authority| {
                let connect_to = Uri::builder()
                    .scheme(Scheme::HTTP)
                    .authority(authority.clone())
                    .path_and_query("/")
                    .build()
                    // A scheme, a parsed authority and `/` always make a URI.
                    .unwrap_or_default();
                Slot {
                    authority,
                    connect_to,
                    idle: Mutex::default(),
                }
            })
            .collect();
        let mut http2_builder = http2::Builder::new(TokioExecutor::new());
        http2_builder.timer(TokioTimer::new());
        Self {
            http2,
            scheme: if tls { Scheme::HTTPS } else { Scheme::HTTP },
            connector,
            limits,
            endpoints,
            gauge: Arc::default(),
            requests: AtomicU32::new(0),
            sweeping: AtomicBool::new(false),
            http2_builder,
        }
    }

    pub(crate) fn is_http2(&self) -> bool {
        self.http2
    }

    #[cfg(test)]
    pub(crate) fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Requests waiting for a connection.
    #[cfg(test)]
    pub(crate) fn pending_requests(&self) -> u32 {
        self.gauge.pending.load(Ordering::Relaxed)
    }

    /// Open connections to all endpoints.
    #[cfg(test)]
    pub(crate) fn open_connections(&self) -> u32 {
        self.gauge.open.load(Ordering::Relaxed)
    }

    /// Counts a request in under `max_requests`; [`Pool::release`] counts
    /// it out.
    pub(crate) fn admit(&self) -> Result<(), ProxyError> {
        if self.requests.fetch_add(1, Ordering::Relaxed) >= self.limits.max_requests {
            self.release();
            return Err(ProxyError::RequestsOverflow);
        }
        Ok(())
    }

    pub(crate) fn release(&self) {
        self.requests.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sends `request` to endpoint `endpoint` of an HTTP/1.1 pool on a
    /// pooled or a new connection. The response body gives its connection
    /// back for [`Pool::check_in`] when it has ended.
    pub(crate) async fn send_http1(
        self: &Arc<Self>,
        endpoint: usize,
        mut request: Request<ReplayBody>,
    ) -> Result<Response<h1::Body>, ProxyError> {
        self.address(endpoint, &mut request);
        // An HTTP/1.1 pool hands out nothing else.
        let Conn::Http1(mut conn) = self.checkout(endpoint).await?.0 else {
            return Err(ProxyError::Internal);
        };
        conn.used += 1;
        conn.send(request)
            .await
            .map_err(|error| classify(error.into()))
    }

    /// Sends `request` to endpoint `endpoint` of an HTTP/2 pool on its
    /// shared connection; the [`Http2Lease`] is checked in (dropped) when
    /// the response has ended.
    pub(crate) async fn send_http2(
        self: &Arc<Self>,
        endpoint: usize,
        mut request: Request<ReplayBody>,
    ) -> Result<(Response<Incoming>, Http2Lease), ProxyError> {
        self.address(endpoint, &mut request);
        loop {
            let (conn, reused) = self.checkout(endpoint).await?;
            // An HTTP/2 pool hands out nothing else.
            let Conn::Http2(mut send, lease) = conn else {
                return Err(ProxyError::Internal);
            };
            match send.try_send_request(request).await {
                Ok(response) => return Ok((response, lease)),
                Err(mut error) => match error.take_message() {
                    // Never written: a shared connection closed under it.
                    // Nothing was sent, so try another.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(classify(error.into_error().into())),
                },
            }
        }
    }

    /// Puts a connection whose response has ended back in the pool, unless
    /// it has carried its `max_requests_per_connection` or is closed.
    pub(crate) fn check_in(&self, endpoint: usize, lease: Lease) {
        let mut conn = match lease {
            Lease::Http1(conn) => conn,
            // An HTTP/2 lease only counts a stream, which dropping it ends.
            Lease::Http2(stream) => return drop(stream),
        };
        if self.limits.spent(conn.used) {
            return;
        }
        conn.idle();
        self.idle(endpoint).http1.push(conn);
        self.gauge.wake();
    }

    /// Sets the request's URI and version for its endpoint: origin form for
    /// HTTP/1.1, scheme and authority (the Host) for HTTP/2.
    fn address(&self, endpoint: usize, request: &mut Request<ReplayBody>) {
        if self.http2 {
            *request.version_mut() = Version::HTTP_2;
            let mut parts = request.uri().clone().into_parts();
            parts.scheme = Some(self.scheme.clone());
            // `:authority` carries the request's Host (after any host
            // rewrite), as Envoy sends it; the endpoint's address without one.
            let host = request
                .headers_mut()
                .remove(header::HOST)
                .and_then(|host| Authority::try_from(host.as_bytes()).ok());
            parts.authority =
                Some(host.unwrap_or_else(|| self.endpoints[endpoint].authority.clone()));
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(PathAndQuery::from_static("/"));
            }
            // Valid parts of a valid URI with a scheme and an authority.
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        } else {
            *request.version_mut() = Version::HTTP_11;
            // `te: trailers` only means something to HTTP/2 (gRPC) upstreams.
            request.headers_mut().remove(header::TE);
            if request.uri().authority().is_some() || request.uri().path().is_empty() {
                let origin = request
                    .uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/"));
                *request.uri_mut() = Uri::from(origin);
            }
        }
    }

    /// A connection for one request to `endpoint`, and whether it was
    /// pooled: an idle or shared one, else a new one, else (at
    /// `max_connections`) the first to come free, counted as pending.
    async fn checkout(self: &Arc<Self>, endpoint: usize) -> Result<(Conn, bool), ProxyError> {
        let mut pending: Option<Pending> = None;
        // HTTP/2: the endpoint's connect failures when this request began to
        // wait for a connect.
        let mut waited: Option<u64> = None;
        loop {
            let notified = self.gauge.changed.notified();
            tokio::pin!(notified);
            if pending.is_some() {
                // Registered before looking, so nothing that comes free after
                // the look goes unnoticed.
                notified.as_mut().enable();
            }
            match self.take(endpoint, &mut waited)? {
                Take::Pooled(Conn::Http1(mut conn)) => {
                    // The upstream may have closed it while it was idle: such
                    // a one is dropped, and the next one tried.
                    if !conn.is_closed() {
                        return Ok((Conn::Http1(conn), true));
                    }
                    continue;
                }
                Take::Pooled(shared) => return Ok((shared, true)),
                Take::Connect(permit) => return Ok((self.connect(endpoint, permit).await?, false)),
                Take::Wait => {}
            }
            if pending.is_none() {
                pending = Some(self.gauge.enter_pending(self.limits.max_pending_requests)?);
                continue;
            }
            self.evict_idle();
            notified.await;
        }
    }

    /// What `endpoint` has for a request right now.
    fn take(&self, endpoint: usize, waited: &mut Option<u64>) -> Result<Take, ProxyError> {
        let mut idle = self.idle(endpoint);
        if self.http2 {
            if let Some(shared) = idle.http2.as_mut() {
                if !shared.conn.send.is_closed() {
                    shared.used += 1;
                    let conn = Arc::clone(&shared.conn);
                    if self.limits.spent(shared.used) {
                        // Its last request: the next opens a new one, and
                        // this one closes once its streams end.
                        idle.http2 = None;
                    }
                    conn.streams.fetch_add(1, Ordering::Relaxed);
                    return Ok(Take::Pooled(Conn::Http2(
                        conn.send.clone(),
                        Http2Lease(conn),
                    )));
                }
                idle.http2 = None;
            }
            if waited.is_some_and(|failures| failures != idle.failures) {
                return Err(ProxyError::Connect(SharedConnectFailed.into()));
            }
            if idle.connecting {
                waited.get_or_insert(idle.failures);
                return Ok(Take::Wait);
            }
        } else {
            if let Some(conn) = idle.http1.pop() {
                return Ok(Take::Pooled(Conn::Http1(conn)));
            }
        }
        Ok(match self.gauge.reserve(self.limits.max_connections) {
            Some(permit) => {
                idle.connecting = self.http2;
                Take::Connect(permit)
            }
            None => Take::Wait,
        })
    }

    /// Opens a connection to `endpoint`; for HTTP/2, the one its requests
    /// will share.
    async fn connect(
        self: &Arc<Self>,
        endpoint: usize,
        permit: Permit,
    ) -> Result<Conn, ProxyError> {
        self.start_sweeping();
        let mut connecting = self.http2.then(|| Connecting {
            pool: self,
            endpoint,
            failed: false,
        });
        let opened = self.open(endpoint, permit).await;
        if let Some(connecting) = connecting.as_mut() {
            connecting.failed = opened.is_err();
        }
        opened
    }

    /// Opens a connection to `endpoint`; for HTTP/2, with the task that
    /// drives it.
    async fn open(&self, endpoint: usize, permit: Permit) -> Result<Conn, ProxyError> {
        let io = self
            .connector
            .connect(self.endpoints[endpoint].connect_to.clone())
            .await
            .map_err(|error| {
                if error.is::<ConnectTimedOut>() {
                    ProxyError::ConnectTimeout
                } else {
                    ProxyError::Connect(error)
                }
            })?;
        if self.http2 {
            let (send, conn) = self
                .http2_builder
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| ProxyError::Connect(e.into()))?;
            tokio::spawn(drive(conn, permit));
            let conn = Arc::new(Http2Conn {
                send: send.clone(),
                streams: AtomicU32::new(1),
                opened: Instant::now(),
                last_end_ms: AtomicU64::new(0),
            });
            if !self.limits.spent(1) {
                self.idle(endpoint).http2 = Some(Shared {
                    conn: Arc::clone(&conn),
                    used: 1,
                });
            }
            Ok(Conn::Http2(send, Http2Lease(conn)))
        } else {
            Ok(Conn::Http1(h1::Connection::new(io, permit)))
        }
    }

    /// At `max_connections`, closes one idle connection of any endpoint so
    /// that a waiting request to another can open its own.
    fn evict_idle(&self) {
        if self.gauge.open.load(Ordering::SeqCst) < self.limits.max_connections {
            return;
        }
        for slot in &self.endpoints {
            let mut idle = lock(&slot.idle);
            if !idle.http1.is_empty() {
                // The least recently used, at the bottom of the stack.
                idle.http1.remove(0);
                return;
            }
            if idle
                .http2
                .as_ref()
                .is_some_and(|s| s.conn.streams.load(Ordering::Relaxed) == 0)
            {
                idle.http2 = None;
                return;
            }
        }
    }

    /// Starts the task that closes connections idle past `idle_timeout`,
    /// once, when the first connection opens; it ends with the pool.
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        let period = (self.limits.idle_timeout / 4).max(Duration::from_millis(10));
        tokio::spawn(sweep_every(pool, period));
    }

    /// Closes the connections idle since before `now - idle_timeout`.
    fn sweep(&self, now: Instant) {
        let timeout = self.limits.idle_timeout;
        for slot in &self.endpoints {
            let mut idle = lock(&slot.idle);
            idle.http1
                .retain_mut(|c| now.duration_since(c.idle_since) < timeout && !c.is_closed());
            if idle
                .http2
                .as_ref()
                .is_some_and(|s| s.conn.idle_since(now).is_some_and(|d| d >= timeout))
            {
                idle.http2 = None;
            }
        }
    }

    fn idle(&self, endpoint: usize) -> MutexGuard<'_, Idle> {
        lock(&self.endpoints[endpoint].idle)
    }
}

/// Locks an endpoint's idle connections. Nothing panics while holding the
/// lock, but a poisoned one is still a consistent list of connections.
fn lock(idle: &Mutex<Idle>) -> MutexGuard<'_, Idle> {
    idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn sweep_every(pool: Weak<Pool>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.sweep(Instant::now());
    }
}

/// Drives one HTTP/2 connection until it ends, holding its place under
/// `max_connections` until then.
async fn drive(conn: impl Future<Output = hyper::Result<()>>, _permit: Permit) {
    if let Err(error) = conn.await {
        debug!(%error, "Upstream connection ended with an error.");
    }
}

/// What a failed send means: a request body over its bound, or a failure of
/// the upstream (reset, closed, malformed response).
fn classify(error: BoxError) -> ProxyError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
    while let Some(e) = cause {
        if e.is::<BodyTooLarge>() {
            return ProxyError::BodyTooLarge;
        }
        cause = e.source();
    }
    ProxyError::Upstream(error)
}

impl Gauge {
    /// A place for a new connection, unless `max` are open.
    fn reserve(self: &Arc<Self>, max: u32) -> Option<Permit> {
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| Permit(Arc::clone(self)))
    }

    fn enter_pending(self: &Arc<Self>, max: u32) -> Result<Pending, ProxyError> {
        if self.pending.fetch_add(1, Ordering::SeqCst) >= max {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(ProxyError::PendingOverflow);
        }
        Ok(Pending(Arc::clone(self)))
    }

    /// Wakes the waiting requests, if any, to look again.
    fn wake(&self) {
        if self.pending.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.wake();
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        let mut idle = self.pool.idle(self.endpoint);
        idle.connecting = false;
        if self.failed {
            idle.failures += 1;
        }
        drop(idle);
        // Those waiting for this connection use it, or try their own.
        self.pool.gauge.wake();
    }
}

impl Http2Conn {
    /// How long it has had no stream at `now`; `None` while it has one.
    fn idle_since(&self, now: Instant) -> Option<Duration> {
        if self.streams.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self.opened + Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed));
        Some(now.saturating_duration_since(last))
    }
}

impl Drop for Http2Lease {
    fn drop(&mut self) {
        let conn = &self.0;
        if conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            let since = Instant::now().saturating_duration_since(conn.opened);
            let ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
            conn.last_end_ms.store(ms, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle")
            .field("http1", &self.http1.len())
            .field("http2", &self.http2.is_some())
            .field("connecting", &self.connecting)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_take_the_defaults_where_unset() {
        let defaults = Limits::compile(None);
        assert_eq!(defaults, Limits::compile(Some(&BackendLimits::default())));
        assert_eq!(
            defaults,
            Limits {
                max_connections: 1024,
                max_pending_requests: 1024,
                max_requests: 1024,
                max_requests_per_connection: None,
                idle_timeout: Duration::from_secs(60),
            }
        );
        let set = Limits::compile(Some(&BackendLimits {
            max_connections: 1,
            max_pending_requests: 2,
            max_requests: 3,
            max_requests_per_connection: 4,
            idle_timeout: Some(pbjson_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
        }));
        assert_eq!(
            (
                set.max_connections,
                set.max_pending_requests,
                set.max_requests,
                set.max_requests_per_connection.map(NonZeroU32::get),
                set.idle_timeout,
            ),
            (1, 2, 3, Some(4), Duration::from_secs(5))
        );
        assert!(!set.spent(3) && set.spent(4));
        assert!(!defaults.spent(u32::MAX));
    }
}
