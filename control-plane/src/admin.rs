//! The admin HTTP API (axum): read and write policy, apply policy documents,
//! read the change log and the fleet's status.
//!
//! Resources travel in their canonical JSON form (the proto3 JSON mapping of
//! `prism.config.v1`), except that a Secret is never shown: every answer that
//! echoes one carries its redacted view ([`view`]). Every write goes through
//! [`Store::commit`], which
//! validates the whole policy and answers only once the revision is on disk.
//! Every failure becomes a response in one place: [`ApiError`].
//!
//! Optimistic concurrency, as HTTP has it: a resource's `ETag` is its content
//! version (`"…"`), the policy's is its revision (`"r7"`); a write sent with
//! `If-Match` applies only if the tag still matches, checked under the
//! store's writer lock, and otherwise gets `412` with the current `ETag` and
//! changes nothing.
//!
//! | Method and path                 | What it does                                  |
//! |---------------------------------|-----------------------------------------------|
//! | `GET /v1/{kind}`                | list one kind (`secrets`, `namespaces`, `backends`, `routes`) |
//! | `POST /v1/{kind}`               | create; 409 if the name exists                |
//! | `GET /v1/{kind}/{name}`         | read one (header `x-prism-revision`, `ETag`)  |
//! | `PUT /v1/{kind}/{name}`         | create or replace (`If-Match`: its `ETag`)    |
//! | `DELETE /v1/{kind}/{name}`      | delete (`If-Match`: its `ETag`)               |
//! | `POST /v1/apply?dry_run=…`      | upsert a YAML/JSON policy document, all or nothing (`If-Match`: the policy's `ETag`); a dry run's changes carry their diffs |
//! | `GET /v1/diff?from=R1&to=R2`    | what changed between two revisions (`to`: the current one by default), as unified diffs of each resource's YAML |
//! | `POST /v1/rollback?to=R&dry_run=…` | one new revision whose policy equals revision R's (`If-Match`: the policy's `ETag`) |
//! | `GET /v1/revision`              | the current revision (`ETag` of the policy)   |
//! | `GET /v1/history?limit=N&namespace=NS&author=A` | the change log, newest first, optionally only one namespace's or one author's |
//! | `GET /v1/proxies`               | the fleet's status                            |
//! | `GET /v1/traffic`               | the fleet's live traffic, from its load reports |
//! | `GET /v1/traffic/stream`        | the same as Server-Sent Events, once per reporting interval |
//! | `GET /v1/whoami`                | the token's subject, role and namespaces      |
//! | `POST /v1/tokens`               | create a bearer token (admin); shown once     |
//! | `GET /v1/tokens`                | list tokens, without secrets (admin)          |
//! | `DELETE /v1/tokens/{id}`        | revoke a token (admin)                        |
//! | `GET /v1/openapi.json`          | this API's OpenAPI 3.1 document (no token needed) |
//! | `GET /healthz`                  | liveness (no token needed)                    |
//! | `GET /metrics`                  | Prometheus metrics (no token needed)          |
//! | `GET /ui`                       | the web console's static files (no token needed) |
//!
//! Every request but `/healthz`, `/metrics`, `/v1/openapi.json` and the
//! console's files carries a bearer token ([`auth`]): a scraper needs no
//! token, and neither the metrics nor the console's files hold any data.
//! [`openapi`] describes every route of the API; the console ([`ui`]) is
//! not part of it.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use prism_proto::pb::admin::v1::ResourceChange;
use prism_proto::pb::config::v1::{Backend, DataBinding, Namespace, Route, Secret};
use prism_proto::{Kind, Resource, ResourceKey, parse_policy, validate_resource};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::diff::{self, Labels};
use crate::error::ApiError;
use crate::fleet::Fleet;
use crate::store::{Mutation, Precondition, Store, StoreError, policy_etag, resource_etag};
use crate::traffic::Traffic;

pub mod auth;
pub mod openapi;
#[cfg(test)]
mod tests;
mod trace;
mod traffic;
pub mod ui;
pub mod view;

pub use auth::{ADMIN_TOKEN_FILE, Caller};

pub use view::resource_view;

