//! The catalog: every xDS resource of one policy revision and fleet state,
//! encoded once and shared by all streams. A builder task watches the store
//! and the fleet, debounces bursts, and publishes each new catalog on a
//! `watch` channel; streams only diff and send.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::google::protobuf::Any;
use prism_proto::{Delta, Kind, Resource, Snapshot, version_of};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::envoy::{self, EnvoyParams, FleetEndpoint};
use crate::fleet::Fleet;
use crate::store::Store;

/// Quiet time that ends a burst of changes.
const DEBOUNCE_QUIET: Duration = Duration::from_millis(10);
/// Longest a burst may hold back a push.
const DEBOUNCE_MAX: Duration = Duration::from_millis(100);

/// An xDS resource type this server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TypeKind {
    Prism(Kind),
    Cluster,
    Endpoint,
    Listener,
    Route,
    /// SDS secrets (certificates and trust), served by name only.
    Secret,
}

impl TypeKind {
    /// Envoy types in push order: clusters before endpoints before listeners
    /// before routes (make before break); secrets, which clusters and
    /// listeners wait for while warming as they wait for endpoints, with the
    /// endpoints.
    pub const ENVOY: [TypeKind; 5] = [
        TypeKind::Cluster,
        TypeKind::Endpoint,
        TypeKind::Secret,
        TypeKind::Listener,
        TypeKind::Route,
    ];

    /// Every type, Prism's first, in `Kind::ALL` order.
    pub const ALL: [TypeKind; 10] = [
        TypeKind::Prism(Kind::Secret),
        TypeKind::Prism(Kind::Namespace),
        TypeKind::Prism(Kind::Backend),
        TypeKind::Prism(Kind::Route),
        TypeKind::Prism(Kind::DataBinding),
        TypeKind::Cluster,
        TypeKind::Endpoint,
        TypeKind::Secret,
        TypeKind::Listener,
        TypeKind::Route,
    ];

    pub fn url(self) -> &'static str {
        match self {
            TypeKind::Prism(kind) => kind.type_url(),
            TypeKind::Cluster => envoy::CLUSTER,
            TypeKind::Endpoint => envoy::CLUSTER_LOAD_ASSIGNMENT,
            TypeKind::Listener => envoy::LISTENER,
            TypeKind::Route => envoy::ROUTE_CONFIGURATION,
            TypeKind::Secret => envoy::SECRET,
        }
    }

    pub fn from_url(url: &str) -> Option<TypeKind> {
        TypeKind::ALL.into_iter().find(|t| t.url() == url)
    }

    /// Types whose state-of-the-world responses carry every resource, and for
    /// which an empty subscription means "all" (LDS, CDS and Prism's kinds).
    pub fn is_full_state(self) -> bool {
        matches!(
            self,
            TypeKind::Prism(_) | TypeKind::Cluster | TypeKind::Listener
        )
    }

    /// Rank in push order.
    pub fn order(self) -> usize {
        TypeKind::ALL
            .iter()
            .position(|t| *t == self)
            .unwrap_or(usize::MAX)
    }
}

/// One resource, ready to send.
#[derive(Debug)]
pub struct Entry {
    pub version: String,
    pub any: Any,
    /// The Prism namespace it belongs to, for per-proxy namespace subsets.
    pub namespace: Option<String>,
}

/// The resources of one type.
#[derive(Debug, Default)]
pub struct TypeResources {
    /// What a wildcard subscription gets.
    pub wildcard: BTreeMap<String, Arc<Entry>>,
    /// Resources sent only to those who ask for them by name (gRPC API
    /// listeners, named after the host a client dials).
    pub named_only: BTreeMap<String, Arc<Entry>>,
}

impl TypeResources {
    pub fn get(&self, name: &str) -> Option<&Arc<Entry>> {
        self.wildcard
            .get(name)
            .or_else(|| self.named_only.get(name))
    }
}

/// Every resource of one policy revision and fleet generation.
#[derive(Debug, Default)]
pub struct Catalog {
    /// The policy this catalog was built from.
    pub snapshot: Arc<Snapshot>,
    /// Bumped whenever the proxy fleet's membership or health changes.
    pub fleet_generation: u64,
    /// Each type's resources, shared with the previous catalog while they
    /// do not change: a write of routes copies no other type.
    types: HashMap<TypeKind, Arc<TypeResources>>,
    /// The encoded Envoy routes and clusters, for the next build to reuse.
    translation: envoy::TranslationCache,
}

