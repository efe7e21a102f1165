//! Staging of discovery responses into whole revisions: the pure part of the
//! discovery client, with no sockets and no clock, so it is tested directly.
//!
//! The control plane sends one response per kind for each revision (a batch).
//! A revision is only applied once every kind has arrived, so no request ever
//! sees namespaces of one revision with routes of another.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::mem;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use prism_proto::{
    Delta, Kind, Matches, Resource, ResourceKey, Snapshot, Versioned, validate_delta,
};

/// An answer to one response: ACK when `error` is `None`, NACK otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    pub type_url: String,
    pub nonce: String,
    pub error: Option<String>,
}

/// What offering a response to the [`Stager`] led to.
#[derive(Debug)]
pub(crate) enum Offer {
    /// The batch is not complete yet.
    Waiting,
    /// The batch is complete and valid. Compile `candidate`, then call
    /// [`Stager::commit`] or [`Stager::reject`]. `changed` is false when the
    /// candidate holds exactly the resources already accepted.
    Ready { candidate: Snapshot, changed: bool },
    /// The batch (or a stray response) was rejected; NACKs are queued.
    Rejected {
        revision: Option<u64>,
        message: String,
    },
}

/// Collects a batch of responses, validates it as a whole and tracks the last
/// accepted snapshot.
///
/// Each batch is validated as the whole snapshot it makes, but at the cost of
/// what it changes: the accepted snapshot was valid, and `matches` remembers
/// which route holds each match in it (see [`validate_delta`]).
#[derive(Debug, Default)]
pub(crate) struct Stager {
    accepted: Option<Snapshot>,
    /// The route matches of `accepted`.
    matches: Matches,
    /// Revision of the batch being collected.
    revision: Option<u64>,
    pending: BTreeMap<Kind, Staged>,
    /// A complete, valid batch waiting for `commit` or `reject`.
    ready: Option<Ready>,
    outbox: Vec<Reply>,
}

/// A complete, valid batch: the snapshot it makes, the delta that made it
/// from the accepted one, and its matches if validation gave them.
#[derive(Debug)]
struct Ready {
    candidate: Snapshot,
    delta: Delta,
    matches: Option<Matches>,
}

/// One kind's response of the batch being collected.
#[derive(Debug)]
struct Staged {
    nonce: String,
    /// The decoded change, or why it could not be decoded.
    change: Result<Change, String>,
}

#[derive(Debug, Default)]
struct Change {
    upserts: Vec<Arc<Versioned>>,
    removals: Vec<ResourceKey>,
}

impl Stager {
    /// A stager that already holds `accepted` (the snapshot restored from
    /// disk), so the first subscription resumes from it.
    pub(crate) fn with_accepted(accepted: Option<Snapshot>) -> Self {
        Self {
            matches: accepted.as_ref().map(Matches::of).unwrap_or_default(),
            accepted,
            ..Self::default()
        }
    }

    /// The last accepted snapshot, if any.
    #[cfg(any(test, feature = "fuzz"))]
    pub(crate) fn accepted(&self) -> Option<&Snapshot> {
        self.accepted.as_ref()
    }

    /// Name → version of the accepted resources of `kind`, for
    /// `initial_resource_versions` when (re)subscribing.
    pub(crate) fn initial_versions(&self, kind: Kind) -> HashMap<String, String> {
        self.accepted
            .iter()
            .flat_map(|s| s.of_kind(kind))
            .map(|v| (v.resource.name().to_string(), v.version.clone()))
            .collect()
    }

    /// Forgets everything of the stream that ended: pending responses, a
    /// candidate and unsent replies. The accepted snapshot stays.
    pub(crate) fn reset(&mut self) {
        self.revision = None;
        self.pending.clear();
        self.ready = None;
        self.outbox.clear();
    }

    /// Replies to send, in order.
    pub(crate) fn take_replies(&mut self) -> Vec<Reply> {
        mem::take(&mut self.outbox)
    }

