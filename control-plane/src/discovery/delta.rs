//! The incremental variant (`DeltaAggregatedResources`) of one stream.
//!
//! Prism kinds travel in atomic batches (see the module doc of `discovery`);
//! Envoy types follow plain delta xDS: per-resource versions, optimistic
//! tracking of what the client holds, rejected versions not resent until they
//! change, upserts in make-before-break order and removals last.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use prism_proto::Kind;
use tonic::Status;
use tracing::{debug, warn};

use super::Peer;
use super::catalog::{Catalog, TypeKind};
use super::subscription::{Changes, Diff, Subscription};
use crate::fleet::Fleet;
use crate::tls::ProxyIdentity;

/// Envoy-type responses remembered for their ACK/NACK; older ones are stale.
const REMEMBERED_RESPONSES: usize = 64;

/// State of one delta stream.
#[derive(Debug)]
pub(crate) struct DeltaState {
    pub(crate) peer: Peer,
    subs: BTreeMap<TypeKind, Subscription>,
    /// Prism kind → policy revision of the last response sent.
    prism_sent: BTreeMap<Kind, u64>,
    /// Policy revision of the newest catalog this stream has seen.
    latest_revision: u64,
    /// Prism kinds whose subscription changed since their last response.
    resubscribed: BTreeSet<Kind>,
    pub(crate) batch: Option<Batch>,
    /// Nonce → what an Envoy-type response changed, oldest first.
    envoy_sent: VecDeque<(String, TypeKind, Changes, u64)>,
    nonces: u64,
}

/// A batch of Prism responses awaiting replies.
#[derive(Debug)]
pub(crate) struct Batch {
    catalog: Arc<Catalog>,
    pending: HashMap<String, (Kind, Changes)>,
    nacked: bool,
}

impl DeltaState {
    pub(crate) fn new(fleet: Fleet, identity: Option<Arc<ProxyIdentity>>) -> Self {
        Self {
            peer: Peer::new(fleet, "delta", identity),
            subs: BTreeMap::new(),
            prism_sent: BTreeMap::new(),
            resubscribed: BTreeSet::new(),
            latest_revision: 0,
            batch: None,
            envoy_sent: VecDeque::new(),
            nonces: 0,
        }
    }

    /// Handles one request: a subscription change, an ACK or a NACK (or
    /// several at once). Returns the responses to send, or a status that ends
    /// the stream.
    pub(crate) fn on_request(
        &mut self,
        request: DeltaDiscoveryRequest,
        catalog: &Arc<Catalog>,
    ) -> Result<Vec<DeltaDiscoveryResponse>, Status> {
        self.peer.register(request.node.as_ref())?;
        let kind =
            TypeKind::from_url(&request.type_url).ok_or_else(|| unknown_type(&request.type_url))?;

        let new_type = !self.subs.contains_key(&kind);
        let sub = self.subs.entry(kind).or_default();
        if new_type {
            // The first request of a type: an empty list is the legacy
            // wildcard, and a resumed stream says what the client holds.
            sub.wildcard = request.resource_names_subscribe.is_empty();
            sub.held = request.initial_resource_versions.into_iter().collect();
        }
        // Subscription changes count even on a request whose nonce is stale.
        sub.update(
            &request.resource_names_subscribe,
            &request.resource_names_unsubscribe,
        );
        let resubscribed = !new_type
            && (!request.resource_names_subscribe.is_empty()
                || !request.resource_names_unsubscribe.is_empty());
        if let (TypeKind::Prism(prism), true) = (kind, resubscribed) {
            self.resubscribed.insert(prism);
        }

        if !request.response_nonce.is_empty() {
            let error = request.error_detail.as_ref().map(|e| e.message.as_str());
            match kind {
                TypeKind::Prism(kind) => self.on_prism_reply(kind, &request.response_nonce, error),
                _ => self.on_envoy_reply(kind, &request.response_nonce, error),
            }
        }

        let mut out = Vec::new();
        if let (TypeKind::Prism(prism), true, Some(batch)) = (kind, new_type, &self.batch) {
            // A kind that joins while a batch is out joins that batch, at its
            // revision, so the proxy can complete it.
            let catalog = Arc::clone(&batch.catalog);
            out.push(self.prism_response(prism, &catalog));
            return Ok(out);
        }
        out.extend(self.on_catalog(catalog));
        Ok(out)
    }

