//! The five resource kinds as one enum, their names, type URLs and versions.

use std::fmt;
use std::str::FromStr;

use prost::Message;

use crate::pb::config::v1::{Backend, DataBinding, Namespace, Route, Secret};

/// Prefix of every `Any` type URL.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// A kind of policy resource. The order of `ALL` (and of `Ord`) is the order
/// in which a revision is pushed: secrets first, since namespaces and
/// backends refer to them, then namespaces, the backends they own, the
/// routes that point at those backends, and the namespaces' data bindings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Secret,
    Namespace,
    Backend,
    Route,
    DataBinding,
}

/// A `(kind, name)` pair: the identity of a resource in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    pub kind: Kind,
    pub name: String,
}

/// One policy resource of any kind.
///
/// Unboxed although a Route is far larger than a Secret: resources live
/// behind `Arc<Versioned>` in snapshots and are moved by value only while a
/// write or a push is decoded, where a box per resource would cost more.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    Secret(Secret),
    Namespace(Namespace),
    Backend(Backend),
    Route(Route),
    DataBinding(DataBinding),
}

/// A resource together with its content version.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned {
    pub resource: Resource,
    /// Content hash of the encoded resource: equal resources have equal versions.
    pub version: String,
}

/// The name given for a kind is none of Prism's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind `{0}`: expected one of secrets, namespaces, backends, routes, bindings")]
pub struct UnknownKind(pub String);

impl Kind {
    /// Every kind, in push order.
    pub const ALL: [Kind; 5] = [
        Kind::Secret,
        Kind::Namespace,
        Kind::Backend,
        Kind::Route,
        Kind::DataBinding,
    ];

    /// The message name, e.g. `Backend`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Secret => "Secret",
            Kind::Namespace => "Namespace",
            Kind::Backend => "Backend",
            Kind::Route => "Route",
            Kind::DataBinding => "DataBinding",
        }
    }

    /// The collection name used in URLs and policy documents, e.g. `backends`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Secret => "secrets",
            Kind::Namespace => "namespaces",
            Kind::Backend => "backends",
            Kind::Route => "routes",
            Kind::DataBinding => "bindings",
        }
    }

    /// The xDS type URL, e.g. `type.googleapis.com/prism.config.v1.Backend`.
    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Secret => "type.googleapis.com/prism.config.v1.Secret",
            Kind::Namespace => "type.googleapis.com/prism.config.v1.Namespace",
            Kind::Backend => "type.googleapis.com/prism.config.v1.Backend",
            Kind::Route => "type.googleapis.com/prism.config.v1.Route",
            Kind::DataBinding => "type.googleapis.com/prism.config.v1.DataBinding",
        }
    }

    /// The kind a type URL names, if it is one of Prism's.
    pub fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// Whether names of this kind are `namespace/name`.
    pub fn is_namespaced(self) -> bool {
        !matches!(self, Kind::Namespace)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = UnknownKind;

    /// Accepts the singular or plural, any case: `route`, `Routes`, `ns` is not accepted.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "secret" | "secrets" => Ok(Kind::Secret),
            "namespace" | "namespaces" => Ok(Kind::Namespace),
            "backend" | "backends" => Ok(Kind::Backend),
            "route" | "routes" => Ok(Kind::Route),
            "binding" | "bindings" | "databinding" | "databindings" | "data_bindings" => {
                Ok(Kind::DataBinding)
            }
            _ => Err(UnknownKind(s.to_string())),
        }
    }
}

