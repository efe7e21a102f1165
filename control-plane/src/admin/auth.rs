//! Who may change what: bearer tokens with roles, scoped to namespaces.
//!
//! A token reads `prism_<id>_<secret>`: the id finds its record in the
//! store, which keeps only a SHA-256 digest of the secret (a token is 256
//! random bits, so a fast digest is as safe as a slow one). Every request
//! but [`OPEN_PATHS`] (`/healthz`, `/metrics`, `/v1/openapi.json`) and the
//! web console's static files ([`super::ui`], under `/ui`) must carry one
//! (`Authorization: Bearer …`), or gets `401`. `GET /v1/whoami` tells a
//! token's holder (the console) who it is and what it may do.
//! Then its role decides what it may do, else `403`:
//!
//! | role     | may                                                       |
//! |----------|-----------------------------------------------------------|
//! | `viewer` | read                                                      |
//! | `editor` | read, and write resources                                 |
//! | `admin`  | all of that, and create, list and revoke tokens           |
//!
//! A token with namespaces reads and writes only their resources; without,
//! every namespace. The token's subject is the author recorded for every
//! write made with it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Extension, Path as UrlPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prism_proto::ResourceKey;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tracing::info;

use super::AdminState;
use crate::error::ApiError;
use crate::store::{Store, StoreError, TokenRecord, unix_millis_now};

/// The file in the data directory where the control plane writes the first
/// admin token, and where the CLI looks for one.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Prefix of every token.
const TOKEN_PREFIX: &str = "prism_";

/// What a token may do; each role may do all that the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads.
    Viewer,
    /// Reads and writes resources.
    Editor,
    /// Everything, including tokens.
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = ApiError;

    fn from_str(text: &str) -> Result<Self, ApiError> {
        match text {
            "viewer" => Ok(Role::Viewer),
            "editor" => Ok(Role::Editor),
            "admin" => Ok(Role::Admin),
            other => Err(ApiError::invalid(format!(
                "unknown role `{other}`: expected viewer, editor or admin"
            ))
            .with_field("role")),
        }
    }
}

/// The authenticated sender of a request, put in its extensions.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The token's subject: the author of the request's writes.
    pub subject: String,
    /// The token's role.
    pub role: Role,
    /// The namespaces it may touch; all when empty.
    pub namespaces: Vec<String>,
}

impl Caller {
    /// Whether the caller may see or touch resources of `namespace`.
    pub fn covers(&self, namespace: &str) -> bool {
        self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace)
    }

    /// `403` unless the caller may touch `key`.
    pub fn check(&self, key: &ResourceKey) -> Result<(), ApiError> {
        let namespace = namespace_of(key);
        if self.covers(namespace) {
            return Ok(());
        }
        Err(forbidden(format!(
            "the token of `{}` may not touch namespace `{namespace}` ({key}): it covers {}",
            self.subject,
            self.namespaces.join(", ")
        ))
        .with_resource(key.to_string()))
    }

    /// `403` unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            return Ok(());
        }
        Err(forbidden(format!(
            "the token of `{}` is a {} token; this needs {role}",
            self.subject, self.role
        )))
    }
}

/// The namespace of a resource: the part of its name before `/`, or the
/// whole name of a Namespace.
pub fn namespace_of(key: &ResourceKey) -> &str {
    let name = key.name.as_str();
    name.split_once('/')
        .map_or(name, |(namespace, _)| namespace)
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "permission_denied", message)
}

fn unauthenticated(message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"prism\""),
    );
    response
}

