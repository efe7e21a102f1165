//! The runtime: everything the request path reads, compiled from one accepted
//! [`Snapshot`] and published through one `ArcSwap<Runtime>`.
//!
//! Compiling never touches the live runtime: a complete new one is built off
//! the request path, reusing the state (round-robin position) of every backend
//! whose version did not change, and then stored in one step.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::Authority;
pub use prism_proto::defaults::{
    CONNECT_TIMEOUT as DEFAULT_CONNECT_TIMEOUT, REQUEST_TIMEOUT as DEFAULT_REQUEST_TIMEOUT,
};
use prism_proto::pb::config::v1::route_match::Path;
use prism_proto::{Kind, Protocol, Resource, Route, Snapshot};

/// A compiled, immutable view of the policy. Requests `load_full()` it once and
/// keep that view until they finish, so none sees a half-applied config.
#[derive(Debug, Default)]
pub struct Runtime {
    /// Revision of the snapshot this runtime was compiled from; `None` until
    /// the first configuration is accepted.
    revision: Option<u64>,
    /// Exact hosts, lowercase, and the catch-all `*`.
    hosts: HashMap<String, Arc<RouteTable>>,
    /// Wildcard hosts as `(".suffix", table)`, longest suffix first.
    wildcards: Vec<(String, Arc<RouteTable>)>,
    /// Backends by full name (`namespace/name`).
    backends: HashMap<String, Arc<Backend>>,
    /// Connect timeout per endpoint authority (the smallest, if several
    /// backends share an endpoint), read by the shared upstream connector.
    connect_timeouts: HashMap<String, Duration>,
}

/// The routes that answer for one host.
#[derive(Debug, Default)]
struct RouteTable {
    exact: HashMap<String, Arc<RouteTarget>>,
    /// Prefix routes, longest prefix first.
    prefixes: Vec<(String, Arc<RouteTarget>)>,
}

/// A route while compiling: the host and path it matches, and its target.
struct Entry<'a> {
    host: &'a str,
    path: PathMatch<'a>,
    target: Arc<RouteTarget>,
}

enum PathMatch<'a> {
    Exact(&'a str),
    Prefix(&'a str),
}

/// Where a matched request goes and how long it may take.
#[derive(Debug)]
pub struct RouteTarget {
    /// Full route name, `namespace/name`.
    pub route: String,
    pub backend: Arc<Backend>,
    /// Whole-request timeout.
    pub timeout: Duration,
}

/// A compiled backend with its per-backend state, kept across applies while the
/// backend's version does not change.
#[derive(Debug)]
pub struct Backend {
    /// Full name, `namespace/name`.
    pub name: String,
    /// Content version of the backend resource.
    pub version: String,
    /// Protocol spoken to the endpoints (HTTP/2 for `HTTP2` and `GRPC`).
    pub protocol: Protocol,
    pub endpoints: Vec<Authority>,
    pub connect_timeout: Duration,
    next: AtomicUsize,
}

/// Why a snapshot could not be compiled (it passed validation, so this is
/// about things only the proxy checks, such as address syntax for a URI).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("Backend {backend}: endpoints[{index}].address: `{address}` is not a valid authority")]
    Endpoint {
        backend: String,
        index: usize,
        address: String,
    },
    #[error(
        "Backend {backend}: endpoints[{index}].address: `{address}` is this proxy's own listener; requests would loop"
    )]
    Loop {
        backend: String,
        index: usize,
        address: String,
    },
    #[error("Route {route}: backend: backend `{backend}` does not exist")]
    MissingBackend { route: String, backend: String },
    /// A field this proxy cannot honour yet. Refusing the snapshot (a NACK
    /// the fleet view shows) beats serving it wrongly: a route that ignored
    /// its methods would take requests it must not, one that ignored its
    /// redirect would forward them.
    #[error("{resource}: {field}: not supported by this proxy yet")]
    Unsupported {
        resource: String,
        field: &'static str,
    },
}

/// The addresses at which this proxy accepts client traffic.
#[derive(Clone, Debug, Default)]
pub struct OwnAddresses {
    listeners: Vec<SocketAddr>,
    advertised: String,
}

impl OwnAddresses {
    /// The proxy listening on `listener` and advertised as `advertised`.
    pub fn new(listener: SocketAddr, advertised: &str) -> Self {
        Self {
            listeners: vec![listener],
            advertised: advertised.to_ascii_lowercase(),
        }
    }

