//! A per-endpoint circuit breaker on atomics: closed → open after
//! `failure_threshold` consecutive failures → half-open once `open_timeout`
//! has passed, letting at most `half_open_max_requests` probes through at a
//! time → closed after `success_threshold` successes in a row, or open again
//! on a failure. No lock: every transition is one compare-and-swap on the
//! state, and the counters are plain atomics beside it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use prism_proto::defaults::{circuit_breaker as defaults, duration_or, nonzero_or};
use prism_proto::pb::config::v1::CircuitBreaker;
use tokio::time::Instant;

use crate::metrics::{BackendSeries, BreakerState};

/// A breaker's settings, defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Params {
    pub failure_threshold: u32,
    pub open_timeout: Duration,
    pub half_open_max_requests: u32,
    pub success_threshold: u32,
}

/// One endpoint's breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    params: Params,
    /// Time zero for `opened_at`.
    epoch: Instant,
    state: AtomicU8,
    /// Consecutive failures while closed.
    failures: AtomicU32,
    /// Successes in a row while half-open.
    successes: AtomicU32,
    /// Probes in flight while half-open.
    probes: AtomicU32,
    /// When it last opened, in nanoseconds since `epoch`.
    opened_at: AtomicU64,
    /// Where its backend counts transitions; `None` with metrics off.
    series: Option<Arc<BackendSeries>>,
}

/// Whether the breaker let a request through, and as what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Closed: any number go through.
    Closed,
    /// Half-open: one of the bounded probes; give its slot back with
    /// [`Breaker::record`] or [`Breaker::abandon`].
    Probe,
}

/// A breaker's state, as the load reports show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Closed,
    Open,
    HalfOpen,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

impl Params {
    pub(crate) fn new(spec: &CircuitBreaker) -> Self {
        Self {
            failure_threshold: nonzero_or(spec.failure_threshold, defaults::FAILURE_THRESHOLD),
            open_timeout: duration_or(spec.open_timeout.as_ref(), defaults::OPEN_TIMEOUT),
            half_open_max_requests: nonzero_or(
                spec.half_open_max_requests,
                defaults::HALF_OPEN_MAX_REQUESTS,
            ),
            success_threshold: nonzero_or(spec.success_threshold, defaults::SUCCESS_THRESHOLD),
        }
    }
}

impl Breaker {
    pub(crate) fn new(params: Params) -> Self {
        Self {
            params,
            epoch: Instant::now(),
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
            probes: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            series: None,
        }
    }

    /// This breaker, counting its transitions in `series`.
    pub(crate) fn with_series(mut self, series: Option<Arc<BackendSeries>>) -> Self {
        self.series = series;
        self
    }

