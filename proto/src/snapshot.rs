//! Snapshots of the whole policy at a revision, and the deltas between them.
//!
//! The algebra the rest of Prism leans on: `a.apply(&Snapshot::diff(&a, &b)) == b`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::resource::{Kind, Resource, ResourceKey, Versioned};

/// The complete policy at one revision. Immutable once built and shared behind
/// `Arc`s: cloning a snapshot clones pointers, not resources.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub revision: u64,
    resources: BTreeMap<ResourceKey, Arc<Versioned>>,
}

/// What turns one snapshot into another: resources to add or replace, keys to
/// remove, and the revision the result carries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub revision: u64,
    pub upserts: Vec<Arc<Versioned>>,
    pub removals: Vec<ResourceKey>,
}

impl Snapshot {
    /// An empty snapshot at `revision`.
    pub fn empty(revision: u64) -> Self {
        Self {
            revision,
            resources: BTreeMap::new(),
        }
    }

    /// A snapshot holding `resources` (later duplicates replace earlier ones).
    pub fn from_resources(revision: u64, resources: impl IntoIterator<Item = Resource>) -> Self {
        let mut snapshot = Self::empty(revision);
        for resource in resources {
            snapshot.insert(resource);
        }
        snapshot
    }

    /// Adds or replaces one resource.
    pub fn insert(&mut self, resource: Resource) {
        let versioned = resource.versioned();
        self.resources
            .insert(versioned.resource.key(), Arc::new(versioned));
    }

    /// Adds or replaces one already versioned resource.
    pub fn insert_versioned(&mut self, versioned: Arc<Versioned>) {
        self.resources.insert(versioned.resource.key(), versioned);
    }

    /// Removes one resource, returning it if it was there.
    pub fn remove(&mut self, key: &ResourceKey) -> Option<Arc<Versioned>> {
        self.resources.remove(key)
    }

    pub fn get(&self, key: &ResourceKey) -> Option<&Arc<Versioned>> {
        self.resources.get(key)
    }

    pub fn contains(&self, kind: Kind, name: &str) -> bool {
        self.resources.contains_key(&ResourceKey::new(kind, name))
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// Every resource, ordered by kind then name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Versioned>> {
        self.resources.values()
    }

    /// The resources of one kind, ordered by name.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Arc<Versioned>> {
        let start = ResourceKey::new(kind, String::new());
        self.resources
            .range(start..)
            .take_while(move |(key, _)| key.kind == kind)
            .map(|(_, v)| v)
    }

    /// The delta that turns `from` into `to`: every resource of `to` that `from`
    /// lacks or holds at another version, and every key of `from` that `to` lacks.
    pub fn diff(from: &Snapshot, to: &Snapshot) -> Delta {
        let upserts = to
            .resources
            .iter()
            .filter(|(key, new)| {
                from.resources
                    .get(*key)
                    .is_none_or(|old| old.version != new.version)
            })
            .map(|(_, new)| Arc::clone(new))
            .collect();
        let removals = from
            .resources
            .keys()
            .filter(|key| !to.resources.contains_key(*key))
            .cloned()
            .collect();
        Delta {
            revision: to.revision,
            upserts,
            removals,
        }
    }

    /// This snapshot with `delta` applied: removals first, then upserts.
    pub fn apply(&self, delta: &Delta) -> Snapshot {
        let mut next = self.clone();
        for key in &delta.removals {
            next.resources.remove(key);
        }
        for versioned in &delta.upserts {
            next.insert_versioned(Arc::clone(versioned));
        }
        next.revision = delta.revision;
        next
    }
}

impl Delta {
    /// Whether applying this delta changes no resource.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::pb::config::v1::{Backend, Endpoint, Namespace, Route, RouteMatch, route_match};

    fn resource() -> impl Strategy<Value = Resource> {
        let name = "[a-c]";
        prop_oneof![
            (name, proptest::collection::vec("[a-c]\\.test", 0..3)).prop_map(|(n, hosts)| {
                Resource::Namespace(Namespace {
                    name: n,
                    hosts,
                    ..Default::default()
                })
            }),
            (name, name, 1u16..4).prop_map(|(ns, n, port)| {
                Resource::Backend(Backend {
                    name: format!("{ns}/{n}"),
                    endpoints: vec![Endpoint {
                        address: format!("127.0.0.1:{port}"),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
            }),
            (name, name, name, "/[a-c]?").prop_map(|(ns, n, backend, prefix)| {
                Resource::Route(Route {
                    name: format!("{ns}/{n}"),
                    r#match: Some(RouteMatch {
                        host: String::new(),
                        path: Some(route_match::Path::Prefix(prefix)),
                    }),
                    backend,
                    timeout: None,
                })
            }),
        ]
    }

    fn snapshot() -> impl Strategy<Value = Snapshot> {
        (0u64..100, proptest::collection::vec(resource(), 0..12))
            .prop_map(|(revision, resources)| Snapshot::from_resources(revision, resources))
    }

    proptest! {
        #[test]
        fn apply_of_diff_is_the_target(a in snapshot(), b in snapshot()) {
            prop_assert_eq!(a.apply(&Snapshot::diff(&a, &b)), b);
        }

        #[test]
        fn diff_to_itself_is_empty(a in snapshot()) {
            prop_assert!(Snapshot::diff(&a, &a).is_empty());
        }

        #[test]
        fn diff_names_only_what_changed(a in snapshot(), b in snapshot()) {
            let delta = Snapshot::diff(&a, &b);
            for upsert in &delta.upserts {
                let key = upsert.resource.key();
                prop_assert!(a.get(&key).is_none_or(|old| old.version != upsert.version));
            }
            for key in &delta.removals {
                prop_assert!(a.get(key).is_some() && b.get(key).is_none());
            }
        }

        #[test]
        fn deltas_compose(a in snapshot(), b in snapshot(), c in snapshot()) {
            let via_b = a.apply(&Snapshot::diff(&a, &b)).apply(&Snapshot::diff(&b, &c));
            prop_assert_eq!(via_b, c);
        }

        #[test]
        fn encoding_round_trips(r in resource()) {
            let decoded = Resource::decode(r.kind(), &r.encode_to_vec()).expect("decodes");
            prop_assert_eq!(&decoded, &r);
            let from_json = Resource::from_json(r.kind(), r.to_json()).expect("parses");
            prop_assert_eq!(from_json, r);
        }
    }

    #[test]
    fn of_kind_returns_only_that_kind_in_name_order() {
        let s = Snapshot::from_resources(
            1,
            [
                Resource::Backend(Backend {
                    name: "b/x".into(),
                    ..Default::default()
                }),
                Resource::Namespace(Namespace {
                    name: "z".into(),
                    ..Default::default()
                }),
                Resource::Backend(Backend {
                    name: "a/x".into(),
                    ..Default::default()
                }),
                Resource::Route(Route {
                    name: "a/r".into(),
                    ..Default::default()
                }),
            ],
        );
        let names: Vec<_> = s
            .of_kind(Kind::Backend)
            .map(|v| v.resource.name().to_string())
            .collect();
        assert_eq!(names, ["a/x", "b/x"]);
    }
}
