//! Passive outlier ejection, per endpoint: consecutive 5xx responses or
//! consecutive gateway failures (connect failures, resets, timeouts, and
//! 502/503/504) eject the endpoint from its balancer for `base_ejection_time`
//! × the number of times it was ejected, at most `max_ejection_time`. A
//! backend never has more than `max_ejection_percent` of its endpoints
//! ejected at once, except that one endpoint may always be ejected.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use prism_proto::defaults::{duration_or, nonzero_or, outlier as defaults};
use prism_proto::pb::config::v1::OutlierDetection;
use tokio::time::Instant;

/// Outlier detection settings, defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Params {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

/// One endpoint's outlier state.
#[derive(Debug)]
pub(crate) struct Outlier {
    params: Params,
    /// Time zero for `ejected_until`.
    epoch: Instant,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Times ejected so far.
    ejections: AtomicU32,
    /// Ejected until this many nanoseconds after `epoch`; 0 when never.
    ejected_until: AtomicU64,
}

/// How one request to an endpoint went, as outlier detection sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    /// A 5xx response from the upstream; `gateway` for 502, 503 and 504.
    ServerError {
        gateway: bool,
    },
    /// The proxy could not get a response: connect failure, reset, timeout.
    GatewayFailure,
}

impl Params {
    pub(crate) fn new(spec: &OutlierDetection) -> Self {
        Self {
            consecutive_5xx: nonzero_or(spec.consecutive_5xx, defaults::CONSECUTIVE_5XX),
            consecutive_gateway_failure: nonzero_or(
                spec.consecutive_gateway_failure,
                defaults::CONSECUTIVE_GATEWAY_FAILURE,
            ),
            base_ejection_time: duration_or(
                spec.base_ejection_time.as_ref(),
                defaults::BASE_EJECTION_TIME,
            ),
            max_ejection_time: duration_or(
                spec.max_ejection_time.as_ref(),
                defaults::MAX_EJECTION_TIME,
            ),
            max_ejection_percent: nonzero_or(
                spec.max_ejection_percent,
                defaults::MAX_EJECTION_PERCENT,
            ),
        }
    }

    /// How many of `endpoints` may be ejected at once: the percentage, but
    /// at least one.
    pub(crate) fn max_ejected(&self, endpoints: usize) -> usize {
        (endpoints * self.max_ejection_percent as usize / 100).max(1)
    }
}

impl Outlier {
    pub(crate) fn new(params: Params) -> Self {
        Self {
            params,
            epoch: Instant::now(),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }

    pub(crate) fn params(&self) -> &Params {
        &self.params
    }

    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        until != 0 && self.nanos(now) < until
    }

    /// Counts `outcome`; true when the endpoint has now failed enough times
    /// in a row to be ejected (the caller decides whether it may be).
    pub(crate) fn record(&self, outcome: Outcome) -> bool {
        let bump = |counter: &AtomicU32, threshold: u32| {
            counter.fetch_add(1, Ordering::AcqRel) + 1 >= threshold
        };
        let reset = |counter: &AtomicU32| {
            if counter.load(Ordering::Relaxed) != 0 {
                counter.store(0, Ordering::Relaxed);
            }
        };
        match outcome {
            Outcome::Success => {
                reset(&self.consecutive_5xx);
                reset(&self.consecutive_gateway);
                false
            }
            Outcome::ServerError { gateway } => {
                let by_5xx = bump(&self.consecutive_5xx, self.params.consecutive_5xx);
                let by_gateway = if gateway {
                    bump(
                        &self.consecutive_gateway,
                        self.params.consecutive_gateway_failure,
                    )
                } else {
                    reset(&self.consecutive_gateway);
                    false
                };
                by_5xx || by_gateway
            }
            Outcome::GatewayFailure => {
                reset(&self.consecutive_5xx);
                bump(
                    &self.consecutive_gateway,
                    self.params.consecutive_gateway_failure,
                )
            }
        }
    }

    /// Ejects the endpoint from `now` for base × times ejected (capped),
    /// and starts its failure counts afresh.
    pub(crate) fn eject(&self, now: Instant) {
        let times = self.ejections.fetch_add(1, Ordering::AcqRel) + 1;
        let time = self
            .params
            .base_ejection_time
            .saturating_mul(times)
            .min(self.params.max_ejection_time);
        self.ejected_until
            .store(self.nanos(now + time).max(1), Ordering::Release);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params::new(&OutlierDetection {
            consecutive_5xx: 3,
            consecutive_gateway_failure: 2,
            ..Default::default()
        })
    }

    #[test]
    fn counts_only_failures_in_a_row() {
        let o = Outlier::new(params());
        let server = Outcome::ServerError { gateway: false };
        assert!(!o.record(server));
        assert!(!o.record(server));
        assert!(!o.record(Outcome::Success));
        assert!(!o.record(server));
        assert!(!o.record(server));
        assert!(o.record(server));
        // Gateway failures have their own, smaller threshold.
        let o = Outlier::new(params());
        assert!(!o.record(Outcome::GatewayFailure));
        assert!(o.record(Outcome::ServerError { gateway: true }));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_with_each_ejection_up_to_the_cap() {
        let o = Outlier::new(Params {
            max_ejection_time: Duration::from_secs(70),
            ..params()
        });
        let mut now = Instant::now();
        for expected in [30, 60, 70, 70] {
            o.eject(now);
            let until = now + Duration::from_secs(expected);
            assert!(o.is_ejected(until - Duration::from_millis(1)), "{expected}");
            assert!(!o.is_ejected(until), "{expected}");
            now = until;
        }
        assert_eq!(params().max_ejected(3), 1, "one may always be ejected");
        assert_eq!(params().max_ejected(30), 3);
    }
}
