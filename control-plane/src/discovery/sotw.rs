//! The state-of-the-world variant (`StreamAggregatedResources`) of one stream.
//!
//! Per type: the latest nonce (replies to older ones are stale and ignored),
//! the full set of names asked for (remembered before the resources exist),
//! wildcard for Listener, Cluster and Prism kinds when no name is given or `*`
//! is, and `version_info` = a hash of the content sent, so a response goes out
//! only when content changes and a rejected content is not sent again. Listener
//! and Cluster responses carry every resource; a removal is first sent with the
//! removed resources still present (make before break) and completed after the
//! other types.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prism_proto::version_of;
use tonic::Status;
use tracing::{debug, warn};

use super::Peer;
use super::catalog::{Catalog, Entry, TypeKind};
use super::delta::unknown_type;
use super::subscription::Subscription;
use crate::fleet::Fleet;
use crate::tls::ProxyIdentity;

/// State of one state-of-the-world stream.
#[derive(Debug)]
pub(crate) struct SotwState {
    pub(crate) peer: Peer,
    types: BTreeMap<TypeKind, SotwType>,
    nonces: u64,
}

#[derive(Debug, Default)]
struct SotwType {
    sub: Subscription,
    /// Nonce of the latest response; replies to any other are stale.
    nonce: Option<String>,
    /// What the latest response carried.
    sent: BTreeMap<String, Arc<Entry>>,
    sent_version: Option<String>,
    /// Content version the client rejected.
    rejected_version: Option<String>,
    sent_revision: u64,
    /// The latest response is ACKed or NACKed.
    answered: bool,
}

impl SotwState {
    pub(crate) fn new(fleet: Fleet, identity: Option<Arc<ProxyIdentity>>) -> Self {
        Self {
            peer: Peer::new(fleet, "sotw", identity),
            types: BTreeMap::new(),
            nonces: 0,
        }
    }

    pub(crate) fn on_request(
        &mut self,
        request: DiscoveryRequest,
        catalog: &Arc<Catalog>,
    ) -> Result<Vec<DiscoveryResponse>, Status> {
        self.peer.register(request.node.as_ref())?;
        let kind =
            TypeKind::from_url(&request.type_url).ok_or_else(|| unknown_type(&request.type_url))?;
        let node_id = self.peer.node_id().to_string();
        let state = self.types.entry(kind).or_default();
        if !request.response_nonce.is_empty() {
            if state.nonce.as_deref() != Some(request.response_nonce.as_str()) {
                debug!(node = %node_id, nonce = %request.response_nonce, "Ignoring a stale nonce.");
                return Ok(Vec::new());
            }
            match &request.error_detail {
                Some(error) => {
                    warn!(node = %node_id, type_url = kind.url(), message = %error.message, "Client rejected resources.");
                    self.peer.fleet.nacked(
                        &node_id,
                        kind.url(),
                        state.sent_revision,
                        &error.message,
                    );
                    state.rejected_version = state.sent_version.clone();
                }
                None => self
                    .peer
                    .fleet
                    .acked(&node_id, kind.url(), state.sent_revision),
            }
            state.answered = true;
        }
        let names: BTreeSet<String> = request
            .resource_names
            .iter()
            .filter(|n| *n != "*")
            .cloned()
            .collect();
        state.sub.wildcard = request.resource_names.iter().any(|n| n == "*")
            || (names.is_empty() && kind.is_full_state());
        state.sub.names = names;
        let mut out = Vec::new();
        if let Some(response) = self.respond(kind, catalog, false) {
            out.push(response);
        }
        self.mark_current(catalog.revision());
        Ok(out)
    }

    /// Responses for every type whose content changed, in push order, with
    /// removals from full-state types completed last.
    pub(crate) fn on_catalog(&mut self, catalog: &Arc<Catalog>) -> Vec<DiscoveryResponse> {
        let mut kinds: Vec<TypeKind> = self.types.keys().copied().collect();
        kinds.sort_by_key(|k| k.order());
        let mut out: Vec<DiscoveryResponse> = kinds
            .iter()
            .filter_map(|k| self.respond(*k, catalog, true))
            .collect();
        out.extend(
            kinds
                .iter()
                .filter_map(|k| self.respond(*k, catalog, false)),
        );
        self.mark_current(catalog.revision());
        out
    }

    /// Once every response is answered the client holds `revision`: what the
    /// fleet reports as its ACKed revision and lag.
    fn mark_current(&self, revision: u64) {
        if !self.types.is_empty() && self.types.values().all(|t| t.answered || t.nonce.is_none()) {
            self.peer.batch_acked(revision);
        }
    }

    /// The response that brings `kind` to `catalog`, if its content changed.
    /// With `keep_removed`, full-state types still carry what they are about
    /// to drop.
    fn respond(
        &mut self,
        kind: TypeKind,
        catalog: &Arc<Catalog>,
        keep_removed: bool,
    ) -> Option<DiscoveryResponse> {
        let filter = self.peer.filter.clone();
        let state = self.types.get_mut(&kind)?;
        let mut content = state.sub.desired(kind, catalog, &filter);
        if keep_removed && kind.is_full_state() {
            for (name, entry) in &state.sent {
                content
                    .entry(name.clone())
                    .or_insert_with(|| Arc::clone(entry));
            }
        }
        let fingerprint: String = content
            .iter()
            .map(|(name, e)| format!("{name}={};", e.version))
            .collect();
        let version = version_of(fingerprint.as_bytes());
        if state.sent_version.as_ref() == Some(&version)
            || state.rejected_version.as_ref() == Some(&version)
        {
            return None;
        }
        self.nonces += 1;
        let nonce = format!("{}-{}", catalog.revision(), self.nonces);
        state.nonce = Some(nonce.clone());
        state.sent_version = Some(version.clone());
        state.sent_revision = catalog.revision();
        state.answered = false;
        let resources = content.values().map(|e| e.any.clone()).collect();
        state.sent = content;
        Some(DiscoveryResponse {
            version_info: version,
            resources,
            type_url: kind.url().to_string(),
            nonce,
            ..Default::default()
        })
    }
}
