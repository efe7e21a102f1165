//! The route stage: the request's one `load_full()` of the runtime, then
//! host + path (+ method, headers, query) → [`Route`], and the route's action:
//! a redirect or a direct response is answered here; a forward picks one of
//! the route's weighted backends, rewrites the path and host, changes the
//! request's headers, and passes it down as [`Routed`]: the route and the
//! backend it picked (its pool and parameters) stay with it to the end,
//! whatever is applied meanwhile. The route's response header changes are
//! applied to the response head on the way back.
//!
//! With metrics on, this is also where a request is recorded: the series
//! of its route and backend (compiled into the route: no lookup), or the
//! `unmatched` one, takes its status class, duration and bytes when its
//! response body ends ([`Metered`]); an error is recorded with the status
//! [`super::respond`] will answer it with.
//!
//! The same record finishes the request's access log line when its route's
//! namespace has access logs on ([`Route::log`], compiled in): the line
//! starts here, with what the client sent (before any rewrite), and the
//! stages below fill in the endpoint, its latency and the retries through
//! the [`UpstreamLog`](crate::access_log::UpstreamLog) slot the request carries.
//!
//! With traces on, the request's span ([`RequestSpan`]) starts here too,
//! once the route is known (it rewrites the request's `traceparent` to the
//! span's, before the access log line reads it), and ends with the same
//! record.

use std::future::Future;
use std::ops::Not;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::body::{ReplayBody, RequestBody};
use super::error::{BoxError, ProxyError};
use super::respond;
use crate::access_log::Pending;
use crate::metrics::{Metered, Recorder};
use crate::runtime::{Action, Backend, Probe, Route, Runtime};
use crate::trace::RequestSpan;

/// A request below the route stage.
#[derive(Debug)]
pub(crate) struct Routed {
    pub route: Arc<Route>,
    /// The backend picked for this request from the route's split.
    pub backend: Arc<Backend>,
    pub request: Request<ReplayBody>,
}

/// A response of the route stage: the upstream's, or its own (a redirect or
/// a direct response), recorded as it streams.
pub(crate) type RouteBody<B> = Metered<Either<B, Full<Bytes>>>;

#[derive(Clone, Debug)]
pub(crate) struct RouteLayer {
    runtime: Arc<ArcSwap<Runtime>>,
}

#[derive(Clone, Debug)]
pub(crate) struct Router<S> {
    runtime: Arc<ArcSwap<Runtime>>,
    inner: S,
}

pin_project! {
    #[project = ResponseFutureProj]
    pub(crate) enum ResponseFuture<F> {
        Routed {
            #[pin]
            inner: F,
            // Set when the route changes response headers.
            route: Option<Arc<Route>>,
            // Set with metrics or an access log on, as in the other two.
            recorder: Option<Recorder>,
        },
        Local {
            response: Option<Response<Full<Bytes>>>,
            recorder: Option<Recorder>,
        },
        Failed {
            error: Option<ProxyError>,
            recorder: Option<Recorder>,
        },
    }
}

