//! RouteConfiguration `prism-http`: virtual hosts per namespace and route
//! host, each Prism route as an Envoy route (match, action, header changes,
//! retries, rate limits, body limit).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, HeaderValue, HeaderValueOption, RuntimeFractionalPercent, data_source,
    header_value_option,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, FilterConfig, HeaderMatcher, QueryParameterMatcher,
    RateLimit as EnvoyRateLimit, RedirectAction, RetryPolicy as EnvoyRetryPolicy,
    Route as EnvoyRoute, RouteAction, RouteConfiguration, RouteMatch as EnvoyRouteMatch,
    VirtualHost, WeightedCluster, header_matcher, query_parameter_matcher, rate_limit,
    redirect_action, retry_policy, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    LocalRateLimitDescriptor, rate_limit_descriptor,
};
use envoy_types::pb::envoy::extensions::filters::http::buffer::v3::{
    Buffer, BufferPerRoute, buffer_per_route,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, TokenBucket, fractional_percent};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration, UInt32Value};
use envoy_types::util::pack_any;
use prism_proto::pb::config::v1::route_match::Path;
use prism_proto::pb::config::v1::{
    DirectResponse, HeaderMutation, KeyMatch, RateLimit, Redirect, RetryPolicy, hash_policy,
    key_match, rewrite,
};
use prism_proto::{
    Backend, Kind, LbPolicy, MAX_DIRECT_RESPONSE_BODY_BYTES, Namespace, Route, RouteMatch,
    Snapshot, VersionHasher, Versioned, defaults, match_order,
};
use prost::Message;

use super::{
    DEFAULT_ROUTE_TIMEOUT, HTTP_ROUTES, Policy, ROUTE_CONFIGURATION, envoy_duration, some_duration,
};

/// Name of the HTTP filter that enforces namespace rate limits (configured
/// per virtual host).
pub(super) const NAMESPACE_RATE_LIMIT_FILTER: &str = "prism.namespace_rate_limit";
/// Name of the HTTP filter that enforces route rate limits (configured per
/// route). Two filters, because Envoy lets a route's config replace its
/// virtual host's, and Prism's namespace and route limits both apply.
pub(super) const ROUTE_RATE_LIMIT_FILTER: &str = "prism.route_rate_limit";
/// Name of the HTTP filter that enforces `max_request_body_bytes`.
pub(super) const BUFFER_FILTER: &str = "prism.max_request_body";
/// How many client IP addresses one per-client-IP limit tracks at once
/// (Envoy keeps the buckets of the most recent ones; its default is 20).
const MAX_CLIENT_BUCKETS: u32 = 10_000;
/// Well-known name of Envoy's retry host predicate that refuses the hosts a
/// request has already tried.
const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
/// How many times Envoy draws again for a retry when it draws an endpoint
/// the request has tried. Prism's proxy picks among the untried ones at
/// once; Envoy can only redraw, so it redraws until missing them all is
/// unlikely: with half the endpoints tried, 32 redraws all miss once in
/// four billion retries. Redraws are in memory and cheap.
const RETRY_HOST_SELECTION_ATTEMPTS: i64 = 32;
/// Methods a retry is safe for unless the route says `retry_non_idempotent`.
const IDEMPOTENT_METHODS: &str = "GET|HEAD|OPTIONS|TRACE|PUT|DELETE";

/// Field numbers of the maps and lists that [`encode`] writes by hand.
const CONFIG_VIRTUAL_HOSTS: u32 = 2;
const VIRTUAL_HOST_ROUTES: u32 = 3;
const VIRTUAL_HOST_FILTERS: u32 = 15;
const ROUTE_FILTERS: u32 = 13;

/// An Envoy route and its `typed_per_filter_config`, kept apart: prost writes
/// a map in random order, and a resource's version is a hash of its bytes.
#[derive(Debug)]
struct RouteEntry {
    route: EnvoyRoute,
    filters: BTreeMap<String, Any>,
}

/// A virtual host without its routes, its routes (each an encoded Envoy
/// `Route`), and its per-filter config.
struct VirtualHostEntry {
    vhost: VirtualHost,
    routes: Vec<EncodedRoute>,
    filters: BTreeMap<String, Any>,
}

