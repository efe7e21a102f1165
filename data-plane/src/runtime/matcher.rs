//! The route matcher: host (exact, then the longest wildcard suffix, then
//! the catch-all `*`; port ignored) → path (exact, then the longest prefix) → [`Route`].

use std::collections::HashMap;
use std::sync::Arc;

use prism_proto::{Kind, Resource, Snapshot};

use super::Route;

/// Host tables of every namespace.
#[derive(Debug, Default)]
pub(super) struct Matcher {
    /// Exact hosts, lowercase, and the catch-all `*`.
    hosts: HashMap<String, Arc<RouteTable>>,
    /// Wildcard hosts as `(".suffix", table)`, longest suffix first.
    wildcards: Vec<(String, Arc<RouteTable>)>,
}

/// A route while compiling: the host and path it matches, and its target.
pub(super) struct Entry<'a> {
    pub host: &'a str,
    pub path: PathMatch<'a>,
    pub route: Arc<Route>,
}

pub(super) enum PathMatch<'a> {
    Exact(&'a str),
    Prefix(&'a str),
}

/// The routes that answer for one host.
#[derive(Debug, Default)]
struct RouteTable {
    exact: HashMap<String, Arc<Route>>,
    /// Prefix routes, longest prefix first.
    prefixes: Vec<(String, Arc<Route>)>,
}

impl Matcher {
    /// Host tables for the namespaces of `snapshot`, from their routes.
    pub(super) fn build(
        snapshot: &Snapshot,
        mut by_namespace: HashMap<&str, Vec<Entry<'_>>>,
    ) -> Matcher {
        let mut hosts: HashMap<String, Arc<RouteTable>> = HashMap::new();
        let mut wildcards = Vec::new();
        for entry in snapshot.of_kind(Kind::Namespace) {
            let Resource::Namespace(ns) = &entry.resource else {
                continue;
            };
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
        Matcher { hosts, wildcards }
    }

    /// The route for `host` and `path`.
    pub(super) fn route(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
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
}

impl RouteTable {
    /// Builds a table from routes in priority order: the first route with a
    /// given match wins.
    fn build<'a: 'b, 'b>(entries: impl Iterator<Item = &'b Entry<'a>>) -> RouteTable {
        let mut table = RouteTable::default();
        for entry in entries {
            match entry.path {
                PathMatch::Exact(path) => {
                    table
                        .exact
                        .entry(path.to_string())
                        .or_insert_with(|| Arc::clone(&entry.route));
                }
                PathMatch::Prefix(path) => {
                    if !table.prefixes.iter().any(|(p, _)| p == path) {
                        table
                            .prefixes
                            .push((path.to_string(), Arc::clone(&entry.route)));
                    }
                }
            }
        }
        table
            .prefixes
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        table
    }

    fn route(&self, path: &str) -> Option<&Arc<Route>> {
        self.exact.get(path).or_else(|| {
            self.prefixes
                .iter()
                .find(|(prefix, _)| path.starts_with(prefix.as_str()))
                .map(|(_, t)| t)
        })
    }
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

#[cfg(test)]
mod tests {
    use prism_proto::pb::config::v1::route_match::Path;

    use super::*;
    use crate::runtime::Runtime;
    use crate::runtime::tests::{backend, compile, namespace, route, sample};

    fn routed<'a>(rt: &'a Runtime, host: &str, path: &str) -> Option<&'a str> {
        rt.route(host, path).map(|t| t.name.as_str())
    }

    #[test]
    fn the_catch_all_host_takes_what_no_other_host_does() {
        let mut snapshot = sample();
        snapshot.insert(namespace("fallback", &["*"]));
        snapshot.insert(backend("fallback/web", &["127.0.0.1:3001"]));
        snapshot.insert(route("fallback/all", "", Path::Prefix("/".into()), "web"));
        let rt = compile(&snapshot, &Runtime::unconfigured());
        assert_eq!(routed(&rt, "other.test", "/"), Some("fallback/all"));
        assert_eq!(routed(&rt, "b.demo.test", "/x"), Some("demo/root"));
        assert_eq!(routed(&rt, "demo.local", "/"), Some("demo/root"));
    }

    #[test]
    fn exact_host_beats_wildcard_and_longest_wildcard_wins() {
        let rt = compile(&sample(), &Runtime::unconfigured());
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
    fn host_is_case_insensitive_and_port_is_ignored() {
        let rt = compile(&sample(), &Runtime::unconfigured());
        assert_eq!(routed(&rt, "DEMO.local:8080", "/"), Some("demo/root"));
        assert_eq!(routed(&rt, "Api.Example.COM", "/"), Some("api/all"));
        assert_eq!(normalize_host("[::1]:8080"), "::1");
    }

    #[test]
    fn unknown_host_or_path_matches_nothing() {
        let rt = compile(&sample(), &Runtime::unconfigured());
        assert!(rt.route("other.local", "/").is_none());
        let only_exact = Snapshot::from_resources(
            1,
            [
                namespace("n", &["n.local"]),
                backend("n/b", &["127.0.0.1:1"]),
                route("n/r", "", Path::Exact("/a".into()), "b"),
            ],
        );
        let rt = compile(&only_exact, &Runtime::unconfigured());
        assert!(rt.route("n.local", "/a/b").is_none());
        assert!(rt.route("n.local", "/a").is_some());
        assert!(!Runtime::unconfigured().is_configured());
        assert!(Runtime::unconfigured().route("n.local", "/a").is_none());
    }
}
