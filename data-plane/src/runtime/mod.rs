//! What a policy compiles to: everything the request path reads, built from
//! one accepted [`Snapshot`] and published through one `ArcSwap<Runtime>`.
//!
//! Compiling never touches the live runtime: a complete new one is built off
//! the request path and then stored in one step. Every backend whose version
//! did not change is carried over as the same `Arc`, so it keeps its state —
//! its connection pool, its balancer position and its health checker — across
//! applies.
//!
//! A revision that changes only routes (the common case of a large policy)
//! is compiled in time proportional to those routes: the new runtime is the
//! previous one with them recompiled and the matcher patched
//! ([`Matcher::patch`]); every other route, its compiled action and its
//! place in the host tables are shared with the previous runtime. Any other
//! change (a namespace, a backend, a Secret) compiles the whole policy. Both
//! give the same runtime, and a patch that fails is redone whole, so a refused
//! revision names what a fresh compile names.

mod action;
mod backend;
pub(crate) mod balance;
pub mod bench;
pub(crate) mod breaker;
mod health;
mod matcher;
pub(crate) mod outlier;
pub(crate) mod tls;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use prism_proto::defaults::{
    CONNECT_TIMEOUT as DEFAULT_CONNECT_TIMEOUT, REQUEST_TIMEOUT as DEFAULT_REQUEST_TIMEOUT,
};
use prism_proto::{Delta, Kind, Resource, Snapshot};

use crate::access_log::{AccessLog, RouteLog};
use crate::data::Bindings;
use crate::http::ratelimit::{self, Limits};
use crate::http::{retry, timeout};
use crate::metrics::{Metrics, RouteSeries};
use matcher::{Entry, Matcher};

pub(crate) use matcher::Probe;

pub(crate) use action::{Action, HeaderMutation};
pub(crate) use backend::{Backend, Endpoint, OwnAddresses};

/// A compiled, immutable view of the policy. A request `load_full()`s it once,
/// takes the [`Route`] it matches, and keeps that (and through it the backend)
/// until it finishes, so none sees a half-applied config.
#[derive(Debug, Default)]
pub(crate) struct Runtime {
    /// Revision of the snapshot this runtime was compiled from; `None` until
    /// the first configuration is accepted.
    revision: Option<u64>,
    /// The snapshot itself (its map shared, not copied), which the next
    /// compile diffs against.
    snapshot: Snapshot,
    matcher: Matcher,
    /// Backends by full name (`namespace/name`), for reuse by the next compile.
    backends: HashMap<String, Arc<Backend>>,
    /// Rate limits by namespace name and by route name, for reuse by the next
    /// compile: limits compiled from the same spec keep their buckets.
    namespace_limits: HashMap<String, Arc<Limits>>,
    route_limits: HashMap<String, Arc<Limits>>,
    /// The TLS listener's certificates, by SNI.
    certificates: Arc<tls::Certificates>,
    /// The namespaces' data bindings, opened before this runtime was
    /// stored ([`Runtime::with_data`]); a compile carries the previous
    /// runtime's.
    data: Arc<Bindings>,
    /// The proxy's metrics, whose series routes and backends are compiled
    /// with; `None` with metrics off. Carried from runtime to runtime.
    metrics: Option<Arc<Metrics>>,
    /// The proxy's access log, which routes of namespaces with access logs
    /// on are compiled with; `None` without a destination. Carried from
    /// runtime to runtime.
    access_log: Option<Arc<AccessLog>>,
}