/// Largest request body the admin API reads: 4 MiB.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Response header carrying the revision a read was served from.
pub const REVISION_HEADER: &str = "x-prism-revision";

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The policy store.
    pub store: Store,
    /// The connected proxies.
    pub fleet: Fleet,
    /// The proxies' recent traffic.
    pub traffic: Traffic,
    /// Turns true when the control plane stops: endless answers (the
    /// traffic stream) end then.
    pub shutdown: watch::Receiver<bool>,
}

/// Default and largest `limit` of `GET /v1/history`.
const DEFAULT_HISTORY: usize = 100;
const MAX_HISTORY: usize = 1000;

#[derive(Deserialize)]
struct ApplyParams {
    #[serde(default)]
    dry_run: bool,
}

/// Query of `GET /v1/diff`: revision numbers, read as text so that a bad
/// one is refused naming its parameter.
#[derive(Deserialize)]
struct DiffParams {
    from: Option<String>,
    to: Option<String>,
}

/// Query of `POST /v1/rollback`.
#[derive(Deserialize)]
struct RollbackParams {
    to: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Deserialize)]
struct HistoryParams {
    limit: Option<usize>,
    /// Only revisions that changed this namespace or a resource in it.
    namespace: Option<String>,
    /// Only revisions by this author.
    author: Option<String>,
}

/// Every route of the admin API: its path as axum writes it, and its
/// handlers. Each handler is described in [`openapi`]'s document; a test
/// checks that the two agree.
fn routes() -> Vec<(&'static str, MethodRouter<AdminState>)> {
    vec![
        ("/healthz", get(healthz)),
        ("/metrics", get(metrics)),
        ("/v1/openapi.json", get(openapi::openapi_json)),
        ("/v1/revision", get(revision)),
        ("/v1/history", get(history)),
        ("/v1/proxies", get(proxies)),
        ("/v1/proxies/nearest", get(nearest)),
        ("/v1/traffic", get(traffic::traffic)),
        ("/v1/traffic/stream", get(traffic::traffic_stream)),
        ("/v1/whoami", get(auth::whoami)),
        ("/v1/apply", post(apply)),
        (
            "/v1/tokens",
            get(auth::list_tokens).post(auth::create_token),
        ),
        ("/v1/tokens/{id}", delete(auth::revoke_token)),
        ("/v1/diff", get(diff)),
        ("/v1/rollback", post(rollback)),
        ("/v1/{kind}", get(list).post(create)),
        ("/v1/{kind}/{*name}", get(read).put(replace).delete(remove)),
    ]
}

/// The admin API's routes over `state`.
pub fn router(state: AdminState) -> Router {
    routes()
        .into_iter()
        .fold(Router::new(), |router, (path, handlers)| {
            router.route(path, handlers)
        })
        .route_layer(axum::middleware::from_fn(trace::write_span))
        .merge(ui::router())
        .fallback(unknown_path)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(axum::middleware::from_fn(auth::same_origin))
        .with_state(state)
}

#[utoipa::path(get, path = "/healthz", tag = "meta", security(()),
    responses((status = 200, description = "The control plane is up: `ok`.", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Prometheus metrics, as OpenMetrics text.
#[utoipa::path(get, path = "/metrics", tag = "meta", security(()),
    responses((status = 200, description = "The control plane's metrics, OpenMetrics text.",
        content_type = "application/openmetrics-text", body = String)))]
async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::encode(&state.store, &state.fleet),
    )
        .into_response()
}

/// The message of the `404` for a path no route serves.
const NO_SUCH_PATH: &str = "no such path; the admin API lives under /v1";

async fn unknown_path() -> ApiError {
    ApiError::not_found(NO_SUCH_PATH)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this path",
    )
}

/// The current revision.
#[utoipa::path(get, path = "/v1/revision", tag = "policy",
    responses((status = 200, description = "The current revision.", body = openapi::RevisionAnswer,
        headers(("ETag" = String, description = "The policy's entity tag, its revision: `\"r7\"`.")))))]
async fn revision(State(state): State<AdminState>) -> Response {
    let revision = state.store.revision();
    with_etag(
        Json(json!({ "revision": revision })).into_response(),
        &policy_etag(revision),
    )
}

