//! The rate limit stage: token buckets per namespace and per route, shared or
//! one per client IP. A request that finds a bucket empty is refused with
//! [`ProxyError::RateLimited`] (`429` with `retry-after`; gRPC callers get
//! RESOURCE_EXHAUSTED) and never reaches a backend.
//!
//! It sits right after the route stage, since the limits it applies are the
//! matched route's and its namespace's. A bucket is one `AtomicU64` holding
//! GCRA's "theoretical arrival time" (the time at which the bucket will be
//! full again), which is a token bucket in one word: no lock for a shared
//! bucket. Per-IP buckets live in a sharded map bounded in size, from which
//! full buckets (which hold no information) are evicted first.
//!
//! Written here rather than taken from `governor`: the buckets must run on
//! tokio's clock (so tests pause time) and the per-IP map must be bounded
//! with idle eviction; the single-word bucket is as fast as governor's.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use pin_project_lite::pin_project;
use prism_proto::pb::config::v1::RateLimit as Spec;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::error::{BoxError, ProxyError};
use super::route::Routed;
use super::server::ClientAddr;
use crate::metrics::NamespaceSeries;

/// Per-IP buckets are kept in this many shards, each behind its own lock.
const SHARDS: usize = 16;
/// Per-IP buckets one shard keeps at most, so one limit holds at most
/// `SHARDS × MAX_IPS_PER_SHARD` client addresses however many clients come.
const MAX_IPS_PER_SHARD: usize = 4096;

/// The rate limit stage's part of a route: its namespace's limits (one `Arc`
/// shared by every route of the namespace) and its own.
#[derive(Clone, Debug, Default)]
pub(crate) struct Params {
    pub namespace: Option<Arc<Limits>>,
    pub route: Option<Arc<Limits>>,
}

/// The compiled `rate_limits` of one namespace or route; a request must pass
/// every one of them.
#[derive(Debug)]
pub(crate) struct Limits {
    /// What these were compiled from, so an unchanged set keeps its buckets
    /// across applies.
    spec: Vec<Spec>,
    limits: Vec<Limit>,
    /// Where refusals are counted: the namespace's series (a route's limits
    /// count for its namespace); `None` with metrics off.
    series: Option<Arc<NamespaceSeries>>,
}

#[derive(Debug)]
enum Limit {
    Shared(Bucket),
    PerIp(PerIp),
}

/// The shape of a bucket: how fast it refills and how much it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rate {
    /// Nanoseconds per token, rounded up so the rate is never exceeded.
    interval: u64,
    /// How far ahead of now the theoretical arrival time may run:
    /// `interval × burst`.
    tolerance: u64,
}

/// One token bucket, lock-free.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: Rate,
    epoch: Instant,
    /// Nanoseconds after `epoch` at which the bucket is full again.
    full_at: AtomicU64,
}

/// A bucket per client IP address, in a bounded sharded map.
#[derive(Debug)]
struct PerIp {
    rate: Rate,
    epoch: Instant,
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<IpAddr, u64>>]>,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RateLimitLayer;

#[derive(Clone, Debug)]
pub(crate) struct RateLimit<S> {
    inner: S,
}

