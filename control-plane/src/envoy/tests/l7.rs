//! The L7 fields of the policy (issue 7) in the Envoy view.

use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, OutlierDetection};
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValueOption, TransportSocket, data_source, header_value_option, health_check,
    transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::FilterChain;
use envoy_types::pb::envoy::config::route::v3::{
    FilterConfig, HeaderMatcher, RedirectAction, RouteMatch as EnvoyRouteMatch, header_matcher,
    query_parameter_matcher, redirect_action, route_action::hash_policy::PolicySpecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::buffer::v3::{
    BufferPerRoute, buffer_per_route,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, Secret as EnvoySecret, UpstreamTlsContext, common_tls_context,
    secret as envoy_secret,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};

use prism_proto::version_of;

use super::*;

const CERT: &str = include_str!("../../../../tests/support/tls/server.pem");
const KEY: &str = include_str!("../../../../tests/support/tls/server.key");
const CA: &str = include_str!("../../../../tests/support/tls/ca.pem");

const L7: &str = r#"
namespaces:
  - name: shop
    hosts: [shop.test, "*.shop.test"]
    tls_secret: cert
    client_ca_secret: ca
    require_client_certificate: true
    rate_limits:
      - {requests_per_second: 100, burst: 200}
      - {requests_per_second: 10, per_client_ip: true}
  - name: fallback
    hosts: ["*", fallback.test]
    tls_secret: cert
  - name: plain
    hosts: [plain.test]
backends:
  - name: shop/web
    lb_policy: RING_HASH
    hash_policy: {header: x-user}
    health_check: {interval: 5s, http: {path: /healthz, host: web.shop.test}}
    outlier_detection: {consecutive_5xx: 3, base_ejection_time: 10s, max_ejection_percent: 50}
    limits: {max_connections: 10, max_requests: 20, max_requests_per_connection: 100, idle_timeout: 30s}
    tls: {ca_secret: ca, sni: web.shop.test, client_certificate_secret: cert}
    endpoints: [{address: "10.0.0.1:443", zone: zone-a}]
  - name: shop/canary
    protocol: GRPC
    lb_policy: LEAST_REQUEST
    zone_aware: {min_healthy_percent: 80}
    health_check: {grpc: {service_name: shop.Canary}}
    circuit_breaker: {failure_threshold: 4, open_timeout: 20s}
    endpoints: [{address: "10.0.0.2:80"}]
  - name: shop/dns
    lb_policy: MAGLEV
    hash_policy: {cookie: session}
    tls: {}
    endpoints: [{address: "api.internal:443"}, {address: "api.internal:8443"}]
  - name: shop/random
    lb_policy: RANDOM
    endpoints: [{address: "10.0.0.4:80"}]
  - name: fallback/web
    endpoints: [{address: "10.0.0.3:80"}]
  - name: plain/web
    endpoints: [{address: "10.0.0.5:80"}]
routes:
  - name: shop/api
    match:
      prefix: /api/
      methods: [GET, POST]
      headers: [{name: x-env, exact: prod}, {name: x-trace, regex: "[a-f0-9]+"}, {name: x-debug, absent: true}, {name: x-user, present: true}]
      query_params: [{name: v, regex: "[0-9]+"}, {name: lang, exact: en}, {name: page, present: true}, {name: a.b, absent: true}]
    backends: [{name: web, weight: 90}, {name: canary, weight: 10}]
    rewrite: {prefix: /, host: api.internal}
    request_headers: {add: [{name: x-prism, value: "1"}], set: [{name: x-env, value: prod}], remove: [x-internal]}
    response_headers: {set: [{name: cache-control, value: no-store}], remove: [server]}
    timeout: 10s
    idle_timeout: 60s
    retry: {num_retries: 2, retry_on: [5xx, reset], per_try_timeout: 2s, base_interval: 0.1s, budget_percent: 30}
    rate_limits: [{requests_per_second: 5}]
    max_request_body_bytes: 1048576
  - name: shop/api-any
    match: {prefix: /api/}
    backend: random
    retry: {retry_non_idempotent: true, min_retry_concurrency: 5}
  - name: shop/api-put
    match: {prefix: /api/, methods: [PUT]}
    backend: web
    retry: {}
  - name: shop/old
    match: {exact: /old}
    redirect: {scheme: https, host: new.shop.test, port: 8443, path: /new, status: 301}
  - name: shop/moved
    match: {exact: /moved}
    redirect: {}
  - name: shop/teapot
    match: {regex: "/tea(pot)?"}
    direct_response: {status: 418, body: "I'm a teapot"}
  - name: shop/users
    match: {regex: "/users/[0-9]+"}
    backend: dns
    rewrite: {regex: {pattern: "^/users/([0-9]+)$", substitution: "/u/\\1"}}
  - name: fallback/all
    match: {prefix: /}
    backend: web
    rate_limits: [{requests_per_second: 3, per_client_ip: true}]
  - name: plain/all
    match: {prefix: /}
    backend: web
"#;

fn l7_snapshot() -> Snapshot {
    l7_snapshot_of(L7)
}

/// `policy` with the L7 policy's secrets.
fn l7_snapshot_of(policy: &str) -> Snapshot {
    let secret = |name: &str, kind: prism_proto::pb::config::v1::secret::Kind| {
        Resource::Secret(prism_proto::Secret {
            name: name.into(),
            kind: Some(kind),
        })
    };
    let cert = || {
        prism_proto::pb::config::v1::secret::Kind::TlsCertificate(
            prism_proto::pb::config::v1::TlsCertificate {
                certificate_chain: CERT.into(),
                private_key: KEY.into(),
            },
        )
    };
    let mut resources = parse_policy(policy).expect("the L7 policy parses");
    resources.extend([
        secret("shop/cert", cert()),
        secret("fallback/cert", cert()),
        secret(
            "shop/ca",
            prism_proto::pb::config::v1::secret::Kind::CaBundle(
                prism_proto::pb::config::v1::CaBundle {
                    certificates: CA.into(),
                },
            ),
        ),
    ]);
    let snapshot = Snapshot::from_resources(9, resources);
    validate_snapshot(&snapshot).expect("the L7 policy is valid");
    snapshot
}

pub(super) fn l7() -> EnvoyResources {
    translate(&l7_snapshot(), &[], &params())
}

fn l7_routes() -> RouteConfiguration {
    unpack(l7().route_configurations.get(HTTP_ROUTES))
}

fn find<'a>(vhost: &'a VirtualHost, name: &str) -> &'a EnvoyRoute {
    vhost
        .routes
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("route {name} in {:?}", route_names(vhost)))
}

