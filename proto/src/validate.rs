//! Validation: one set of rules, run by the admin API before a write (a 4xx
//! naming the field) and by the proxy before an apply (a NACK with the reason).

use std::collections::BTreeMap;
use std::fmt;

use crate::pb::config::v1::{Backend, LbPolicy, Namespace, Protocol, Route, route_match};
use crate::resource::{Kind, Resource, ResourceKey};
use crate::snapshot::Snapshot;

/// A rule a resource breaks, naming the resource (when known) and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// The resource at fault, when the rule spans resources.
    pub resource: Option<ResourceKey>,
    /// Path of the offending field, e.g. `endpoints[1].address`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(resource) = &self.resource {
            write!(f, "{resource}: ")?;
        }
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            resource: None,
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error, naming `resource` as the one at fault.
    pub fn in_resource(mut self, resource: ResourceKey) -> Self {
        self.resource = Some(resource);
        self
    }

    /// The same error with `prefix.` before the field path.
    pub fn under(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", self.field)
        };
        self
    }
}

type Result<T = ()> = std::result::Result<T, ValidationError>;

/// Checks the rules that concern one resource alone.
pub fn validate_resource(resource: &Resource) -> Result {
    match resource {
        Resource::Namespace(ns) => validate_namespace(ns),
        Resource::Backend(b) => validate_backend(b),
        Resource::Route(r) => validate_route(r),
    }
}

/// Checks every resource and the rules between them: owners and references
/// exist, a host belongs to one namespace, no two routes share a match.
pub fn validate_snapshot(snapshot: &Snapshot) -> Result {
    let mut host_owner: BTreeMap<&str, &str> = BTreeMap::new();
    for entry in snapshot.iter() {
        let resource = &entry.resource;
        validate_resource(resource).map_err(|e| e.in_resource(resource.key()))?;
        if resource.kind().is_namespaced()
            && !snapshot.contains(Kind::Namespace, resource.namespace())
        {
            return Err(ValidationError::new(
                "name",
                format!("namespace `{}` does not exist", resource.namespace()),
            )
            .in_resource(resource.key()));
        }
        if let Resource::Namespace(ns) = resource {
            for (i, host) in ns.hosts.iter().enumerate() {
                if let Some(owner) = host_owner.insert(host, &ns.name) {
                    return Err(ValidationError::new(
                        format!("hosts[{i}]"),
                        format!("host `{host}` already belongs to namespace `{owner}`"),
                    )
                    .in_resource(resource.key()));
                }
            }
        }
    }
    let mut matches: BTreeMap<(&str, &str, &str, &str), &str> = BTreeMap::new();
    for entry in snapshot.of_kind(Kind::Route) {
        let Resource::Route(route) = &entry.resource else {
            continue;
        };
        let key = entry.resource.key();
        let ns_name = entry.resource.namespace();
        let backend = format!("{ns_name}/{}", route.backend);
        if !snapshot.contains(Kind::Backend, &backend) {
            return Err(ValidationError::new(
                "backend",
                format!("backend `{backend}` does not exist"),
            )
            .in_resource(key));
        }
        let Some(m) = &route.r#match else { continue };
        if !m.host.is_empty() {
            let hosts = match snapshot
                .get(&ResourceKey::new(Kind::Namespace, ns_name))
                .map(|v| &v.resource)
            {
                Some(Resource::Namespace(ns)) => ns.hosts.as_slice(),
                _ => &[],
            };
            if !hosts.iter().any(|h| host_matches(h, &m.host)) {
                return Err(ValidationError::new(
                    "match.host",
                    format!(
                        "host `{}` is not one of namespace `{ns_name}`'s hosts",
                        m.host
                    ),
                )
                .in_resource(key));
            }
        }
        if let Some(path) = &m.path {
            let (how, value) = match path {
                route_match::Path::Prefix(p) => ("prefix", p.as_str()),
                route_match::Path::Exact(p) => ("exact", p.as_str()),
            };
            if let Some(other) = matches.insert((ns_name, &m.host, how, value), &route.name) {
                return Err(ValidationError::new(
                    "match",
                    format!("route `{other}` already has the same match"),
                )
                .in_resource(key));
            }
        }
    }
    Ok(())
}

/// Whether the namespace host pattern `pattern` (exact or `*.suffix`) covers `host`.
pub(crate) fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host == pattern
                || host
                    .strip_suffix(suffix)
                    .is_some_and(|p| p.ends_with('.') && p.len() > 1)
        }
        None => pattern == host,
    }
}