pin_project! {
    #[project = ResponseFutureProj]
    pub(crate) enum ResponseFuture<F> {
        Passed { #[pin] inner: F },
        Limited { retry_after: Duration },
    }
}

impl Params {
    /// Takes a token from every bucket that applies to a request from
    /// `client`; the wait until one would be there when one is empty.
    fn check(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        let now = Instant::now();
        for limits in [&self.namespace, &self.route].into_iter().flatten() {
            limits.acquire(client, now)?;
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.namespace.is_none() && self.route.is_none()
    }
}

impl Limits {
    /// The limits of `spec`, or `None` when there are none, counting their
    /// refusals in `series`. The buckets of `previous` are kept when it was
    /// compiled from the same spec.
    pub(crate) fn compile(
        spec: &[Spec],
        previous: Option<&Arc<Limits>>,
        series: Option<Arc<NamespaceSeries>>,
    ) -> Option<Arc<Limits>> {
        if spec.is_empty() {
            return None;
        }
        if let Some(previous) = previous.filter(|p| p.spec == spec) {
            return Some(Arc::clone(previous));
        }
        let now = Instant::now();
        let limits = spec
            .iter()
            .map(|s| {
                let rate = Rate::new(
                    s.requests_per_second,
                    prism_proto::defaults::rate_limit_burst(s),
                );
                if s.per_client_ip {
                    Limit::PerIp(PerIp::new(rate, now))
                } else {
                    Limit::Shared(Bucket::new(rate, now))
                }
            })
            .collect();
        Some(Arc::new(Limits {
            spec: spec.to_vec(),
            limits,
            series,
        }))
    }

    /// Takes a token from each limit. A request refused by a later limit has
    /// still spent its token of the earlier ones, as with Envoy's chained
    /// local rate limits. A refusal is counted in the namespace's series.
    pub(crate) fn acquire(&self, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let taken = self
            .limits
            .iter()
            .try_for_each(|limit| match (limit, client) {
                (Limit::Shared(bucket), _) => bucket.acquire(now),
                (Limit::PerIp(buckets), Some(ip)) => buckets.acquire(ip, now),
                // Every request through the listener has a client address;
                // one without (only built by hand) is not limited per IP.
                (Limit::PerIp(_), None) => Ok(()),
            });
        if taken.is_err()
            && let Some(series) = &self.series
        {
            series.rate_limited();
        }
        taken
    }
}

impl Rate {
    /// `per_second` tokens a second (at least 1), up to `burst` (at least 1).
    pub(crate) fn new(per_second: u32, burst: u32) -> Self {
        let interval = 1_000_000_000u64.div_ceil(u64::from(per_second.max(1)));
        Self {
            interval,
            tolerance: interval * u64::from(burst.max(1)),
        }
    }

    /// GCRA's step: from the time the bucket is full again (`full_at`), the
    /// new one once a token is taken at `now`, or how long until one is there.
    fn take(self, full_at: u64, now: u64) -> Result<u64, Duration> {
        let next = full_at.max(now) + self.interval;
        let limit = now + self.tolerance;
        if next > limit {
            Err(Duration::from_nanos(next - limit))
        } else {
            Ok(next)
        }
    }
}

impl Bucket {
    /// A full bucket.
    pub(crate) fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            epoch: now,
            full_at: AtomicU64::new(0),
        }
    }

    /// Takes a token, or says how long until one is there.
    pub(crate) fn acquire(&self, now: Instant) -> Result<(), Duration> {
        let now = nanos_since(self.epoch, now);
        let mut full_at = self.full_at.load(Ordering::Relaxed);
        loop {
            let next = self.rate.take(full_at, now)?;
            match self.full_at.compare_exchange_weak(
                full_at,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => full_at = current,
            }
        }
    }
}

impl PerIp {
    fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            epoch: now,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn acquire(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let now = nanos_since(self.epoch, now);
        // `SHARDS` is a power of two, so the mask picks a shard uniformly;
        // the cast keeps only the bits the mask reads.
        let shard = (self.hasher.hash_one(ip) as usize) & (SHARDS - 1);
        let mut buckets = self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(full_at) = buckets.get_mut(&ip) {
            *full_at = self.rate.take(*full_at, now)?;
            return Ok(());
        }
        if buckets.len() >= MAX_IPS_PER_SHARD {
            evict(&mut buckets, now);
        }
        // A new client's bucket is full.
        let next = self.rate.take(0, now)?;
        buckets.insert(ip, next);
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// Makes room in a full shard: every bucket that is full again goes (a new
/// bucket would be the same); when none is, the fullest one does.
fn evict(buckets: &mut HashMap<IpAddr, u64>, now: u64) {
    buckets.retain(|_, full_at| *full_at > now);
    if buckets.len() >= MAX_IPS_PER_SHARD
        && let Some(fullest) = buckets.iter().min_by_key(|(_, f)| **f).map(|(ip, _)| *ip)
    {
        buckets.remove(&fullest);
    }
}

fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    // 2^64 ns is 584 years of uptime.
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit { inner }
    }
}

impl<S, B> Service<Routed> for RateLimit<S>
where
    S: Service<Routed, Response = Response<B>, Error = BoxError>,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let params = &routed.route.rate_limit;
        if !params.is_empty() {
            let client = routed
                .request
                .extensions()
                .get::<ClientAddr>()
                .map(|c| c.0.ip());
            if let Err(retry_after) = params.check(client) {
                return ResponseFuture::Limited { retry_after };
            }
        }
        ResponseFuture::Passed {
            inner: self.inner.call(routed),
        }
    }
}

impl<F, B> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Passed { inner } => inner.poll(cx),
            ResponseFutureProj::Limited { retry_after } => {
                Poll::Ready(Err(ProxyError::RateLimited {
                    retry_after: *retry_after,
                }
                .into()))
            }
        }
    }
}

