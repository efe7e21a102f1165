//! The route matcher, compiled once per apply, in the order `RouteMatch` in
//! the schema defines: the request's host picks one host table (exact host,
//! then the longest wildcard suffix, then the catch-all `*`; port ignored);
//! within it the routes for that exact host are tried before the
//! namespace-wide ones, each tier exact path → prefix (longest first) →
//! regex, and within one path rule the routes sorted by
//! [`prism_proto::match_order`] (more conditions first, then name). The first
//! route whose conditions (methods, headers, query parameters) hold wins.
//!
//! A lookup allocates nothing: a host with uppercase letters is lowercased
//! into a stack buffer (others are looked up as they are), exact
//! paths and prefixes are hash lookups (one per distinct prefix length), all
//! regex paths of a tier are one multi-pattern automaton, and the query string
//! is scanned in place.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method};
use prism_proto::pb::config::v1::key_match::Rule as KeyRule;
use prism_proto::pb::config::v1::route_match::Path;
use prism_proto::pb::config::v1::{KeyMatch, RouteMatch};
use prism_proto::{Kind, Resource, Snapshot};
use regex_automata::meta;

use super::{CompileError, Route};

/// The lookup maps: keys are fixed at compile and never come from a
/// request, so a fast hash (not SipHash) is safe; it halves a lookup's cost.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Host tables of every namespace.
#[derive(Debug, Default)]
pub(crate) struct Matcher {
    /// Exact hosts, lowercase, and the catch-all `*`.
    hosts: Map<Box<str>, HostTable>,
    /// Wildcard hosts by suffix with its leading dot (`*.example.com` is
    /// `.example.com`), so a host's suffixes can be looked up label by label.
    wildcards: Map<Box<str>, HostTable>,
}

/// What a route is matched on, borrowed from the request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Probe<'a> {
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    /// Raw query string, without `?`.
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// A route while compiling: its spec and what it compiled to.
pub(super) struct Entry<'a> {
    pub spec: &'a prism_proto::Route,
    pub route: Arc<Route>,
}

/// The routes that answer for one host: those for exactly that host, then the
/// namespace's wide ones (shared by all its hosts).
#[derive(Debug, Clone)]
struct HostTable {
    specific: Option<Arc<Tier>>,
    wide: Arc<Tier>,
}

/// Routes of one tier, indexed by path rule.
#[derive(Debug, Default)]
struct Tier {
    exact: Map<Box<str>, Vec<Candidate>>,
    /// Distinct prefix lengths, longest first.
    prefix_lengths: Vec<usize>,
    prefixes: Map<Box<str>, Vec<Candidate>>,
    regexes: Option<Regexes>,
}

/// Distinct regex paths of a tier, in match order.
#[derive(Debug)]
struct Regexes {
    /// All patterns, anchored to the whole path; leftmost-first, so a match
    /// reports the first pattern (in match order) that matches.
    set: meta::Regex,
    /// The same patterns one by one, for when the first match's conditions
    /// fail and later patterns must be tried.
    each: Vec<regex::Regex>,
    /// Routes by pattern index.
    routes: Vec<Vec<Candidate>>,
}

/// A route and the conditions it needs besides its path.
#[derive(Debug)]
struct Candidate {
    conditions: Conditions,
    route: Arc<Route>,
}

#[derive(Debug, Default)]
struct Conditions {
    methods: Vec<Method>,
    headers: Vec<(HeaderName, Rule)>,
    query: Vec<(Box<str>, Rule)>,
}

#[derive(Debug)]
enum Rule {
    Exact(Box<str>),
    /// Anchored to the whole value.
    Regex(regex::Regex),
    Present,
    Absent,
}

/// Longest host looked up; a DNS name is at most 253 bytes.
const MAX_HOST: usize = 255;