impl Catalog {
    /// The policy revision.
    pub fn revision(&self) -> u64 {
        self.snapshot.revision
    }

    pub fn resources(&self, kind: TypeKind) -> Option<&TypeResources> {
        self.types.get(&kind).map(Arc::as_ref)
    }

    /// An API listener for a name a gRPC client dials that is not listed in
    /// advance: `host:port`, or a host under a wildcard namespace host. `None`
    /// when no namespace answers for the host.
    pub fn api_listener_for(&self, name: &str) -> Option<Arc<Entry>> {
        let host = match name.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => name,
        };
        let covered = self
            .snapshot
            .of_kind(Kind::Namespace)
            .any(|ns| match &ns.resource {
                Resource::Namespace(ns) => ns.hosts.iter().any(|pattern| {
                    pattern == "*"
                        || match pattern.strip_prefix("*.") {
                            Some(suffix) => host
                                .strip_suffix(suffix)
                                .is_some_and(|p| p.len() > 1 && p.ends_with('.')),
                            None => pattern == host,
                        }
                }),
                _ => false,
            });
        covered.then(|| {
            let any = envoy::api_listener(name);
            Arc::new(Entry {
                version: version_of(&any.value),
                any,
                namespace: None,
            })
        })
    }

    /// Builds the catalog of `snapshot` and `fleet` from `previous`: a Prism
    /// type that the write left alone is shared, one it changed is
    /// `previous`'s with the change applied; Envoy types reuse the encoded
    /// routes and clusters of `previous` (see [`envoy::translate_reusing`])
    /// and each entry whose bytes did not change.
    pub fn build(
        snapshot: Arc<Snapshot>,
        fleet: &[FleetEndpoint],
        fleet_generation: u64,
        params: &EnvoyParams,
        previous: &Catalog,
    ) -> Catalog {
        let mut types = HashMap::new();
        let delta = Snapshot::diff(&previous.snapshot, &snapshot);
        for kind in Kind::ALL {
            let type_kind = TypeKind::Prism(kind);
            let resources = prism_resources(kind, &delta, previous.types.get(&type_kind));
            types.insert(type_kind, resources);
        }
        let (translated, translation) =
            envoy::translate_reusing(&snapshot, fleet, params, &previous.translation);
        let versioned_by_bytes = BTreeMap::new();
        let mut envoy = |kind: TypeKind,
                         wildcard: BTreeMap<String, Any>,
                         named_only: BTreeMap<String, Any>,
                         versions: &BTreeMap<String, String>| {
            let old = previous.types.get(&kind);
            let resources = TypeResources {
                wildcard: envoy_entries(wildcard, versions, old.map(|r| &r.wildcard)),
                named_only: envoy_entries(named_only, versions, old.map(|r| &r.named_only)),
            };
            types.insert(kind, shared_if_unchanged(resources, old));
        };
        envoy(
            TypeKind::Listener,
            translated.listeners,
            translated.api_listeners,
            &versioned_by_bytes,
        );
        envoy(
            TypeKind::Route,
            translated.route_configurations,
            BTreeMap::new(),
            &translated.route_configuration_versions,
        );
        envoy(
            TypeKind::Cluster,
            translated.clusters,
            BTreeMap::new(),
            &versioned_by_bytes,
        );
        envoy(
            TypeKind::Endpoint,
            translated.cluster_load_assignments,
            BTreeMap::new(),
            &versioned_by_bytes,
        );
        // Keys go only to those who name them, never to a wildcard subscriber.
        envoy(
            TypeKind::Secret,
            BTreeMap::new(),
            translated.secrets,
            &versioned_by_bytes,
        );
        Catalog {
            snapshot,
            fleet_generation,
            types,
            translation,
        }
    }
}

/// The resources of Prism `kind` after `delta`, from those of the previous
/// catalog (of the snapshot `delta` was taken from): shared when `delta`
/// leaves the kind alone, otherwise copied with `delta` applied: what the
/// write did not change is copied as it is, neither looked up nor encoded.
fn prism_resources(
    kind: Kind,
    delta: &Delta,
    previous: Option<&Arc<TypeResources>>,
) -> Arc<TypeResources> {
    let mut removals = delta
        .removals
        .iter()
        .filter(|key| key.kind == kind)
        .peekable();
    let mut upserts = delta
        .upserts
        .iter()
        .filter(|v| v.resource.kind() == kind)
        .peekable();
    let unchanged = removals.peek().is_none() && upserts.peek().is_none();
    if let Some(previous) = previous.filter(|_| unchanged) {
        return Arc::clone(previous);
    }
    let mut wildcard = previous.map(|p| p.wildcard.clone()).unwrap_or_default();
    for key in removals {
        wildcard.remove(&key.name);
    }
    for versioned in upserts {
        wildcard.insert(
            versioned.resource.name().to_string(),
            Arc::new(prism_entry(&versioned.resource, &versioned.version)),
        );
    }
    Arc::new(TypeResources {
        wildcard,
        named_only: BTreeMap::new(),
    })
}

