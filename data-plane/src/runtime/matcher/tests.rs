use http::{HeaderMap, HeaderValue, Method};
use prism_proto::pb::config::v1::key_match::Rule as KeyRule;
use prism_proto::pb::config::v1::route_match::Path;
use prism_proto::pb::config::v1::{KeyMatch, RouteMatch};
use proptest::prelude::*;

use super::*;
use crate::runtime::tests::{backend, compile, lookup, namespace, prefix, route, sample};
use crate::runtime::{OwnAddresses, Runtime};

fn routed<'a>(rt: &'a Runtime, host: &str, path: &str) -> Option<&'a str> {
    lookup(rt, host, path).map(|t| t.name.as_str())
}

/// A request with everything a route can match on.
struct Request {
    method: Method,
    path: &'static str,
    query: Option<&'static str>,
    headers: HeaderMap,
}

impl Request {
    fn get(path: &'static str) -> Self {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        Request {
            method: Method::GET,
            path,
            query,
            headers: HeaderMap::new(),
        }
    }

    fn method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.append(name, HeaderValue::from_static(value));
        self
    }

    fn on<'a>(&self, rt: &'a Runtime, host: &str) -> Option<&'a str> {
        let probe = Probe {
            method: &self.method,
            path: self.path,
            query: self.query,
            headers: &self.headers,
        };
        rt.route(host, &probe).map(|r| r.name.as_str())
    }
}

/// A route of namespace `n` (host `n.local`) to backend `b`, changed by `with`.
fn custom(name: &str, host: &str, path: Path, with: impl FnOnce(&mut RouteMatch)) -> Resource {
    let Resource::Route(mut r) = route(name, host, path, "b") else {
        unreachable!("route() builds a route")
    };
    if let Some(m) = r.r#match.as_mut() {
        with(m);
    }
    Resource::Route(r)
}

fn key(name: &str, rule: KeyRule) -> KeyMatch {
    KeyMatch {
        name: name.into(),
        rule: Some(rule),
    }
}

fn runtime(routes: impl IntoIterator<Item = Resource>) -> Runtime {
    let mut resources = vec![
        namespace("n", &["n.local", "*.n.test"]),
        backend("n/b", &["127.0.0.1:1"]),
    ];
    resources.extend(routes);
    compile(
        &Snapshot::from_resources(1, resources),
        &Runtime::unconfigured(),
    )
}

fn regex(p: &str) -> Path {
    Path::Regex(p.into())
}

fn exact(p: &str) -> Path {
    Path::Exact(p.into())
}

#[test]
fn the_catch_all_host_takes_what_no_other_host_does() {
    let mut snapshot = sample();
    snapshot.insert(namespace("fallback", &["*"]));
    snapshot.insert(backend("fallback/web", &["127.0.0.1:3001"]));
    snapshot.insert(route("fallback/all", "", prefix("/"), "web"));
    let rt = compile(&snapshot, &Runtime::unconfigured());
    assert_eq!(routed(&rt, "other.test", "/"), Some("fallback/all"));
    assert_eq!(routed(&rt, "b.demo.test", "/x"), Some("demo/root"));
    assert_eq!(routed(&rt, "demo.local", "/"), Some("demo/root"));
    // A host too long to be a DNS name can only be the catch-all's.
    let long = "a".repeat(300);
    assert_eq!(routed(&rt, &long, "/"), Some("fallback/all"));
}

#[test]
fn exact_host_beats_wildcard_and_longest_wildcard_wins() {
    let rt = compile(&sample(), &Runtime::unconfigured());
    assert_eq!(rt.revision(), Some(7));
    assert_eq!(routed(&rt, "demo.local", "/x"), Some("demo/root"));
    assert_eq!(routed(&rt, "b.demo.test", "/x"), Some("demo/root"));
    // A route for one host covered by a wildcard gets an exact entry.
    assert_eq!(routed(&rt, "a.demo.test", "/x"), Some("demo/only-a"));
    // `*.api.demo.test` is a longer suffix than `*.demo.test`.
    assert_eq!(routed(&rt, "x.api.demo.test", "/x"), Some("api/all"));
    assert_eq!(routed(&rt, "y.x.api.demo.test", "/x"), Some("api/all"));
    // A wildcard does not match its bare suffix.
    assert_eq!(routed(&rt, "demo.test", "/x"), None);
    assert_eq!(routed(&rt, ".demo.test", "/x"), None);
}

