//! prism-data-plane is Prism's proxy. It owns the discovery client (one xDS
//! delta ADS stream to the control plane), the staging and validation of each
//! revision, the compiled [`Runtime`] behind one `ArcSwap`, the proxy listener
//! with its pooled upstream clients, and the proxy's own admin listener.
//!
//! It must not touch the control plane's code or storage: `prism-proto` is the
//! only ground the two planes share. tonic is used only in `discovery`, and no
//! request ever sees a half-applied configuration.

mod admin;
mod discovery;
mod error;
mod proxy;
mod runtime;
mod server;
mod stager;

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

pub use error::Error;
pub use runtime::{Backend, CompileError, OwnAddresses, RouteTarget, Runtime};

/// Bootstrap settings of one proxy.
#[derive(Clone, Debug)]
pub struct Config {
    /// URL of the control plane's discovery (xDS) endpoint, e.g. `http://127.0.0.1:18000`.
    pub control_plane: String,
    /// This proxy's identity in the fleet (xDS `Node.id`).
    pub node_id: String,
    /// Availability zone, reported as the node's locality.
    pub zone: String,
    /// Region, reported as the node's locality.
    pub region: String,
    /// Address clients reach this proxy at, published to the fleet.
    pub advertise_address: String,
}

/// Listeners bound by the caller, so tests can bind `127.0.0.1:0`.
#[derive(Debug)]
pub struct Listeners {
    /// Client traffic: HTTP/1.1 and h2c.
    pub proxy: TcpListener,
    /// The proxy admin: `/ready`, `/healthz`, `/config_dump`.
    pub admin: TcpListener,
}

/// Runs the proxy until `shutdown` resolves, then stops the discovery stream
/// and the listeners (letting open requests finish, bounded) and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let endpoint = discovery::endpoint(&config).map_err(|source| Error::InvalidControlPlane {
        address: config.control_plane.clone(),
        source: source.into(),
    })?;
    let config = Arc::new(config);
    let runtime = Arc::new(ArcSwap::from_pointee(Runtime::unconfigured()));
    let (status_tx, status_rx) = watch::channel(discovery::Status::default());
    let (stop_tx, stop_rx) = watch::channel(false);

    info!(
        node_id = %config.node_id,
        control_plane = %config.control_plane,
        proxy = ?listeners.proxy.local_addr().ok(),
        admin = ?listeners.admin.local_addr().ok(),
        "Starting the proxy."
    );
    let own = match listeners.proxy.local_addr() {
        Ok(addr) => OwnAddresses::new(addr, &config.advertise_address),
        Err(_) => OwnAddresses::default(),
    };
    let discovery = tokio::spawn(discovery::run(
        Arc::clone(&config),
        endpoint,
        Arc::clone(&runtime),
        status_tx,
        own,
    ));
    let proxy = tokio::spawn(proxy::serve(
        listeners.proxy,
        Arc::clone(&runtime),
        stop_rx.clone(),
    ));
    let admin = tokio::spawn(admin::serve(
        listeners.admin,
        Arc::from(config.node_id.as_str()),
        status_rx,
        stop_rx,
    ));

    shutdown.await;
    info!("Shutting down the proxy.");
    discovery.abort();
    // Every receiver may already be gone if a server task ended; that is fine.
    let _ = stop_tx.send(true);
    let (proxy, admin) = tokio::join!(proxy, admin);
    proxy?;
    admin?;
    if let Err(error) = discovery.await
        && !error.is_cancelled()
    {
        return Err(error.into());
    }
    Ok(())
}
