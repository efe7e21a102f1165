//! Why a data call failed, and the one table that turns it into a gRPC
//! status or an HTTP/JSON answer: every status of the data APIs is decided
//! here. The message is what the client sees; a store's cause chain is only
//! logged.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use prism_datastore::Error as StoreError;
use tonic::{Code, Status};
use tracing::{debug, warn};

use super::DataBody;
use crate::http::error::Chain;

/// A data call's failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DataError {
    /// A field of the request is missing or malformed.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("key `{0}` not found")]
    KeyNotFound(String),
    #[error("namespace `{namespace}` has no {api} binding")]
    NoBinding {
        namespace: String,
        api: &'static str,
    },
    #[error("the {api} binding `{binding}` does not let in {caller}")]
    Denied {
        api: &'static str,
        binding: String,
        caller: String,
    },
    #[error("{what} is {size} bytes, more than the binding's max_value_bytes ({limit})")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    #[error("no configuration yet")]
    NotConfigured,
    /// The binding's namespace is moving to another store: a write is
    /// refused until the new store serves it.
    #[error("the namespace of `{binding}` is moving to another store; retry")]
    Moving { binding: String },
    #[error("subscription `{0}` is not open on this proxy")]
    NoSubscription(String),
    #[error("no data API at {0}")]
    UnknownPath(String),
    #[error("method {method} is not allowed here; use {allowed}")]
    Method {
        method: http::Method,
        allowed: &'static str,
    },
    /// What the store or bus answered.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DataError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        DataError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// The gRPC code and HTTP status of this error.
    fn codes(&self) -> (Code, StatusCode) {
        match self {
            DataError::Invalid { .. } => (Code::InvalidArgument, StatusCode::BAD_REQUEST),
            DataError::KeyNotFound(_) | DataError::NoBinding { .. } => {
                (Code::NotFound, StatusCode::NOT_FOUND)
            }
            DataError::NoSubscription(_) => (Code::NotFound, StatusCode::NOT_FOUND),
            DataError::UnknownPath(_) => (Code::Unimplemented, StatusCode::NOT_FOUND),
            DataError::Method { .. } => (Code::Unimplemented, StatusCode::METHOD_NOT_ALLOWED),
            DataError::Denied { .. } => (Code::PermissionDenied, StatusCode::FORBIDDEN),
            DataError::TooLarge { .. } => (Code::ResourceExhausted, StatusCode::PAYLOAD_TOO_LARGE),
            DataError::RateLimited { .. } => {
                (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS)
            }
            DataError::NotConfigured | DataError::Moving { .. } => {
                (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE)
            }
            DataError::Store(error) => match error {
                StoreError::VersionMismatch { .. } => {
                    (Code::FailedPrecondition, StatusCode::PRECONDITION_FAILED)
                }
                StoreError::Invalid(_) => (Code::InvalidArgument, StatusCode::BAD_REQUEST),
                StoreError::Unavailable { .. } | StoreError::Closed => {
                    (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE)
                }
                StoreError::Exhausted(_) => {
                    (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS)
                }
                StoreError::Internal { .. } => (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR),
            },
        }
    }

    /// What the client is told: a store's own words only where they are
    /// about the request, never a driver's error text.
    fn message(&self) -> String {
        match self {
            DataError::Store(StoreError::Unavailable { what, .. }) => {
                format!("{what}: the store is unavailable; retry")
            }
            DataError::Store(StoreError::Internal { what, .. }) => {
                format!("{what}: internal error")
            }
            other => other.to_string(),
        }
    }

    /// Logs a failure that is not the caller's doing, with its cause chain.
    fn log(&self) {
        match self {
            DataError::Store(
                error @ (StoreError::Unavailable { .. } | StoreError::Internal { .. }),
            ) => warn!(error = %Chain(error), "Data call failed."),
            other => debug!(error = %other, "Data call refused."),
        }
    }

    /// The HTTP/JSON answer: the status, and a body in the shape of
    /// Google's JSON errors (`{"error": {"code", "status", "message"}}`).
    pub(crate) fn into_response(self) -> Response<DataBody> {
        self.log();
        let (code, status) = self.codes();
        let body = serde_json::json!({
            "error": {
                "code": status.as_u16(),
                "status": grpc_name(code),
                "message": self.message(),
            }
        });
        let mut response = super::json_response(status, &body);
        if let DataError::Method { allowed, .. } = self {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
        }
        if let DataError::RateLimited { retry_after } = self {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

impl From<DataError> for Status {
    fn from(error: DataError) -> Status {
        error.log();
        Status::new(error.codes().0, error.message())
    }
}

/// The canonical name of a gRPC code, as Google's JSON errors spell it.
fn grpc_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::NotFound => "NOT_FOUND",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Unavailable => "UNAVAILABLE",
        Code::Unimplemented => "UNIMPLEMENTED",
        _ => "INTERNAL",
    }
}