    /// Stages one response.
    pub(crate) fn offer(&mut self, response: DeltaDiscoveryResponse) -> Offer {
        let Some(kind) = Kind::from_type_url(&response.type_url) else {
            let message = format!("unknown type URL `{}`", response.type_url);
            self.outbox
                .push(nack(&response.type_url, response.nonce, &message));
            return Offer::Rejected {
                revision: None,
                message,
            };
        };
        let Ok(revision) = response.system_version_info.parse::<u64>() else {
            let message = format!(
                "{kind}: system_version_info `{}` is not a revision number",
                response.system_version_info
            );
            self.outbox
                .push(nack(kind.type_url(), response.nonce, &message));
            self.nack_pending(&message);
            return Offer::Rejected {
                revision: None,
                message,
            };
        };
        if self.revision.is_some_and(|r| r != revision) || self.ready.is_some() {
            // The server only starts a batch once the previous one is
            // answered, so leftovers are a broken batch: answer them now.
            self.nack_pending(&format!(
                "revision {} was incomplete when revision {revision} arrived",
                self.revision.unwrap_or_default()
            ));
        }
        self.revision = Some(revision);
        let staged = Staged {
            change: decode(kind, &response),
            nonce: response.nonce,
        };
        if let Some(old) = self.pending.insert(kind, staged) {
            self.outbox.push(nack(
                kind.type_url(),
                old.nonce,
                &format!("{kind}: replaced by a later response for revision {revision}"),
            ));
        }
        if !Kind::ALL.iter().all(|k| self.pending.contains_key(k)) {
            return Offer::Waiting;
        }
        match self.candidate(revision) {
            Ok(ready) => {
                let changed = self
                    .accepted
                    .as_ref()
                    .is_none_or(|a| changes(a, &ready.delta, &ready.candidate));
                let candidate = ready.candidate.clone();
                self.ready = Some(ready);
                Offer::Ready { candidate, changed }
            }
            Err(message) => {
                self.nack_pending(&message);
                Offer::Rejected {
                    revision: Some(revision),
                    message,
                }
            }
        }
    }

    /// Accepts the ready candidate: ACKs every pending response. Returns the
    /// newly accepted snapshot, or `None` if nothing was ready.
    pub(crate) fn commit(&mut self) -> Option<&Snapshot> {
        let Ready {
            candidate,
            delta,
            matches,
        } = self.ready.take()?;
        let base = self.accepted.take().unwrap_or_default();
        match matches {
            Some(matches) => self.matches = matches,
            None => self.matches.update(&base, &delta, &candidate),
        }
        for (kind, staged) in mem::take(&mut self.pending) {
            self.outbox.push(Reply {
                type_url: kind.type_url().to_string(),
                nonce: staged.nonce,
                error: None,
            });
        }
        self.revision = None;
        self.accepted = Some(candidate);
        self.accepted.as_ref()
    }

    /// Rejects the ready candidate (it failed to compile): NACKs every
    /// pending response and keeps the accepted snapshot.
    pub(crate) fn reject(&mut self, message: &str) {
        self.nack_pending(message);
    }

    /// The accepted snapshot with every pending change applied, validated.
    fn candidate(&self, revision: u64) -> Result<Ready, String> {
        let mut delta = Delta {
            revision,
            ..Delta::default()
        };
        let empty = Snapshot::default();
        let base = self.accepted.as_ref().unwrap_or(&empty);
        let changes = self
            .pending
            .values()
            .map(|staged| staged.change.as_ref().map_err(Clone::clone))
            .collect::<Result<Vec<_>, String>>()?;
        for change in &changes {
            delta.removals.extend(change.removals.iter().cloned());
        }
        let removed: HashSet<&ResourceKey> = delta.removals.iter().collect();
        // A version names its content: a resource sent again at the version
        // already held (as after a reconnect) is the one held, so what is
        // accepted is always what the runtime was built from.
        let resent = |v: &Versioned| {
            let key = v.resource.key();
            base.get(&key).is_some_and(|held| held.version == v.version) && !removed.contains(&key)
        };
        let upserts = changes
            .iter()
            .flat_map(|change| &change.upserts)
            .filter(|v| !resent(v))
            .cloned()
            .collect();
        delta.upserts = upserts;
        let candidate = base.apply(&delta);
        let matches =
            validate_delta(base, &self.matches, &delta, &candidate).map_err(|e| e.to_string())?;
        Ok(Ready {
            candidate,
            delta,
            matches,
        })
    }

    fn nack_pending(&mut self, message: &str) {
        for (kind, staged) in mem::take(&mut self.pending) {
            self.outbox
                .push(nack(kind.type_url(), staged.nonce, message));
        }
        self.revision = None;
        self.ready = None;
    }
}