fn validate_namespace(ns: &Namespace) -> Result {
    dns_label(&ns.name).map_err(|m| ValidationError::new("name", m))?;
    for (i, host) in ns.hosts.iter().enumerate() {
        hostname(host, true).map_err(|m| ValidationError::new(format!("hosts[{i}]"), m))?;
        if ns.hosts[..i].contains(host) {
            return Err(ValidationError::new(
                format!("hosts[{i}]"),
                format!("host `{host}` is listed twice"),
            ));
        }
    }
    if let Some(d) = &ns.default_timeout {
        positive_duration(d).map_err(|m| ValidationError::new("default_timeout", m))?;
    }
    for key in ns.labels.keys() {
        if key.is_empty() || key.len() > 63 {
            return Err(ValidationError::new(
                "labels",
                "label keys must be 1 to 63 characters",
            ));
        }
    }
    Ok(())
}

fn validate_backend(b: &Backend) -> Result {
    namespaced_name(&b.name)?;
    if Protocol::try_from(b.protocol).is_err() {
        return Err(ValidationError::new(
            "protocol",
            format!("unknown protocol {}", b.protocol),
        ));
    }
    if LbPolicy::try_from(b.lb_policy).is_err() {
        return Err(ValidationError::new(
            "lb_policy",
            format!("unknown load-balancing policy {}", b.lb_policy),
        ));
    }
    if b.endpoints.is_empty() {
        return Err(ValidationError::new(
            "endpoints",
            "at least one endpoint is required",
        ));
    }
    for (i, endpoint) in b.endpoints.iter().enumerate() {
        address(&endpoint.address)
            .map_err(|m| ValidationError::new(format!("endpoints[{i}].address"), m))?;
        if !endpoint.zone.is_empty() {
            dns_label(&endpoint.zone)
                .map_err(|m| ValidationError::new(format!("endpoints[{i}].zone"), m))?;
        }
        if endpoint.weight > 1_000_000 {
            return Err(ValidationError::new(
                format!("endpoints[{i}].weight"),
                "weight must be at most 1000000",
            ));
        }
    }
    if let Some(d) = &b.connect_timeout {
        positive_duration(d).map_err(|m| ValidationError::new("connect_timeout", m))?;
    }
    Ok(())
}

fn validate_route(r: &Route) -> Result {
    namespaced_name(&r.name)?;
    let Some(m) = &r.r#match else {
        return Err(ValidationError::new("match", "is required"));
    };
    if !m.host.is_empty() {
        hostname(&m.host, false).map_err(|msg| ValidationError::new("match.host", msg))?;
    }
    match &m.path {
        None => {
            return Err(ValidationError::new(
                "match",
                "one of `prefix` or `exact` is required",
            ));
        }
        Some(route_match::Path::Prefix(p)) => {
            path(p).map_err(|msg| ValidationError::new("match.prefix", msg))?
        }
        Some(route_match::Path::Exact(p)) => {
            path(p).map_err(|msg| ValidationError::new("match.exact", msg))?
        }
    }
    if r.backend.is_empty() {
        return Err(ValidationError::new("backend", "is required"));
    }
    dns_label(&r.backend).map_err(|m| {
        ValidationError::new(
            "backend",
            format!("{m} (name a backend of the route's own namespace, without `namespace/`)"),
        )
    })?;
    if let Some(d) = &r.timeout {
        positive_duration(d).map_err(|m| ValidationError::new("timeout", m))?;
    }
    Ok(())
}

fn namespaced_name(name: &str) -> Result {
    let Some((ns, local)) = name.split_once('/') else {
        return Err(ValidationError::new(
            "name",
            format!("`{name}` must be `namespace/name`"),
        ));
    };
    dns_label(ns).map_err(|m| ValidationError::new("name", format!("namespace part: {m}")))?;
    dns_label(local).map_err(|m| ValidationError::new("name", format!("name part: {m}")))
}

fn dns_label(s: &str) -> std::result::Result<(), String> {
    if s.is_empty() {
        return Err("is required".into());
    }
    if s.len() > 63 {
        return Err(format!("`{s}` is longer than 63 characters"));
    }
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok_chars || s.starts_with('-') || s.ends_with('-') {
        return Err(format!(
            "`{s}` must be lowercase letters, digits and '-', not starting or ending with '-'"
        ));
    }
    Ok(())
}

fn hostname(host: &str, allow_wildcard: bool) -> std::result::Result<(), String> {
    let bare = match host.strip_prefix("*.") {
        Some(rest) if allow_wildcard => rest,
        Some(_) => {
            return Err(format!(
                "`{host}`: wildcards are allowed only in namespace hosts"
            ));
        }
        None => host,
    };
    if bare.is_empty() || bare.len() > 253 {
        return Err(format!("`{host}` is not a valid host name"));
    }
    for label in bare.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "`{host}` is not a valid lowercase host name (no port, no scheme)"
            ));
        }
    }
    Ok(())
}

