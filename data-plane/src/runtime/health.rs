//! Active health checks: one task per backend with a `health_check` probes
//! each of its endpoints every `interval` (plus up to a tenth of it as
//! jitter, so the probes of many proxies do not arrive in step), each probe
//! bounded by `timeout`. `unhealthy_threshold` failed probes in a row take an
//! endpoint out of the balancer, `healthy_threshold` passed ones bring it
//! back.
//!
//! As in Envoy, an endpoint new to its backend starts unhealthy and its first
//! passed probe makes it healthy; the first probes go out as soon as the
//! backend is compiled. An endpoint that a changed backend already had keeps
//! the health it had (healthy when the old version did not check).
//!
//! Probes open their own connection each time, never the request pool's,
//! with the backend's protocol (HTTP/2 for HTTP2 and GRPC backends) and its
//! upstream TLS. The task is owned by the backend: it is aborted when the
//! backend is dropped, so a changed or removed backend's checker stops once
//! the last request that uses the old version has ended.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, StatusCode, Uri, header};
use http_body_util::Empty;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prism_proto::defaults::{duration_or, health_check as defaults, nonzero_or};
use prism_proto::pb::config::v1::{HealthCheck as Spec, health_check};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::{info, warn};

use super::tls::UpstreamParams;
use crate::http::error::Chain;
use crate::metrics::BackendSeries;

/// A backend's health check, defaults applied, with what a probe needs to
/// reach its endpoints the way requests do.
#[derive(Debug)]
pub(crate) struct Params {
    interval: Duration,
    timeout: Duration,
    unhealthy_threshold: u32,
    healthy_threshold: u32,
    check: Check,
    /// HTTP/2 with prior knowledge (or ALPN `h2` under TLS), else HTTP/1.1.
    http2: bool,
    tls: Option<UpstreamParams>,
}

/// What a probe asks.
#[derive(Debug)]
enum Check {
    /// `GET path`; a 2xx passes. `host` is the Host header (`:authority`),
    /// the endpoint's address when `None`.
    Http {
        path: PathAndQuery,
        host: Option<Authority>,
    },
    /// `grpc.health.v1.Health/Check` about `service`; SERVING passes.
    Grpc { service: String },
}

/// An endpoint's health as its backend's checker last judged it; on an
/// atomic, read by the balancer on every pick.
#[derive(Debug)]
pub(crate) struct Health(AtomicU8);

/// A backend's health check: its parameters and, once started, its task.
#[derive(Debug)]
pub(crate) struct HealthCheck {
    params: Arc<Params>,
    task: Option<Task>,
}

/// The checker's task, aborted when dropped.
#[derive(Debug)]
struct Task(tokio::task::AbortHandle);

/// Why a probe failed; logged when it makes an endpoint unhealthy.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    #[error("connect failed")]
    Connect(#[source] std::io::Error),
    #[error("`{0}` is not a valid TLS server name; set the backend's tls.sni")]
    ServerName(String),
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("invalid probe request")]
    Request(#[source] http::Error),
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("gRPC status {}: {}", .0.code(), .0.message())]
    Grpc(tonic::Status),
    #[error("reported {}", .0.as_str_name())]
    NotServing(ServingStatus),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// An endpoint's health: new (unhealthy, and healthy after one passed
/// probe), healthy or unhealthy.
const NEW: u8 = 0;
const HEALTHY: u8 = 1;
const UNHEALTHY: u8 = 2;