    /// Its state now (an open breaker whose timeout has passed stays
    /// `Open` until a request finds it so).
    pub(crate) fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            CLOSED => State::Closed,
            OPEN => State::Open,
            _ => State::HalfOpen,
        }
    }

    /// Whether a request may go through at `now`, without taking a probe
    /// slot: what the balancer asks before it picks the endpoint.
    pub(crate) fn available(&self, now: Instant) -> bool {
        match self.state.load(Ordering::Acquire) {
            CLOSED => true,
            OPEN => self.open_elapsed(now),
            _ => self.probes.load(Ordering::Relaxed) < self.params.half_open_max_requests,
        }
    }

    /// Lets a request through, or refuses it (`None`). The clock is read
    /// (`now`) only while the breaker is open: a closed breaker, the common
    /// case, costs one atomic load.
    #[inline]
    pub(crate) fn admit(&self, now: impl FnOnce() -> Instant) -> Option<Admit> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Some(Admit::Closed);
        }
        self.admit_slow(now())
    }

    /// [`Self::admit`] past the closed fast path.
    fn admit_slow(&self, now: Instant) -> Option<Admit> {
        loop {
            match self.state.load(Ordering::Acquire) {
                CLOSED => return Some(Admit::Closed),
                OPEN => {
                    if !self.open_elapsed(now) {
                        return None;
                    }
                    // The first to see the timeout run out turns it half-open.
                    // `probes` is not reset: probes of an earlier half-open
                    // spell still in flight keep their slots until they end.
                    self.successes.store(0, Ordering::Relaxed);
                    if self
                        .state
                        .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.count(BreakerState::HalfOpen);
                    }
                }
                _ => {
                    let taken = self.probes.fetch_add(1, Ordering::AcqRel);
                    if taken < self.params.half_open_max_requests {
                        return Some(Admit::Probe);
                    }
                    self.probes.fetch_sub(1, Ordering::AcqRel);
                    return None;
                }
            }
        }
    }

    /// The outcome of a request that [`Self::admit`] let through. The clock
    /// is read (`now`) only when a failure opens the breaker.
    #[inline]
    pub(crate) fn record(&self, admit: Admit, success: bool, now: impl FnOnce() -> Instant) {
        if admit == Admit::Probe {
            self.probes.fetch_sub(1, Ordering::AcqRel);
        }
        match (self.state.load(Ordering::Acquire), success) {
            // Skip the store when already 0: no cache-line write per success.
            (CLOSED, true) if self.failures.load(Ordering::Relaxed) != 0 => {
                self.failures.store(0, Ordering::Relaxed);
            }
            (CLOSED, true) => {}
            (CLOSED, false) => {
                let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                if failures >= self.params.failure_threshold {
                    self.open(CLOSED, now());
                }
            }
            (HALF_OPEN, true) => {
                let successes = self.successes.fetch_add(1, Ordering::AcqRel) + 1;
                if successes >= self.params.success_threshold
                    && self
                        .state
                        .compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    self.failures.store(0, Ordering::Relaxed);
                    self.count(BreakerState::Closed);
                }
            }
            (HALF_OPEN, false) => self.open(HALF_OPEN, now()),
            // Open: a request admitted before it opened; it changes nothing.
            _ => {}
        }
    }

    /// A request let through that ended without an outcome (cancelled).
    pub(crate) fn abandon(&self, admit: Admit) {
        if admit == Admit::Probe {
            self.probes.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn open(&self, from: u8, now: Instant) {
        let at =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        // Written before the state, so whoever sees OPEN sees this time.
        self.opened_at.store(at, Ordering::Release);
        if self
            .state
            .compare_exchange(from, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.count(BreakerState::Open);
        }
    }

    /// One transition into `state`, for the metrics.
    fn count(&self, state: BreakerState) {
        if let Some(series) = &self.series {
            series.breaker(state);
        }
    }

    fn open_elapsed(&self, now: Instant) -> bool {
        let opened = Duration::from_nanos(self.opened_at.load(Ordering::Acquire));
        now.saturating_duration_since(self.epoch) >= opened + self.params.open_timeout
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn params() -> Params {
        Params::new(&CircuitBreaker::default())
    }

    #[test]
    fn defaults_are_the_schemas() {
        assert_eq!(
            params(),
            Params {
                failure_threshold: 5,
                open_timeout: Duration::from_secs(30),
                half_open_max_requests: 1,
                success_threshold: 2,
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_then_probes_then_closes() {
        let b = Breaker::new(params());
        let t0 = Instant::now();
        for _ in 0..4 {
            b.record(b.admit(|| t0).expect("closed"), false, || t0);
        }
        // A success resets the count.
        b.record(Admit::Closed, true, || t0);
        for _ in 0..4 {
            b.record(b.admit(|| t0).expect("closed"), false, || t0);
        }
        assert_eq!(b.state(), State::Closed);
        b.record(b.admit(|| t0).expect("closed"), false, || t0);
        assert_eq!(b.state(), State::Open);
        assert!(!b.available(t0));
        assert_eq!(b.admit(|| t0 + Duration::from_secs(29)), None);

        let t1 = t0 + Duration::from_secs(30);
        assert!(b.available(t1));
        let probe = b.admit(|| t1).expect("half-open");
        assert_eq!(probe, Admit::Probe);
        assert_eq!(b.state(), State::HalfOpen);
        // One probe at a time.
        assert!(!b.available(t1));
        assert_eq!(b.admit(|| t1), None);
        b.record(probe, true, || t1);
        assert_eq!(b.state(), State::HalfOpen);
        b.record(b.admit(|| t1).expect("probe"), true, || t1);
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again_for_a_full_timeout() {
        let b = Breaker::new(params());
        let t0 = Instant::now();
        for _ in 0..5 {
            b.record(Admit::Closed, false, || t0);
        }
        let t1 = t0 + Duration::from_secs(30);
        let probe = b.admit(|| t1).expect("probe");
        b.record(probe, false, || t1);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(|| t1 + Duration::from_secs(29)), None);
        assert!(b.admit(|| t1 + Duration::from_secs(30)).is_some());
    }

    /// A reference model of the state machine, run step by step beside the breaker.
    #[derive(Debug, Clone)]
    enum Step {
        Admit,
        Succeed,
        Fail,
        Abandon,
        Wait(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Admit),
            Just(Step::Succeed),
            Just(Step::Fail),
            Just(Step::Abandon),
            (0u64..40).prop_map(Step::Wait),
        ]
    }

    proptest! {
        #[test]
        fn matches_the_model(
            steps in proptest::collection::vec(step(), 0..120),
            failure_threshold in 1u32..5,
            half_open_max_requests in 1u32..3,
            success_threshold in 1u32..4,
        ) {
            let p = Params {
                failure_threshold,
                open_timeout: Duration::from_secs(30),
                half_open_max_requests,
                success_threshold,
            };
            // After the breaker's own time zero, as every real `now` is.
            let b = Breaker::new(p);
            let start = Instant::now();
            let mut now = start;
            // The model.
            let (mut state, mut failures, mut successes, mut opened) =
                (State::Closed, 0u32, 0u32, start);
            let mut admitted: Vec<Admit> = Vec::new();
            for s in steps {
                match s {
                    Step::Wait(secs) => now += Duration::from_secs(secs),
                    Step::Admit => {
                        if state == State::Open && now >= opened + p.open_timeout {
                            state = State::HalfOpen;
                            successes = 0;
                        }
                        let probes = admitted.iter().filter(|a| **a == Admit::Probe).count() as u32;
                        let expected = match state {
                            State::Closed => Some(Admit::Closed),
                            State::Open => None,
                            State::HalfOpen => (probes < p.half_open_max_requests).then_some(Admit::Probe),
                        };
                        let got = b.admit(|| now);
                        prop_assert_eq!(got, expected);
                        admitted.extend(got);
                    }
                    Step::Succeed | Step::Fail | Step::Abandon => {
                        let Some(admit) = admitted.pop() else { continue };
                        match s {
                            Step::Abandon => b.abandon(admit),
                            Step::Succeed => {
                                b.record(admit, true, || now);
                                match state {
                                    State::Closed => failures = 0,
                                    State::HalfOpen => {
                                        successes += 1;
                                        if successes >= p.success_threshold {
                                            state = State::Closed;
                                            failures = 0;
                                        }
                                    }
                                    State::Open => {}
                                }
                            }
                            _ => {
                                b.record(admit, false, || now);
                                match state {
                                    State::Closed => {
                                        failures += 1;
                                        if failures >= p.failure_threshold {
                                            state = State::Open;
                                            opened = now;
                                        }
                                    }
                                    State::HalfOpen => {
                                        state = State::Open;
                                        opened = now;
                                    }
                                    State::Open => {}
                                }
                            }
                        }
                    }
                }
                prop_assert_eq!(b.state(), state);
            }
        }
    }
}
