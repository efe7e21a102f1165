//! The server's idle and header read timeouts: a connection with no request
//! in flight for the whole timeout is shut down gracefully (HTTP/1 closes,
//! HTTP/2 sends GOAWAY). Each connection keeps one [`Activity`]; each request
//! holds an [`Active`] until its response body ends ([`super::inflight`]).
//!
//! It serves HTTP/2 connections (HTTP/1.1 ones keep their own timer in
//! [`super::h1::conn`]): one lazily re-armed timer per connection. Until its
//! first request a connection is bound by the shorter header read timeout
//! too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::Version;
use tokio::time::Instant;

/// What one connection is doing: requests in flight and when the last ended.
#[derive(Debug)]
pub(crate) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Set by the first HTTP/2 request: the header read timeout no longer
    /// applies (HTTP/2 has hyper's own stream and keep-alive handling).
    http2: AtomicBool,
    /// When the last request ended, in milliseconds after `opened`.
    last_end_ms: AtomicU64,
}

/// One request in flight on a connection, until dropped.
#[derive(Debug)]
pub(crate) struct Active(Arc<Activity>);

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            last_end_ms: AtomicU64::new(0),
        })
    }

    /// Counts a request of `version` in flight until the guard is dropped.
    pub(crate) fn start(self: &Arc<Self>, version: Version) -> Active {
        if version == Version::HTTP_2 && !self.http2.load(Ordering::Relaxed) {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Active(Arc::clone(self))
    }

    /// Whether the connection has carried an HTTP/2 request.
    pub(crate) fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    /// Resolves once no request has been in flight for `idle_timeout`, or,
    /// unless the connection has carried HTTP/2, for `header_read_timeout`
    /// if that is shorter.
    pub(crate) async fn idle(&self, idle_timeout: Duration, header_read_timeout: Duration) {
        loop {
            let timeout = if self.is_http2() {
                idle_timeout
            } else {
                idle_timeout.min(header_read_timeout)
            };
            let now = Instant::now();
            // Acquire pairs with the Release in `Active::drop`: a count of 0
            // comes with the end time stored before it.
            let deadline = if self.in_flight.load(Ordering::Acquire) == 0 {
                let last_end = Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed));
                let deadline = self.opened + last_end + timeout;
                if now >= deadline {
                    return;
                }
                deadline
            } else {
                // Busy: look again a whole timeout later at the earliest.
                now + timeout
            };
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let activity = &self.0;
        // Rounded up, so the connection is never closed early.
        let ended = activity.opened.elapsed().as_micros().div_ceil(1000);
        let ended = u64::try_from(ended).unwrap_or(u64::MAX);
        activity.last_end_ms.fetch_max(ended, Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn idle_once_no_request_was_in_flight_for_the_whole_timeout() {
        let activity = Activity::new();
        let start = Instant::now();
        activity.idle(TIMEOUT, TIMEOUT).await;
        assert_eq!(
            start.elapsed(),
            TIMEOUT,
            "a connection that never asked anything"
        );

        let request = activity.start(Version::HTTP_11);
        let start = Instant::now();
        let idle = activity.idle(TIMEOUT, TIMEOUT);
        tokio::pin!(idle);
        tokio::select! {
            () = &mut idle => panic!("idle while a request is in flight"),
            () = tokio::time::sleep(3 * TIMEOUT) => {}
        }
        drop(request);
        let ended = Instant::now();
        idle.await;
        assert_eq!(ended.duration_since(start), 3 * TIMEOUT);
        assert!(
            ended.elapsed() >= TIMEOUT,
            "counted from the end of the last request"
        );
        assert!(ended.elapsed() <= TIMEOUT + Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn http1_is_bound_by_the_header_read_timeout_and_http2_is_not() {
        let header_read = TIMEOUT / 6;
        let activity = Activity::new();
        let start = Instant::now();
        drop(activity.start(Version::HTTP_11));
        activity.idle(TIMEOUT, header_read).await;
        assert_eq!(start.elapsed(), header_read, "HTTP/1: the shorter bound");

        let activity = Activity::new();
        let start = Instant::now();
        drop(activity.start(Version::HTTP_2));
        activity.idle(TIMEOUT, header_read).await;
        assert_eq!(start.elapsed(), TIMEOUT, "HTTP/2: the idle timeout only");
    }
}