    /// Whether `endpoint` reaches this proxy's own listener.
    pub fn contains(&self, endpoint: &Authority) -> bool {
        if !self.advertised.is_empty() && endpoint.as_str().eq_ignore_ascii_case(&self.advertised) {
            return true;
        }
        let Some(port) = endpoint.port_u16() else {
            return false;
        };
        let host = endpoint
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) if host.eq_ignore_ascii_case("localhost") => Some(IpAddr::from([127, 0, 0, 1])),
            Err(_) => None,
        };
        let Some(ip) = ip else {
            return false;
        };
        self.listeners.iter().any(|own| {
            own.port() == port
                && (own.ip() == ip
                    || (own.ip().is_loopback() && ip.is_loopback())
                    || (own.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified())))
        })
    }
}

impl Runtime {
    /// The runtime before any configuration is accepted: it matches nothing.
    pub fn unconfigured() -> Self {
        Self::default()
    }

    /// Compiles `snapshot`, reusing unchanged backends of `previous`.
    pub fn compile(snapshot: &Snapshot, previous: &Runtime) -> Result<Runtime, CompileError> {
        Self::compile_for(snapshot, previous, &OwnAddresses::default())
    }

    /// Compiles `snapshot` for a proxy listening at `own`: a backend endpoint
    /// that is the proxy itself is refused, since every request to it would
    /// loop back in. The control plane cannot see this; only the proxy can.
    pub fn compile_for(
        snapshot: &Snapshot,
        previous: &Runtime,
        own: &OwnAddresses,
    ) -> Result<Runtime, CompileError> {
        let mut backends = HashMap::new();
        let mut connect_timeouts: HashMap<String, Duration> = HashMap::new();
        for entry in snapshot.of_kind(Kind::Backend) {
            let Resource::Backend(spec) = &entry.resource else {
                continue;
            };
            if spec.tls.is_some() {
                return Err(CompileError::Unsupported {
                    resource: entry.resource.key().to_string(),
                    field: "tls",
                });
            }
            let backend = match previous.backends.get(&spec.name) {
                Some(old) if old.version == entry.version => Arc::clone(old),
                _ => Arc::new(Backend::compile(spec, &entry.version, own)?),
            };
            for endpoint in &backend.endpoints {
                connect_timeouts
                    .entry(endpoint.as_str().to_ascii_lowercase())
                    .and_modify(|t| *t = (*t).min(backend.connect_timeout))
                    .or_insert(backend.connect_timeout);
            }
            backends.insert(spec.name.clone(), backend);
        }

        // Routes grouped by namespace, each split into namespace-wide ones
        // (no host) and those for one host.
        let mut by_namespace: HashMap<&str, Vec<Entry<'_>>> = HashMap::new();
        for entry in snapshot.of_kind(Kind::Route) {
            let Resource::Route(route) = &entry.resource else {
                continue;
            };
            if let Some(field) = unsupported(route) {
                return Err(CompileError::Unsupported {
                    resource: entry.resource.key().to_string(),
                    field,
                });
            }
            let namespace = entry.resource.namespace();
            let backend_name = format!("{namespace}/{}", route.backend);
            let Some(backend) = backends.get(&backend_name) else {
                return Err(CompileError::MissingBackend {
                    route: route.name.clone(),
                    backend: backend_name,
                });
            };
            let Some(m) = &route.r#match else { continue };
            let Some(path) = &m.path else { continue };
            let timeout = route
                .timeout
                .as_ref()
                .and_then(|d| duration(d.seconds, d.nanos))
                .or_else(|| namespace_timeout(snapshot, namespace))
                .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
            let target = Arc::new(RouteTarget {
                route: route.name.clone(),
                backend: Arc::clone(backend),
                timeout,
            });
            let path = match path {
                Path::Exact(p) => PathMatch::Exact(p),
                Path::Prefix(p) => PathMatch::Prefix(p),
                // Refused by `unsupported` above.
                Path::Regex(_) => continue,
            };
            by_namespace.entry(namespace).or_default().push(Entry {
                host: m.host.as_str(),
                path,
                target,
            });
        }

        let mut hosts: HashMap<String, Arc<RouteTable>> = HashMap::new();
        let mut wildcards = Vec::new();
        for entry in snapshot.of_kind(Kind::Namespace) {
            let Resource::Namespace(ns) = &entry.resource else {
                continue;
            };
            if !ns.rate_limits.is_empty() {
                return Err(CompileError::Unsupported {
                    resource: entry.resource.key().to_string(),
                    field: "rate_limits",
                });
            }
            let routes = by_namespace.remove(ns.name.as_str()).unwrap_or_default();
            let wide: Vec<&Entry<'_>> = routes.iter().filter(|e| e.host.is_empty()).collect();
            // Every host named by a route or by the namespace gets a table of
            // its own routes first, then the namespace-wide ones, so a route
            // for one host overrides a namespace-wide route with the same match.
            let mut named: Vec<String> = ns
                .hosts
                .iter()
                .filter(|h| !h.starts_with("*."))
                .map(|h| h.to_ascii_lowercase())
                .collect();
            for entry in &routes {
                let host = entry.host.to_ascii_lowercase();
                if !host.is_empty() && !named.contains(&host) {
                    named.push(host);
                }
            }
            for host in named {
                let specific = routes.iter().filter(|e| e.host.eq_ignore_ascii_case(&host));
                let table = RouteTable::build(specific.chain(wide.iter().copied()));
                hosts.insert(host, Arc::new(table));
            }
            for pattern in ns.hosts.iter().filter(|h| h.starts_with("*.")) {
                let table = RouteTable::build(wide.iter().copied());
                // Keep the leading dot: `*.example.com` matches `a.example.com`
                // but not `example.com`.
                wildcards.push((pattern[1..].to_ascii_lowercase(), Arc::new(table)));
            }
        }
        wildcards.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));

        Ok(Runtime {
            revision: Some(snapshot.revision),
            hosts,
            wildcards,
            backends,
            connect_timeouts,
        })
    }

    /// Revision of the snapshot this runtime was compiled from, if any.
    pub fn revision(&self) -> Option<u64> {
        self.revision
    }

    /// Whether a configuration has been accepted.
    pub fn is_configured(&self) -> bool {
        self.revision.is_some()
    }

    /// The route for a request to `host` (a Host header or `:authority`,
    /// any case, with or without port) and `path` (without query).
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<RouteTarget>> {
        let host = normalize_host(host);
        let table = self
            .hosts
            .get(host.as_str())
            .or_else(|| {
                self.wildcards
                    .iter()
                    .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix))
                    .map(|(_, table)| table)
            })
            .or_else(|| self.hosts.get("*"))?;
        table.route(path)
    }

    /// A backend by full name.
    pub fn backend(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.get(name)
    }

    /// The connect timeout for an endpoint authority (`host:port`).
    pub fn connect_timeout(&self, authority: &str) -> Duration {
        self.connect_timeouts
            .get(&authority.to_ascii_lowercase())
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }
}

