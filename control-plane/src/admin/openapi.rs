//! The admin API's OpenAPI 3.1 document, generated from the handlers'
//! `#[utoipa::path]` annotations and served at `GET /v1/openapi.json`.
//!
//! Every endpoint, parameter, header (`If-Match`, `ETag`, `x-prism-revision`,
//! `WWW-Authenticate`), status code and the error shape (`ApiError`) is
//! described precisely. Resource bodies, the proto3 JSON mapping of
//! `prism.config.v1`, are described only as JSON objects that name
//! themselves (`name` required) and may hold any other property: the .proto
//! files are their schema, and describing every field twice would drift.
//!
//! The answer types here exist for the document only: the handlers build
//! the same shapes with `json!`. `.ci/schemathesis.sh` checks every answer
//! against this document, and the tests check that every routed path and
//! method is documented and every documented one routed.

// The answer types are never built: they only describe the `json!` answers.
#![allow(dead_code)]

use std::sync::LazyLock;

use axum::Json;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, ObjectBuilder, RefOr, ResponseBuilder, Schema, Type,
};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::auth;
use crate::diff::ResourceDiff;
use crate::fleet::ProxyStatus;
use crate::store::Change;

/// Name of the bearer-token security scheme in the document.
pub const BEARER: &str = "bearer";

/// The document, built once.
static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(ApiDoc::openapi);

/// The admin API's OpenAPI document.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    &DOCUMENT
}

/// `GET /v1/openapi.json`: the document; no token needed.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    security(()),
    responses(
        (status = 200, description = "This document, OpenAPI 3.1.", content_type = "application/json", body = Object),
    )
)]
pub async fn openapi_json() -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], Json(document())).into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Prism admin API",
        description = "Read and write Prism's policy, apply policy documents, read the change log and the fleet's status. \
Every request but `/healthz`, `/metrics`, `/v1/openapi.json` (and the web console's static files under `/ui`, not described here) carries a bearer token (`Authorization: Bearer prism_…`); \
a token's role decides what it may do (GET: viewer, writes: editor, `/v1/tokens`: admin), else `403`. \
A request whose `Origin` is not this host, or whose `Sec-Fetch-Site` is `cross-site`, gets `403` before anything else. \
Resource bodies are the proto3 JSON mapping of `prism.config.v1` (see the .proto files): here only objects with a `name`."
    ),
    paths(
        super::healthz,
        super::metrics,
        openapi_json,
        super::revision,
        super::history,
        super::proxies,
        super::nearest,
        super::traffic::traffic,
        super::traffic::traffic_stream,
        auth::whoami,
        super::apply,
        super::diff,
        super::rollback,
        auth::list_tokens,
        auth::create_token,
        auth::revoke_token,
        super::list,
        super::create,
        super::read,
        super::replace,
        super::remove,
    ),
    components(schemas(ErrorBody, ErrorDetail, ResourceBody, KindParam)),
    security(("bearer" = [])),
    modifiers(&Security),
    tags(
        (name = "meta", description = "Liveness, metrics and this document; no token needed."),
        (name = "resources", description = "Secrets, namespaces, backends, routes and data bindings."),
        (name = "policy", description = "The whole policy: revision, apply, diff, rollback, history."),
        (name = "fleet", description = "The connected proxies and their live traffic."),
        (name = "tokens", description = "Bearer tokens: who the token sent is (any role); create, list and revoke tokens (admin role)."),
    )
)]
struct ApiDoc;

/// Adds the bearer scheme, and to every operation that needs a token the
/// `401` it answers without one; to every operation the `403` of the
/// same-origin check.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("prism_<id>_<secret>")
                    .build(),
            ),
        );
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                add_common_responses(operation);
            }
        }
    }
}

/// An operation is open when its only security requirement is the empty one.
fn is_open(operation: &Operation) -> bool {
    operation.security.as_ref().is_some_and(|requirements| {
        requirements.iter().all(|r| {
            serde_json::to_value(r).is_ok_and(|v| v.as_object().is_some_and(|o| o.is_empty()))
        })
    })
}