/// The config inside a `FilterConfig` of a per-filter config map.
fn per_filter<T: Message + Name + Default>(
    map: &std::collections::HashMap<String, Any>,
    filter: &str,
) -> T {
    let wrapper: FilterConfig = unpack(map.get(filter));
    assert!(wrapper.is_optional && !wrapper.disabled, "{wrapper:?}");
    unpack(wrapper.config.as_ref())
}

fn exact_matcher(value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(value.into())),
        ..Default::default()
    }
}

fn regex_of(matcher: &HeaderMatcher) -> Option<&str> {
    match &matcher.header_match_specifier {
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::SafeRegex(r)),
            ..
        })) => Some(r.regex.as_str()),
        _ => None,
    }
}

fn header_named<'a>(m: &'a EnvoyRouteMatch, name: &str) -> &'a HeaderMatcher {
    m.headers
        .iter()
        .find(|h| h.name == name)
        .unwrap_or_else(|| panic!("a matcher for {name} in {:?}", m.headers))
}

#[test]
fn the_l7_translation_is_deterministic() {
    let first = l7();
    for _ in 0..20 {
        assert_eq!(l7(), first);
    }
}

/// A translation that reuses the encoded routes and clusters of the one
/// before is byte for byte the translation afresh, whatever changed in
/// between: routes edited, removed, added or restricted to a host reuse the
/// others; a changed backend or namespace, on which routes depend,
/// re-encodes every route. A cluster is encoded again only when its backend
/// or the retry budget of the routes forwarding to it changes (the smallest
/// budget of `web` rises to 30 with `api-put` gone, then `api` lowers those
/// of `web` and `canary` to 10), and the RouteConfiguration's version
/// changes exactly when its bytes do.
#[test]
fn reused_routes_encode_as_a_fresh_translation_does() {
    let edits: [(&str, &str, usize, usize); 9] = [
        ("", "", 0, 0),
        ("", "", 9, 6),
        ("    timeout: 10s\n", "    timeout: 11s\n", 8, 6),
        (
            "  - name: shop/teapot\n    match: {regex: \"/tea(pot)?\"}\n",
            "  - name: shop/teapot\n    match: {regex: \"/coffee\"}\n",
            8,
            6,
        ),
        (
            "  - name: shop/moved\n    match: {exact: /moved}\n    redirect: {}\n",
            "  - name: shop/moved\n    match: {exact: /moved, host: moved.shop.test}\n    redirect: {}\n  - name: shop/extra\n    match: {prefix: /extra}\n    backend: web\n",
            8,
            6,
        ),
        (
            "  - name: shop/api-put\n    match: {prefix: /api/, methods: [PUT]}\n    backend: web\n    retry: {}\n",
            "",
            9,
            5,
        ),
        ("budget_percent: 30}", "budget_percent: 10}", 8, 4),
        (
            "hash_policy: {header: x-user}",
            "hash_policy: {header: x-account}",
            0,
            5,
        ),
        (
            "    hosts: [plain.test]\n",
            "    hosts: [plain.test]\n    default_timeout: 4s\n",
            0,
            6,
        ),
    ];
    let mut policy = L7.to_string();
    let mut cache = TranslationCache::default();
    let mut before: Option<EnvoyResources> = None;
    for (from, to, reused, clusters_reused) in edits {
        assert!(policy.contains(from), "{from:?} is in the policy");
        policy = policy.replacen(from, to, 1);
        let snapshot = l7_snapshot_of(&policy);
        let fresh = translate(&snapshot, &[], &params());
        let (again, next) = translate_reusing(&snapshot, &[], &params(), &cache);
        let bytes = |r: &EnvoyResources| r.route_configurations[HTTP_ROUTES].value.clone();
        assert_eq!(
            version_of(&bytes(&again)),
            version_of(&bytes(&fresh)),
            "after {to:?}"
        );
        assert!(bytes(&again) == bytes(&fresh), "after {to:?}");
        assert!(again == fresh, "after {to:?}");
        assert_eq!(
            next.routes.reused_from(&cache.routes),
            reused,
            "after {to:?}"
        );
        assert_eq!(
            next.clusters.reused_from(&cache.clusters),
            clusters_reused,
            "after {to:?}"
        );
        if let Some(before) = &before {
            let version = |r: &EnvoyResources| r.route_configuration_versions[HTTP_ROUTES].clone();
            assert_eq!(
                version(before) == version(&again),
                bytes(before) == bytes(&again),
                "after {to:?}"
            );
        }
        before = Some(again);
        cache = next;
    }
}

