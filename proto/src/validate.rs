//! Validation: one set of rules, run by the admin API before a write (a 4xx
//! naming the field) and by the proxy before an apply (a NACK with the reason).
//!
//! `validate_resource` checks what one resource can check alone; and
//! `validate_snapshot` adds the rules between resources: owners and
//! references exist and are of the right sort, a host belongs to one
//! namespace, no two routes share a match. Messages never quote key material.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use rustls_pki_types::pem::{PemObject, SectionKind};

use crate::defaults;
use crate::pb::config::v1::{
    Backend, BackendLimits, CircuitBreaker, DataBinding, HashPolicy, HeaderMutation, HealthCheck,
    KeyMatch, LbPolicy, Namespace, OutlierDetection, Protocol, RateLimit, Redirect, RetryPolicy,
    Rewrite, Route, RouteMatch, Secret, UpstreamTls, data_binding, hash_policy, health_check,
    key_match, rewrite, route_match, secret,
};
use crate::resource::{Kind, Resource, ResourceKey};
use crate::snapshot::Snapshot;

mod delta;
#[cfg(test)]
mod tests;

pub use delta::{Matches, validate_delta};

/// Largest `credential.value` of a Secret, in bytes.
pub const MAX_CREDENTIAL_BYTES: usize = 16 * 1024;
/// Longest `sqlite.path` of a DataBinding, in bytes.
const MAX_PATH_BYTES: usize = 4096;
/// Longest duration a binding's TTL or retention may be: about ten years.
const MAX_DATA_DURATION_SECONDS: i64 = 10 * 366 * 86_400;
/// Longest regular expression accepted, in bytes.
pub const MAX_REGEX_BYTES: usize = 1024;
/// Largest PEM text accepted in one Secret field, in bytes.
pub const MAX_PEM_BYTES: usize = 256 * 1024;
/// Largest `direct_response.body`, in bytes.
pub const MAX_DIRECT_RESPONSE_BODY_BYTES: usize = 64 * 1024;
/// Most retries one route may ask for.
pub const MAX_RETRIES: u32 = 10;
/// Largest weight of an endpoint or of a weighted backend.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Memory one compiled regular expression may take; patterns that blow up
/// (`(a{100}){100}`) are refused rather than compiled.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Status codes a redirect may answer with (0 means the default, 302).
const REDIRECT_STATUSES: [u32; 6] = [0, 301, 302, 303, 307, 308];

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
/// A check of one value; the caller names the field.
type Check<T = ()> = std::result::Result<T, String>;

/// Names the field of a value check's error.
trait At<T> {
    fn at(self, field: impl Into<String>) -> Result<T>;
}

impl<T> At<T> for Check<T> {
    fn at(self, field: impl Into<String>) -> Result<T> {
        self.map_err(|m| ValidationError::new(field, m))
    }
}

/// Checks the rules that concern one resource alone.
pub fn validate_resource(resource: &Resource) -> Result {
    match resource {
        Resource::Secret(s) => validate_secret(s),
        Resource::Namespace(ns) => validate_namespace(ns),
        Resource::Backend(b) => validate_backend(b),
        Resource::Route(r) => validate_route(r),
        Resource::DataBinding(b) => validate_binding(b),
    }
}

/// Checks every resource and the rules between them: owners and references
/// exist (a Secret reference names a Secret of the right sort), a host belongs
/// to one namespace, a route's host is answered by its own namespace, and no
/// two routes share a match.
pub fn validate_snapshot(snapshot: &Snapshot) -> Result {
    validate_whole(snapshot).map(drop)
}

/// [`validate_snapshot`], giving the route that holds each match.
fn validate_whole(snapshot: &Snapshot) -> Result<HashMap<MatchKey, &str>> {
    let mut hosts = HostOwners::default();
    // Each namespace's KeyValue and PubSub binding, by namespace and API.
    let mut bindings: HashMap<(&str, &str), &str> = HashMap::new();
    for entry in snapshot.iter() {
        let resource = &entry.resource;
        let key = resource.key();
        resource_rules(snapshot, resource)?;
        match resource {
            Resource::Namespace(ns) => {
                for (i, host) in ns.hosts.iter().enumerate() {
                    if let Some(owner) = hosts.insert(host, &ns.name) {
                        return Err(ValidationError::new(
                            format!("hosts[{i}]"),
                            format!("host `{host}` already belongs to namespace `{owner}`"),
                        )
                        .in_resource(key));
                    }
                }
                let refs = References {
                    snapshot,
                    namespace: resource.namespace(),
                };
                refs.secret(&ns.tls_secret, SecretSort::TlsCertificate)
                    .at("tls_secret")
                    .map_err(|e| e.in_resource(key.clone()))?;
                refs.secret(&ns.client_ca_secret, SecretSort::CaBundle)
                    .at("client_ca_secret")
                    .map_err(|e| e.in_resource(key))?;
            }
            Resource::Backend(b) => backend_references(snapshot, resource, b)?,
            Resource::DataBinding(b) => {
                let api = binding_api(b);
                if let Some(other) = bindings.insert((resource.namespace(), api), &b.name) {
                    return Err(ValidationError::new(
                        "name",
                        format!(
                            "namespace `{}` already has a {api} binding, `{other}`",
                            resource.namespace()
                        ),
                    )
                    .in_resource(key));
                }
                if let Some(data_binding::Store::Postgres(pg)) = &b.store {
                    References {
                        snapshot,
                        namespace: resource.namespace(),
                    }
                    .secret(&pg.secret, SecretSort::Credential)
                    .at("postgres.secret")
                    .map_err(|e| e.in_resource(key))?;
                }
            }
            Resource::Secret(_) | Resource::Route(_) => {}
        }
    }
    // Hashed, not ordered: a proxy validates every revision it receives,
    // and ordered inserts of 10,000 keys sharing long prefixes (namespace,
    // host) cost it more than the rest of the validation.
    let mut matches: HashMap<MatchKey, &str> = HashMap::with_capacity(snapshot.len());
    for entry in snapshot.of_kind(Kind::Route) {
        let Resource::Route(route) = &entry.resource else {
            continue;
        };
        route_references(snapshot, &hosts, &entry.resource, route)?;
        let Some(m) = &route.r#match else { continue };
        if let Some(other) =
            matches.insert(MatchKey::of(entry.resource.namespace(), m), &route.name)
        {
            return Err(ValidationError::new(
                "match",
                format!("route `{other}` already has the same match"),
            )
            .in_resource(entry.resource.key()));
        }
    }
    Ok(matches)
}