/// An encoded Envoy `Route` and the hash of its bytes, taken once when it is
/// encoded, from which the RouteConfiguration's version is made.
#[derive(Clone, Debug)]
struct EncodedRoute {
    bytes: Arc<[u8]>,
    hash: u64,
}

impl EncodedRoute {
    fn new(bytes: Vec<u8>) -> Self {
        let mut hasher = VersionHasher::default();
        hasher.write(&bytes);
        EncodedRoute {
            bytes: Arc::from(bytes),
            hash: hasher.finish(),
        }
    }
}

/// What a route's translation depends on besides the route itself: the
/// version of every namespace, backend and secret. Conservative: any change
/// to one of them makes every route translate afresh.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct RouteContext(Vec<(Kind, String, String)>);

impl RouteContext {
    pub(super) fn of(snapshot: &Snapshot) -> Self {
        let kinds = [Kind::Secret, Kind::Namespace, Kind::Backend];
        RouteContext(
            kinds
                .into_iter()
                .flat_map(|kind| snapshot.of_kind(kind))
                .map(|v| {
                    let name = v.resource.name().to_string();
                    (v.resource.kind(), name, v.version.clone())
                })
                .collect(),
        )
    }
}

/// The encoded Envoy routes of one translation, for the next translation to
/// reuse: a policy write then re-encodes only the routes it changed. Holds
/// the routes of one policy, replaced per translation.
#[derive(Debug, Default)]
pub(super) struct RouteCache {
    context: RouteContext,
    /// Every route of the policy as the snapshot holds it (whose identity
    /// and version tell a route that did not change), in name order, with
    /// its encoded Envoy `Route`: `None` when the route is left out.
    routes: Vec<(Arc<Versioned>, Option<EncodedRoute>)>,
}

impl RouteCache {
    /// The encoded Envoy route of every route of `policy`, in its order,
    /// each from `previous` when the route did not change (`previous` having
    /// been translated in the same context). Both are in name order, so a
    /// route's previous encoding is found by walking `previous` alongside,
    /// one comparison per route rather than a lookup.
    fn of(policy: &Policy<'_>, context: &RouteContext, previous: &RouteCache) -> RouteCache {
        let timeouts: HashMap<&str, Duration> = policy
            .namespaces
            .iter()
            .map(|ns| (ns.name.as_str(), namespace_timeout(ns)))
            .collect();
        let mut held = previous.routes.iter().peekable();
        let routes = policy
            .routes
            .iter()
            .map(|route| {
                let name = route.route.name.as_str();
                while held.next_if(|(v, _)| v.resource.name() < name).is_some() {}
                let reused = held
                    .peek()
                    .filter(|(v, _)| {
                        v.resource.name() == name
                            && (Arc::ptr_eq(v, route.versioned)
                                || v.version == route.versioned.version)
                    })
                    .map(|(_, encoded)| encoded.clone());
                // A route outside any namespace is never served, so it is
                // not encoded; a new namespace changes the context, which
                // makes every route encode afresh.
                let encoded = reused.unwrap_or_else(|| {
                    let timeout = timeouts.get(route.namespace)?;
                    envoy_route(policy, route.namespace, route.route, timeout)
                        .map(|entry| EncodedRoute::new(encode_route(&entry)))
                });
                (Arc::clone(route.versioned), encoded)
            })
            .collect();
        RouteCache {
            context: RouteContext(context.0.clone()),
            routes,
        }
    }

    /// How many of these routes share their encoding with `previous`.
    #[cfg(test)]
    pub(super) fn reused_from(&self, previous: &RouteCache) -> usize {
        let before: HashMap<&str, &EncodedRoute> = previous
            .routes
            .iter()
            .filter_map(|(v, encoded)| Some((v.resource.name(), encoded.as_ref()?)))
            .collect();
        self.routes
            .iter()
            .filter(|(v, encoded)| {
                matches!(
                    (before.get(v.resource.name()), encoded),
                    (Some(a), Some(b)) if Arc::ptr_eq(&a.bytes, &b.bytes)
                )
            })
            .count()
    }
}