#[test]
fn matches_carry_methods_headers_and_query_parameters() {
    let config = l7_routes();
    let api = find(vhost(&config, "shop"), "shop/api");
    let m = api.r#match.as_ref().expect("match");
    assert_eq!(
        m.path_specifier,
        Some(route_match::PathSpecifier::Prefix("/api/".into()))
    );
    assert_eq!(regex_of(header_named(m, ":method")), Some("GET|POST"));
    let env = header_named(m, "x-env");
    assert_eq!(
        env.header_match_specifier,
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            exact_matcher("prod")
        ))
    );
    assert_eq!(regex_of(header_named(m, "x-trace")), Some("[a-f0-9]+"));
    let debug = header_named(m, "x-debug");
    assert!(debug.invert_match, "absent is present, inverted");
    assert_eq!(
        debug.header_match_specifier,
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true))
    );
    assert!(!header_named(m, "x-user").invert_match);

    let query: Vec<(&str, &query_parameter_matcher::QueryParameterMatchSpecifier)> = m
        .query_parameters
        .iter()
        .filter_map(|q| Some((q.name.as_str(), q.query_parameter_match_specifier.as_ref()?)))
        .collect();
    assert_eq!(query.len(), 3, "{query:?}");
    assert_eq!(
        query[1],
        (
            "lang",
            &query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(exact_matcher(
                "en"
            ))
        )
    );
    assert_eq!(
        query[2].1,
        &query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true)
    );
    // An absent parameter is an inverted regex on the path, the name escaped.
    let path = header_named(m, ":path");
    assert!(path.invert_match);
    let pattern = regex_of(path).expect("a regex");
    assert!(pattern.contains(r"a\.b"), "{pattern}");
    let absent = regex::Regex::new(&format!("^(?:{pattern})$")).expect("compiles");
    assert!(absent.is_match("/api/x?a.b=1"));
    assert!(absent.is_match("/api/x?z=1&a.b"));
    assert!(!absent.is_match("/api/x?axb=1"));
    assert!(!absent.is_match("/api/x?ab=1&c=a.b"));

    let put = find(vhost(&config, "shop"), "shop/api-put");
    let m = put.r#match.as_ref().expect("match");
    assert_eq!(
        header_named(m, ":method").header_match_specifier,
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            exact_matcher("PUT")
        ))
    );
    let teapot = find(vhost(&config, "shop"), "shop/teapot");
    let Some(route_match::PathSpecifier::SafeRegex(regex)) = &teapot
        .r#match
        .as_ref()
        .and_then(|m| m.path_specifier.clone())
    else {
        panic!("a regex path: {teapot:?}")
    };
    assert_eq!(regex.regex, "/tea(pot)?");
}

#[test]
fn routes_with_more_conditions_go_first_then_regexes_last() {
    let config = l7_routes();
    assert_eq!(
        route_names(vhost(&config, "shop")),
        [
            "shop/moved",
            "shop/old",
            "shop/api",
            "shop/api-put",
            "shop/api-any",
            "shop/teapot",
            "shop/users",
        ]
    );
}

