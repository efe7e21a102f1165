//! The discovery client: one ADS `DeltaAggregatedResources` stream to the
//! control plane, reconnecting with backoff. Responses go through the
//! [`Stager`]; a complete valid batch is compiled into a [`Runtime`] and stored
//! with one `ArcSwap::store`, then ACKed. Staging, compiling and storing run
//! on the configuration thread, at a lower priority ([`background`]), never
//! on the event loop that serves requests. This is the only module that knows tonic.

use std::mem;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prism_proto::{Kind, Snapshot};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::control_plane_tls::Connector;
use tracing::{debug, info, warn};

use crate::Config;
use crate::config::stager::{Offer, Reply, Stager};
use crate::config::{background, subset};
use crate::data;
use crate::http::error::Chain;
use crate::runtime::{CompileError, OwnAddresses, Runtime};

mod load;

/// `google.rpc.Code.INVALID_ARGUMENT`, the code of every NACK.
const INVALID_ARGUMENT: i32 = 3;
/// The node cluster every Prism proxy reports.
const NODE_CLUSTER: &str = "prism-proxy";

/// What the proxy admin shows about configuration.
#[derive(Clone, Debug, Default)]
pub(crate) struct Status {
    /// The accepted snapshot, `None` until the first one.
    pub accepted: Option<Snapshot>,
    pub last_nack: Option<Nack>,
    /// Changed revisions compiled and stored since the proxy started.
    pub applied: u64,
    /// How long the last of them took from its complete batch arriving to
    /// the runtime being stored (stage, validate, compile, swap).
    pub last_apply: Option<Duration>,
}

/// The most recent rejected batch.
#[derive(Clone, Debug)]
pub(crate) struct Nack {
    pub revision: Option<u64>,
    pub message: String,
}

/// Why one discovery stream ended. A transport error says only "transport
/// error" itself; the log line walks its sources (`Chain`) for the reason.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("cannot connect")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream failed: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("the request stream closed")]
    Closed,
}

/// Exponential backoff with jitter: 100 ms doubling up to 5 s, each delay
/// drawn uniformly from its upper half so a fleet does not reconnect in step.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Self { next: Self::BASE }
    }

    /// The delay before the next attempt.
    pub(crate) fn delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Starts over after a success.
    pub(crate) fn reset(&mut self) {
        self.next = Self::BASE;
    }
}

/// How to reach the control plane: its endpoint, and TLS for `https://`.
#[derive(Clone)]
pub(crate) struct ControlPlane {
    endpoint: Endpoint,
    tls: Option<Connector>,
}

impl ControlPlane {
    /// The control plane at `config.control_plane`: TLS when the URL is
    /// `https://` (with `config.control_plane_tls`, or the web PKI roots).
    pub(crate) fn new(config: &Config) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let endpoint = Endpoint::from_shared(config.control_plane.clone())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let https = endpoint.uri().scheme_str() == Some("https");
        let tls = match (https, &config.control_plane_tls) {
            (true, tls) => Some(Connector(tls.clone().unwrap_or_default().client_config()?)),
            (false, Some(_)) => {
                return Err("TLS settings for the control plane need an https:// URL".into());
            }
            (false, None) => None,
        };
        Ok(Self { endpoint, tls })
    }

    async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.tls {
            Some(connector) => {
                self.endpoint
                    .connect_with_connector(connector.clone())
                    .await
            }
            None => self.endpoint.connect().await,
        }
    }
}

/// Everything one discovery client works with, for the life of the proxy.
pub(crate) struct Subscriber {
    pub config: Arc<Config>,
    pub control_plane: ControlPlane,
    /// The live runtime, stored once per accepted change.
    pub runtime: Arc<ArcSwap<Runtime>>,
    /// What the admin endpoint shows.
    pub status: watch::Sender<Status>,
    /// This proxy's own addresses, refused as backend endpoints.
    pub own: OwnAddresses,
    /// Each accepted snapshot that changed, for the last-known-good writer.
    /// Sends succeed without a receiver, so a proxy without a data directory
    /// simply drops them.
    pub last_good: watch::Sender<Option<Snapshot>>,
}

impl Subscriber {
    /// Keeps a discovery stream open forever, reconnecting with backoff,
    /// resuming from `restored` (the snapshot already being served, if any).
    /// Stops only when the task is aborted.
    pub(crate) async fn run(self, restored: Option<Snapshot>) {
        let mut stager = Stager::with_accepted(restored);
        let mut backoff = Backoff::new();
        loop {
            match self.stream(&mut stager, &mut backoff).await {
                Ok(()) => info!("Control plane closed the discovery stream."),
                Err(error) => {
                    warn!(error = %Chain(&error), control_plane = %self.config.control_plane, "Discovery stream failed.")
                }
            }
            stager.reset();
            let delay = backoff.delay();
            debug!(?delay, "Reconnecting to the control plane.");
            tokio::time::sleep(delay).await;
        }
    }