/// The change log, newest first.
#[utoipa::path(get, path = "/v1/history", tag = "policy",
    params(
        ("limit" = Option<u64>, Query, description = "How many entries at most (default 100, at most 1000)."),
        ("namespace" = Option<String>, Query, description = "Only revisions that changed this namespace or a resource in it."),
        ("author" = Option<String>, Query, description = "Only revisions by this author (a token's subject)."),
    ),
    responses(
        (status = 200, description = "Change-log entries the token may see, newest first.", body = openapi::HistoryAnswer),
        (status = 400, description = "A malformed query.", body = openapi::ErrorBody),
    ))]
async fn history(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    let limit = params.limit.unwrap_or(DEFAULT_HISTORY).min(MAX_HISTORY);
    let revision = state.store.revision();
    let in_namespace = |change: &ResourceChange, ns: &str| {
        let name = change.name.as_str();
        (change.kind == Kind::Namespace.as_str() && name == ns)
            || name
                .strip_prefix(ns)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    // A token scoped to namespaces sees only the changes to them.
    let covered = |change: &ResourceChange| {
        caller.namespaces.is_empty() || caller.namespaces.iter().any(|ns| in_namespace(change, ns))
    };
    let mut items = state.store.history(limit, |entry| {
        params.author.as_deref().is_none_or(|a| entry.actor == a)
            && params
                .namespace
                .as_deref()
                .is_none_or(|ns| entry.changes.iter().any(|c| in_namespace(c, ns)))
            && entry.changes.iter().any(covered)
    })?;
    for entry in &mut items {
        entry.changes.retain(covered);
    }
    let items = serde_json::to_value(items).map_err(|e| ApiError::internal(&e))?;
    Ok(Json(json!({ "revision": revision, "items": items })))
}

/// The fleet's status.
#[utoipa::path(get, path = "/v1/proxies", tag = "fleet",
    responses((status = 200, description = "Every known proxy.", body = openapi::ProxiesAnswer)))]
async fn proxies(State(state): State<AdminState>) -> Json<Value> {
    let revision = state.store.revision();
    Json(json!({ "revision": revision, "proxies": state.fleet.list(revision) }))
}

#[derive(Deserialize)]
struct NearestParams {
    #[serde(default)]
    zone: String,
    #[serde(default)]
    region: String,
}

/// The proxy a client in `zone` should use: same zone, else same region,
/// else any connected proxy; 404 when none is connected.
#[utoipa::path(get, path = "/v1/proxies/nearest", tag = "fleet",
    params(
        ("zone" = Option<String>, Query, description = "The client's availability zone."),
        ("region" = Option<String>, Query, description = "The client's region."),
    ),
    responses(
        (status = 200, description = "The nearest connected proxy.", body = openapi::NearestAnswer),
        (status = 400, description = "A malformed query.", body = openapi::ErrorBody),
        (status = 404, description = "No proxy is connected.", body = openapi::ErrorBody),
    ))]
async fn nearest(
    State(state): State<AdminState>,
    params: Result<Query<NearestParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    let revision = state.store.revision();
    let (proxy, matched) = state
        .fleet
        .nearest(&params.zone, &params.region, revision)
        .ok_or_else(|| ApiError::not_found("no proxy is connected"))?;
    Ok(Json(
        json!({ "match": matched, "address": proxy.address, "proxy": proxy }),
    ))
}

/// Lists one kind's resources.
#[utoipa::path(get, path = "/v1/{kind}", tag = "resources",
    params(("kind" = openapi::KindParam, Path, description = "The resource kind; the singular and any case are accepted too.")),
    responses(
        (status = 200, description = "The kind's resources the token covers.", body = openapi::ResourceList,
            headers(("ETag" = String, description = "The policy's entity tag, its revision: `\"r7\"`."))),
        (status = 400, description = "A malformed path.", body = openapi::ErrorBody),
        (status = 404, description = "No such kind.", body = openapi::ErrorBody),
    ))]
