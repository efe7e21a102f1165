//! The retry stage: a failed try is sent again, as the route's `retry` says.
//! It sits between the timeout stage (so the route timeout bounds all tries
//! together) and the backend stage (so each try picks its own endpoint).
//!
//! A try is sent again when its outcome is one the route's `retry_on` names,
//! the request body can be replayed ([`ReplayBody::replay`]: up to 64 KiB),
//! the method is idempotent (or the route allows others, or the try failed
//! before anything was sent: [`ProxyError::retryable`]), and the backend's
//! retry budget has room. Each retry waits an exponential backoff with full
//! jitter and avoids the endpoints already tried ([`Tried`], read by the
//! backend stage). A route without `retry` costs nothing here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use super::endpoint::ResponseBody;
use http::{Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use prism_proto::defaults;
use prism_proto::pb::config::v1::RetryPolicy;
use tower::{Layer, Service, ServiceExt};
use tracing::debug;

use super::error::{BoxError, ProxyError};
use super::route::Routed;
use crate::access_log::UpstreamLog;
use crate::runtime::{Backend, Route};

/// The retry stage's part of a route, compiled from its `RetryPolicy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Params {
    pub retries: u32,
    /// `retry_on`, as [`On`] bits.
    pub on: u16,
    pub per_try_timeout: Option<Duration>,
    pub base_interval: Duration,
    pub max_interval: Duration,
    pub non_idempotent: bool,
    pub budget_percent: u32,
    pub min_retry_concurrency: u32,
}

/// A backend's retry budget: requests and retries in flight to it.
#[derive(Debug, Default)]
pub(crate) struct Budget {
    active: AtomicU32,
    retries: AtomicU32,
}

/// The endpoints (by index, the first 64) a request has already tried; the
/// backend stage picks another where one exists. It rides in the request's
/// extensions, and only requests of routes with retries carry it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tried(Arc<AtomicU64>);

/// `retry_on` values as bits.
struct On;

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RetryLayer;

#[derive(Clone, Debug)]
pub(crate) struct Retry<S> {
    inner: S,
}

type Retrying = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, BoxError>> + Send>>;

