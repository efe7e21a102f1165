//! Fuzzing entry points (the `cargo fuzz` targets in tests/fuzz, and the
//! stable test that replays their regression inputs): not an API, hidden from
//! the docs, built only with the `fuzz` feature.
//!
//! Each function turns a fuzzer's bytes into an input, runs the code under
//! test on it and panics when one of its properties fails, so a target is one
//! line and a kept input replays the same way under `cargo test`. Inputs are
//! drawn from small pools of names, hosts and paths (with a few arbitrary
//! strings mixed in), so most generated policies pass validation and reach the
//! compiler, the matcher and the stager rather than stopping at the first
//! name check.

use std::collections::HashSet;

use arbitrary::{Result, Unstructured};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, Resource as WireResource,
};
use envoy_types::pb::google::protobuf::Any;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use prism_proto::pb::config::v1::key_match::Rule as KeyRule;
use prism_proto::pb::config::v1::route_match::Path;
use prism_proto::pb::config::v1::{
    CaBundle, DataBinding, DirectResponse, KeyMatch, MemoryBus, RouteMatch, WeightedBackend,
    data_binding, secret,
};
use prism_proto::{
    Backend, Endpoint, Kind, Namespace, Policy, Resource, Route, Secret, Snapshot, match_order,
    parse_policy, policy_to_yaml, validate_resource, validate_snapshot,
};
use prost::Message;

use crate::config::stager::{Offer, Stager};
use crate::runtime::{OwnAddresses, Probe, Runtime};

/// Policy decoding and validation: `data` is a YAML/JSON document, a
/// protobuf `Policy` or one protobuf resource (the first byte says which).
/// Whatever decodes and validates must survive the protobuf, JSON and YAML
/// round trips unchanged, and a snapshot that validates must compile in the
/// proxy or be refused with a message; errors always say something.
pub fn policy(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let resources = match mode % 3 {
        0 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            match parse_policy(text) {
                Ok(resources) => resources,
                Err(error) => {
                    assert!(!error.to_string().is_empty(), "empty error for {text:?}");
                    return;
                }
            }
        }
        1 => {
            let Ok(policy) = Policy::decode(rest) else {
                return;
            };
            let resources = resources_of(policy);
            if !resources.iter().all(valid) {
                return;
            }
            resources
        }
        _ => {
            let kind = Kind::ALL[usize::from(mode / 3) % Kind::ALL.len()];
            let Ok(resource) = Resource::decode(kind, rest) else {
                return;
            };
            if !valid(&resource) {
                return;
            }
            vec![resource]
        }
    };

    for resource in &resources {
        let kind = resource.kind();
        let decoded = Resource::decode(kind, &resource.encode_to_vec());
        assert_eq!(decoded.as_ref(), Ok(resource), "protobuf round trip");
        let parsed = Resource::from_json(kind, resource.to_json()).ok();
        assert_eq!(parsed.as_ref(), Some(resource), "JSON round trip");
    }
    // A document holds at least one resource, each once.
    let mut keys = HashSet::new();
    if !resources.is_empty() && resources.iter().all(|r| keys.insert(r.key())) {
        let yaml = policy_to_yaml(&resources);
        match parse_policy(&yaml) {
            Ok(again) => assert_eq!(again, resources, "YAML round trip of\n{yaml}"),
            Err(error) => panic!("a valid policy does not re-read: {error}\n{yaml}"),
        }
    }

    let snapshot = Snapshot::from_resources(1, resources);
    match validate_snapshot(&snapshot) {
        Ok(()) => {
            if let Err(error) = compile(&snapshot) {
                assert!(!error.is_empty(), "empty compile error");
            }
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
}

/// The route matcher's compiler: a generated policy that validates compiles,
/// and every generated request takes the route that the matcher's documented
/// order picks when walked one route at a time ([`reference_route`]).
pub fn routes(data: &[u8]) {
    routes_reached(data);
}

/// [`routes`], returning how many lookups found a route: a test checks that
/// the generators get past validation and into the matcher often.
pub fn routes_reached(data: &[u8]) -> usize {
    let mut u = Unstructured::new(data);
    let Ok(resources) = gen_policy(&mut u) else {
        return 0;
    };
    let mut snapshot = Snapshot::from_resources(1, resources);
    // Drop the resources validation refuses, one at a time, so that a
    // policy with one bad route still gets to the matcher with the others.
    while let Err(error) = validate_snapshot(&snapshot) {
        assert!(!error.message.is_empty(), "empty validation message");
        match error.resource {
            Some(key) if snapshot.remove(&key).is_some() => {}
            _ => return 0,
        }
    }
    let runtime = match Runtime::compile(&snapshot, &Runtime::unconfigured(), &own()) {
        Ok(runtime) => runtime,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return 0;
        }
    };
    let mut found = 0;

    while let Ok(request) = gen_request(&mut u) {
        found += usize::from(check_lookup(&snapshot, &runtime, &request));
        if u.is_empty() {
            break;
        }
    }
    found
}

