//! The xDS v3 discovery server: `AggregatedDiscoveryService` over tonic, the only
//! module of the control plane that knows tonic.
//!
//! Prism proxies use `DeltaAggregatedResources` and receive Prism resources as
//! `Any` (`type.googleapis.com/prism.config.v1.<Kind>`). Every push is one
//! *batch*: one response per subscribed kind, all stamped with the same
//! revision in `system_version_info`, kinds in [`Kind::ALL`] order. A kind with
//! nothing changed still gets an empty response, so the proxy knows when it
//! holds a complete revision and can swap it in atomically. A stream has at most
//! one batch in flight: the next is built, from the newest snapshot, only when
//! every response of the last one is ACKed or NACKed. That bounds each stream's
//! queue to one batch and makes a burst of writes one push to a slow proxy.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{Any, value::Kind as ValueKind};
use futures::{Stream, StreamExt};
use prism_proto::{Kind, Snapshot};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::fleet::{Fleet, NodeInfo};
use crate::store::Store;

/// Responses a stream may hold unsent: more than one batch (one per kind).
const STREAM_QUEUE: usize = 16;

/// The ADS service, ready to be added to a tonic server.
#[derive(Clone, Debug)]
pub struct Discovery {
    store: Store,
    fleet: Fleet,
    shutdown: watch::Receiver<bool>,
}

impl Discovery {
    /// A discovery service over `store`, recording proxies in `fleet`. Streams
    /// end when `shutdown` turns true.
    pub fn new(store: Store, fleet: Fleet, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            store,
            fleet,
            shutdown,
        }
    }

    /// The tonic service for this server.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }
}

