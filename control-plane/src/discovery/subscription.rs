//! What one stream asked for of one type, what its client holds, and the
//! difference between that and a catalog — shared by both protocol variants.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind as ValueKind;
use prism_proto::{Kind, Resource, ResourceKey, Snapshot};

use super::catalog::{Catalog, Entry, TypeKind};
use crate::tls::ProxyIdentity;

/// Version recorded for a name the client was told does not exist.
pub const ABSENT: &str = "";

/// The namespaces a proxy asked to receive (node metadata `prism_namespaces`
/// = `"a,b"` and `prism_selector` = `"key=value,key2=value2"`); empty means all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceFilter {
    names: BTreeSet<String>,
    selector: BTreeMap<String, String>,
    /// The namespaces the client's certificate lets it serve, when the
    /// discovery server checks certificates (`None`: any).
    allowed: Option<BTreeSet<String>>,
}

impl NamespaceFilter {
    /// Reads the filter from node metadata; malformed selectors are an error
    /// naming the metadata field.
    pub fn from_node(node: &Node) -> Result<Self, String> {
        let field = |key: &str| {
            node.metadata
                .as_ref()
                .and_then(|m| m.fields.get(key))
                .and_then(|v| match &v.kind {
                    Some(ValueKind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
        };
        let names = field("prism_namespaces")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let mut selector = BTreeMap::new();
        for pair in field("prism_selector")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(format!(
                    "node.metadata.prism_selector: `{pair}` is not `key=value`"
                ));
            };
            selector.insert(key.trim().to_string(), value.trim().to_string());
        }
        Ok(Self {
            names,
            selector,
            allowed: None,
        })
    }

    pub fn is_all(&self) -> bool {
        self.names.is_empty() && self.selector.is_empty() && self.allowed.is_none()
    }

    /// This filter, further limited to the namespaces `identity` may serve.
    pub fn restricted_to(mut self, identity: Option<&ProxyIdentity>) -> Self {
        self.allowed = identity.and_then(|identity| identity.namespaces.clone());
        self
    }

    /// Whether `namespace` of `snapshot` passes the filter.
    pub fn admits(&self, snapshot: &Snapshot, namespace: &str) -> bool {
        if self.is_all() {
            return true;
        }
        if !self.names.is_empty() && !self.names.contains(namespace) {
            return false;
        }
        if self
            .allowed
            .as_ref()
            .is_some_and(|allowed| !allowed.contains(namespace))
        {
            return false;
        }
        if self.selector.is_empty() {
            return true;
        }
        match snapshot
            .get(&ResourceKey::new(Kind::Namespace, namespace))
            .map(|v| &v.resource)
        {
            Some(Resource::Namespace(ns)) => self
                .selector
                .iter()
                .all(|(k, v)| ns.labels.get(k) == Some(v)),
            _ => false,
        }
    }
}

/// One type's subscription on one stream.
#[derive(Debug, Default)]
pub struct Subscription {
    /// Subscribed to every resource of the type.
    pub wildcard: bool,
    /// Names asked for explicitly; remembered even before they exist.
    pub names: BTreeSet<String>,
    /// Name → version the client holds (or [`ABSENT`]: told it does not exist).
    pub held: BTreeMap<String, String>,
    /// Name → version the client rejected: not sent again until it changes.
    pub rejected: BTreeMap<String, String>,
}

/// Name → new version (`None`: removed) of the resources one response changes.
pub type Changes = Vec<(String, Option<String>)>;

/// What a subscription lacks against a catalog.
#[derive(Debug, Default)]
pub struct Diff {
    pub upserts: Vec<(String, Arc<Entry>)>,
    pub removals: Vec<String>,
}

impl Diff {
    pub fn changes(&self) -> Changes {
        self.upserts
            .iter()
            .map(|(name, entry)| (name.clone(), Some(entry.version.clone())))
            .chain(self.removals.iter().map(|name| (name.clone(), None)))
            .collect()
    }
}

impl Subscription {
    /// Every resource this subscription covers in `catalog`, by name.
    pub fn desired(
        &self,
        kind: TypeKind,
        catalog: &Catalog,
        filter: &NamespaceFilter,
    ) -> BTreeMap<String, Arc<Entry>> {
        let Some(resources) = catalog.resources(kind) else {
            return BTreeMap::new();
        };
        let admits = |entry: &Entry| match &entry.namespace {
            Some(ns) => filter.admits(&catalog.snapshot, ns),
            None => true,
        };
        let mut desired: BTreeMap<String, Arc<Entry>> = BTreeMap::new();
        if self.wildcard {
            for (name, entry) in &resources.wildcard {
                if admits(entry) {
                    desired.insert(name.clone(), Arc::clone(entry));
                }
            }
        }
        for name in &self.names {
            if let Some(entry) = resources.get(name).filter(|e| admits(e)) {
                desired.insert(name.clone(), Arc::clone(entry));
            } else if let Some(entry) = (kind == TypeKind::Listener)
                .then(|| catalog.api_listener_for(name))
                .flatten()
            {
                desired.insert(name.clone(), entry);
            }
        }
        desired
    }