/// Routes of one namespace, by their index in the policy: those for every
/// host, and those restricted to one host, each in match order.
#[derive(Default)]
struct NamespaceRoutes<'a> {
    wide: Vec<usize>,
    by_host: BTreeMap<&'a str, Vec<usize>>,
}

/// RouteConfiguration `prism-http`, encoded.
///
/// One VirtualHost per namespace (named after it), whose domains are its hosts,
/// each also as `host:*` so a Host header with a port matches; wildcard hosts
/// stay Envoy suffix wildcards (`*.demo.test`), the catch-all `*` stays `*`
/// (Envoy's default virtual host), and `ignore_port_in_host_matching` lets
/// those match with a port too. A host that routes are restricted to gets
/// its own VirtualHost `ns/host` (domains `host`, `host:*`) holding those routes
/// first and then the namespace-wide ones, and leaves the namespace's
/// VirtualHost. Envoy rejects a RouteConfiguration in which two VirtualHosts
/// share a domain, or one has no domain, so a domain is given once (namespace
/// hosts before route hosts, then in name order) and a VirtualHost left without
/// domains is dropped: a namespace with no hosts cannot be reached anyway.
///
/// A namespace's rate limits are configured on each of its virtual hosts, so
/// Envoy keeps one bucket per virtual host, not one per namespace.
///
/// Routes that `previous` holds unchanged in an unchanged `context` are
/// reused encoded; the configuration's version (see
/// [`super::EnvoyResources::route_configuration_versions`]) and the cache of
/// this configuration are returned with it.
pub(super) fn route_configuration(
    policy: &Policy<'_>,
    context: &RouteContext,
    previous: &RouteCache,
) -> (Any, String, RouteCache) {
    let mut grouped: BTreeMap<&str, NamespaceRoutes<'_>> = BTreeMap::new();
    for (index, route) in policy.routes.iter().enumerate() {
        let Some(m) = &route.route.r#match else {
            continue;
        };
        let group = grouped.entry(route.namespace).or_default();
        match m.host.as_str() {
            "" => group.wide.push(index),
            host => group.by_host.entry(host).or_default().push(index),
        }
    }
    let by_match = |a: &usize, b: &usize| {
        match_order(policy.routes[*a].route).cmp(&match_order(policy.routes[*b].route))
    };
    for group in grouped.values_mut() {
        group.wide.sort_by(by_match);
        for host_routes in group.by_host.values_mut() {
            host_routes.sort_by(by_match);
        }
    }

    let fresh = RouteCache::default();
    let previous = if previous.context == *context {
        previous
    } else {
        &fresh
    };
    let cache = RouteCache::of(policy, context, previous);
    let empty = NamespaceRoutes::default();
    let mut claimed = BTreeSet::new();
    let mut namespace_hosts = Vec::new();
    let mut host_vhosts = Vec::new();
    for ns in &policy.namespaces {
        let group = grouped.get(ns.name.as_str()).unwrap_or(&empty);
        let envoy_routes = |routes: &[usize]| -> Vec<EncodedRoute> {
            routes
                .iter()
                .filter_map(|index| cache.routes[*index].1.clone())
                .collect()
        };
        let filters = namespace_filters(ns);
        let wide = envoy_routes(&group.wide);
        let own_hosts = ns
            .hosts
            .iter()
            .filter(|h| !group.by_host.contains_key(h.as_str()));
        let domains = claim(&mut claimed, own_hosts.flat_map(|h| domains_of(h)));
        namespace_hosts.push(VirtualHostEntry {
            vhost: VirtualHost {
                name: ns.name.clone(),
                domains,
                ..Default::default()
            },
            routes: wide.clone(),
            filters: filters.clone(),
        });
        for (host, routes) in &group.by_host {
            let mut routes = envoy_routes(routes);
            routes.extend(wide.iter().cloned());
            host_vhosts.push(VirtualHostEntry {
                vhost: VirtualHost {
                    name: format!("{}/{host}", ns.name),
                    domains: domains_of(host),
                    ..Default::default()
                },
                routes,
                filters: filters.clone(),
            });
        }
    }
    // Namespace hosts were claimed above; route hosts take what is left.
    for entry in &mut host_vhosts {
        entry.vhost.domains = claim(&mut claimed, std::mem::take(&mut entry.vhost.domains));
    }
    let mut virtual_hosts = namespace_hosts;
    virtual_hosts.extend(host_vhosts);
    virtual_hosts.retain(|entry| !entry.vhost.domains.is_empty());
    virtual_hosts.sort_by(|a, b| a.vhost.name.cmp(&b.vhost.name));
    let config = RouteConfiguration {
        name: HTTP_ROUTES.to_string(),
        ignore_port_in_host_matching: true,
        max_direct_response_body_size_bytes: Some(UInt32Value {
            value: u32::try_from(MAX_DIRECT_RESPONSE_BODY_BYTES).unwrap_or(u32::MAX),
        }),
        ..Default::default()
    };
    let (any, version) = encode(&config, &virtual_hosts);
    (any, version, cache)
}