fn prism_entry(resource: &Resource, version: &str) -> Entry {
    Entry {
        version: version.to_string(),
        any: Any {
            type_url: resource.kind().type_url().to_string(),
            value: resource.encode_to_vec(),
        },
        namespace: Some(resource.namespace().to_string()),
    }
}

/// Envoy resources as entries, each versioned by `versions` or else by the
/// hash of its bytes. An entry of `previous` with the same bytes is reused
/// as it is, neither hashed again nor copied.
fn envoy_entries(
    resources: BTreeMap<String, Any>,
    versions: &BTreeMap<String, String>,
    previous: Option<&BTreeMap<String, Arc<Entry>>>,
) -> BTreeMap<String, Arc<Entry>> {
    resources
        .into_iter()
        .map(|(name, any)| {
            let reused = previous
                .and_then(|p| p.get(&name))
                .filter(|entry| entry.any == any)
                .cloned();
            let entry = reused.unwrap_or_else(|| {
                let version = versions
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| version_of(&any.value));
                Arc::new(Entry {
                    version,
                    any,
                    namespace: None,
                })
            });
            (name, entry)
        })
        .collect()
}

/// `resources`, or `previous` when it holds the very same entries, so that
/// an unchanged type stays shared from catalog to catalog.
fn shared_if_unchanged(
    resources: TypeResources,
    previous: Option<&Arc<TypeResources>>,
) -> Arc<TypeResources> {
    let same = |a: &BTreeMap<String, Arc<Entry>>, b: &BTreeMap<String, Arc<Entry>>| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((n, x), (m, y))| n == m && Arc::ptr_eq(x, y))
    };
    match previous {
        Some(previous)
            if same(&resources.wildcard, &previous.wildcard)
                && same(&resources.named_only, &previous.named_only) =>
        {
            Arc::clone(previous)
        }
        _ => Arc::new(resources),
    }
}

/// The fleet as Envoy endpoints: connected proxies are healthy.
fn fleet_endpoints(fleet: &Fleet, revision: u64) -> Vec<FleetEndpoint> {
    fleet
        .list(revision)
        .into_iter()
        .map(|p| FleetEndpoint {
            id: p.id,
            address: p.address,
            zone: p.zone,
            region: p.region,
            healthy: p.connected,
        })
        .collect()
}

/// Builds the first catalog and returns a channel that carries every later one.
pub fn spawn_builder(
    store: Store,
    fleet: Fleet,
    params: EnvoyParams,
    mut shutdown: watch::Receiver<bool>,
) -> watch::Receiver<Arc<Catalog>> {
    let mut snapshots = store.subscribe();
    let mut fleet_changes = fleet.subscribe();
    let build =
        move |previous: &Catalog, snapshot: Arc<Snapshot>, generation: u64, fleet: &Fleet| {
            let endpoints = fleet_endpoints(fleet, snapshot.revision);
            Arc::new(Catalog::build(
                snapshot, &endpoints, generation, &params, previous,
            ))
        };
    let first = build(
        &Catalog::default(),
        snapshots.borrow_and_update().clone(),
        *fleet_changes.borrow_and_update(),
        &fleet,
    );
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { return },
                changed = fleet_changes.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
            // Debounce: wait for a quiet moment, bounded, so a burst of writes
            // becomes one catalog and one push.
            let deadline = Instant::now() + DEBOUNCE_MAX;
            loop {
                let quiet =
                    tokio::time::sleep_until((Instant::now() + DEBOUNCE_QUIET).min(deadline));
                tokio::select! {
                    _ = snapshots.changed() => {}
                    _ = fleet_changes.changed() => {}
                    () = quiet => break,
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
            let snapshot = snapshots.borrow_and_update().clone();
            let generation = *fleet_changes.borrow_and_update();
            let previous = tx.borrow().clone();
            if Arc::ptr_eq(&previous.snapshot, &snapshot) && previous.fleet_generation == generation
            {
                continue;
            }
            let next = build(&previous, snapshot, generation, &fleet);
            tx.send_replace(next);
        }
    });
    rx
}