/// The rules of `resource` alone, and that its namespace exists.
fn resource_rules(snapshot: &Snapshot, resource: &Resource) -> Result {
    validate_resource(resource).map_err(|e| e.in_resource(resource.key()))?;
    if resource.kind().is_namespaced() && !snapshot.contains(Kind::Namespace, resource.namespace())
    {
        return Err(ValidationError::new(
            "name",
            format!("namespace `{}` does not exist", resource.namespace()),
        )
        .in_resource(resource.key()));
    }
    Ok(())
}

/// The Secrets a backend's TLS names exist and are of the right sort.
fn backend_references(snapshot: &Snapshot, resource: &Resource, b: &Backend) -> Result {
    let Some(tls) = &b.tls else {
        return Ok(());
    };
    let refs = References {
        snapshot,
        namespace: resource.namespace(),
    };
    refs.secret(&tls.ca_secret, SecretSort::CaBundle)
        .at("tls.ca_secret")
        .and_then(|()| {
            refs.secret(&tls.client_certificate_secret, SecretSort::TlsCertificate)
                .at("tls.client_certificate_secret")
        })
        .map_err(|e| e.in_resource(resource.key()))
}

/// A route's backends exist and its host is answered by its own namespace.
fn route_references(
    snapshot: &Snapshot,
    hosts: &HostOwners<'_>,
    resource: &Resource,
    route: &Route,
) -> Result {
    let ns_name = resource.namespace();
    let refs = References {
        snapshot,
        namespace: ns_name,
    };
    let in_route = |e: ValidationError| e.in_resource(resource.key());
    if !route.backend.is_empty() {
        refs.backend(&route.backend)
            .at("backend")
            .map_err(in_route)?;
    }
    for (i, weighted) in route.backends.iter().enumerate() {
        refs.backend(&weighted.name)
            .at(format!("backends[{i}].name"))
            .map_err(in_route)?;
    }
    let Some(m) = &route.r#match else {
        return Ok(());
    };
    if m.host.is_empty() {
        return Ok(());
    }
    match hosts.owner(&m.host) {
        Some((owner, _)) if owner == ns_name => Ok(()),
        Some((owner, pattern)) => Err(in_route(ValidationError::new(
            "match.host",
            format!(
                "host `{}` is answered by namespace `{owner}` (its host `{pattern}`), \
                 so this route would never match",
                m.host
            ),
        ))),
        None => Err(in_route(ValidationError::new(
            "match.host",
            format!(
                "host `{}` is not one of namespace `{ns_name}`'s hosts",
                m.host
            ),
        ))),
    }
}

/// Whether the namespace host pattern `pattern` (exact, `*.suffix` or the
/// catch-all `*`) covers `host`.
pub(crate) fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
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

/// The namespace whose hosts hold `host` (lowercase, without a port) in a
/// valid `snapshot`: an exact host first, then the longest wildcard, then
/// `*`, as the proxy's routing picks.
pub fn host_namespace<'s>(snapshot: &'s Snapshot, host: &str) -> Option<&'s str> {
    HostOwners::of(snapshot)
        .owner(host)
        .map(|(namespace, _)| namespace)
}

/// Which namespace answers for which host pattern.
#[derive(Default)]
struct HostOwners<'a> {
    owners: BTreeMap<&'a str, &'a str>,
}

impl<'a> HostOwners<'a> {
    /// Which namespace answers for which host pattern, in `snapshot` (valid,
    /// so each pattern has one owner).
    fn of(snapshot: &'a Snapshot) -> Self {
        let mut hosts = HostOwners::default();
        for entry in snapshot.of_kind(Kind::Namespace) {
            if let Resource::Namespace(ns) = &entry.resource {
                for host in &ns.hosts {
                    hosts.insert(host, &ns.name);
                }
            }
        }
        hosts
    }

    /// Records `pattern` as `namespace`'s; the previous owner if it had one.
    fn insert(&mut self, pattern: &'a str, namespace: &'a str) -> Option<&'a str> {
        self.owners.insert(pattern, namespace)
    }

    /// The namespace a request for `host` reaches, and the pattern that takes
    /// it: exact first, then the longest wildcard, then `*`.
    fn owner(&self, host: &str) -> Option<(&'a str, &'a str)> {
        if let Some((pattern, ns)) = self.owners.get_key_value(host) {
            return Some((ns, pattern));
        }
        self.owners
            .iter()
            .filter(|(pattern, _)| pattern.starts_with("*.") && host_matches(pattern, host))
            .max_by_key(|(pattern, _)| pattern.len())
            .or_else(|| self.owners.get_key_value("*"))
            .map(|(pattern, ns)| (*ns, *pattern))
    }
}

/// Everything that makes two route matches the same, order-insensitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MatchKey {
    namespace: String,
    host: String,
    path: (u8, String),
    methods: Vec<String>,
    headers: Vec<(String, String)>,
    query_params: Vec<(String, String)>,
}