impl Matcher {
    /// Host tables for the namespaces of `snapshot`, from their routes.
    pub(super) fn build(
        snapshot: &Snapshot,
        mut by_namespace: HashMap<&str, Vec<Entry<'_>>>,
    ) -> Result<Matcher, CompileError> {
        let mut matcher = Matcher::default();
        for entry in snapshot.of_kind(Kind::Namespace) {
            let Resource::Namespace(ns) = &entry.resource else {
                continue;
            };
            let mut routes = by_namespace.remove(ns.name.as_str()).unwrap_or_default();
            routes.sort_by(|a, b| {
                prism_proto::match_order(a.spec).cmp(&prism_proto::match_order(b.spec))
            });
            // Routes by their host, lowercase; "" for namespace-wide ones.
            let mut by_host: HashMap<String, Vec<&Entry<'_>>> = HashMap::new();
            for entry in &routes {
                let host = entry
                    .spec
                    .r#match
                    .as_ref()
                    .map_or(String::new(), |m| m.host.to_ascii_lowercase());
                by_host.entry(host).or_default().push(entry);
            }
            let wide = by_host.remove("").unwrap_or_default();
            let wide = Arc::new(Tier::build(wide.into_iter())?);
            // Every host named by the namespace or by a route gets a table.
            let mut named: Vec<String> = ns
                .hosts
                .iter()
                .filter(|h| !h.starts_with("*."))
                .map(|h| h.to_ascii_lowercase())
                .collect();
            named.extend(
                by_host
                    .keys()
                    .filter(|h| !named.contains(h))
                    .cloned()
                    .collect::<Vec<_>>(),
            );
            for host in named {
                let specific = match by_host.remove(&host) {
                    Some(entries) => Some(Arc::new(Tier::build(entries.into_iter())?)),
                    None => None,
                };
                let table = HostTable {
                    specific,
                    wide: Arc::clone(&wide),
                };
                matcher.hosts.insert(host.into(), table);
            }
            for pattern in ns.hosts.iter().filter(|h| h.starts_with("*.")) {
                // Keep the leading dot: `*.example.com` matches
                // `a.example.com` but not `example.com`.
                let table = HostTable {
                    specific: None,
                    wide: Arc::clone(&wide),
                };
                matcher
                    .wildcards
                    .insert(pattern[1..].to_ascii_lowercase().into(), table);
            }
        }
        Ok(matcher)
    }

    /// The route for a request to `host` (any case, with or without port).
    pub(crate) fn route(&self, host: &str, probe: &Probe<'_>) -> Option<&Arc<Route>> {
        let mut host = bare_host(host);
        // Hosts arrive lowercase almost always; only the others are copied
        // (and the buffer initialised at all).
        let mut buffer: [u8; MAX_HOST];
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            buffer = [0; MAX_HOST];
            host = lowercase(host, &mut buffer);
        }
        let table = self
            .hosts
            .get(host)
            .or_else(|| self.wildcard(host))
            .or_else(|| self.hosts.get("*"))?;
        table
            .specific
            .as_ref()
            .and_then(|tier| tier.route(probe))
            .or_else(|| table.wide.route(probe))
    }

    /// The longest wildcard suffix of `host`: suffixes are tried from the
    /// first dot on, so the first found is the longest. The suffix never
    /// starts at 0, so at least one label is left for the `*`.
    fn wildcard(&self, host: &str) -> Option<&HostTable> {
        if self.wildcards.is_empty() {
            return None;
        }
        host.char_indices()
            .filter(|&(i, c)| c == '.' && i > 0)
            .find_map(|(i, _)| self.wildcards.get(&host[i..]))
    }
}