    /// The upserts and removals that bring the client from what it holds to
    /// what it covers in `catalog` (see [`Subscription::desired`]), by name.
    /// Rejected versions are skipped; names asked for that do not exist are
    /// reported once as removed (the delta protocol's "does not exist").
    ///
    /// Every push runs this for every stream, so it walks the catalog and
    /// `held` side by side (both are sorted by name) instead of building the
    /// desired map: a stream of a 10,000-route policy costs one comparison
    /// per name, and allocates only for what changed.
    pub fn diff(&self, kind: TypeKind, catalog: &Catalog, filter: &NamespaceFilter) -> Diff {
        let admits = |entry: &Entry| match &entry.namespace {
            Some(ns) => filter.admits(&catalog.snapshot, ns),
            None => true,
        };
        let resources = catalog.resources(kind);
        let empty = BTreeMap::new();
        let wildcard = match resources {
            Some(resources) if self.wildcard => &resources.wildcard,
            _ => &empty,
        };
        // Names asked for explicitly, other than those the wildcard gives.
        let mut named: BTreeMap<&str, Option<Arc<Entry>>> = BTreeMap::new();
        for name in &self.names {
            if wildcard.get(name).is_some_and(|e| admits(e)) {
                continue;
            }
            let entry = resources
                .and_then(|r| r.get(name))
                .filter(|e| admits(e))
                .cloned()
                .or_else(|| {
                    (kind == TypeKind::Listener)
                        .then(|| catalog.api_listener_for(name))
                        .flatten()
                });
            named.insert(name, entry);
        }
        let is_named = |name: &str| named.get(name).is_some_and(Option::is_some);

        let mut diff = Diff::default();
        let mut given = wildcard.iter().filter(|(_, e)| admits(e)).peekable();
        let mut held = self.held.iter().peekable();
        loop {
            let given_first = match (given.peek(), held.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((given_name, _)), Some((held_name, _))) => given_name <= held_name,
            };
            if given_first {
                let Some((name, entry)) = given.next() else {
                    break;
                };
                let version = held.next_if(|(h, _)| *h == name).map(|(_, v)| v);
                if self.wants(name, entry, version) {
                    diff.upserts.push((name.clone(), Arc::clone(entry)));
                }
            } else if let Some((name, version)) = held.next()
                && version.as_str() != ABSENT
                && !is_named(name)
            {
                diff.removals.push(name.clone());
            }
        }
        for (name, entry) in &named {
            match entry {
                Some(entry) if self.wants(name, entry, self.held.get(*name)) => {
                    diff.upserts.push(((*name).to_string(), Arc::clone(entry)));
                }
                Some(_) => {}
                None if !self.held.contains_key(*name) => diff.removals.push((*name).to_string()),
                None => {}
            }
        }
        diff.upserts.sort_by(|a, b| a.0.cmp(&b.0));
        diff.removals.sort();
        diff.removals.dedup();
        diff
    }

    /// Whether `entry` must be sent to a client holding `held` of `name`:
    /// it holds another version, and has not rejected this one.
    fn wants(&self, name: &str, entry: &Entry, held: Option<&String>) -> bool {
        held != Some(&entry.version) && self.rejected.get(name) != Some(&entry.version)
    }

    /// Records that the client now holds what `changes` says.
    pub fn hold(&mut self, changes: &Changes) {
        for (name, version) in changes {
            match version {
                Some(version) => {
                    // A newer version was accepted for sending: an older
                    // rejection no longer holds it back should it come again.
                    self.rejected.remove(name);
                    self.held.insert(name.clone(), version.clone());
                }
                // An explicitly named resource stays known as absent, so it is
                // not reported again; others are simply forgotten.
                None if self.names.contains(name) => {
                    self.held.insert(name.clone(), ABSENT.to_string());
                }
                None => {
                    self.held.remove(name);
                }
            }
        }
    }