impl MatchKey {
    fn of(namespace: &str, m: &RouteMatch) -> Self {
        let path = match &m.path {
            Some(route_match::Path::Exact(p)) => (0, p.clone()),
            Some(route_match::Path::Prefix(p)) => (1, p.clone()),
            Some(route_match::Path::Regex(p)) => (2, p.clone()),
            None => (3, String::new()),
        };
        let mut methods = m.methods.clone();
        methods.sort();
        let rules = |list: &[KeyMatch], fold_case: bool| {
            let mut rules: Vec<(String, String)> = list
                .iter()
                .map(|k| {
                    let name = if fold_case {
                        k.name.to_ascii_lowercase()
                    } else {
                        k.name.clone()
                    };
                    let rule = match &k.rule {
                        Some(key_match::Rule::Exact(v)) => format!("exact:{v}"),
                        Some(key_match::Rule::Regex(v)) => format!("regex:{v}"),
                        Some(key_match::Rule::Present(_)) => "present".to_string(),
                        Some(key_match::Rule::Absent(_)) => "absent".to_string(),
                        None => String::new(),
                    };
                    (name, rule)
                })
                .collect();
            rules.sort();
            rules.dedup();
            rules
        };
        MatchKey {
            namespace: namespace.to_string(),
            host: m.host.clone(),
            path,
            methods,
            headers: rules(&m.headers, true),
            query_params: rules(&m.query_params, false),
        }
    }
}

/// What a Secret reference must point at.
#[derive(Clone, Copy)]
enum SecretSort {
    TlsCertificate,
    CaBundle,
    Credential,
}

/// Resolves names relative to one namespace.
struct References<'a> {
    snapshot: &'a Snapshot,
    namespace: &'a str,
}

impl References<'_> {
    /// An empty name refers to nothing and passes.
    fn secret(&self, name: &str, want: SecretSort) -> Check {
        if name.is_empty() {
            return Ok(());
        }
        let full = format!("{}/{name}", self.namespace);
        let entry = self
            .snapshot
            .get(&ResourceKey::new(Kind::Secret, full.as_str()))
            .ok_or_else(|| format!("secret `{full}` does not exist"))?;
        let Resource::Secret(secret) = &entry.resource else {
            return Err(format!("secret `{full}` does not exist"));
        };
        match (want, &secret.kind) {
            (SecretSort::TlsCertificate, Some(secret::Kind::TlsCertificate(_)))
            | (SecretSort::CaBundle, Some(secret::Kind::CaBundle(_)))
            | (SecretSort::Credential, Some(secret::Kind::Credential(_))) => Ok(()),
            (SecretSort::TlsCertificate, _) => Err(format!(
                "secret `{full}` holds no `tls_certificate` (a certificate with its key)"
            )),
            (SecretSort::CaBundle, _) => Err(format!("secret `{full}` holds no `ca_bundle`")),
            (SecretSort::Credential, _) => Err(format!("secret `{full}` holds no `credential`")),
        }
    }

    fn backend(&self, name: &str) -> Check {
        let full = format!("{}/{name}", self.namespace);
        if self.snapshot.contains(Kind::Backend, &full) {
            Ok(())
        } else {
            Err(format!("backend `{full}` does not exist"))
        }
    }
}

fn validate_secret(s: &Secret) -> Result {
    namespaced_name(&s.name)?;
    match &s.kind {
        None => Err(ValidationError::new(
            "tls_certificate",
            "one of `tls_certificate`, `ca_bundle` or `credential` is required",
        )),
        Some(secret::Kind::Credential(credential)) => {
            if credential.value.is_empty() {
                return Err(ValidationError::new("credential.value", "is required"));
            }
            if credential.value.len() > MAX_CREDENTIAL_BYTES {
                return Err(ValidationError::new(
                    "credential.value",
                    format!("is larger than {MAX_CREDENTIAL_BYTES} bytes"),
                ));
            }
            Ok(())
        }
        Some(secret::Kind::TlsCertificate(tls)) => {
            let pem =
                pem_sections(&tls.certificate_chain).at("tls_certificate.certificate_chain")?;
            if pem.certificates == 0 {
                return Err(ValidationError::new(
                    "tls_certificate.certificate_chain",
                    "must hold at least one PEM `CERTIFICATE` block",
                ));
            }
            if pem.private_keys > 0 {
                return Err(ValidationError::new(
                    "tls_certificate.certificate_chain",
                    "must not hold a private key; it goes in `private_key`",
                ));
            }
            let key = pem_sections(&tls.private_key).at("tls_certificate.private_key")?;
            if key.private_keys != 1 || key.certificates > 0 {
                return Err(ValidationError::new(
                    "tls_certificate.private_key",
                    "must hold exactly one unencrypted PEM private key (`PRIVATE KEY`, \
                     `RSA PRIVATE KEY` or `EC PRIVATE KEY`) and nothing else",
                ));
            }
            Ok(())
        }
        Some(secret::Kind::CaBundle(ca)) => {
            let pem = pem_sections(&ca.certificates).at("ca_bundle.certificates")?;
            if pem.certificates == 0 {
                return Err(ValidationError::new(
                    "ca_bundle.certificates",
                    "must hold at least one PEM `CERTIFICATE` block",
                ));
            }
            if pem.private_keys > 0 {
                return Err(ValidationError::new(
                    "ca_bundle.certificates",
                    "must not hold a private key",
                ));
            }
            Ok(())
        }
    }
}

/// How many sections of each sort a PEM text holds.
struct PemCounts {
    certificates: usize,
    private_keys: usize,
}

