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
use crate::metrics::{Listener, ListenerMetrics, Metrics};
use crate::runtime::{OwnAddresses, Probe, Runtime};

pub use crate::http::ratelimit::bench::Bucket;
pub use crate::runtime::bench::{Balancer, Breaker};

/// The whole proxy, every stage of its request path, serving one compiled
/// policy on a loopback listener from the caller's tokio runtime, with its
/// metrics on or off. Dropping it stops the server.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    metrics: Option<Arc<Metrics>>,
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
    /// wire limits, keeping metrics when `metrics` says so, as the proxy
    /// does by default; the compile or bind error's message if that fails.
    pub async fn start(snapshot: &Snapshot, metrics: bool) -> Result<Proxy, String> {
        let metrics = metrics.then(|| Arc::new(Metrics::new()));
        let unconfigured = Runtime::unconfigured().with_metrics(metrics.clone());
        let runtime = Runtime::compile(snapshot, &unconfigured, &OwnAddresses::default())
            .map_err(|e| e.to_string())?;
        let (listener, addr) = bind().await?;
        let (stop, stopped) = watch::channel(false);
        let listener_metrics = metrics
            .as_ref()
            .map_or_else(ListenerMetrics::default, |m| m.listener(Listener::Http));
        tokio::spawn(crate::http::serve(
            listener,
            Arc::new(ArcSwap::from_pointee(runtime)),
            params(),
            stopped,
            listener_metrics,
        ));
        Ok(Proxy {
            addr,
            metrics,
            _stop: stop,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its metrics as `/metrics` serves them; `None` with metrics off.
    pub fn scrape(&self) -> Option<String> {
        self.metrics.as_ref().map(|m| m.encode())
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

/// The proxy's configuration apply path, as the discovery client, the
/// last-good writer and the retirement of replaced state run it, timed stage
/// by stage: one complete batch of discovery responses is decoded and staged
/// (with validation), compiled against the live runtime, swapped in,
/// committed, saved to the last-good file, and what it replaced dropped.
/// Every apply is saved here; the proxy saves at most once per
/// `last_good::SAVE_EVERY`.
pub struct Apply {
    stager: crate::config::stager::Stager,
    runtime: Arc<ArcSwap<Runtime>>,
    file: crate::config::last_good::LastGood,
    own: OwnAddresses,
}

/// One batch of discovery responses (one per kind), encoded ahead of
/// [`Apply::apply`] so that encoding it is not timed.
pub struct Batch(Vec<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse>);

/// Where one apply spent its time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stages {
    /// Decoding and staging the responses, validating the candidate.
    pub stage: std::time::Duration,
    /// Compiling the candidate into a runtime.
    pub compile: std::time::Duration,
    /// Storing the runtime, committing the snapshot, and the copies the
    /// admin status and the last-good writer get.
    pub swap: std::time::Duration,
    /// Encoding the last-good snapshot (on the configuration thread).
    pub encode: std::time::Duration,
    /// Writing and syncing it (on a blocking thread, waiting on the disk).
    pub write: std::time::Duration,
    /// Dropping what the apply replaced.
    pub retire: std::time::Duration,
}

impl Batch {
    /// Upserts `resources` (of any kinds) at `revision`, removing nothing.
    pub fn new(revision: u64, resources: &[prism_proto::Resource]) -> Batch {
        use envoy_types::pb::envoy::service::discovery::v3::{
            DeltaDiscoveryResponse, Resource as WireResource,
        };
        use envoy_types::pb::google::protobuf::Any;
        let responses = prism_proto::Kind::ALL
            .into_iter()
            .map(|kind| DeltaDiscoveryResponse {
                system_version_info: revision.to_string(),
                type_url: kind.type_url().to_string(),
                nonce: format!("{revision}-{kind}"),
                resources: resources
                    .iter()
                    .filter(|r| r.kind() == kind)
                    .map(|r| {
                        let versioned = r.clone().versioned();
                        WireResource {
                            name: r.name().to_string(),
                            version: versioned.version,
                            resource: Some(Any {
                                type_url: kind.type_url().to_string(),
                                value: r.encode_to_vec(),
                            }),
                            ..Default::default()
                        }
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        Batch(responses)
    }
}

impl Apply {
    /// An unconfigured proxy whose last-good file is in `dir`.
    pub fn new(dir: &std::path::Path) -> Apply {
        Apply {
            stager: crate::config::stager::Stager::default(),
            runtime: Arc::new(ArcSwap::from_pointee(Runtime::unconfigured())),
            file: crate::config::last_good::LastGood::new(dir, String::new()),
            own: OwnAddresses::default(),
        }
    }

    /// Applies `batch` as the proxy would; where the time went, or the
    /// NACK's message.
    pub fn apply(&mut self, batch: Batch) -> Result<Stages, String> {
        use std::time::Instant;

        use crate::config::stager::Offer;
        let mut stages = Stages::default();
        let start = Instant::now();
        let mut ready = None;
        for response in batch.0 {
            match self.stager.offer(response) {
                Offer::Waiting => {}
                Offer::Rejected { message, .. } => return Err(message),
                Offer::Ready { candidate, changed } => ready = Some((candidate, changed)),
            }
        }
        let (candidate, changed) = ready.ok_or("the batch is incomplete")?;
        stages.stage = start.elapsed();

        let start = Instant::now();
        let next = changed
            .then(|| Runtime::compile(&candidate, &self.runtime.load(), &self.own))
            .transpose()
            .map_err(|e| e.to_string())?;
        stages.compile = start.elapsed();

        let start = Instant::now();
        let retired = next.map(|next| self.runtime.swap(Arc::new(next)));
        let accepted = self.stager.commit().ok_or("nothing to commit")?;
        let (status, last_good) = (accepted.clone(), accepted.clone());
        stages.swap = start.elapsed();

        let start = Instant::now();
        let bytes = self.file.encode(&last_good);
        stages.encode = start.elapsed();
        let start = Instant::now();
        self.file.write(&bytes).map_err(|e| e.to_string())?;
        stages.write = start.elapsed();

        let start = Instant::now();
        drop((retired, status, last_good, candidate));
        stages.retire = start.elapsed();
        Ok(stages)
    }
}