fn add_common_responses(operation: &mut Operation) {
    let open = is_open(operation);
    let responses = &mut operation.responses.responses;
    if !open {
        responses.entry("401".to_string()).or_insert_with(|| {
            RefOr::T(
                error_response("No bearer token, or one that is unknown or revoked.")
                    .header(
                        header::WWW_AUTHENTICATE.as_str(),
                        HeaderBuilder::new()
                            .schema(ObjectBuilder::new().schema_type(Type::String))
                            .description(Some("`Bearer realm=\"prism\"`"))
                            .build(),
                    )
                    .build(),
            )
        });
    }
    responses.entry("403".to_string()).or_insert_with(|| {
        let what = if open {
            "A cross-origin or cross-site request."
        } else {
            "The token's role or namespaces do not allow this, or a cross-origin or cross-site request."
        };
        RefOr::T(error_response(what).build())
    });
}

fn error_response(description: &str) -> utoipa::openapi::response::ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(ErrorBody::schema()))
            .build(),
    )
}

/// Every failure: `{"error": {"code", "message", "field"?, "resource"?}}`.
#[derive(ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_argument`, `not_found`,
    /// `conflict`, `failed_precondition`, `unauthenticated`,
    /// `permission_denied`, `payload_too_large`, `unsupported_media_type`,
    /// `revision_unavailable`, `method_not_allowed`.
    code: String,
    /// What went wrong, for a person.
    message: String,
    /// Path of the offending field, e.g. `backends[0].endpoints[0].address`,
    /// or the query parameter or header at fault.
    #[schema(required = false)]
    field: String,
    /// The resource at fault, e.g. `Route demo/root`.
    #[schema(required = false)]
    resource: String,
}

/// A resource in the proto3 JSON mapping of its `prism.config.v1` message
/// (a Secret: its redacted view). Described here only as an object with a
/// `name`; its other properties are the message's fields.
pub struct ResourceBody;

impl PartialSchema for ResourceBody {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some(
                "A resource in the proto3 JSON mapping of its `prism.config.v1` message \
                 (Secret, Namespace, Backend, Route or DataBinding; a Secret is shown only as \
                 its redacted view). Only `name` is described here; the .proto files describe \
                 the rest.",
            ))
            .property("name", ObjectBuilder::new().schema_type(Type::String))
            .required("name")
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::<Schema>::FreeForm(true),
            ))
            .into()
    }
}

impl ToSchema for ResourceBody {}

/// The `{kind}` of a resource path, as `Kind::plural` spells it.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum KindParam {
    /// Secrets (shown only redacted).
    Secrets,
    /// Namespaces.
    Namespaces,
    /// Backends.
    Backends,
    /// Routes.
    Routes,
    /// Data bindings.
    Bindings,
}

/// `GET /v1/revision`.
#[derive(ToSchema)]
pub struct RevisionAnswer {
    /// The current revision.
    revision: u64,
}

/// `GET /v1/{kind}`.
#[derive(ToSchema)]
pub struct ResourceList {
    /// The kind's resources the token covers.
    items: Vec<ResourceBody>,
    /// The revision they were read at.
    revision: u64,
}

/// `POST /v1/{kind}` and `PUT /v1/{kind}/{name}`.
#[derive(ToSchema)]
pub struct WriteAnswer {
    /// The revision the write made (or the current one, if it changed nothing).
    revision: u64,
    /// The resource as written.
    resource: ResourceBody,
}

/// `DELETE /v1/{kind}/{name}`.
#[derive(ToSchema)]
pub struct DeleteAnswer {
    /// The revision the delete made.
    revision: u64,
}

/// `POST /v1/apply`.
#[derive(ToSchema)]
pub struct ApplyAnswer {
    /// The revision made (a dry run: the current one).
    revision: u64,
    /// Whether this was a dry run, which changed nothing.
    dry_run: bool,
    /// Whether the document changed nothing.
    unchanged: bool,
    /// Each changed resource; in a dry run each also carries its `diff`.
    changes: Vec<Change>,
}

/// `GET /v1/diff`.
#[derive(ToSchema)]
pub struct DiffAnswer {
    /// The revision diffed from.
    from: u64,
    /// The revision diffed to.
    to: u64,
    /// Each resource that differs, with its diff.
    changes: Vec<ResourceDiff>,
}

/// `POST /v1/rollback`.
#[derive(ToSchema)]
pub struct RollbackAnswer {
    /// The revision made (a dry run: the current one).
    revision: u64,
    /// The revision whose policy the rollback restores.
    to: u64,
    /// Whether this was a dry run, which changed nothing.
    dry_run: bool,
    /// Whether the policy already equals revision `to`'s.
    unchanged: bool,
    /// Each changed resource, with its diff.
    changes: Vec<ResourceDiff>,
}

