//! The one place errors become responses, outermost in the stack. An HTTP
//! caller gets the error's status and a one-line text body; a gRPC caller
//! (`content-type: application/grpc…`) gets a trailers-only response: HTTP 200
//! with `grpc-status` and `grpc-message` in the headers and no body. The error
//! and its whole cause chain go to the log, never to the client.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::{debug, info, warn};

use super::error::{Blame, BoxError, Chain, ProxyError};
use super::server::ClientAddr;

/// The `via` value Prism adds to every response.
pub(crate) const VIA: HeaderValue = HeaderValue::from_static("1.1 prism");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// Set on the answer when a backend limit refused the request, as Envoy's
/// `x-envoy-overloaded`.
const OVERLOADED: HeaderName = HeaderName::from_static("x-prism-overloaded");

/// gRPC status codes (`google.rpc.Code`) the proxy answers with.
mod grpc {
    pub const DEADLINE_EXCEEDED: u16 = 4;
    pub const RESOURCE_EXHAUSTED: u16 = 8;
    pub const UNIMPLEMENTED: u16 = 12;
    pub const INTERNAL: u16 = 13;
    pub const UNAVAILABLE: u16 = 14;
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RespondLayer;

/// Turns every error of the stack below into a response.
#[derive(Debug)]
pub(crate) struct Respond<S> {
    inner: S,
    /// Why the stack below refused readiness, answered to the next call.
    refused: Option<BoxError>,
}

pin_project! {
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        grpc: bool,
        client: Option<SocketAddr>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] inner: F },
        Refused { error: Option<BoxError> },
    }
}

pin_project! {
    /// The body of every proxy response: the upstream's streamed through, or
    /// a short one of the proxy's own.
    #[project = ResponseBodyProj]
    pub(crate) enum ResponseBody<B> {
        Forwarded { #[pin] body: B },
        Local { text: Option<Bytes> },
    }
}

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;

    fn layer(&self, inner: S) -> Respond<S> {
        Respond {
            inner,
            refused: None,
        }
    }
}

impl<S: Clone> Clone for Respond<S> {
    fn clone(&self) -> Self {
        Respond {
            inner: self.inner.clone(),
            refused: None,
        }
    }
}

impl<S, ReqB, B> Service<Request<ReqB>> for Respond<S>
where
    S: Service<Request<ReqB>, Response = Response<B>, Error = BoxError>,
{
    type Response = Response<ResponseBody<B>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A stage that refuses readiness fails this request, not the connection.
        if let Err(error) = ready!(self.inner.poll_ready(cx)) {
            self.refused = Some(error);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let grpc = is_grpc(&request);
        let client = request.extensions().get::<ClientAddr>().map(|c| c.0);
        let state = match self.refused.take() {
            Some(error) => State::Refused { error: Some(error) },
            None => State::Called {
                inner: self.inner.call(request),
            },
        };
        ResponseFuture {
            state,
            grpc,
            client,
        }
    }
}

impl<F, B> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<ResponseBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.state.project() {
            StateProj::Called { inner } => ready!(inner.poll(cx)),
            StateProj::Refused { error } => {
                Err(error.take().unwrap_or_else(|| ProxyError::Internal.into()))
            }
        };
        let response = match result {
            Ok(response) => response.map(|body| ResponseBody::Forwarded { body }),
            Err(error) => {
                let classified = ProxyError::classify(&*error);
                let (kind, client, chain) = (classified.kind(), this.client, Chain(&*error));
                // Whether the upstream may have seen the request.
                let retryable = classified.retryable();
                match classified.blame() {
                    // Refused by the client's own doing, or shed at the
                    // proxy-wide limit (the overload stage logs each episode
                    // once): a log line each would flood exactly when the
                    // proxy has least to spare.
                    Blame::Client => debug!(error = %chain, kind, ?client, "Request refused."),
                    Blame::Proxy if matches!(classified, ProxyError::Overloaded) => {
                        debug!(error = %chain, kind, ?client, "Request refused.")
                    }
                    Blame::Upstream => {
                        info!(error = %chain, kind, retryable, ?client, "Request failed.")
                    }
                    Blame::Proxy => warn!(error = %chain, kind, ?client, "Request failed."),
                }
                error_response(classified, *this.grpc)
            }
        };
        Poll::Ready(Ok(response))
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project() {
            ResponseBodyProj::Forwarded { body } => body.poll_frame(cx),
            ResponseBodyProj::Local { text } => {
                Poll::Ready(text.take().map(|t| Ok(Frame::data(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Forwarded { body } => body.is_end_stream(),
            ResponseBody::Local { text } => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Forwarded { body } => body.size_hint(),
            ResponseBody::Local { text } => {
                SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64))
            }
        }
    }
}

/// Whether the caller speaks gRPC and so expects its errors as gRPC statuses.
pub(crate) fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The response for `error`: an HTTP status and text, or a gRPC status.
fn error_response<B>(error: &ProxyError, grpc: bool) -> Response<ResponseBody<B>> {
    let message = error.to_string();
    let mut response = Response::new(ResponseBody::Local { text: None });
    let headers = response.headers_mut();
    if grpc {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(GRPC_STATUS, HeaderValue::from(grpc_code(error)));
        headers.insert(GRPC_MESSAGE, grpc_message(&message));
    } else {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        *response.status_mut() = http_status(error);
        *response.body_mut() = ResponseBody::Local {
            text: Some(Bytes::from(message + "\n")),
        };
    }
    match error {
        ProxyError::RateLimited { retry_after } => {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after_seconds(*retry_after));
        }
        ProxyError::PendingOverflow | ProxyError::RequestsOverflow => {
            response
                .headers_mut()
                .insert(OVERLOADED, HeaderValue::from_static("true"));
        }
        _ => {}
    }
    response.headers_mut().insert(header::VIA, VIA);
    response
}