fn address(addr: &str) -> std::result::Result<(), String> {
    if addr.is_empty() {
        return Err("is required".into());
    }
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("`{addr}` must be `host:port`"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("`{addr}`: port must be 1 to 65535")),
    }
    hostname(&host.to_ascii_lowercase(), false)
        .map_err(|_| format!("`{addr}`: `{host}` is not an IP address or host name"))
}

fn path(p: &str) -> std::result::Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("`{p}` must start with '/'"));
    }
    if p.bytes()
        .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
    {
        return Err(format!(
            "`{p}` must not contain spaces, control characters, '?' or '#'"
        ));
    }
    Ok(())
}

fn positive_duration(d: &pbjson_types::Duration) -> std::result::Result<(), String> {
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return Err("must be a positive duration".into());
    }
    if d.seconds > 86_400 {
        return Err("must be at most 24h".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::config::v1::{Endpoint, RouteMatch};

    fn ns(name: &str, hosts: &[&str]) -> Resource {
        Resource::Namespace(Namespace {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ..Default::default()
        })
    }

    fn backend(name: &str, addr: &str) -> Resource {
        Resource::Backend(Backend {
            name: name.into(),
            endpoints: vec![Endpoint {
                address: addr.into(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn route(name: &str, host: &str, prefix: &str, backend: &str) -> Resource {
        Resource::Route(Route {
            name: name.into(),
            r#match: Some(RouteMatch {
                host: host.into(),
                path: Some(route_match::Path::Prefix(prefix.into())),
            }),
            backend: backend.into(),
            timeout: None,
        })
    }

    #[test]
    fn a_consistent_policy_passes() {
        let s = Snapshot::from_resources(
            1,
            [
                ns("demo", &["demo.local", "*.demo.test"]),
                backend("demo/web", "127.0.0.1:8081"),
                route("demo/root", "a.demo.test", "/", "web"),
            ],
        );
        assert_eq!(validate_snapshot(&s), Ok(()));
    }

    #[test]
    fn field_errors_name_the_field() {
        let err = validate_resource(&backend("demo/web", "127.0.0.1")).unwrap_err();
        assert_eq!(err.field, "endpoints[0].address");
        let err = validate_resource(&backend("web", "127.0.0.1:80")).unwrap_err();
        assert_eq!(err.field, "name");
        let err = validate_resource(&route("demo/r", "", "nope", "web")).unwrap_err();
        assert_eq!(err.field, "match.prefix");
        let err = validate_resource(&route("demo/r", "Demo.Local", "/", "web")).unwrap_err();
        assert_eq!(err.field, "match.host");
        let err = validate_resource(&ns("demo", &["a.test", "a.test"])).unwrap_err();
        assert_eq!(err.field, "hosts[1]");
    }

    #[test]
    fn dangling_references_are_rejected() {
        let s = Snapshot::from_resources(
            1,
            [
                ns("demo", &["demo.local"]),
                route("demo/root", "", "/", "missing"),
            ],
        );
        let err = validate_snapshot(&s).unwrap_err();
        assert_eq!(err.field, "backend");
        assert_eq!(
            err.resource,
            Some(ResourceKey::new(Kind::Route, "demo/root"))
        );
        assert!(err.message.contains("demo/missing"), "{err}");

        let s = Snapshot::from_resources(1, [backend("ghost/web", "127.0.0.1:80")]);
        assert!(
            validate_snapshot(&s)
                .unwrap_err()
                .message
                .contains("namespace `ghost`")
        );
    }

    #[test]
    fn hosts_belong_to_one_namespace_and_routes_stay_inside_theirs() {
        let s = Snapshot::from_resources(1, [ns("a", &["x.test"]), ns("b", &["x.test"])]);
        assert_eq!(validate_snapshot(&s).unwrap_err().field, "hosts[0]");

        let s = Snapshot::from_resources(
            1,
            [
                ns("a", &["x.test"]),
                backend("a/web", "127.0.0.1:80"),
                route("a/r", "y.test", "/", "web"),
            ],
        );
        assert_eq!(validate_snapshot(&s).unwrap_err().field, "match.host");
    }

    #[test]
    fn wildcard_hosts_cover_one_or_more_labels() {
        assert!(host_matches("*.a.test", "x.a.test"));
        assert!(host_matches("*.a.test", "y.x.a.test"));
        assert!(!host_matches("*.a.test", "a.test"));
        assert!(!host_matches("*.a.test", "xa.test"));
    }

    #[test]
    fn two_routes_with_one_match_are_rejected() {
        let s = Snapshot::from_resources(
            1,
            [
                ns("a", &["x.test"]),
                backend("a/web", "127.0.0.1:80"),
                route("a/r1", "", "/", "web"),
                route("a/r2", "", "/", "web"),
            ],
        );
        assert_eq!(validate_snapshot(&s).unwrap_err().field, "match");
    }
}