async fn list(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    kind: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let kind = parse_kind(kind)?;
    let snapshot = state.store.snapshot();
    let items: Vec<Value> = snapshot
        .of_kind(kind)
        .filter(|entry| caller.covers(entry.resource.namespace()))
        .map(|entry| resource_view(&entry.resource))
        .collect();
    let answer = Json(json!({ "items": items, "revision": snapshot.revision }));
    Ok(with_etag(
        answer.into_response(),
        &policy_etag(snapshot.revision),
    ))
}

/// Reads one resource.
#[utoipa::path(get, path = "/v1/{kind}/{name}", tag = "resources",
    params(
        ("kind" = openapi::KindParam, Path, description = "The resource kind; the singular and any case are accepted too."),
        ("name" = String, Path, description = "The resource's name, e.g. `demo` or `demo/web` (a `/` may be sent as is or as `%2F`).", min_length = 1),
    ),
    responses(
        (status = 200, description = "The resource.", body = openapi::ResourceBody,
            headers(
                ("ETag" = String, description = "The resource's entity tag: its content version, quoted."),
                ("x-prism-revision" = u64, description = "The revision it was read at."),
            )),
        (status = 400, description = "A malformed path.", body = openapi::ErrorBody),
        (status = 404, description = "No such kind or resource.", body = openapi::ErrorBody),
    ))]
async fn read(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let key = parse_key(path)?;
    caller.check(&key)?;
    let snapshot = state.store.snapshot();
    let entry = snapshot.get(&key).ok_or_else(|| not_found(&key))?;
    let mut response = Json(resource_view(&entry.resource)).into_response();
    response
        .headers_mut()
        .insert(REVISION_HEADER, HeaderValue::from(snapshot.revision));
    Ok(with_etag(response, &resource_etag(&entry.version)))
}

/// Creates a resource.
#[utoipa::path(post, path = "/v1/{kind}", tag = "resources",
    params(("kind" = openapi::KindParam, Path, description = "The resource kind; the singular and any case are accepted too.")),
    request_body(content = openapi::ResourceBody, content_type = "application/json",
        example = json!({"name": "demo", "hosts": ["demo.local"]})),
    responses(
        (status = 201, description = "Created; on disk.", body = openapi::WriteAnswer),
        (status = 400, description = "A malformed body, or one that breaks a rule (`field` names where).", body = openapi::ErrorBody),
        (status = 404, description = "No such kind.", body = openapi::ErrorBody),
        (status = 409, description = "The name exists.", body = openapi::ErrorBody),
        (status = 413, description = "The body is over 4 MiB.", body = openapi::ErrorBody),
        (status = 415, description = "A content type other than JSON.", body = openapi::ErrorBody),
    ))]
async fn create(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    kind: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let kind = parse_kind(kind)?;
    let resource = json_resource(kind, &headers, body)?;
    caller.check(&resource.key())?;
    validate_resource(&resource)?;
    let commit = state
        .store
        .commit(
            Mutation::create(resource.clone()),
            &caller.subject,
            "create",
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "revision": commit.revision, "resource": resource_view(&resource) })),
    ))
}

/// Creates or replaces a resource.
#[utoipa::path(put, path = "/v1/{kind}/{name}", tag = "resources",
    params(
        ("kind" = openapi::KindParam, Path, description = "The resource kind; the singular and any case are accepted too."),
        ("name" = String, Path, description = "The resource's name, e.g. `demo` or `demo/web` (a `/` may be sent as is or as `%2F`).", min_length = 1),
        ("If-Match" = Option<String>, Header, description = "Apply only if the resource's `ETag` is still one of these (`*`: any)."),
    ),
    request_body(content = openapi::ResourceBody, content_type = "application/json",
        example = json!({"name": "demo", "hosts": ["demo.local"]})),
    responses(
        (status = 200, description = "Written; on disk.", body = openapi::WriteAnswer, headers(("ETag" = String, description = "The resource's entity tag: its content version, quoted."))),
        (status = 400, description = "A malformed body or `If-Match`, or one that breaks a rule (`field` names where).", body = openapi::ErrorBody),
        (status = 404, description = "No such kind.", body = openapi::ErrorBody),
        (status = 412, description = "`If-Match` failed; nothing changed. `ETag`: the current one, if the resource exists.", body = openapi::ErrorBody,
            headers(("ETag" = String, description = "The resource's entity tag: its content version, quoted."))),
        (status = 413, description = "The body is over 4 MiB.", body = openapi::ErrorBody),
        (status = 415, description = "A content type other than JSON.", body = openapi::ErrorBody),
    ))]
