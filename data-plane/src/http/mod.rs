//! The L7 data plane: the request path as a `tower` stack, one stage per
//! file, read top to bottom in [`stack`]. Stages above the route stage see a
//! plain `Request`; below it a request travels with the route it matched
//! ([`route::Routed`]), and below the backend stage with its endpoint
//! ([`backend::Picked`]). Every stage's error is a [`error::BoxError`]; they all
//! become responses in [`respond`] and nowhere else.

pub(crate) mod backend;
pub(crate) mod body;
pub(crate) mod bodylimit;
pub(crate) mod breaker;
pub(crate) mod endpoint;
pub(crate) mod error;
pub(crate) mod h1;
pub(crate) mod idle;
pub(crate) mod inflight;
pub(crate) mod normalize;
pub(crate) mod overload;
pub(crate) mod ratelimit;
pub(crate) mod respond;
pub(crate) mod retry;
pub(crate) mod route;
pub(crate) mod server;
pub(crate) mod timeout;
pub(crate) mod tls;
pub(crate) mod upgrade;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceBuilder;

use crate::data::gate::{DataGate, DataGateLayer};
use crate::metrics::ListenerMetrics;
use crate::runtime::Runtime;

/// The proxy's request path, outermost first.
pub(crate) type Stack = respond::Respond<
    overload::ConcurrencyLimit<
        normalize::Normalize<
            DataGate<
                route::Router<
                    ratelimit::RateLimit<
                        bodylimit::BodyLimit<
                            upgrade::Upgrade<
                                timeout::Timeout<
                                    retry::Retry<
                                        backend::Balance<
                                            breaker::CircuitBreaker<endpoint::Forward>,
                                        >,
                                    >,
                                >,
                            >,
                        >,
                    >,
                >,
            >,
        >,
    >,
>;

/// The request path, in the order of DESIGN.md: server limits → rate limit →
/// route → timeout → retry → balance → circuit breaker → endpoint client.
/// Data API calls leave it before the route stage, at the data gate.
/// The server's wire limits are applied per connection in [`server::serve`]
/// (by [`h1`] and hyper's HTTP/2); the proxy-wide concurrency limit is the
/// first stage, and counts the listener's requests in flight in `metrics`.
pub(crate) fn stack(
    runtime: Arc<ArcSwap<Runtime>>,
    max_concurrent_requests: u32,
    metrics: &ListenerMetrics,
) -> Stack {
    ServiceBuilder::new()
        // Every error below becomes an HTTP or gRPC response here.
        .layer(respond::RespondLayer)
        // Past the proxy-wide limit of requests in flight: 503 at once.
        .layer(overload::ConcurrencyLimitLayer::new(
            max_concurrent_requests,
            metrics,
        ))
        // Hop-by-hop headers out; x-forwarded-*, Host and via in.
        .layer(normalize::NormalizeLayer)
        // `prism.data.v1` calls and `/v1/kv/`, `/v1/pubsub/`: to the data
        // gateway, never to a route.
        .layer(DataGateLayer::new(Arc::clone(&runtime)))
        // One runtime view per request; host + path → route.
        .layer(route::RouteLayer::new(runtime))
        // The namespace's and the route's token buckets: 429 when empty.
        .layer(ratelimit::RateLimitLayer)
        // The route's max_request_body_bytes: 413 beyond it.
        .layer(bodylimit::BodyLimitLayer)
        // An upstream's `101`: the upgraded streams joined, past the timeout.
        .layer(upgrade::UpgradeLayer)
        // The route timeout bounds the whole response.
        .layer(timeout::TimeoutLayer)
        // The route's retries, each to an endpoint not tried yet.
        .layer(retry::RetryLayer)
        // An endpoint of the route's backend.
        .layer(backend::BalanceLayer)
        // The endpoint's circuit breaker, if its backend has one.
        .layer(breaker::BreakerLayer)
        // The backend's own pooled client.
        .service(endpoint::Forward)
}

/// Serves the proxy on `listener` until `shutdown` turns true, counting
/// its connections and requests in `metrics`.
pub(crate) async fn serve(
    listener: TcpListener,
    runtime: Arc<ArcSwap<Runtime>>,
    params: server::Params,
    shutdown: watch::Receiver<bool>,
    metrics: ListenerMetrics,
) {
    let stack = stack(runtime, params.limits.max_concurrent_requests, &metrics);
    let open = Some(metrics.connections);
    server::serve_counted(listener, None, params, shutdown, stack, open).await;
}

/// Serves the proxy over TLS on `listener` until `shutdown` turns true,
/// counting its connections and requests in `metrics`.
pub(crate) async fn serve_tls(
    listener: TcpListener,
    runtime: Arc<ArcSwap<Runtime>>,
    params: server::Params,
    shutdown: watch::Receiver<bool>,
    metrics: ListenerMetrics,
) {
    let max = params.limits.max_concurrent_requests;
    let stack = stack(Arc::clone(&runtime), max, &metrics);
    let open = Some(metrics.connections);
    server::serve_counted(listener, Some(runtime), params, shutdown, stack, open).await;
}

#[cfg(test)]
mod tests;