/// The stager: a sequence of discovery responses (valid, broken and stray),
/// each complete batch compiled and committed or rejected as the discovery
/// client does. It never panics; every NACK carries a reason; each nonce is
/// answered at most once; and every accepted state equals what a fresh stager
/// given all of its resources in one batch accepts, routing the same.
pub fn stager(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut stager = Stager::default();
    let mut runtime = Runtime::unconfigured();
    let mut nonces = 0u32;
    let mut answered = HashSet::new();
    for _ in 0..24 {
        if u.is_empty() {
            break;
        }
        let Ok(op) = u.int_in_range(0u8..=15) else {
            break;
        };
        if op == 0 {
            stager.reset();
            continue;
        }
        nonces += 1;
        let Ok(response) = gen_response(&mut u, nonces.to_string()) else {
            break;
        };
        match stager.offer(response) {
            Offer::Waiting => {}
            Offer::Rejected { message, .. } => assert!(!message.is_empty(), "empty NACK reason"),
            Offer::Ready { candidate, changed } => {
                if let Err(error) = validate_snapshot(&candidate) {
                    panic!("a ready candidate does not validate: {error}");
                }
                let previous = stager.accepted();
                assert_eq!(
                    changed,
                    previous.is_none_or(|a| !Snapshot::diff(a, &candidate).is_empty()),
                    "`changed` is wrong"
                );
                let compiled = if changed {
                    Runtime::compile(&candidate, &runtime, &own()).map(Some)
                } else {
                    Ok(None)
                };
                match compiled {
                    Ok(next) => {
                        if let Some(next) = next {
                            runtime = next;
                        }
                        let accepted = stager.commit().cloned();
                        assert_eq!(
                            accepted.as_ref(),
                            Some(&candidate),
                            "commit keeps the candidate"
                        );
                        check_fresh_apply(&candidate, &runtime, &mut u);
                    }
                    Err(error) => {
                        let message = error.to_string();
                        assert!(!message.is_empty(), "empty compile error");
                        stager.reject(&message);
                    }
                }
            }
        }
        for reply in stager.take_replies() {
            if let Some(error) = &reply.error {
                assert!(!error.is_empty(), "NACK without a reason: {reply:?}");
            }
            assert!(
                answered.insert(reply.nonce.clone()),
                "nonce {} answered twice",
                reply.nonce
            );
        }
    }
}

fn valid(resource: &Resource) -> bool {
    match validate_resource(resource) {
        Ok(()) => true,
        Err(error) => {
            assert!(!error.message.is_empty(), "empty validation message");
            false
        }
    }
}

fn resources_of(policy: Policy) -> Vec<Resource> {
    let Policy {
        namespaces,
        backends,
        routes,
        secrets,
        bindings,
    } = policy;
    namespaces
        .into_iter()
        .map(Resource::Namespace)
        .chain(backends.into_iter().map(Resource::Backend))
        .chain(routes.into_iter().map(Resource::Route))
        .chain(secrets.into_iter().map(Resource::Secret))
        .chain(bindings.into_iter().map(Resource::DataBinding))
        .collect()
}