impl RouteLayer {
    pub(crate) fn new(runtime: Arc<ArcSwap<Runtime>>) -> Self {
        Self { runtime }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Router<S>;

    fn layer(&self, inner: S) -> Router<S> {
        Router {
            runtime: Arc::clone(&self.runtime),
            inner,
        }
    }
}

impl<S, B> Service<Request<RequestBody>> for Router<S>
where
    S: Service<Routed, Response = Response<B>, Error = BoxError>,
{
    type Response = Response<RouteBody<B>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let runtime = self.runtime.load_full();
        // Where a request that reaches no route is recorded, if anywhere.
        let unmatched = |request: &mut Request<RequestBody>| {
            let series = runtime.metrics().map(|m| Arc::clone(m.unmatched()));
            Recorder::start(series, None, RequestSpan::start(request, None), None)
        };
        if !runtime.is_configured() {
            return ResponseFuture::failed(ProxyError::NotConfigured, unmatched(&mut request));
        }
        let host = request_host(&request);
        let path = request.uri().path();
        let probe = Probe {
            method: request.method(),
            path,
            query: request.uri().query(),
            headers: request.headers(),
        };
        let Some(route) = runtime.route(host, &probe) else {
            let error = ProxyError::NoRoute {
                host: host.to_string(),
                path: path.to_string(),
            };
            return ResponseFuture::failed(error, unmatched(&mut request));
        };
        // A route's own answer: its series, its line if it logs, its span.
        let local = |route: &Route, request: &mut Request<RequestBody>| {
            let span = RequestSpan::start(request, Some((route, None)));
            let log = route.log.as_ref().map(|l| Pending::start(l, None, request));
            Recorder::start(route.series.clone(), log, span, None)
        };
        let forward = match &route.action {
            Action::Forward(forward) => forward,
            Action::Redirect(redirect) => {
                let scheme = request.uri().scheme_str().unwrap_or_else(|| {
                    request
                        .headers()
                        .get("x-forwarded-proto")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("http")
                });
                let uri = request.uri();
                let Some(location) = redirect.location(scheme, host, uri.path(), uri.query())
                else {
                    let recorder = local(route, &mut request);
                    return ResponseFuture::failed(ProxyError::Internal, recorder);
                };
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = redirect.status;
                response.headers_mut().insert(header::LOCATION, location);
                route.response_headers.apply(response.headers_mut());
                return ResponseFuture::Local {
                    response: Some(response),
                    recorder: local(route, &mut request),
                };
            }
            Action::Respond(respond) => {
                let mut response = Response::new(Full::new(respond.body.clone()));
                *response.status_mut() = respond.status;
                // A body is `text/plain` unless the route says otherwise; an
                // empty one has no type (as Envoy).
                if !respond.body.is_empty() && !route.response_headers.writes(&header::CONTENT_TYPE)
                {
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                }
                route.response_headers.apply(response.headers_mut());
                return ResponseFuture::Local {
                    response: Some(response),
                    recorder: local(route, &mut request),
                };
            }
        };
        let split = forward.pick();
        let backend = Arc::clone(&split.backend);
        let span = RequestSpan::start(&mut request, Some((route, Some(&backend))));
        // Started before any rewrite: the line shows what the client sent.
        let log = route
            .log
            .as_ref()
            .map(|l| Pending::start(l, Some(&backend.name), &request));
        if let Some(new_path) = forward.rewrite.path(request.uri().path()) {
            match with_path(request.uri(), &new_path) {
                Some(uri) => *request.uri_mut() = uri,
                // The rewrite made a path that is no URI path.
                None => {
                    let recorder = Recorder::start(split.series.clone(), log, span, None);
                    return ResponseFuture::failed(ProxyError::Internal, recorder);
                }
            }
        }
        if let Some(host) = &forward.rewrite.host {
            request.headers_mut().insert(header::HOST, host.clone());
        }
        route.request_headers.apply(request.headers_mut());
        let respond_route = route
            .response_headers
            .is_empty()
            .not()
            .then(|| Arc::clone(route));
        let mut request = request.map(ReplayBody::new);
        if let Some(log) = &log {
            request.extensions_mut().insert(log.upstream());
        }
        let recorder = Recorder::start(split.series.clone(), log, span, request.body().end());
        ResponseFuture::Routed {
            inner: self.inner.call(Routed {
                route: Arc::clone(route),
                backend,
                request,
            }),
            route: respond_route,
            recorder,
        }
    }
}

impl<F> ResponseFuture<F> {
    fn failed(error: ProxyError, recorder: Option<Recorder>) -> Self {
        ResponseFuture::Failed {
            error: Some(error),
            recorder,
        }
    }
}

impl<F, B> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<RouteBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Routed {
                inner,
                route,
                recorder,
            } => {
                let mut response = match ready!(inner.poll(cx)) {
                    Ok(response) => response,
                    Err(error) => {
                        if let Some(mut recorder) = recorder.take() {
                            recorder.answered(respond::error_status(&*error));
                        }
                        return Poll::Ready(Err(error));
                    }
                };
                if let Some(route) = route.take() {
                    route.response_headers.apply(response.headers_mut());
                }
                Poll::Ready(Ok(answered(response.map(Either::Left), recorder.take())))
            }
            ResponseFutureProj::Local { response, recorder } => Poll::Ready(
                response
                    .take()
                    .map(|r| answered(r.map(Either::Right), recorder.take()))
                    .ok_or_else(|| ProxyError::Internal.into()),
            ),
            ResponseFutureProj::Failed { error, recorder } => {
                let error = error.take().unwrap_or(ProxyError::Internal);
                if let Some(mut recorder) = recorder.take() {
                    recorder.answered(respond::http_status(&error));
                }
                Poll::Ready(Err(error.into()))
            }
        }
    }
}

/// `response`, its status told to `recorder`, which its body then carries.
fn answered<B>(response: Response<B>, mut recorder: Option<Recorder>) -> Response<Metered<B>> {
    if let Some(recorder) = &mut recorder {
        recorder.answered(response.status());
    }
    response.map(|body| Metered::new(body, recorder))
}

/// `uri` with its path replaced by `path`, keeping the query.
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let path_and_query = match uri.query() {
        Some(query) => PathAndQuery::try_from(format!("{path}?{query}")),
        None => PathAndQuery::try_from(path),
    }
    .ok()?;
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).ok()
}

/// The host a request is for: `:authority` (HTTP/2, or an absolute-form
/// HTTP/1 target), else the Host header.
pub(crate) fn request_host<B>(request: &Request<B>) -> &str {
    if let Some(authority) = request.uri().authority() {
        return authority.as_str();
    }
    request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}