#[test]
fn route_actions_split_rewrite_time_and_retry() {
    let config = l7_routes();
    let shop = vhost(&config, "shop");
    let api = action(find(shop, "shop/api"));
    let Some(route_action::ClusterSpecifier::WeightedClusters(split)) = &api.cluster_specifier
    else {
        panic!("weighted clusters: {api:?}")
    };
    let weights: Vec<(&str, u32)> = split
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), weight(c.weight.as_ref())))
        .collect();
    assert_eq!(weights, [("shop/web", 90), ("shop/canary", 10)]);
    assert_eq!(api.prefix_rewrite, "/");
    assert_eq!(
        api.host_rewrite_specifier,
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(
            "api.internal".into()
        ))
    );
    assert_eq!(
        api.timeout,
        Some(Duration {
            seconds: 10,
            nanos: 0
        })
    );
    assert_eq!(
        api.idle_timeout,
        Some(Duration {
            seconds: 60,
            nanos: 0
        })
    );
    // Hashing comes from the first backend that hashes (web: RING_HASH on x-user).
    let [hash] = api.hash_policy.as_slice() else {
        panic!("one hash policy: {:?}", api.hash_policy)
    };
    let Some(PolicySpecifier::Header(header)) = &hash.policy_specifier else {
        panic!("a header hash: {hash:?}")
    };
    assert_eq!(header.header_name, "x-user");

    let retry = api.retry_policy.as_ref().expect("a retry policy");
    assert_eq!(retry.retry_on, "5xx,reset");
    assert_eq!(weight(retry.num_retries.as_ref()), 2);
    assert_eq!(
        retry.per_try_timeout,
        Some(Duration {
            seconds: 2,
            nanos: 0
        })
    );
    // A retry goes to an endpoint not tried yet, as Prism's proxy does.
    let [predicate] = retry.retry_host_predicate.as_slice() else {
        panic!("one retry host predicate: {retry:?}")
    };
    assert_eq!(predicate.name, "envoy.retry_host_predicates.previous_hosts");
    assert!(retry.host_selection_retry_max_attempts > 1, "{retry:?}");
    let back_off = retry.retry_back_off.as_ref().expect("back off");
    assert_eq!(
        (back_off.base_interval, back_off.max_interval),
        (
            Some(Duration {
                seconds: 0,
                nanos: 100_000_000
            }),
            Some(Duration {
                seconds: 1,
                nanos: 0
            })
        ),
        "the max backoff defaults to 10 × the base"
    );
    let [methods] = retry.retriable_request_headers.as_slice() else {
        panic!("idempotent methods only: {retry:?}")
    };
    assert_eq!(methods.name, ":method");
    assert!(regex_of(methods).is_some_and(|r| r.contains("GET") && !r.contains("POST")));

    // Defaults: one retry on connect failures and gateway errors, 25ms backoff.
    let put = action(find(shop, "shop/api-put"));
    let retry = put.retry_policy.as_ref().expect("a retry policy");
    assert_eq!(retry.retry_on, "connect-failure,gateway-error");
    assert_eq!(weight(retry.num_retries.as_ref()), 1);
    assert_eq!(
        retry.retry_back_off.as_ref().and_then(|b| b.base_interval),
        Some(Duration {
            seconds: 0,
            nanos: 25_000_000
        })
    );
    let any = action(find(shop, "shop/api-any"));
    assert!(
        any.retry_policy
            .as_ref()
            .is_some_and(|r| r.retriable_request_headers.is_empty()),
        "retry_non_idempotent retries every method"
    );
    assert!(any.hash_policy.is_empty(), "RANDOM does not hash");

    let users = action(find(shop, "shop/users"));
    let rewrite = users.regex_rewrite.as_ref().expect("a regex rewrite");
    assert_eq!(
        rewrite.pattern.as_ref().map(|p| p.regex.as_str()),
        Some("^/users/([0-9]+)$")
    );
    assert_eq!(rewrite.substitution, r"/u/\1");
    let Some(PolicySpecifier::Cookie(cookie)) = users
        .hash_policy
        .first()
        .and_then(|h| h.policy_specifier.clone())
    else {
        panic!("a cookie hash: {users:?}")
    };
    assert_eq!((cookie.name.as_str(), cookie.ttl), ("session", None));
}

