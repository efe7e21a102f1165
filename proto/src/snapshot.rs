//! Snapshots of the whole policy at a revision, and the deltas between them.
//!
//! The algebra the rest of Prism leans on: `a.apply(&Snapshot::diff(&a, &b)) == b`.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::resource::{Kind, Resource, ResourceKey, Versioned};

/// The complete policy at one revision. Immutable once built and shared behind
/// `Arc`s: cloning a snapshot clones one pointer, not the map or its
/// resources, so the copies a proxy keeps (staged, accepted, shown by its
/// admin, saved to disk) cost nothing; the map is copied once, by the first
/// change made to a snapshot whose map is shared.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub revision: u64,
    resources: Arc<BTreeMap<ResourceKey, Arc<Versioned>>>,
}

/// What turns one snapshot into another: resources to add or replace, keys to
/// remove, and the revision the result carries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub revision: u64,
    pub upserts: Vec<Arc<Versioned>>,
    pub removals: Vec<ResourceKey>,
}

impl Snapshot {
    /// An empty snapshot at `revision`.
    pub fn empty(revision: u64) -> Self {
        Self {
            revision,
            resources: Arc::default(),
        }
    }

    /// A snapshot holding `resources` (later duplicates replace earlier ones).
    pub fn from_resources(revision: u64, resources: impl IntoIterator<Item = Resource>) -> Self {
        let mut snapshot = Self::empty(revision);
        for resource in resources {
            snapshot.insert(resource);
        }
        snapshot
    }

    /// Adds or replaces one resource.
    pub fn insert(&mut self, resource: Resource) {
        self.insert_versioned(Arc::new(resource.versioned()));
    }

    /// Adds or replaces one already versioned resource.
    pub fn insert_versioned(&mut self, versioned: Arc<Versioned>) {
        Arc::make_mut(&mut self.resources).insert(versioned.resource.key(), versioned);
    }

    /// Removes one resource, returning it if it was there.
    pub fn remove(&mut self, key: &ResourceKey) -> Option<Arc<Versioned>> {
        if !self.resources.contains_key(key) {
            return None;
        }
        Arc::make_mut(&mut self.resources).remove(key)
    }

    pub fn get(&self, key: &ResourceKey) -> Option<&Arc<Versioned>> {
        self.resources.get(key)
    }

    pub fn contains(&self, kind: Kind, name: &str) -> bool {
        self.resources.contains_key(&ResourceKey::new(kind, name))
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// Every resource, ordered by kind then name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Versioned>> {
        self.resources.values()
    }

    /// The resources of one kind, ordered by name.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Arc<Versioned>> {
        let start = ResourceKey::new(kind, String::new());
        self.resources
            .range(start..)
            .take_while(move |(key, _)| key.kind == kind)
            .map(|(_, v)| v)
    }

    /// The delta that turns `from` into `to`: every resource of `to` that `from`
    /// lacks or holds at another version, and every key of `from` that `to` lacks.
    ///
    /// One walk over both (each is ordered by key), where a resource that two
    /// snapshots share as one `Arc` is passed over without comparing versions:
    /// a proxy diffs each revision against the last, which shares all but
    /// what changed.
    pub fn diff(from: &Snapshot, to: &Snapshot) -> Delta {
        let mut delta = Delta {
            revision: to.revision,
            ..Delta::default()
        };
        if Arc::ptr_eq(&from.resources, &to.resources) {
            return delta;
        }
        let mut old = from.resources.iter().peekable();
        let mut new = to.resources.iter().peekable();
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((a, _)), Some((b, _))) => a.cmp(b),
            };
            match order {
                Ordering::Less => {
                    if let Some((key, _)) = old.next() {
                        delta.removals.push(key.clone());
                    }
                }
                Ordering::Greater => {
                    if let Some((_, versioned)) = new.next() {
                        delta.upserts.push(Arc::clone(versioned));
                    }
                }
                Ordering::Equal => {
                    if let (Some((_, a)), Some((_, b))) = (old.next(), new.next())
                        && !Arc::ptr_eq(a, b)
                        && a.version != b.version
                    {
                        delta.upserts.push(Arc::clone(b));
                    }
                }
            }
        }
        delta
    }

    /// This snapshot with `delta` applied: removals first, then upserts.
    pub fn apply(&self, delta: &Delta) -> Snapshot {
        let mut next = self.clone();
        for key in &delta.removals {
            next.remove(key);
        }
        for versioned in &delta.upserts {
            next.insert_versioned(Arc::clone(versioned));
        }
        next.revision = delta.revision;
        next
    }
}