/// `GET /v1/history`.
#[derive(ToSchema)]
pub struct HistoryAnswer {
    /// The current revision.
    revision: u64,
    /// Change-log entries, newest first.
    items: Vec<HistoryEntry>,
}

/// One change-log entry: the proto3 JSON mapping of `prism.admin.v1.Revision`
/// without the before-images (64-bit integers as strings, fields with
/// default values left out).
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The revision, as a decimal string.
    #[schema(required = false, pattern = "^[0-9]+$")]
    revision: String,
    /// What the revision changed (only the namespaces the token covers).
    #[schema(required = false)]
    changes: Vec<HistoryChange>,
    /// Who made it: the subject of the token used.
    #[schema(required = false)]
    actor: String,
    /// The API action: `apply`, `create`, `replace`, `delete`, `rollback`.
    #[schema(required = false)]
    action: String,
    /// When, in milliseconds since the Unix epoch, as a decimal string.
    #[schema(required = false, pattern = "^-?[0-9]+$")]
    unix_millis: String,
}

/// One change of a change-log entry (`prism.admin.v1.ResourceChange`).
#[derive(ToSchema)]
pub struct HistoryChange {
    /// Resource kind, e.g. `Backend`.
    #[schema(required = false)]
    kind: String,
    /// Resource name, e.g. `demo/web`.
    #[schema(required = false)]
    name: String,
    /// `UPSERT` or `DELETE`.
    #[schema(required = false)]
    op: HistoryOp,
    /// Content version after the change (none for a delete).
    #[schema(required = false)]
    version: String,
}

/// `prism.admin.v1.ResourceChange.Op`.
#[derive(ToSchema)]
#[schema(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HistoryOp {
    /// Not set.
    OpUnspecified,
    /// Created or updated.
    Upsert,
    /// Deleted.
    Delete,
}

/// `GET /v1/proxies`.
#[derive(ToSchema)]
pub struct ProxiesAnswer {
    /// The current revision.
    revision: u64,
    /// Every known proxy, sorted by id.
    proxies: Vec<ProxyStatus>,
}

/// `GET /v1/proxies/nearest`.
#[derive(ToSchema)]
pub struct NearestAnswer {
    /// How near the proxy is: same zone, same region, or any.
    #[schema(rename = "match")]
    matched: NearestMatch,
    /// Address clients reach the proxy at.
    address: String,
    /// The proxy.
    proxy: ProxyStatus,
}

/// How near the chosen proxy is.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum NearestMatch {
    /// In the zone asked for.
    Zone,
    /// In the region asked for.
    Region,
    /// Any connected proxy.
    Any,
}

/// `GET /v1/whoami`: the token that sent the request.
#[derive(ToSchema)]
pub struct WhoAmI {
    /// Who the token is: the author of its writes.
    subject: String,
    /// What it may do.
    role: auth::Role,
    /// The namespaces it may touch; all when empty.
    namespaces: Vec<String>,
}

/// A token as the API shows it, without its secret.
#[derive(ToSchema)]
pub struct TokenView {
    /// The token's id (the part after `prism_`).
    id: String,
    /// Who the token is: the author of its writes.
    subject: String,
    /// What it may do.
    role: auth::Role,
    /// The namespaces it may touch; all when empty.
    namespaces: Vec<String>,
    /// When it was made (RFC 3339).
    #[schema(format = DateTime)]
    created_at: Option<String>,
    /// The subject of the token that made it.
    created_by: String,
}

/// `POST /v1/tokens`: the new token, shown this once.
#[derive(ToSchema)]
pub struct NewTokenAnswer {
    /// The token's id (the part after `prism_`).
    id: String,
    /// Who the token is: the author of its writes.
    subject: String,
    /// What it may do.
    role: auth::Role,
    /// The namespaces it may touch; all when empty.
    namespaces: Vec<String>,
    /// When it was made (RFC 3339).
    #[schema(format = DateTime)]
    created_at: Option<String>,
    /// The subject of the token that made it.
    created_by: String,
    /// The token itself, `prism_<id>_<secret>`; kept nowhere else.
    token: String,
}

/// `GET /v1/tokens`.
#[derive(ToSchema)]
pub struct TokenList {
    /// Every token, without its secret.
    items: Vec<TokenView>,
}

/// `DELETE /v1/tokens/{id}`.
#[derive(ToSchema)]
pub struct RevokeAnswer {
    /// The revoked token's id.
    id: String,
    /// Always `true`.
    revoked: bool,
}