    /// Applies a delta request's subscribe and unsubscribe lists. `*` is the
    /// wildcard. Unsubscribed names are forgotten along with what was held.
    pub fn update(&mut self, subscribe: &[String], unsubscribe: &[String]) {
        for name in subscribe {
            if name == "*" {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
            }
        }
        for name in unsubscribe {
            if name == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(name);
            }
        }
        if !unsubscribe.is_empty() {
            let (wildcard, names) = (self.wildcard, self.names.clone());
            self.held.retain(|name, _| wildcard || names.contains(name));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use prism_proto::pb::config::v1::{Namespace, Route, RouteMatch, route_match};
    use proptest::prelude::*;

    use super::*;
    use crate::envoy::EnvoyParams;

    /// What the walk in [`Subscription::diff`] must equal: the desired map
    /// built whole, then compared with `held` name by name.
    fn reference(sub: &Subscription, desired: &BTreeMap<String, Arc<Entry>>) -> Diff {
        let upserts = desired
            .iter()
            .filter(|(name, entry)| sub.wants(name, entry, sub.held.get(*name)))
            .map(|(name, entry)| (name.clone(), Arc::clone(entry)))
            .collect();
        let mut removals: Vec<String> = sub
            .held
            .iter()
            .filter(|(name, version)| version.as_str() != ABSENT && !desired.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &sub.names {
            if !desired.contains_key(name) && !sub.held.contains_key(name) {
                removals.push(name.clone());
            }
        }
        removals.sort();
        removals.dedup();
        Diff { upserts, removals }
    }

    fn catalog(routes: &[(usize, usize, bool)]) -> Catalog {
        let mut resources: Vec<Resource> = ["a", "b"]
            .iter()
            .map(|ns| {
                Resource::Namespace(Namespace {
                    name: (*ns).into(),
                    hosts: vec![format!("{ns}.test")],
                    labels: [("team".to_string(), (*ns).to_string())].into(),
                    ..Default::default()
                })
            })
            .collect();
        for &(ns, name, flip) in routes {
            resources.push(Resource::Route(Route {
                name: format!("{}/r{name}", ["a", "b"][ns % 2]),
                r#match: Some(RouteMatch {
                    path: Some(route_match::Path::Prefix(format!("/{name}/{flip}"))),
                    ..Default::default()
                }),
                direct_response: Some(prism_proto::pb::config::v1::DirectResponse {
                    status: 200,
                    body: String::new(),
                }),
                ..Default::default()
            }));
        }
        let address: SocketAddr = "127.0.0.1:10000".parse().expect("an address");
        Catalog::build(
            Arc::new(Snapshot::from_resources(1, resources)),
            &[],
            0,
            &EnvoyParams {
                listener_address: address,
                tls_listener_address: address,
            },
            &Catalog::default(),
        )
    }

    /// A name of the catalog's routes or one it lacks.
    fn name() -> impl Strategy<Value = String> {
        (0..2usize, 0..8usize).prop_map(|(ns, n)| format!("{}/r{n}", ["a", "b"][ns]))
    }

    proptest! {
        #[test]
        fn walk_equals_the_desired_map(
            routes in prop::collection::vec((0..2usize, 0..6usize, any::<bool>()), 0..10),
            wildcard in any::<bool>(),
            names in prop::collection::btree_set(name(), 0..4),
            held in prop::collection::btree_map(name(), 0..3usize, 0..8),
            rejected in prop::collection::btree_map(name(), 0..3usize, 0..3),
            only_a in any::<bool>(),
        ) {
            let catalog = catalog(&routes);
            let kind = TypeKind::Prism(Kind::Route);
            // A held or rejected version is absent, the catalog's own, or stale.
            let version = |name: &str, pick: usize| match pick {
                0 => ABSENT.to_string(),
                1 => catalog
                    .resources(kind)
                    .and_then(|r| r.get(name))
                    .map_or_else(|| "gone".to_string(), |e| e.version.clone()),
                _ => "stale".to_string(),
            };
            let sub = Subscription {
                wildcard,
                names,
                held: held.iter().map(|(n, &p)| (n.clone(), version(n, p))).collect(),
                rejected: rejected
                    .iter()
                    .map(|(n, &p)| (n.clone(), version(n, p)))
                    .collect(),
            };
            let filter = if only_a {
                NamespaceFilter {
                    names: ["a".to_string()].into(),
                    selector: BTreeMap::new(),
                    allowed: None,
                }
            } else {
                NamespaceFilter::default()
            };
            let walked = sub.diff(kind, &catalog, &filter);
            let expected = reference(&sub, &sub.desired(kind, &catalog, &filter));
            let names = |d: &Diff| {
                d.upserts
                    .iter()
                    .map(|(n, e)| (n.clone(), e.version.clone()))
                    .collect::<Vec<_>>()
            };
            prop_assert_eq!(names(&walked), names(&expected));
            prop_assert_eq!(walked.removals, expected.removals);
        }
    }
}