#[test]
fn redirects_and_direct_responses_answer_without_a_backend() {
    let config = l7_routes();
    let shop = vhost(&config, "shop");
    let redirect = |name: &str| -> RedirectAction {
        match &find(shop, name).action {
            Some(route::Action::Redirect(r)) => r.clone(),
            other => panic!("a redirect: {other:?}"),
        }
    };
    let old = redirect("shop/old");
    assert_eq!(
        old.scheme_rewrite_specifier,
        Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(
            "https".into()
        ))
    );
    assert_eq!(
        (old.host_redirect.as_str(), old.port_redirect),
        ("new.shop.test", 8443)
    );
    assert_eq!(
        old.path_rewrite_specifier,
        Some(redirect_action::PathRewriteSpecifier::PathRedirect(
            "/new".into()
        ))
    );
    assert_eq!(
        old.response_code,
        redirect_action::RedirectResponseCode::MovedPermanently as i32
    );
    let moved = redirect("shop/moved");
    assert_eq!(
        moved.response_code,
        redirect_action::RedirectResponseCode::Found as i32,
        "302 by default"
    );
    assert!(moved.scheme_rewrite_specifier.is_none() && moved.path_rewrite_specifier.is_none());

    let Some(route::Action::DirectResponse(direct)) = &find(shop, "shop/teapot").action else {
        panic!("a direct response")
    };
    assert_eq!(direct.status, 418);
    assert_eq!(
        direct.body.as_ref().and_then(|b| b.specifier.clone()),
        Some(data_source::Specifier::InlineString("I'm a teapot".into()))
    );
    assert_eq!(
        config.max_direct_response_body_size_bytes,
        Some(UInt32Value { value: 65536 })
    );
}

#[test]
fn header_mutations_remove_then_set_then_add() {
    let config = l7_routes();
    let api = find(vhost(&config, "shop"), "shop/api");
    let option = |o: &HeaderValueOption| {
        let h = o.header.clone().unwrap_or_default();
        (h.key, h.value, o.append_action)
    };
    use header_value_option::HeaderAppendAction::{AppendIfExistsOrAdd, OverwriteIfExistsOrAdd};
    assert_eq!(
        api.request_headers_to_add
            .iter()
            .map(option)
            .collect::<Vec<_>>(),
        [
            ("x-env".into(), "prod".into(), OverwriteIfExistsOrAdd as i32),
            ("x-prism".into(), "1".into(), AppendIfExistsOrAdd as i32),
        ]
    );
    assert_eq!(api.request_headers_to_remove, ["x-internal"]);
    assert_eq!(
        api.response_headers_to_add
            .iter()
            .map(option)
            .collect::<Vec<_>>(),
        [(
            "cache-control".into(),
            "no-store".into(),
            OverwriteIfExistsOrAdd as i32
        )]
    );
    assert_eq!(api.response_headers_to_remove, ["server"]);
}

#[test]
fn rate_limits_and_body_limits_turn_on_disabled_filters() {
    // The manager has every optional filter, off, and the router last.
    let listener: Listener = unpack(l7().listeners.get(HTTP_LISTENER));
    let Some(filter::ConfigType::TypedConfig(any)) =
        &listener.filter_chains[0].filters[0].config_type
    else {
        panic!("a typed HCM")
    };
    let hcm: HttpConnectionManager = decode(any);
    let filters: Vec<(&str, bool, bool)> = hcm
        .http_filters
        .iter()
        .map(|f| (f.name.as_str(), f.disabled, f.is_optional))
        .collect();
    assert_eq!(
        filters,
        [
            (NAMESPACE_RATE_LIMIT_FILTER, true, true),
            (ROUTE_RATE_LIMIT_FILTER, true, true),
            (BUFFER_FILTER, true, true),
            ("envoy.filters.http.router", false, false),
        ]
    );

    let config = l7_routes();
    // The namespace's limits on each of its virtual hosts: one shared bucket
    // and one per client address.
    let shop = vhost(&config, "shop");
    let limit: LocalRateLimit =
        per_filter(&shop.typed_per_filter_config, NAMESPACE_RATE_LIMIT_FILTER);
    let bucket = limit.token_bucket.as_ref().expect("a bucket");
    assert_eq!(
        (bucket.max_tokens, weight(bucket.tokens_per_fill.as_ref())),
        (200, 100)
    );
    assert_eq!(
        limit
            .filter_enforced
            .as_ref()
            .and_then(|f| f.default_value)
            .map(|v| v.numerator),
        Some(100)
    );
    assert!(limit.enable_retry_after_header && limit.rate_limited_as_resource_exhausted);
    assert_eq!(
        limit.always_consume_default_token_bucket.map(|b| b.value),
        Some(true)
    );
    let [descriptor] = limit.descriptors.as_slice() else {
        panic!("one per-client descriptor: {limit:?}")
    };
    assert_eq!(descriptor.entries[0].key, "remote_address");
    assert_eq!(
        descriptor.entries[0].value, "",
        "a wildcard: one bucket per address"
    );
    assert_eq!(
        descriptor.token_bucket.as_ref().map(|b| b.max_tokens),
        Some(10)
    );
    assert_eq!(limit.rate_limits.len(), 1);
    assert!(
        !shop
            .typed_per_filter_config
            .contains_key(ROUTE_RATE_LIMIT_FILTER)
    );

    // The route's own limit and body limit on the route.
    let api = find(shop, "shop/api");
    let limit: LocalRateLimit = per_filter(&api.typed_per_filter_config, ROUTE_RATE_LIMIT_FILTER);
    assert_eq!(limit.token_bucket.map(|b| b.max_tokens), Some(5));
    assert!(limit.descriptors.is_empty());
    let buffer: BufferPerRoute = per_filter(&api.typed_per_filter_config, BUFFER_FILTER);
    let Some(buffer_per_route::Override::Buffer(buffer)) = buffer.r#override else {
        panic!("a buffer limit")
    };
    assert_eq!(weight(buffer.max_request_bytes.as_ref()), 1_048_576);

    // Only a per-client limit: it is also the (unused) default bucket, which
    // is not consumed.
    let all = find(vhost(&config, "fallback"), "fallback/all");
    let limit: LocalRateLimit = per_filter(&all.typed_per_filter_config, ROUTE_RATE_LIMIT_FILTER);
    assert_eq!(
        limit.always_consume_default_token_bucket.map(|b| b.value),
        Some(false)
    );
    assert_eq!(limit.descriptors.len(), 1);
    assert!(vhost(&config, "plain").typed_per_filter_config.is_empty());
    assert!(
        find(vhost(&config, "plain"), "plain/all")
            .typed_per_filter_config
            .is_empty()
    );
}