#[test]
fn routes_for_the_exact_host_come_before_namespace_wide_ones() {
    let rt = compile(&sample(), &Runtime::unconfigured());
    // `demo/only-a` is a prefix `/` for `a.demo.test`; the namespace-wide
    // longer prefix and exact path come after it, as the schema orders.
    assert_eq!(routed(&rt, "a.demo.test", "/static/x"), Some("demo/only-a"));
    assert_eq!(
        routed(&rt, "a.demo.test", "/static/health"),
        Some("demo/only-a")
    );
    // When the host's own routes do not match, the wide ones still do.
    let rt = runtime([
        route("n/own", "n.local", exact("/own"), "b"),
        route("n/wide", "", prefix("/"), "b"),
    ]);
    assert_eq!(routed(&rt, "n.local", "/own"), Some("n/own"));
    assert_eq!(routed(&rt, "n.local", "/other"), Some("n/wide"));
    assert_eq!(routed(&rt, "x.n.test", "/own"), Some("n/wide"));
}

#[test]
fn exact_path_beats_prefix_and_longest_prefix_wins() {
    let rt = compile(&sample(), &Runtime::unconfigured());
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
fn prefix_beats_regex_and_regexes_match_the_whole_path() {
    let rt = runtime([
        route("n/regex", "", regex("/api/[a-z]+"), "b"),
        route("n/prefix", "", prefix("/api/v1"), "b"),
        route("n/exact", "", exact("/api/v1"), "b"),
    ]);
    assert_eq!(routed(&rt, "n.local", "/api/v1"), Some("n/exact"));
    assert_eq!(routed(&rt, "n.local", "/api/v1x"), Some("n/prefix"));
    assert_eq!(routed(&rt, "n.local", "/api/users"), Some("n/regex"));
    // Anchored at both ends: no partial match.
    assert_eq!(routed(&rt, "n.local", "/api/users/1"), None);
    assert_eq!(routed(&rt, "n.local", "/x/api/users"), None);
}

#[test]
fn overlapping_regexes_are_tried_in_pattern_order() {
    // Both match `/a/1`; the schema orders regexes by pattern, then name.
    let rt = runtime([
        route("n/any", "", regex("/a/.*"), "b"),
        route("n/digits", "", regex("/a/[0-9]+"), "b"),
        route("n/also-any", "", regex("/a/.*"), "b"),
    ]);
    assert_eq!(routed(&rt, "n.local", "/a/1"), Some("n/also-any"));
    let rt = runtime([
        route("n/z", "", regex("/a/[0-9]+"), "b"),
        route("n/y", "", regex("/a/[0-9]*1"), "b"),
    ]);
    assert_eq!(routed(&rt, "n.local", "/a/1"), Some("n/y"));
    assert_eq!(routed(&rt, "n.local", "/a/2"), Some("n/z"));
}

#[test]
fn more_conditions_first_then_by_name() {
    let rt = runtime([
        route("n/b-plain", "", prefix("/p"), "b"),
        route("n/a-plain", "", prefix("/p"), "b"),
        custom("n/one", "", prefix("/p"), |m| {
            m.headers = vec![key("x-canary", KeyRule::Present(true))];
        }),
        custom("n/two", "", prefix("/p"), |m| {
            m.headers = vec![key("x-canary", KeyRule::Present(true))];
            m.methods = vec!["POST".into()];
        }),
    ]);
    let canary = Request::get("/p").header("x-canary", "1");
    assert_eq!(canary.on(&rt, "n.local"), Some("n/one"));
    let canary_post = Request::get("/p")
        .header("x-canary", "1")
        .method(Method::POST);
    assert_eq!(canary_post.on(&rt, "n.local"), Some("n/two"));
    assert_eq!(Request::get("/p").on(&rt, "n.local"), Some("n/a-plain"));
}

#[test]
fn a_longer_prefix_whose_conditions_fail_falls_back_to_a_shorter_one() {
    let rt = runtime([
        custom("n/posts", "", prefix("/api/"), |m| {
            m.methods = vec!["POST".into()];
        }),
        route("n/root", "", prefix("/"), "b"),
        custom("n/get-x", "", regex("/api/x"), |m| {
            m.methods = vec!["GET".into()];
        }),
    ]);
    assert_eq!(
        Request::get("/api/x")
            .method(Method::POST)
            .on(&rt, "n.local"),
        Some("n/posts")
    );
    assert_eq!(Request::get("/api/x").on(&rt, "n.local"), Some("n/root"));
}

#[test]
fn a_regex_whose_conditions_fail_falls_through_to_later_patterns() {
    let rt = runtime([
        custom("n/first", "", regex("/a/.*"), |m| {
            m.methods = vec!["DELETE".into()];
        }),
        custom("n/second", "", regex("/a/[0-9]+"), |m| {
            m.methods = vec!["PUT".into()];
        }),
        route("n/third", "", regex("/a/[0-9]1?"), "b"),
    ]);
    let at = |method| Request::get("/a/1").method(method).on(&rt, "n.local");
    assert_eq!(at(Method::DELETE), Some("n/first"));
    assert_eq!(at(Method::PUT), Some("n/second"));
    assert_eq!(at(Method::GET), Some("n/third"));
    assert_eq!(
        Request::get("/a/22").method(Method::GET).on(&rt, "n.local"),
        None
    );
}

#[test]
fn header_conditions_exact_regex_present_absent() {
    // Same path, one condition each: tried by name.
    let rt = runtime([
        custom("n/1-exact", "", exact("/h"), |m| {
            m.headers = vec![key("X-Env", KeyRule::Exact("prod".into()))];
        }),
        custom("n/2-regex", "", exact("/h"), |m| {
            m.headers = vec![key("x-env", KeyRule::Regex("stag(e|ing)".into()))];
        }),
        custom("n/3-absent", "", exact("/h"), |m| {
            m.headers = vec![key("x-env", KeyRule::Absent(true))];
        }),
        custom("n/4-present", "", exact("/h"), |m| {
            m.headers = vec![key("x-env", KeyRule::Present(true))];
        }),
    ]);
    let with = |v| Request::get("/h").header("x-env", v).on(&rt, "n.local");
    assert_eq!(with("prod"), Some("n/1-exact"));
    assert_eq!(with("staging"), Some("n/2-regex"));
    // The regex matches the whole value.
    assert_eq!(with("pre-staging"), Some("n/4-present"));
    assert_eq!(with("PROD"), Some("n/4-present"));
    assert_eq!(Request::get("/h").on(&rt, "n.local"), Some("n/3-absent"));
    // Any one of several values may match.
    let two = Request::get("/h")
        .header("x-env", "dev")
        .header("x-env", "prod");
    assert_eq!(two.on(&rt, "n.local"), Some("n/1-exact"));
}

#[test]
fn query_conditions_exact_regex_present_absent() {
    // Same path, one condition each: tried by name.
    let rt = runtime([
        custom("n/1-exact", "", prefix("/q"), |m| {
            m.query_params = vec![key("v", KeyRule::Exact("2".into()))];
        }),
        custom("n/2-regex", "", prefix("/q"), |m| {
            m.query_params = vec![key("v", KeyRule::Regex("[3-9]".into()))];
        }),
        custom("n/3-absent", "", prefix("/q"), |m| {
            m.query_params = vec![key("v", KeyRule::Absent(true))];
        }),
        custom("n/4-present", "", prefix("/q"), |m| {
            m.query_params = vec![key("v", KeyRule::Present(true))];
        }),
    ]);
    let at = |path| Request::get(path).on(&rt, "n.local");
    assert_eq!(at("/q?a=1&v=2"), Some("n/1-exact"));
    // A repeated parameter is judged by its first value (as Envoy does).
    assert_eq!(at("/q?v=2&v=1"), Some("n/1-exact"));
    assert_eq!(at("/q?v=1&v=2"), Some("n/4-present"));
    assert_eq!(at("/q?v=7"), Some("n/2-regex"));
    assert_eq!(at("/q?v=77"), Some("n/4-present"));
    assert_eq!(at("/q?v"), Some("n/4-present"));
    assert_eq!(at("/q?vv=2&av=2"), Some("n/3-absent"));
    assert_eq!(at("/q"), Some("n/3-absent"));
}

#[test]
fn host_is_case_insensitive_and_port_is_ignored() {
    let rt = compile(&sample(), &Runtime::unconfigured());
    assert_eq!(routed(&rt, "DEMO.local:8080", "/"), Some("demo/root"));
    assert_eq!(routed(&rt, "Api.Example.COM", "/"), Some("api/all"));
    assert_eq!(routed(&rt, "demo.local.", "/"), Some("demo/root"));
    assert_eq!(bare_host("[::1]:8080"), "::1");
    assert_eq!(bare_host(" Demo.local..:80 "), "Demo.local");
    assert_eq!(bare_host("demo.local:"), "demo.local");
    assert_eq!(bare_host("demo.local:8o"), "demo.local:8o");
    assert_eq!(bare_host("8080"), "8080");
    assert_eq!(bare_host(&"a".repeat(MAX_HOST + 1)), "");
}

#[test]
fn unknown_host_or_path_matches_nothing() {
    let rt = compile(&sample(), &Runtime::unconfigured());
    assert!(lookup(&rt, "other.local", "/").is_none());
    let rt = runtime([route("n/r", "", exact("/a"), "b")]);
    assert!(lookup(&rt, "n.local", "/a/b").is_none());
    assert!(lookup(&rt, "n.local", "/a").is_some());
    assert!(!Runtime::unconfigured().is_configured());
    assert!(lookup(&Runtime::unconfigured(), "n.local", "/a").is_none());
}

#[test]
fn ten_thousand_routes_compile_and_match() {
    let mut routes = Vec::new();
    for i in 0..10_000 {
        let name = format!("n/r{i:05}");
        let path = match i % 3 {
            0 => exact(&format!("/exact/{i}")),
            1 => prefix(&format!("/prefix/{i}/")),
            _ => regex(&format!("/regex/{i}/[0-9]+")),
        };
        routes.push(route(&name, "", path, "b"));
    }
    let rt = runtime(routes);
    assert_eq!(routed(&rt, "n.local", "/exact/9999"), Some("n/r09999"));
    assert_eq!(routed(&rt, "n.local", "/prefix/4/x"), Some("n/r00004"));
    assert_eq!(routed(&rt, "n.local", "/prefix/4000/x"), Some("n/r04000"));
    assert_eq!(routed(&rt, "n.local", "/regex/9998/12"), Some("n/r09998"));
    assert_eq!(routed(&rt, "n.local", "/regex/9998/x"), None);
    assert_eq!(routed(&rt, "n.local", "/exact/1"), None);
}

/// A route of the small world the patch properties draw from: two
/// namespaces, routes that share paths, hosts and names, with and without
/// conditions, of every path rule.
fn world_route() -> impl Strategy<Value = Resource> {
    let path = prop_oneof![
        prop_oneof![Just("/"), Just("/a"), Just("/a/b")].prop_map(exact),
        prop_oneof![Just("/"), Just("/a"), Just("/a/"), Just("/b")].prop_map(prefix),
        prop_oneof![Just("/a/.*"), Just("/[ab]+"), Just("/a/b")].prop_map(regex),
    ];
    (
        0u8..6,
        prop_oneof![
            Just(("n", "")),
            Just(("n", "n.local")),
            Just(("n", "a.n.test")),
            Just(("m", "")),
            Just(("m", "m.local")),
        ],
        path,
        any::<bool>(),
        prop_oneof![
            Just(None),
            Just(Some(KeyRule::Present(true))),
            Just(Some(KeyRule::Exact("1".into())))
        ],
    )
        .prop_map(|(n, (namespace, host), path, post, header)| {
            custom(&format!("{namespace}/r{n}"), host, path, |m| {
                if post {
                    m.methods = vec!["POST".into()];
                }
                if let Some(rule) = header {
                    m.headers = vec![key("x-k", rule)];
                }
            })
        })
}

/// A change of routes only: some upserted, some removed.
fn world_change() -> impl Strategy<Value = (Vec<Resource>, Vec<String>)> {
    (
        proptest::collection::vec(world_route(), 0..4),
        proptest::collection::vec(
            (0u8..6, prop_oneof![Just("n"), Just("m")]).prop_map(|(n, ns)| format!("{ns}/r{n}")),
            0..3,
        ),
    )
}

/// Where `patched` and `fresh` route every request of a grid apart.
fn routed_apart(patched: &Runtime, fresh: &Runtime) -> Option<String> {
    let hosts = ["n.local", "a.n.test", "b.n.test", "m.local", "other"];
    let paths = ["/", "/a", "/a/", "/a/b", "/a/bc", "/b", "/ab"];
    for host in hosts {
        for path in paths {
            for method in [Method::GET, Method::POST] {
                for header in [None, Some("1"), Some("2")] {
                    let mut request = Request::get(path).method(method.clone());
                    if let Some(value) = header {
                        request = request.header("x-k", value);
                    }
                    let (a, b) = (request.on(patched, host), request.on(fresh, host));
                    if a != b {
                        return Some(format!(
                            "{method} {host}{path} x-k={header:?}: patched {a:?}, fresh {b:?}"
                        ));
                    }
                }
            }
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Revisions that change only routes are patched into the previous
    /// runtime, which then routes every request exactly as a fresh compile
    /// of the same snapshot does.
    #[test]
    fn a_patched_runtime_routes_as_a_fresh_compile(
        base in proptest::collection::vec(world_route(), 0..10),
        changes in proptest::collection::vec(world_change(), 1..4),
    ) {
        let mut snapshot = Snapshot::from_resources(
            1,
            [
                namespace("n", &["n.local", "*.n.test"]),
                namespace("m", &["m.local"]),
                backend("n/b", &["127.0.0.1:1"]),
                backend("m/b", &["127.0.0.1:2"]),
            ],
        );
        for resource in base {
            let mut next = snapshot.clone();
            next.insert(resource);
            if prism_proto::validate_snapshot(&next).is_ok() {
                snapshot = next;
            }
        }
        let mut runtime = compile(&snapshot, &Runtime::unconfigured());
        for (upserts, removals) in changes {
            let mut next = snapshot.clone();
            next.revision += 1;
            for name in removals {
                next.remove(&prism_proto::ResourceKey::new(Kind::Route, name));
            }
            for resource in upserts {
                next.insert(resource);
            }
            if prism_proto::validate_snapshot(&next).is_err() {
                continue;
            }
            runtime = compile(&next, &runtime);
            let fresh = compile(&next, &Runtime::unconfigured());
            prop_assert_eq!(routed_apart(&runtime, &fresh), None);
            snapshot = next;
        }
    }
}

#[test]
fn a_route_only_revision_shares_every_unchanged_route() {
    let first = runtime([
        route("n/kept", "", prefix("/kept"), "b"),
        route("n/changed", "", prefix("/changed"), "b"),
        route("n/gone", "", regex("/gone/.*"), "b"),
    ]);
    let mut next = first.snapshot.clone();
    next.revision += 1;
    next.insert(route("n/changed", "", prefix("/changed/v2"), "b"));
    next.remove(&prism_proto::ResourceKey::new(Kind::Route, "n/gone"));
    let second = compile(&next, &first);
    let kept = |rt: &Runtime| Arc::clone(lookup(rt, "n.local", "/kept").expect("routed"));
    assert!(Arc::ptr_eq(&kept(&first), &kept(&second)));
    assert_eq!(routed(&second, "n.local", "/changed/v2"), Some("n/changed"));
    assert_eq!(routed(&second, "n.local", "/changed"), None);
    assert_eq!(routed(&second, "n.local", "/gone/x"), None);
    assert_eq!(routed(&first, "n.local", "/gone/x"), Some("n/gone"));
}

#[test]
fn a_patch_that_fails_is_refused_as_a_fresh_compile_refuses_it() {
    let first = runtime([route("n/kept", "", prefix("/kept"), "b")]);
    let mut next = first.snapshot.clone();
    next.revision += 1;
    next.insert(custom("n/bad", "", prefix("/bad"), |m| {
        m.methods = vec!["BAD METHOD".into()];
    }));
    let patched = Runtime::compile(&next, &first, &OwnAddresses::default()).map(|_| ());
    let fresh =
        Runtime::compile(&next, &Runtime::unconfigured(), &OwnAddresses::default()).map(|_| ());
    assert!(patched.is_err());
    assert_eq!(patched, fresh);
}