async fn replace(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = parse_key(path)?;
    caller.check(&key)?;
    let mut resource = json_resource(key.kind, &headers, body)?;
    if resource.name().is_empty() {
        set_name(&mut resource, key.name.clone());
    } else if resource.name() != key.name {
        return Err(ApiError::invalid(format!(
            "the body names `{}` but the path names `{}`",
            resource.name(),
            key.name
        ))
        .with_field("name"));
    }
    validate_resource(&resource)?;
    let precondition = if_match(&headers)?.map(|versions| Precondition::Resource {
        key: key.clone(),
        versions,
    });
    let commit = state
        .store
        .commit(
            Mutation {
                precondition,
                ..Mutation::upsert(resource.clone())
            },
            &caller.subject,
            "replace",
        )
        .await?;
    let etag = resource_etag(&resource.clone().versioned().version);
    let answer = Json(json!({ "revision": commit.revision, "resource": resource_view(&resource) }));
    Ok(with_etag(answer.into_response(), &etag))
}

/// Deletes a resource.
#[utoipa::path(delete, path = "/v1/{kind}/{name}", tag = "resources",
    params(
        ("kind" = openapi::KindParam, Path, description = "The resource kind; the singular and any case are accepted too."),
        ("name" = String, Path, description = "The resource's name, e.g. `demo` or `demo/web` (a `/` may be sent as is or as `%2F`).", min_length = 1),
        ("If-Match" = Option<String>, Header, description = "Apply only if the resource's `ETag` is still one of these (`*`: any)."),
    ),
    responses(
        (status = 200, description = "Deleted; on disk.", body = openapi::DeleteAnswer),
        (status = 400, description = "A malformed path or `If-Match`, or a delete that breaks a rule (another resource names it).", body = openapi::ErrorBody),
        (status = 404, description = "No such kind or resource.", body = openapi::ErrorBody),
        (status = 412, description = "`If-Match` failed; nothing changed. `ETag`: the current one.", body = openapi::ErrorBody,
            headers(("ETag" = String, description = "The resource's entity tag: its content version, quoted."))),
    ))]
async fn remove(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let key = parse_key(path)?;
    caller.check(&key)?;
    let precondition = if_match(&headers)?.map(|versions| Precondition::Resource {
        key: key.clone(),
        versions,
    });
    let mutation = Mutation {
        precondition,
        ..Mutation::delete(key)
    };
    let commit = state
        .store
        .commit(mutation, &caller.subject, "delete")
        .await?;
    Ok(Json(json!({ "revision": commit.revision })))
}

/// Upserts a policy document, all or nothing.
#[utoipa::path(post, path = "/v1/apply", tag = "policy",
    params(
        ("dry_run" = Option<bool>, Query, description = "Say what would change, write nothing."),
        ("If-Match" = Option<String>, Header, description = "Apply only if the policy's `ETag` (`\"r7\"`) is still one of these (`*`: any)."),
    ),
    request_body(description = "A policy document: YAML or JSON, `{namespaces: [...], backends: [...], ...}`.",
        content(
            (Object = "application/json", example = json!({
                "namespaces": [{"name": "demo", "hosts": ["demo.local"]}],
                "backends": [{"name": "demo/web", "endpoints": [{"address": "127.0.0.1:8081"}]}],
                "routes": [{"name": "demo/root", "match": {"prefix": "/"}, "backend": "web"}],
            })),
            (String = "application/yaml"),
        )),
    responses(
        (status = 200, description = "Applied and on disk, or (a dry run) what would change.", body = openapi::ApplyAnswer,
            headers(("ETag" = String, description = "The policy's entity tag, its revision: `\"r7\"`."))),
        (status = 400, description = "A malformed query, `If-Match` or document, or one that breaks a rule.", body = openapi::ErrorBody),
        (status = 403, description = "The document names a namespace the token does not cover.", body = openapi::ErrorBody),
        (status = 404, description = "The document names an unknown kind.", body = openapi::ErrorBody),
        (status = 412, description = "`If-Match` failed; nothing changed. `ETag`: the current one.", body = openapi::ErrorBody,
            headers(("ETag" = String, description = "The policy's entity tag, its revision: `\"r7\"`."))),
        (status = 413, description = "The body is over 4 MiB.", body = openapi::ErrorBody),
        (status = 415, description = "A content type other than JSON or YAML.", body = openapi::ErrorBody),
    ))]
