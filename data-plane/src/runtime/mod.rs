//! What a policy compiles to: everything the request path reads, built from
//! one accepted [`Snapshot`] and published through one `ArcSwap<Runtime>`.
//!
//! Compiling never touches the live runtime: a complete new one is built off
//! the request path and then stored in one step. Every backend whose version
//! did not change is carried over as the same `Arc`, so it keeps its state —
//! its connection pool and its balancer position — across applies.

mod backend;
pub(crate) mod balance;
pub mod bench;
pub(crate) mod breaker;
mod matcher;
pub(crate) mod outlier;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use prism_proto::defaults::{
    CONNECT_TIMEOUT as DEFAULT_CONNECT_TIMEOUT, REQUEST_TIMEOUT as DEFAULT_REQUEST_TIMEOUT,
};
use prism_proto::pb::config::v1::route_match::Path;
use prism_proto::{Kind, Resource, Snapshot};

use crate::http::timeout;
use matcher::{Entry, Matcher, PathMatch};

pub(crate) use backend::{Backend, OwnAddresses};

/// A compiled, immutable view of the policy. A request `load_full()`s it once,
/// takes the [`Route`] it matches, and keeps that (and through it the backend)
/// until it finishes, so none sees a half-applied config.
#[derive(Debug, Default)]
pub(crate) struct Runtime {
    /// Revision of the snapshot this runtime was compiled from; `None` until
    /// the first configuration is accepted.
    revision: Option<u64>,
    matcher: Matcher,
    /// Backends by full name (`namespace/name`), for reuse by the next compile.
    backends: HashMap<String, Arc<Backend>>,
}

/// A matched route: where the request goes and the parameters of the stages
/// that depend on the route.
#[derive(Debug)]
pub(crate) struct Route {
    /// Full route name, `namespace/name`.
    pub name: String,
    pub backend: Arc<Backend>,
    pub timeout: timeout::Params,
}

/// Why a snapshot could not be compiled (it passed validation, so this is
/// about things only the proxy checks, such as address syntax for a URI).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CompileError {
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
    #[error("Backend {backend}: endpoints: at least one endpoint is required")]
    NoEndpoints { backend: String },
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

impl Runtime {
    /// The runtime before any configuration is accepted: it matches nothing.
    pub(crate) fn unconfigured() -> Self {
        Self::default()
    }

    /// Compiles `snapshot` for a proxy listening at `own`, reusing the
    /// unchanged backends of `previous`. A backend endpoint that is the proxy
    /// itself is refused, since every request to it would loop back in; the
    /// control plane cannot see this, only the proxy can.
    pub(crate) fn compile(
        snapshot: &Snapshot,
        previous: &Runtime,
        own: &OwnAddresses,
    ) -> Result<Runtime, CompileError> {
        let mut backends = HashMap::new();
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
            backends.insert(spec.name.clone(), backend);
        }

        // Routes grouped by namespace; the matcher builds each host's table.
        let mut by_namespace: HashMap<&str, Vec<Entry<'_>>> = HashMap::new();
        for entry in snapshot.of_kind(Kind::Route) {
            let Resource::Route(spec) = &entry.resource else {
                continue;
            };
            if let Some(field) = unsupported(spec) {
                return Err(CompileError::Unsupported {
                    resource: entry.resource.key().to_string(),
                    field,
                });
            }
            let namespace = entry.resource.namespace();
            let backend_name = format!("{namespace}/{}", spec.backend);
            let Some(backend) = backends.get(&backend_name) else {
                return Err(CompileError::MissingBackend {
                    route: spec.name.clone(),
                    backend: backend_name,
                });
            };
            let Some(m) = &spec.r#match else { continue };
            let Some(path) = &m.path else { continue };
            let response = spec
                .timeout
                .as_ref()
                .and_then(prism_proto::defaults::to_std)
                .or_else(|| namespace_timeout(snapshot, namespace))
                .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
            let route = Arc::new(Route {
                name: spec.name.clone(),
                backend: Arc::clone(backend),
                timeout: timeout::Params { response },
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
                route,
            });
        }

        for entry in snapshot.of_kind(Kind::Namespace) {
            if let Resource::Namespace(ns) = &entry.resource
                && !ns.rate_limits.is_empty()
            {
                return Err(CompileError::Unsupported {
                    resource: entry.resource.key().to_string(),
                    field: "rate_limits",
                });
            }
        }

        Ok(Runtime {
            revision: Some(snapshot.revision),
            matcher: Matcher::build(snapshot, by_namespace),
            backends,
        })
    }

    /// Revision of the snapshot this runtime was compiled from, if any.
    #[cfg(test)]
    pub(crate) fn revision(&self) -> Option<u64> {
        self.revision
    }

    /// Whether a configuration has been accepted.
    pub(crate) fn is_configured(&self) -> bool {
        self.revision.is_some()
    }

    /// The route for a request to `host` (a Host header or `:authority`,
    /// any case, with or without port) and `path` (without query).
    pub(crate) fn route(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        self.matcher.route(host, path)
    }

    /// A backend by full name.
    #[cfg(test)]
    pub(crate) fn backend(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.get(name)
    }
}