fn own() -> OwnAddresses {
    OwnAddresses::default()
}

fn compile(snapshot: &Snapshot) -> std::result::Result<Runtime, String> {
    Runtime::compile(snapshot, &Runtime::unconfigured(), &own()).map_err(|e| e.to_string())
}

/// `accepted` given to a fresh stager as one full batch gives the same
/// snapshot, which compiles from nothing into a runtime that routes requests
/// as the runtime built by the applies before it does.
fn check_fresh_apply(accepted: &Snapshot, runtime: &Runtime, u: &mut Unstructured<'_>) {
    let mut fresh = Stager::default();
    let mut offer = Offer::Waiting;
    for kind in Kind::ALL {
        let resources = accepted
            .of_kind(kind)
            .map(|v| WireResource {
                name: v.resource.name().to_string(),
                version: v.version.clone(),
                resource: Some(Any {
                    type_url: kind.type_url().to_string(),
                    value: v.resource.encode_to_vec(),
                }),
                ..Default::default()
            })
            .collect();
        offer = fresh.offer(DeltaDiscoveryResponse {
            system_version_info: accepted.revision.to_string(),
            type_url: kind.type_url().to_string(),
            nonce: kind.to_string(),
            resources,
            ..Default::default()
        });
    }
    let Offer::Ready { candidate, .. } = offer else {
        panic!("a fresh full apply of an accepted state is refused: {offer:?}");
    };
    assert_eq!(&candidate, accepted, "a fresh full apply differs");
    let fresh_runtime = match compile(&candidate) {
        Ok(runtime) => runtime,
        Err(error) => panic!("an accepted state does not compile from nothing: {error}"),
    };
    for _ in 0..4 {
        let Ok(request) = gen_request(u) else {
            return;
        };
        let probe = request.probe();
        let applied = runtime
            .route(&request.host, &probe)
            .map(|r| r.name.as_str());
        let fresh = fresh_runtime
            .route(&request.host, &probe)
            .map(|r| r.name.as_str());
        assert_eq!(
            applied, fresh,
            "applied and fresh runtimes route {request:?} apart"
        );
        check_lookup(accepted, runtime, &request);
    }
}

/// A generated request.
#[derive(Debug)]
struct Request {
    host: String,
    method: Method,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
}

impl Request {
    fn probe(&self) -> Probe<'_> {
        Probe {
            method: &self.method,
            path: &self.path,
            query: self.query.as_deref(),
            headers: &self.headers,
        }
    }
}

/// Whether `request` found a route (the same one in both).
fn check_lookup(snapshot: &Snapshot, runtime: &Runtime, request: &Request) -> bool {
    let found = runtime
        .route(&request.host, &request.probe())
        .map(|r| r.name.as_str());
    let expected = reference_route(snapshot, request);
    assert_eq!(
        found, expected,
        "the matcher and the documented order disagree on {request:?}"
    );
    found.is_some()
}