impl Params {
    /// `spec` with its defaults, for a backend speaking HTTP/2 or not, with
    /// upstream TLS or not. Validation has already checked every field; a
    /// field that still does not parse is named in the error.
    pub(crate) fn compile(
        spec: &Spec,
        http2: bool,
        tls: Option<UpstreamParams>,
    ) -> Result<Params, (&'static str, String)> {
        let check = match &spec.check {
            Some(health_check::Check::Http(http)) => Check::Http {
                path: http
                    .path
                    .parse()
                    .map_err(|e| ("http.path", format!("`{}`: {e}", http.path)))?,
                host: match http.host.as_str() {
                    "" => None,
                    host => Some(
                        host.parse()
                            .map_err(|e| ("http.host", format!("`{host}`: {e}")))?,
                    ),
                },
            },
            Some(health_check::Check::Grpc(grpc)) => Check::Grpc {
                service: grpc.service_name.clone(),
            },
            None => return Err(("http", "one of `http` or `grpc` is required".into())),
        };
        Ok(Params {
            interval: duration_or(spec.interval.as_ref(), defaults::INTERVAL),
            timeout: duration_or(spec.timeout.as_ref(), defaults::TIMEOUT),
            unhealthy_threshold: nonzero_or(
                spec.unhealthy_threshold,
                defaults::UNHEALTHY_THRESHOLD,
            ),
            healthy_threshold: nonzero_or(spec.healthy_threshold, defaults::HEALTHY_THRESHOLD),
            check,
            http2,
            tls,
        })
    }

    /// Probes the endpoint at `address` once, within `timeout`.
    pub(crate) async fn probe(&self, address: &Authority) -> Result<(), ProbeError> {
        match tokio::time::timeout(self.timeout, self.probe_unbounded(address)).await {
            Ok(result) => result,
            Err(_) => Err(ProbeError::TimedOut(self.timeout)),
        }
    }

    async fn probe_unbounded(&self, address: &Authority) -> Result<(), ProbeError> {
        let tcp = TcpStream::connect(address.as_str())
            .await
            .map_err(ProbeError::Connect)?;
        // Probes are rare and small: Nagle would only delay them.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.ask(address, Scheme::HTTP, tcp).await,
            Some(tls) => {
                let server_name = match &tls.server_name {
                    Some(name) => name.clone(),
                    None => {
                        let host = address.host();
                        let bare = host.trim_start_matches('[').trim_end_matches(']');
                        ServerName::try_from(bare.to_string())
                            .map_err(|_| ProbeError::ServerName(host.to_string()))?
                    }
                };
                let stream = TlsConnector::from(Arc::clone(&tls.config))
                    .connect(server_name, tcp)
                    .await
                    .map_err(ProbeError::Tls)?;
                self.ask(address, Scheme::HTTPS, stream).await
            }
        }
    }

    /// Sends the check over `io`, a fresh connection to `address`.
    async fn ask<IO>(&self, address: &Authority, scheme: Scheme, io: IO) -> Result<(), ProbeError>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let io = TokioIo::new(io);
        match &self.check {
            Check::Http { path, host } => {
                let host = host.as_ref().unwrap_or(address);
                let request =
                    Request::get(path.as_str()).header(header::USER_AGENT, "prism-health-check");
                let response = if self.http2 {
                    let request = request
                        .uri(origin(scheme, host, path.clone()))
                        .body(Empty::<Bytes>::new())
                        .map_err(ProbeError::Request)?;
                    let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .handshake(io)
                        .await?;
                    beside(connection, sender.send_request(request)).await?
                } else {
                    let request = request
                        .header(header::HOST, host.as_str())
                        // One probe per connection: the upstream may close it.
                        .header(header::CONNECTION, "close")
                        .body(Empty::<Bytes>::new())
                        .map_err(ProbeError::Request)?;
                    let (mut sender, connection) = http1::handshake(io).await?;
                    beside(connection, sender.send_request(request)).await?
                }?;
                match response.status() {
                    status if status.is_success() => Ok(()),
                    status => Err(ProbeError::Status(status)),
                }
            }
            Check::Grpc { service } => {
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await?;
                let channel = tower::service_fn(move |request| {
                    let mut sender: http2::SendRequest<tonic::body::Body> = sender.clone();
                    async move { sender.send_request(request).await }
                });
                let mut client = HealthClient::with_origin(
                    channel,
                    origin(scheme, address, PathAndQuery::from_static("/")),
                );
                let request = HealthCheckRequest {
                    service: service.clone(),
                };
                let response = beside(connection, client.check(request))
                    .await?
                    .map_err(ProbeError::Grpc)?;
                match response.into_inner().status() {
                    ServingStatus::Serving => Ok(()),
                    status => Err(ProbeError::NotServing(status)),
                }
            }
        }
    }
}