/// An Envoy route with its per-filter config map written in key order.
fn encode_route(entry: &RouteEntry) -> Vec<u8> {
    let mut buf = entry.route.encode_to_vec();
    write_filters(ROUTE_FILTERS, &entry.filters, &mut buf);
    buf
}

/// `map` as the map field `tag`, in key order.
fn write_filters(tag: u32, map: &BTreeMap<String, Any>, buf: &mut Vec<u8>) {
    use prost::encoding::{btree_map, message, string};
    btree_map::encode(
        string::encode,
        string::encoded_len,
        message::encode,
        message::encoded_len,
        tag,
        map,
        buf,
    );
}

/// `config` with `virtual_hosts` and their routes, the per-filter config maps
/// written in key order, and its version. Fields may come out of number
/// order, which every protobuf parser accepts.
///
/// Each route is copied once, straight into place, and its bytes are not
/// hashed again: the version hashes every other byte of the configuration
/// (which include each route's length) and, in place of each route's bytes,
/// the hash taken when it was encoded.
fn encode(config: &RouteConfiguration, virtual_hosts: &[VirtualHostEntry]) -> (Any, String) {
    let head = config.encode_to_vec();
    let vhosts: Vec<(Vec<u8>, Vec<u8>, usize)> = virtual_hosts
        .iter()
        .map(|entry| {
            let mut filters = Vec::new();
            write_filters(VIRTUAL_HOST_FILTERS, &entry.filters, &mut filters);
            let routes: usize = entry
                .routes
                .iter()
                .map(|route| delimited_len(VIRTUAL_HOST_ROUTES, route.bytes.len()))
                .sum();
            let vhost = entry.vhost.encode_to_vec();
            let len = vhost.len() + routes + filters.len();
            (vhost, filters, len)
        })
        .collect();
    // Sized once: growing a buffer of some 620 KB would copy it again and again.
    let len = head.len()
        + vhosts
            .iter()
            .map(|(_, _, len)| delimited_len(CONFIG_VIRTUAL_HOSTS, *len))
            .sum::<usize>();
    let mut out = Assembly {
        buf: Vec::with_capacity(len),
        version: VersionHasher::default(),
    };
    out.raw(&head);
    for (entry, (vhost, filters, len)) in virtual_hosts.iter().zip(vhosts) {
        out.delimiter(CONFIG_VIRTUAL_HOSTS, len);
        out.raw(&vhost);
        for route in &entry.routes {
            out.delimiter(VIRTUAL_HOST_ROUTES, route.bytes.len());
            out.buf.extend_from_slice(&route.bytes);
            out.version.write(&route.hash.to_le_bytes());
        }
        out.raw(&filters);
    }
    let any = Any {
        type_url: ROUTE_CONFIGURATION.to_string(),
        value: out.buf,
    };
    (any, out.version.version())
}

/// A RouteConfiguration being written, and the hash of what is written.
struct Assembly {
    buf: Vec<u8>,
    version: VersionHasher,
}

