//! What changed between two policies, for people: per resource created,
//! updated or deleted, a unified diff of its YAML as `prism get` prints it.
//!
//! A Secret is rendered through its redacted view ([`crate::admin::view`]),
//! so key material never appears in a diff: a change to a Secret's key or
//! credential alone shows as a note, not as lines.

use prism_proto::{Kind, Resource, ResourceKey, Snapshot, policy_to_yaml};
use serde::Serialize;
use similar::TextDiff;

use crate::admin::view::secret_view;
use crate::store::{Change, changes};

/// Lines of context around each change in a diff.
const CONTEXT_LINES: usize = 3;

/// The note a diff carries when a resource changed only where its view shows
/// nothing: a Secret's key material.
pub const HIDDEN_CHANGE: &str = "# changed only in key material, which is never shown\n";

/// One resource that differs between two policies, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ResourceDiff {
    /// What changed: op, kind, name, version after.
    #[serde(flatten)]
    pub change: Change,
    /// A unified diff of the resource's YAML, headed
    /// `--- Kind name @ <from>` / `+++ Kind name @ <to>`.
    pub diff: String,
}

/// The two sides of a diff as its headers name them, e.g. `r3` and `r5`.
#[derive(Clone, Copy, Debug)]
pub struct Labels<'a> {
    /// The policy the diff starts from.
    pub from: &'a str,
    /// The policy it ends at.
    pub to: &'a str,
}

/// Every resource that differs between `from` and `to`, ordered by kind then
/// name, with its diff.
pub fn between(from: &Snapshot, to: &Snapshot, labels: Labels<'_>) -> Vec<ResourceDiff> {
    let delta = Snapshot::diff(from, to);
    annotate(from, to, changes(from, &delta, to), labels)
}

/// `changes`, which turn `from` into `to`, each with its diff.
pub fn annotate(
    from: &Snapshot,
    to: &Snapshot,
    changes: Vec<Change>,
    labels: Labels<'_>,
) -> Vec<ResourceDiff> {
    changes
        .into_iter()
        .map(|change| {
            let key = ResourceKey::new(change.kind, change.name.clone());
            let before = from.get(&key).map(|entry| &entry.resource);
            let after = to.get(&key).map(|entry| &entry.resource);
            let diff = unified(&key, before, after, labels);
            ResourceDiff { change, diff }
        })
        .collect()
}

/// A resource as `prism get KIND NAME` prints it: a one-resource policy
/// document, or for a Secret its redacted view under `secrets:`.
pub fn resource_yaml(resource: &Resource) -> String {
    match resource {
        Resource::Secret(secret) => {
            let document = serde_json::json!({ Kind::Secret.plural(): [secret_view(secret)] });
            // A JSON value of strings, numbers and lists always serializes.
            serde_yaml::to_string(&document).unwrap_or_default()
        }
        other => policy_to_yaml([other]),
    }
}

/// The unified diff of one resource's YAML between two policies (`None`:
/// absent on that side).
fn unified(
    key: &ResourceKey,
    before: Option<&Resource>,
    after: Option<&Resource>,
    labels: Labels<'_>,
) -> String {
    let old = before.map(resource_yaml).unwrap_or_default();
    let new = after.map(resource_yaml).unwrap_or_default();
    let from = format!("{key} @ {}", labels.from);
    let to = format!("{key} @ {}", labels.to);
    if old == new {
        return format!("--- {from}\n+++ {to}\n{HIDDEN_CHANGE}");
    }
    TextDiff::from_lines(&old, &new)
        .unified_diff()
        .context_radius(CONTEXT_LINES)
        .header(&from, &to)
        .to_string()
}

#[cfg(test)]
mod tests {
    use prism_proto::pb::config::v1::{Credential, Secret, TlsCertificate, secret};
    use prism_proto::{Backend, Endpoint, Namespace};

    use super::*;
    use crate::store::ChangeOp;

    const CERT: &str = include_str!("../../tests/support/tls/server.pem");
    const KEY: &str = include_str!("../../tests/support/tls/server.key");