/// The bucket for benchmarks, which cannot see crate-private types.
#[doc(hidden)]
pub mod bench {
    use std::time::Duration;

    use tokio::time::Instant;

    /// A shared bucket of `per_second` tokens a second up to `burst`.
    pub struct Bucket(super::Bucket);

    impl Bucket {
        pub fn new(per_second: u32, burst: u32) -> Self {
            Self(super::Bucket::new(
                super::Rate::new(per_second, burst),
                Instant::now(),
            ))
        }

        /// Takes a token at the current time.
        pub fn acquire(&self) -> Result<(), Duration> {
            self.0.acquire(Instant::now())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_gives_its_burst_then_refills_at_its_rate() {
        let bucket = Bucket::new(Rate::new(10, 3), Instant::now());
        for _ in 0..3 {
            assert_eq!(bucket.acquire(Instant::now()), Ok(()));
        }
        let wait = bucket.acquire(Instant::now()).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(bucket.acquire(Instant::now()).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(bucket.acquire(Instant::now()), Ok(()));
        assert!(bucket.acquire(Instant::now()).is_err());
        // A long pause refills it to its burst, no more.
        tokio::time::advance(Duration::from_secs(60)).await;
        let taken = (0..10)
            .filter(|_| bucket.acquire(Instant::now()).is_ok())
            .count();
        assert_eq!(taken, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn each_client_ip_has_its_own_bucket() {
        let limits = Limits::compile(
            &[Spec {
                requests_per_second: 1,
                burst: 1,
                per_client_ip: true,
            }],
            None,
            None,
        )
        .expect("limits");
        let now = Instant::now();
        assert_eq!(limits.acquire(Some(ip(1)), now), Ok(()));
        assert_eq!(
            limits.acquire(Some(ip(1)), now),
            Err(Duration::from_secs(1))
        );
        assert_eq!(limits.acquire(Some(ip(2)), now), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_per_ip_map_stays_bounded_and_drops_full_buckets_first() {
        let buckets = PerIp::new(Rate::new(1, 1), Instant::now());
        let now = Instant::now();
        let many = u32::try_from(SHARDS * MAX_IPS_PER_SHARD * 2).expect("small");
        for n in 0..many {
            assert_eq!(buckets.acquire(ip(n), now), Ok(()));
        }
        assert!(buckets.len() <= SHARDS * MAX_IPS_PER_SHARD);
        // Once every bucket is full again, a full shard sheds them all.
        tokio::time::advance(Duration::from_secs(2)).await;
        let later = Instant::now();
        for n in many..many + 4 * u32::try_from(SHARDS).expect("small") {
            assert_eq!(buckets.acquire(ip(n), later), Ok(()));
        }
        assert!(buckets.len() < SHARDS * MAX_IPS_PER_SHARD);
    }

    #[test]
    fn unchanged_limits_keep_their_buckets() {
        let spec = [Spec {
            requests_per_second: 5,
            ..Default::default()
        }];
        let first = Limits::compile(&spec, None, None).expect("limits");
        let same = Limits::compile(&spec, Some(&first), None).expect("limits");
        assert!(Arc::ptr_eq(&first, &same));
        let changed = [Spec {
            requests_per_second: 6,
            ..Default::default()
        }];
        let other = Limits::compile(&changed, Some(&first), None).expect("limits");
        assert!(!Arc::ptr_eq(&first, &other));
        assert!(Limits::compile(&[], Some(&first), None).is_none());
    }

    proptest! {
        /// Over any span `t`, a bucket admits at most `rate × t + burst`.
        #[test]
        fn a_bucket_never_admits_more_than_rate_times_time_plus_burst(
            per_second in 1u32..10_000,
            burst in 1u32..100,
            gaps in proptest::collection::vec(0u64..50_000_000, 1..400),
        ) {
            let start = std::time::Instant::now();
            let epoch = Instant::from_std(start);
            let bucket = Bucket::new(Rate::new(per_second, burst), epoch);
            let mut at = 0u64;
            let mut admitted = 0u64;
            for gap in gaps {
                at += gap;
                if bucket.acquire(epoch + Duration::from_nanos(at)).is_ok() {
                    admitted += 1;
                }
                // rate × t + burst, with t in nanoseconds.
                let bound = u128::from(per_second) * u128::from(at) / 1_000_000_000
                    + u128::from(burst);
                prop_assert!(u128::from(admitted) <= bound, "{admitted} > {bound}");
            }
        }
    }
}