impl Assembly {
    /// `bytes`, written and hashed.
    fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.version.write(bytes);
    }

    /// The key and length of the length-delimited field `tag`, whose `len`
    /// bytes follow (an encoded message, so that repeated fields are
    /// concatenated from pieces encoded once).
    fn delimiter(&mut self, tag: u32, len: usize) {
        use prost::encoding::{WireType, encode_key, encode_varint};
        // A key and a varint take at most 5 and 10 bytes: written on the
        // stack, since a RouteConfiguration has one per route.
        let mut head = [0u8; 16];
        let mut rest = &mut head[..];
        encode_key(tag, WireType::LengthDelimited, &mut rest);
        encode_varint(len as u64, &mut rest);
        let written = 16 - rest.len();
        self.raw(&head[..written]);
    }
}

/// The encoded length of `len` bytes as the length-delimited field `tag`.
fn delimited_len(tag: u32, len: usize) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// `host` and, for an exact host, `host:*`. A second wildcard in a domain
/// would never match, so a wildcard host (and the catch-all `*`) stays as it is.
fn domains_of(host: &str) -> Vec<String> {
    if host.contains('*') {
        vec![host.to_string()]
    } else {
        vec![host.to_string(), format!("{host}:*")]
    }
}

/// The domains of `wanted` that no VirtualHost holds yet, now claimed.
fn claim(claimed: &mut BTreeSet<String>, wanted: impl IntoIterator<Item = String>) -> Vec<String> {
    wanted
        .into_iter()
        .filter(|d| claimed.insert(d.clone()))
        .collect()
}

/// A Prism route as an Envoy route. A route without a path (which
/// validation rejects) is left out: Envoy requires one.
fn envoy_route(
    policy: &Policy<'_>,
    namespace: &str,
    route: &Route,
    namespace_timeout: &Duration,
) -> Option<RouteEntry> {
    let m = route.r#match.as_ref()?;
    let r#match = envoy_match(m)?;
    let action = if let Some(redirect) = &route.redirect {
        route::Action::Redirect(redirect_action(redirect))
    } else if let Some(direct) = &route.direct_response {
        route::Action::DirectResponse(direct_response(direct))
    } else {
        route::Action::Route(route_action(policy, namespace, route, namespace_timeout))
    };
    let (request_headers_to_add, request_headers_to_remove) =
        header_mutation(route.request_headers.as_ref());
    let (response_headers_to_add, response_headers_to_remove) =
        header_mutation(route.response_headers.as_ref());
    let mut filters = BTreeMap::new();
    if let Some(config) = rate_limit_config(&route.rate_limits, "prism_route_rate_limit") {
        filters.insert(ROUTE_RATE_LIMIT_FILTER.to_string(), config);
    }
    if route.max_request_body_bytes > 0 {
        filters.insert(
            BUFFER_FILTER.to_string(),
            enabled(pack_any(BufferPerRoute {
                r#override: Some(buffer_per_route::Override::Buffer(Buffer {
                    // Envoy counts in u32; a larger limit is as good as none.
                    max_request_bytes: Some(UInt32Value {
                        value: u32::try_from(route.max_request_body_bytes).unwrap_or(u32::MAX),
                    }),
                })),
            })),
        );
    }
    Some(RouteEntry {
        route: EnvoyRoute {
            name: route.name.clone(),
            r#match: Some(r#match),
            action: Some(action),
            request_headers_to_add,
            request_headers_to_remove,
            response_headers_to_add,
            response_headers_to_remove,
            ..Default::default()
        },
        filters,
    })
}

/// The timeout of a namespace's routes that set none.
fn namespace_timeout(ns: &Namespace) -> Duration {
    some_duration(ns.default_timeout.as_ref()).unwrap_or(DEFAULT_ROUTE_TIMEOUT)
}

/// The per-filter config of a namespace's virtual hosts.
fn namespace_filters(ns: &Namespace) -> BTreeMap<String, Any> {
    rate_limit_config(&ns.rate_limits, "prism_namespace_rate_limit")
        .map(|config| (NAMESPACE_RATE_LIMIT_FILTER.to_string(), config))
        .into_iter()
        .collect()
}

