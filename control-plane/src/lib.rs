//! prism-control-plane owns Prism's policy at rest and in motion: the sled
//! store (every accepted write one flushed revision), the admin HTTP API that
//! writes it, the xDS discovery server that streams it to proxies, and the
//! fleet state of those proxies.
//!
//! It must not depend on the data plane; prism-proto is the only ground the two
//! share. sled stays inside `store`, tonic inside `discovery`, axum inside
//! `admin`/`error`.

use std::future::Future;
use std::path::PathBuf;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub mod admin;
pub mod discovery;
pub mod error;
pub mod fleet;
pub mod store;

pub use admin::AdminState;
pub use discovery::Discovery;
pub use fleet::Fleet;
pub use store::{Store, StoreError};

/// Bootstrap settings of a control plane.
#[derive(Clone, Debug)]
pub struct Config {
    /// Directory of the sled store; created if missing.
    pub data_dir: PathBuf,
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
    let discovery = Discovery::new(store.clone(), fleet, stop_rx.clone());
    let xds = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(discovery.into_service())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listeners.xds), stopped(stop_rx));

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