impl Tier {
    /// A tier from its routes, already in match order.
    fn build<'a: 'b, 'b>(
        entries: impl Iterator<Item = &'b Entry<'a>>,
    ) -> Result<Tier, CompileError> {
        let mut tier = Tier::default();
        let mut patterns: Vec<&str> = Vec::new();
        let mut pattern_routes: Vec<Vec<Candidate>> = Vec::new();
        for entry in entries {
            let Some(m) = entry.spec.r#match.as_ref() else {
                continue;
            };
            let candidate = Candidate {
                conditions: Conditions::compile(m, &entry.spec.name)?,
                route: Arc::clone(&entry.route),
            };
            match &m.path {
                Some(Path::Exact(p)) => tier
                    .exact
                    .entry(p.as_str().into())
                    .or_default()
                    .push(candidate),
                Some(Path::Prefix(p)) => {
                    if !tier.prefix_lengths.contains(&p.len()) {
                        tier.prefix_lengths.push(p.len());
                    }
                    tier.prefixes
                        .entry(p.as_str().into())
                        .or_default()
                        .push(candidate);
                }
                Some(Path::Regex(p)) => match patterns.iter().position(|q| q == p) {
                    Some(i) => pattern_routes[i].push(candidate),
                    None => {
                        patterns.push(p);
                        pattern_routes.push(vec![candidate]);
                    }
                },
                None => {}
            }
        }
        tier.prefix_lengths.sort_unstable_by(|a, b| b.cmp(a));
        if !patterns.is_empty() {
            let anchored: Vec<String> = patterns.iter().map(|p| anchor(p)).collect();
            let set = meta::Regex::builder()
                .configure(meta::Config::new().nfa_size_limit(None))
                .build_many(&anchored)
                .map_err(|e| CompileError::Regex {
                    pattern: e
                        .pattern()
                        .and_then(|p| patterns.get(p.as_usize()))
                        .map_or_else(String::new, |p| p.to_string()),
                    reason: e.to_string(),
                })?;
            let each = anchored
                .iter()
                .map(|p| compile_regex(p))
                .collect::<Result<_, _>>()?;
            tier.regexes = Some(Regexes {
                set,
                each,
                routes: pattern_routes,
            });
        }
        Ok(tier)
    }

    fn route(&self, probe: &Probe<'_>) -> Option<&Arc<Route>> {
        let path = probe.path;
        if let Some(route) = self.exact.get(path).and_then(|c| first(c, probe)) {
            return Some(route);
        }
        for &len in &self.prefix_lengths {
            let Some(prefix) = path.get(..len) else {
                continue;
            };
            if let Some(route) = self.prefixes.get(prefix).and_then(|c| first(c, probe)) {
                return Some(route);
            }
        }
        let regexes = self.regexes.as_ref()?;
        let found = regexes.set.search(&regex_automata::Input::new(path))?;
        let start = found.pattern().as_usize();
        if let Some(route) = first(&regexes.routes[start], probe) {
            return Some(route);
        }
        // The first matching pattern's conditions failed: try the later
        // patterns one by one (rare: only routes that share a path shape
        // but differ in conditions get here).
        regexes
            .each
            .iter()
            .zip(&regexes.routes)
            .skip(start + 1)
            .filter(|(regex, _)| regex.is_match(path))
            .find_map(|(_, candidates)| first(candidates, probe))
    }
}

/// The first candidate whose conditions hold.
#[inline]
fn first<'c>(candidates: &'c [Candidate], probe: &Probe<'_>) -> Option<&'c Arc<Route>> {
    candidates
        .iter()
        .find(|c| c.conditions.hold(probe))
        .map(|c| &c.route)
}

