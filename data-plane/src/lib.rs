//! prism-data-plane is Prism's proxy, in three rooms: `config` (how policy
//! arrives: the xDS delta ADS client, the staging and validation of each
//! revision, the last-known-good snapshot on disk and the namespace subset
//! this proxy asks for), `runtime` (what a policy compiles to, behind one
//! `ArcSwap`: route matcher and backends, each with its own pooled client) and
//! `http` (the request path as a tower stack, from the listener to the
//! upstream). `admin` is the proxy's own admin listener, which serves
//! `metrics` (the Prometheus registry, whose series compiled runtimes hold).
//! `access_log` writes a JSON line per request of the namespaces that ask
//! for one, off the request path.
//!
//! It must not touch the control plane's code or storage: `prism-proto` is the
//! only ground the two planes share. tonic is used only in `config::discovery`
//! and, for gRPC health probes, in `runtime::health`; and no request ever sees
//! a half-applied configuration.

mod access_log;
mod admin;
#[doc(hidden)]
pub mod bench;
mod config;
pub mod data;
mod error;
#[cfg(feature = "fuzz")]
#[doc(hidden)]
pub mod fuzz;
mod http;
mod metrics;
mod runtime;
#[cfg(test)]
mod test_ca;
mod trace;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prism_proto::Snapshot;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{discovery, last_good, subset};
use crate::metrics::{Listener, ListenerMetrics, Metrics};
use crate::runtime::{OwnAddresses, Runtime};

pub use access_log::{OpenError as AccessLogError, STDOUT as ACCESS_LOG_STDOUT};
pub use config::control_plane_tls::ControlPlaneTls;
pub use config::last_good::FILE_NAME as LAST_GOOD_FILE;
pub use config::subset::{SubsetError, parse_namespaces, parse_selector};
pub use error::Error;

/// How long shutdown waits for the last accepted snapshot to reach the disk.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// [`Limits::header_read_timeout`] unless set.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// [`Limits::idle_timeout`] unless set: AWS ALB's default, above the 30-60 s
/// idle expiry of common client pools' keep-alive probes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// [`Limits::max_request_header_bytes`] unless set: 64 KiB, Envoy's 60 KiB
/// rounded up.
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: u32 = 64 * 1024;
/// [`Limits::max_request_header_bytes`] at least: hyper's smallest HTTP/1
/// read buffer.
pub const MIN_MAX_REQUEST_HEADER_BYTES: u32 = 8 * 1024;
/// [`Limits::max_request_headers`] unless set (hyper's and Envoy's 100).
pub const DEFAULT_MAX_REQUEST_HEADERS: u32 = 100;
/// [`Limits::max_concurrent_streams`] unless set: the RFC 9113 recommended
/// minimum, and Envoy's edge-proxy setting.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// [`Limits::max_concurrent_requests`] unless set.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: u32 = 10_000;
/// [`Limits::drain_timeout`] unless set: Kubernetes sends SIGKILL 30 s after
/// SIGTERM by default; 20 s of drain leaves room for saving the last-known-good
/// snapshot (bounded at 5 s) before that.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

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
    /// Where the proxy keeps its last-known-good snapshot ([`LAST_GOOD_FILE`]),
    /// served at startup before the control plane answers. `None` keeps
    /// nothing on disk.
    pub data_dir: Option<PathBuf>,
    /// Serve only these namespaces (see [`parse_namespaces`]); empty means all.
    /// Reported to the control plane, which filters what this proxy receives.
    pub namespaces: Vec<String>,
    /// Serve only namespaces whose labels hold every one of these pairs (see
    /// [`parse_selector`]); empty means all. Reported like `namespaces`.
    pub selector: BTreeMap<String, String>,
    /// The proxy listener's wire limits, timeouts and drain.
    pub limits: Limits,
    /// Whether the proxy keeps Prometheus metrics, served by the admin
    /// listener's `/metrics`. Off, the request path records nothing and
    /// `/metrics` answers `404`.
    pub metrics: bool,
    /// Where access log lines go: a file, appended to, or stdout for
    /// [`ACCESS_LOG_STDOUT`] (`-`). Lines are written only for namespaces
    /// whose policy switches access logs on; `None` writes none at all.
    pub access_log: Option<PathBuf>,
    /// TLS to an `https://` control plane: its CA and this proxy's
    /// certificate; `None` for the web PKI roots and no certificate.
    pub control_plane_tls: Option<ControlPlaneTls>,
}

