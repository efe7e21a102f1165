//! The web console: the static files of `admin-ui/dist/` (built and
//! committed by `npm run build` in `admin-ui/`), embedded into the binary at
//! compile time, so building Prism needs no Node and every build serves the
//! console.
//!
//! They are served at `/ui` without a token: they hold no data. Everything
//! the console shows it reads from `/v1/*` with the operator's token, which
//! it keeps in the tab's sessionStorage. The console routes by the URL's
//! fragment (`/ui/#/routes`), so `/ui`, `/ui/` and any other `/ui/…` path
//! that names no file are `index.html`; a path that names a file the
//! console does not have is `404`.
//!
//! Every answer carries a strict `Content-Security-Policy` (scripts, styles
//! and connections from this origin only; no frames, no plugins, no inline
//! script), `nosniff`, its content type, and an `ETag` with `Cache-Control:
//! no-cache`: the file names are fixed, so a browser revalidates each load
//! and gets `304` while the binary is the same.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use super::AdminState;
use crate::error::ApiError;

/// What the console's pages may load and do: only this origin's scripts,
/// styles, images and API (`connect-src`), nothing inline but styles set
/// through the CSSOM (uPlot and CodeMirror position and size their elements
/// that way), never framed, no plugins, no `<base>`.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; font-src 'self'; connect-src 'self'; \
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    /// Its path under `/ui/`.
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The console's files, as `npm run build` wrote them.
const ASSETS: [Asset; 3] = [
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../../admin-ui/dist/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../admin-ui/dist/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../../admin-ui/dist/app.css"),
    },
];

/// The index of `index.html` in [`ASSETS`].
const INDEX: usize = 0;

/// Each asset's entity tag: the start of the SHA-256 of its bytes, quoted.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| {
            let digest = Sha256::digest(asset.body);
            let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
            // Hex digits between quotes: always a valid header value.
            HeaderValue::from_str(&format!("\"{hex}\"")).unwrap_or(HeaderValue::from_static("\"\""))
        })
        .collect()
});

/// Whether `path` is the console's (served without a token): `/`, which
/// sends a browser on to it, and `/ui` with everything below.
pub fn serves(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}

/// The console's routes.
pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/{*path}", get(file))
}

async fn index(headers: HeaderMap) -> Response {
    serve(INDEX, &headers)
}

/// A file of the console, or `index.html` for a client-side route.
async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    if let Some(at) = ASSETS.iter().position(|asset| asset.name == path) {
        return serve(at, &headers);
    }
    // A last segment with a dot names a file, and the console has no other:
    // a 404 there shows a broken reference, where index.html would hide it.
    let last = path.rsplit('/').next().unwrap_or_default();
    if last.contains('.') {
        return ApiError::not_found(format!("the console has no file `{path}`")).into_response();
    }
    serve(INDEX, &headers)
}

fn serve(at: usize, request: &HeaderMap) -> Response {
    let asset = &ASSETS[at];
    let etag = ETAGS[at].clone();
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|tag| {
            let tag = tag.trim();
            // If-None-Match compares weakly: `W/"x"` matches `"x"`.
            tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == etag.as_bytes()
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}