async fn apply(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<ApplyParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    check_media_type(
        &headers,
        &[
            "application/yaml",
            "application/x-yaml",
            "text/yaml",
            "text/x-yaml",
            "text/plain",
            "application/octet-stream",
        ],
    )?;
    let body = read_body(body)?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::invalid(format!("the document is not UTF-8: {e}")))?;
    let upserts = parse_policy(text)?;
    for resource in &upserts {
        caller.check(&resource.key())?;
    }
    let mutation = Mutation {
        upserts,
        precondition: policy_precondition(&headers)?,
        ..Mutation::default()
    };
    if params.dry_run {
        let preview = state.store.preview(&mutation)?;
        let revision = preview.before.revision;
        let from = format!("r{revision}");
        let labels = Labels {
            from: &from,
            to: "dry run",
        };
        let changes = diff::annotate(&preview.before, &preview.after, preview.changes, labels);
        let answer = Json(json!({
            "revision": revision,
            "dry_run": true,
            "unchanged": changes.is_empty(),
            "changes": changes,
        }));
        return Ok(with_etag(answer.into_response(), &policy_etag(revision)));
    }
    let commit = state
        .store
        .commit(mutation, &caller.subject, "apply")
        .await?;
    let answer = Json(json!({
        "revision": commit.revision,
        "dry_run": false,
        "unchanged": commit.unchanged,
        "changes": commit.changes,
    }));
    Ok(with_etag(
        answer.into_response(),
        &policy_etag(commit.revision),
    ))
}

/// What changed between revisions `from` and `to` (the current one by
/// default): `{from, to, changes: [{op, kind, name, version, diff}]}`.
#[utoipa::path(get, path = "/v1/diff", tag = "policy",
    params(
        ("from" = u64, Query, description = "The revision to diff from."),
        ("to" = Option<u64>, Query, description = "The revision to diff to; the current one by default."),
    ),
    responses(
        (status = 200, description = "Each resource that differs, with a unified diff of its YAML.", body = openapi::DiffAnswer),
        (status = 400, description = "A missing or malformed revision (`field` names which).", body = openapi::ErrorBody),
        (status = 404, description = "No such revision (`field` names which).", body = openapi::ErrorBody),
        (status = 422, description = "The revision's policy cannot be rebuilt: the change log did not record content that far back.", body = openapi::ErrorBody),
    ))]
async fn diff(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<DiffParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    let from = revision_param("from", params.from.as_deref())?
        .ok_or_else(|| missing("from", "the revision to diff from"))?;
    let to = match revision_param("to", params.to.as_deref())? {
        Some(to) => to,
        None => state.store.revision(),
    };
    let old = state
        .store
        .policy_at(from)
        .map_err(|e| revision_error(e, "from"))?;
    let new = state
        .store
        .policy_at(to)
        .map_err(|e| revision_error(e, "to"))?;
    let (from_label, to_label) = (format!("r{from}"), format!("r{to}"));
    let labels = Labels {
        from: &from_label,
        to: &to_label,
    };
    // A token scoped to namespaces sees only the changes to them.
    let mut changes = diff::between(&old, &new, labels);
    changes.retain(|c| {
        caller.covers(auth::namespace_of(&ResourceKey::new(
            c.change.kind,
            c.change.name.clone(),
        )))
    });
    Ok(Json(json!({
        "from": from,
        "to": to,
        "changes": changes,
    })))
}

