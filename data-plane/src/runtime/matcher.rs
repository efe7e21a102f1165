//! The route matcher, compiled once per apply, in the order `RouteMatch` in
//! the schema defines: the request's host picks one host table (exact host,
//! then the longest wildcard suffix, then the catch-all `*`; port ignored);
//! within it the routes for that exact host are tried before the
//! namespace-wide ones, each tier exact path → prefix (longest first) →
//! regex, and within one path rule the routes sorted by
//! [`prism_proto::match_order`] (more conditions first, then name). The first
//! route whose conditions (methods, headers, query parameters) hold wins.
//!
//! A revision that changes a few routes of a large policy patches the
//! matcher it replaces ([`Matcher::patch`]): only the path rules those routes
//! are under are rebuilt; every other rule is shared with the old matcher,
//! keys and candidates alike (`Arc`s), and so is every regex automaton whose
//! set of patterns did not change. A fresh build is a patch of the empty
//! matcher (whose tiers are built in one pass, [`Tier::build`]); a property
//! test holds patched matchers to routing exactly as fresh ones do.
//!
//! A lookup allocates nothing: a host with uppercase letters is lowercased
//! into a stack buffer (others are looked up as they are), exact
//! paths and prefixes are hash lookups (one per distinct prefix length), all
//! regex paths of a tier are one multi-pattern automaton, and the query string
//! is scanned in place.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
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
#[derive(Debug, Default, Clone)]
pub(crate) struct Matcher {
    /// Exact hosts, lowercase, and the catch-all `*`.
    hosts: Map<Box<str>, HostTable>,
    /// Wildcard hosts by suffix with its leading dot (`*.example.com` is
    /// `.example.com`), so a host's suffixes can be looked up label by label.
    wildcards: Map<Box<str>, HostTable>,
    /// Each namespace's tiers and the host tables made of them, for the next
    /// patch.
    namespaces: HashMap<Box<str>, Tiers>,
}

/// One namespace's routes: its wide tier, a tier per host routes name, and
/// the keys of `Matcher::hosts` and `Matcher::wildcards` it fills.
#[derive(Debug, Default, Clone)]
struct Tiers {
    wide: Arc<Tier>,
    /// By lowercase host.
    specific: HashMap<Box<str>, Arc<Tier>>,
    hosts: Vec<Box<str>>,
    wildcards: Vec<Box<str>>,
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

/// A route while compiling: its namespace, its spec and what it compiled to.
pub(super) struct Entry<'a> {
    pub namespace: &'a str,
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

/// Routes of one tier, indexed by path rule. Each rule's candidates are one
/// `Arc`, as is its key, so a patched copy of a large tier shares all the
/// rules it does not change.
#[derive(Debug, Default, Clone)]
struct Tier {
    exact: Map<Arc<str>, Arc<[Candidate]>>,
    /// Distinct prefix lengths, longest first.
    prefix_lengths: Vec<usize>,
    prefixes: Map<Arc<str>, Arc<[Candidate]>>,
    regexes: Option<Regexes>,
}

/// Distinct regex paths of a tier, in match order (by pattern: regexes come
/// after every exact path and prefix, and among themselves by path).
#[derive(Debug, Clone)]
struct Regexes {
    /// The patterns as written, by index.
    patterns: Vec<Arc<str>>,
    /// All patterns, anchored to the whole path; leftmost-first, so a match
    /// reports the first pattern (in match order) that matches.
    set: meta::Regex,
    /// The same patterns one by one, for when the first match's conditions
    /// fail and later patterns must be tried.
    each: Vec<regex::Regex>,
    /// Routes by pattern index.
    routes: Vec<Arc<[Candidate]>>,
}

/// A route and the conditions it needs besides its path.
#[derive(Debug, Clone)]
struct Candidate {
    conditions: Conditions,
    route: Arc<Route>,
}

/// Which path rule of a tier a route is under, borrowed from its spec.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum PathRule<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Regex(&'a str),
}

