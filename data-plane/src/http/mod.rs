//! The L7 data plane: the request path as a `tower` stack, one stage per
//! file, read top to bottom in [`stack`]. Stages above the route stage see a
//! plain `Request`; below it a request travels with the route it matched
//! ([`route::Routed`]), and below the backend stage with its endpoint
//! ([`backend::Picked`]). Every stage's error is a [`error::BoxError`]; they all
//! become responses in [`respond`] and nowhere else.

pub(crate) mod backend;
pub(crate) mod body;
pub(crate) mod breaker;
pub(crate) mod endpoint;
pub(crate) mod error;
pub(crate) mod normalize;
pub(crate) mod respond;
pub(crate) mod route;
pub(crate) mod server;
pub(crate) mod timeout;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceBuilder;

use crate::runtime::Runtime;

/// The proxy's request path, outermost first.
pub(crate) type Stack = respond::Respond<
    normalize::Normalize<
        route::Router<
            timeout::Timeout<backend::Balance<breaker::CircuitBreaker<endpoint::Forward>>>,
        >,
    >,
>;

/// The request path, in the order of DESIGN.md: server limits → rate limit →
/// route → timeout → retry → balance → circuit breaker → endpoint client.
/// The server's limits are hyper's, set per connection in [`server::serve`].
pub(crate) fn stack(runtime: Arc<ArcSwap<Runtime>>) -> Stack {
    ServiceBuilder::new()
        // Every error below becomes an HTTP or gRPC response here.
        .layer(respond::RespondLayer)
        // Hop-by-hop headers out; x-forwarded-*, Host and via in.
        .layer(normalize::NormalizeLayer)
        // One runtime view per request; host + path → route.
        .layer(route::RouteLayer::new(runtime))
        // The route timeout bounds the whole response.
        .layer(timeout::TimeoutLayer)
        // An endpoint of the route's backend.
        .layer(backend::BalanceLayer)
        // The endpoint's circuit breaker, if its backend has one.
        .layer(breaker::BreakerLayer)
        // The backend's own pooled client.
        .service(endpoint::Forward)
}

/// Serves the proxy on `listener` until `shutdown` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    runtime: Arc<ArcSwap<Runtime>>,
    params: server::Params,
    shutdown: watch::Receiver<bool>,
) {
    server::serve(listener, params, shutdown, stack(runtime)).await;
}

#[cfg(test)]
mod tests;
