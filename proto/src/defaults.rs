//! Every default the schema's comments promise, written once.
//!
//! `config.proto` says what an unset field means ("5s when unset", "3 when
//! 0"); this module is where that sentence becomes a value. Both planes read
//! it: the proxy when it compiles a runtime, the control plane when it
//! translates policy for Envoy. A default written twice drifts (the route
//! timeout once meant one thing to Envoy and another to our proxy), so
//! nothing outside prism-proto spells one out.

use std::time::Duration;

use crate::pb::config::v1::{RateLimit, RetryPolicy};

/// Whole-request timeout of a route when neither it nor its namespace sets
/// one: from the request until the response's last byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Time allowed to open a connection to an endpoint (`Backend.connect_timeout`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Weight of an endpoint that sets 0.
pub const ENDPOINT_WEIGHT: u32 = 1;

/// `Backend.zone_aware.min_healthy_percent` when 0.
pub const ZONE_AWARE_MIN_HEALTHY_PERCENT: u32 = 70;

/// `Backend.health_check`.
pub mod health_check {
    use std::time::Duration;

    /// Time between two probes of one endpoint.
    pub const INTERVAL: Duration = Duration::from_secs(10);
    /// Time a probe may take.
    pub const TIMEOUT: Duration = Duration::from_secs(1);
    /// Failed probes in a row that mark an endpoint unhealthy.
    pub const UNHEALTHY_THRESHOLD: u32 = 3;
    /// Passed probes in a row that mark it healthy again.
    pub const HEALTHY_THRESHOLD: u32 = 2;
}

/// `Backend.outlier_detection`.
pub mod outlier {
    use std::time::Duration;

    /// Consecutive 5xx responses that eject an endpoint.
    pub const CONSECUTIVE_5XX: u32 = 5;
    /// Consecutive gateway failures (502, 503, 504 made by the proxy).
    pub const CONSECUTIVE_GATEWAY_FAILURE: u32 = 5;
    /// Ejection time, multiplied by the number of ejections.
    pub const BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
    /// Ejection time never grows past this.
    pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
    /// At most this share of the endpoints is ejected at once.
    pub const MAX_EJECTION_PERCENT: u32 = 10;
}

/// `Backend.circuit_breaker`, per endpoint.
pub mod circuit_breaker {
    use std::time::Duration;

    /// Consecutive failures that open the breaker.
    pub const FAILURE_THRESHOLD: u32 = 5;
    /// Time open before probes go through (half-open).
    pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
    /// Probes let through while half-open.
    pub const HALF_OPEN_MAX_REQUESTS: u32 = 1;
    /// Successes that close it again.
    pub const SUCCESS_THRESHOLD: u32 = 2;
}

/// `Backend.limits`.
pub mod limits {
    use std::time::Duration;

    /// Open connections to all endpoints of a backend together.
    pub const MAX_CONNECTIONS: u32 = 1024;
    /// Requests waiting for a connection.
    pub const MAX_PENDING_REQUESTS: u32 = 1024;
    /// Requests in flight.
    pub const MAX_REQUESTS: u32 = 1024;
    /// Requests on one upstream connection before it is closed: unlimited.
    pub const MAX_REQUESTS_PER_CONNECTION: Option<u32> = None;
    /// An idle pooled connection is closed after this.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
}

/// `Route.retry`.
pub mod retry {
    use std::time::Duration;

    /// Retries after the first try.
    pub const NUM_RETRIES: u32 = 1;
    /// What is retried when `retry_on` is empty.
    pub const RETRY_ON: &[&str] = &["connect-failure", "gateway-error"];
    /// Every value `retry_on` may hold, as Envoy spells them.
    pub const RETRY_ON_VALUES: &[&str] = &[
        "connect-failure",
        "reset",
        "5xx",
        "gateway-error",
        "retriable-4xx",
        "cancelled",
        "deadline-exceeded",
        "resource-exhausted",
        "unavailable",
        "internal",
    ];
    /// First backoff.
    pub const BASE_INTERVAL: Duration = Duration::from_millis(25);
    /// The backoff never grows past `MAX_INTERVAL_FACTOR` × the base interval
    /// unless `max_interval` says otherwise.
    pub const MAX_INTERVAL_FACTOR: u32 = 10;
    /// Retries in flight stay at most this share of requests in flight.
    pub const BUDGET_PERCENT: u32 = 20;
    /// Retries always allowed however few requests are in flight.
    pub const MIN_RETRY_CONCURRENCY: u32 = 3;
}