/// Middleware, outermost: refuses a request a browser sent from another
/// origin, before anything else. The console is served from the admin API's
/// own origin, so no cross-origin caller is ever allowed: no CORS header is
/// ever sent, a preflight gets `403`, and so does any request whose
/// `Origin` is not this host or whose `Sec-Fetch-Site` says `cross-site`.
/// Tokens travel in a header a page of another origin cannot set, so this
/// is defence in depth against cross-site request forgery, not the only
/// guard.
pub async fn same_origin(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let foreign_origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .filter(|origin| {
            // `null` (a sandboxed page, a file) is foreign too.
            let authority = origin.split_once("://").map(|(_, rest)| rest);
            authority.is_none() || authority != host
        });
    // A link from another site to the console is a top-level navigation
    // that browsers mark `cross-site`; the console's files hold no data and
    // refuse to be framed, so reading them is allowed. Its API calls are
    // same-origin, and every other path keeps the check.
    let console_read = matches!(*request.method(), Method::GET | Method::HEAD)
        && super::ui::serves(request.uri().path());
    let cross_site = !console_read
        && headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"cross-site");
    if let Some(origin) = foreign_origin {
        return forbidden(format!(
            "cross-origin requests are refused: `{origin}` is not this admin API's origin"
        ))
        .into_response();
    }
    if cross_site {
        return forbidden("cross-site requests are refused".to_string()).into_response();
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// Paths of the API served without a token: liveness, Prometheus metrics
/// and the OpenAPI document, which name no resource.
pub(crate) const OPEN_PATHS: [&str; 3] = ["/healthz", "/metrics", "/v1/openapi.json"];

/// Whether `path` is served without a token: [`OPEN_PATHS`], and the
/// console's static files, which hold no data (`/v1/*` stays closed).
pub(crate) fn is_open(path: &str) -> bool {
    OPEN_PATHS.contains(&path) || super::ui::serves(path)
}

/// Middleware: authenticates every request but the [open](is_open) ones,
/// checks the role its method and path need, and hands the handlers its
/// [`Caller`].
pub async fn authenticate(
    State(state): State<AdminState>,
    mut request: Request,
    next: Next,
) -> Response {
    if is_open(request.uri().path()) {
        return next.run(request).await;
    }
    let Some(presented) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return unauthenticated("this needs a bearer token: `Authorization: Bearer prism_…`");
    };
    let caller = match verify(&state.store, presented) {
        Ok(Some(caller)) => caller,
        Ok(None) => return unauthenticated("the bearer token is not valid (unknown or revoked)"),
        Err(error) => return ApiError::from(error).into_response(),
    };
    let needed = if request.uri().path().starts_with("/v1/tokens") {
        Role::Admin
    } else if matches!(*request.method(), Method::GET | Method::HEAD) {
        Role::Viewer
    } else {
        Role::Editor
    };
    if let Err(error) = caller.require(needed) {
        return error.into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// The caller `presented` names, or `None` if it is no valid token.
fn verify(store: &Store, presented: &str) -> Result<Option<Caller>, StoreError> {
    let Some((id, secret)) = presented
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.split_once('_'))
    else {
        return Ok(None);
    };
    let Some(record) = store.token(id)? else {
        return Ok(None);
    };
    // Both sides are digests of the secret, so comparing them leaks nothing
    // useful about the secret through timing.
    if digest(secret) != record.digest {
        return Ok(None);
    }
    let Ok(role) = record.role.parse() else {
        return Err(StoreError::Corrupt(format!(
            "token {id} has role `{}`",
            record.role
        )));
    };
    Ok(Some(Caller {
        subject: record.subject,
        role,
        namespaces: record.namespaces,
    }))
}

fn digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token for `subject`: its record to store, and the token itself,
/// which exists nowhere else.
pub fn mint(
    subject: &str,
    role: Role,
    namespaces: Vec<String>,
    created_by: &str,
) -> (TokenRecord, String) {
    let id = hex(&rand::random::<[u8; 8]>());
    let secret = hex(&rand::random::<[u8; 32]>());
    let record = TokenRecord {
        id: id.clone(),
        subject: subject.to_string(),
        role: role.to_string(),
        namespaces,
        digest: digest(&secret),
        created_unix_millis: unix_millis_now(),
        created_by: created_by.to_string(),
    };
    (record, format!("{TOKEN_PREFIX}{id}_{secret}"))
}

/// Why the first admin token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the first admin token to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// On a store with no token yet, mints an admin token with subject `admin`
/// and writes it to `<data_dir>/admin-token`, readable by its owner only;
/// otherwise does nothing. Returns the file written, if any.
pub async fn bootstrap(store: &Store, data_dir: &Path) -> Result<Option<PathBuf>, BootstrapError> {
    if !store.tokens()?.is_empty() {
        return Ok(None);
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let (record, token) = mint("admin", Role::Admin, Vec::new(), "prism");
    write_private(&path, &format!("{token}\n")).map_err(|source| BootstrapError::Write {
        path: path.clone(),
        source,
    })?;
    store.put_token(&record).await?;
    info!(path = %path.display(), "Wrote the first admin token.");
    Ok(Some(path))
}

/// Writes `text` to a new `path` (replacing an old file) with mode 0600.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        // A file that existed keeps its mode through `open`.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// `GET /v1/whoami`: who the token is and what it may do, so a client
/// (the console) can offer only what the token allows.
#[utoipa::path(get, path = "/v1/whoami", tag = "tokens",
    responses((status = 200, description = "The token's subject, role and namespaces.", body = super::openapi::WhoAmI)))]