pin_project! {
    #[project = ResponseFutureProj]
    pub(crate) enum ResponseFuture<F> {
        Once { #[pin] inner: F },
        Retrying { inner: Retrying },
    }
}

impl On {
    const CONNECT_FAILURE: u16 = 1;
    const RESET: u16 = 1 << 1;
    const FIVE_XX: u16 = 1 << 2;
    const GATEWAY_ERROR: u16 = 1 << 3;
    const RETRIABLE_4XX: u16 = 1 << 4;
    const CANCELLED: u16 = 1 << 5;
    const DEADLINE_EXCEEDED: u16 = 1 << 6;
    const RESOURCE_EXHAUSTED: u16 = 1 << 7;
    const UNAVAILABLE: u16 = 1 << 8;
    const INTERNAL: u16 = 1 << 9;

    fn parse(names: &[&str]) -> u16 {
        names
            .iter()
            .map(|name| match *name {
                "connect-failure" => Self::CONNECT_FAILURE,
                "reset" => Self::RESET,
                "5xx" => Self::FIVE_XX,
                "gateway-error" => Self::GATEWAY_ERROR,
                "retriable-4xx" => Self::RETRIABLE_4XX,
                "cancelled" => Self::CANCELLED,
                "deadline-exceeded" => Self::DEADLINE_EXCEEDED,
                "resource-exhausted" => Self::RESOURCE_EXHAUSTED,
                "unavailable" => Self::UNAVAILABLE,
                "internal" => Self::INTERNAL,
                // Validation admits only the values above.
                _ => 0,
            })
            .fold(0, |all, bit| all | bit)
    }
}

impl Params {
    pub(crate) fn compile(policy: &RetryPolicy) -> Self {
        use defaults::retry;
        Self {
            retries: defaults::nonzero_or(policy.num_retries, retry::NUM_RETRIES),
            on: On::parse(&defaults::retry_on(policy)),
            per_try_timeout: policy.per_try_timeout.as_ref().and_then(defaults::to_std),
            base_interval: defaults::retry_base_interval(policy),
            max_interval: defaults::retry_max_interval(policy),
            non_idempotent: policy.retry_non_idempotent,
            budget_percent: defaults::nonzero_or(policy.budget_percent, retry::BUDGET_PERCENT),
            min_retry_concurrency: defaults::nonzero_or(
                policy.min_retry_concurrency,
                retry::MIN_RETRY_CONCURRENCY,
            ),
        }
    }

    /// Whether a try that ended in `outcome` is worth another.
    fn wants(&self, outcome: &Result<Response<ResponseBody>, BoxError>, idempotent: bool) -> bool {
        match outcome {
            Err(error) => {
                let error = ProxyError::classify(&**error);
                if !(error.retryable() || idempotent || self.non_idempotent) {
                    return false;
                }
                let bits = match error {
                    ProxyError::Connect(_) | ProxyError::ConnectTimeout => {
                        On::CONNECT_FAILURE | On::FIVE_XX
                    }
                    ProxyError::Upstream(_) => On::RESET | On::FIVE_XX,
                    // Only a per-try timeout gets here: the route timeout is
                    // the stage above.
                    ProxyError::Timeout => On::FIVE_XX | On::GATEWAY_ERROR,
                    _ => 0,
                };
                self.on & bits != 0
            }
            Ok(response) => {
                if !(idempotent || self.non_idempotent) {
                    return false;
                }
                let status = response.status();
                let mut bits = 0;
                if status.is_server_error() {
                    bits |= On::FIVE_XX;
                }
                if matches!(
                    status,
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                ) {
                    bits |= On::GATEWAY_ERROR;
                }
                if status == StatusCode::CONFLICT {
                    bits |= On::RETRIABLE_4XX;
                }
                // A trailers-only gRPC answer carries its status in the head.
                bits |= match response.headers().get("grpc-status").map(|v| v.as_bytes()) {
                    Some(b"1") => On::CANCELLED,
                    Some(b"4") => On::DEADLINE_EXCEEDED,
                    Some(b"8") => On::RESOURCE_EXHAUSTED,
                    Some(b"13") => On::INTERNAL,
                    Some(b"14") => On::UNAVAILABLE,
                    _ => 0,
                };
                self.on & bits != 0
            }
        }
    }
}

/// The wait before retry number `attempt` (0 for the first): uniform in
/// `[0, min(max, base × 2^attempt)]` (exponential backoff, full jitter).
pub(crate) fn backoff(base: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let ceiling = base
        .checked_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    ceiling.mul_f64(jitter.clamp(0.0, 1.0))
}

impl Budget {
    /// Counts a request in flight until the guard drops.
    fn enter(backend: &Arc<Backend>) -> Active {
        backend.retry_budget.active.fetch_add(1, Ordering::Relaxed);
        Active(Arc::clone(backend))
    }

    /// Whether one more retry fits: retries in flight stay below
    /// `max(min_retry_concurrency, budget_percent % of requests in flight)`.
    fn try_retry(&self, params: &Params) -> bool {
        let active = u64::from(self.active.load(Ordering::Relaxed));
        let share = active * u64::from(params.budget_percent) / 100;
        let allowed = share.max(u64::from(params.min_retry_concurrency));
        let before = self.retries.fetch_add(1, Ordering::Relaxed);
        if u64::from(before) >= allowed {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Whether nothing is in flight.
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.active.load(Ordering::Relaxed) == 0 && self.retries.load(Ordering::Relaxed) == 0
    }

    fn retry_done(&self) {
        self.retries.fetch_sub(1, Ordering::Relaxed);
    }

    /// [`Budget::try_retry`] on `backend`, counted until the guard drops,
    /// even when the request is dropped mid-retry (route timeout, client
    /// gone).
    fn try_retry_guarded(backend: &Arc<Backend>, params: &Params) -> Option<InFlight> {
        backend
            .retry_budget
            .try_retry(params)
            .then(|| InFlight(Arc::clone(backend)))
    }
}

/// A retry in flight to a backend, for its retry budget.
struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.retry_budget.retry_done();
    }
}

