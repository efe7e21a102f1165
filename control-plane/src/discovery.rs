//! The xDS v3 discovery server: `AggregatedDiscoveryService` over tonic, the only
//! module of the control plane that knows tonic.
//!
//! Both variants are served: `DeltaAggregatedResources` (incremental, in
//! `delta`) and `StreamAggregatedResources` (state of the world, in `sotw`),
//! for Prism's types and for standard Envoy Listener, RouteConfiguration,
//! Cluster and ClusterLoadAssignment (the same policy, translated in
//! `crate::envoy`). Resources come from a shared [`catalog::Catalog`], built
//! once per change and debounced; each stream keeps its own per-type state.
//!
//! Prism proxies use `DeltaAggregatedResources` and receive Prism resources as
//! `Any` (`type.googleapis.com/prism.config.v1.<Kind>`). Every push is one
//! *batch*: one response per subscribed kind, all stamped with the same
//! revision in `system_version_info`, kinds in `Kind::ALL` order. A kind with
//! nothing changed still gets an empty response, so the proxy knows when it
//! holds a complete revision and can swap it in atomically. A stream has at most
//! one batch in flight: the next is built, from the newest snapshot, only when
//! every response of the last one is ACKed or NACKed. That bounds each stream's
//! queue to one batch and makes a burst of writes one push to a slow proxy.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::value::Kind as ValueKind;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, debug, info, warn};

use crate::envoy::EnvoyParams;
use crate::fleet::{Fleet, NodeInfo};
use crate::store::Store;
use crate::tls::ProxyIdentity;

pub mod catalog;
mod delta;
mod load;
mod sotw;
mod subscription;

pub use catalog::Catalog;
pub(crate) use delta::DeltaState;
pub use load::LoadReporting;
pub(crate) use sotw::SotwState;
pub use subscription::NamespaceFilter;

/// Encoded descriptors of `envoy.service.discovery.v3.AggregatedDiscoveryService`
/// and its imports, for gRPC reflection. Generated once from the .proto files
/// that ship in the envoy-types crate (`proto/`), with protox:
/// `protox::compile(["envoy/service/discovery/v3/ads.proto"], includes)`,
/// source info stripped, encoded as a `FileDescriptorSet`.
pub const ADS_DESCRIPTOR_SET: &[u8] = include_bytes!("discovery/ads_descriptor.bin");

/// Responses a stream may hold unsent. A stream has at most one Prism batch
/// and one response per Envoy type outstanding, so this is never the limit
/// for a healthy client; a stuck one blocks only its own task.
const STREAM_QUEUE: usize = 16;

/// The ADS service, ready to be added to a tonic server.
#[derive(Clone, Debug)]
pub struct Discovery {
    fleet: Fleet,
    catalogs: watch::Receiver<Arc<Catalog>>,
    shutdown: watch::Receiver<bool>,
}

impl Discovery {
    /// A discovery service over `store`, recording proxies in `fleet`, serving
    /// Envoy resources per `params`. Starts the catalog builder; streams and
    /// builder end when `shutdown` turns true.
    pub fn start(
        store: Store,
        fleet: Fleet,
        params: EnvoyParams,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let catalogs = catalog::spawn_builder(store, fleet.clone(), params, shutdown.clone());
        Self {
            fleet,
            catalogs,
            shutdown,
        }
    }