/// The first route field, in schema order, that this proxy cannot honour yet.
fn unsupported(route: &prism_proto::Route) -> Option<&'static str> {
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

fn namespace_timeout(snapshot: &Snapshot, namespace: &str) -> Option<Duration> {
    let entry = snapshot.get(&prism_proto::ResourceKey::new(Kind::Namespace, namespace))?;
    match &entry.resource {
        Resource::Namespace(ns) => ns
            .default_timeout
            .as_ref()
            .and_then(prism_proto::defaults::to_std),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use prism_proto::pb::config::v1::{self as pb, Endpoint, Namespace, RouteMatch};

    use super::*;

    pub(crate) fn namespace(name: &str, hosts: &[&str]) -> Resource {
        Resource::Namespace(Namespace {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ..Default::default()
        })
    }

    pub(crate) fn backend(name: &str, addresses: &[&str]) -> Resource {
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

    pub(crate) fn route(name: &str, host: &str, path: Path, backend: &str) -> Resource {
        Resource::Route(pb::Route {
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

    pub(crate) fn prefix(p: &str) -> Path {
        Path::Prefix(p.into())
    }

    pub(crate) fn compile(snapshot: &Snapshot, previous: &Runtime) -> Runtime {
        Runtime::compile(snapshot, previous, &OwnAddresses::default()).expect("compiles")
    }

    pub(crate) fn sample() -> Snapshot {
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
    fn unchanged_backend_keeps_its_state_across_compiles() {
        let first = compile(&sample(), &Runtime::unconfigured());
        let web = Arc::clone(first.backend("demo/web").expect("backend"));
        web.balancer.pick(&web.candidates(), None);
        let mut changed = sample();
        changed.revision = 8;
        changed.insert(backend("api/svc", &["127.0.0.1:2002"]));
        let second = compile(&changed, &first);
        assert!(Arc::ptr_eq(
            &web,
            second.backend("demo/web").expect("backend")
        ));
        // The route that uses it points at the very same backend, pool and all.
        let route = second.route("demo.local", "/").expect("route");
        assert!(Arc::ptr_eq(&web, &route.backend));
        assert!(!Arc::ptr_eq(
            first.backend("api/svc").expect("backend"),
            second.backend("api/svc").expect("backend")
        ));
        assert_eq!(
            second.backend("api/svc").expect("backend").endpoints[0]
                .address
                .as_str(),
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
        let rt = compile(&snapshot, &Runtime::unconfigured());
        let timeout = |h: &str, p: &str| rt.route(h, p).map(|t| t.timeout.response);
        assert_eq!(timeout("demo.local", "/slow"), Some(Duration::from_secs(1)));
        assert_eq!(
            timeout("api.example.com", "/"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(timeout("demo.local", "/"), Some(DEFAULT_REQUEST_TIMEOUT));
    }

    fn pbjson_duration(seconds: i64) -> pbjson_types::Duration {
        pbjson_types::Duration { seconds, nanos: 0 }
    }

    #[test]
    fn a_route_to_a_missing_backend_is_refused() {
        let mut snapshot = sample();
        snapshot.insert(route("demo/lost", "", prefix("/lost"), "nowhere"));
        let error = Runtime::compile(
            &snapshot,
            &Runtime::unconfigured(),
            &OwnAddresses::default(),
        )
        .map(|_| ())
        .unwrap_err();
        assert_eq!(
            error,
            CompileError::MissingBackend {
                route: "demo/lost".into(),
                backend: "demo/nowhere".into(),
            }
        );
    }

    #[test]
    fn fields_not_supported_yet_are_refused_not_ignored() {
        let refused = |snapshot: &Snapshot| {
            Runtime::compile(snapshot, &Runtime::unconfigured(), &OwnAddresses::default())
                .map(|_| ())
                .unwrap_err()
        };
        let mut methods = sample();
        if let Resource::Route(mut r) = route("demo/get", "", prefix("/get"), "web") {
            if let Some(m) = r.r#match.as_mut() {
                m.methods = vec!["GET".into()];
            }
            methods.insert(Resource::Route(r));
        }
        assert_eq!(
            refused(&methods).to_string(),
            "Route demo/get: match.methods: not supported by this proxy yet"
        );

        let mut redirect = sample();
        redirect.insert(Resource::Route(pb::Route {
            name: "demo/old".into(),
            r#match: Some(RouteMatch {
                path: Some(Path::Exact("/old".into())),
                ..Default::default()
            }),
            redirect: Some(Default::default()),
            ..Default::default()
        }));
        let error = refused(&redirect);
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
}