    /// Everything to send because the catalog (or a subscription) moved.
    pub(crate) fn on_catalog(&mut self, catalog: &Arc<Catalog>) -> Vec<DeltaDiscoveryResponse> {
        self.latest_revision = catalog.revision();
        let mut out = self.push_prism(catalog);
        out.extend(self.push_envoy(catalog));
        self.mark_envoy_client_current();
        out
    }

    /// A client of Envoy types only (Envoy, proxyless gRPC) is at the newest
    /// revision once nothing sent to it awaits an answer: what the fleet
    /// reports as its ACKed revision and lag.
    fn mark_envoy_client_current(&self) {
        let prism = self.subs.keys().any(|k| matches!(k, TypeKind::Prism(_)));
        if !prism && !self.subs.is_empty() && self.envoy_sent.is_empty() {
            self.peer.batch_acked(self.latest_revision);
        }
    }

    fn on_prism_reply(&mut self, kind: Kind, nonce: &str, error: Option<&str>) {
        let node_id = self.peer.node_id().to_string();
        let Some((batch_kind, changes)) = self.batch.as_mut().and_then(|b| b.pending.remove(nonce))
        else {
            debug!(node = %node_id, nonce, "Ignoring a stale nonce.");
            return;
        };
        let Some(batch) = self.batch.as_mut() else {
            return;
        };
        let revision = batch.catalog.revision();
        match error {
            Some(message) => {
                warn!(node = %node_id, revision, kind = %kind, message, "Proxy rejected configuration.");
                self.peer
                    .fleet
                    .nacked(&node_id, batch_kind.type_url(), revision, message);
                batch.nacked = true;
            }
            None => {
                if let Some(sub) = self.subs.get_mut(&TypeKind::Prism(batch_kind)) {
                    sub.hold(&changes);
                }
                self.peer
                    .fleet
                    .acked(&node_id, batch_kind.type_url(), revision);
            }
        }
        if batch.pending.is_empty() {
            if !batch.nacked {
                debug!(node = %node_id, revision, "Proxy acknowledged revision.");
                self.peer.batch_acked(revision);
            }
            self.batch = None;
        }
    }

    fn on_envoy_reply(&mut self, kind: TypeKind, nonce: &str, error: Option<&str>) {
        let Some(at) = self.envoy_sent.iter().position(|(n, ..)| n == nonce) else {
            debug!(node = %self.peer.node_id(), nonce, "Ignoring a stale nonce.");
            return;
        };
        let Some((_, sent_kind, changes, revision)) = self.envoy_sent.remove(at) else {
            return;
        };
        let node_id = self.peer.node_id().to_string();
        match error {
            Some(message) => {
                warn!(node = %node_id, revision, type_url = kind.url(), message, "Client rejected resources.");
                self.peer
                    .fleet
                    .nacked(&node_id, sent_kind.url(), revision, message);
                if let Some(sub) = self.subs.get_mut(&sent_kind) {
                    for (name, version) in changes {
                        if let Some(version) = version {
                            sub.rejected.insert(name, version);
                        }
                    }
                }
            }
            None => self.peer.fleet.acked(&node_id, sent_kind.url(), revision),
        }
        self.mark_envoy_client_current();
    }