impl RouteTable {
    /// Builds a table from targets in priority order: the first route with a
    /// given match wins.
    fn build<'a: 'b, 'b>(entries: impl Iterator<Item = &'b Entry<'a>>) -> RouteTable {
        let mut table = RouteTable::default();
        for entry in entries {
            match entry.path {
                PathMatch::Exact(path) => {
                    table
                        .exact
                        .entry(path.to_string())
                        .or_insert_with(|| Arc::clone(&entry.target));
                }
                PathMatch::Prefix(path) => {
                    if !table.prefixes.iter().any(|(p, _)| p == path) {
                        table
                            .prefixes
                            .push((path.to_string(), Arc::clone(&entry.target)));
                    }
                }
            }
        }
        table
            .prefixes
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        table
    }

    fn route(&self, path: &str) -> Option<&Arc<RouteTarget>> {
        self.exact.get(path).or_else(|| {
            self.prefixes
                .iter()
                .find(|(prefix, _)| path.starts_with(prefix.as_str()))
                .map(|(_, t)| t)
        })
    }
}

impl Backend {
    fn compile(
        spec: &prism_proto::Backend,
        version: &str,
        own: &OwnAddresses,
    ) -> Result<Backend, CompileError> {
        let endpoints = spec
            .endpoints
            .iter()
            .enumerate()
            .map(|(index, e)| {
                e.address
                    .parse::<Authority>()
                    .ok()
                    .filter(|a| a.port_u16().is_some())
                    .ok_or_else(|| CompileError::Endpoint {
                        backend: spec.name.clone(),
                        index,
                        address: e.address.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some((index, endpoint)) = endpoints.iter().enumerate().find(|(_, e)| own.contains(e))
        {
            return Err(CompileError::Loop {
                backend: spec.name.clone(),
                index,
                address: endpoint.to_string(),
            });
        }
        Ok(Backend {
            name: spec.name.clone(),
            version: version.to_string(),
            protocol: Protocol::try_from(spec.protocol).unwrap_or(Protocol::Http1),
            endpoints,
            connect_timeout: spec
                .connect_timeout
                .as_ref()
                .and_then(|d| duration(d.seconds, d.nanos))
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            next: AtomicUsize::new(0),
        })
    }

    /// The next endpoint in round-robin order, or `None` if there are none.
    pub fn pick(&self) -> Option<&Authority> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }

    /// Whether requests go to the endpoints over HTTP/2 (prior knowledge).
    pub fn is_http2(&self) -> bool {
        matches!(self.protocol, Protocol::Http2 | Protocol::Grpc)
    }
}

/// The first route field, in schema order, that this proxy cannot honour yet.
fn unsupported(route: &Route) -> Option<&'static str> {
    let m = route.r#match.as_ref();
    [
        (
            "match.regex",
            matches!(m.and_then(|m| m.path.as_ref()), Some(Path::Regex(_))),
        ),
        ("match.methods", m.is_some_and(|m| !m.methods.is_empty())),
        ("match.headers", m.is_some_and(|m| !m.headers.is_empty())),
        (
            "match.query_params",
            m.is_some_and(|m| !m.query_params.is_empty()),
        ),
        ("backends", !route.backends.is_empty()),
        ("redirect", route.redirect.is_some()),
        ("direct_response", route.direct_response.is_some()),
        ("rewrite", route.rewrite.is_some()),
        ("request_headers", route.request_headers.is_some()),
        ("response_headers", route.response_headers.is_some()),
        ("rate_limits", !route.rate_limits.is_empty()),
        ("max_request_body_bytes", route.max_request_body_bytes > 0),
    ]
    .into_iter()
    .find_map(|(field, used)| used.then_some(field))
}

/// Lowercase host without port; handles `[v6]:port`.
fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(inside, _)| inside)
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
    };
    bare.trim_end_matches('.').to_ascii_lowercase()
}