/// Reads the PEM structure of `text` (not the certificates inside: the proxy
/// that loads them checks those, and that key and certificate belong
/// together). The error never quotes the text.
fn pem_sections(text: &str) -> Check<PemCounts> {
    if text.is_empty() {
        return Err("is required".into());
    }
    if text.len() > MAX_PEM_BYTES {
        return Err(format!("is larger than {MAX_PEM_BYTES} bytes"));
    }
    let mut counts = PemCounts {
        certificates: 0,
        private_keys: 0,
    };
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(text.as_bytes()) {
        let (kind, der) =
            section.map_err(|_| "is not valid PEM (a malformed or unterminated block)")?;
        if der.is_empty() {
            return Err("holds an empty PEM block".into());
        }
        match kind {
            SectionKind::Certificate => counts.certificates += 1,
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                counts.private_keys += 1
            }
            _ => {}
        }
    }
    Ok(counts)
}

fn validate_namespace(ns: &Namespace) -> Result {
    dns_label(&ns.name).at("name")?;
    for (i, host) in ns.hosts.iter().enumerate() {
        if host != "*" {
            hostname(host, true).at(format!("hosts[{i}]"))?;
        }
        if ns.hosts[..i].contains(host) {
            return Err(ValidationError::new(
                format!("hosts[{i}]"),
                format!("host `{host}` is listed twice"),
            ));
        }
    }
    if let Some(d) = &ns.default_timeout {
        positive_duration(d).at("default_timeout")?;
    }
    for key in ns.labels.keys() {
        if key.is_empty() || key.len() > 63 {
            return Err(ValidationError::new(
                "labels",
                "label keys must be 1 to 63 characters",
            ));
        }
    }
    if !ns.tls_secret.is_empty() {
        local_name(&ns.tls_secret, "secret").at("tls_secret")?;
    }
    if !ns.client_ca_secret.is_empty() {
        if ns.tls_secret.is_empty() {
            return Err(ValidationError::new(
                "client_ca_secret",
                "needs `tls_secret`: client certificates are asked for over TLS only",
            ));
        }
        local_name(&ns.client_ca_secret, "secret").at("client_ca_secret")?;
    } else if ns.require_client_certificate {
        return Err(ValidationError::new(
            "require_client_certificate",
            "needs `client_ca_secret`, the authorities client certificates are verified against",
        ));
    }
    rate_limits(&ns.rate_limits)
}

fn rate_limits(limits: &[RateLimit]) -> Result {
    for (i, limit) in limits.iter().enumerate() {
        let field = format!("rate_limits[{i}]");
        if limit.requests_per_second == 0 {
            return Err(ValidationError::new(
                format!("{field}.requests_per_second"),
                "is required, at least 1",
            ));
        }
        if limit.burst != 0 && limit.burst < limit.requests_per_second {
            return Err(ValidationError::new(
                format!("{field}.burst"),
                format!(
                    "must be at least requests_per_second ({}), or 0 for that",
                    limit.requests_per_second
                ),
            ));
        }
        if let Some(j) = limits[..i]
            .iter()
            .position(|l| l.per_client_ip == limit.per_client_ip)
        {
            return Err(ValidationError::new(
                format!("{field}.per_client_ip"),
                format!(
                    "rate_limits[{j}] is also {}; give at most one shared and one \
                     per-client-IP limit",
                    if limit.per_client_ip {
                        "per client IP"
                    } else {
                        "shared"
                    }
                ),
            ));
        }
    }
    Ok(())
}

fn validate_backend(b: &Backend) -> Result {
    namespaced_name(&b.name)?;
    let Ok(protocol) = Protocol::try_from(b.protocol) else {
        return Err(ValidationError::new(
            "protocol",
            format!("unknown protocol {}", b.protocol),
        ));
    };
    let Ok(lb_policy) = LbPolicy::try_from(b.lb_policy) else {
        return Err(ValidationError::new(
            "lb_policy",
            format!("unknown load-balancing policy {}", b.lb_policy),
        ));
    };
    if b.endpoints.is_empty() {
        return Err(ValidationError::new(
            "endpoints",
            "at least one endpoint is required",
        ));
    }
    for (i, endpoint) in b.endpoints.iter().enumerate() {
        address(&endpoint.address).at(format!("endpoints[{i}].address"))?;
        if !endpoint.zone.is_empty() {
            dns_label(&endpoint.zone).at(format!("endpoints[{i}].zone"))?;
        }
        if endpoint.weight > MAX_WEIGHT {
            return Err(ValidationError::new(
                format!("endpoints[{i}].weight"),
                format!("weight must be at most {MAX_WEIGHT}"),
            ));
        }
    }
    if let Some(d) = &b.connect_timeout {
        positive_duration(d).at("connect_timeout")?;
    }
    let hashing = matches!(lb_policy, LbPolicy::RingHash | LbPolicy::Maglev);
    match (&b.hash_policy, hashing) {
        (None, true) => {
            return Err(ValidationError::new(
                "hash_policy",
                "is required with lb_policy RING_HASH or MAGLEV",
            ));
        }
        (Some(_), false) => {
            return Err(ValidationError::new(
                "hash_policy",
                "is allowed only with lb_policy RING_HASH or MAGLEV",
            ));
        }
        (Some(policy), true) => hash(policy).map_err(|e| e.under("hash_policy"))?,
        (None, false) => {}
    }
    if let Some(zone_aware) = &b.zone_aware {
        percent(zone_aware.min_healthy_percent).at("zone_aware.min_healthy_percent")?;
    }
    if let Some(check) = &b.health_check {
        health(check, protocol).map_err(|e| e.under("health_check"))?;
    }
    if let Some(outlier) = &b.outlier_detection {
        outlier_detection(outlier).map_err(|e| e.under("outlier_detection"))?;
    }
    if let Some(breaker) = &b.circuit_breaker {
        circuit_breaker(breaker).map_err(|e| e.under("circuit_breaker"))?;
    }
    if let Some(limits) = &b.limits {
        backend_limits(limits).map_err(|e| e.under("limits"))?;
    }
    if let Some(tls) = &b.tls {
        upstream_tls(tls).map_err(|e| e.under("tls"))?;
    }
    Ok(())
}