/// `DataBinding`.
pub mod binding {
    use std::time::Duration;

    /// Connections in a KeyValue store's pool.
    pub const POOL_SIZE: u32 = 4;
    /// The most connections a pool may ask for.
    pub const MAX_POOL_SIZE: u32 = 256;
    /// How long opening a store or bus may take.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The largest value or payload accepted.
    pub const MAX_VALUE_BYTES: u64 = 1024 * 1024;
    /// The most `max_value_bytes` may be: what one gRPC message of the data
    /// APIs may carry.
    pub const MAX_VALUE_BYTES_LIMIT: u64 = 4 * 1024 * 1024;
    /// Redelivery of an unacknowledged group delivery.
    pub const ACK_WAIT: Duration = Duration::from_secs(30);
    /// Partitions of a Kafka topic Prism makes.
    pub const KAFKA_PARTITIONS: u32 = 1;
}

/// `Route.redirect.status` when 0.
pub const REDIRECT_STATUS: u32 = 302;
/// Content type of a `direct_response` body unless `response_headers` sets one.
pub const DIRECT_RESPONSE_CONTENT_TYPE: &str = "text/plain";

/// `value`, or `default` when it is 0: the schema's "N when 0".
pub const fn nonzero_or(value: u32, default: u32) -> u32 {
    if value == 0 { default } else { value }
}

/// An optional protobuf duration as a std one, `default` when it is unset.
///
/// A negative or zero duration (which validation refuses) also takes the
/// default, so a caller never sees a zero timeout by accident.
pub fn duration_or(value: Option<&pbjson_types::Duration>, default: Duration) -> Duration {
    value.and_then(to_std).unwrap_or(default)
}

/// A positive protobuf duration as a std one; `None` for zero or negative.
pub fn to_std(d: &pbjson_types::Duration) -> Option<Duration> {
    let seconds = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(seconds, nanos)).filter(|d| !d.is_zero())
}

/// A rate limit's bucket size: `burst`, or `requests_per_second` when 0.
pub fn rate_limit_burst(limit: &RateLimit) -> u32 {
    nonzero_or(limit.burst, limit.requests_per_second)
}

/// A retry policy's `retry_on`, or [`retry::RETRY_ON`] when it is empty.
pub fn retry_on(policy: &RetryPolicy) -> Vec<&str> {
    if policy.retry_on.is_empty() {
        retry::RETRY_ON.to_vec()
    } else {
        policy.retry_on.iter().map(String::as_str).collect()
    }
}

/// A retry policy's first backoff.
pub fn retry_base_interval(policy: &RetryPolicy) -> Duration {
    duration_or(policy.base_interval.as_ref(), retry::BASE_INTERVAL)
}

/// A retry policy's largest backoff: `max_interval`, or
/// [`retry::MAX_INTERVAL_FACTOR`] × the base interval.
pub fn retry_max_interval(policy: &RetryPolicy) -> Duration {
    duration_or(
        policy.max_interval.as_ref(),
        retry_base_interval(policy) * retry::MAX_INTERVAL_FACTOR,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_and_zero_take_the_default() {
        assert_eq!(duration_or(None, CONNECT_TIMEOUT), CONNECT_TIMEOUT);
        let zero = pbjson_types::Duration {
            seconds: 0,
            nanos: 0,
        };
        assert_eq!(duration_or(Some(&zero), REQUEST_TIMEOUT), REQUEST_TIMEOUT);
        let set = pbjson_types::Duration {
            seconds: 2,
            nanos: 500_000_000,
        };
        assert_eq!(
            duration_or(Some(&set), REQUEST_TIMEOUT),
            Duration::from_millis(2500)
        );
        assert_eq!(nonzero_or(0, 3), 3);
        assert_eq!(nonzero_or(7, 3), 7);
    }

    #[test]
    fn derived_defaults_follow_their_base() {
        let limit = RateLimit {
            requests_per_second: 50,
            ..Default::default()
        };
        assert_eq!(rate_limit_burst(&limit), 50);
        let policy = RetryPolicy {
            base_interval: Some(pbjson_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            ..Default::default()
        };
        assert_eq!(retry_max_interval(&policy), Duration::from_secs(1));
        assert_eq!(
            retry_on(&RetryPolicy::default()),
            ["connect-failure", "gateway-error"]
        );
        assert!(
            retry::RETRY_ON
                .iter()
                .all(|v| retry::RETRY_ON_VALUES.contains(v))
        );
    }
}