    const LABELS: Labels<'static> = Labels {
        from: "r1",
        to: "r2",
    };

    fn backend(name: &str, address: &str) -> Resource {
        Resource::Backend(Backend {
            name: name.into(),
            endpoints: vec![Endpoint {
                address: address.into(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn namespace(name: &str) -> Resource {
        Resource::Namespace(Namespace {
            name: name.into(),
            hosts: vec![format!("{name}.local")],
            ..Default::default()
        })
    }

    fn tls(name: &str, key: &str) -> Resource {
        Resource::Secret(Secret {
            name: name.into(),
            kind: Some(secret::Kind::TlsCertificate(TlsCertificate {
                certificate_chain: CERT.into(),
                private_key: key.into(),
            })),
        })
    }

    #[test]
    fn an_update_is_a_unified_diff_of_the_yaml_prism_get_prints() {
        let from = Snapshot::from_resources(1, [backend("demo/web", "127.0.0.1:8081")]);
        let to = Snapshot::from_resources(2, [backend("demo/web", "127.0.0.1:8082")]);
        let diffs = between(&from, &to, LABELS);
        assert_eq!(diffs.len(), 1);
        assert_eq!(diffs[0].change.op, ChangeOp::Update);
        assert_eq!(
            diffs[0].diff,
            "--- Backend demo/web @ r1\n\
             +++ Backend demo/web @ r2\n\
             @@ -1,4 +1,4 @@\n \
             backends:\n \
             - name: demo/web\n   \
             endpoints:\n\
             -  - address: 127.0.0.1:8081\n\
             +  - address: 127.0.0.1:8082\n",
        );
    }

    #[test]
    fn creates_and_deletes_are_whole_documents_ordered_by_kind_then_name() {
        let from = Snapshot::from_resources(
            1,
            [
                namespace("b"),
                backend("b/web", "127.0.0.1:1"),
                namespace("z"),
            ],
        );
        let to = Snapshot::from_resources(
            2,
            [
                namespace("a"),
                backend("b/api", "127.0.0.1:2"),
                namespace("z"),
            ],
        );
        let diffs = between(&from, &to, LABELS);
        let summary: Vec<_> = diffs
            .iter()
            .map(|d| (d.change.op, d.change.kind, d.change.name.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (ChangeOp::Create, Kind::Namespace, "a"),
                (ChangeOp::Delete, Kind::Namespace, "b"),
                (ChangeOp::Create, Kind::Backend, "b/api"),
                (ChangeOp::Delete, Kind::Backend, "b/web"),
            ]
        );
        let created = resource_yaml(&namespace("a"));
        let added: String = created.lines().map(|l| format!("+{l}\n")).collect();
        assert!(diffs[0].diff.ends_with(&added), "{}", diffs[0].diff);
        assert!(!diffs[0].diff.lines().skip(2).any(|l| l.starts_with('-')));
        let deleted = resource_yaml(&namespace("b"));
        let removed: String = deleted.lines().map(|l| format!("-{l}\n")).collect();
        assert!(diffs[1].diff.ends_with(&removed), "{}", diffs[1].diff);
    }

    #[test]
    fn secrets_are_diffed_through_their_redacted_view() {
        let other_key = KEY.replace('A', "B");
        let from = Snapshot::from_resources(1, [tls("demo/tls", KEY)]);
        let to = Snapshot::from_resources(
            2,
            [
                tls("demo/tls", &other_key),
                Resource::Secret(Secret {
                    name: "demo/db".into(),
                    kind: Some(secret::Kind::Credential(Credential {
                        value: "postgres://prism:hunter2@db/demo".into(),
                    })),
                }),
            ],
        );
        let diffs = between(&from, &to, LABELS);
        assert_eq!(diffs.len(), 2);
        let text: String = diffs.iter().map(|d| d.diff.as_str()).collect();
        assert!(
            !text.contains("BEGIN")
                && !text.contains(&KEY[40..80])
                && !text.contains(&other_key[40..80])
                && !text.contains("hunter2"),
            "{text}"
        );
        // The credential is created: its name and kind show.
        assert!(diffs[0].diff.contains("+- kind: credential"), "{text}");
        // The certificate changed only in its key: a note says so.
        assert_eq!(diffs[1].change.op, ChangeOp::Update);
        assert!(diffs[1].diff.ends_with(HIDDEN_CHANGE), "{text}");
        // Its view is what `prism get secrets` shows.
        assert!(
            resource_yaml(&tls("demo/tls", KEY)).contains("subject: CN=shop.test"),
            "{text}"
        );
    }
}