impl Conditions {
    fn compile(m: &RouteMatch, route: &str) -> Result<Conditions, CompileError> {
        let invalid = |field: String, reason: String| CompileError::Match {
            route: route.to_string(),
            field,
            reason,
        };
        let methods = m
            .methods
            .iter()
            .enumerate()
            .map(|(i, name)| {
                Method::from_bytes(name.as_bytes())
                    .map_err(|e| invalid(format!("match.methods[{i}]"), e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let headers = m
            .headers
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let name = HeaderName::from_bytes(k.name.to_ascii_lowercase().as_bytes())
                    .map_err(|e| invalid(format!("match.headers[{i}].name"), e.to_string()))?;
                Ok((name, Rule::compile(k, route)?))
            })
            .collect::<Result<_, CompileError>>()?;
        let query = m
            .query_params
            .iter()
            .map(|k| Ok((k.name.as_str().into(), Rule::compile(k, route)?)))
            .collect::<Result<_, CompileError>>()?;
        Ok(Conditions {
            methods,
            headers,
            query,
        })
    }

    #[inline]
    fn hold(&self, probe: &Probe<'_>) -> bool {
        (self.methods.is_empty() || self.methods.contains(probe.method))
            && self.headers.iter().all(|(name, rule)| {
                let mut values = probe.headers.get_all(name).iter();
                match rule {
                    Rule::Present => values.next().is_some(),
                    Rule::Absent => values.next().is_none(),
                    Rule::Exact(_) | Rule::Regex(_) => {
                        values.any(|v| v.to_str().is_ok_and(|v| rule.accepts(v)))
                    }
                }
            })
            && self.query.iter().all(|(name, rule)| {
                // A repeated parameter is judged by its first value, as Envoy
                // does, so that one policy routes alike on both data planes.
                let first = query_values(probe.query, name).next();
                match rule {
                    Rule::Present => first.is_some(),
                    Rule::Absent => first.is_none(),
                    Rule::Exact(_) | Rule::Regex(_) => first.is_some_and(|v| rule.accepts(v)),
                }
            })
    }
}

impl Rule {
    fn compile(k: &KeyMatch, route: &str) -> Result<Rule, CompileError> {
        Ok(match &k.rule {
            Some(KeyRule::Exact(v)) => Rule::Exact(v.as_str().into()),
            Some(KeyRule::Regex(p)) => Rule::Regex(compile_regex(&anchor(p))?),
            Some(KeyRule::Present(_)) => Rule::Present,
            Some(KeyRule::Absent(_)) => Rule::Absent,
            // Validation requires a rule; none is refused, not read as "any".
            None => {
                return Err(CompileError::Match {
                    route: route.to_string(),
                    field: format!("{}: rule", k.name),
                    reason: "one rule is required".into(),
                });
            }
        })
    }

    fn accepts(&self, value: &str) -> bool {
        match self {
            Rule::Exact(v) => **v == *value,
            Rule::Regex(r) => r.is_match(value),
            Rule::Present | Rule::Absent => true,
        }
    }
}

/// Values of the query parameter `name`, raw (not percent-decoded), scanned
/// in place. A parameter without `=` has the empty value.
fn query_values<'q>(query: Option<&'q str>, name: &'q str) -> impl Iterator<Item = &'q str> {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(move |pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name && !pair.is_empty()).then_some(value)
        })
}

/// `pattern` matching only the whole input.
fn anchor(pattern: &str) -> String {
    format!(r"\A(?:{pattern})\z")
}

fn compile_regex(pattern: &str) -> Result<regex::Regex, CompileError> {
    regex::Regex::new(pattern).map_err(|e| CompileError::Regex {
        pattern: pattern.to_string(),
        reason: e.to_string(),
    })
}

/// The host without port or trailing dot; handles `[v6]:port`. A host too
/// long to be a DNS name comes back empty, which no table but `*` takes.
fn bare_host(host: &str) -> &str {
    // A host is the URI's authority or a `HeaderValue::to_str`: ASCII, with
    // no whitespace but spaces and tabs.
    let host = host.trim_ascii();
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(inside, _)| inside)
    } else {
        // A `:port` of digits (maybe none) is cut: scanning back over the
        // digits stops at its colon. Cheaper than finding the last colon
        // first, since most hosts have no port and end in a letter.
        let bytes = host.as_bytes();
        let digits = bytes
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_digit())
            .count();
        match bytes.len().checked_sub(digits + 1) {
            Some(colon) if bytes[colon] == b':' => &host[..colon],
            _ => host,
        }
    };
    let dots = bare.bytes().rev().take_while(|&b| b == b'.').count();
    let bare = &bare[..bare.len() - dots];
    if bare.len() > MAX_HOST { "" } else { bare }
}

/// `host` (at most [`MAX_HOST`] bytes, as [`bare_host`] leaves it) in ASCII
/// lowercase, written into `buffer`.
fn lowercase<'b>(host: &str, buffer: &'b mut [u8; MAX_HOST]) -> &'b str {
    let Some(out) = buffer.get_mut(..host.len()) else {
        return "";
    };
    out.copy_from_slice(host.as_bytes());
    out.make_ascii_lowercase();
    // ASCII lowercasing of valid UTF-8 is valid UTF-8.
    std::str::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests;