fn hash(policy: &HashPolicy) -> Result {
    match &policy.key {
        None => Err(ValidationError::new(
            "",
            "one of `header`, `cookie` or `client_ip` is required",
        )),
        Some(hash_policy::Key::Header(name)) => header_name(name).at("header"),
        Some(hash_policy::Key::Cookie(name)) => token(name).at("cookie"),
        Some(hash_policy::Key::ClientIp(set)) => {
            if *set {
                Ok(())
            } else {
                Err(ValidationError::new("client_ip", "must be true when given"))
            }
        }
    }
}

fn health(check: &HealthCheck, protocol: Protocol) -> Result {
    if let Some(d) = &check.interval {
        positive_duration(d).at("interval")?;
    }
    if let Some(d) = &check.timeout {
        positive_duration(d).at("timeout")?;
    }
    match &check.check {
        None => Err(ValidationError::new(
            "http",
            "one of `http` or `grpc` is required",
        )),
        Some(health_check::Check::Http(http)) => {
            path(&http.path).at("http.path")?;
            if !http.host.is_empty() {
                authority(&http.host).at("http.host")?;
            }
            Ok(())
        }
        Some(health_check::Check::Grpc(grpc)) => {
            if !matches!(protocol, Protocol::Grpc | Protocol::Http2) {
                return Err(ValidationError::new(
                    "grpc",
                    "gRPC health checks need protocol GRPC or HTTP2",
                ));
            }
            printable(&grpc.service_name).at("grpc.service_name")
        }
    }
}

fn outlier_detection(o: &OutlierDetection) -> Result {
    if let Some(d) = &o.base_ejection_time {
        positive_duration(d).at("base_ejection_time")?;
    }
    if let Some(d) = &o.max_ejection_time {
        positive_duration(d).at("max_ejection_time")?;
    }
    percent(o.max_ejection_percent).at("max_ejection_percent")?;
    let base = defaults::duration_or(
        o.base_ejection_time.as_ref(),
        defaults::outlier::BASE_EJECTION_TIME,
    );
    let max = defaults::duration_or(
        o.max_ejection_time.as_ref(),
        defaults::outlier::MAX_EJECTION_TIME,
    );
    if max < base {
        return Err(ValidationError::new(
            "max_ejection_time",
            format!("must be at least base_ejection_time ({base:?})"),
        ));
    }
    Ok(())
}

fn circuit_breaker(c: &CircuitBreaker) -> Result {
    if let Some(d) = &c.open_timeout {
        positive_duration(d).at("open_timeout")?;
    }
    Ok(())
}

fn backend_limits(l: &BackendLimits) -> Result {
    if let Some(d) = &l.idle_timeout {
        positive_duration(d).at("idle_timeout")?;
    }
    Ok(())
}

fn upstream_tls(tls: &UpstreamTls) -> Result {
    if !tls.ca_secret.is_empty() {
        local_name(&tls.ca_secret, "secret").at("ca_secret")?;
    }
    if !tls.client_certificate_secret.is_empty() {
        local_name(&tls.client_certificate_secret, "secret").at("client_certificate_secret")?;
    }
    if !tls.sni.is_empty() {
        hostname(&tls.sni, false).at("sni")?;
    }
    Ok(())
}

fn validate_route(r: &Route) -> Result {
    namespaced_name(&r.name)?;
    let Some(m) = &r.r#match else {
        return Err(ValidationError::new("match", "is required"));
    };
    route_match(m).map_err(|e| e.under("match"))?;
    let forwards = route_action(r)?;
    if let Some(rewrite) = &r.rewrite {
        if !forwards {
            return Err(ValidationError::new(
                "rewrite",
                "applies only to routes that forward (`backend` or `backends`)",
            ));
        }
        route_rewrite(rewrite, m).map_err(|e| e.under("rewrite"))?;
    }
    if let Some(mutation) = &r.request_headers {
        header_mutation(mutation).map_err(|e| e.under("request_headers"))?;
    }
    if let Some(mutation) = &r.response_headers {
        header_mutation(mutation).map_err(|e| e.under("response_headers"))?;
    }
    if let Some(d) = &r.timeout {
        positive_duration(d).at("timeout")?;
    }
    if let Some(d) = &r.idle_timeout {
        positive_duration(d).at("idle_timeout")?;
    }
    if let Some(retry) = &r.retry {
        if !forwards {
            return Err(ValidationError::new(
                "retry",
                "applies only to routes that forward (`backend` or `backends`)",
            ));
        }
        retry_policy(retry).map_err(|e| e.under("retry"))?;
    }
    rate_limits(&r.rate_limits)
}

fn route_match(m: &RouteMatch) -> Result {
    if m.host == "*" {
        return Err(ValidationError::new(
            "host",
            "`*` is allowed only as a namespace host; leave `match.host` empty to match \
             every host of the namespace",
        ));
    }
    if !m.host.is_empty() {
        hostname(&m.host, false).at("host")?;
    }
    match &m.path {
        None => {
            return Err(ValidationError::new(
                "",
                "one of `prefix`, `exact` or `regex` is required",
            ));
        }
        Some(route_match::Path::Prefix(p)) => path(p).at("prefix")?,
        Some(route_match::Path::Exact(p)) => path(p).at("exact")?,
        Some(route_match::Path::Regex(p)) => {
            regex(p).at("regex")?;
        }
    }
    for (i, method) in m.methods.iter().enumerate() {
        http_method(method).at(format!("methods[{i}]"))?;
        if m.methods[..i].contains(method) {
            return Err(ValidationError::new(
                format!("methods[{i}]"),
                format!("`{method}` is listed twice"),
            ));
        }
    }
    for (i, header) in m.headers.iter().enumerate() {
        key_match(header, true).map_err(|e| e.under(&format!("headers[{i}]")))?;
    }
    for (i, param) in m.query_params.iter().enumerate() {
        key_match(param, false).map_err(|e| e.under(&format!("query_params[{i}]")))?;
    }
    Ok(())
}

