//! Why a request failed, in the proxy's own words. Stages return [`BoxError`]
//! (tower's convention, so any layer composes); the errors Prism makes are
//! [`ProxyError`]s, found again by walking the cause chain. Each knows who is
//! to blame, whether a retry may send the request again, and a static kind
//! for logs and metric labels. [`super::respond`] turns them into responses.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// The error type at every tower boundary of the request path.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// Who caused a failed request (Pingora's error source).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Blame {
    /// The request itself: nothing the operator or the upstream can fix.
    Client,
    /// The proxy: its configuration or a bug.
    Proxy,
    /// The upstream: it could not be reached, or it failed or was too slow.
    Upstream,
}

/// Why a request could not be forwarded. Its message is what the client sees;
/// the cause chain, if any, is only logged.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("no configuration yet")]
    NotConfigured,
    #[error("no route for host {host} path {path}")]
    NoRoute { host: String, path: String },
    /// Every endpoint of the backend is out of its balancer (unhealthy,
    /// ejected or behind an open circuit breaker).
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    #[error("upstream connect error")]
    Connect(#[source] BoxError),
    #[error("upstream connect timeout")]
    ConnectTimeout,
    #[error("upstream request timeout")]
    Timeout,
    #[error("upstream request failed")]
    Upstream(#[source] BoxError),
    /// A rate limit of the route or its namespace refused the request; a
    /// token is there again after `retry_after`.
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    /// The request body is longer than the route's `max_request_body_bytes`.
    #[error("request body too large")]
    BodyTooLarge,
    /// The proxy-wide concurrency limit is reached.
    #[error("proxy overloaded")]
    Overloaded,
    /// The backend is at its `limits.max_connections` and as many requests
    /// as its `limits.max_pending_requests` already wait for a connection.
    #[error("backend overloaded: too many requests waiting for a connection")]
    PendingOverflow,
    /// The backend has its `limits.max_requests` in flight.
    #[error("backend overloaded: too many requests in flight")]
    RequestsOverflow,
    /// An error no stage classified: a bug, reported without detail.
    #[error("internal error")]
    Internal,
}

/// An error and its cause chain on one line, `outer: cause: root cause`, for logs.
pub(crate) struct Chain<'a>(pub &'a (dyn StdError + 'static));

/// What an error that is not a [`ProxyError`] counts as.
static INTERNAL: ProxyError = ProxyError::Internal;

impl ProxyError {
    /// A static name for logs and metric labels.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ProxyError::NotConfigured => "not_configured",
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::NoHealthyUpstream => "no_healthy_upstream",
            ProxyError::Connect(_) => "connect",
            ProxyError::ConnectTimeout => "connect_timeout",
            ProxyError::Timeout => "timeout",
            ProxyError::Upstream(_) => "upstream",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::Overloaded => "overloaded",
            ProxyError::PendingOverflow => "pending_overflow",
            ProxyError::RequestsOverflow => "requests_overflow",
            ProxyError::Internal => "internal",
        }
    }

    pub(crate) fn blame(&self) -> Blame {
        match self {
            ProxyError::NoRoute { .. }
            | ProxyError::RateLimited { .. }
            | ProxyError::BodyTooLarge => Blame::Client,
            ProxyError::NotConfigured | ProxyError::Overloaded | ProxyError::Internal => {
                Blame::Proxy
            }
            // The backend is too slow for the traffic sent its way.
            ProxyError::PendingOverflow | ProxyError::RequestsOverflow => Blame::Upstream,
            ProxyError::NoHealthyUpstream
            | ProxyError::Connect(_)
            | ProxyError::ConnectTimeout
            | ProxyError::Timeout
            | ProxyError::Upstream(_) => Blame::Upstream,
        }
    }

    /// Whether the request may be sent again, to this or another endpoint:
    /// only when it cannot have reached an upstream, so even a non-idempotent
    /// request is safe to resend. The route timeout is final either way, and
    /// so is a backend limit: a retry would go to the same backend, and
    /// would add to its load.
    pub(crate) fn retryable(&self) -> bool {
        matches!(self, ProxyError::Connect(_) | ProxyError::ConnectTimeout)
    }

    /// The first `ProxyError` in `error`'s cause chain, or
    /// [`ProxyError::Internal`] when there is none.
    pub(crate) fn classify<'a>(error: &'a (dyn StdError + 'static)) -> &'a ProxyError {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if let Some(found) = e.downcast_ref::<ProxyError>() {
                return found;
            }
            cause = e.source();
        }
        &INTERNAL
    }
}

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapper(#[source] ProxyError);

    #[test]
    fn classification_walks_the_cause_chain() {
        let wrapped = Wrapper(ProxyError::Timeout);
        assert_eq!(ProxyError::classify(&wrapped).kind(), "timeout");
        let foreign = std::io::Error::other("boom");
        assert_eq!(ProxyError::classify(&foreign).kind(), "internal");
        assert_eq!(ProxyError::classify(&foreign).blame(), Blame::Proxy);
    }

    #[test]
    fn only_errors_before_anything_was_sent_are_retryable() {
        let refused: BoxError = std::io::Error::other("refused").into();
        assert!(ProxyError::Connect(refused).retryable());
        assert!(ProxyError::ConnectTimeout.retryable());
        let reset: BoxError = std::io::Error::other("reset").into();
        assert!(!ProxyError::Upstream(reset).retryable());
        assert!(!ProxyError::Timeout.retryable());
        assert_eq!(ProxyError::Timeout.blame(), Blame::Upstream);
        let no_route = ProxyError::NoRoute {
            host: "h".into(),
            path: "/".into(),
        };
        assert_eq!(no_route.blame(), Blame::Client);
    }

    #[test]
    fn the_chain_shows_every_cause() {
        let root: BoxError = std::io::Error::other("connection refused").into();
        let error = ProxyError::Connect(root);
        assert_eq!(
            Chain(&error).to_string(),
            "upstream connect error: connection refused"
        );
    }
}
