//! What a matched route does, compiled once per apply: forward to one of its
//! weighted backends (with its rewrites), redirect, or answer directly; and
//! the header changes on the way up and back.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use prism_proto::pb::config::v1::{self as pb, rewrite};

use super::{Backend, CompileError};
use crate::metrics::RouteSeries;

/// A route's action.
#[derive(Debug)]
pub(crate) enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Respond(Respond),
}

/// Forward upstream, to one backend picked by weight.
#[derive(Debug)]
pub(crate) struct Forward {
    /// The weighted backends; never empty.
    backends: Vec<Split>,
    pub rewrite: Rewrite,
}

/// One backend of a route's split.
#[derive(Debug)]
pub(crate) struct Split {
    pub backend: Arc<Backend>,
    /// Where the route's requests to this backend are recorded; `None` with
    /// metrics off.
    pub series: Option<Arc<RouteSeries>>,
    /// The running sum of the weights up to and including this one.
    until: u32,
}

/// The path and host sent upstream.
#[derive(Debug, Default)]
pub(crate) struct Rewrite {
    path: Option<PathRewrite>,
    pub host: Option<HeaderValue>,
}

#[derive(Debug)]
enum PathRewrite {
    /// The matched prefix (`prefix`) becomes `replacement`.
    Prefix {
        prefix: Box<str>,
        replacement: Box<str>,
    },
    /// Every match of `regex` becomes `substitution` (`$N` groups).
    Regex {
        regex: regex::Regex,
        substitution: String,
    },
}

/// Answer with a redirect.
#[derive(Debug)]
pub(crate) struct Redirect {
    scheme: Option<Box<str>>,
    host: Option<Box<str>>,
    port: Option<u16>,
    path: Option<Box<str>>,
    pub status: StatusCode,
}

/// Answer with a fixed status and body.
#[derive(Debug)]
pub(crate) struct Respond {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Changes to a header map, applied remove → set → add.
#[derive(Debug, Default)]
pub(crate) struct HeaderMutation {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl Action {
    /// The action of `spec`, whose backends are looked up in `backend` (by
    /// full name), and the series of its requests to each in `series` (by
    /// the backend's full name). Validation made sure exactly one action is
    /// given.
    pub(super) fn compile(
        spec: &prism_proto::Route,
        namespace: &str,
        backend: impl Fn(&str) -> Option<Arc<Backend>>,
        series: impl Fn(&str) -> Option<Arc<RouteSeries>>,
    ) -> Result<Action, CompileError> {
        let invalid = |field: &str, reason: String| CompileError::Match {
            route: spec.name.clone(),
            field: field.to_string(),
            reason,
        };
        if let Some(r) = &spec.redirect {
            let status = match r.status {
                0 => StatusCode::FOUND,
                s => u16::try_from(s)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .ok_or_else(|| invalid("redirect.status", format!("{s} is not a status")))?,
            };
            let port = match r.port {
                0 => None,
                p => Some(
                    u16::try_from(p)
                        .map_err(|_| invalid("redirect.port", format!("{p} is not a port")))?,
                ),
            };
            let text = |s: &str| (!s.is_empty()).then(|| s.into());
            return Ok(Action::Redirect(Redirect {
                scheme: text(&r.scheme),
                host: text(&r.host),
                port,
                path: text(&r.path),
                status,
            }));
        }
        if let Some(d) = &spec.direct_response {
            let status = u16::try_from(d.status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .ok_or_else(|| {
                    invalid(
                        "direct_response.status",
                        format!("{} is not a status", d.status),
                    )
                })?;
            return Ok(Action::Respond(Respond {
                status,
                body: Bytes::from(d.body.clone()),
            }));
        }
        let weighted: Vec<(&str, u32)> = if spec.backends.is_empty() {
            vec![(spec.backend.as_str(), 1)]
        } else {
            spec.backends
                .iter()
                .map(|b| (b.name.as_str(), b.weight.max(1)))
                .collect()
        };
        let mut backends = Vec::with_capacity(weighted.len());
        let mut total: u32 = 0;
        for (name, weight) in weighted {
            let full = format!("{namespace}/{name}");
            let Some(found) = backend(&full) else {
                return Err(CompileError::MissingBackend {
                    route: spec.name.clone(),
                    backend: full,
                });
            };
            total = total.saturating_add(weight);
            backends.push(Split {
                series: series(&full),
                backend: found,
                until: total,
            });
        }
        Ok(Action::Forward(Forward {
            backends,
            rewrite: Rewrite::compile(spec, &invalid)?,
        }))
    }
}

impl Forward {
    /// One backend, picked by weight: a uniform draw over the sum of the
    /// weights, so each backend's share converges to its weight's.
    pub(crate) fn pick(&self) -> &Split {
        let first = &self.backends[0];
        if self.backends.len() == 1 {
            return first;
        }
        let total = self.backends.last().map_or(1, |split| split.until);
        let draw = rand::random_range(0..total);
        self.backends
            .iter()
            .find(|split| draw < split.until)
            .unwrap_or(first)
    }