/// A matched route: where the request goes and the parameters of the stages
/// that depend on the route.
#[derive(Debug)]
pub(crate) struct Route {
    /// Full route name, `namespace/name`.
    pub name: String,
    /// Forward (to a backend picked per request), redirect or respond.
    pub action: Action,
    pub timeout: timeout::Params,
    /// Applied to the request on its way upstream.
    pub request_headers: HeaderMutation,
    /// Applied to every response the route gives: the upstream's, a
    /// redirect or a direct response.
    pub response_headers: HeaderMutation,
    pub rate_limit: ratelimit::Params,
    /// The longest request body the route takes; unlimited when `None`.
    pub max_request_body_bytes: Option<u64>,
    /// Retries; none when `None`.
    pub retry: Option<retry::Params>,
    /// Where requests the route answers itself (a redirect, a direct
    /// response) are recorded; `None` for a forwarding route, whose split
    /// has a series per backend, and with metrics off.
    pub series: Option<Arc<RouteSeries>>,
    /// Where its requests are logged: `Some` only when its namespace has
    /// access logs on (and the proxy a destination), so a request of any
    /// other pays one branch.
    pub log: Option<RouteLog>,
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
    #[error("{resource}: {field}: {reason}")]
    Tls {
        resource: String,
        field: &'static str,
        reason: String,
    },
    #[error("Backend {backend}: health_check.{field}: {reason}")]
    HealthCheck {
        backend: String,
        field: &'static str,
        reason: String,
    },
    #[error("Backend {backend}: endpoints: at least one endpoint is required")]
    NoEndpoints { backend: String },
    /// A regular expression the proxy's engine refuses (validation already
    /// bounds them, so this is a tier of many patterns growing too large).
    #[error("Regular expression `{pattern}`: {reason}")]
    Regex { pattern: String, reason: String },
    #[error("Route {route}: {field}: {reason}")]
    Match {
        route: String,
        field: String,
        reason: String,
    },
    #[error("Route {route}: backend: backend `{backend}` does not exist")]
    MissingBackend { route: String, backend: String },
    /// A data binding's store or bus could not be opened.
    #[error(transparent)]
    Binding(crate::data::OpenError),
}

impl Runtime {
    /// The runtime before any configuration is accepted: it matches nothing.
    pub(crate) fn unconfigured() -> Self {
        Self::default()
    }