    /// One stream: subscribe to every kind, then stage, apply and answer responses.
    async fn stream(&self, stager: &mut Stager, backoff: &mut Backoff) -> Result<(), StreamError> {
        let config = &self.config;
        let channel = self.control_plane.connect().await?;
        let _load = LoadReports::start(channel.clone(), node(config), &self.runtime);
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (requests, outgoing) = mpsc::channel(16);
        for kind in Kind::ALL {
            requests
                .send(subscribe(config, kind, stager))
                .await
                .map_err(|_| StreamError::Closed)?;
        }
        let mut responses = client
            .delta_aggregated_resources(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        info!(control_plane = %config.control_plane, "Subscribed to the control plane.");

        while let Some(response) = responses.message().await? {
            let arrived = Instant::now();
            debug!(
                type_url = %response.type_url,
                revision = %response.system_version_info,
                nonce = %response.nonce,
                "Discovery response."
            );
            // Staging, validating and compiling take milliseconds (tens for
            // a fresh large policy): they run on the configuration thread,
            // at a lower priority, while this event loop goes on serving
            // requests.
            let work = Work {
                stager: mem::take(stager),
                runtime: Arc::clone(&self.runtime),
                own: self.own.clone(),
                data_dir: self.config.data_dir.clone(),
            };
            let (back, outcome) = match background::run(move || work.run(response)).await {
                Ok(done) => done,
                Err(error) => {
                    // The stager went with the work: start afresh, as after
                    // any broken stream.
                    warn!(error = %Chain(&error), "Configuration work failed.");
                    return Err(StreamError::Closed);
                }
            };
            *stager = back;
            self.settle(outcome, backoff, arrived);
            for reply in stager.take_replies() {
                requests
                    .send(answer(reply))
                    .await
                    .map_err(|_| StreamError::Closed)?;
            }
        }
        Ok(())
    }

    /// Publishes what the configuration work decided: the accepted snapshot to
    /// the admin status and the last-good writer, or the NACK; and counts it
    /// in the metrics the runtime carries. Whatever a publication replaces
    /// is retired, never dropped here.
    fn settle(&self, outcome: Outcome, backoff: &mut Backoff, arrived: Instant) {
        let metrics = self.runtime.load().metrics().cloned();
        match outcome {
            Outcome::Waiting => {}
            Outcome::Applied {
                revision,
                changed,
                accepted,
                retired,
            } => {
                let took = arrived.elapsed();
                let (mut replaced, mut previous) = (None, None);
                if let Some(Accepted { status, last_good }) = accepted {
                    if let Some(last_good) = last_good {
                        replaced = self.last_good.send_replace(Some(last_good));
                    }
                    self.status.send_modify(|s| {
                        previous = s.accepted.replace(status);
                        if changed {
                            s.applied += 1;
                            s.last_apply = Some(took);
                        }
                    });
                }
                if retired.is_some() || replaced.is_some() || previous.is_some() {
                    background::retire((retired, replaced, previous));
                }
                backoff.reset();
                if let Some(metrics) = &metrics {
                    metrics.acked(revision);
                }
                info!(revision, changed, ?took, "Applied configuration.");
            }
            Outcome::Rejected { revision, message } => {
                warn!(error = %message, ?revision, "Rejected configuration.");
                if let Some(metrics) = &metrics {
                    metrics.nacked();
                }
                record_nack(&self.status, revision, message);
            }
        }
    }
}

/// The load reports of one discovery stream: they share its connection and
/// end with it (the task is aborted when this is dropped).
struct LoadReports(tokio::task::JoinHandle<()>);

impl LoadReports {
    fn start(channel: Channel, node: Node, runtime: &Arc<ArcSwap<Runtime>>) -> Self {
        let runtime = Arc::clone(runtime);
        Self(tokio::spawn(async move {
            // A control plane without load reporting (or one that ends the
            // stream) costs only the reports: discovery goes on.
            match load::report(channel, node, runtime).await {
                Ok(()) => debug!("Control plane ended the load report stream."),
                Err(status) => {
                    info!(error = %status, "Load reports stopped; discovery goes on.")
                }
            }
        }))
    }
}

impl Drop for LoadReports {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One response's work, moved to the configuration thread and back.
struct Work {
    stager: Stager,
    runtime: Arc<ArcSwap<Runtime>>,
    own: OwnAddresses,
    /// Where relative SQLite paths of data bindings are taken from.
    data_dir: Option<PathBuf>,
}

/// What staging one response led to.
enum Outcome {
    Waiting,
    /// A complete batch was accepted; when `changed`, its runtime is stored.
    Applied {
        revision: u64,
        changed: bool,
        /// Copies of the accepted snapshot to publish, `None` if the stager
        /// had nothing ready.
        accepted: Option<Accepted>,
        /// The runtime the store replaced, to drop later off the event loop.
        retired: Option<Arc<Runtime>>,
    },
    Rejected {
        revision: Option<u64>,
        message: String,
    },
}

/// The accepted snapshot, copied on the configuration thread: one for the admin
/// status and, when it changed, one for the last-good writer.
struct Accepted {
    status: Snapshot,
    last_good: Option<Snapshot>,
}

impl Work {
    /// Stages `response`; a complete batch is compiled and stored (one
    /// `ArcSwap` store, so no request sees half of it) or rejected.
    fn run(mut self, response: DeltaDiscoveryResponse) -> (Stager, Outcome) {
        let outcome = match self.stager.offer(response) {
            Offer::Waiting => Outcome::Waiting,
            Offer::Rejected { revision, message } => Outcome::Rejected { revision, message },
            Offer::Ready { candidate, changed } => self.apply(&candidate, changed),
        };
        (self.stager, outcome)
    }

