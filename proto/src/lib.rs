//! prism-proto is Prism's contract: the policy schema (`prism.config.v1`), its
//! JSON/YAML mapping, the defaults its comments promise (`defaults`),
//! validation, and the Snapshot/Delta algebra that the control plane diffs and
//! the proxy applies.
//!
//! It owns no IO: it never opens a socket or a file, spawns no task and knows
//! nothing of sled, tonic or hyper. Both planes depend on it; nothing here
//! depends on them.

pub mod defaults;
mod document;
pub mod load;
mod order;
mod resource;
mod snapshot;
mod validate;

pub use document::{DocumentError, parse_policy, policy_to_yaml};
pub use order::{MatchOrder, match_order};
pub use resource::{
    Kind, Resource, ResourceKey, TYPE_URL_PREFIX, UnknownKind, VersionHasher, Versioned, version_of,
};
pub use snapshot::{Delta, Snapshot};
pub use validate::{
    MAX_DIRECT_RESPONSE_BODY_BYTES, MAX_PEM_BYTES, MAX_REGEX_BYTES, Matches, ValidationError,
    host_namespace, validate_delta, validate_resource, validate_snapshot,
};

/// Generated messages for the `prism.*` packages, with serde impls following the
/// canonical proto3 JSON mapping (field names kept as in the .proto).
pub mod pb {
    /// `prism.config.v1`: the policy schema.
    pub mod config {
        #[allow(clippy::all, missing_docs, rust_2018_idioms)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/prism.config.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/prism.config.v1.serde.rs"));
        }
    }
    /// `prism.admin.v1`: change log and audit records.
    pub mod admin {
        #[allow(clippy::all, missing_docs, rust_2018_idioms)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/prism.admin.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/prism.admin.v1.serde.rs"));
        }
    }
}

pub use pb::config::v1::{
    Backend, DataBinding, Endpoint, LbPolicy, Namespace, Policy, Protocol, Route, RouteMatch,
    Secret,
};
/// The protobuf Duration of policy messages (pbjson's, for its JSON form).
pub use pbjson_types::Duration as ProtoDuration;