fn namespace_timeout(snapshot: &Snapshot, namespace: &str) -> Option<Duration> {
    let entry = snapshot.get(&prism_proto::ResourceKey::new(Kind::Namespace, namespace))?;
    match &entry.resource {
        Resource::Namespace(ns) => ns
            .default_timeout
            .as_ref()
            .and_then(|d| duration(d.seconds, d.nanos)),
        _ => None,
    }
}

/// A positive protobuf duration as a std one; `None` for zero or negative.
fn duration(seconds: i64, nanos: i32) -> Option<Duration> {
    let seconds = u64::try_from(seconds).ok()?;
    let nanos = u32::try_from(nanos).ok()?;
    Some(Duration::new(seconds, nanos)).filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use prism_proto::pb::config::v1::{Endpoint, Namespace, Route, RouteMatch};

    use super::*;

    fn namespace(name: &str, hosts: &[&str]) -> Resource {
        Resource::Namespace(Namespace {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ..Default::default()
        })
    }

    fn backend(name: &str, addresses: &[&str]) -> Resource {
        Resource::Backend(prism_proto::Backend {
            name: name.into(),
            endpoints: addresses
                .iter()
                .map(|a| Endpoint {
                    address: a.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn route(name: &str, host: &str, path: Path, backend: &str) -> Resource {
        Resource::Route(Route {
            name: name.into(),
            r#match: Some(RouteMatch {
                host: host.into(),
                path: Some(path),
                ..Default::default()
            }),
            backend: backend.into(),
            ..Default::default()
        })
    }

    fn prefix(p: &str) -> Path {
        Path::Prefix(p.into())
    }

    fn routed<'a>(rt: &'a Runtime, host: &str, path: &str) -> Option<&'a str> {
        rt.route(host, path).map(|t| t.route.as_str())
    }

    fn sample() -> Snapshot {
        Snapshot::from_resources(
            7,
            [
                namespace("demo", &["demo.local", "*.demo.test"]),
                namespace("api", &["*.api.demo.test", "api.example.com"]),
                backend("demo/web", &["127.0.0.1:1001"]),
                backend("api/svc", &["127.0.0.1:2001"]),
                route("demo/root", "", prefix("/"), "web"),
                route("demo/static", "", prefix("/static/"), "web"),
                route("demo/static-img", "", prefix("/static/img/"), "web"),
                route(
                    "demo/health",
                    "",
                    Path::Exact("/static/health".into()),
                    "web",
                ),
                route("demo/only-a", "a.demo.test", prefix("/"), "web"),
                route("api/all", "", prefix("/"), "svc"),
            ],
        )
    }

    #[test]
    fn exact_host_beats_wildcard_and_longest_wildcard_wins() {
        let rt = Runtime::compile(&sample(), &Runtime::unconfigured()).expect("compiles");
        assert_eq!(rt.revision(), Some(7));
        assert_eq!(routed(&rt, "demo.local", "/x"), Some("demo/root"));
        assert_eq!(routed(&rt, "b.demo.test", "/x"), Some("demo/root"));
        // A route for one host covered by a wildcard gets an exact entry.
        assert_eq!(routed(&rt, "a.demo.test", "/x"), Some("demo/only-a"));
        assert_eq!(routed(&rt, "a.demo.test", "/static/x"), Some("demo/static"));
        // `*.api.demo.test` is a longer suffix than `*.demo.test`.
        assert_eq!(routed(&rt, "x.api.demo.test", "/x"), Some("api/all"));
        // A wildcard does not match its bare suffix.
        assert_eq!(routed(&rt, "demo.test", "/x"), None);
    }

    #[test]
    fn exact_path_beats_prefix_and_longest_prefix_wins() {
        let rt = Runtime::compile(&sample(), &Runtime::unconfigured()).expect("compiles");
        assert_eq!(
            routed(&rt, "demo.local", "/static/health"),
            Some("demo/health")
        );
        assert_eq!(
            routed(&rt, "demo.local", "/static/health/x"),
            Some("demo/static")
        );
        assert_eq!(
            routed(&rt, "demo.local", "/static/img/a.png"),
            Some("demo/static-img")
        );
        assert_eq!(
            routed(&rt, "demo.local", "/static/a.css"),
            Some("demo/static")
        );
        assert_eq!(routed(&rt, "demo.local", "/"), Some("demo/root"));
    }

    #[test]
    fn host_is_case_insensitive_and_port_is_ignored() {
        let rt = Runtime::compile(&sample(), &Runtime::unconfigured()).expect("compiles");
        assert_eq!(routed(&rt, "DEMO.local:8080", "/"), Some("demo/root"));
        assert_eq!(routed(&rt, "Api.Example.COM", "/"), Some("api/all"));
        assert_eq!(normalize_host("[::1]:8080"), "::1");
    }

    #[test]
    fn unknown_host_or_path_matches_nothing() {
        let rt = Runtime::compile(&sample(), &Runtime::unconfigured()).expect("compiles");
        assert!(rt.route("other.local", "/").is_none());
        let only_exact = Snapshot::from_resources(
            1,
            [
                namespace("n", &["n.local"]),
                backend("n/b", &["127.0.0.1:1"]),
                route("n/r", "", Path::Exact("/a".into()), "b"),
            ],
        );
        let rt = Runtime::compile(&only_exact, &Runtime::unconfigured()).expect("compiles");
        assert!(rt.route("n.local", "/a/b").is_none());
        assert!(rt.route("n.local", "/a").is_some());
        assert!(!Runtime::unconfigured().is_configured());
        assert!(Runtime::unconfigured().route("n.local", "/a").is_none());
    }

    #[test]
    fn round_robin_cycles_through_endpoints() {
        let snapshot = Snapshot::from_resources(
            1,
            [
                namespace("n", &["n.local"]),
                backend("n/b", &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]),
            ],
        );
        let rt = Runtime::compile(&snapshot, &Runtime::unconfigured()).expect("compiles");
        let b = rt.backend("n/b").expect("backend");
        let picked: Vec<String> = (0..6)
            .map(|_| b.pick().expect("endpoint").to_string())
            .collect();
        assert_eq!(
            picked,
            [
                "127.0.0.1:1",
                "127.0.0.1:2",
                "127.0.0.1:3",
                "127.0.0.1:1",
                "127.0.0.1:2",
                "127.0.0.1:3"
            ]
        );
    }

    #[test]
    fn unchanged_backend_keeps_its_state_across_compiles() {
        let first = Runtime::compile(&sample(), &Runtime::unconfigured()).expect("compiles");
        let web = Arc::clone(first.backend("demo/web").expect("backend"));
        web.pick();
        let mut changed = sample();
        changed.revision = 8;
        changed.insert(backend("api/svc", &["127.0.0.1:2002"]));
        let second = Runtime::compile(&changed, &first).expect("compiles");
        assert!(Arc::ptr_eq(
            &web,
            second.backend("demo/web").expect("backend")
        ));
        assert!(!Arc::ptr_eq(
            first.backend("api/svc").expect("backend"),
            second.backend("api/svc").expect("backend")
        ));
        assert_eq!(
            second.backend("api/svc").expect("backend").endpoints[0].as_str(),
            "127.0.0.1:2002"
        );
    }

    #[test]
    fn timeouts_fall_back_from_route_to_namespace_to_default() {
        let mut snapshot = sample();
        snapshot.insert(Resource::Namespace(Namespace {
            name: "api".into(),
            hosts: vec!["api.example.com".into()],
            default_timeout: Some(pbjson_duration(3)),
            ..Default::default()
        }));
        if let Resource::Route(mut r) = route("demo/slow", "", prefix("/slow"), "web") {
            r.timeout = Some(pbjson_duration(1));
            snapshot.insert(Resource::Route(r));
        }
        let rt = Runtime::compile(&snapshot, &Runtime::unconfigured()).expect("compiles");
        let timeout = |h: &str, p: &str| rt.route(h, p).map(|t| t.timeout);
        assert_eq!(timeout("demo.local", "/slow"), Some(Duration::from_secs(1)));
        assert_eq!(
            timeout("api.example.com", "/"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(timeout("demo.local", "/"), Some(DEFAULT_REQUEST_TIMEOUT));
        assert_eq!(
            rt.connect_timeout("127.0.0.1:1001"),
            DEFAULT_CONNECT_TIMEOUT
        );
    }

    fn pbjson_duration(seconds: i64) -> pbjson_types::Duration {
        pbjson_types::Duration { seconds, nanos: 0 }
    }

    #[test]
    fn the_catch_all_host_takes_what_no_other_host_does() {
        let mut snapshot = sample();
        snapshot.insert(namespace("fallback", &["*"]));
        snapshot.insert(backend("fallback/web", &["127.0.0.1:3001"]));
        snapshot.insert(route("fallback/all", "", prefix("/"), "web"));
        let rt = Runtime::compile(&snapshot, &Runtime::unconfigured()).expect("compiles");
        assert_eq!(routed(&rt, "other.test", "/"), Some("fallback/all"));
        assert_eq!(routed(&rt, "b.demo.test", "/x"), Some("demo/root"));
        assert_eq!(routed(&rt, "demo.local", "/"), Some("demo/root"));
    }

    #[test]
    fn fields_not_supported_yet_are_refused_not_ignored() {
        let mut methods = sample();
        if let Resource::Route(mut r) = route("demo/get", "", prefix("/get"), "web") {
            if let Some(m) = r.r#match.as_mut() {
                m.methods = vec!["GET".into()];
            }
            methods.insert(Resource::Route(r));
        }
        let error = Runtime::compile(&methods, &Runtime::unconfigured())
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "Route demo/get: match.methods: not supported by this proxy yet"
        );

        let mut redirect = sample();
        redirect.insert(Resource::Route(Route {
            name: "demo/old".into(),
            r#match: Some(RouteMatch {
                path: Some(Path::Exact("/old".into())),
                ..Default::default()
            }),
            redirect: Some(Default::default()),
            ..Default::default()
        }));
        let error = Runtime::compile(&redirect, &Runtime::unconfigured())
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                error,
                CompileError::Unsupported {
                    field: "redirect",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_backend_pointing_at_the_proxy_itself_is_refused() {
        let own = OwnAddresses::new(
            "0.0.0.0:8080".parse().expect("addr"),
            "proxy-a.internal:8080",
        );
        for looping in [
            "127.0.0.1:8080",
            "localhost:8080",
            "PROXY-A.internal:8080",
            "0.0.0.0:8080",
        ] {
            assert!(
                own.contains(&looping.parse().expect("authority")),
                "{looping}"
            );
        }
        for fine in ["127.0.0.1:8081", "10.0.0.9:8080", "other.internal:8080"] {
            assert!(!own.contains(&fine.parse().expect("authority")), "{fine}");
        }
        let own = OwnAddresses::new("127.0.0.1:2001".parse().expect("addr"), "");
        let error = Runtime::compile_for(&sample(), &Runtime::unconfigured(), &own)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("127.0.0.1:2001") && error.contains("loop"),
            "{error}"
        );
    }
}
