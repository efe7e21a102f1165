//! The order in which routes are tried, as `RouteMatch` in the schema defines
//! it. Both planes sort by this one key: the proxy's matcher and the control
//! plane's Envoy translation, so a request takes the same route through either.

use std::cmp::Reverse;

use crate::pb::config::v1::{Route, route_match::Path};

/// Sort key of a route among the routes of one host and one tier (routes for
/// that exact host, or namespace-wide ones): exact paths, then prefixes
/// longest first, then regexes; within one path rule, more conditions first;
/// then by name. Smaller sorts first.
pub type MatchOrder<'a> = (u8, Reverse<usize>, &'a str, Reverse<usize>, &'a str);

/// The [`MatchOrder`] of `route`.
pub fn match_order(route: &Route) -> MatchOrder<'_> {
    let m = route.r#match.as_ref();
    let conditions = m.map_or(0, |m| {
        usize::from(!m.methods.is_empty()) + m.headers.len() + m.query_params.len()
    });
    let (rank, path) = match m.and_then(|m| m.path.as_ref()) {
        Some(Path::Exact(p)) => (0, p.as_str()),
        Some(Path::Prefix(p)) => (1, p.as_str()),
        Some(Path::Regex(p)) => (2, p.as_str()),
        None => (3, ""),
    };
    let length = if rank < 2 { path.len() } else { 0 };
    (
        rank,
        Reverse(length),
        path,
        Reverse(conditions),
        &route.name,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::config::v1::{KeyMatch, RouteMatch};

    fn route(name: &str, path: Path, conditions: usize) -> Route {
        Route {
            name: name.into(),
            r#match: Some(RouteMatch {
                path: Some(path),
                headers: vec![KeyMatch::default(); conditions],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn exact_then_longest_prefix_then_regex_then_conditions_then_name() {
        let mut routes = [
            route("n/regex", Path::Regex("/.*".into()), 0),
            route("n/short", Path::Prefix("/".into()), 0),
            route("n/b", Path::Prefix("/api/".into()), 0),
            route("n/a", Path::Prefix("/api/".into()), 0),
            route("n/cond", Path::Prefix("/api/".into()), 1),
            route("n/exact", Path::Exact("/".into()), 0),
        ];
        routes.sort_by(|a, b| match_order(a).cmp(&match_order(b)));
        let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["n/exact", "n/cond", "n/a", "n/b", "n/short", "n/regex"]
        );
    }
}