/// Commits one revision (action `rollback`) whose policy equals revision
/// `to`'s, validated like every write; with `dry_run`, says what it would
/// change and writes nothing. Answers like `/v1/apply`, each change with its
/// diff.
#[utoipa::path(post, path = "/v1/rollback", tag = "policy",
    params(
        ("to" = u64, Query, description = "The revision whose policy to restore."),
        ("dry_run" = Option<bool>, Query, description = "Say what would change, write nothing."), ("If-Match" = Option<String>, Header, description = "Apply only if the policy's `ETag` (`\"r7\"`) is still one of these (`*`: any)."),
    ),
    responses(
        (status = 200, description = "Rolled back and on disk, or (a dry run) what would change.", body = openapi::RollbackAnswer,
            headers(("ETag" = String, description = "The policy's entity tag, its revision: `\"r7\"`."))),
        (status = 400, description = "A missing or malformed revision or `If-Match`, or a rollback that breaks today's rules.", body = openapi::ErrorBody),
        (status = 403, description = "The token is scoped to namespaces: a rollback sets the whole policy.", body = openapi::ErrorBody),
        (status = 404, description = "No such revision.", body = openapi::ErrorBody),
        (status = 412, description = "`If-Match` failed; nothing changed. `ETag`: the current one.", body = openapi::ErrorBody,
            headers(("ETag" = String, description = "The policy's entity tag, its revision: `\"r7\"`."))),
        (status = 422, description = "The revision's policy cannot be rebuilt: the change log did not record content that far back.", body = openapi::ErrorBody),
    ))]
async fn rollback(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<RollbackParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    if !caller.namespaces.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_denied",
            format!(
                "a rollback sets the whole policy: the token of `{}` covers only {}",
                caller.subject,
                caller.namespaces.join(", ")
            ),
        ));
    }
    let to = revision_param("to", params.to.as_deref())?
        .ok_or_else(|| missing("to", "the revision to roll back to"))?;
    let precondition = policy_precondition(&headers)?;
    let (revision, unchanged, before, after, changes) = if params.dry_run {
        let preview = state
            .store
            .preview_rollback(to, precondition.as_ref())
            .map_err(|e| revision_error(e, "to"))?;
        let revision = preview.before.revision;
        let unchanged = preview.changes.is_empty();
        (
            revision,
            unchanged,
            preview.before,
            preview.after,
            preview.changes,
        )
    } else {
        let done = state
            .store
            .rollback(to, precondition.as_ref(), &caller.subject)
            .await
            .map_err(|e| revision_error(e, "to"))?;
        let commit = done.commit;
        let unchanged = commit.unchanged;
        (
            commit.revision,
            unchanged,
            done.before,
            done.after,
            commit.changes,
        )
    };
    // The policy made equals revision `to`'s: its diffs are headed so.
    let (from_label, to_label) = (format!("r{}", before.revision), format!("r{to}"));
    let labels = Labels {
        from: &from_label,
        to: &to_label,
    };
    let changes = diff::annotate(&before, &after, changes, labels);
    let answer = Json(json!({
        "revision": revision,
        "to": to,
        "dry_run": params.dry_run,
        "unchanged": unchanged,
        "changes": changes,
    }));
    Ok(with_etag(answer.into_response(), &policy_etag(revision)))
}

/// A revision number given in query parameter `field`, if given.
fn revision_param(field: &'static str, value: Option<&str>) -> Result<Option<u64>, ApiError> {
    value
        .map(|text| {
            text.parse::<u64>().map_err(|_| {
                ApiError::invalid(format!("`{text}` is not a revision number such as 7"))
                    .with_field(field)
            })
        })
        .transpose()
}

/// 400 for a required query parameter `field`, `what`, that is missing.
fn missing(field: &'static str, what: &str) -> ApiError {
    ApiError::invalid(format!("`{field}` is required: {what}")).with_field(field)
}

/// A store error about the revision given in query parameter `field`,
/// naming it.
fn revision_error(error: StoreError, field: &'static str) -> ApiError {
    match error {
        e @ (StoreError::NoSuchRevision { .. } | StoreError::ContentNotRecorded { .. }) => {
            ApiError::from(e).with_field(field)
        }
        e => e.into(),
    }
}

/// The condition an `If-Match` header puts on the policy's revision; `*`
/// matches any revision: no condition at all.
fn policy_precondition(headers: &HeaderMap) -> Result<Option<Precondition>, ApiError> {
    Ok(if_match(headers)?
        .filter(|tags| !tags.is_empty())
        .map(|tags| Precondition::Revision(tags.iter().filter_map(|t| revision_of(t)).collect())))
}

