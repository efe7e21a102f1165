//! Admin API errors, and the one place they become HTTP responses.
//!
//! Every error the admin API returns has the same JSON shape:
//! `{"error": {"code": "...", "message": "...", "field": "...", "resource": "..."}}`,
//! where `field` and `resource` appear when known. Internal failures are
//! logged and answered with a generic message: nothing internal leaks.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prism_proto::{DocumentError, UnknownKind, ValidationError};
use serde::Serialize;
use tracing::error;

use crate::store::StoreError;

/// An admin API failure: a status, a stable code and a message for people.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// HTTP status of the response.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `invalid_argument`.
    pub code: &'static str,
    /// What went wrong, for a person.
    pub message: String,
    /// Path of the offending field, e.g. `backends[0].endpoints[0].address`.
    pub field: Option<String>,
    /// The resource at fault, e.g. `Route demo/root`.
    pub resource: Option<String>,
    /// An entity tag sent back as `ETag` (a failed `If-Match`: the current one).
    pub etag: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a str>,
}

impl ApiError {
    /// An error with no field or resource.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            resource: None,
            etag: None,
        }
    }

    /// 400 `invalid_argument`: the request is malformed or breaks a rule.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 415 `unsupported_media_type`.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// 500 `internal`, logging the cause and telling the client nothing of it.
    pub fn internal(cause: &dyn std::error::Error) -> Self {
        error!(error = %cause, "Admin request failed.");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the control plane's log",
        )
    }

    /// The same error naming `field`.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// The same error naming `resource`.
    pub fn with_resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
                resource: self.resource.as_deref(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(etag) = self.etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
            response.headers_mut().insert(header::ETAG, etag);
        }
        response
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let mut error = ApiError::invalid(e.message).with_field(e.field);
        if let Some(resource) = e.resource {
            error = error.with_resource(resource.to_string());
        }
        error
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(e) => e.into(),
            StoreError::NotFound(key) => {
                ApiError::not_found(format!("{key} does not exist")).with_resource(key.to_string())
            }
            StoreError::AlreadyExists(key) => {
                ApiError::conflict(format!("{key} already exists")).with_resource(key.to_string())
            }
            StoreError::PreconditionFailed { what, now, etag } => ApiError {
                etag,
                ..ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    "failed_precondition",
                    format!(
                        "If-Match: {what} changed underneath, it is now {now}; nothing was changed"
                    ),
                )
            },
            e @ StoreError::NoSuchRevision { .. } => ApiError::not_found(e.to_string()),
            // The request is well formed and the revision exists (not 400 or
            // 404), but its policy can never be rebuilt: no change of state
            // will make a retry succeed (not 409). One status for the diff
            // (a GET) and the rollback (a POST); 410 would say the endpoint
            // itself is gone.
            e @ StoreError::ContentNotRecorded { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "revision_unavailable",
                e.to_string(),
            ),
            e
            @ (StoreError::CreateDir { .. } | StoreError::Storage(_) | StoreError::Corrupt(_)) => {
                ApiError::internal(&e)
            }
        }
    }
}

impl From<DocumentError> for ApiError {
    fn from(e: DocumentError) -> Self {
        match e {
            DocumentError::Invalid(e) => e.into(),
            e @ (DocumentError::Empty | DocumentError::Syntax(_)) => {
                ApiError::invalid(e.to_string())
            }
        }
    }
}

impl From<UnknownKind> for ApiError {
    fn from(e: UnknownKind) -> Self {
        ApiError::not_found(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use prism_proto::{Kind, ResourceKey};

    use super::*;

    #[test]
    fn validation_errors_keep_field_and_resource() {
        let e: ApiError = StoreError::Invalid(
            ValidationError::new("backend", "backend `demo/web` does not exist")
                .in_resource(ResourceKey::new(Kind::Route, "demo/root")),
        )
        .into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.field.as_deref(), Some("backend"));
        assert_eq!(e.resource.as_deref(), Some("Route demo/root"));
    }

    #[test]
    fn internal_errors_do_not_leak() {
        let e: ApiError = StoreError::Corrupt("secret detail".into()).into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message.contains("secret"));
    }
}