pub async fn whoami(Extension(caller): Extension<Caller>) -> Json<Value> {
    Json(json!({
        "subject": caller.subject,
        "role": caller.role,
        "namespaces": caller.namespaces,
    }))
}

/// The body of `POST /v1/tokens`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Who the token is: the author of its writes; 1 to 128 printable characters.
    subject: String,
    /// `viewer`, `editor` or `admin`.
    #[schema(value_type = Role)]
    role: String,
    /// The namespaces it may touch; all when empty or absent.
    #[serde(default)]
    namespaces: Vec<String>,
}

/// Longest subject, in characters.
const MAX_SUBJECT_CHARS: usize = 128;

/// `POST /v1/tokens`: a new token, shown this once.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens",
    request_body(content = NewToken, content_type = "application/json"),
    responses(
        (status = 201, description = "The new token, shown this once.", body = super::openapi::NewTokenAnswer),
        (status = 400, description = "A malformed body, or a bad subject, role or namespace (`field` names which).", body = super::openapi::ErrorBody),
        (status = 413, description = "The body is over 4 MiB.", body = super::openapi::ErrorBody),
        (status = 415, description = "A content type other than JSON.", body = super::openapi::ErrorBody),
    ))]
pub async fn create_token(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    super::check_media_type(&headers, &[])?;
    let body = super::read_body(body)?;
    let new: NewToken = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the body is not a valid token request: {e}")))?;
    let subject = new.subject.trim();
    if subject.is_empty()
        || subject.chars().count() > MAX_SUBJECT_CHARS
        || subject.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(format!(
            "subject must be 1 to {MAX_SUBJECT_CHARS} printable characters"
        ))
        .with_field("subject"));
    }
    let role: Role = new.role.parse()?;
    for (i, namespace) in new.namespaces.iter().enumerate() {
        if namespace.is_empty()
            || namespace.contains('/')
            || namespace.chars().any(char::is_whitespace)
        {
            return Err(
                ApiError::invalid(format!("`{namespace}` is not a namespace name"))
                    .with_field(format!("namespaces[{i}]")),
            );
        }
    }
    let (record, token) = mint(subject, role, new.namespaces, &caller.subject);
    state.store.put_token(&record).await?;
    info!(id = %record.id, subject, %role, by = %caller.subject, "Created a token.");
    let mut answer = token_view(&record);
    answer["token"] = Value::String(token);
    Ok((StatusCode::CREATED, Json(answer)))
}

/// `GET /v1/tokens`: every token, without its secret.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, description = "Every token, without its secret.", body = super::openapi::TokenList)))]
pub async fn list_tokens(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let items: Vec<Value> = state.store.tokens()?.iter().map(token_view).collect();
    Ok(Json(json!({ "items": items })))
}

/// `DELETE /v1/tokens/{id}`: revokes a token at once; refuses to revoke
/// the last admin token, which would lock every operator out.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "The token's id (the part after `prism_`).")),
    responses(
        (status = 200, description = "Revoked, at once.", body = super::openapi::RevokeAnswer),
        (status = 400, description = "A malformed path.", body = super::openapi::ErrorBody),
        (status = 404, description = "No such token.", body = super::openapi::ErrorBody),
        (status = 409, description = "The last admin token.", body = super::openapi::ErrorBody),
    ))]
pub async fn revoke_token(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    id: Result<UrlPath<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let UrlPath(id) = id.map_err(|e| ApiError::invalid(e.body_text()))?;
    let tokens = state.store.tokens()?;
    let Some(token) = tokens.iter().find(|t| t.id == id) else {
        return Err(ApiError::not_found(format!("token {id} does not exist")).with_field("id"));
    };
    let admin = Role::Admin.as_str();
    if token.role == admin && !tokens.iter().any(|t| t.id != id && t.role == admin) {
        return Err(ApiError::conflict(format!(
            "token {id} is the last admin token; create another admin token first"
        )));
    }
    state.store.remove_token(&id).await?;
    info!(%id, subject = %token.subject, by = %caller.subject, "Revoked a token.");
    Ok(Json(json!({ "id": id, "revoked": true })))
}

/// A token as the API shows it: everything but the digest.
fn token_view(record: &TokenRecord) -> Value {
    let created = time::OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(record.created_unix_millis) * 1_000_000,
    )
    .ok()
    .and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    });
    json!({
        "id": record.id,
        "subject": record.subject,
        "role": record.role,
        "namespaces": record.namespaces,
        "created_at": created,
        "created_by": record.created_by,
    })
}