/// The route the matcher's documented order picks for `request`, found by
/// walking the snapshot's routes one at a time, with no index: the host picks
/// a namespace (exact host, then the longest wildcard suffix, then `*`); the
/// routes naming that host are tried before the namespace-wide ones, each in
/// [`match_order`], and the first whose path and conditions hold wins.
fn reference_route<'s>(snapshot: &'s Snapshot, request: &Request) -> Option<&'s str> {
    let host = reference_host(&request.host);
    let namespaces: Vec<&Namespace> = snapshot
        .of_kind(Kind::Namespace)
        .filter_map(|v| match &v.resource {
            Resource::Namespace(ns) => Some(ns),
            _ => None,
        })
        .collect();
    let routes: Vec<&Route> = snapshot
        .of_kind(Kind::Route)
        .filter_map(|v| match &v.resource {
            Resource::Route(r) => Some(r),
            _ => None,
        })
        .collect();
    let route_host = |r: &Route| {
        r.r#match
            .as_ref()
            .map_or(String::new(), |m| m.host.to_ascii_lowercase())
    };
    let in_namespace = |r: &Route, ns: &str| r.name.split_once('/').is_some_and(|(n, _)| n == ns);

    // The table: (namespace, the host its specific routes name, if any).
    let exact = namespaces.iter().find(|ns| {
        ns.hosts
            .iter()
            .any(|h| !h.starts_with("*.") && h.to_ascii_lowercase() == host)
            || routes
                .iter()
                .any(|r| in_namespace(r, &ns.name) && !host.is_empty() && route_host(r) == host)
    });
    let wildcard = || {
        namespaces
            .iter()
            .flat_map(|ns| ns.hosts.iter().map(move |h| (ns, h)))
            .filter_map(|(ns, h)| {
                let suffix = h.strip_prefix('*')?.to_ascii_lowercase();
                (suffix.starts_with('.') && host.len() > suffix.len() && host.ends_with(&suffix))
                    .then_some((ns, suffix.len()))
            })
            .max_by_key(|(_, len)| *len)
            .map(|(ns, _)| ns)
    };
    let (namespace, specific_host) = match exact {
        Some(ns) => (ns, Some(host.clone())),
        None => match wildcard() {
            Some(ns) => (ns, None),
            None => (
                namespaces
                    .iter()
                    .find(|ns| ns.hosts.iter().any(|h| h == "*"))?,
                Some("*".to_string()),
            ),
        },
    };
    let mut candidates: Vec<&Route> = routes
        .iter()
        .copied()
        .filter(|r| in_namespace(r, &namespace.name))
        .filter(|r| r.r#match.as_ref().is_some_and(|m| m.path.is_some()))
        .collect();
    candidates.sort_by(|a, b| match_order(a).cmp(&match_order(b)));
    let specific = candidates.iter().filter(|r| {
        specific_host
            .as_ref()
            .is_some_and(|h| !h.is_empty() && route_host(r) == *h)
    });
    let wide = candidates.iter().filter(|r| route_host(r).is_empty());
    specific
        .chain(wide)
        .find(|r| {
            r.r#match
                .as_ref()
                .is_some_and(|m| reference_matches(m, request))
        })
        .map(|r| r.name.as_str())
}

/// The host a request names, lowercase, without port or trailing dot; empty
/// when it is too long to be a DNS name.
fn reference_host(host: &str) -> String {
    let host = host.trim();
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    let bare = bare.trim_end_matches('.');
    if bare.len() > 255 {
        return String::new();
    }
    bare.to_ascii_lowercase()
}

fn reference_matches(m: &RouteMatch, request: &Request) -> bool {
    let path = request.path.as_str();
    let path_holds = match &m.path {
        Some(Path::Exact(p)) => path == p,
        Some(Path::Prefix(p)) => path.starts_with(p.as_str()),
        Some(Path::Regex(p)) => whole_match(p, path),
        None => false,
    };
    path_holds
        && (m.methods.is_empty() || m.methods.iter().any(|x| x == request.method.as_str()))
        && m.headers.iter().all(|k| {
            let values: Vec<&str> = request
                .headers
                .iter()
                .filter(|(name, _)| name.as_str().eq_ignore_ascii_case(&k.name))
                .filter_map(|(_, v)| v.to_str().ok())
                .collect();
            let any = request
                .headers
                .keys()
                .any(|name| name.as_str().eq_ignore_ascii_case(&k.name));
            rule_holds(k, any, &values)
        })
        && m.query_params.iter().all(|k| {
            let values: Vec<&str> = request
                .query
                .as_deref()
                .unwrap_or_default()
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
                .filter(|(name, _)| *name == k.name)
                .map(|(_, value)| value)
                // A repeated parameter is judged by its first value, as Envoy does.
                .take(1)
                .collect();
            rule_holds(k, !values.is_empty(), &values)
        })
}

fn rule_holds(k: &KeyMatch, present: bool, values: &[&str]) -> bool {
    match &k.rule {
        Some(KeyRule::Exact(v)) => values.iter().any(|x| x == v),
        Some(KeyRule::Regex(p)) => values.iter().any(|x| whole_match(p, x)),
        Some(KeyRule::Present(_)) => present,
        Some(KeyRule::Absent(_)) => !present,
        None => false,
    }
}