/// `scheme://authority/path`, the URI of an HTTP/2 request.
fn origin(scheme: Scheme, authority: &Authority, path: PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(path);
    // Scheme, authority and path are all set, the one thing `from_parts`
    // checks; the fallback only keeps this free of a panic.
    Uri::from_parts(parts).unwrap_or_default()
}

/// Runs `exchange` while driving its `connection`: the probe owns its
/// connection, no task is spawned for it, and it closes when the probe ends.
async fn beside<C, E, T>(connection: C, exchange: E) -> Result<T, ProbeError>
where
    C: Future<Output = Result<(), hyper::Error>>,
    E: Future<Output = T>,
{
    let mut exchange = std::pin::pin!(exchange);
    tokio::select! {
        biased;
        answer = &mut exchange => Ok(answer),
        // A connection that ended cleanly may have delivered the answer as
        // it ended (`connection: close`); the exchange tells.
        closed = connection => match closed {
            Ok(()) => Ok(exchange.await),
            Err(error) => Err(ProbeError::Http(error)),
        },
    }
}

impl From<hyper::Error> for ProbeError {
    fn from(error: hyper::Error) -> Self {
        ProbeError::Http(error)
    }
}

impl Health {
    /// The health of an endpoint new to its backend: unhealthy until its
    /// first probe passes.
    pub(crate) fn new() -> Self {
        Self(AtomicU8::new(NEW))
    }

    /// An endpoint a changed backend already had: it keeps its health,
    /// `None` (the old version did not check) counting as healthy.
    pub(crate) fn inherit(&self, old: Option<&Health>) {
        let state = old.map_or(HEALTHY, |h| h.0.load(Ordering::Relaxed));
        self.0.store(state, Ordering::Relaxed);
    }

    /// Whether the balancer may pick the endpoint.
    pub(crate) fn is_healthy(&self) -> bool {
        self.0.load(Ordering::Relaxed) == HEALTHY
    }
}

impl HealthCheck {
    pub(crate) fn new(params: Params) -> Self {
        Self {
            params: Arc::new(params),
            task: None,
        }
    }

    /// Starts checking `endpoints` (address and health, in the backend's
    /// order) for `backend`, counting each probe's result in `series` if
    /// any. Without a Tokio runtime (a bench or a fuzzer compiling a policy,
    /// which serves no request) no checker runs and the endpoints keep the
    /// health they start with.
    pub(crate) fn start(
        &mut self,
        backend: &str,
        endpoints: Vec<(Authority, Arc<Health>)>,
        series: Option<Arc<BackendSeries>>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = runtime.spawn(run(
            backend.to_string(),
            Arc::clone(&self.params),
            endpoints,
            series,
        ));
        self.task = Some(Task(task.abort_handle()));
    }

    /// Whether the checker's task is running.
    #[cfg(test)]
    pub(crate) fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.0.is_finished())
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The checker: every endpoint's watch, run together in this one task.
/// `FuturesUnordered` polls only the watches that were woken, so a backend
/// of many endpoints costs no more per probe than one of a few.
async fn run(
    backend: String,
    params: Arc<Params>,
    endpoints: Vec<(Authority, Arc<Health>)>,
    series: Option<Arc<BackendSeries>>,
) {
    let mut watches: FuturesUnordered<_> = endpoints
        .into_iter()
        .map(|(address, health)| {
            let series = series.clone();
            watch(
                backend.clone(),
                Arc::clone(&params),
                address,
                health,
                series,
            )
        })
        .collect();
    // A watch never ends (its output is `Infallible`): this waits until the
    // task is aborted. (It would return at once for a backend without
    // endpoints, but compiling refuses those.)
    if let Some(never) = watches.next().await {
        match never {}
    }
}

