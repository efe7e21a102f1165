//! The fleet: live state of the proxies connected to discovery, in memory.
//!
//! Discovery reports connections, ACKs and NACKs here; the admin API lists the
//! result (`prism status`). Nothing here is persisted: after a control-plane
//! restart the fleet is rebuilt as proxies reconnect.

use std::collections::BTreeMap;
use std::sync::Arc;

use dashmap::DashMap;
use serde::Serialize;

use crate::metrics::DiscoveryMetrics;
use crate::store::unix_millis_now;

/// The registered proxies. Cheap to clone: clones share one map.
#[derive(Clone, Debug)]
pub struct Fleet {
    nodes: Arc<DashMap<String, NodeState>>,
    /// Generation of membership and health, bumped when a proxy connects or
    /// disconnects: what the published `prism-proxy` endpoints depend on.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// What discovery records about its streams.
    metrics: DiscoveryMetrics,
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            nodes: Arc::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
            metrics: DiscoveryMetrics::default(),
        }
    }
}

/// What a proxy says about itself when it connects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    /// The proxy's node id, unique in the fleet.
    pub id: String,
    /// Availability zone, e.g. `eu-west-1a`.
    pub zone: String,
    /// Region, e.g. `eu-west-1`.
    pub region: String,
    /// Address clients reach the proxy at, `host:port`.
    pub address: String,
}

/// One proxy as the admin API shows it. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ProxyStatus {
    /// The proxy's node id.
    pub id: String,
    /// Availability zone.
    pub zone: String,
    /// Region.
    pub region: String,
    /// Address clients reach the proxy at.
    pub address: String,
    /// Whether at least one discovery stream from this proxy is open.
    pub connected: bool,
    /// When the proxy last connected.
    pub connected_since_unix_millis: i64,
    /// When the proxy was last heard from.
    pub last_seen_unix_millis: i64,
    /// The revision of the latest push the proxy ACKed in full.
    pub acked_revision: Option<u64>,
    /// The latest revision ACKed per type URL.
    pub acked_by_type: BTreeMap<String, u64>,
    /// How many revisions the proxy is behind the store (`None` before its first ACK).
    pub lag: Option<u64>,
    /// The latest NACK, if the proxy ever rejected a push.
    pub last_nack: Option<Nack>,
}

/// A push a proxy rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Nack {
    /// The revision that was rejected.
    pub revision: u64,
    /// The type URL of the rejected resources.
    pub type_url: String,
    /// The proxy's reason (`error_detail.message`).
    pub message: String,
    /// When the NACK arrived.
    pub unix_millis: i64,
}

#[derive(Clone, Debug)]
struct NodeState {
    info: NodeInfo,
    /// Open discovery streams. A proxy that reconnects before its old stream is
    /// noticed gone has two for a moment; it is connected while any is open.
    streams: usize,
    connected_since: i64,
    last_seen: i64,
    acked_revision: Option<u64>,
    acked_by_type: BTreeMap<String, u64>,
    last_nack: Option<Nack>,
}