/// What the proxy listener accepts from clients, how long it waits for them
/// and how long it drains on shutdown. [`Limits::default`] holds the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long a client may take to send a request's headers (HTTP/1), from
    /// their first byte, or from the accept for a connection's first request
    /// (and for the first bytes of any connection, TLS handshake included).
    pub header_read_timeout: Duration,
    /// How long a connection with no request in flight is kept open (HTTP/1
    /// and HTTP/2).
    pub idle_timeout: Duration,
    /// The largest request header block: HTTP/1 request line and headers
    /// (`431` and a closed connection beyond it), HTTP/2 header list size
    /// (`431` for that stream). At least [`MIN_MAX_REQUEST_HEADER_BYTES`].
    pub max_request_header_bytes: u32,
    /// The most headers an HTTP/1 request may have (`431` beyond it).
    pub max_request_headers: u32,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`: a stream beyond it is refused.
    pub max_concurrent_streams: u32,
    /// Requests in flight across the whole proxy; beyond it a request is
    /// answered `503` (gRPC `UNAVAILABLE`) at once instead of queueing.
    pub max_concurrent_requests: u32,
    /// On shutdown, how long in-flight requests may take to finish before
    /// their connections are closed.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_request_header_bytes: DEFAULT_MAX_REQUEST_HEADER_BYTES,
            max_request_headers: DEFAULT_MAX_REQUEST_HEADERS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// Listeners bound by the caller, so tests can bind `127.0.0.1:0`.
#[derive(Debug)]
pub struct Listeners {
    /// Client traffic: HTTP/1.1 and h2c.
    pub proxy: TcpListener,
    /// Client traffic over TLS (HTTP/1.1 and HTTP/2 by ALPN), with each
    /// namespace's certificate chosen by SNI; none when `None`.
    pub tls: Option<TcpListener>,
    /// The proxy admin: `/ready`, `/healthz`, `/config_dump`, `/status`,
    /// `/metrics`.
    pub admin: TcpListener,
}

/// Runs the proxy until `shutdown` resolves, then stops the discovery stream
/// and the listeners (letting open requests finish, bounded), saves the last
/// accepted snapshot and returns.
///
/// With a `data_dir` holding a valid last-known-good snapshot, the proxy
/// serves it at once, before the control plane answers, and resumes the
/// discovery stream from it.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let control_plane =
        discovery::ControlPlane::new(&config).map_err(|source| Error::InvalidControlPlane {
            address: config.control_plane.clone(),
            source,
        })?;
    subset::check(&config.namespaces, &config.selector)?;
    // Made at start, not by the first save: data bindings keep their
    // SQLite files here from the first apply on.
    if let Some(dir) = &config.data_dir {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| Error::DataDir {
                path: dir.clone(),
                source,
            })?;
    }
    let config = Arc::new(config);
    let own = match listeners.proxy.local_addr() {
        Ok(addr) => OwnAddresses::new(addr, &config.advertise_address).with_zone(&config.zone),
        Err(_) => OwnAddresses::default().with_zone(&config.zone),
    };
    let last_good = config.data_dir.as_ref().map(|dir| {
        Arc::new(last_good::LastGood::new(
            dir,
            subset::describe(&config.namespaces, &config.selector),
        ))
    });
    let metrics = config.metrics.then(|| Arc::new(Metrics::new()));
    let access_log = match &config.access_log {
        Some(destination) => {
            let dropped = metrics
                .as_ref()
                .map_or_else(Default::default, |m| m.access_log_dropped());
            Some(access_log::AccessLog::open(destination, dropped)?)
        }
        None => None,
    };
    let unconfigured = Runtime::unconfigured()
        .with_metrics(metrics.clone())
        .with_access_log(access_log);
    let (restored, runtime) = match &last_good {
        Some(file) => {
            restore(
                Arc::clone(file),
                &own,
                config.data_dir.as_deref(),
                unconfigured,
            )
            .await
        }
        None => (None, unconfigured),
    };
    if let (Some(metrics), Some(restored)) = (&metrics, &restored) {
        metrics.restored(restored.revision);
    }
    let listener_metrics = |listener| {
        metrics
            .as_ref()
            .map_or_else(ListenerMetrics::default, |m| m.listener(listener))
    };
    let runtime = Arc::new(ArcSwap::from_pointee(runtime));
    let (status_tx, status_rx) = watch::channel(discovery::Status {
        accepted: restored.clone(),
        ..discovery::Status::default()
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (last_good_tx, last_good_rx) = watch::channel(None);

    info!(
        node_id = %config.node_id,
        control_plane = %config.control_plane,
        proxy = ?listeners.proxy.local_addr().ok(),
        tls = ?listeners.tls.as_ref().and_then(|l| l.local_addr().ok()),
        admin = ?listeners.admin.local_addr().ok(),
        restored_revision = ?restored.as_ref().map(|s| s.revision),
        namespaces = %subset::namespaces_metadata(&config.namespaces),
        selector = %subset::selector_metadata(&config.selector),
        "Starting the proxy."
    );
    let writer = last_good.map(|file| {
        tokio::spawn(last_good::write_loop(
            file,
            last_good_rx,
            last_good::SAVE_EVERY,
        ))
    });
    let server = http::server::Params {
        limits: config.limits,
    };
    let proxy = tokio::spawn(http::serve(
        listeners.proxy,
        Arc::clone(&runtime),
        server,
        stop_rx.clone(),
        listener_metrics(Listener::Http),
    ));
    let tls = listeners.tls.map(|listener| {
        tokio::spawn(http::serve_tls(
            listener,
            Arc::clone(&runtime),
            server,
            stop_rx.clone(),
            listener_metrics(Listener::Https),
        ))
    });
    let admin = tokio::spawn(admin::serve(
        listeners.admin,
        server,
        Arc::from(config.node_id.as_str()),
        status_rx,
        metrics,
        stop_rx,
    ));
    let discovery = tokio::spawn(
        discovery::Subscriber {
            config: Arc::clone(&config),
            control_plane,
            runtime: Arc::clone(&runtime),
            status: status_tx,
            own,
            last_good: last_good_tx,
        }
        .run(restored),
    );

    shutdown.await;
    info!("Shutting down the proxy.");
    discovery.abort();
    // Every receiver may already be gone if a server task ended; that is fine.
    let _ = stop_tx.send(true);
    let (proxy, admin) = tokio::join!(proxy, admin);
    proxy?;
    admin?;
    if let Some(tls) = tls {
        tls.await?;
    }
    if let Err(error) = discovery.await
        && !error.is_cancelled()
    {
        return Err(error.into());
    }
    // The discovery task is gone and with it the writer's sender: the writer
    // saves the newest accepted snapshot, if it had not yet, and ends.
    if let Some(writer) = writer {
        match tokio::time::timeout(FLUSH_TIMEOUT, writer).await {
            Ok(result) => result?,
            Err(_) => warn!("The last-known-good snapshot was not saved before shutdown."),
        }
    }
    Ok(())
}

/// The snapshot on disk and its runtime compiled from `unconfigured`, or
/// nothing (and `unconfigured` itself) when there is no usable snapshot.
///
/// When a data binding of the snapshot cannot be opened (its database is
/// down too), the routes are served all the same, without the data
/// bindings, and the snapshot is not resumed from: the control plane sends
/// the whole policy again, and that apply opens the bindings (or NACKs).
async fn restore(
    file: Arc<last_good::LastGood>,
    own: &OwnAddresses,
    data_dir: Option<&std::path::Path>,
    unconfigured: Runtime,
) -> (Option<Snapshot>, Runtime) {
    let path = file.path();
    let Some(snapshot) = last_good::restore(file).await else {
        return (None, unconfigured);
    };
    let data = data::bindings_for(&snapshot, &unconfigured, data_dir).await;
    match Runtime::compile(&snapshot, &unconfigured, own) {
        Ok(runtime) => match data {
            Ok(data) => (Some(snapshot), runtime.with_data(data)),
            Err(error) => {
                warn!(%error, revision = snapshot.revision, "Serving the last-known-good snapshot without its data bindings.");
                (None, runtime)
            }
        },
        Err(error) => {
            warn!(
                %error,
                revision = snapshot.revision,
                path = %path.display(),
                "Ignoring the last-known-good snapshot; starting empty."
            );
            (None, unconfigured)
        }
    }
}