    /// This runtime recording into `metrics`, which every runtime compiled
    /// from it carries on; `None` turns metrics off.
    pub(crate) fn with_metrics(mut self, metrics: Option<Arc<Metrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    /// This runtime logging into `log` the requests of namespaces with
    /// access logs on, as every runtime compiled from it does; `None`
    /// logs nothing.
    pub(crate) fn with_access_log(mut self, log: Option<Arc<AccessLog>>) -> Self {
        self.access_log = log;
        self
    }

    /// Compiles `snapshot` for a proxy listening at `own`, reusing the
    /// unchanged backends of `previous`, and when only routes changed, every
    /// unchanged route too. A backend endpoint that is the proxy itself is
    /// refused, since every request to it would loop back in; the control
    /// plane cannot see this, only the proxy can.
    pub(crate) fn compile(
        snapshot: &Snapshot,
        previous: &Runtime,
        own: &OwnAddresses,
    ) -> Result<Runtime, CompileError> {
        if previous.is_configured() {
            let delta = Snapshot::diff(&previous.snapshot, snapshot);
            let routes_only = delta
                .upserts
                .iter()
                .map(|v| v.resource.kind())
                .chain(delta.removals.iter().map(|key| key.kind))
                .all(|kind| kind == Kind::Route);
            // A failed patch is redone whole for the error a fresh compile
            // gives.
            if routes_only && let Ok(runtime) = previous.patch(snapshot, &delta) {
                return Ok(runtime);
            }
        }
        Self::compile_whole(snapshot, previous, own)
    }

    /// Compiles every resource of `snapshot`, reusing the unchanged backends
    /// and rate limits of `previous`.
    fn compile_whole(
        snapshot: &Snapshot,
        previous: &Runtime,
        own: &OwnAddresses,
    ) -> Result<Runtime, CompileError> {
        let mut backends = HashMap::new();
        for entry in snapshot.of_kind(Kind::Backend) {
            let Resource::Backend(spec) = &entry.resource else {
                continue;
            };
            // A backend is also rebuilt when a Secret its TLS uses changed.
            let secrets = spec.tls.as_ref().map_or_else(String::new, |t| {
                tls::secret_versions(snapshot, entry.resource.namespace(), t)
            });
            let backend = match previous.backends.get(&spec.name) {
                Some(old) if old.version == entry.version && old.secrets == secrets => {
                    Arc::clone(old)
                }
                old => {
                    let mut backend = Backend::compile(
                        snapshot,
                        spec,
                        &entry.version,
                        secrets,
                        own,
                        previous.metrics.as_deref(),
                    )?;
                    backend.start_health_check(old.map(Arc::as_ref));
                    Arc::new(backend)
                }
            };
            backends.insert(spec.name.clone(), backend);
        }

        let mut namespace_limits = HashMap::new();
        for entry in snapshot.of_kind(Kind::Namespace) {
            if let Resource::Namespace(ns) = &entry.resource
                && let Some(limits) = Limits::compile(
                    &ns.rate_limits,
                    previous.namespace_limits.get(&ns.name),
                    previous.metrics.as_ref().map(|m| m.namespace(&ns.name)),
                )
            {
                namespace_limits.insert(ns.name.clone(), limits);
            }
        }
        let mut runtime = Runtime {
            revision: Some(snapshot.revision),
            snapshot: snapshot.clone(),
            matcher: Matcher::default(),
            backends,
            namespace_limits,
            route_limits: HashMap::new(),
            certificates: Arc::new(tls::Certificates::compile(snapshot)?),
            data: Arc::clone(&previous.data),
            metrics: previous.metrics.clone(),
            access_log: previous.access_log.clone(),
        };
        let mut routes = Vec::new();
        for entry in snapshot.of_kind(Kind::Route) {
            if let Some(route) = runtime.compile_route(entry, &previous.route_limits)? {
                routes.push(route);
            }
        }
        runtime.matcher = Matcher::build(snapshot, routes)?;
        Ok(runtime)
    }

    /// This runtime with `delta`, which changes only routes, applied for
    /// `snapshot`: the routes it touches are recompiled and the matcher
    /// patched; everything else is shared.
    fn patch(&self, snapshot: &Snapshot, delta: &Delta) -> Result<Runtime, CompileError> {
        let mut runtime = Runtime {
            revision: Some(snapshot.revision),
            snapshot: snapshot.clone(),
            matcher: Matcher::default(),
            backends: self.backends.clone(),
            namespace_limits: self.namespace_limits.clone(),
            route_limits: self.route_limits.clone(),
            certificates: Arc::clone(&self.certificates),
            data: Arc::clone(&self.data),
            metrics: self.metrics.clone(),
            access_log: self.access_log.clone(),
        };
        let mut leave = Vec::new();
        let touched = delta
            .upserts
            .iter()
            .map(|v| v.resource.key())
            .chain(delta.removals.iter().cloned());
        for key in touched {
            if let Some(old) = self.snapshot.get(&key) {
                leave.push(&old.resource);
                runtime.route_limits.remove(old.resource.name());
            }
        }
        let mut join = Vec::new();
        for versioned in &delta.upserts {
            if let Some(route) = runtime.compile_route(versioned, &self.route_limits)? {
                join.push(route);
            }
        }
        runtime.matcher = self.matcher.patch(snapshot, &[], &leave, join)?;
        Ok(runtime)
    }

    /// Compiles one route of `self.snapshot` against this runtime's
    /// backends and namespace limits, keeping the buckets of its limits in
    /// `previous_limits` and recording its own; `None` for a route without
    /// a path, which matches nothing.
    fn compile_route<'s>(
        &mut self,
        entry: &'s prism_proto::Versioned,
        previous_limits: &HashMap<String, Arc<Limits>>,
    ) -> Result<Option<Entry<'s>>, CompileError> {
        let Resource::Route(spec) = &entry.resource else {
            return Ok(None);
        };
        let namespace = entry.resource.namespace();
        // A handle of its own: `self` is changed below while it is used.
        let metrics = self.metrics.clone();
        let metrics = metrics.as_deref();
        let action = Action::compile(
            spec,
            namespace,
            |name| self.backends.get(name).cloned(),
            |backend| metrics.map(|m| m.route(&spec.name, Some(backend))),
        )?;
        if spec
            .r#match
            .as_ref()
            .and_then(|m| m.path.as_ref())
            .is_none()
        {
            return Ok(None);
        }
        let response = spec
            .timeout
            .as_ref()
            .and_then(prism_proto::defaults::to_std)
            .or_else(|| namespace_timeout(&self.snapshot, namespace))
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let own_limits = Limits::compile(
            &spec.rate_limits,
            previous_limits.get(&spec.name),
            metrics.map(|m| m.namespace(namespace)),
        );
        if let Some(limits) = &own_limits {
            self.route_limits
                .insert(spec.name.clone(), Arc::clone(limits));
        }
        let series = match &action {
            Action::Forward(_) => None,
            Action::Redirect(_) | Action::Respond(_) => metrics.map(|m| m.route(&spec.name, None)),
        };
        let log = self
            .access_log
            .as_ref()
            .filter(|_| namespace_logs(&self.snapshot, namespace))
            .map(|log| RouteLog {
                log: Arc::clone(log),
                namespace: Arc::from(namespace),
                route: Arc::from(spec.name.split_once('/').map_or(&*spec.name, |(_, n)| n)),
            });
        let route = Arc::new(Route {
            name: spec.name.clone(),
            action,
            timeout: timeout::Params {
                response,
                idle: spec
                    .idle_timeout
                    .as_ref()
                    .and_then(prism_proto::defaults::to_std),
            },
            request_headers: HeaderMutation::compile(
                spec.request_headers.as_ref(),
                &spec.name,
                "request_headers",
            )?,
            response_headers: HeaderMutation::compile(
                spec.response_headers.as_ref(),
                &spec.name,
                "response_headers",
            )?,
            rate_limit: ratelimit::Params {
                namespace: self.namespace_limits.get(namespace).cloned(),
                route: own_limits,
            },
            max_request_body_bytes: (spec.max_request_body_bytes > 0)
                .then_some(spec.max_request_body_bytes),
            retry: spec.retry.as_ref().map(retry::Params::compile),
            series,
            log,
        });
        Ok(Some(Entry {
            namespace,
            spec,
            route,
        }))
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
    /// any case, with or without port) that looks like `probe`.
    pub(crate) fn route(&self, host: &str, probe: &Probe<'_>) -> Option<&Arc<Route>> {
        self.matcher.route(host, probe)
    }