fn key_match(k: &KeyMatch, header: bool) -> Result {
    if header {
        header_name(&k.name).at("name")?;
    } else {
        query_name(&k.name).at("name")?;
    }
    match &k.rule {
        None => Err(ValidationError::new(
            "",
            "one of `exact`, `regex`, `present` or `absent` is required",
        )),
        Some(key_match::Rule::Exact(v)) if header => header_value(v).at("exact"),
        Some(key_match::Rule::Exact(v)) => printable(v).at("exact"),
        Some(key_match::Rule::Regex(p)) => regex(p).map(drop).at("regex"),
        Some(key_match::Rule::Present(set)) => must_be_true(*set).at("present"),
        Some(key_match::Rule::Absent(set)) => must_be_true(*set).at("absent"),
    }
}

/// Checks that exactly one action is set; whether the route forwards.
fn route_action(r: &Route) -> Result<bool> {
    let set: Vec<&str> = [
        ("backend", !r.backend.is_empty()),
        ("backends", !r.backends.is_empty()),
        ("redirect", r.redirect.is_some()),
        ("direct_response", r.direct_response.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    match set.as_slice() {
        [] => {
            return Err(ValidationError::new(
                "backend",
                "one of `backend`, `backends`, `redirect` or `direct_response` is required",
            ));
        }
        [_] => {}
        [first, second, ..] => {
            return Err(ValidationError::new(
                *second,
                format!(
                    "only one of `backend`, `backends`, `redirect` or `direct_response` \
                     may be set, and `{first}` is"
                ),
            ));
        }
    }
    if !r.backend.is_empty() {
        local_name(&r.backend, "backend").at("backend")?;
    }
    for (i, weighted) in r.backends.iter().enumerate() {
        local_name(&weighted.name, "backend").at(format!("backends[{i}].name"))?;
        if r.backends[..i].iter().any(|w| w.name == weighted.name) {
            return Err(ValidationError::new(
                format!("backends[{i}].name"),
                format!("backend `{}` is listed twice", weighted.name),
            ));
        }
        if weighted.weight == 0 || weighted.weight > MAX_WEIGHT {
            return Err(ValidationError::new(
                format!("backends[{i}].weight"),
                format!("must be 1 to {MAX_WEIGHT}"),
            ));
        }
    }
    if let Some(redirect) = &r.redirect {
        route_redirect(redirect).map_err(|e| e.under("redirect"))?;
    }
    if let Some(direct) = &r.direct_response {
        if !(200..=599).contains(&direct.status) {
            return Err(ValidationError::new(
                "direct_response.status",
                "must be 200 to 599",
            ));
        }
        if direct.body.len() > MAX_DIRECT_RESPONSE_BODY_BYTES {
            return Err(ValidationError::new(
                "direct_response.body",
                format!("is larger than {MAX_DIRECT_RESPONSE_BODY_BYTES} bytes"),
            ));
        }
    }
    Ok(!r.backend.is_empty() || !r.backends.is_empty())
}

fn route_redirect(r: &Redirect) -> Result {
    if !matches!(r.scheme.as_str(), "" | "http" | "https") {
        return Err(ValidationError::new(
            "scheme",
            format!("`{}` must be `http` or `https`", r.scheme),
        ));
    }
    if !r.host.is_empty() {
        hostname(&r.host, false).at("host")?;
    }
    if r.port > u32::from(u16::MAX) {
        return Err(ValidationError::new("port", "must be 1 to 65535"));
    }
    if !r.path.is_empty() {
        path(&r.path).at("path")?;
    }
    if !REDIRECT_STATUSES.contains(&r.status) {
        return Err(ValidationError::new(
            "status",
            "must be 301, 302, 303, 307 or 308",
        ));
    }
    Ok(())
}

fn route_rewrite(rewrite: &Rewrite, m: &RouteMatch) -> Result {
    match &rewrite.path {
        None => {}
        Some(rewrite::Path::Prefix(p)) => {
            if !matches!(m.path, Some(route_match::Path::Prefix(_))) {
                return Err(ValidationError::new(
                    "prefix",
                    "is allowed only with `match.prefix`",
                ));
            }
            path(p).at("prefix")?;
        }
        Some(rewrite::Path::Regex(r)) => {
            let compiled = regex(&r.pattern).at("regex.pattern")?;
            substitution(&r.substitution, compiled.captures_len() - 1).at("regex.substitution")?;
        }
    }
    if !rewrite.host.is_empty() {
        authority(&rewrite.host).at("host")?;
    }
    Ok(())
}

fn header_mutation(m: &HeaderMutation) -> Result {
    for (list, values) in [("add", &m.add), ("set", &m.set)] {
        for (i, header) in values.iter().enumerate() {
            mutable_header(&header.name).at(format!("{list}[{i}].name"))?;
            header_value(&header.value).at(format!("{list}[{i}].value"))?;
        }
    }
    for (i, name) in m.remove.iter().enumerate() {
        mutable_header(name).at(format!("remove[{i}]"))?;
    }
    Ok(())
}

fn retry_policy(r: &RetryPolicy) -> Result {
    if r.num_retries > MAX_RETRIES {
        return Err(ValidationError::new(
            "num_retries",
            format!("must be at most {MAX_RETRIES}"),
        ));
    }
    for (i, on) in r.retry_on.iter().enumerate() {
        if !defaults::retry::RETRY_ON_VALUES.contains(&on.as_str()) {
            return Err(ValidationError::new(
                format!("retry_on[{i}]"),
                format!(
                    "`{on}` is not one of {}",
                    defaults::retry::RETRY_ON_VALUES.join(", ")
                ),
            ));
        }
        if r.retry_on[..i].contains(on) {
            return Err(ValidationError::new(
                format!("retry_on[{i}]"),
                format!("`{on}` is listed twice"),
            ));
        }
    }
    for (field, value) in [
        ("per_try_timeout", &r.per_try_timeout),
        ("base_interval", &r.base_interval),
        ("max_interval", &r.max_interval),
    ] {
        if let Some(d) = value {
            positive_duration(d).at(field)?;
        }
    }
    let base = defaults::retry_base_interval(r);
    if defaults::retry_max_interval(r) < base {
        return Err(ValidationError::new(
            "max_interval",
            format!("must be at least base_interval ({base:?})"),
        ));
    }
    percent(r.budget_percent).at("budget_percent")
}

fn namespaced_name(name: &str) -> Result {
    let Some((ns, local)) = name.split_once('/') else {
        return Err(ValidationError::new(
            "name",
            format!("`{name}` must be `namespace/name`"),
        ));
    };
    dns_label(ns)
        .map_err(|m| format!("namespace part: {m}"))
        .at("name")?;
    dns_label(local)
        .map_err(|m| format!("name part: {m}"))
        .at("name")
}

/// The name of a `sort` (backend, secret) of the referring resource's own
/// namespace, given without `namespace/`.
fn local_name(name: &str, sort: &str) -> Check {
    dns_label(name)
        .map_err(|m| format!("{m} (name a {sort} of the same namespace, without `namespace/`)"))
}

fn dns_label(s: &str) -> Check {
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

fn hostname(host: &str, allow_wildcard: bool) -> Check {
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

/// A host name, optionally with `:port`: what a Host header carries.
fn authority(s: &str) -> Check {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(format!("`{s}`: port must be 1 to 65535")),
            }
            hostname(host, false)
        }
        None => hostname(s, false),
    }
}

fn address(addr: &str) -> Check {
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

fn path(p: &str) -> Check {
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

/// Compiles `pattern` (whole-string semantics are the caller's), bounded in
/// length and in compiled size.
fn regex(pattern: &str) -> Check<regex::Regex> {
    if pattern.is_empty() {
        return Err("is required".into());
    }
    if pattern.len() > MAX_REGEX_BYTES {
        return Err(format!("is longer than {MAX_REGEX_BYTES} bytes"));
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            let reason = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            format!("`{pattern}` is not a valid regular expression: {reason}")
        })
}

/// A regex substitution: `\N` groups must exist in the pattern.
fn substitution(s: &str, groups: usize) -> Check {
    if s.bytes().any(|b| b.is_ascii_control()) {
        return Err("must not contain control characters".into());
    }
    let bytes = s.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'\\'
            && let Some(d) = bytes.get(i + 1).filter(|d| d.is_ascii_digit())
        {
            let group = usize::from(d - b'0');
            if group > groups {
                return Err(format!(
                    "`\\{group}` names a group the pattern does not have ({groups})"
                ));
            }
        }
    }
    Ok(())
}

/// An HTTP method: a token, upper case (methods are case-sensitive, and
/// `get` is not `GET`).
fn http_method(m: &str) -> Check {
    if http::Method::from_bytes(m.as_bytes()).is_err() || m.is_empty() {
        return Err(format!("`{m}` is not an HTTP method token"));
    }
    if m.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!(
            "`{m}`: methods are case-sensitive; write `{}`",
            m.to_ascii_uppercase()
        ));
    }
    Ok(())
}