/// A request in flight to a backend, for its retry budget.
struct Active(Arc<Backend>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.retry_budget.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tried {
    /// `picked`, or when it was tried already the next of `endpoints` that
    /// was not and is `available` (if any); the choice is recorded.
    pub(crate) fn avoid(
        &self,
        picked: usize,
        endpoints: usize,
        available: impl Fn(usize) -> bool,
    ) -> usize {
        let tried = self.0.load(Ordering::Relaxed);
        let bit = |i: usize| {
            1u64.checked_shl(u32::try_from(i).unwrap_or(u32::MAX))
                .unwrap_or(0)
        };
        let choice = (0..endpoints)
            .map(|step| (picked + step) % endpoints)
            .find(|&i| tried & bit(i) == 0 && (i == picked || available(i)))
            .unwrap_or(picked);
        self.0.fetch_or(bit(choice), Ordering::Relaxed);
        choice
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry { inner }
    }
}

impl<S> Service<Routed> for Retry<S>
where
    S: Service<Routed, Response = Response<ResponseBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let Some(params) = routed.route.retry.clone() else {
            return ResponseFuture::Once {
                inner: self.inner.call(routed),
            };
        };
        let routed = routed_with_tried(routed);
        let idempotent = idempotent(routed.request.method());
        let route = Arc::clone(&routed.route);
        let backend = Arc::clone(&routed.backend);
        // Taken before the first try reads the body, so it replays from the
        // start; `None` when the body is announced too long to replay.
        let spare = copy(&routed);
        // The service that was made ready serves the first try; clones of
        // it serve the retries.
        let first = self.inner.call(routed);
        let inner = self.inner.clone();
        ResponseFuture::Retrying {
            inner: Box::pin(retry(
                inner, first, spare, route, backend, params, idempotent,
            )),
        }
    }
}

/// `routed`, carrying a fresh [`Tried`].
fn routed_with_tried(mut routed: Routed) -> Routed {
    routed.request.extensions_mut().insert(Tried::default());
    routed
}

/// A copy of `routed` for another try, when its body can still be replayed.
fn copy(routed: &Routed) -> Option<Routed> {
    let body = routed.request.body().replay()?;
    let source = &routed.request;
    let mut request = Request::new(body);
    *request.method_mut() = source.method().clone();
    *request.uri_mut() = source.uri().clone();
    *request.version_mut() = source.version();
    *request.headers_mut() = source.headers().clone();
    *request.extensions_mut() = source.extensions().clone();
    Some(Routed {
        route: Arc::clone(&routed.route),
        backend: Arc::clone(&routed.backend),
        request,
    })
}

/// Awaits the first try, then retries while the policy, the body and the
/// budget allow.
async fn retry<S>(
    inner: S,
    first: S::Future,
    mut spare: Option<Routed>,
    route: Arc<Route>,
    backend: Arc<Backend>,
    params: Params,
    idempotent: bool,
) -> Result<Response<ResponseBody>, BoxError>
where
    S: Service<Routed, Response = Response<ResponseBody>, Error = BoxError> + Clone,
{
    let _active = Budget::enter(&backend);
    let mut outcome = bounded(params.per_try_timeout, first).await;
    for attempt in 0..params.retries {
        if !params.wants(&outcome, idempotent) {
            break;
        }
        // The spare copy replays only if the body stayed short enough.
        let Some(next) = spare.take().and_then(|s| copy(&s).map(|c| (c, s))) else {
            break;
        };
        let Some(_in_flight) = Budget::try_retry_guarded(&backend, &params) else {
            debug!(route = %route.name, "The retry budget refused a retry.");
            break;
        };
        let (routed, kept) = next;
        spare = Some(kept);
        if let Some(series) = &backend.series {
            series.retried();
        }
        if route.log.is_some()
            && let Some(logged) = routed.request.extensions().get::<UpstreamLog>()
        {
            logged.retried();
        }
        let wait = backoff(
            params.base_interval,
            params.max_interval,
            attempt,
            rand::random::<f64>(),
        );
        drop(outcome);
        tokio::time::sleep(wait).await;
        let try_ = inner.clone().oneshot(routed);
        outcome = bounded(params.per_try_timeout, try_).await;
    }
    outcome
}