    /// The tonic service for this server.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    fn spawn<P: Protocol>(
        &self,
        state: P,
        inbound: Streaming<P::Request>,
    ) -> ReceiverStream<Result<P::Response, Status>> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let stream = StreamTask {
            state,
            catalogs: self.catalogs.clone(),
            shutdown: self.shutdown.clone(),
            tx,
        };
        tokio::spawn(stream.run(inbound));
        ReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Discovery {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let identity = identity(&request);
        Ok(Response::new(self.spawn(
            SotwState::new(self.fleet.clone(), identity),
            request.into_inner(),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let identity = identity(&request);
        Ok(Response::new(self.spawn(
            DeltaState::new(self.fleet.clone(), identity),
            request.into_inner(),
        )))
    }
}

/// The identity the client's certificate proved, when the discovery server
/// checks certificates.
fn identity<T>(request: &Request<T>) -> Option<Arc<ProxyIdentity>> {
    request
        .extensions()
        .get::<Option<Arc<ProxyIdentity>>>()
        .cloned()
        .flatten()
}

/// One variant's per-stream state machine.
trait Protocol: Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: Send + 'static;
    fn on_request(
        &mut self,
        request: Self::Request,
        catalog: &Arc<Catalog>,
    ) -> Result<Vec<Self::Response>, Status>;
    fn on_catalog(&mut self, catalog: &Arc<Catalog>) -> Vec<Self::Response>;
    fn peer(&self) -> &Peer;
    fn type_url(response: &Self::Response) -> &str;
}

impl Protocol for DeltaState {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    fn on_request(
        &mut self,
        request: Self::Request,
        catalog: &Arc<Catalog>,
    ) -> Result<Vec<Self::Response>, Status> {
        DeltaState::on_request(self, request, catalog)
    }
    fn on_catalog(&mut self, catalog: &Arc<Catalog>) -> Vec<Self::Response> {
        DeltaState::on_catalog(self, catalog)
    }
    fn peer(&self) -> &Peer {
        &self.peer
    }
    fn type_url(response: &Self::Response) -> &str {
        &response.type_url
    }
}

impl Protocol for SotwState {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    fn on_request(
        &mut self,
        request: Self::Request,
        catalog: &Arc<Catalog>,
    ) -> Result<Vec<Self::Response>, Status> {
        SotwState::on_request(self, request, catalog)
    }
    fn on_catalog(&mut self, catalog: &Arc<Catalog>) -> Vec<Self::Response> {
        SotwState::on_catalog(self, catalog)
    }
    fn peer(&self) -> &Peer {
        &self.peer
    }
    fn type_url(response: &Self::Response) -> &str {
        &response.type_url
    }
}

/// The task behind one stream.
struct StreamTask<P: Protocol> {
    state: P,
    catalogs: watch::Receiver<Arc<Catalog>>,
    shutdown: watch::Receiver<bool>,
    tx: mpsc::Sender<Result<P::Response, Status>>,
}

impl<P: Protocol> StreamTask<P> {
    async fn run(mut self, mut inbound: Streaming<P::Request>) {
        loop {
            let catalog = self.catalogs.borrow_and_update().clone();
            let mut revision = catalog.revision();
            let out = tokio::select! {
                request = inbound.next() => match request {
                    Some(Ok(request)) => self.state.on_request(request, &catalog),
                    Some(Err(status)) => {
                        debug!(%status, node = %self.state.peer().node_id(), "Stream ended by the client.");
                        break;
                    }
                    None => break,
                },
                changed = self.catalogs.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let catalog = self.catalogs.borrow_and_update().clone();
                    revision = catalog.revision();
                    Ok(self.state.on_catalog(&catalog))
                }
                _ = self.shutdown.changed() => break,
            };
            let responses = match out {
                Ok(responses) => responses,
                Err(status) => {
                    warn!(%status, node = %self.state.peer().node_id(), "Closing a discovery stream.");
                    // A client too slow to take the status loses only the reason.
                    let _ = self.tx.try_send(Err(status));
                    break;
                }
            };
            if responses.is_empty() {
                continue;
            }
            let peer = self.state.peer();
            peer.pushed(revision);
            // A trace's span per push (see `admin::trace`): what went to whom.
            let span = tracing::info_span!(
                target: "prism_trace",
                "xds push",
                otel.kind = "producer",
                prism.node = peer.node_id(),
                prism.variant = peer.variant,
                prism.revision = revision,
                prism.responses = responses.len(),
                prism.types = ?responses.iter().map(P::type_url).collect::<Vec<_>>(),
            );
            if !self.send(responses).instrument(span).await {
                break;
            }
        }
        self.state.peer().closed();
    }

    /// Queues `responses`; false when the stream is over (client gone or
    /// shutdown). Waiting for room blocks only this stream, the queue being
    /// per stream, and gives way to shutdown.
    async fn send(&mut self, responses: Vec<P::Response>) -> bool {
        for response in responses {
            let peer = self.state.peer();
            peer.fleet
                .metrics()
                .pushed(peer.variant, P::type_url(&response));
            tokio::select! {
                sent = self.tx.send(Ok(response)) => if sent.is_err() { return false },
                _ = self.shutdown.changed() => return false,
            }
        }
        true
    }
}