fn header_name(name: &str) -> Check {
    if name.is_empty() {
        return Err("is required".into());
    }
    if name.starts_with(':') {
        return Err(format!(
            "`{name}`: pseudo-headers cannot be named here (use `match.host`, `match.methods`)"
        ));
    }
    http::HeaderName::from_bytes(name.as_bytes())
        .map(drop)
        .map_err(|_| format!("`{name}` is not a valid header name"))
}

/// A header a route may add, set or remove: not a pseudo-header and not
/// `host` (set the host with `rewrite.host`).
fn mutable_header(name: &str) -> Check {
    header_name(name)?;
    if name.eq_ignore_ascii_case("host") {
        return Err("`host` cannot be changed here; use `rewrite.host`".into());
    }
    Ok(())
}

fn header_value(value: &str) -> Check {
    http::HeaderValue::from_str(value)
        .map(drop)
        .map_err(|_| "is not a valid header value (visible ASCII, no line breaks)".into())
}

/// A query parameter name as it appears in the query string.
fn query_name(name: &str) -> Check {
    if name.is_empty() {
        return Err("is required".into());
    }
    printable(name)?;
    if name.contains(['&', '=', '#', ' ']) {
        return Err(format!("`{name}` must not contain '&', '=', '#' or spaces"));
    }
    Ok(())
}

/// A cookie name: an HTTP token.
fn token(name: &str) -> Check {
    if name.is_empty() {
        return Err("is required".into());
    }
    http::HeaderName::from_bytes(name.as_bytes())
        .map(drop)
        .map_err(|_| format!("`{name}` is not a valid token"))
}

fn printable(s: &str) -> Check {
    if s.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

fn must_be_true(set: bool) -> Check {
    if set {
        Ok(())
    } else {
        Err("must be true when given".into())
    }
}

fn percent(p: u32) -> Check {
    if p > 100 {
        return Err(format!("{p} is more than 100"));
    }
    Ok(())
}

fn positive_duration(d: &pbjson_types::Duration) -> Check {
    duration_up_to(d, 86_400, "24h")
}

/// A positive duration of at most `max_seconds`, which `max` spells.
fn duration_up_to(d: &pbjson_types::Duration, max_seconds: i64, max: &str) -> Check {
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return Err("must be a positive duration".into());
    }
    if d.seconds > max_seconds {
        return Err(format!("must be at most {max}"));
    }
    Ok(())
}