impl Fleet {
    /// Records a new discovery stream from `node`. A known node keeps its ACK
    /// and NACK history; its zone, region and address are replaced.
    pub fn connected(&self, node: NodeInfo) {
        let now = unix_millis_now();
        self.nodes
            .entry(node.id.clone())
            .and_modify(|state| {
                state.info = node.clone();
                state.streams += 1;
                state.connected_since = now;
                state.last_seen = now;
            })
            .or_insert_with(|| NodeState {
                info: node.clone(),
                streams: 1,
                connected_since: now,
                last_seen: now,
                acked_revision: None,
                acked_by_type: BTreeMap::new(),
                last_nack: None,
            });
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// What discovery records about its streams.
    pub fn metrics(&self) -> &DiscoveryMetrics {
        &self.metrics
    }

    /// Records that `node_id` was heard from.
    pub fn seen(&self, node_id: &str) {
        self.update(node_id, |_| {});
    }

    /// Records that `node_id` ACKed `revision` of the resources of `type_url`.
    pub fn acked(&self, node_id: &str, type_url: &str, revision: u64) {
        self.metrics.replied(type_url, false);
        self.update(node_id, |state| {
            state.acked_by_type.insert(type_url.to_string(), revision);
        });
    }

    /// Records that `node_id` ACKed every type of the push of `revision`.
    pub fn batch_acked(&self, node_id: &str, revision: u64) {
        self.update(node_id, |state| state.acked_revision = Some(revision));
    }

    /// Records that `node_id` rejected `revision` of `type_url`, saying `message`.
    pub fn nacked(&self, node_id: &str, type_url: &str, revision: u64, message: &str) {
        self.metrics.replied(type_url, true);
        self.update(node_id, |state| {
            state.last_nack = Some(Nack {
                revision,
                type_url: type_url.to_string(),
                message: message.to_string(),
                unix_millis: unix_millis_now(),
            });
        });
    }

    /// Records that one discovery stream of `node_id` closed. The node stays
    /// listed, disconnected, with its history.
    pub fn disconnected(&self, node_id: &str) {
        self.update(node_id, |state| {
            state.streams = state.streams.saturating_sub(1);
        });
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// A channel whose value changes whenever a proxy connects or disconnects.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The connected proxy nearest to a client in `zone` (and `region`, if
    /// given): one in the same zone, else one in the same region, else any.
    /// Ties go to the smallest lag, then the smallest id, so every caller gets
    /// the same answer. This is the choice an xDS client makes from the
    /// `prism-proxy` endpoints' zone localities. Returns the proxy and the
    /// match (`zone`, `region` or `any`).
    pub fn nearest(
        &self,
        zone: &str,
        region: &str,
        newest_revision: u64,
    ) -> Option<(ProxyStatus, &'static str)> {
        let mut candidates: Vec<ProxyStatus> = self
            .list(newest_revision)
            .into_iter()
            .filter(|p| p.connected && !p.address.is_empty())
            .collect();
        candidates.sort_by(|a, b| {
            (a.lag.unwrap_or(u64::MAX), &a.id).cmp(&(b.lag.unwrap_or(u64::MAX), &b.id))
        });
        let region = if region.is_empty() {
            // A zone names its region when any proxy there says so.
            candidates
                .iter()
                .find(|p| p.zone == zone && !zone.is_empty())
                .map(|p| p.region.clone())
                .unwrap_or_default()
        } else {
            region.to_string()
        };
        let pick = |level: &'static str, matches: &dyn Fn(&ProxyStatus) -> bool| {
            candidates
                .iter()
                .find(|p| matches(p))
                .map(|p| (p.clone(), level))
        };
        pick("zone", &|p| !zone.is_empty() && p.zone == zone)
            .or_else(|| pick("region", &|p| !region.is_empty() && p.region == region))
            .or_else(|| pick("any", &|_| true))
    }

    /// Every known proxy, sorted by id, with its lag behind `newest_revision`.
    pub fn list(&self, newest_revision: u64) -> Vec<ProxyStatus> {
        let mut proxies: Vec<ProxyStatus> = self
            .nodes
            .iter()
            .map(|entry| {
                let state = entry.value();
                ProxyStatus {
                    id: state.info.id.clone(),
                    zone: state.info.zone.clone(),
                    region: state.info.region.clone(),
                    address: state.info.address.clone(),
                    connected: state.streams > 0,
                    connected_since_unix_millis: state.connected_since,
                    last_seen_unix_millis: state.last_seen,
                    acked_revision: state.acked_revision,
                    acked_by_type: state.acked_by_type.clone(),
                    lag: state
                        .acked_revision
                        .map(|acked| newest_revision.saturating_sub(acked)),
                    last_nack: state.last_nack.clone(),
                }
            })
            .collect();
        proxies.sort_by(|a, b| a.id.cmp(&b.id));
        proxies
    }

    /// Applies `f` to a known node and marks it seen; unknown ids are ignored,
    /// since only `connected` registers a node.
    fn update(&self, node_id: &str, f: impl FnOnce(&mut NodeState)) {
        if let Some(mut state) = self.nodes.get_mut(node_id) {
            state.last_seen = unix_millis_now();
            f(&mut state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, zone: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            zone: zone.into(),
            region: "eu-west-1".into(),
            address: "10.0.0.1:8080".into(),
        }
    }

    const ROUTE: &str = "type.googleapis.com/prism.config.v1.Route";

    #[test]
    fn tracks_acks_nacks_and_lag_in_id_order() {
        let fleet = Fleet::default();
        fleet.connected(node("b", "eu-west-1b"));
        fleet.connected(node("a", "eu-west-1a"));
        fleet.acked("a", ROUTE, 3);
        fleet.batch_acked("a", 3);
        fleet.nacked("a", ROUTE, 4, "bad route");
        fleet.acked("ghost", ROUTE, 1);

        let list = fleet.list(4);
        assert_eq!(list.len(), 2);
        let (a, b) = (&list[0], &list[1]);
        assert_eq!(a.id, "a");
        assert!(a.connected);
        assert_eq!(a.acked_revision, Some(3));
        assert_eq!(a.acked_by_type.get(ROUTE), Some(&3));
        assert_eq!(a.lag, Some(1));
        let nack = a.last_nack.as_ref().expect("nack recorded");
        assert_eq!((nack.revision, nack.message.as_str()), (4, "bad route"));
        assert_eq!(b.id, "b");
        assert_eq!((b.acked_revision, b.lag), (None, None));
    }

    #[test]
    fn reconnect_keeps_history_and_overlapping_streams_count() {
        let fleet = Fleet::default();
        fleet.connected(node("a", "z1"));
        fleet.batch_acked("a", 7);
        // A reconnect that lands before the old stream is seen closing.
        fleet.connected(node("a", "z2"));
        fleet.disconnected("a");
        let a = &fleet.list(7)[0];
        assert!(a.connected, "the newer stream is still open");
        assert_eq!(a.zone, "z2");
        assert_eq!((a.acked_revision, a.lag), (Some(7), Some(0)));

        fleet.disconnected("a");
        let a = &fleet.list(9)[0];
        assert!(!a.connected);
        assert_eq!(a.lag, Some(2));
    }
}