#[test]
fn the_catch_all_host_is_envoy_s_default_virtual_host() {
    let config = l7_routes();
    assert_eq!(
        vhost(&config, "fallback").domains,
        ["*", "fallback.test", "fallback.test:*"]
    );
}

fn l7_cluster(name: &str) -> Cluster {
    unpack(l7().clusters.get(name))
}

#[test]
fn clusters_balance_check_eject_and_limit() {
    use cluster::LbPolicy;
    let policies: Vec<(String, i32)> = l7()
        .clusters
        .values()
        .map(|any| {
            let c: Cluster = decode(any);
            (c.name, c.lb_policy)
        })
        .collect();
    assert!(policies.contains(&("shop/web".into(), LbPolicy::RingHash as i32)));
    assert!(policies.contains(&("shop/canary".into(), LbPolicy::LeastRequest as i32)));
    assert!(policies.contains(&("shop/dns".into(), LbPolicy::Maglev as i32)));
    assert!(policies.contains(&("shop/random".into(), LbPolicy::Random as i32)));
    assert!(policies.contains(&("plain/web".into(), LbPolicy::RoundRobin as i32)));

    let web = l7_cluster("shop/web");
    let [check] = web.health_checks.as_slice() else {
        panic!("one health check")
    };
    assert_eq!(
        check.interval,
        Some(Duration {
            seconds: 5,
            nanos: 0
        })
    );
    assert_eq!(
        check.timeout,
        Some(Duration {
            seconds: 1,
            nanos: 0
        }),
        "default"
    );
    assert_eq!(
        (
            weight(check.unhealthy_threshold.as_ref()),
            weight(check.healthy_threshold.as_ref())
        ),
        (3, 2)
    );
    let Some(health_check::HealthChecker::HttpHealthCheck(http)) = &check.health_checker else {
        panic!("an HTTP check")
    };
    assert_eq!(
        (http.path.as_str(), http.host.as_str()),
        ("/healthz", "web.shop.test")
    );

    let canary = l7_cluster("shop/canary");
    let Some(health_check::HealthChecker::GrpcHealthCheck(grpc)) =
        &canary.health_checks[0].health_checker
    else {
        panic!("a gRPC check")
    };
    assert_eq!(grpc.service_name, "shop.Canary");

    let outlier: OutlierDetection = web.outlier_detection.clone().expect("outlier detection");
    assert_eq!(weight(outlier.consecutive_5xx.as_ref()), 3);
    assert_eq!(weight(outlier.consecutive_gateway_failure.as_ref()), 5);
    assert_eq!(
        weight(outlier.enforcing_consecutive_gateway_failure.as_ref()),
        100
    );
    assert_eq!(weight(outlier.enforcing_success_rate.as_ref()), 0);
    assert_eq!(
        outlier.base_ejection_time,
        Some(Duration {
            seconds: 10,
            nanos: 0
        })
    );
    assert_eq!(
        outlier.max_ejection_time,
        Some(Duration {
            seconds: 300,
            nanos: 0
        })
    );
    assert_eq!(weight(outlier.max_ejection_percent.as_ref()), 50);

    // The per-endpoint breaker's nearest Envoy equivalent.
    let breaker = canary.outlier_detection.clone().expect("outlier detection");
    assert_eq!(weight(breaker.consecutive_gateway_failure.as_ref()), 4);
    assert_eq!(
        breaker.base_ejection_time,
        Some(Duration {
            seconds: 20,
            nanos: 0
        })
    );
    assert_eq!(breaker.max_ejection_time, breaker.base_ejection_time);
    assert_eq!(weight(breaker.max_ejection_percent.as_ref()), 100);
    assert!(l7_cluster("plain/web").outlier_detection.is_none());

    let thresholds = |c: &Cluster| {
        let breakers: CircuitBreakers = c.circuit_breakers.clone().expect("circuit breakers");
        breakers.thresholds[0]
    };
    let web_limits = thresholds(&web);
    assert_eq!(
        (
            weight(web_limits.max_connections.as_ref()),
            weight(web_limits.max_pending_requests.as_ref()),
            weight(web_limits.max_requests.as_ref())
        ),
        (10, 1024, 20)
    );
    // Routes retry to web with budgets 30% (api) and 20% (api-put, the
    // default): the smaller holds.
    let budget = web_limits.retry_budget.expect("a retry budget");
    assert_eq!(budget.budget_percent.map(|p| p.value), Some(20.0));
    assert_eq!(budget.min_retry_concurrency.map(|v| v.value), Some(3));
    let random = thresholds(&l7_cluster("shop/random"));
    assert_eq!(
        random
            .retry_budget
            .and_then(|b| b.min_retry_concurrency)
            .map(|v| v.value),
        Some(5)
    );
    assert!(thresholds(&l7_cluster("plain/web")).retry_budget.is_none());

    let options: HttpProtocolOptions = unpack(
        web.typed_extension_protocol_options
            .get(HTTP_PROTOCOL_OPTIONS),
    );
    let common = options
        .common_http_protocol_options
        .expect("common options");
    assert_eq!(
        common.idle_timeout,
        Some(Duration {
            seconds: 30,
            nanos: 0
        })
    );
    assert_eq!(weight(common.max_requests_per_connection.as_ref()), 100);
    let plain: HttpProtocolOptions = unpack(
        l7_cluster("plain/web")
            .typed_extension_protocol_options
            .get(HTTP_PROTOCOL_OPTIONS),
    );
    let common = plain.common_http_protocol_options.expect("common options");
    assert_eq!(
        common.idle_timeout,
        Some(Duration {
            seconds: 60,
            nanos: 0
        }),
        "default"
    );
    assert!(common.max_requests_per_connection.is_none(), "unlimited");
    assert!(is_http2(&canary) && !is_http2(&web));

    // Zone-aware routing where asked; no panic mode where health is checked.
    let canary_lb = canary.common_lb_config.expect("canary lb config");
    assert!(canary_lb.locality_config_specifier.is_some());
    assert_eq!(
        canary_lb.healthy_panic_threshold.map(|p| p.value),
        Some(0.0)
    );
    let web_lb = web.common_lb_config.expect("web lb config");
    assert!(web_lb.locality_config_specifier.is_none());
    assert_eq!(web_lb.healthy_panic_threshold.map(|p| p.value), Some(0.0));
    assert!(l7_cluster("plain/web").common_lb_config.is_none());
}