/// Whether `candidate`, which is `base` with `delta` applied, differs from
/// `base`: whether a resource the delta touches changed version, appeared
/// or went.
fn changes(base: &Snapshot, delta: &Delta, candidate: &Snapshot) -> bool {
    let differs = |key: &ResourceKey| match (base.get(key), candidate.get(key)) {
        (Some(old), Some(new)) => old.version != new.version,
        (old, new) => old.is_some() != new.is_some(),
    };
    delta.removals.iter().any(differs)
        || delta
            .upserts
            .iter()
            .any(|versioned| differs(&versioned.resource.key()))
}

fn nack(type_url: &str, nonce: String, message: &str) -> Reply {
    Reply {
        type_url: type_url.to_string(),
        nonce,
        error: Some(message.to_string()),
    }
}

/// Decodes one kind's response into upserts and removals.
fn decode(kind: Kind, response: &DeltaDiscoveryResponse) -> Result<Change, String> {
    let mut change = Change::default();
    for wire in &response.resources {
        let name = &wire.name;
        let any = wire
            .resource
            .as_ref()
            .ok_or_else(|| format!("{kind} {name}: the resource body is missing"))?;
        if any.type_url != kind.type_url() {
            return Err(format!(
                "{kind} {name}: type URL `{}` is not `{}`",
                any.type_url,
                kind.type_url()
            ));
        }
        let resource = Resource::decode(kind, &any.value)
            .map_err(|e| format!("{kind} {name}: cannot decode: {e}"))?;
        if resource.name() != name {
            return Err(format!(
                "{kind} {name}: the resource inside is named `{}`",
                resource.name()
            ));
        }
        let versioned = if wire.version.is_empty() {
            resource.versioned()
        } else {
            Versioned {
                resource,
                version: wire.version.clone(),
            }
        };
        change.upserts.push(Arc::new(versioned));
    }
    change.removals = response
        .removed_resources
        .iter()
        .map(|name| ResourceKey::new(kind, name.clone()))
        .collect();
    Ok(change)
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::Resource as WireResource;
    use envoy_types::pb::google::protobuf::Any;
    use prism_proto::pb::config::v1::{Endpoint, Namespace, Route, RouteMatch, route_match};

    use super::*;

    fn wire(resource: &Resource) -> WireResource {
        let versioned = resource.clone().versioned();
        WireResource {
            name: resource.name().to_string(),
            version: versioned.version,
            resource: Some(Any {
                type_url: resource.kind().type_url().to_string(),
                value: resource.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    fn response(
        kind: Kind,
        revision: u64,
        resources: &[Resource],
        removed: &[&str],
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: revision.to_string(),
            type_url: kind.type_url().to_string(),
            nonce: format!("{revision}-{kind}"),
            resources: resources.iter().map(wire).collect(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn namespace() -> Resource {
        Resource::Namespace(Namespace {
            name: "demo".into(),
            hosts: vec!["demo.local".into()],
            ..Default::default()
        })
    }

    fn backend(name: &str) -> Resource {
        Resource::Backend(prism_proto::Backend {
            name: name.into(),
            endpoints: vec![Endpoint {
                address: "127.0.0.1:8081".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn route(backend: &str) -> Resource {
        Resource::Route(Route {
            name: "demo/root".into(),
            r#match: Some(RouteMatch {
                host: String::new(),
                path: Some(route_match::Path::Prefix("/".into())),
                ..Default::default()
            }),
            backend: backend.into(),
            ..Default::default()
        })
    }

    /// A CA bundle: the proxy takes Secrets like any other kind.
    fn secret() -> Resource {
        Resource::Secret(prism_proto::Secret {
            name: "demo/ca".into(),
            kind: Some(prism_proto::pb::config::v1::secret::Kind::CaBundle(
                prism_proto::pb::config::v1::CaBundle {
                    certificates: include_str!("../../../tests/support/tls/ca.pem").into(),
                },
            )),
        })
    }

    /// Offers a full batch (no data bindings), returning the outcome of the
    /// last response.
    fn batch(stager: &mut Stager, revision: u64, per_kind: [(&[Resource], &[&str]); 4]) -> Offer {
        let mut last = Offer::Waiting;
        let none: (&[Resource], &[&str]) = (&[], &[]);
        for (kind, (resources, removed)) in Kind::ALL
            .into_iter()
            .zip(per_kind.into_iter().chain([none]))
        {
            last = stager.offer(response(kind, revision, resources, removed));
        }
        last
    }

    fn valid_batch(stager: &mut Stager, revision: u64) -> Offer {
        batch(
            stager,
            revision,
            [
                (&[secret()], &[]),
                (&[namespace()], &[]),
                (&[backend("demo/upstream")], &[]),
                (&[route("upstream")], &[]),
            ],
        )
    }

    #[test]
    fn batch_is_complete_only_when_every_kind_has_the_same_revision() {
        let mut stager = Stager::default();
        assert!(matches!(
            stager.offer(response(Kind::Secret, 1, &[secret()], &[])),
            Offer::Waiting
        ));
        assert!(matches!(
            stager.offer(response(Kind::Namespace, 1, &[namespace()], &[])),
            Offer::Waiting
        ));
        assert!(matches!(
            stager.offer(response(Kind::Backend, 1, &[backend("demo/upstream")], &[])),
            Offer::Waiting
        ));
        assert!(matches!(
            stager.offer(response(Kind::DataBinding, 1, &[], &[])),
            Offer::Waiting
        ));
        assert!(
            stager.take_replies().is_empty(),
            "nothing is answered early"
        );
        let Offer::Ready { candidate, changed } =
            stager.offer(response(Kind::Route, 1, &[route("upstream")], &[]))
        else {
            panic!("expected a ready batch");
        };
        assert!(changed);
        assert_eq!(candidate.revision, 1);
        assert_eq!(candidate.len(), 4);
        assert!(candidate.contains(Kind::Secret, "demo/ca"));
        assert!(stager.accepted().is_none(), "not accepted before commit");
        assert_eq!(stager.commit().map(|s| s.revision), Some(1));
        let replies = stager.take_replies();
        assert_eq!(replies.len(), Kind::ALL.len());
        assert!(replies.iter().all(|r| r.error.is_none()));
        assert_eq!(replies[0].nonce, "1-Secret");
        assert_eq!(
            stager
                .initial_versions(Kind::Backend)
                .keys()
                .collect::<Vec<_>>(),
            ["demo/upstream"]
        );
    }

    #[test]
    fn a_response_of_another_revision_restarts_the_batch() {
        let mut stager = Stager::default();
        stager.offer(response(Kind::Namespace, 1, &[namespace()], &[]));
        stager.offer(response(Kind::Backend, 2, &[backend("demo/upstream")], &[]));
        let replies = stager.take_replies();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].nonce, "1-Namespace");
        assert!(replies[0].error.is_some());
        stager.offer(response(Kind::Namespace, 2, &[namespace()], &[]));
        stager.offer(response(Kind::Secret, 2, &[], &[]));
        stager.offer(response(Kind::DataBinding, 2, &[], &[]));
        assert!(matches!(
            stager.offer(response(Kind::Route, 2, &[route("upstream")], &[])),
            Offer::Ready { .. }
        ));
    }

    #[test]
    fn invalid_batch_is_nacked_and_accepted_stays() {
        let mut stager = Stager::default();
        assert!(matches!(valid_batch(&mut stager, 1), Offer::Ready { .. }));
        stager.commit();
        stager.take_replies();

        let outcome = batch(
            &mut stager,
            2,
            [(&[], &[]), (&[], &[]), (&[], &[]), (&[route("x")], &[])],
        );
        let Offer::Rejected { revision, message } = outcome else {
            panic!("expected a rejection, got {outcome:?}");
        };
        assert_eq!(revision, Some(2));
        assert_eq!(
            message,
            "Route demo/root: backend: backend `demo/x` does not exist"
        );
        let replies = stager.take_replies();
        assert_eq!(
            replies.len(),
            Kind::ALL.len(),
            "every response of the batch is NACKed"
        );
        assert!(
            replies
                .iter()
                .all(|r| r.error.as_deref() == Some(message.as_str()))
        );
        assert_eq!(stager.accepted().map(|s| s.revision), Some(1));
        assert!(stager.commit().is_none(), "nothing left to commit");

        // A later valid batch applies on top of revision 1.
        let outcome = batch(
            &mut stager,
            3,
            [
                (&[], &[]),
                (&[], &[]),
                (&[backend("demo/x")], &["demo/upstream"]),
                (&[route("x")], &[]),
            ],
        );
        let Offer::Ready { candidate, changed } = outcome else {
            panic!("expected a ready batch, got {outcome:?}");
        };
        assert!(changed);
        assert!(candidate.contains(Kind::Backend, "demo/x"));
        assert!(!candidate.contains(Kind::Backend, "demo/upstream"));
        stager.commit();
        assert_eq!(stager.accepted().map(|s| s.revision), Some(3));
        assert!(stager.take_replies().iter().all(|r| r.error.is_none()));
    }

    #[test]
    fn undecodable_or_mistyped_resources_are_nacked() {
        let mut stager = Stager::default();
        let mut bad = response(Kind::Backend, 1, &[backend("demo/upstream")], &[]);
        if let Some(any) = bad.resources[0].resource.as_mut() {
            any.type_url = Kind::Route.type_url().to_string();
        }
        stager.offer(response(Kind::Secret, 1, &[], &[]));
        stager.offer(response(Kind::Namespace, 1, &[namespace()], &[]));
        stager.offer(bad);
        stager.offer(response(Kind::DataBinding, 1, &[], &[]));
        let outcome = stager.offer(response(Kind::Route, 1, &[], &[]));
        let Offer::Rejected { message, .. } = outcome else {
            panic!("expected a rejection, got {outcome:?}");
        };
        assert!(
            message.starts_with("Backend demo/upstream: type URL"),
            "{message}"
        );
        assert_eq!(stager.take_replies().len(), Kind::ALL.len());
        assert!(stager.accepted().is_none());

        let outcome = stager.offer(DeltaDiscoveryResponse {
            type_url: "type.googleapis.com/other.Thing".into(),
            nonce: "n".into(),
            ..Default::default()
        });
        assert!(matches!(outcome, Offer::Rejected { revision: None, .. }));
        assert_eq!(stager.take_replies()[0].nonce, "n");
    }

    #[test]
    fn a_resource_resent_at_its_version_is_the_one_held() {
        let mut stager = Stager::default();
        valid_batch(&mut stager, 1);
        stager.commit();
        let held = stager.accepted().cloned().expect("accepted");
        // The same name at the same version with other content (a backend
        // that does not exist): the version names the content, so the held
        // resource stays and nothing changed.
        let mut resent = response(Kind::Route, 2, &[route("upstream")], &[]);
        let other = match route("upstream") {
            Resource::Route(mut spec) => {
                spec.backend = "elsewhere".into();
                Resource::Route(spec)
            }
            _ => unreachable!(),
        };
        if let Some(any) = resent.resources[0].resource.as_mut() {
            any.value = other.encode_to_vec();
        }
        for kind in [
            Kind::Secret,
            Kind::Namespace,
            Kind::Backend,
            Kind::DataBinding,
        ] {
            stager.offer(response(kind, 2, &[], &[]));
        }
        let Offer::Ready { candidate, changed } = stager.offer(resent) else {
            panic!("expected a ready batch");
        };
        assert!(!changed);
        let key = ResourceKey::new(Kind::Route, "demo/root");
        assert_eq!(candidate.get(&key), held.get(&key));
    }

    #[test]
    fn unchanged_batch_is_ready_but_not_changed() {
        let mut stager = Stager::default();
        valid_batch(&mut stager, 1);
        stager.commit();
        let outcome = batch(
            &mut stager,
            2,
            [(&[], &[]), (&[], &[]), (&[], &[]), (&[], &[])],
        );
        let Offer::Ready { changed, candidate } = outcome else {
            panic!("expected a ready batch, got {outcome:?}");
        };
        assert!(!changed);
        assert_eq!(candidate.revision, 2);
        // The first batch is a change even when it is empty: it is the first
        // configuration.
        let mut fresh = Stager::default();
        let outcome = batch(
            &mut fresh,
            1,
            [(&[], &[]), (&[], &[]), (&[], &[]), (&[], &[])],
        );
        assert!(matches!(outcome, Offer::Ready { changed: true, .. }));
    }

    #[test]
    fn a_restored_snapshot_is_resumed_from() {
        let mut first = Stager::default();
        valid_batch(&mut first, 4);
        let restored = first.commit().cloned();

        let mut stager = Stager::with_accepted(restored);
        assert_eq!(
            stager
                .initial_versions(Kind::Route)
                .keys()
                .collect::<Vec<_>>(),
            ["demo/root"]
        );
        // The server finds nothing to send: the batch is ready, unchanged.
        let outcome = batch(
            &mut stager,
            4,
            [(&[], &[]), (&[], &[]), (&[], &[]), (&[], &[])],
        );
        let Offer::Ready { changed, candidate } = outcome else {
            panic!("expected a ready batch, got {outcome:?}");
        };
        assert!(!changed);
        assert_eq!(candidate.len(), 4);
    }
}
