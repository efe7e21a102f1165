//! prism-control-plane owns Prism's policy at rest and in motion: the sled
//! store (every accepted write one flushed revision), the admin HTTP API that
//! writes it, the xDS discovery server that streams it to proxies, and the
//! fleet state of those proxies.
//!
//! It must not depend on the data plane; prism-proto is the only ground the two
//! share. sled stays inside `store`, tonic inside `discovery`, axum inside
//! `admin`/`error`.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

mod admin;
mod diff;
mod discovery;
pub mod envoy;
mod error;
mod fleet;
mod store;

use admin::AdminState;
use discovery::Discovery;
use envoy::EnvoyParams;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use fleet::Fleet;
use store::{Store, StoreError};

/// Bootstrap settings of a control plane.
#[derive(Clone, Debug)]
pub struct Config {
    /// Directory of the sled store; created if missing.
    pub data_dir: PathBuf,
    /// Address of the socket listener in the Envoy view of the policy (the
    /// Listener `prism-http` that Envoy proxies subscribing to this control
    /// plane bind).
    pub envoy_listener: SocketAddr,
    /// Address of the TLS socket listener in the Envoy view (the Listener
    /// `prism-https`, served while some namespace has a `tls_secret`).
    pub envoy_tls_listener: SocketAddr,
}

/// Where Envoy proxies listen unless told otherwise.
pub const DEFAULT_ENVOY_LISTENER: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 10000);

/// Where Envoy proxies listen for TLS unless told otherwise.
pub const DEFAULT_ENVOY_TLS_LISTENER: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 10443);

impl Config {
    /// Settings with the store in `data_dir` and every other default.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            envoy_listener: DEFAULT_ENVOY_LISTENER,
            envoy_tls_listener: DEFAULT_ENVOY_TLS_LISTENER,
        }
    }
}

/// Sockets the control plane serves on, bound by the caller (so tests and the
/// binary can bind `127.0.0.1:0` and learn the port).
#[derive(Debug)]
pub struct Listeners {
    /// The admin HTTP API.
    pub admin: TcpListener,
    /// The xDS discovery server (gRPC).
    pub xds: TcpListener,
}

/// Why the control plane stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("admin API: {0}")]
    Admin(#[source] std::io::Error),
    #[error("discovery server: {0}")]
    Discovery(#[from] tonic::transport::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
}

/// Serves the admin API and the discovery server until `shutdown` resolves,
/// then ends every discovery stream, stops both servers and closes the store.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let store = Store::open(&config.data_dir)?;
    let fleet = Fleet::default();
    let (admin_addr, xds_addr) = (listeners.admin.local_addr()?, listeners.xds.local_addr()?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        // An error means the sender is gone, which also means stop.
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let admin = axum::serve(
        listeners.admin,
        admin::router(AdminState {
            store: store.clone(),
            fleet: fleet.clone(),
        }),
    )
    .with_graceful_shutdown(stopped(stop_rx.clone()));
    let params = EnvoyParams {
        listener_address: config.envoy_listener,
        tls_listener_address: config.envoy_tls_listener,
    };
    let discovery = Discovery::start(store.clone(), fleet, params, stop_rx.clone());
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AggregatedDiscoveryServiceServer<Discovery>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(discovery::ADS_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Reflection(e.to_string()))?;
    let xds = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(discovery.into_service())
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(nodelay(listeners.xds), stopped(stop_rx));

    info!(%admin_addr, %xds_addr, data_dir = %config.data_dir.display(), revision = store.revision(), "Control plane ready.");
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let (admin, xds) = tokio::join!(async { admin.await.map_err(Error::Admin) }, async {
        xds.await.map_err(Error::from)
    });
    admin?;
    xds?;
    info!("Control plane stopped.");
    Ok(())
}

/// The discovery listener's connections with Nagle's algorithm off. tonic
/// sets `TCP_NODELAY` only on listeners it binds itself; without it, the
/// second of a batch's small responses waits for the proxy's delayed ACK,
/// and a fresh proxy's first configuration arrived 40 ms late about half the
/// time.
fn nodelay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn discovery_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = Box::pin(nodelay(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = tokio::time::timeout(std::time::Duration::from_secs(10), incoming.next())
            .await
            .expect("accepted in time")
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("nodelay"));
    }
}