    /// Starts a batch when no batch is out and some Prism kind is behind the
    /// catalog's revision (every such kind gets a response, changed or not)
    /// or changed its subscription. A kind whose revision was rejected is not
    /// behind, so it gets nothing until the policy moves on.
    fn push_prism(&mut self, catalog: &Arc<Catalog>) -> Vec<DeltaDiscoveryResponse> {
        if self.batch.is_some() {
            return Vec::new();
        }
        let revision = catalog.revision();
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|kind| {
                if !self.subs.contains_key(&TypeKind::Prism(*kind)) {
                    return false;
                }
                let behind = self
                    .prism_sent
                    .get(kind)
                    .is_none_or(|sent| *sent < revision);
                behind || self.resubscribed.contains(kind)
            })
            .collect();
        if kinds.is_empty() {
            return Vec::new();
        }
        self.batch = Some(Batch {
            catalog: Arc::clone(catalog),
            pending: HashMap::new(),
            nacked: false,
        });
        self.resubscribed.clear();
        kinds
            .into_iter()
            .map(|kind| self.prism_response(kind, catalog))
            .collect()
    }

    /// The response that brings `kind` to `catalog`, registered in the batch.
    fn prism_response(&mut self, kind: Kind, catalog: &Catalog) -> DeltaDiscoveryResponse {
        let type_kind = TypeKind::Prism(kind);
        let diff = match self.subs.get(&type_kind) {
            Some(sub) => sub.diff(type_kind, catalog, &self.peer.filter),
            None => Diff::default(),
        };
        let nonce = self.nonce(catalog.revision());
        self.prism_sent.insert(kind, catalog.revision());
        if let Some(batch) = self.batch.as_mut() {
            batch.pending.insert(nonce.clone(), (kind, diff.changes()));
        }
        response(type_kind, catalog.revision(), nonce, diff)
    }

    /// Envoy types: upserts in make-before-break order, then removals.
    fn push_envoy(&mut self, catalog: &Arc<Catalog>) -> Vec<DeltaDiscoveryResponse> {
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for kind in TypeKind::ENVOY {
            let Some(sub) = self.subs.get(&kind) else {
                continue;
            };
            let diff = sub.diff(kind, catalog, &self.peer.filter);
            if !diff.upserts.is_empty() {
                upserts.push((
                    kind,
                    Diff {
                        upserts: diff.upserts,
                        removals: Vec::new(),
                    },
                ));
            }
            if !diff.removals.is_empty() {
                removals.push((
                    kind,
                    Diff {
                        upserts: Vec::new(),
                        removals: diff.removals,
                    },
                ));
            }
        }
        upserts
            .into_iter()
            .chain(removals)
            .map(|(kind, diff)| {
                let changes = diff.changes();
                if let Some(sub) = self.subs.get_mut(&kind) {
                    sub.hold(&changes);
                }
                let nonce = self.nonce(catalog.revision());
                if self.envoy_sent.len() >= REMEMBERED_RESPONSES {
                    self.envoy_sent.pop_front();
                }
                self.envoy_sent
                    .push_back((nonce.clone(), kind, changes, catalog.revision()));
                response(kind, catalog.revision(), nonce, diff)
            })
            .collect()
    }

    fn nonce(&mut self, revision: u64) -> String {
        self.nonces += 1;
        format!("{revision}-{}", self.nonces)
    }
}

fn response(kind: TypeKind, revision: u64, nonce: String, diff: Diff) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: revision.to_string(),
        type_url: kind.url().to_string(),
        resources: diff
            .upserts
            .into_iter()
            .map(|(name, entry)| Resource {
                name,
                version: entry.version.clone(),
                resource: Some(entry.any.clone()),
                ..Default::default()
            })
            .collect(),
        removed_resources: diff.removals,
        nonce,
        ..Default::default()
    }
}

pub(crate) fn unknown_type(type_url: &str) -> Status {
    Status::invalid_argument(format!(
        "unknown type_url `{type_url}`: this server serves {}",
        TypeKind::ALL.map(TypeKind::url).join(", ")
    ))
}