    fn apply(&mut self, candidate: &Snapshot, changed: bool) -> Outcome {
        let revision = candidate.revision;
        let compiled = if changed {
            self.compile(candidate).map(Some)
        } else {
            Ok(None)
        };
        match compiled {
            Ok(next) => {
                let retired = next.map(|next| self.runtime.swap(Arc::new(next)));
                if let Some(old) = &retired {
                    old.data().retire(self.runtime.load().data());
                }
                let accepted = self.stager.commit().map(|accepted| Accepted {
                    status: accepted.clone(),
                    last_good: changed.then(|| accepted.clone()),
                });
                Outcome::Applied {
                    revision,
                    changed,
                    accepted,
                    retired,
                }
            }
            Err(error) => {
                let message = error.to_string();
                self.stager.reject(&message);
                Outcome::Rejected {
                    revision: Some(revision),
                    message,
                }
            }
        }
    }
}

impl Work {
    /// The runtime of `candidate`: its data bindings opened, then the rest
    /// compiled.
    ///
    /// This thread waits for the stores to open while the event loops go on
    /// serving and drive their IO. A plain executor, not tokio's
    /// `Handle::block_on`: this work may also run on an event loop (tests),
    /// where the wait is for bindings that need no opening and ends at once.
    fn compile(&self, candidate: &Snapshot) -> Result<Runtime, CompileError> {
        let previous = self.runtime.load();
        let data = futures::executor::block_on(data::bindings_for(
            candidate,
            &previous,
            self.data_dir.as_deref(),
        ))
        .map_err(CompileError::Binding)?;
        match Runtime::compile(candidate, &previous, &self.own) {
            Ok(runtime) => Ok(runtime.with_data(data)),
            Err(error) => {
                // The bindings before serve on, writes and all (unless they
                // are these very ones, whose moves are long done).
                if !Arc::ptr_eq(&data, previous.data()) {
                    data.abandon();
                }
                Err(error)
            }
        }
    }
}

fn record_nack(status: &watch::Sender<Status>, revision: Option<u64>, message: String) {
    status.send_modify(|s| s.last_nack = Some(Nack { revision, message }));
}

/// The subscription for one kind: wildcard, resuming from what was accepted.
fn subscribe(config: &Config, kind: Kind, stager: &Stager) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node(config)),
        type_url: kind.type_url().to_string(),
        initial_resource_versions: stager.initial_versions(kind),
        ..Default::default()
    }
}

/// An ACK or NACK.
fn answer(reply: Reply) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: reply.type_url,
        response_nonce: reply.nonce,
        error_detail: reply.error.map(|message| RpcStatus {
            code: INVALID_ARGUMENT,
            message,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(config: &Config) -> Node {
    let mut metadata = Struct::default();
    let strings = [
        ("advertise_address", config.advertise_address.clone()),
        (
            subset::NAMESPACES_KEY,
            subset::namespaces_metadata(&config.namespaces),
        ),
        (
            subset::SELECTOR_KEY,
            subset::selector_metadata(&config.selector),
        ),
    ];
    for (key, text) in strings {
        if !text.is_empty() {
            metadata.fields.insert(
                key.to_string(),
                Value {
                    kind: Some(value::Kind::StringValue(text)),
                },
            );
        }
    }
    Node {
        id: config.node_id.clone(),
        cluster: NODE_CLUSTER.to_string(),
        locality: Some(Locality {
            region: config.region.clone(),
            zone: config.zone.clone(),
            ..Default::default()
        }),
        metadata: Some(metadata),
        user_agent_name: "prism-proxy".to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