/// The Host of a health probe is the endpoint's address when the check names
/// none (gRPC checks name none), as a Prism proxy sends it — not the
/// cluster's name, as Envoy would — and probes go on without traffic.
#[test]
fn health_probes_name_the_endpoint_and_keep_their_interval() {
    use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
    let hostnames = |cluster: &str| -> Vec<String> {
        let cla: ClusterLoadAssignment = unpack(l7().cluster_load_assignments.get(cluster));
        cla.endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| match &e.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e
                    .health_check_config
                    .as_ref()
                    .map(|c| c.hostname.clone())
                    .unwrap_or_default(),
                other => panic!("an endpoint, not {other:?}"),
            })
            .collect()
    };
    assert_eq!(hostnames("shop/canary"), ["10.0.0.2:80"], "gRPC check");
    assert_eq!(hostnames("shop/web"), [""], "the check's own host");
    let web = l7_cluster("shop/web");
    assert_eq!(
        web.health_checks[0].no_traffic_interval,
        web.health_checks[0].interval
    );
}

fn tls_context<T: Message + Name + Default>(socket: Option<&TransportSocket>) -> T {
    let socket = socket.expect("a transport socket");
    assert_eq!(socket.name, "envoy.transport_sockets.tls");
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type else {
        panic!("a typed TLS context")
    };
    decode(any)
}