    /// The TLS listener's certificates.
    pub(crate) fn certificates(&self) -> &tls::Certificates {
        &self.certificates
    }

    /// This runtime serving the data bindings `data`, opened for its
    /// snapshot.
    pub(crate) fn with_data(mut self, data: Arc<Bindings>) -> Runtime {
        self.data = data;
        self
    }

    /// Every backend of the policy, in no order.
    pub(crate) fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.values()
    }

    /// The proxy's metrics; `None` with metrics off.
    pub(crate) fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    /// The namespaces' data bindings.
    pub(crate) fn data(&self) -> &Arc<Bindings> {
        &self.data
    }

    /// The snapshot this runtime was compiled from.
    pub(crate) fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The rate limits of `namespace`, if it has any.
    pub(crate) fn namespace_limits(&self, namespace: &str) -> Option<&Arc<Limits>> {
        self.namespace_limits.get(namespace)
    }

    /// A backend by full name.
    #[cfg(test)]
    pub(crate) fn backend(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.get(name)
    }
}

#[cfg(test)]
impl Route {
    /// The first backend of a forwarding route.
    pub(crate) fn backend(&self) -> &Arc<Backend> {
        match &self.action {
            Action::Forward(forward) => forward.backends().next().expect("a backend"),
            _ => panic!("route {} does not forward", self.name),
        }
    }
}

/// Whether `namespace` has access logs on.
fn namespace_logs(snapshot: &Snapshot, namespace: &str) -> bool {
    let entry = snapshot.get(&prism_proto::ResourceKey::new(Kind::Namespace, namespace));
    match entry.map(|e| &e.resource) {
        Some(Resource::Namespace(ns)) => ns.access_log.as_ref().is_some_and(|a| a.enabled),
        _ => false,
    }
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
    use prism_proto::pb::config::v1::route_match::Path;
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

    /// The route a plain `GET` of `path` on `host` takes.
    pub(crate) fn lookup<'a>(rt: &'a Runtime, host: &str, path: &str) -> Option<&'a Arc<Route>> {
        let headers = http::HeaderMap::new();
        let probe = Probe {
            method: &http::Method::GET,
            path,
            query: None,
            headers: &headers,
        };
        rt.route(host, &probe)
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
        let route = lookup(&second, "demo.local", "/").expect("route");
        assert!(Arc::ptr_eq(&web, route.backend()));
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
        let timeout = |h: &str, p: &str| lookup(&rt, h, p).map(|t| t.timeout.response);
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
}