/// One endpoint's probes, forever: probe, judge, wait `interval` and jitter.
async fn watch(
    backend: String,
    params: Arc<Params>,
    address: Authority,
    health: Arc<Health>,
    series: Option<Arc<BackendSeries>>,
) -> Infallible {
    let (mut passed, mut failed) = (0u32, 0u32);
    loop {
        let result = params.probe(&address).await;
        if let Some(series) = &series {
            series.probed(result.is_ok());
        }
        let state = health.0.load(Ordering::Relaxed);
        match result {
            Ok(()) => {
                passed = passed.saturating_add(1);
                failed = 0;
                if state == NEW || (state == UNHEALTHY && passed >= params.healthy_threshold) {
                    health.0.store(HEALTHY, Ordering::Relaxed);
                    info!(%backend, endpoint = %address, passed, "Endpoint is healthy.");
                }
            }
            Err(error) => {
                failed = failed.saturating_add(1);
                passed = 0;
                if state != UNHEALTHY && failed >= params.unhealthy_threshold {
                    health.0.store(UNHEALTHY, Ordering::Relaxed);
                    warn!(
                        %backend,
                        endpoint = %address,
                        failed,
                        error = %Chain(&error),
                        "Endpoint is unhealthy; it leaves the balancer."
                    );
                }
            }
        }
        let jitter = params.interval.mul_f64(rand::random::<f64>() / 10.0);
        tokio::time::sleep(params.interval + jitter).await;
    }
}

#[cfg(test)]
mod tests {
    use prism_proto::pb::config::v1::{GrpcHealthCheck, HttpHealthCheck};

    use super::*;

    #[test]
    fn unset_fields_take_the_schemas_defaults() {
        let spec = Spec {
            check: Some(health_check::Check::Grpc(GrpcHealthCheck::default())),
            ..Default::default()
        };
        let params = Params::compile(&spec, true, None).expect("compiles");
        assert_eq!(params.interval, defaults::INTERVAL);
        assert_eq!(params.timeout, defaults::TIMEOUT);
        assert_eq!(params.unhealthy_threshold, defaults::UNHEALTHY_THRESHOLD);
        assert_eq!(params.healthy_threshold, defaults::HEALTHY_THRESHOLD);
        let error = Params::compile(&Spec::default(), false, None).map(|_| ());
        assert_eq!(error.unwrap_err().0, "http");
        let bad_host = Spec {
            check: Some(health_check::Check::Http(HttpHealthCheck {
                path: "/healthz".into(),
                host: "not a host".into(),
            })),
            ..Default::default()
        };
        let error = Params::compile(&bad_host, false, None).map(|_| ());
        assert_eq!(error.unwrap_err().0, "http.host");
    }

    #[test]
    fn a_new_endpoint_waits_for_a_probe_and_a_kept_one_keeps_its_health() {
        let new = Health::new();
        assert!(!new.is_healthy());
        let kept = Health::new();
        kept.inherit(None);
        assert!(kept.is_healthy(), "unchecked before: healthy");
        let unhealthy = Health(AtomicU8::new(UNHEALTHY));
        kept.inherit(Some(&unhealthy));
        assert!(!kept.is_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_check_aborts_its_task() {
        let spec = Spec {
            check: Some(health_check::Check::Http(HttpHealthCheck {
                path: "/".into(),
                host: String::new(),
            })),
            ..Default::default()
        };
        let mut check = HealthCheck::new(Params::compile(&spec, false, None).expect("compiles"));
        // Nothing listens on port 9 of this address: every probe fails.
        let endpoint = (
            "127.0.0.1:9".parse().expect("authority"),
            Arc::new(Health::new()),
        );
        check.start("n/b", vec![endpoint], None);
        let task = check.task.as_ref().map(|t| t.0.clone()).expect("started");
        tokio::time::sleep(defaults::INTERVAL * 2).await;
        assert!(!task.is_finished(), "the checker runs on its own");
        drop(check);
        tokio::task::yield_now().await;
        assert!(task.is_finished(), "the checker outlived its backend");
    }
}