fn whole_match(pattern: &str, text: &str) -> bool {
    regex::Regex::new(&format!(r"\A(?:{pattern})\z")).is_ok_and(|r| r.is_match(text))
}

// Pools the generators draw from, all valid; [`pick`] now and then takes a
// near miss or any string at all instead, so validation is fuzzed too.
const NAMESPACES: [&str; 3] = ["n", "m", "o"];
const HOSTS: [&str; 8] = [
    "a.test", "b.test", "*.test", "*.a.test", "x.a.test", "*", "c.test", "*.b.test",
];
const ROUTE_HOSTS: [&str; 5] = ["a.test", "b.test", "x.a.test", "c.test", "y.b.test"];
const PATHS: [&str; 7] = ["/", "/api", "/api/", "/api/v1", "/a", "/é", "/api/v1/x"];
const REGEXES: [&str; 8] = [
    "/api/.*",
    "/a+",
    "/[a-z]+/v[0-9]",
    "/|/api",
    ".*",
    "/é.*",
    "/api/v1",
    "/a|/ab",
];
const HEADER_NAMES: [&str; 3] = ["x-a", "x-b", "content-type"];
const VALUES: [&str; 5] = ["1", "2", "é", "a b", "[0-9]+"];
const METHODS: [&str; 3] = ["GET", "POST", "PURGE"];
const BACKENDS: [&str; 2] = ["b", "c"];
const ADDRESSES: [&str; 3] = ["127.0.0.1:9", "10.0.0.1:80", "[::1]:8080"];
const QUERY_NAMES: [&str; 3] = ["q", "a", "x-a"];
const NEAR_MISSES: [&str; 14] = [
    "",
    "A.test",
    "*.x",
    "a.test:80",
    "(",
    "bad name",
    "X-A",
    "nope",
    "api",
    "get",
    "localhost:80",
    "*",
    "/",
    "n/",
];
const REQUEST_HOSTS: [&str; 12] = [
    "a.test",
    "A.TEST:8080",
    "x.a.test",
    "y.a.test",
    "q.x.a.test",
    "b.test.",
    "c.test",
    "other",
    "[::1]:80",
    "",
    "a.test:http",
    ".a.test",
];
const REQUEST_PATHS: [&str; 9] = [
    "/",
    "/api",
    "/api/",
    "/api/v1",
    "/api/v1/x",
    "/apix",
    "/a",
    "/aa",
    "/é/x",
];
const QUERIES: [Option<&str>; 6] = [
    None,
    Some("q=1"),
    Some("a=2&q"),
    Some("x-a=1&x-a=2"),
    Some("="),
    Some("&&q=[0-9]+"),
];

/// One string from `pool`, or now and then a near miss or any string at all.
fn pick(u: &mut Unstructured<'_>, pool: &[&str]) -> Result<String> {
    if u.ratio(1, 255)? {
        return Ok(u.arbitrary::<&str>()?.to_string());
    }
    if u.ratio(1, 128)? {
        return Ok(u.choose(&NEAR_MISSES)?.to_string());
    }
    Ok(u.choose(pool)?.to_string())
}

