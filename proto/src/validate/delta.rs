//! Validation of a revision that changes a few resources of a large snapshot
//! already validated: [`validate_snapshot`](super::validate_snapshot)'s rules, applied to what the
//! delta touches, so 100 changed routes of a 10,000-route policy cost the
//! 100, not the 10,000.
//!
//! The verdict and the error are always [`validate_snapshot`](super::validate_snapshot)'s own. The
//! incremental check only ever passes a snapshot that the whole check would
//! pass; when it finds a fault, or the delta touches what it cannot judge
//! alone (a Namespace, a Secret, a Backend's removal: rules that reach into
//! resources the delta left as they were), the whole snapshot is validated,
//! so a refused revision names the same resource and field either way.

use std::collections::{HashMap, HashSet};

use super::{
    HostOwners, MatchKey, Result, backend_references, resource_rules, route_references,
    validate_whole,
};
use crate::resource::{Kind, Resource, ResourceKey, Versioned};
use crate::snapshot::{Delta, Snapshot};

/// The route that holds each match of a valid snapshot: what tells a changed
/// route whether another already has its match, without looking at the
/// others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matches {
    owners: HashMap<MatchKey, String>,
}

impl Matches {
    /// The matches of `snapshot`'s routes.
    pub fn of(snapshot: &Snapshot) -> Matches {
        let owners = snapshot
            .of_kind(Kind::Route)
            .filter_map(|entry| match_of(entry).map(|(key, name)| (key, name.to_string())))
            .collect();
        Matches { owners }
    }

    /// Follows `base` becoming `next` by `delta`: the matches of the routes
    /// the delta touched are replaced by theirs in `next`.
    pub fn update(&mut self, base: &Snapshot, delta: &Delta, next: &Snapshot) {
        let routes: Vec<ResourceKey> = touched(delta)
            .into_iter()
            .filter(|key| key.kind == Kind::Route)
            .collect();
        // Every old match goes before any new one comes, so two routes that
        // trade matches keep both.
        for (match_key, name) in routes
            .iter()
            .filter_map(|key| base.get(key))
            .filter_map(|e| match_of(e))
        {
            if self
                .owners
                .get(&match_key)
                .is_some_and(|owner| owner == name)
            {
                self.owners.remove(&match_key);
            }
        }
        for (match_key, name) in routes
            .iter()
            .filter_map(|key| next.get(key))
            .filter_map(|e| match_of(e))
        {
            self.owners.insert(match_key, name.to_string());
        }
    }
}

/// Validates `candidate`, which is `base` (valid, its matches in `matches`)
/// with `delta` applied. Gives exactly the verdict and error of
/// `validate_snapshot(candidate)`, in time proportional to the delta when it
/// is valid and touches only routes and backends it does not remove.
///
/// When valid, and the whole snapshot had to be checked, the candidate's
/// matches come with the verdict; otherwise [`Matches::update`] makes them
/// from `matches` once the candidate is accepted.
pub fn validate_delta(
    base: &Snapshot,
    matches: &Matches,
    delta: &Delta,
    candidate: &Snapshot,
) -> Result<Option<Matches>> {
    if passes(base, matches, delta, candidate) {
        return Ok(None);
    }
    let owners = validate_whole(candidate)?
        .into_iter()
        .map(|(key, name)| (key, name.to_string()))
        .collect();
    Ok(Some(Matches { owners }))
}

/// Whether the resources `delta` touches keep every rule of
/// [`validate_snapshot`](super::validate_snapshot); `false` also when this cannot tell alone.
fn passes(base: &Snapshot, matches: &Matches, delta: &Delta, candidate: &Snapshot) -> bool {
    let kinds = delta
        .upserts
        .iter()
        .map(|v| v.resource.kind())
        .chain(delta.removals.iter().map(|key| key.kind));
    // The whole check is no dearer for a delta of half the snapshot or more
    // (a fresh policy), and the only one for namespaces, Secrets and data
    // bindings (rare writes, whose rules span their namespace).
    let large = 2 * (delta.upserts.len() + delta.removals.len()) >= candidate.len();
    if large
        || kinds
            .clone()
            .any(|kind| matches!(kind, Kind::Namespace | Kind::Secret | Kind::DataBinding))
    {
        return false;
    }
    let touched = touched(delta);
    // Built on the first route with a host: namespaces are as in `base`.
    let mut hosts: Option<HostOwners<'_>> = None;
    let mut claimed: HashSet<MatchKey> = HashSet::new();
    for key in &touched {
        let Some(entry) = candidate.get(key) else {
            // A removed route is nobody's reference; a removed backend may be.
            match key.kind {
                Kind::Route => continue,
                _ if base.get(key).is_none() => continue,
                _ => return false,
            }
        };
        if resource_rules(candidate, &entry.resource).is_err() {
            return false;
        }
        match &entry.resource {
            Resource::Namespace(_) | Resource::Secret(_) | Resource::DataBinding(_) => {
                return false;
            }
            Resource::Backend(b) => {
                if backend_references(candidate, &entry.resource, b).is_err() {
                    return false;
                }
            }
            Resource::Route(route) => {
                let hosts = hosts.get_or_insert_with(|| HostOwners::of(candidate));
                if route_references(candidate, hosts, &entry.resource, route).is_err() {
                    return false;
                }
                let Some((match_key, _)) = match_of(entry) else {
                    continue;
                };
                // Another route's match is free when that route is touched
                // too: its own match (if any) is among `claimed`.
                let taken = matches.owners.get(&match_key).is_some_and(|owner| {
                    !touched.contains(&ResourceKey::new(Kind::Route, owner.as_str()))
                });
                if taken || !claimed.insert(match_key) {
                    return false;
                }
            }
        }
    }
    true
}

/// The keys `delta` removes or upserts, each once.
fn touched(delta: &Delta) -> HashSet<ResourceKey> {
    delta
        .removals
        .iter()
        .cloned()
        .chain(delta.upserts.iter().map(|v| v.resource.key()))
        .collect()
}

/// The match of a route entry and the route's name.
fn match_of(entry: &Versioned) -> Option<(MatchKey, &str)> {
    let Resource::Route(route) = &entry.resource else {
        return None;
    };
    let m = route.r#match.as_ref()?;
    Some((MatchKey::of(entry.resource.namespace(), m), &route.name))
}