/// The entity tags of an `If-Match` header, without their quotes: `None`
/// without the header, empty for `*`. A weak tag (`W/"…"`) is kept with its
/// prefix, so that it matches nothing, as `If-Match` compares strongly.
fn if_match(headers: &HeaderMap) -> Result<Option<Vec<String>>, ApiError> {
    let mut values = headers.get_all(header::IF_MATCH).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let mut tags = Vec::new();
    for value in values {
        let text = value.to_str().unwrap_or_default();
        for tag in text.split(',').map(str::trim) {
            if tag == "*" {
                return Ok(Some(Vec::new()));
            }
            let quoted = tag.strip_prefix("W/").unwrap_or(tag);
            let inner = quoted.strip_prefix('"').and_then(|t| t.strip_suffix('"'));
            match inner {
                Some(inner) if !inner.contains('"') => tags.push(if quoted.len() == tag.len() {
                    inner.to_string()
                } else {
                    tag.to_string()
                }),
                _ => {
                    return Err(ApiError::invalid(format!(
                        "If-Match: `{tag}` is not `*` or a quoted entity tag such as \"r7\""
                    ))
                    .with_field("If-Match"));
                }
            }
        }
    }
    Ok(Some(tags))
}

/// The revision a policy entity tag names (`r7`, unquoted), if it is one.
fn revision_of(tag: &str) -> Option<u64> {
    tag.strip_prefix('r')?.parse().ok()
}

fn with_etag(mut response: Response, etag: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

fn parse_kind(path: Result<Path<String>, PathRejection>) -> Result<Kind, ApiError> {
    let Path(kind) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    Ok(kind.parse::<Kind>()?)
}

fn parse_key(path: Result<Path<(String, String)>, PathRejection>) -> Result<ResourceKey, ApiError> {
    let Path((kind, name)) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    Ok(ResourceKey::new(kind.parse::<Kind>()?, name))
}

fn not_found(key: &ResourceKey) -> ApiError {
    ApiError::not_found(format!("{key} does not exist")).with_resource(key.to_string())
}

/// The body, or the rejection (413 when over [`MAX_BODY_BYTES`]) in our shape.
pub(crate) fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_argument"
        };
        ApiError::new(status, code, rejection.body_text())
    })
}

/// Accepts a request without a content type, a JSON one, or one of `others`.
pub(crate) fn check_media_type(headers: &HeaderMap, others: &[&str]) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") || others.contains(&&*essence) {
        return Ok(());
    }
    let mut expected = vec!["application/json"];
    expected.extend_from_slice(others);
    Err(ApiError::unsupported_media_type(format!(
        "content type `{essence}` is not accepted here: expected {}",
        expected.join(", ")
    )))
}

/// Reads one resource of `kind` from a JSON body. Parsing straight from the
/// bytes keeps serde's line and column in the message.
fn json_resource(
    kind: Kind,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Resource, ApiError> {
    check_media_type(headers, &[])?;
    let body = read_body(body)?;
    let parsed = match kind {
        Kind::Secret => serde_json::from_slice::<Secret>(&body).map(Resource::Secret),
        Kind::Namespace => serde_json::from_slice::<Namespace>(&body).map(Resource::Namespace),
        Kind::Backend => serde_json::from_slice::<Backend>(&body).map(Resource::Backend),
        Kind::Route => serde_json::from_slice::<Route>(&body).map(Resource::Route),
        Kind::DataBinding => {
            serde_json::from_slice::<DataBinding>(&body).map(Resource::DataBinding)
        }
    };
    parsed.map_err(|e| ApiError::invalid(format!("the body is not a valid {kind}: {e}")))
}

fn set_name(resource: &mut Resource, name: String) {
    match resource {
        Resource::Secret(r) => r.name = name,
        Resource::Namespace(r) => r.name = name,
        Resource::Backend(r) => r.name = name,
        Resource::Route(r) => r.name = name,
        Resource::DataBinding(r) => r.name = name,
    }
}
