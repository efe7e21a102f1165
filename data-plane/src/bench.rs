//! Bench-only entry points (`data-plane/benches/`): not an API, hidden from
//! the docs, and free to change with the internals they wrap.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, Method, Response};
use http_body_util::Full;
use prism_proto::Snapshot;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::server;
use crate::runtime::{OwnAddresses, Probe, Runtime};

pub use crate::http::ratelimit::bench::Bucket;
pub use crate::runtime::bench::{Balancer, Breaker};

/// The whole proxy, every stage of its request path, serving one compiled
/// policy on a loopback listener from the caller's tokio runtime. Dropping
/// it stops the server.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

/// A mock upstream on a loopback listener, served by the caller's tokio
/// runtime: every request gets `200` and a two-byte body. Dropping it stops
/// the server.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

/// A compiled policy's route matcher.
#[derive(Debug)]
pub struct RouteTable {
    runtime: Runtime,
}

impl RouteTable {
    /// Compiles `snapshot` as a proxy would; the compile error's message if
    /// it is refused.
    pub fn compile(snapshot: &Snapshot) -> Result<RouteTable, String> {
        Runtime::compile(snapshot, &Runtime::unconfigured(), &OwnAddresses::default())
            .map(|runtime| RouteTable { runtime })
            .map_err(|e| e.to_string())
    }

    /// The name of the route a request takes, as the route stage looks it up.
    pub fn lookup<'a>(
        &'a self,
        host: &str,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<&'a str> {
        let probe = Probe {
            method,
            path,
            query,
            headers,
        };
        self.runtime.route(host, &probe).map(|r| r.name.as_str())
    }
}

impl Proxy {
    /// Compiles `snapshot` and serves it on `127.0.0.1:0` with the default
    /// wire limits; the compile or bind error's message if that fails.
    pub async fn start(snapshot: &Snapshot) -> Result<Proxy, String> {
        let runtime =
            Runtime::compile(snapshot, &Runtime::unconfigured(), &OwnAddresses::default())
                .map_err(|e| e.to_string())?;
        let (listener, addr) = bind().await?;
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(crate::http::serve(
            listener,
            Arc::new(ArcSwap::from_pointee(runtime)),
            params(),
            stopped,
        ));
        Ok(Proxy { addr, _stop: stop })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Upstream {
    /// Serves on `127.0.0.1:0`; the bind error's message if that fails.
    pub async fn start() -> Result<Upstream, String> {
        let (listener, addr) = bind().await?;
        let (stop, stopped) = watch::channel(false);
        let service = tower::service_fn(|_request| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        });
        tokio::spawn(server::serve(listener, None, params(), stopped, service));
        Ok(Upstream { addr, _stop: stop })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn bind() -> Result<(TcpListener, SocketAddr), String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    Ok((listener, addr))
}

fn params() -> server::Params {
    server::Params {
        limits: crate::Limits::default(),
    }
}