    /// Every backend of the split, in the order given.
    #[cfg(test)]
    pub(crate) fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.iter().map(|split| &split.backend)
    }
}

impl Rewrite {
    fn compile(
        spec: &prism_proto::Route,
        invalid: &impl Fn(&str, String) -> CompileError,
    ) -> Result<Rewrite, CompileError> {
        let Some(r) = &spec.rewrite else {
            return Ok(Rewrite::default());
        };
        let path = match &r.path {
            None => None,
            Some(rewrite::Path::Prefix(replacement)) => {
                let prefix = match spec.r#match.as_ref().and_then(|m| m.path.as_ref()) {
                    Some(pb::route_match::Path::Prefix(p)) => p.as_str(),
                    _ => {
                        return Err(invalid("rewrite.prefix", "needs a `match.prefix`".into()));
                    }
                };
                Some(PathRewrite::Prefix {
                    prefix: prefix.into(),
                    replacement: replacement.as_str().into(),
                })
            }
            Some(rewrite::Path::Regex(r)) => Some(PathRewrite::Regex {
                regex: regex::Regex::new(&r.pattern)
                    .map_err(|e| invalid("rewrite.regex.pattern", e.to_string()))?,
                substitution: substitution(&r.substitution),
            }),
        };
        let host = match r.host.as_str() {
            "" => None,
            h => {
                Some(HeaderValue::from_str(h).map_err(|e| invalid("rewrite.host", e.to_string()))?)
            }
        };
        Ok(Rewrite { path, host })
    }

    /// The path to send upstream instead of `path`, if it changes.
    pub(crate) fn path(&self, path: &str) -> Option<String> {
        match self.path.as_ref()? {
            PathRewrite::Prefix {
                prefix,
                replacement,
            } => {
                let rest = path.strip_prefix(&**prefix)?;
                Some(format!("{replacement}{rest}"))
            }
            PathRewrite::Regex {
                regex,
                substitution,
            } => Some(regex.replace_all(path, substitution.as_str()).into_owned()),
        }
    }
}

/// The schema's `\N` groups in the `regex` crate's `${N}` form, with literal
/// `$` escaped.
fn substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                if let Some(d) = chars.next() {
                    out.push_str("${");
                    out.push(d);
                    out.push('}');
                }
            }
            c => out.push(c),
        }
    }
    out
}

impl Redirect {
    /// The `location` for a request with `scheme`, `host` (as sent, maybe
    /// with a port), `path` and `query`, as Envoy builds it: the redirect's
    /// `port` when set, else the request's port as sent, left out only when
    /// the scheme changes and it was the old scheme's default (`http://h:80`
    /// to `https://h`).
    pub(crate) fn location(
        &self,
        scheme: &str,
        host: &str,
        path: &str,
        query: Option<&str>,
    ) -> Option<HeaderValue> {
        let (request_host, request_port) = split_port(host);
        let to_scheme = self.scheme.as_deref().unwrap_or(scheme);
        let port = self.port.or_else(|| {
            let default = if scheme.eq_ignore_ascii_case("https") {
                443
            } else {
                80
            };
            request_port.filter(|p| to_scheme.eq_ignore_ascii_case(scheme) || *p != default)
        });
        let host = self.host.as_deref().unwrap_or(request_host);
        let mut location = format!("{to_scheme}://{host}");
        if let Some(port) = port {
            location.push_str(&format!(":{port}"));
        }
        let new_path = self.path.as_deref();
        location.push_str(new_path.unwrap_or(path));
        if let Some(query) = query.filter(|_| !new_path.is_some_and(|p| p.contains('?'))) {
            location.push('?');
            location.push_str(query);
        }
        let location: Uri = location.parse().ok()?;
        HeaderValue::from_str(&location.to_string()).ok()
    }
}

/// `host[:port]` (or `[v6][:port]`) into host and port.
fn split_port(host: &str) -> (&str, Option<u16>) {
    let split = if host.starts_with('[') {
        host.rfind("]:").map(|i| (&host[..=i], &host[i + 2..]))
    } else {
        host.rsplit_once(':')
    };
    match split.and_then(|(h, p)| p.parse().ok().map(|p| (h, p))) {
        Some((h, p)) => (h, Some(p)),
        None => (host, None),
    }
}