/// The API a binding serves, as messages name it.
fn binding_api(b: &DataBinding) -> &'static str {
    match b.store {
        Some(data_binding::Store::Sqlite(_) | data_binding::Store::Postgres(_)) => "KeyValue",
        _ => "PubSub",
    }
}

fn validate_binding(b: &DataBinding) -> Result {
    use data_binding::Store;

    namespaced_name(&b.name)?;
    let Some(store) = &b.store else {
        return Err(ValidationError::new(
            "sqlite",
            "one of `sqlite`, `postgres` (KeyValue) or `memory`, `nats`, `kafka` (PubSub) is required",
        ));
    };
    match store {
        Store::Sqlite(sqlite) => {
            if sqlite.path.is_empty() {
                return Err(ValidationError::new("sqlite.path", "is required"));
            }
            if sqlite.path.len() > MAX_PATH_BYTES || sqlite.path.contains('\0') {
                return Err(ValidationError::new(
                    "sqlite.path",
                    format!("must be a file path of at most {MAX_PATH_BYTES} bytes"),
                ));
            }
        }
        Store::Postgres(pg) => local_name(&pg.secret, "secret").at("postgres.secret")?,
        Store::Memory(_) => {}
        Store::Nats(nats) => {
            let rest = ["nats://", "tls://"]
                .iter()
                .find_map(|scheme| nats.url.strip_prefix(scheme))
                .ok_or_else(|| "must be a `nats://host:port` or `tls://host:port` URL".to_string())
                .at("nats.url")?;
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                return Err(ValidationError::new("nats.url", "must name a server"));
            }
            let stream_ok = nats.stream.len() <= 64
                && nats
                    .stream
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
            if !stream_ok {
                return Err(ValidationError::new(
                    "nats.stream",
                    "must be at most 64 letters, digits, '-' and '_'",
                ));
            }
        }
        Store::Kafka(kafka) => {
            if kafka.brokers.is_empty() {
                return Err(ValidationError::new("kafka.brokers", "is required"));
            }
            for broker in kafka.brokers.split(',') {
                let port = broker
                    .trim()
                    .rsplit_once(':')
                    .map(|(host, port)| (host, port.parse::<u16>()));
                if !matches!(port, Some((host, Ok(port))) if !host.is_empty() && port > 0) {
                    return Err(ValidationError::new(
                        "kafka.brokers",
                        format!("`{broker}` is not `host:port`"),
                    ));
                }
            }
            if kafka.partitions > 10_000 {
                return Err(ValidationError::new(
                    "kafka.partitions",
                    "must be at most 10000",
                ));
            }
        }
    }
    let key_value = binding_api(b) == "KeyValue";
    if b.pool_size > defaults::binding::MAX_POOL_SIZE {
        return Err(ValidationError::new(
            "pool_size",
            format!("must be at most {}", defaults::binding::MAX_POOL_SIZE),
        ));
    }
    if let Some(d) = &b.connect_timeout {
        duration_up_to(d, 60, "60s").at("connect_timeout")?;
    }
    if b.max_value_bytes > defaults::binding::MAX_VALUE_BYTES_LIMIT {
        return Err(ValidationError::new(
            "max_value_bytes",
            format!(
                "must be at most {} bytes",
                defaults::binding::MAX_VALUE_BYTES_LIMIT
            ),
        ));
    }
    let only = |field: &str, set: bool, for_key_value: bool| -> Result {
        if set && for_key_value != key_value {
            let api = if for_key_value {
                "KeyValue stores"
            } else {
                "PubSub buses"
            };
            return Err(ValidationError::new(
                field,
                format!("applies to {api} only"),
            ));
        }
        Ok(())
    };
    only("default_ttl", b.default_ttl.is_some(), true)?;
    only("move_items", b.move_items, true)?;
    only("retention", b.retention.is_some(), false)?;
    only("ack_wait", b.ack_wait.is_some(), false)?;
    for (field, d) in [("default_ttl", &b.default_ttl), ("retention", &b.retention)] {
        if let Some(d) = d {
            duration_up_to(d, MAX_DATA_DURATION_SECONDS, "10 years").at(field)?;
        }
    }
    if let Some(d) = &b.ack_wait {
        duration_up_to(d, 43_200, "12h").at("ack_wait")?;
    }
    for (i, ns) in b.allow_namespaces.iter().enumerate() {
        if ns != "*" {
            dns_label(ns).at(format!("allow_namespaces[{i}]"))?;
        }
    }
    for (i, identity) in b.allow_identities.iter().enumerate() {
        identity_pattern(identity).at(format!("allow_identities[{i}]"))?;
    }
    Ok(())
}

/// The longest identity a binding may name, in bytes.
const MAX_IDENTITY_BYTES: usize = 2048;

/// A URI (`scheme:rest`), or a prefix of one ending in `*`: what a
/// certificate's URI subject alt name is matched against.
fn identity_pattern(pattern: &str) -> Check {
    let uri = pattern.strip_suffix('*').unwrap_or(pattern);
    let scheme_ok = uri.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    if !scheme_ok {
        return Err(format!(
            "`{pattern}` must be a URI such as `spiffe://example.org/ns/web/sa/api`, or a prefix of one ending in `*`"
        ));
    }
    if pattern.len() > MAX_IDENTITY_BYTES
        || uri.contains('*')
        || uri.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "`{pattern}` must be at most {MAX_IDENTITY_BYTES} bytes without spaces, with `*` at the end only"
        ));
    }
    Ok(())
}