fn list<T>(
    u: &mut Unstructured<'_>,
    max: u8,
    mut item: impl FnMut(&mut Unstructured<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let n = u.int_in_range(0..=max)?;
    (0..n).map(|_| item(u)).collect()
}

/// Like [`list`], without repeats (validation refuses a host, method or
/// backend listed twice).
fn distinct(u: &mut Unstructured<'_>, max: u8, pool: &[&str]) -> Result<Vec<String>> {
    let mut items = list(u, max, |u| pick(u, pool))?;
    let mut seen = HashSet::new();
    items.retain(|item| seen.insert(item.clone()));
    Ok(items)
}

fn gen_policy(u: &mut Unstructured<'_>) -> Result<Vec<Resource>> {
    let mut resources = vec![gen_namespace(u)?];
    resources.extend(list(u, 2, gen_namespace)?);
    // Backends and routes of the namespaces just made, mostly.
    let names: Vec<String> = resources.iter().map(|r| r.name().to_string()).collect();
    let namespaces: Vec<&str> = names.iter().map(String::as_str).collect();
    for namespace in &namespaces {
        let mut backend = gen_backend(u, &[namespace])?;
        if let Resource::Backend(spec) = &mut backend {
            spec.name = format!("{namespace}/b");
        }
        resources.push(backend);
    }
    resources.extend(list(u, 2, |u| gen_backend(u, &namespaces))?);
    resources.extend(list(u, 10, |u| gen_route(u, &namespaces))?);
    Ok(resources)
}

fn gen_resource(u: &mut Unstructured<'_>, kind: Kind) -> Result<Resource> {
    match kind {
        Kind::Secret => gen_secret(u),
        Kind::Namespace => gen_namespace(u),
        Kind::Backend => gen_backend(u, &NAMESPACES),
        Kind::Route => gen_route(u, &NAMESPACES),
        Kind::DataBinding => gen_binding(u),
    }
}

/// A binding to the in-memory bus: one that needs no IO to open (the
/// targets compile runtimes without the data gateway's pools).
fn gen_binding(u: &mut Unstructured<'_>) -> Result<Resource> {
    Ok(Resource::DataBinding(DataBinding {
        name: format!(
            "{}/{}",
            u.choose(&NAMESPACES)?,
            pick(u, &["bus", "events"])?
        ),
        store: Some(data_binding::Store::Memory(MemoryBus {})),
        max_value_bytes: u.int_in_range(0..=8 << 20)?,
        ..Default::default()
    }))
}

fn gen_secret(u: &mut Unstructured<'_>) -> Result<Resource> {
    let certificates = if u.ratio(1, 4)? {
        pick(u, &["nope"])?
    } else {
        include_str!("../../tests/support/tls/ca.pem").to_string()
    };
    Ok(Resource::Secret(Secret {
        name: format!("{}/ca", u.choose(&NAMESPACES)?),
        kind: Some(secret::Kind::CaBundle(CaBundle { certificates })),
    }))
}

fn gen_namespace(u: &mut Unstructured<'_>) -> Result<Resource> {
    Ok(Resource::Namespace(Namespace {
        name: pick(u, &NAMESPACES)?,
        hosts: {
            // A namespace without hosts answers nothing: give most one.
            let mut hosts = distinct(u, 3, &HOSTS)?;
            if hosts.is_empty() && !u.ratio(1, 8)? {
                hosts.push(pick(u, &HOSTS)?);
            }
            hosts
        },
        ..Default::default()
    }))
}

fn gen_backend(u: &mut Unstructured<'_>, namespaces: &[&str]) -> Result<Resource> {
    Ok(Resource::Backend(Backend {
        name: format!("{}/{}", pick(u, namespaces)?, pick(u, &BACKENDS)?),
        endpoints: (0..u.int_in_range(1..=2)?)
            .map(|_| {
                Ok(Endpoint {
                    address: pick(u, &ADDRESSES)?,
                    ..Default::default()
                })
            })
            .collect::<Result<_>>()?,
        // Ring hash and Maglev need a hash policy, which this leaves out.
        lb_policy: u.int_in_range(0..=3)?,
        ..Default::default()
    }))
}

fn gen_route(u: &mut Unstructured<'_>, namespaces: &[&str]) -> Result<Resource> {
    let path = match u.int_in_range(0..=24)? {
        0..=7 => Some(Path::Exact(pick(u, &PATHS)?)),
        8..=15 => Some(Path::Prefix(pick(u, &PATHS)?)),
        16..=23 => Some(Path::Regex(pick(u, &REGEXES)?)),
        _ => None,
    };
    let host = if u.ratio(1, 2)? {
        String::new()
    } else {
        pick(u, &ROUTE_HOSTS)?
    };
    let mut route = Route {
        name: format!("{}/r{}", pick(u, namespaces)?, u.int_in_range(0..=9)?),
        r#match: Some(RouteMatch {
            host,
            path,
            // Conditions now and then: routes that differ only in them are
            // rarer than routes that share a path shape.
            methods: conditions(u, |u| distinct(u, 2, &METHODS))?,
            headers: conditions(u, |u| list(u, 2, |u| gen_key_match(u, &HEADER_NAMES)))?,
            query_params: conditions(u, |u| list(u, 2, |u| gen_key_match(u, &QUERY_NAMES)))?,
        }),
        ..Default::default()
    };
    match u.int_in_range(0..=5)? {
        0 => {
            route.direct_response = Some(DirectResponse {
                status: 200,
                body: String::new(),
            })
        }
        1 => {
            route.backends = distinct(u, 2, &BACKENDS)?
                .into_iter()
                .map(|name| {
                    Ok(WeightedBackend {
                        name,
                        weight: u.int_in_range(1..=3)?,
                    })
                })
                .collect::<Result<_>>()?
        }
        _ => route.backend = "b".into(),
    }
    Ok(Resource::Route(route))
}