/// `future`, failed with [`ProxyError::Timeout`] after `timeout` if any.
async fn bounded<F>(
    timeout: Option<Duration>,
    future: F,
) -> Result<Response<ResponseBody>, BoxError>
where
    F: Future<Output = Result<Response<ResponseBody>, BoxError>>,
{
    match timeout {
        None => future.await,
        Some(timeout) => tokio::time::timeout(timeout, future)
            .await
            .unwrap_or_else(|_| Err(ProxyError::Timeout.into())),
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, BoxError>>,
{
    type Output = Result<Response<ResponseBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Once { inner } => inner.poll(cx),
            ResponseFutureProj::Retrying { inner } => inner.as_mut().poll(cx),
        }
    }
}

/// Whether `method` may be sent twice with the same effect (RFC 9110 9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn params(percent: u32, min: u32) -> Params {
        Params::compile(&RetryPolicy {
            budget_percent: percent,
            min_retry_concurrency: min,
            ..Default::default()
        })
    }

    #[test]
    fn the_budget_allows_the_larger_of_its_floor_and_its_share() {
        let budget = Budget::default();
        let p = params(20, 3);
        // Nothing in flight: the floor of 3 retries.
        assert!((0..3).all(|_| budget.try_retry(&p)));
        assert!(!budget.try_retry(&p), "a fourth retry in flight");
        budget.retry_done();
        assert!(budget.try_retry(&p), "room again once one ended");
        // 50 requests in flight: 20 % of them is 10.
        budget.active.store(50, Ordering::Relaxed);
        let more = (0..20).filter(|_| budget.try_retry(&p)).count();
        assert_eq!(more, 7, "10 in flight at most");
    }

    #[test]
    fn defaults_come_from_the_schema() {
        let p = Params::compile(&RetryPolicy::default());
        assert_eq!(p.retries, defaults::retry::NUM_RETRIES);
        assert_eq!(p.on, On::CONNECT_FAILURE | On::GATEWAY_ERROR);
        assert_eq!(p.base_interval, defaults::retry::BASE_INTERVAL);
        assert_eq!(p.max_interval, defaults::retry::BASE_INTERVAL * 10);
        assert_eq!(p.per_try_timeout, None);
    }

    #[test]
    fn a_retry_avoids_the_endpoints_already_tried() {
        let tried = Tried::default();
        assert_eq!(tried.avoid(0, 3, |_| true), 0);
        assert_eq!(tried.avoid(0, 3, |_| true), 1);
        assert_eq!(tried.avoid(1, 3, |_| true), 2);
        // All tried: the balancer's pick stands.
        assert_eq!(tried.avoid(1, 3, |_| true), 1);
    }

    proptest! {
        /// Every backoff is within `[0, min(max, base × 2^attempt)]`.
        #[test]
        fn backoff_stays_within_its_bounds(
            base_ms in 1u64..1_000,
            factor in 1u32..50,
            attempt in 0u32..80,
            jitter in 0.0f64..=1.0,
        ) {
            let base = Duration::from_millis(base_ms);
            let max = base * factor;
            let wait = backoff(base, max, attempt, jitter);
            let ceiling = base.saturating_mul(2u32.saturating_pow(attempt)).min(max);
            prop_assert!(wait <= ceiling, "{wait:?} > {ceiling:?}");
            prop_assert!(wait <= max);
        }
    }
}
