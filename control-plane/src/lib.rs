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
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tracing::info;

mod admin;
mod diff;
mod discovery;
pub mod envoy;
mod error;
mod fleet;
mod metrics;
mod store;
pub mod tls;
mod traffic;

pub use admin::ADMIN_TOKEN_FILE;
use admin::AdminState;
use discovery::{Discovery, LoadReporting};
use envoy::EnvoyParams;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use fleet::Fleet;
use store::{Store, StoreError};
pub use tls::TlsFiles;
pub use traffic::DEFAULT_INTERVAL as DEFAULT_LOAD_REPORT_INTERVAL;
use traffic::Traffic;

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
    /// Serve the admin API over TLS with this certificate. Without it, the
    /// admin API serves plain HTTP, and only on a loopback address.
    pub admin_tls: Option<TlsFiles>,
    /// Serve discovery over TLS with this certificate.
    pub xds_tls: Option<TlsFiles>,
    /// With `xds_tls`: require every discovery client to present a
    /// certificate signed by this CA (PEM); each proxy then gets only the
    /// namespaces its certificate names ([`tls`]).
    pub xds_client_ca: Option<PathBuf>,
    /// How often proxies report their load ([`DEFAULT_LOAD_REPORT_INTERVAL`]).
    pub load_report_interval: std::time::Duration,
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
            admin_tls: None,
            xds_tls: None,
            xds_client_ca: None,
            load_report_interval: DEFAULT_LOAD_REPORT_INTERVAL,
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
    #[error(transparent)]
    Token(#[from] admin::auth::BootstrapError),
    #[error("admin API: {0}")]
    Admin(#[source] std::io::Error),
    #[error("discovery server: {0}")]
    Discovery(#[from] tonic::transport::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(
        "the admin API serves plain HTTP only on a loopback address, not {0}: \
         give it a certificate (--admin-tls-cert, --admin-tls-key) or bind 127.0.0.1"
    )]
    PlainAdmin(SocketAddr),
    #[error("--xds-client-ca needs --xds-tls-cert and --xds-tls-key")]
    ClientCaWithoutTls,
}

/// Opens the store and serves until `shutdown` resolves: [`ControlPlane::open`],
/// then [`ControlPlane::serve`].
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    ControlPlane::open(config)
        .await?
        .serve(listeners, shutdown)
        .await
}

/// A control plane whose store is open, not serving yet.
#[derive(Debug)]
pub struct ControlPlane {
    config: Config,
    store: Store,
    token_file: PathBuf,
    admin_tls: Option<Arc<rustls::ServerConfig>>,
    xds_tls: Option<Arc<rustls::ServerConfig>>,
}

impl ControlPlane {
    /// Opens (creating if needed) the store in the configured data
    /// directory. A store with no admin token yet gets one, written to
    /// `<data dir>/admin-token` ([`ADMIN_TOKEN_FILE`]) for its owner only:
    /// once this returns, that file is there for the CLI to find.
    /// Certificates are read here too, so a bad one stops the control plane
    /// before it serves anything.
    pub async fn open(config: Config) -> Result<Self, Error> {
        let admin_tls = config
            .admin_tls
            .as_ref()
            .map(|files| tls::server_config(files, None, &[b"h2", b"http/1.1"]))
            .transpose()?;
        let xds_tls = match (&config.xds_tls, &config.xds_client_ca) {
            (None, Some(_)) => return Err(Error::ClientCaWithoutTls),
            (None, None) => None,
            (Some(files), ca) => Some(tls::server_config(files, ca.as_deref(), &[b"h2"])?),
        };
        let store = Store::open(&config.data_dir)?;
        admin::auth::bootstrap(&store, &config.data_dir).await?;
        Ok(Self {
            token_file: config.data_dir.join(ADMIN_TOKEN_FILE),
            config,
            store,
            admin_tls,
            xds_tls,
        })
    }

    /// Where the first admin token was written (the file may be gone since,
    /// or hold a token revoked since).
    pub fn token_file(&self) -> &std::path::Path {
        &self.token_file
    }

    /// Serves the admin API and the discovery server until `shutdown`
    /// resolves, then ends every discovery stream, stops both servers and
    /// closes the store.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let admin_addr = listeners.admin.local_addr()?;
        if self.admin_tls.is_none() && !admin_addr.ip().is_loopback() {
            return Err(Error::PlainAdmin(admin_addr));
        }
        if self.admin_tls.is_none() {
            info!(%admin_addr, "The admin API serves plain HTTP, on loopback only; give it a certificate to serve beyond this host.");
        }
        serve(self, listeners, shutdown).await
    }
}

async fn serve(
    control_plane: ControlPlane,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let ControlPlane {
        config,
        store,
        admin_tls,
        xds_tls,
        ..
    } = control_plane;
    let fleet = Fleet::default();
    let traffic = Traffic::new(config.load_report_interval);
    let (admin_addr, xds_addr) = (listeners.admin.local_addr()?, listeners.xds.local_addr()?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        // An error means the sender is gone, which also means stop.
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let admin = axum::serve(
        tls::AdminListener::new(listeners.admin, admin_tls)?,
        admin::router(AdminState {
            store: store.clone(),
            fleet: fleet.clone(),
            traffic: traffic.clone(),
            shutdown: stop_rx.clone(),
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
        .add_service(LoadReporting::new(traffic, stop_rx.clone()).into_service())
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(
            ReceiverStream::new(tls::incoming(listeners.xds, xds_tls)).map(Ok::<_, std::io::Error>),
            stopped(stop_rx),
        );

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn discovery_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = tls::incoming(listener, None);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = tokio::time::timeout(std::time::Duration::from_secs(10), incoming.recv())
            .await
            .expect("accepted in time")
            .expect("a connection");
        let tls::Conn::Plain(accepted) = accepted else {
            panic!("plain TCP without a certificate");
        };
        assert!(accepted.nodelay().expect("nodelay"));
    }
}
