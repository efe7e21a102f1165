//! Hot-path pieces of the backends, opened up for the criterion benches in
//! `data-plane/benches/` (the types themselves stay crate-private).

use std::sync::atomic::{AtomicU32, Ordering};

use prism_proto::LbPolicy;
use prism_proto::pb::config::v1::{CircuitBreaker, HashPolicy, hash_policy};
use tokio::time::Instant;

use super::balance::{self, Endpoints};
use super::breaker;

/// One endpoint's circuit breaker with the default settings.
pub struct Breaker(breaker::Breaker);

/// A balancer over `n` endpoints, all available, none busy.
pub struct Balancer {
    inner: balance::Balancer,
    endpoints: Fake,
}

struct Fake(Vec<AtomicU32>);

impl Breaker {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self(breaker::Breaker::new(breaker::Params::new(
            &CircuitBreaker::default(),
        )))
    }

    /// What the breaker stage does per request: admit, then record; whether
    /// it was let through.
    pub fn call(&self, success: bool) -> bool {
        match self.0.admit(Instant::now) {
            Some(admit) => {
                self.0.record(admit, success, Instant::now);
                true
            }
            None => false,
        }
    }
}

impl Balancer {
    /// `policy` over `n` endpoints with weights 1, 2, 3, 1, 2, 3, …
    pub fn new(policy: LbPolicy, n: usize) -> Self {
        let specs: Vec<prism_proto::Endpoint> = (0..n)
            .map(|i| prism_proto::Endpoint {
                address: format!("10.0.{}.{}:80", i / 250, i % 250 + 1),
                weight: (i % 3 + 1) as u32,
                ..Default::default()
            })
            .collect();
        let hash = HashPolicy {
            key: Some(hash_policy::Key::Header("x-user".into())),
        };
        Self {
            inner: balance::Balancer::new(policy, Some(&hash), None, &specs, ""),
            endpoints: Fake((0..n).map(|_| AtomicU32::new(0)).collect()),
        }
    }

    /// One pick, for a request whose hash key is `key`.
    pub fn pick(&self, key: u64) -> Option<usize> {
        self.inner.pick(&self.endpoints, Some(key))
    }
}

impl Endpoints for Fake {
    fn available(&self, _index: usize) -> bool {
        true
    }

    fn in_flight(&self, index: usize) -> u32 {
        self.0[index].load(Ordering::Relaxed)
    }
}