/// `make`'s list one time in four, else none.
fn conditions<T>(
    u: &mut Unstructured<'_>,
    make: impl FnOnce(&mut Unstructured<'_>) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    if u.ratio(1, 4)? {
        make(u)
    } else {
        Ok(Vec::new())
    }
}

fn gen_key_match(u: &mut Unstructured<'_>, names: &[&str]) -> Result<KeyMatch> {
    let rule = match u.int_in_range(0..=16)? {
        0..=3 => Some(KeyRule::Exact(pick(u, &VALUES)?)),
        4..=7 => Some(KeyRule::Regex(pick(u, &VALUES)?)),
        8..=11 => Some(KeyRule::Present(true)),
        12..=15 => Some(KeyRule::Absent(true)),
        _ => None,
    };
    Ok(KeyMatch {
        name: pick(u, names)?,
        rule,
    })
}

fn gen_request(u: &mut Unstructured<'_>) -> Result<Request> {
    let method = Method::from_bytes(pick(u, &METHODS)?.as_bytes()).unwrap_or(Method::GET);
    let mut headers = HeaderMap::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let name = HeaderName::from_bytes(u.choose(&HEADER_NAMES)?.as_bytes());
        let value = HeaderValue::from_str(&pick(u, &VALUES)?);
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.append(name, value);
        }
    }
    Ok(Request {
        host: pick(u, &REQUEST_HOSTS)?,
        method,
        path: pick(u, &REQUEST_PATHS)?,
        query: u.choose(&QUERIES)?.map(str::to_string),
        headers,
    })
}

/// One discovery response: mostly well formed, sometimes with an unknown
/// type URL, a revision that is no number, or a broken resource.
fn gen_response(u: &mut Unstructured<'_>, nonce: String) -> Result<DeltaDiscoveryResponse> {
    let kind = *u.choose(&Kind::ALL)?;
    let type_url = if u.ratio(1, 32)? {
        "type.googleapis.com/other.Thing".to_string()
    } else {
        kind.type_url().to_string()
    };
    let system_version_info = if u.ratio(1, 32)? {
        "next".to_string()
    } else {
        u.int_in_range(1u64..=3)?.to_string()
    };
    let resources = list(u, 3, |u| {
        let resource = gen_resource(u, kind)?;
        let mut wire = WireResource {
            name: resource.name().to_string(),
            version: u.choose(&["", "", "v1", "v2"])?.to_string(),
            resource: Some(Any {
                type_url: kind.type_url().to_string(),
                value: resource.encode_to_vec(),
            }),
            ..Default::default()
        };
        match u.int_in_range(0u8..=31)? {
            0 => wire.resource = None,
            1 => wire.name = "n/other".into(),
            2 => {
                if let Some(any) = wire.resource.as_mut() {
                    any.type_url = u.choose(&Kind::ALL)?.type_url().to_string();
                }
            }
            3 => {
                if let Some(any) = wire.resource.as_mut() {
                    any.value = u.arbitrary::<&[u8]>()?.to_vec();
                }
            }
            _ => {}
        }
        Ok(wire)
    })?;
    let removed_resources = list(u, 2, |u| Ok(gen_resource(u, kind)?.name().to_string()))?;
    Ok(DeltaDiscoveryResponse {
        system_version_info,
        type_url,
        nonce,
        resources,
        removed_resources,
        ..Default::default()
    })
}

