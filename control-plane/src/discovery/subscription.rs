//! What one stream asked for of one type, what its client holds, and the
//! difference between that and a catalog — shared by both protocol variants.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind as ValueKind;
use prism_proto::{Kind, Resource, ResourceKey, Snapshot};

use super::catalog::{Catalog, Entry, TypeKind};

/// Version recorded for a name the client was told does not exist.
pub const ABSENT: &str = "";

/// The namespaces a proxy asked to receive (node metadata `prism_namespaces`
/// = `"a,b"` and `prism_selector` = `"key=value,key2=value2"`); empty means all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceFilter {
    names: BTreeSet<String>,
    selector: BTreeMap<String, String>,
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
        Ok(Self { names, selector })
    }

    pub fn is_all(&self) -> bool {
        self.names.is_empty() && self.selector.is_empty()
    }

    /// Whether `namespace` of `snapshot` passes the filter.
    pub fn admits(&self, snapshot: &Snapshot, namespace: &str) -> bool {
        if self.is_all() {
            return true;
        }
        if !self.names.is_empty() && !self.names.contains(namespace) {
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

    /// The upserts and removals that bring the client from `held` to `desired`.
    /// Rejected versions are skipped; names asked for that do not exist are
    /// reported once as removed (the delta protocol's "does not exist").
    pub fn diff(&self, desired: &BTreeMap<String, Arc<Entry>>) -> Diff {
        let upserts = desired
            .iter()
            .filter(|(name, entry)| {
                self.held.get(*name) != Some(&entry.version)
                    && self.rejected.get(*name) != Some(&entry.version)
            })
            .map(|(name, entry)| (name.clone(), Arc::clone(entry)))
            .collect();
        let mut removals: Vec<String> = self
            .held
            .iter()
            .filter(|(name, version)| version.as_str() != ABSENT && !desired.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &self.names {
            if !desired.contains_key(name) && !self.held.contains_key(name) {
                removals.push(name.clone());
            }
        }
        removals.sort();
        removals.dedup();
        Diff { upserts, removals }
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