/// Who is on the other end of a stream.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) fleet: Fleet,
    /// `sotw` or `delta`.
    variant: &'static str,
    node: Option<NodeInfo>,
    pub(crate) filter: NamespaceFilter,
    /// The oldest revision pushed that the client does not hold in full
    /// yet, and when it was pushed.
    pending: Cell<Option<(u64, Instant)>>,
    /// What its certificate proved, when the server checks certificates.
    identity: Option<Arc<ProxyIdentity>>,
}

impl Peer {
    fn new(fleet: Fleet, variant: &'static str, identity: Option<Arc<ProxyIdentity>>) -> Self {
        Self {
            fleet,
            variant,
            identity,
            node: None,
            filter: NamespaceFilter::default(),
            pending: Cell::new(None),
        }
    }

    /// Records that responses for `revision` were pushed.
    fn pushed(&self, revision: u64) {
        if self.pending.get().is_none() {
            self.pending.set(Some((revision, Instant::now())));
        }
    }

    /// Records that the client holds every type at `revision`: in the
    /// fleet, and as the push-to-ACK time of what was pushed up to it.
    pub(crate) fn batch_acked(&self, revision: u64) {
        self.fleet.batch_acked(self.node_id(), revision);
        if let Some((pushed, at)) = self.pending.get()
            && pushed <= revision
        {
            self.fleet.metrics().acked_after(at.elapsed());
            self.pending.set(None);
        }
    }

    pub(crate) fn node_id(&self) -> &str {
        self.node.as_ref().map_or("<unknown>", |n| n.id.as_str())
    }

    /// Registers the node on the first request (which must name it), and
    /// marks it seen on every later one.
    pub(crate) fn register(&mut self, node: Option<&Node>) -> Result<(), Status> {
        if self.node.is_some() {
            self.fleet.seen(self.node_id());
            return Ok(());
        }
        let node = node
            .filter(|n| !n.id.is_empty())
            .ok_or_else(|| Status::invalid_argument("the first request must carry node.id"))?;
        self.filter = NamespaceFilter::from_node(node)
            .map_err(Status::invalid_argument)?
            .restricted_to(self.identity.as_deref());
        let info = node_info(node);
        info!(node = %info.id, zone = %info.zone, "Proxy connected.");
        self.fleet.connected(info.clone());
        self.stream_gauge().inc();
        self.node = Some(info);
        Ok(())
    }

    fn closed(&self) {
        if let Some(node) = &self.node {
            info!(node = %node.id, "Proxy disconnected.");
            self.fleet.disconnected(&node.id);
            self.stream_gauge().dec();
        }
    }

    fn stream_gauge(&self) -> prometheus_client::metrics::gauge::Gauge {
        self.fleet
            .metrics()
            .streams
            .get_or_create_owned(&crate::metrics::StreamLabels {
                variant: self.variant,
            })
    }
}

/// What the fleet records of a node: its id, locality and advertised address
/// (node metadata field `advertise_address`).
fn node_info(node: &Node) -> NodeInfo {
    let locality = node.locality.clone().unwrap_or_default();
    let address = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("advertise_address"))
        .and_then(|v| match &v.kind {
            Some(ValueKind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default();
    NodeInfo {
        id: node.id.clone(),
        zone: locality.zone,
        region: locality.region,
        address,
    }
}

#[cfg(test)]
mod tests;