/// Path, methods (a `:method` header matcher), headers and query parameters.
fn envoy_match(m: &RouteMatch) -> Option<EnvoyRouteMatch> {
    let path_specifier = match m.path.as_ref()? {
        Path::Exact(p) => route_match::PathSpecifier::Path(p.clone()),
        Path::Prefix(p) => route_match::PathSpecifier::Prefix(p.clone()),
        // Envoy's safe_regex matches the whole path, as Prism's does.
        Path::Regex(p) => route_match::PathSpecifier::SafeRegex(regex(p)),
    };
    let mut headers: Vec<HeaderMatcher> = Vec::new();
    match m.methods.as_slice() {
        [] => {}
        [one] => headers.push(header(":method", exact(one))),
        many => headers.push(header(
            ":method",
            regex_string(&many.iter().map(|m| escape(m)).collect::<Vec<_>>().join("|")),
        )),
    }
    headers.extend(m.headers.iter().filter_map(header_match));
    let mut query_parameters = Vec::new();
    for param in &m.query_params {
        let specifier = match &param.rule {
            Some(key_match::Rule::Exact(v)) => {
                query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(exact(v))
            }
            Some(key_match::Rule::Regex(p)) => {
                query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(regex_string(p))
            }
            Some(key_match::Rule::Present(_)) => {
                query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true)
            }
            // Envoy's query matcher cannot say "absent": the path (which
            // holds the query) must not match `name` as a parameter.
            Some(key_match::Rule::Absent(_)) => {
                headers.push(HeaderMatcher {
                    invert_match: true,
                    ..header(
                        ":path",
                        regex_string(&format!(
                            r"[^?]*\?(.*&)?{}(=[^&]*)?(&.*)?",
                            escape(&param.name)
                        )),
                    )
                });
                continue;
            }
            None => continue,
        };
        query_parameters.push(QueryParameterMatcher {
            name: param.name.clone(),
            query_parameter_match_specifier: Some(specifier),
        });
    }
    Some(EnvoyRouteMatch {
        path_specifier: Some(path_specifier),
        headers,
        query_parameters,
        ..Default::default()
    })
}

/// A header condition. Absent is "present", inverted.
fn header_match(k: &KeyMatch) -> Option<HeaderMatcher> {
    let matcher = match k.rule.as_ref()? {
        key_match::Rule::Exact(v) => header(&k.name, exact(v)),
        key_match::Rule::Regex(p) => header(&k.name, regex_string(p)),
        key_match::Rule::Present(_) => present(&k.name),
        key_match::Rule::Absent(_) => HeaderMatcher {
            invert_match: true,
            ..present(&k.name)
        },
    };
    Some(matcher)
}

fn header(name: &str, matcher: StringMatcher) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(matcher)),
        ..Default::default()
    }
}

fn present(name: &str) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)),
        ..Default::default()
    }
}

fn exact(value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(value.to_string())),
        ..Default::default()
    }
}

/// Envoy's string regex matches the whole string, as Prism's does.
fn regex_string(pattern: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(regex(pattern))),
        ..Default::default()
    }
}

fn regex(pattern: &str) -> RegexMatcher {
    RegexMatcher {
        regex: pattern.to_string(),
        ..Default::default()
    }
}