#[test]
fn upstream_tls_verifies_with_sds_secrets() {
    let web = l7_cluster("shop/web");
    let tls: UpstreamTlsContext = tls_context(web.transport_socket.as_ref());
    assert_eq!(tls.sni, "web.shop.test");
    let common = tls.common_tls_context.expect("common context");
    let client: Vec<(&str, bool)> = common
        .tls_certificate_sds_secret_configs
        .iter()
        .map(|s| (s.name.as_str(), is_ads(s.sds_config.as_ref())))
        .collect();
    assert_eq!(client, [("shop/cert", true)]);
    let Some(common_tls_context::ValidationContextType::CombinedValidationContext(combined)) =
        &common.validation_context_type
    else {
        panic!("a CA from SDS: {common:?}")
    };
    assert_eq!(
        combined
            .validation_context_sds_secret_config
            .as_ref()
            .map(|s| s.name.as_str()),
        Some("shop/ca")
    );
    let san = &combined
        .default_validation_context
        .as_ref()
        .expect("a default context")
        .match_typed_subject_alt_names[0];
    assert_eq!(san.matcher, Some(exact_matcher("web.shop.test")));

    // No CA: the system's; no SNI: the endpoints' shared host name.
    let dns: UpstreamTlsContext = tls_context(l7_cluster("shop/dns").transport_socket.as_ref());
    assert_eq!(dns.sni, "api.internal");
    let Some(common_tls_context::ValidationContextType::ValidationContext(context)) = dns
        .common_tls_context
        .and_then(|c| c.validation_context_type)
    else {
        panic!("a static validation context")
    };
    assert_eq!(
        context.trusted_ca.and_then(|d| d.specifier),
        Some(data_source::Specifier::Filename(
            tls::SYSTEM_CA_BUNDLE.into()
        ))
    );
    assert!(l7_cluster("plain/web").transport_socket.is_none());
}

#[test]
fn secrets_are_sds_resources_of_the_same_name() {
    let resources = l7();
    assert_eq!(
        resources.secrets.keys().collect::<Vec<_>>(),
        ["fallback/cert", "shop/ca", "shop/cert"]
    );
    let cert: EnvoySecret = decode(&resources.secrets["shop/cert"]);
    let Some(envoy_secret::Type::TlsCertificate(tls)) = cert.r#type else {
        panic!("a certificate")
    };
    assert_eq!(
        tls.certificate_chain.and_then(|d| d.specifier),
        Some(data_source::Specifier::InlineString(CERT.into()))
    );
    assert_eq!(
        tls.private_key.and_then(|d| d.specifier),
        Some(data_source::Specifier::InlineString(KEY.into()))
    );
    let ca: EnvoySecret = decode(&resources.secrets["shop/ca"]);
    let Some(envoy_secret::Type::ValidationContext(context)) = ca.r#type else {
        panic!("a validation context")
    };
    assert_eq!(
        context.trusted_ca.and_then(|d| d.specifier),
        Some(data_source::Specifier::InlineString(CA.into()))
    );
    // No key is inline in any listener or cluster.
    for any in resources
        .listeners
        .values()
        .chain(resources.clusters.values())
    {
        assert!(
            !String::from_utf8_lossy(&any.value).contains("PRIVATE KEY"),
            "{}",
            any.type_url
        );
    }
}

#[test]
fn namespaces_with_a_tls_secret_get_a_filter_chain_by_sni() {
    let resources = l7();
    let listener: Listener = unpack(resources.listeners.get(HTTPS_LISTENER));
    assert_eq!(host_port(listener.address.as_ref()), "0.0.0.0:10443");
    assert_eq!(
        listener.listener_filters[0].name,
        "envoy.filters.listener.tls_inspector"
    );
    let chains: Vec<(&str, Vec<String>)> = listener
        .filter_chains
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.filter_chain_match
                    .clone()
                    .map(|m| m.server_names)
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        chains,
        [
            ("fallback", vec!["fallback.test".to_string()]),
            ("fallback/*", vec![]),
            (
                "shop",
                vec!["shop.test".to_string(), "*.shop.test".to_string()]
            ),
        ]
    );
    let shop: &FilterChain = &listener.filter_chains[2];
    let tls: DownstreamTlsContext = tls_context(shop.transport_socket.as_ref());
    let common = tls.common_tls_context.expect("common context");
    assert_eq!(
        common.tls_certificate_sds_secret_configs[0].name,
        "shop/cert"
    );
    assert!(is_ads(
        common.tls_certificate_sds_secret_configs[0]
            .sds_config
            .as_ref()
    ));
    assert_eq!(common.alpn_protocols, ["h2", "http/1.1"]);
    // Client certificates: verified against the namespace's CA (SDS), and
    // required.
    let Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(ca)) =
        &common.validation_context_type
    else {
        panic!("a client CA: {:?}", common.validation_context_type)
    };
    assert_eq!(ca.name, "shop/ca");
    assert_eq!(tls.require_client_certificate.map(|b| b.value), Some(true));
    let fallback: DownstreamTlsContext =
        tls_context(listener.filter_chains[0].transport_socket.as_ref());
    assert_eq!(
        fallback
            .common_tls_context
            .expect("common context")
            .validation_context_type,
        None
    );
    assert_eq!(fallback.require_client_certificate, None);
    let Some(filter::ConfigType::TypedConfig(any)) = &shop.filters[0].config_type else {
        panic!("the HCM")
    };
    assert_routes_by_rds(&decode(any));

    // Without a TLS namespace there is no TLS listener at all.
    assert_eq!(translated().listeners.len(), 1);
}