impl ResourceKey {
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        Self {
            kind,
            name: name.into(),
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Secret(_) => Kind::Secret,
            Resource::Namespace(_) => Kind::Namespace,
            Resource::Backend(_) => Kind::Backend,
            Resource::Route(_) => Kind::Route,
            Resource::DataBinding(_) => Kind::DataBinding,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Resource::Secret(r) => &r.name,
            Resource::Namespace(r) => &r.name,
            Resource::Backend(r) => &r.name,
            Resource::Route(r) => &r.name,
            Resource::DataBinding(r) => &r.name,
        }
    }

    pub fn key(&self) -> ResourceKey {
        ResourceKey::new(self.kind(), self.name())
    }

    /// The namespace this resource belongs to (its own name for a Namespace).
    pub fn namespace(&self) -> &str {
        let name = self.name();
        // A byte search, not `split_once('/')`: the control plane asks this
        // of every route on every policy write, and the general char
        // searcher costs several times more on names this short. `/` is
        // ASCII, so the slice ends on a char boundary.
        name.bytes()
            .position(|b| b == b'/')
            .map_or(name, |slash| &name[..slash])
    }

    /// Length of the protobuf encoding of the inner message.
    pub fn encoded_len(&self) -> usize {
        match self {
            Resource::Secret(r) => r.encoded_len(),
            Resource::Namespace(r) => r.encoded_len(),
            Resource::Backend(r) => r.encoded_len(),
            Resource::Route(r) => r.encoded_len(),
            Resource::DataBinding(r) => r.encoded_len(),
        }
    }

    /// Appends the protobuf encoding of the inner message to `buf`, as
    /// [`Resource::encode_to_vec`] gives it, without a buffer of its own.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        // `encode` fails only for a buffer that cannot grow; a `Vec` can.
        let _ = match self {
            Resource::Secret(r) => r.encode(buf),
            Resource::Namespace(r) => r.encode(buf),
            Resource::Backend(r) => r.encode(buf),
            Resource::Route(r) => r.encode(buf),
            Resource::DataBinding(r) => r.encode(buf),
        };
    }

    /// Protobuf encoding of the inner message.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        match self {
            Resource::Secret(r) => r.encode_to_vec(),
            Resource::Namespace(r) => r.encode_to_vec(),
            Resource::Backend(r) => r.encode_to_vec(),
            Resource::Route(r) => r.encode_to_vec(),
            Resource::DataBinding(r) => r.encode_to_vec(),
        }
    }

    /// Decodes the protobuf encoding of a message of `kind`.
    pub fn decode(kind: Kind, bytes: &[u8]) -> Result<Resource, prost::DecodeError> {
        Ok(match kind {
            Kind::Secret => Resource::Secret(Secret::decode(bytes)?),
            Kind::Namespace => Resource::Namespace(Namespace::decode(bytes)?),
            Kind::Backend => Resource::Backend(Backend::decode(bytes)?),
            Kind::Route => Resource::Route(Route::decode(bytes)?),
            Kind::DataBinding => Resource::DataBinding(DataBinding::decode(bytes)?),
        })
    }

    /// Parses the canonical JSON form of a message of `kind`.
    pub fn from_json(kind: Kind, json: serde_json::Value) -> Result<Resource, serde_json::Error> {
        Ok(match kind {
            Kind::Secret => Resource::Secret(serde_json::from_value(json)?),
            Kind::Namespace => Resource::Namespace(serde_json::from_value(json)?),
            Kind::Backend => Resource::Backend(serde_json::from_value(json)?),
            Kind::Route => Resource::Route(serde_json::from_value(json)?),
            Kind::DataBinding => Resource::DataBinding(serde_json::from_value(json)?),
        })
    }

    /// The canonical JSON form. For a Secret this includes the key material:
    /// whatever shows resources to people must show a redacted view instead.
    pub fn to_json(&self) -> serde_json::Value {
        let value = match self {
            Resource::Secret(r) => serde_json::to_value(r),
            Resource::Namespace(r) => serde_json::to_value(r),
            Resource::Backend(r) => serde_json::to_value(r),
            Resource::Route(r) => serde_json::to_value(r),
            Resource::DataBinding(r) => serde_json::to_value(r),
        };
        // Serializing generated messages to a Value cannot fail: they hold no
        // maps with non-string keys and no non-finite floats.
        value.unwrap_or(serde_json::Value::Null)
    }

    /// Pairs the resource with its content version.
    pub fn versioned(self) -> Versioned {
        let version = version_of(&self.encode_to_vec());
        Versioned {
            resource: self,
            version,
        }
    }
}

/// The content version of an encoded resource: FNV-1a 64 in hex. Stable across
/// builds and platforms, so a proxy can present it after a restart. Prost
/// encodes deterministically here because every map is a `BTreeMap`.
pub fn version_of(bytes: &[u8]) -> String {
    let mut hasher = VersionHasher::default();
    hasher.write(bytes);
    hasher.version()
}

/// The hash of [`version_of`], fed piece by piece: a resource assembled from
/// pieces hashed once each (a large Envoy RouteConfiguration from its encoded
/// routes) can be versioned by the hashes of its pieces instead of all its
/// bytes, with the same algorithm.
#[derive(Clone, Copy, Debug)]
pub struct VersionHasher(u64);

impl Default for VersionHasher {
    fn default() -> Self {
        VersionHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl VersionHasher {
    pub fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn finish(self) -> u64 {
        self.0
    }

    /// The hash as a version string, as [`version_of`] writes it.
    pub fn version(self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_names() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_type_url(kind.type_url()), Some(kind));
            assert_eq!(kind.plural().parse::<Kind>(), Ok(kind));
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
            assert_eq!(
                kind.type_url(),
                format!("{TYPE_URL_PREFIX}prism.config.v1.{kind}")
            );
        }
        assert_eq!("Secrets".parse::<Kind>(), Ok(Kind::Secret));
        assert!(Kind::Secret.is_namespaced());
        assert!("widgets".parse::<Kind>().is_err());
    }

    #[test]
    fn a_resource_belongs_to_the_namespace_before_its_first_slash() {
        let route = |name: &str| {
            Resource::Route(crate::Route {
                name: name.into(),
                ..Default::default()
            })
        };
        assert_eq!(route("shop/api").namespace(), "shop");
        assert_eq!(route("shop/api/v2").namespace(), "shop");
        assert_eq!(route("été/api").namespace(), "été");
        assert_eq!(route("shop").namespace(), "shop");
    }

    #[test]
    fn secrets_are_pushed_first() {
        assert_eq!(Kind::ALL[0], Kind::Secret);
        let mut sorted = Kind::ALL;
        sorted.sort();
        assert_eq!(sorted, Kind::ALL, "Ord follows push order");
    }
}