/// `text` as an RE2 literal.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Forward to one backend or split across several; timeouts, rewrites,
/// retries and the backend's hash policy.
fn route_action(
    policy: &Policy<'_>,
    namespace: &str,
    route: &Route,
    namespace_timeout: &Duration,
) -> RouteAction {
    let cluster_specifier = if route.backends.is_empty() {
        route_action::ClusterSpecifier::Cluster(format!("{namespace}/{}", route.backend))
    } else {
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: route
                .backends
                .iter()
                .map(|w| weighted_cluster::ClusterWeight {
                    name: format!("{namespace}/{}", w.name),
                    weight: Some(UInt32Value { value: w.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    let mut action = RouteAction {
        cluster_specifier: Some(cluster_specifier),
        timeout: Some(some_duration(route.timeout.as_ref()).unwrap_or(*namespace_timeout)),
        idle_timeout: some_duration(route.idle_timeout.as_ref()),
        retry_policy: route.retry.as_ref().map(retry),
        hash_policy: hash_policy(&policy.targets(namespace, route)),
        ..Default::default()
    };
    if let Some(rewrite) = &route.rewrite {
        match &rewrite.path {
            Some(rewrite::Path::Prefix(p)) => action.prefix_rewrite = p.clone(),
            Some(rewrite::Path::Regex(r)) => {
                action.regex_rewrite = Some(RegexMatchAndSubstitute {
                    pattern: Some(regex(&r.pattern)),
                    substitution: r.substitution.clone(),
                });
            }
            None => {}
        }
        if !rewrite.host.is_empty() {
            action.host_rewrite_specifier = Some(
                route_action::HostRewriteSpecifier::HostRewriteLiteral(rewrite.host.clone()),
            );
        }
    }
    action
}

/// Envoy hashes on the route, Prism on the backend: the route takes the hash
/// policy of the first backend it forwards to that hashes (with weighted
/// backends that hash on different keys, the first one's key wins).
fn hash_policy(targets: &[&Backend]) -> Vec<route_action::HashPolicy> {
    use route_action::hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier};
    targets
        .iter()
        .filter(|b| matches!(b.lb_policy(), LbPolicy::RingHash | LbPolicy::Maglev))
        .find_map(|b| b.hash_policy.as_ref()?.key.as_ref())
        .map(|key| {
            let specifier = match key {
                hash_policy::Key::Header(name) => PolicySpecifier::Header(Header {
                    header_name: name.clone(),
                    ..Default::default()
                }),
                // No TTL: Envoy hashes a cookie the client sends and sets none.
                hash_policy::Key::Cookie(name) => PolicySpecifier::Cookie(Cookie {
                    name: name.clone(),
                    ..Default::default()
                }),
                hash_policy::Key::ClientIp(_) => {
                    PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
                }
            };
            route_action::HashPolicy {
                policy_specifier: Some(specifier),
                ..Default::default()
            }
        })
        .into_iter()
        .collect()
}

/// Envoy's retry policy. The retry budget lives on the cluster (see
/// `clusters.rs`); non-idempotent methods are kept from retrying by naming
/// the methods that may be retried; a retry goes to an endpoint not tried
/// yet, as Prism's does, through the `previous_hosts` predicate.
fn retry(r: &RetryPolicy) -> EnvoyRetryPolicy {
    EnvoyRetryPolicy {
        retry_host_predicate: vec![retry_policy::RetryHostPredicate {
            name: PREVIOUS_HOSTS.to_string(),
            config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                pack_any(PreviousHostsPredicate {}),
            )),
        }],
        host_selection_retry_max_attempts: RETRY_HOST_SELECTION_ATTEMPTS,
        retry_on: defaults::retry_on(r).join(","),
        num_retries: Some(UInt32Value {
            value: defaults::nonzero_or(r.num_retries, defaults::retry::NUM_RETRIES),
        }),
        per_try_timeout: some_duration(r.per_try_timeout.as_ref()),
        retry_back_off: Some(retry_policy::RetryBackOff {
            base_interval: Some(envoy_duration(defaults::retry_base_interval(r))),
            max_interval: Some(envoy_duration(defaults::retry_max_interval(r))),
        }),
        retriable_request_headers: if r.retry_non_idempotent {
            Vec::new()
        } else {
            vec![header(":method", regex_string(IDEMPOTENT_METHODS))]
        },
        ..Default::default()
    }
}

fn redirect_action(r: &Redirect) -> RedirectAction {
    use redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier};
    let code = match defaults::nonzero_or(r.status, defaults::REDIRECT_STATUS) {
        301 => RedirectResponseCode::MovedPermanently,
        303 => RedirectResponseCode::SeeOther,
        307 => RedirectResponseCode::TemporaryRedirect,
        308 => RedirectResponseCode::PermanentRedirect,
        _ => RedirectResponseCode::Found,
    };
    RedirectAction {
        scheme_rewrite_specifier: (!r.scheme.is_empty())
            .then(|| SchemeRewriteSpecifier::SchemeRedirect(r.scheme.clone())),
        host_redirect: r.host.clone(),
        port_redirect: r.port,
        path_rewrite_specifier: (!r.path.is_empty())
            .then(|| PathRewriteSpecifier::PathRedirect(r.path.clone())),
        response_code: code as i32,
        ..Default::default()
    }
}

/// Envoy sends a direct response body as `text/plain` unless the route's
/// response headers set a content type, as Prism says.
fn direct_response(d: &DirectResponse) -> DirectResponseAction {
    DirectResponseAction {
        status: d.status,
        body: (!d.body.is_empty()).then(|| DataSource {
            specifier: Some(data_source::Specifier::InlineString(d.body.clone())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Headers to add (Prism's `set`, then `add`) and to remove. Envoy removes
/// before it adds, so the order is Prism's: remove, set, add.
fn header_mutation(m: Option<&HeaderMutation>) -> (Vec<HeaderValueOption>, Vec<String>) {
    use header_value_option::HeaderAppendAction;
    let Some(m) = m else {
        return (Vec::new(), Vec::new());
    };
    let option = |h: &prism_proto::pb::config::v1::HeaderValue, action: HeaderAppendAction| {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: h.name.clone(),
                value: h.value.clone(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        }
    };
    let add = m
        .set
        .iter()
        .map(|h| option(h, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .chain(
            m.add
                .iter()
                .map(|h| option(h, HeaderAppendAction::AppendIfExistsOrAdd)),
        )
        .collect();
    (add, m.remove.clone())
}

/// The local rate limit of `limits` as a per-filter config: the shared
/// bucket as the filter's token bucket, a per-client-IP one as a wildcard
/// descriptor on the client address (one bucket per address Envoy sees, the
/// [`MAX_CLIENT_BUCKETS`] most recent kept). `429` with `retry-after`;
/// gRPC callers get RESOURCE_EXHAUSTED.
fn rate_limit_config(limits: &[RateLimit], stat_prefix: &str) -> Option<Any> {
    let shared = limits.iter().find(|l| !l.per_client_ip);
    let per_client = limits.iter().find(|l| l.per_client_ip);
    let everyone = || RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: fractional_percent::DenominatorType::Hundred as i32,
        }),
        runtime_key: format!("{stat_prefix}_enabled"),
    };
    let config = LocalRateLimit {
        stat_prefix: stat_prefix.to_string(),
        // Required on a per-route config; with only a per-client limit it is
        // never used, since every request has a client address.
        token_bucket: Some(bucket(shared.or(per_client)?)),
        filter_enabled: Some(everyone()),
        filter_enforced: Some(RuntimeFractionalPercent {
            runtime_key: format!("{stat_prefix}_enforced"),
            ..everyone()
        }),
        descriptors: per_client
            .map(|limit| LocalRateLimitDescriptor {
                entries: vec![rate_limit_descriptor::Entry {
                    key: "remote_address".to_string(),
                    value: String::new(),
                }],
                token_bucket: Some(bucket(limit)),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        rate_limits: per_client
            .map(|_| EnvoyRateLimit {
                actions: vec![rate_limit::Action {
                    action_specifier: Some(rate_limit::action::ActionSpecifier::RemoteAddress(
                        rate_limit::action::RemoteAddress {},
                    )),
                }],
                ..Default::default()
            })
            .into_iter()
            .collect(),
        always_consume_default_token_bucket: Some(BoolValue {
            value: shared.is_some(),
        }),
        max_dynamic_descriptors: per_client.map(|_| UInt32Value {
            value: MAX_CLIENT_BUCKETS,
        }),
        enable_retry_after_header: true,
        rate_limited_as_resource_exhausted: true,
        ..Default::default()
    };
    Some(enabled(pack_any(config)))
}

fn bucket(limit: &RateLimit) -> TokenBucket {
    TokenBucket {
        max_tokens: defaults::rate_limit_burst(limit),
        tokens_per_fill: Some(UInt32Value {
            value: limit.requests_per_second,
        }),
        fill_interval: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
    }
}

/// A per-filter config that turns on a filter the HttpConnectionManager has
/// off by default; optional, so a client without the filter ignores it.
fn enabled(config: Any) -> Any {
    pack_any(FilterConfig {
        config: Some(config),
        is_optional: true,
        disabled: false,
    })
}