/// Changes to one tier: routes that leave it (by name, under their old rule)
/// and candidates that join it.
#[derive(Default)]
struct TierChange<'a> {
    leave: Vec<(PathRule<'a>, &'a str)>,
    join: Vec<(PathRule<'a>, Candidate)>,
}

#[derive(Debug, Default, Clone)]
struct Conditions {
    methods: Vec<Method>,
    headers: Vec<(HeaderName, Rule)>,
    query: Vec<(Box<str>, Rule)>,
}

#[derive(Debug, Clone)]
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
    /// Host tables for the namespaces of `snapshot`, from `routes` (each
    /// route of it that has a path).
    pub(super) fn build(
        snapshot: &Snapshot,
        routes: Vec<Entry<'_>>,
    ) -> Result<Matcher, CompileError> {
        let namespaces: Vec<&str> = snapshot
            .of_kind(Kind::Namespace)
            .map(|entry| entry.resource.name())
            .collect();
        Matcher::default().patch(snapshot, &namespaces, &[], routes)
    }

    /// This matcher with the routes `leave` (as they were in the policy it
    /// was built from) taken out and `join` put in, for `snapshot`, whose
    /// namespaces are as they were. The host tables of the namespaces the
    /// changes touch, and of `namespaces`, are rebuilt from `snapshot`.
    pub(super) fn patch(
        &self,
        snapshot: &Snapshot,
        namespaces: &[&str],
        leave: &[&Resource],
        join: Vec<Entry<'_>>,
    ) -> Result<Matcher, CompileError> {
        let mut changes: BTreeMap<(&str, String), TierChange<'_>> = BTreeMap::new();
        for resource in leave {
            if let Resource::Route(spec) = resource
                && let Some((host, rule)) = placement(spec)
            {
                changes
                    .entry((resource.namespace(), host))
                    .or_default()
                    .leave
                    .push((rule, spec.name.as_str()));
            }
        }
        for entry in join {
            let Some((host, rule)) = placement(entry.spec) else {
                continue;
            };
            let Some(m) = entry.spec.r#match.as_ref() else {
                continue;
            };
            let candidate = Candidate {
                conditions: Conditions::compile(m, &entry.spec.name)?,
                route: entry.route,
            };
            changes
                .entry((entry.namespace, host))
                .or_default()
                .join
                .push((rule, candidate));
        }
        let mut matcher = self.clone();
        let mut rebuilt: Vec<&str> = namespaces.to_vec();
        for ((namespace, host), change) in changes {
            rebuilt.push(namespace);
            let tiers = matcher.namespaces.entry(namespace.into()).or_default();
            if host.is_empty() {
                tiers.wide = Arc::new(tiers.wide.patch(change)?);
                continue;
            }
            let tier = match tiers.specific.get(host.as_str()) {
                Some(old) => old.patch(change)?,
                None => Tier::default().patch(change)?,
            };
            if tier.is_empty() {
                tiers.specific.remove(host.as_str());
            } else {
                tiers.specific.insert(host.into(), Arc::new(tier));
            }
        }
        rebuilt.sort_unstable();
        rebuilt.dedup();
        for namespace in rebuilt {
            matcher.tables(snapshot, namespace);
        }
        Ok(matcher)
    }

    /// Rebuilds the host tables of `namespace` from its tiers and its hosts
    /// in `snapshot`: every host it names or a route of it names gets a
    /// table, and each wildcard host one by its suffix.
    fn tables(&mut self, snapshot: &Snapshot, namespace: &str) {
        let Matcher {
            hosts,
            wildcards,
            namespaces,
        } = self;
        let tiers = namespaces.entry(namespace.into()).or_default();
        for host in tiers.hosts.drain(..) {
            hosts.remove(&host);
        }
        for suffix in tiers.wildcards.drain(..) {
            wildcards.remove(&suffix);
        }
        let Some(Resource::Namespace(ns)) = snapshot
            .get(&prism_proto::ResourceKey::new(Kind::Namespace, namespace))
            .map(|entry| &entry.resource)
        else {
            namespaces.remove(namespace);
            return;
        };
        let mut named: Vec<Box<str>> = ns
            .hosts
            .iter()
            .filter(|h| !h.starts_with("*."))
            .map(|h| h.to_ascii_lowercase().into())
            .collect();
        for host in tiers.specific.keys() {
            if !named.contains(host) {
                named.push(host.clone());
            }
        }
        for host in named {
            let table = HostTable {
                specific: tiers.specific.get(&host).cloned(),
                wide: Arc::clone(&tiers.wide),
            };
            hosts.insert(host.clone(), table);
            tiers.hosts.push(host);
        }
        for pattern in ns.hosts.iter().filter(|h| h.starts_with("*.")) {
            // Keep the leading dot: `*.example.com` matches
            // `a.example.com` but not `example.com`.
            let suffix: Box<str> = pattern[1..].to_ascii_lowercase().into();
            let table = HostTable {
                specific: None,
                wide: Arc::clone(&tiers.wide),
            };
            wildcards.insert(suffix.clone(), table);
            tiers.wildcards.push(suffix);
        }
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
    /// This tier with `change` made: only the path rules it touches are
    /// rebuilt, and the regex automaton only if its patterns change.
    fn patch(&self, change: TierChange<'_>) -> Result<Tier, CompileError> {
        if self.is_empty() && change.leave.is_empty() {
            return Tier::build(change.join);
        }
        let mut tier = self.clone();
        let mut rules: Map<PathRule<'_>, (Vec<&str>, Vec<Candidate>)> = Map::default();
        for (rule, name) in change.leave {
            rules.entry(rule).or_default().0.push(name);
        }
        for (rule, candidate) in change.join {
            rules.entry(rule).or_default().1.push(candidate);
        }
        let mut prefixes_changed = false;
        let mut regex_rules: Option<Map<Arc<str>, Arc<[Candidate]>>> = None;
        let mut patterns_changed = false;
        for (rule, (leave, join)) in rules {
            match rule {
                PathRule::Exact(path) => {
                    update(&mut tier.exact, path, &leave, join);
                }
                PathRule::Prefix(prefix) => {
                    prefixes_changed |= update(&mut tier.prefixes, prefix, &leave, join);
                }
                PathRule::Regex(pattern) => {
                    let rules = regex_rules.get_or_insert_with(|| tier.regex_rules());
                    patterns_changed |= update(rules, pattern, &leave, join);
                }
            }
        }
        if prefixes_changed {
            let mut lengths: Vec<usize> = tier.prefixes.keys().map(|p| p.len()).collect();
            lengths.sort_unstable_by(|a, b| b.cmp(a));
            lengths.dedup();
            tier.prefix_lengths = lengths;
        }
        if let Some(rules) = regex_rules {
            tier.regexes = match tier.regexes.take() {
                Some(mut regexes) if !patterns_changed => {
                    regexes.routes = regexes
                        .patterns
                        .iter()
                        .filter_map(|p| rules.get(p).cloned())
                        .collect();
                    Some(regexes)
                }
                _ => Regexes::build(rules)?,
            };
        }
        Ok(tier)
    }

    /// A tier of `routes` alone: each rule's candidates are gathered under
    /// its borrowed path, then sorted and frozen once (a fresh policy's tiers
    /// are built so, not rule by rule).
    fn build(routes: Vec<(PathRule<'_>, Candidate)>) -> Result<Tier, CompileError> {
        let mut exact: Map<&str, Vec<Candidate>> = Map::default();
        let mut prefixes: Map<&str, Vec<Candidate>> = Map::default();
        let mut regexes: Map<&str, Vec<Candidate>> = Map::default();
        for (rule, candidate) in routes {
            let (rules, path) = match rule {
                PathRule::Exact(path) => (&mut exact, path),
                PathRule::Prefix(prefix) => (&mut prefixes, prefix),
                PathRule::Regex(pattern) => (&mut regexes, pattern),
            };
            rules.entry(path).or_default().push(candidate);
        }
        let freeze = |rules: Map<&str, Vec<Candidate>>| -> Map<Arc<str>, Arc<[Candidate]>> {
            rules
                .into_iter()
                .map(|(path, mut candidates)| {
                    candidates.sort_by(|a, b| a.order().cmp(&b.order()));
                    (Arc::from(path), Arc::from(candidates))
                })
                .collect()
        };
        let mut prefix_lengths: Vec<usize> = prefixes.keys().map(|p| p.len()).collect();
        prefix_lengths.sort_unstable_by(|a, b| b.cmp(a));
        prefix_lengths.dedup();
        Ok(Tier {
            exact: freeze(exact),
            prefix_lengths,
            prefixes: freeze(prefixes),
            regexes: Regexes::build(freeze(regexes))?,
        })
    }

    /// Whether no route is in this tier.
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty() && self.regexes.is_none()
    }

    /// The regex rules, by pattern.
    fn regex_rules(&self) -> Map<Arc<str>, Arc<[Candidate]>> {
        self.regexes.as_ref().map_or_else(Map::default, |r| {
            r.patterns
                .iter()
                .cloned()
                .zip(r.routes.iter().cloned())
                .collect()
        })
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

impl Regexes {
    /// The automaton of `rules`' patterns, in match order; `None` when
    /// there are none.
    fn build(rules: Map<Arc<str>, Arc<[Candidate]>>) -> Result<Option<Regexes>, CompileError> {
        if rules.is_empty() {
            return Ok(None);
        }
        let mut rules: Vec<(Arc<str>, Arc<[Candidate]>)> = rules.into_iter().collect();
        rules.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let (patterns, routes): (Vec<_>, Vec<_>) = rules.into_iter().unzip();
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
        Ok(Some(Regexes {
            patterns,
            set,
            each,
            routes,
        }))
    }
}

impl Candidate {
    /// Its place within its path rule, as [`prism_proto::match_order`] puts
    /// it: more conditions first, then by route name.
    fn order(&self) -> (Reverse<usize>, &str) {
        let c = &self.conditions;
        let count = usize::from(!c.methods.is_empty()) + c.headers.len() + c.query.len();
        (Reverse(count), self.route.name.as_str())
    }
}

/// Takes the routes named in `leave` out of the rule `rule` of `rules` and
/// puts `join` in, in match order; whether the rule came or went.
fn update(
    rules: &mut Map<Arc<str>, Arc<[Candidate]>>,
    rule: &str,
    leave: &[&str],
    join: Vec<Candidate>,
) -> bool {
    // Taken out and put back: the key's `Arc` is kept, not allocated anew.
    let (key, mut candidates) = match rules.remove_entry(rule) {
        Some((key, old)) => {
            let kept = old
                .iter()
                .filter(|c| !leave.contains(&c.route.name.as_str()))
                .cloned();
            (Some(key), kept.collect())
        }
        None => (None, Vec::new()),
    };
    let existed = key.is_some();
    candidates.extend(join);
    if candidates.is_empty() {
        return existed;
    }
    candidates.sort_by(|a, b| a.order().cmp(&b.order()));
    rules.insert(key.unwrap_or_else(|| rule.into()), candidates.into());
    !existed
}

/// The host (lowercase; empty for the namespace's wide tier) and path rule
/// a route is under; `None` without a path.
fn placement(spec: &prism_proto::Route) -> Option<(String, PathRule<'_>)> {
    let m = spec.r#match.as_ref()?;
    let rule = match m.path.as_ref()? {
        Path::Exact(p) => PathRule::Exact(p),
        Path::Prefix(p) => PathRule::Prefix(p),
        Path::Regex(p) => PathRule::Regex(p),
    };
    Some((m.host.to_ascii_lowercase(), rule))
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
