//! The demo upstream: a small HTTP server that says who it is, so a newcomer
//! (and the end-to-end tests) can see which backend answered.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tracing::debug;

/// Response header naming the upstream that answered.
pub const UPSTREAM_HEADER: &str = "x-prism-upstream";

/// Serves the demo upstream on `listener` until `shutdown` resolves. Every
/// response carries `x-prism-upstream: <name>` and a body that names the
/// upstream and echoes the request line and host, and the W3C trace context
/// headers when the request has them; POST bodies are echoed.
pub async fn serve(listener: TcpListener, name: String, shutdown: impl Future<Output = ()>) {
    let name: Arc<str> = name.into();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "Demo upstream failed to accept.");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let name = Arc::clone(&name);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(Arc::clone(&name), request));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    name: Arc<str>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let host = request
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(request.uri().authority().map(|a| a.as_str()))
        .unwrap_or("")
        .to_string();
    let mut line = format!("{} {} host={host}", request.method(), request.uri().path());
    // The trace context the proxy passed on, when it traces.
    for name in ["traceparent", "tracestate"] {
        if let Some(value) = request.headers().get(name).and_then(|v| v.to_str().ok()) {
            line.push_str(&format!("\n{name}={value}"));
        }
    }
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut text = format!("Hello from the Prism demo upstream `{name}`.\n{line}\n");
    if !body.is_empty() {
        text.push_str(&String::from_utf8_lossy(&body));
    }
    let mut response = Response::new(Full::new(Bytes::from(text)));
    if let Ok(value) = name.parse() {
        response.headers_mut().insert(UPSTREAM_HEADER, value);
    }
    Ok(response)
}