/// The trailers that end a gRPC response which the proxy cuts short with
/// `error` after its head has gone out.
pub(crate) fn grpc_trailers(error: &ProxyError) -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(2);
    trailers.insert(GRPC_STATUS, HeaderValue::from(grpc_code(error)));
    trailers.insert(GRPC_MESSAGE, grpc_message(&error.to_string()));
    trailers
}

/// `retry-after` in whole seconds, rounded up: a client that waits that long
/// finds a token.
fn retry_after_seconds(wait: Duration) -> HeaderValue {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(seconds.max(1))
}

/// The status an HTTP caller gets for `error` (the first [`ProxyError`] in
/// its cause chain); the metrics count gRPC callers' errors by it too.
pub(crate) fn error_status(error: &(dyn std::error::Error + 'static)) -> StatusCode {
    http_status(ProxyError::classify(error))
}

/// The status an HTTP caller gets for `error`.
pub(crate) fn http_status(error: &ProxyError) -> StatusCode {
    match error {
        ProxyError::NotConfigured
        | ProxyError::Overloaded
        | ProxyError::PendingOverflow
        | ProxyError::RequestsOverflow
        | ProxyError::NoHealthyUpstream => StatusCode::SERVICE_UNAVAILABLE,
        ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
        ProxyError::Connect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
        ProxyError::ConnectTimeout | ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ProxyError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn grpc_code(error: &ProxyError) -> u16 {
    match error {
        ProxyError::NotConfigured
        | ProxyError::Overloaded
        | ProxyError::PendingOverflow
        | ProxyError::RequestsOverflow
        | ProxyError::NoHealthyUpstream
        | ProxyError::Connect(_)
        | ProxyError::ConnectTimeout
        | ProxyError::Upstream(_) => grpc::UNAVAILABLE,
        ProxyError::NoRoute { .. } => grpc::UNIMPLEMENTED,
        ProxyError::Timeout => grpc::DEADLINE_EXCEEDED,
        ProxyError::RateLimited { .. } | ProxyError::BodyTooLarge => grpc::RESOURCE_EXHAUSTED,
        ProxyError::Internal => grpc::INTERNAL,
    }
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII, and
/// `%` itself, as `%XX` (gRPC over HTTP/2, "Responses").
fn grpc_message(text: &str) -> HeaderValue {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    // Only printable ASCII is left, which is always a valid header value.
    HeaderValue::from_str(&encoded).unwrap_or(HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Empty};

    use super::*;

    async fn body_text(response: Response<ResponseBody<Empty<Bytes>>>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn http_callers_get_a_status_and_a_line_of_text() {
        let response = error_response::<Empty<Bytes>>(&ProxyError::Timeout, false);
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(response.headers()[header::VIA], "1.1 prism");
        assert!(!response.headers().contains_key(GRPC_STATUS));
        assert_eq!(body_text(response).await, "upstream request timeout\n");
    }

    #[tokio::test]
    async fn grpc_callers_get_a_trailers_only_status() {
        let error = ProxyError::NoRoute {
            host: "h".into(),
            path: "/pkg.Svc/Método".into(),
        };
        let response = error_response::<Empty<Bytes>>(&error, true);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(response.headers()[GRPC_STATUS], "12");
        assert_eq!(
            response.headers()[GRPC_MESSAGE],
            "no route for host h path /pkg.Svc/M%C3%A9todo"
        );
        assert!(response.body().is_end_stream());
        assert_eq!(body_text(response).await, "");
    }

    #[test]
    fn every_error_maps_to_a_status_and_a_grpc_code() {
        let boxed = || -> BoxError { std::io::Error::other("x").into() };
        let cases = [
            (ProxyError::NotConfigured, 503, grpc::UNAVAILABLE),
            (ProxyError::NoHealthyUpstream, 503, grpc::UNAVAILABLE),
            (ProxyError::Connect(boxed()), 502, grpc::UNAVAILABLE),
            (ProxyError::ConnectTimeout, 504, grpc::UNAVAILABLE),
            (ProxyError::Timeout, 504, grpc::DEADLINE_EXCEEDED),
            (ProxyError::Upstream(boxed()), 502, grpc::UNAVAILABLE),
            (ProxyError::Overloaded, 503, grpc::UNAVAILABLE),
            (ProxyError::PendingOverflow, 503, grpc::UNAVAILABLE),
            (ProxyError::RequestsOverflow, 503, grpc::UNAVAILABLE),
            (ProxyError::Internal, 500, grpc::INTERNAL),
            (
                ProxyError::RateLimited {
                    retry_after: Duration::from_millis(1),
                },
                429,
                grpc::RESOURCE_EXHAUSTED,
            ),
            (ProxyError::BodyTooLarge, 413, grpc::RESOURCE_EXHAUSTED),
        ];
        for (error, status, code) in cases {
            assert_eq!(http_status(&error).as_u16(), status, "{error}");
            assert_eq!(grpc_code(&error), code, "{error}");
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), "2");
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), "3");
    }

    #[test]
    fn grpc_callers_are_recognised_by_content_type() {
        let request = |ct: &str| {
            Request::post("/")
                .header(header::CONTENT_TYPE, ct)
                .body(())
                .expect("request")
        };
        assert!(is_grpc(&request("application/grpc")));
        assert!(is_grpc(&request("application/grpc+proto")));
        assert!(!is_grpc(&request("application/json")));
        assert!(!is_grpc(&Request::get("/").body(()).expect("request")));
    }
}