/// The HTTP/1.1 server codec's request parsing: `data` is a split point
/// (its first byte) and bytes off the wire. The head parser must give the same
/// answer whether the bytes come at once or in two reads, leave an
/// incomplete head untouched and never take more than the input; a body
/// after a parsed head then goes through the body decoder the head's framing
/// asks for, in reads of the same split, which must yield only non-empty data,
/// never more than it was given, and nothing after its end.
pub fn h1_request(data: &[u8]) {
    use bytes::BytesMut;

    use crate::http::h1::chunked::{Chunk, ChunkedDecoder};
    use crate::http::h1::head::{self, Framing};

    const MAX_BYTES: usize = 4096;
    const MAX_HEADERS: usize = 16;
    let Some((&split, wire)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).min(wire.len());
    let whole = head::parse(&mut BytesMut::from(wire), MAX_BYTES, MAX_HEADERS);
    let mut buf = BytesMut::from(&wire[..split]);
    let parsed = match head::parse(&mut buf, MAX_BYTES, MAX_HEADERS) {
        Ok(None) => {
            assert_eq!(&buf[..], &wire[..split], "an incomplete head stays as read");
            buf.extend_from_slice(&wire[split..]);
            head::parse(&mut buf, MAX_BYTES, MAX_HEADERS)
        }
        first => first,
    };
    let head = match (whole, parsed) {
        (Ok(Some(whole)), Ok(Some(head))) => {
            assert_eq!(whole.request.uri(), head.request.uri());
            assert_eq!(whole.request.headers(), head.request.headers());
            assert_eq!(whole.framing, head.framing);
            assert!(whole.rest.starts_with(&head.rest));
            whole
        }
        (Ok(None), Ok(None)) => return,
        (Err(whole), Err(parsed)) => {
            assert_eq!(whole.status(), parsed.status(), "{whole} / {parsed}");
            return;
        }
        (whole, parsed) => panic!("read whole: {whole:?}; in two: {parsed:?}"),
    };
    assert!(head.rest.len() <= wire.len());
    assert!(
        wire.ends_with(&head.rest),
        "what follows the head is the input's tail"
    );
    let Framing::Chunked = head.framing else {
        return;
    };
    let mut decoder = ChunkedDecoder::new(1024);
    let mut buf = BytesMut::new();
    let mut given = 0;
    let mut taken = 0;
    for piece in [
        &head.rest[..split.min(head.rest.len())],
        &head.rest[split.min(head.rest.len())..],
    ] {
        buf.extend_from_slice(piece);
        given += piece.len();
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(Chunk::Data(data))) => {
                    assert!(!data.is_empty(), "empty data");
                    taken += data.len();
                }
                Ok(Some(Chunk::End(_))) => {
                    assert!(decoder.is_done());
                    let left = buf.len();
                    assert!(matches!(decoder.decode(&mut buf), Ok(None)));
                    assert_eq!(buf.len(), left, "nothing taken after the end");
                    return;
                }
                Ok(None) => break,
                Err(error) => {
                    assert!(!error.to_string().is_empty());
                    return;
                }
            }
            assert!(buf.len() < before, "a decoded item consumed nothing");
        }
        assert!(taken + buf.len() <= given, "more data than input");
    }
}

/// A target's check of one input.
pub type Check = fn(&[u8]);

/// The targets by name, for the replay of kept inputs.
pub const TARGETS: [(&str, Check); 4] = [
    ("h1_request", h1_request),
    ("policy", policy),
    ("routes", routes),
    ("stager", stager),
];