impl HeaderMutation {
    pub(super) fn compile(
        spec: Option<&pb::HeaderMutation>,
        route: &str,
        field: &str,
    ) -> Result<HeaderMutation, CompileError> {
        let Some(m) = spec else {
            return Ok(HeaderMutation::default());
        };
        let invalid = |reason: String| CompileError::Match {
            route: route.to_string(),
            field: field.to_string(),
            reason,
        };
        let name = |n: &str| {
            HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
                .map_err(|e| invalid(e.to_string()))
        };
        let pair = |h: &pb::HeaderValue| {
            Ok((
                name(&h.name)?,
                HeaderValue::from_str(&h.value).map_err(|e| invalid(e.to_string()))?,
            ))
        };
        Ok(HeaderMutation {
            remove: m.remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
            set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
        })
    }

    /// Applies the changes to `headers`: remove, then set, then add.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Whether it sets or adds `name`.
    pub(crate) fn writes(&self, name: &HeaderName) -> bool {
        self.set.iter().chain(&self.add).any(|(n, _)| n == name)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::runtime::OwnAddresses;

    fn split(weights: &[u32]) -> Forward {
        let mut sum = 0;
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let spec = prism_proto::Backend {
                    name: format!("n/b{i}"),
                    endpoints: vec![prism_proto::Endpoint {
                        address: "127.0.0.1:1".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                sum += w;
                let backend = Backend::compile(
                    &prism_proto::Snapshot::empty(1),
                    &spec,
                    "1",
                    String::new(),
                    &OwnAddresses::default(),
                    None,
                );
                Split {
                    backend: Arc::new(backend.expect("compiles")),
                    series: None,
                    until: sum,
                }
            })
            .collect();
        Forward {
            backends,
            rewrite: Rewrite::default(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn split_shares_converge_to_the_weights(
            weights in prop::collection::vec(1u32..=10, 1..5)
        ) {
            let forward = split(&weights);
            const DRAWS: usize = 20_000;
            let mut counts = vec![0usize; weights.len()];
            for _ in 0..DRAWS {
                let picked = forward.pick();
                let index = forward
                    .backends()
                    .position(|b| Arc::ptr_eq(b, &picked.backend))
                    .expect("one of the split");
                counts[index] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (count, weight) in counts.iter().zip(&weights) {
                let share = *count as f64 / DRAWS as f64;
                let expected = f64::from(*weight) / f64::from(total);
                // About six standard deviations at the widest.
                prop_assert!((share - expected).abs() < 0.02, "{share} vs {expected}");
            }
        }
    }

    #[test]
    fn regex_substitution_groups_become_the_regex_crates() {
        assert_eq!(substitution(r"/v2/\1/$x"), "/v2/${1}/$$x");
    }

    #[test]
    fn redirect_location_keeps_what_it_does_not_replace() {
        let redirect = |scheme: &str, host: &str, port: u16, path: &str| Redirect {
            scheme: (!scheme.is_empty()).then(|| scheme.into()),
            host: (!host.is_empty()).then(|| host.into()),
            port: (port > 0).then_some(port),
            path: (!path.is_empty()).then(|| path.into()),
            status: StatusCode::FOUND,
        };
        let at = |r: &Redirect, host| {
            r.location("http", host, "/a", Some("q=1"))
                .map(|v| v.to_str().unwrap_or_default().to_string())
        };
        // The request's port stays, as Envoy keeps it, unless the scheme
        // changes from its default port.
        let same = redirect("", "", 0, "");
        assert_eq!(at(&same, "h:8080").as_deref(), Some("http://h:8080/a?q=1"));
        assert_eq!(at(&same, "h:80").as_deref(), Some("http://h:80/a?q=1"));
        let https = redirect("https", "", 0, "");
        assert_eq!(
            at(&https, "h:8080").as_deref(),
            Some("https://h:8080/a?q=1")
        );
        assert_eq!(at(&https, "h:80").as_deref(), Some("https://h/a?q=1"));
        assert_eq!(at(&https, "h:443").as_deref(), Some("https://h:443/a?q=1"));
        let moved = redirect("", "new.example", 8443, "/b");
        assert_eq!(
            at(&moved, "h").as_deref(),
            Some("http://new.example:8443/b?q=1")
        );
        // A port the redirect names is written out, default or not.
        let query = redirect("", "", 80, "/b?x=2");
        assert_eq!(at(&query, "h:8080").as_deref(), Some("http://h:80/b?x=2"));
        assert_eq!(split_port("[::1]:80"), ("[::1]", Some(80)));
    }
}