impl Delta {
    /// Whether applying this delta changes no resource.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::pb::config::v1::{
        Backend, BackendLimits, CaBundle, CircuitBreaker, DirectResponse, Endpoint,
        GrpcHealthCheck, HashPolicy, HeaderMutation, HeaderValue, HealthCheck, HttpHealthCheck,
        KeyMatch, Namespace, OutlierDetection, RateLimit, Redirect, RegexRewrite, RetryPolicy,
        Rewrite, Route, RouteMatch, Secret, TlsCertificate, UpstreamTls, WeightedBackend,
        ZoneAware, hash_policy, health_check, key_match, rewrite, route_match, secret,
    };

    const NAME: &str = "[a-c]";

    fn duration() -> impl Strategy<Value = Option<pbjson_types::Duration>> {
        proptest::option::of(
            (0i64..100, 0i32..1_000_000_000)
                .prop_map(|(seconds, nanos)| pbjson_types::Duration { seconds, nanos }),
        )
    }

    fn rate_limits() -> impl Strategy<Value = Vec<RateLimit>> {
        proptest::collection::vec(
            (0u32..100, 0u32..200, any::<bool>()).prop_map(|(rps, burst, per_client_ip)| {
                RateLimit {
                    requests_per_second: rps,
                    burst,
                    per_client_ip,
                }
            }),
            0..3,
        )
    }

    fn secret() -> impl Strategy<Value = Resource> {
        (NAME, NAME, any::<bool>(), "[A-Z]{0,4}", "[a-z]{0,4}").prop_map(
            |(ns, n, is_cert, chain, key)| {
                let kind = if is_cert {
                    secret::Kind::TlsCertificate(TlsCertificate {
                        certificate_chain: chain,
                        private_key: key,
                    })
                } else {
                    secret::Kind::CaBundle(CaBundle {
                        certificates: chain,
                    })
                };
                Resource::Secret(Secret {
                    name: format!("{ns}/{n}"),
                    kind: Some(kind),
                })
            },
        )
    }

    fn namespace() -> impl Strategy<Value = Resource> {
        (
            NAME,
            proptest::collection::vec("[a-c]\\.test|\\*", 0..3),
            duration(),
            "[a-c]?",
            rate_limits(),
        )
            .prop_map(|(n, hosts, default_timeout, tls_secret, rate_limits)| {
                Resource::Namespace(Namespace {
                    name: n,
                    hosts,
                    default_timeout,
                    tls_secret,
                    rate_limits,
                    ..Default::default()
                })
            })
    }

    fn hash_policy() -> impl Strategy<Value = Option<HashPolicy>> {
        proptest::option::of(
            prop_oneof![
                "x-[a-c]".prop_map(hash_policy::Key::Header),
                "[a-c]".prop_map(hash_policy::Key::Cookie),
                any::<bool>().prop_map(hash_policy::Key::ClientIp),
            ]
            .prop_map(|key| HashPolicy { key: Some(key) }),
        )
    }

    fn health_check() -> impl Strategy<Value = Option<HealthCheck>> {
        proptest::option::of(
            (
                duration(),
                duration(),
                0u32..5,
                0u32..5,
                prop_oneof![
                    ("/[a-c]*", "[a-c]?").prop_map(|(path, host)| health_check::Check::Http(
                        HttpHealthCheck { path, host }
                    )),
                    "[a-c]?".prop_map(|service_name| health_check::Check::Grpc(GrpcHealthCheck {
                        service_name
                    })),
                ],
            )
                .prop_map(|(interval, timeout, unhealthy, healthy, check)| {
                    HealthCheck {
                        interval,
                        timeout,
                        unhealthy_threshold: unhealthy,
                        healthy_threshold: healthy,
                        check: Some(check),
                    }
                }),
        )
    }

    fn backend() -> impl Strategy<Value = Resource> {
        (
            (NAME, NAME, 1u16..4, "[a-c]?", 0u32..3, 0i32..6, 0i32..4),
            hash_policy(),
            proptest::option::of((0u32..101).prop_map(|p| ZoneAware {
                min_healthy_percent: p,
            })),
            health_check(),
            proptest::option::of(
                (0u32..10, 0u32..10, duration(), duration(), 0u32..101).prop_map(
                    |(c5xx, gateway, base, max, percent)| OutlierDetection {
                        consecutive_5xx: c5xx,
                        consecutive_gateway_failure: gateway,
                        base_ejection_time: base,
                        max_ejection_time: max,
                        max_ejection_percent: percent,
                    },
                ),
            ),
            proptest::option::of((0u32..10, duration(), 0u32..3, 0u32..3).prop_map(
                |(failures, open, half_open, successes)| CircuitBreaker {
                    failure_threshold: failures,
                    open_timeout: open,
                    half_open_max_requests: half_open,
                    success_threshold: successes,
                },
            )),
            proptest::option::of(
                (0u32..2000, 0u32..2000, 0u32..2000, 0u32..10, duration()).prop_map(
                    |(connections, pending, requests, per_connection, idle)| BackendLimits {
                        max_connections: connections,
                        max_pending_requests: pending,
                        max_requests: requests,
                        max_requests_per_connection: per_connection,
                        idle_timeout: idle,
                    },
                ),
            ),
            proptest::option::of(
                ("[a-c]?", "[a-c]?", "[a-c]?").prop_map(|(ca, sni, client)| UpstreamTls {
                    ca_secret: ca,
                    sni,
                    client_certificate_secret: client,
                }),
            ),
        )
            .prop_map(
                |(
                    (ns, n, port, zone, weight, lb_policy, protocol),
                    hash_policy,
                    zone_aware,
                    health_check,
                    outlier_detection,
                    circuit_breaker,
                    limits,
                    tls,
                )| {
                    Resource::Backend(Backend {
                        name: format!("{ns}/{n}"),
                        protocol,
                        endpoints: vec![Endpoint {
                            address: format!("127.0.0.1:{port}"),
                            zone,
                            weight,
                        }],
                        lb_policy,
                        connect_timeout: None,
                        hash_policy,
                        zone_aware,
                        health_check,
                        outlier_detection,
                        circuit_breaker,
                        limits,
                        tls,
                    })
                },
            )
    }

    fn key_matches() -> impl Strategy<Value = Vec<KeyMatch>> {
        proptest::collection::vec(
            (
                "x-[a-c]",
                prop_oneof![
                    "[a-c]*".prop_map(key_match::Rule::Exact),
                    "[a-c]+\\.\\*".prop_map(key_match::Rule::Regex),
                    any::<bool>().prop_map(key_match::Rule::Present),
                    any::<bool>().prop_map(key_match::Rule::Absent),
                ],
            )
                .prop_map(|(name, rule)| KeyMatch {
                    name,
                    rule: Some(rule),
                }),
            0..3,
        )
    }

    fn route_match() -> impl Strategy<Value = RouteMatch> {
        (
            "([a-c]\\.test)?",
            prop_oneof![
                "/[a-c]?".prop_map(route_match::Path::Prefix),
                "/[a-c]?".prop_map(route_match::Path::Exact),
                "/[a-c]+/.*".prop_map(route_match::Path::Regex),
            ],
            proptest::collection::vec("GET|POST|PUT", 0..3),
            key_matches(),
            key_matches(),
        )
            .prop_map(|(host, path, methods, headers, query_params)| RouteMatch {
                host,
                path: Some(path),
                methods,
                headers,
                query_params,
            })
    }

    /// The action fields of a route: `backend`, `backends`, `redirect`,
    /// `direct_response`.
    type Action = (
        String,
        Vec<WeightedBackend>,
        Option<Redirect>,
        Option<DirectResponse>,
    );

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            NAME.prop_map(|b| (b, vec![], None, None)),
            proptest::collection::vec(
                (NAME, 0u32..100).prop_map(|(name, weight)| WeightedBackend { name, weight }),
                1..3
            )
            .prop_map(|backends| (String::new(), backends, None, None)),
            ("https?", "[a-c]?", 0u32..3, "/?[a-c]?", 0u32..310).prop_map(
                |(scheme, host, port, path, status)| (
                    String::new(),
                    vec![],
                    Some(Redirect {
                        scheme,
                        host,
                        port,
                        path,
                        status
                    }),
                    None
                )
            ),
            (200u32..600, "[a-z ]*").prop_map(|(status, body)| (
                String::new(),
                vec![],
                None,
                Some(DirectResponse { status, body })
            )),
        ]
    }

    fn header_mutation() -> impl Strategy<Value = Option<HeaderMutation>> {
        let values = || {
            proptest::collection::vec(
                ("x-[a-c]", "[a-c]*").prop_map(|(name, value)| HeaderValue { name, value }),
                0..2,
            )
        };
        proptest::option::of(
            (
                values(),
                values(),
                proptest::collection::vec("x-[a-c]", 0..2),
            )
                .prop_map(|(add, set, remove)| HeaderMutation { add, set, remove }),
        )
    }

    fn retry() -> impl Strategy<Value = Option<RetryPolicy>> {
        proptest::option::of(
            (
                0u32..5,
                proptest::collection::vec("5xx|reset|unavailable", 0..3),
                duration(),
                duration(),
                duration(),
                any::<bool>(),
                0u32..101,
                0u32..5,
            )
                .prop_map(
                    |(num, retry_on, per_try, base, max, non_idempotent, budget, min)| {
                        RetryPolicy {
                            num_retries: num,
                            retry_on,
                            per_try_timeout: per_try,
                            base_interval: base,
                            max_interval: max,
                            retry_non_idempotent: non_idempotent,
                            budget_percent: budget,
                            min_retry_concurrency: min,
                        }
                    },
                ),
        )
    }

    fn rewrite() -> impl Strategy<Value = Option<Rewrite>> {
        proptest::option::of(
            (
                proptest::option::of(prop_oneof![
                    "/[a-c]?".prop_map(rewrite::Path::Prefix),
                    ("[a-c]+", "\\\\1?[a-c]*").prop_map(|(pattern, substitution)| {
                        rewrite::Path::Regex(RegexRewrite {
                            pattern,
                            substitution,
                        })
                    }),
                ]),
                "[a-c]?",
            )
                .prop_map(|(path, host)| Rewrite { path, host }),
        )
    }

    fn route() -> impl Strategy<Value = Resource> {
        (
            (NAME, NAME, route_match(), action(), duration(), duration()),
            (
                rewrite(),
                header_mutation(),
                header_mutation(),
                retry(),
                rate_limits(),
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (ns, n, r#match, (backend, backends, redirect, direct_response), timeout, idle),
                    (
                        rewrite,
                        request_headers,
                        response_headers,
                        retry,
                        rate_limits,
                        max_request_body_bytes,
                    ),
                )| {
                    Resource::Route(Route {
                        name: format!("{ns}/{n}"),
                        r#match: Some(r#match),
                        backend,
                        timeout,
                        backends,
                        redirect,
                        direct_response,
                        rewrite,
                        request_headers,
                        response_headers,
                        idle_timeout: idle,
                        retry,
                        rate_limits,
                        max_request_body_bytes,
                    })
                },
            )
    }

    fn resource() -> impl Strategy<Value = Resource> {
        prop_oneof![secret(), namespace(), backend(), route()]
    }

    fn snapshot() -> impl Strategy<Value = Snapshot> {
        (0u64..100, proptest::collection::vec(resource(), 0..12))
            .prop_map(|(revision, resources)| Snapshot::from_resources(revision, resources))
    }

    proptest! {
        #[test]
        fn apply_of_diff_is_the_target(a in snapshot(), b in snapshot()) {
            prop_assert_eq!(a.apply(&Snapshot::diff(&a, &b)), b);
        }

        #[test]
        fn diff_to_itself_is_empty(a in snapshot()) {
            prop_assert!(Snapshot::diff(&a, &a).is_empty());
        }

        #[test]
        fn diff_names_only_what_changed(a in snapshot(), b in snapshot()) {
            let delta = Snapshot::diff(&a, &b);
            for upsert in &delta.upserts {
                let key = upsert.resource.key();
                prop_assert!(a.get(&key).is_none_or(|old| old.version != upsert.version));
            }
            for key in &delta.removals {
                prop_assert!(a.get(key).is_some() && b.get(key).is_none());
            }
        }

        #[test]
        fn deltas_compose(a in snapshot(), b in snapshot(), c in snapshot()) {
            let via_b = a.apply(&Snapshot::diff(&a, &b)).apply(&Snapshot::diff(&b, &c));
            prop_assert_eq!(via_b, c);
        }

        #[test]
        fn encoding_round_trips(r in resource()) {
            let decoded = Resource::decode(r.kind(), &r.encode_to_vec()).expect("decodes");
            prop_assert_eq!(&decoded, &r);
            let from_json = Resource::from_json(r.kind(), r.to_json()).expect("parses");
            prop_assert_eq!(from_json, r);
        }
    }

    #[test]
    fn of_kind_returns_only_that_kind_in_name_order() {
        let s = Snapshot::from_resources(
            1,
            [
                Resource::Backend(Backend {
                    name: "b/x".into(),
                    ..Default::default()
                }),
                Resource::Namespace(Namespace {
                    name: "z".into(),
                    ..Default::default()
                }),
                Resource::Backend(Backend {
                    name: "a/x".into(),
                    ..Default::default()
                }),
                Resource::Route(Route {
                    name: "a/r".into(),
                    ..Default::default()
                }),
            ],
        );
        let names: Vec<_> = s
            .of_kind(Kind::Backend)
            .map(|v| v.resource.name().to_string())
            .collect();
        assert_eq!(names, ["a/x", "b/x"]);
    }
}