type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Discovery {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "state-of-the-world ADS is not served yet; use DeltaAggregatedResources",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let stream = DeltaStream {
            state: StreamState::new(self.fleet.clone()),
            snapshots: self.store.subscribe(),
            shutdown: self.shutdown.clone(),
            tx,
        };
        tokio::spawn(stream.run(inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The task behind one delta stream.
struct DeltaStream {
    state: StreamState,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: watch::Receiver<bool>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl DeltaStream {
    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) {
        loop {
            let snapshot = self.snapshots.borrow_and_update().clone();
            let out = tokio::select! {
                request = inbound.next() => match request {
                    Some(Ok(request)) => self.state.on_request(request, &snapshot),
                    Some(Err(status)) => {
                        debug!(%status, node = %self.state.node_id(), "Stream ended by the proxy.");
                        break;
                    }
                    None => break,
                },
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = self.snapshots.borrow_and_update().clone();
                    Ok(self.state.push(&snapshot))
                }
                _ = self.shutdown.changed() => break,
            };
            let responses = match out {
                Ok(responses) => responses,
                Err(status) => {
                    warn!(%status, node = %self.state.node_id(), "Closing a discovery stream.");
                    let _ = self.tx.send(Err(status)).await;
                    break;
                }
            };
            for response in responses {
                // Waiting here blocks only this stream: the queue is per stream.
                if self.tx.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        }
        self.state.closed();
    }
}

/// What one stream knows of its proxy: the kinds it subscribed to, the
/// versions it holds, and the batch awaiting its ACK.
#[derive(Debug)]
pub(crate) struct StreamState {
    fleet: Fleet,
    node: Option<NodeInfo>,
    kinds: BTreeMap<Kind, KindState>,
    inflight: Option<Batch>,
    nonces: u64,
}

#[derive(Debug, Default)]
struct KindState {
    /// Name → version of what the proxy holds (ACKed, or claimed on resume).
    held: BTreeMap<String, String>,
    /// Revision of the last response of this kind sent.
    sent_revision: Option<u64>,
}

/// Name → new version (`None`: removed) of the resources one response changes.
type Changes = Vec<(String, Option<String>)>;

#[derive(Debug)]
struct Batch {
    revision: u64,
    snapshot: Arc<Snapshot>,
    /// Nonce → what the response changes, applied to `held` on ACK.
    pending: HashMap<String, (Kind, Changes)>,
    nacked: bool,
}

impl StreamState {
    pub(crate) fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            node: None,
            kinds: BTreeMap::new(),
            inflight: None,
            nonces: 0,
        }
    }

    fn node_id(&self) -> &str {
        self.node.as_ref().map_or("<unknown>", |n| n.id.as_str())
    }

    /// Handles one request: a subscription, an ACK or a NACK. Returns the
    /// responses to send, or a status that ends the stream.
    pub(crate) fn on_request(
        &mut self,
        request: DeltaDiscoveryRequest,
        snapshot: &Arc<Snapshot>,
    ) -> Result<Vec<DeltaDiscoveryResponse>, Status> {
        if self.node.is_none() {
            let node = request
                .node
                .as_ref()
                .filter(|n| !n.id.is_empty())
                .ok_or_else(|| Status::invalid_argument("the first request must carry node.id"))?;
            let info = node_info(node);
            info!(node = %info.id, zone = %info.zone, "Proxy connected.");
            self.fleet.connected(info.clone());
            self.node = Some(info);
        } else {
            self.fleet.seen(self.node_id());
        }
        let kind = Kind::from_type_url(&request.type_url).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown type_url `{}`: this server serves {}",
                request.type_url,
                Kind::ALL.map(Kind::type_url).join(", ")
            ))
        })?;

        if !request.response_nonce.is_empty() {
            self.on_reply(kind, &request);
        } else if let std::collections::btree_map::Entry::Vacant(entry) = self.kinds.entry(kind) {
            let held = request.initial_resource_versions.into_iter().collect();
            entry.insert(KindState {
                held,
                sent_revision: None,
            });
            // A kind that joins while a batch is out joins that batch, at its
            // revision, so the proxy can complete it.
            if let Some(batch) = &self.inflight {
                let snapshot = Arc::clone(&batch.snapshot);
                let response = self.response(kind, &snapshot);
                return Ok(vec![response]);
            }
        }
        Ok(self.push(snapshot))
    }

    /// An ACK (no `error_detail`) or NACK of an earlier response.
    fn on_reply(&mut self, kind: Kind, request: &DeltaDiscoveryRequest) {
        let node_id = self.node_id().to_string();
        let Some(batch) = self.inflight.as_mut() else {
            debug!(node = %node_id, nonce = %request.response_nonce, "Ignoring a stale nonce.");
            return;
        };
        let Some((_, changes)) = batch.pending.remove(&request.response_nonce) else {
            debug!(node = %node_id, nonce = %request.response_nonce, "Ignoring a stale nonce.");
            return;
        };
        match &request.error_detail {
            Some(error) => {
                warn!(node = %node_id, revision = batch.revision, kind = %kind, message = %error.message, "Proxy rejected configuration.");
                self.fleet
                    .nacked(&node_id, kind.type_url(), batch.revision, &error.message);
                batch.nacked = true;
            }
            None => {
                if let Some(state) = self.kinds.get_mut(&kind) {
                    for (name, version) in changes {
                        match version {
                            Some(version) => state.held.insert(name, version),
                            None => state.held.remove(&name),
                        };
                    }
                }
                self.fleet.acked(&node_id, kind.type_url(), batch.revision);
            }
        }
        if batch.pending.is_empty() {
            if !batch.nacked {
                debug!(node = %node_id, revision = batch.revision, "Proxy acknowledged revision.");
                self.fleet.batch_acked(&node_id, batch.revision);
            }
            self.inflight = None;
        }
    }

    /// Starts a batch if none is out and some subscribed kind is behind
    /// `snapshot`. Every kind behind gets a response, changed or not.
    pub(crate) fn push(&mut self, snapshot: &Arc<Snapshot>) -> Vec<DeltaDiscoveryResponse> {
        if self.inflight.is_some() {
            return Vec::new();
        }
        let behind: Vec<Kind> = self
            .kinds
            .iter()
            .filter(|(_, state)| state.sent_revision.is_none_or(|r| r < snapshot.revision))
            .map(|(kind, _)| *kind)
            .collect();
        if behind.is_empty() {
            return Vec::new();
        }
        self.inflight = Some(Batch {
            revision: snapshot.revision,
            snapshot: Arc::clone(snapshot),
            pending: HashMap::new(),
            nacked: false,
        });
        behind
            .into_iter()
            .map(|kind| self.response(kind, snapshot))
            .collect()
    }

    /// The response that brings `kind` from what the proxy holds to `snapshot`,
    /// registered in the batch in flight.
    fn response(&mut self, kind: Kind, snapshot: &Snapshot) -> DeltaDiscoveryResponse {
        self.nonces += 1;
        let nonce = format!("{}-{}", snapshot.revision, self.nonces);
        let state = self.kinds.entry(kind).or_default();
        let mut resources = Vec::new();
        let mut changes = Vec::new();
        for entry in snapshot.of_kind(kind) {
            let name = entry.resource.name();
            if state.held.get(name) != Some(&entry.version) {
                resources.push(Resource {
                    name: name.to_string(),
                    version: entry.version.clone(),
                    resource: Some(Any {
                        type_url: kind.type_url().to_string(),
                        value: entry.resource.encode_to_vec(),
                    }),
                    ..Default::default()
                });
                changes.push((name.to_string(), Some(entry.version.clone())));
            }
        }
        let removed_resources: Vec<String> = state
            .held
            .keys()
            .filter(|name| !snapshot.contains(kind, name))
            .cloned()
            .collect();
        changes.extend(removed_resources.iter().map(|name| (name.clone(), None)));
        state.sent_revision = Some(snapshot.revision);
        if let Some(batch) = self.inflight.as_mut() {
            batch.pending.insert(nonce.clone(), (kind, changes));
        }
        DeltaDiscoveryResponse {
            system_version_info: snapshot.revision.to_string(),
            type_url: kind.type_url().to_string(),
            resources,
            removed_resources,
            nonce,
            ..Default::default()
        }
    }

    fn closed(&self) {
        if let Some(node) = &self.node {
            info!(node = %node.id, "Proxy disconnected.");
            self.fleet.disconnected(&node.id);
        }
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
