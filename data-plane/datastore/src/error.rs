//! The one error type of every backend, classified for the caller: the proxy
//! maps each variant to one gRPC status and one HTTP status.

/// A boxed error source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a data operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A compare-and-set found another version (`found` is `None` when the
    /// key does not exist). gRPC FAILED_PRECONDITION, HTTP 412.
    #[error("version mismatch on `{key}`: expected {expected}, found {}", found.map_or_else(|| "no value".to_string(), |v| v.to_string()))]
    VersionMismatch {
        key: String,
        expected: u64,
        found: Option<u64>,
    },
    /// The request is not one this backend can serve (a bad topic name, a
    /// key the store cannot hold). gRPC INVALID_ARGUMENT, HTTP 400.
    #[error("{0}")]
    Invalid(String),
    /// The store or broker cannot be reached or refused the connection:
    /// the caller may retry. gRPC UNAVAILABLE, HTTP 503.
    #[error("{what}: {source}")]
    Unavailable {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    /// A bound was reached (a consumer group's members, the broker's own
    /// quota). gRPC RESOURCE_EXHAUSTED, HTTP 429.
    #[error("{0}")]
    Exhausted(String),
    /// Anything else the backend reported. gRPC INTERNAL, HTTP 500.
    #[error("{what}: {source}")]
    Internal {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    /// The backend was closed (its binding removed or replaced and drained).
    /// gRPC UNAVAILABLE, HTTP 503.
    #[error("the binding was closed")]
    Closed,
}

// Used by every backend with a driver; a build with none has no use for them.
#[cfg_attr(
    not(any(
        feature = "sqlite",
        feature = "postgres",
        feature = "nats",
        feature = "kafka"
    )),
    allow(dead_code)
)]
impl Error {
    pub(crate) fn unavailable(what: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            what,
            source: source.into(),
        }
    }

    pub(crate) fn internal(what: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Internal {
            what,
            source: source.into(),
        }
    }
}
