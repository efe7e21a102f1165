use super::*;
use crate::document::{DocumentError, parse_policy};
use crate::pb::config::v1::{CaBundle, Endpoint, TlsCertificate};
use crate::snapshot::Delta;
use proptest::prelude::*;

/// Test-only TLS material shared by the workspace's tests.
const CERT: &str = include_str!("../../../tests/support/tls/server.pem");
const KEY: &str = include_str!("../../../tests/support/tls/server.key");
const CA: &str = include_str!("../../../tests/support/tls/ca.pem");

fn cert_secret(name: &str) -> Resource {
    Resource::Secret(Secret {
        name: name.into(),
        kind: Some(secret::Kind::TlsCertificate(TlsCertificate {
            certificate_chain: CERT.into(),
            private_key: KEY.into(),
        })),
    })
}

fn ca_secret(name: &str) -> Resource {
    Resource::Secret(Secret {
        name: name.into(),
        kind: Some(secret::Kind::CaBundle(CaBundle {
            certificates: CA.into(),
        })),
    })
}

fn credential_secret(name: &str) -> Resource {
    Resource::Secret(Secret {
        name: name.into(),
        kind: Some(secret::Kind::Credential(
            crate::pb::config::v1::Credential {
                value: "postgres://prism:hunter2@db.shop.test/shop".into(),
            },
        )),
    })
}

/// A policy that uses every field, valid as a whole.
const FULL: &str = r#"
namespaces:
  - name: shop
    hosts: [shop.test, "*.shop.test"]
    tls_secret: cert
    client_ca_secret: clients
    require_client_certificate: true
    rate_limits:
      - {requests_per_second: 100, burst: 200}
      - {requests_per_second: 10, per_client_ip: true}
  - name: fallback
    hosts: ["*"]
backends:
  - name: shop/web
    protocol: HTTP2
    lb_policy: RING_HASH
    hash_policy: {header: x-user}
    zone_aware: {min_healthy_percent: 80}
    health_check: {interval: 5s, timeout: 1s, grpc: {service_name: shop.Web}}
    outlier_detection: {consecutive_5xx: 3, base_ejection_time: 10s, max_ejection_percent: 50}
    circuit_breaker: {failure_threshold: 3, open_timeout: 5s}
    limits: {max_connections: 10, idle_timeout: 30s}
    tls: {ca_secret: ca, sni: web.shop.test, client_certificate_secret: cert}
    endpoints: [{address: "10.0.0.1:443", zone: zone-a}]
  - name: shop/canary
    lb_policy: LEAST_REQUEST
    health_check: {http: {path: /healthz, host: "canary.shop.test:8080"}}
    endpoints: [{address: "10.0.0.2:80"}]
  - name: fallback/web
    endpoints: [{address: "10.0.0.3:80"}]
routes:
  - name: shop/api
    match:
      prefix: /api/
      methods: [GET, POST]
      headers: [{name: x-env, exact: prod}, {name: X-Debug, absent: true}]
      query_params: [{name: v, regex: "[0-9]+"}]
    backends: [{name: web, weight: 90}, {name: canary, weight: 10}]
    rewrite: {prefix: /, host: api.internal}
    request_headers: {add: [{name: x-prism, value: "1"}], remove: [x-internal]}
    response_headers: {set: [{name: cache-control, value: no-store}]}
    timeout: 10s
    idle_timeout: 60s
    retry: {num_retries: 2, retry_on: [5xx, reset], per_try_timeout: 2s, base_interval: 0.05s, budget_percent: 30}
    rate_limits: [{requests_per_second: 5}]
    max_request_body_bytes: 1048576
  - name: shop/api-put
    match: {prefix: /api/, methods: [PUT]}
    backend: web
  - name: shop/old
    match: {exact: /old, host: a.shop.test}
    redirect: {scheme: https, path: /new, status: 301}
  - name: shop/teapot
    match: {regex: "/tea(pot)?"}
    direct_response: {status: 418, body: "I'm a teapot"}
    response_headers: {set: [{name: content-type, value: text/html}]}
  - name: shop/users
    match: {regex: "/users/[0-9]+"}
    backend: web
    rewrite: {regex: {pattern: "^/users/([0-9]+)$", substitution: "/u/\\1"}}
  - name: fallback/all
    match: {prefix: /}
    backend: web
bindings:
  - name: shop/kv
    postgres: {secret: db}
    pool_size: 8
    connect_timeout: 2s
    default_ttl: 2592000s
    max_value_bytes: 65536
    allow_namespaces: [fallback]
    allow_identities: ["spiffe://shop.test/ns/web/*", "spiffe://shop.test/sa/admin"]
    move_items: true
  - name: shop/events
    nats: {url: "nats://127.0.0.1:4222", stream: shop-events}
    retention: 604800s
    ack_wait: 10s
  - name: fallback/kv
    sqlite: {path: fallback.db}
    allow_namespaces: ["*"]
  - name: fallback/bus
    kafka: {brokers: "k1:9092, k2:9092", partitions: 3}
"#;

fn full() -> Snapshot {
    let mut resources = parse_policy(FULL).expect("the full policy parses");
    resources.extend([
        cert_secret("shop/cert"),
        ca_secret("shop/ca"),
        ca_secret("shop/clients"),
        credential_secret("shop/db"),
    ]);
    Snapshot::from_resources(1, resources)
}

/// The field a one-resource document's error names, without the
/// `routes[0].`-style prefix.
fn field_of(document: &str) -> String {
    match parse_policy(document) {
        Err(DocumentError::Invalid(e)) => e
            .field
            .split_once('.')
            .map_or(e.field.clone(), |(_, f)| f.to_string()),
        other => panic!("expected a validation error for {document}, got {other:?}"),
    }
}

fn route_field(body: &str) -> String {
    field_of(&format!("routes:\n  - {{name: shop/r, {body}}}\n"))
}

fn backend_field(body: &str) -> String {
    field_of(&format!(
        "backends:\n  - {{name: shop/b, endpoints: [{{address: \"10.0.0.1:80\"}}], {body}}}\n"
    ))
}

fn namespace_field(body: &str) -> String {
    field_of(&format!("namespaces:\n  - {{name: shop, {body}}}\n"))
}

#[test]
fn a_policy_using_every_field_passes() {
    assert_eq!(validate_snapshot(&full()), Ok(()));
}

#[test]
fn route_fields_are_checked_and_named() {
    let cases = [
        ("backend: web", "match"),
        ("match: {}, backend: web", "match"),
        ("match: {regex: \"/(a\"}, backend: web", "match.regex"),
        (
            "match: {host: \"*\", prefix: /}, backend: web",
            "match.host",
        ),
        (
            "match: {host: \"*.a.test\", prefix: /}, backend: web",
            "match.host",
        ),
        (
            "match: {prefix: /, methods: [GET, get]}, backend: web",
            "match.methods[1]",
        ),
        (
            "match: {prefix: /, methods: [\"GE T\"]}, backend: web",
            "match.methods[0]",
        ),
        (
            "match: {prefix: /, methods: [GET, GET]}, backend: web",
            "match.methods[1]",
        ),
        (
            "match: {prefix: /, headers: [{name: x-a}]}, backend: web",
            "match.headers[0]",
        ),
        (
            "match: {prefix: /, headers: [{name: x-a, regex: \"(\"}]}, backend: web",
            "match.headers[0].regex",
        ),
        (
            "match: {prefix: /, headers: [{name: x-a, present: true}, {name: x-b, absent: false}]}, backend: web",
            "match.headers[1].absent",
        ),
        (
            "match: {prefix: /, headers: [{name: \"bad name\", present: true}]}, backend: web",
            "match.headers[0].name",
        ),
        (
            "match: {prefix: /, headers: [{name: \":authority\", present: true}]}, backend: web",
            "match.headers[0].name",
        ),
        (
            "match: {prefix: /, headers: [{name: x-a, exact: \"a\\nb\"}]}, backend: web",
            "match.headers[0].exact",
        ),
        (
            "match: {prefix: /, query_params: [{name: \"a=b\", present: true}]}, backend: web",
            "match.query_params[0].name",
        ),
        ("match: {prefix: /}", "backend"),
        ("match: {prefix: /}, backend: web, redirect: {}", "redirect"),
        (
            "match: {prefix: /}, backends: [{name: a, weight: 1}], direct_response: {status: 200}",
            "direct_response",
        ),
        ("match: {prefix: /}, backend: Web", "backend"),
        (
            "match: {prefix: /}, backends: [{name: a, weight: 1}, {name: b, weight: 0}, {name: c, weight: 1}]",
            "backends[1].weight",
        ),
        (
            "match: {prefix: /}, backends: [{name: a, weight: 1}, {name: b, weight: 1}, {name: a, weight: 1}]",
            "backends[2].name",
        ),
        (
            "match: {prefix: /}, redirect: {status: 200}",
            "redirect.status",
        ),
        (
            "match: {prefix: /}, redirect: {scheme: ftp}",
            "redirect.scheme",
        ),
        (
            "match: {prefix: /}, redirect: {port: 70000}",
            "redirect.port",
        ),
        ("match: {prefix: /}, redirect: {path: new}", "redirect.path"),
        (
            "match: {prefix: /}, direct_response: {status: 600}",
            "direct_response.status",
        ),
        (
            "match: {prefix: /}, direct_response: {status: 199}",
            "direct_response.status",
        ),
        (
            "match: {exact: /a}, backend: web, rewrite: {prefix: /b}",
            "rewrite.prefix",
        ),
        (
            "match: {prefix: /a}, backend: web, rewrite: {prefix: b}",
            "rewrite.prefix",
        ),
        (
            "match: {prefix: /a}, backend: web, rewrite: {regex: {pattern: \"[\", substitution: x}}",
            "rewrite.regex.pattern",
        ),
        (
            "match: {prefix: /a}, backend: web, rewrite: {regex: {pattern: \"(a)\", substitution: \"\\\\2\"}}",
            "rewrite.regex.substitution",
        ),
        (
            "match: {prefix: /a}, backend: web, rewrite: {host: \"a b\"}",
            "rewrite.host",
        ),
        (
            "match: {prefix: /a}, redirect: {}, rewrite: {host: a.test}",
            "rewrite",
        ),
        (
            "match: {prefix: /a}, direct_response: {status: 200}, retry: {}",
            "retry",
        ),
        (
            "match: {prefix: /}, backend: web, request_headers: {add: [{name: host, value: a}]}",
            "request_headers.add[0].name",
        ),
        (
            "match: {prefix: /}, backend: web, request_headers: {set: [{name: x-a, value: \"a\\rb\"}]}",
            "request_headers.set[0].value",
        ),
        (
            "match: {prefix: /}, backend: web, response_headers: {remove: [\"x a\"]}",
            "response_headers.remove[0]",
        ),
        (
            "match: {prefix: /}, backend: web, retry: {retry_on: [5xx, nope]}",
            "retry.retry_on[1]",
        ),
        (
            "match: {prefix: /}, backend: web, retry: {retry_on: [5xx, 5xx]}",
            "retry.retry_on[1]",
        ),
        (
            "match: {prefix: /}, backend: web, retry: {num_retries: 11}",
            "retry.num_retries",
        ),
        (
            "match: {prefix: /}, backend: web, retry: {budget_percent: 101}",
            "retry.budget_percent",
        ),
        (
            "match: {prefix: /}, backend: web, retry: {per_try_timeout: 0s}",
            "retry.per_try_timeout",
        ),
        (
            "match: {prefix: /}, backend: web, retry: {base_interval: 1s, max_interval: 0.1s}",
            "retry.max_interval",
        ),
        (
            "match: {prefix: /}, backend: web, idle_timeout: -1s",
            "idle_timeout",
        ),
        (
            "match: {prefix: /}, backend: web, rate_limits: [{burst: 5}]",
            "rate_limits[0].requests_per_second",
        ),
        (
            "match: {prefix: /}, backend: web, rate_limits: [{requests_per_second: 10, burst: 5}]",
            "rate_limits[0].burst",
        ),
        (
            "match: {prefix: /}, backend: web, rate_limits: [{requests_per_second: 1}, {requests_per_second: 2}]",
            "rate_limits[1].per_client_ip",
        ),
    ];
    for (body, field) in cases {
        assert_eq!(route_field(body), field, "{body}");
    }
}

#[test]
fn backend_fields_are_checked_and_named() {
    let cases = [
        ("lb_policy: RING_HASH", "hash_policy"),
        ("lb_policy: MAGLEV, hash_policy: {}", "hash_policy"),
        ("hash_policy: {header: x-user}", "hash_policy"),
        (
            "lb_policy: RING_HASH, hash_policy: {header: \"x user\"}",
            "hash_policy.header",
        ),
        (
            "lb_policy: MAGLEV, hash_policy: {client_ip: false}",
            "hash_policy.client_ip",
        ),
        (
            "lb_policy: MAGLEV, hash_policy: {cookie: \"a;b\"}",
            "hash_policy.cookie",
        ),
        (
            "zone_aware: {min_healthy_percent: 101}",
            "zone_aware.min_healthy_percent",
        ),
        ("health_check: {}", "health_check.http"),
        (
            "health_check: {http: {path: healthz}}",
            "health_check.http.path",
        ),
        (
            "health_check: {http: {path: /h, host: \"a:0\"}}",
            "health_check.http.host",
        ),
        (
            "health_check: {interval: 0s, http: {path: /h}}",
            "health_check.interval",
        ),
        ("health_check: {grpc: {}}", "health_check.grpc"),
        (
            "outlier_detection: {max_ejection_percent: 101}",
            "outlier_detection.max_ejection_percent",
        ),
        (
            "outlier_detection: {base_ejection_time: 0s}",
            "outlier_detection.base_ejection_time",
        ),
        (
            "outlier_detection: {base_ejection_time: 400s}",
            "outlier_detection.max_ejection_time",
        ),
        (
            "circuit_breaker: {open_timeout: -2s}",
            "circuit_breaker.open_timeout",
        ),
        ("limits: {idle_timeout: 0s}", "limits.idle_timeout"),
        ("tls: {ca_secret: shop/ca}", "tls.ca_secret"),
        (
            "tls: {client_certificate_secret: Cert}",
            "tls.client_certificate_secret",
        ),
        ("tls: {sni: \"*.a.test\"}", "tls.sni"),
    ];
    for (body, field) in cases {
        assert_eq!(backend_field(body), field, "{body}");
    }
}

fn binding_field(body: &str) -> String {
    field_of(&format!("bindings:\n  - {{name: shop/b, {body}}}\n"))
}

#[test]
fn binding_fields_are_checked_and_named() {
    let cases = [
        ("pool_size: 1", "sqlite"),
        ("sqlite: {path: \"\"}", "sqlite.path"),
        ("postgres: {secret: shop/db}", "postgres.secret"),
        ("nats: {url: \"http://x:4222\"}", "nats.url"),
        ("nats: {url: \"nats://\"}", "nats.url"),
        ("nats: {url: \"nats://x\", stream: \"a.b\"}", "nats.stream"),
        ("kafka: {brokers: \"\"}", "kafka.brokers"),
        ("kafka: {brokers: \"k1:9092,k2\"}", "kafka.brokers"),
        ("kafka: {brokers: \"k1:0\"}", "kafka.brokers"),
        ("memory: {}, pool_size: 1000", "pool_size"),
        ("memory: {}, connect_timeout: 0s", "connect_timeout"),
        ("memory: {}, connect_timeout: 120s", "connect_timeout"),
        ("memory: {}, max_value_bytes: 5000000", "max_value_bytes"),
        ("memory: {}, default_ttl: 10s", "default_ttl"),
        ("memory: {}, move_items: true", "move_items"),
        ("sqlite: {path: a.db}, retention: 10s", "retention"),
        ("sqlite: {path: a.db}, ack_wait: 10s", "ack_wait"),
        ("sqlite: {path: a.db}, default_ttl: -1s", "default_ttl"),
        ("memory: {}, ack_wait: 86400s", "ack_wait"),
        (
            "memory: {}, allow_namespaces: [Shop]",
            "allow_namespaces[0]",
        ),
        ("memory: {}, allow_identities: [web]", "allow_identities[0]"),
        (
            "memory: {}, allow_identities: [\"spiffe://a/*/b\"]",
            "allow_identities[0]",
        ),
        (
            "memory: {}, allow_identities: [\"spiffe://a/ b\"]",
            "allow_identities[0]",
        ),
        (
            "memory: {}, allow_identities: [\"spiffe://ok/*\", \"1x:/\"]",
            "allow_identities[1]",
        ),
    ];
    for (body, field) in cases {
        assert_eq!(binding_field(body), field, "{body}");
    }
    assert_eq!(field_of("bindings: [{name: b, memory: {}}]"), "name");
}

#[test]
fn a_namespace_has_one_binding_per_api_and_postgres_needs_a_credential() {
    let mut snapshot = full();
    snapshot.insert(parse_one(
        "bindings: [{name: shop/kv2, sqlite: {path: a.db}}]",
    ));
    let error = validate_snapshot(&snapshot).unwrap_err();
    assert_eq!(error.field, "name");
    assert!(
        error
            .message
            .contains("already has a KeyValue binding, `shop/kv`"),
        "{error}"
    );

    let mut snapshot = full();
    snapshot.insert(parse_one(
        "bindings: [{name: shop/kv, postgres: {secret: cert}}]",
    ));
    let error = validate_snapshot(&snapshot).unwrap_err();
    assert_eq!(
        error.to_string(),
        "DataBinding shop/kv: postgres.secret: secret `shop/cert` holds no `credential`"
    );

    let mut snapshot = full();
    snapshot.remove(&ResourceKey::new(Kind::Secret, "shop/db"));
    assert_eq!(
        validate_snapshot(&snapshot).unwrap_err().field,
        "postgres.secret"
    );
}

#[test]
fn namespace_fields_are_checked_and_named() {
    let cases = [
        ("hosts: [\"*\", \"*\"]", "hosts[1]"),
        ("hosts: [\"**\"]", "hosts[0]"),
        ("tls_secret: shop/cert", "tls_secret"),
        ("client_ca_secret: ca", "client_ca_secret"),
        (
            "tls_secret: c, client_ca_secret: shop/ca",
            "client_ca_secret",
        ),
        (
            "require_client_certificate: true",
            "require_client_certificate",
        ),
        (
            "rate_limits: [{requests_per_second: 0}]",
            "rate_limits[0].requests_per_second",
        ),
        (
            "rate_limits: [{requests_per_second: 1, per_client_ip: true}, {requests_per_second: 2, per_client_ip: true}]",
            "rate_limits[1].per_client_ip",
        ),
    ];
    for (body, field) in cases {
        assert_eq!(namespace_field(body), field, "{body}");
    }
}

#[test]
fn secrets_need_pem_of_the_right_sort_and_never_echo_it() {
    let check = |kind: secret::Kind| {
        validate_resource(&Resource::Secret(Secret {
            name: "shop/s".into(),
            kind: Some(kind),
        }))
    };
    let tls = |chain: &str, key: &str| {
        check(secret::Kind::TlsCertificate(TlsCertificate {
            certificate_chain: chain.into(),
            private_key: key.into(),
        }))
    };
    assert_eq!(tls(CERT, KEY), Ok(()));
    assert_eq!(
        tls(&format!("{CERT}{CA}"), KEY),
        Ok(()),
        "a chain may hold several certificates"
    );
    let cases = [
        (tls("", KEY), "tls_certificate.certificate_chain"),
        (tls(KEY, KEY), "tls_certificate.certificate_chain"),
        (
            tls(&format!("{CERT}{KEY}"), KEY),
            "tls_certificate.certificate_chain",
        ),
        (tls(CERT, ""), "tls_certificate.private_key"),
        (tls(CERT, CERT), "tls_certificate.private_key"),
        (
            tls(CERT, &format!("{KEY}{KEY}")),
            "tls_certificate.private_key",
        ),
        (
            tls(
                CERT,
                "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
            ),
            "tls_certificate.private_key",
        ),
        (
            tls(CERT, &KEY.replace("-----END PRIVATE KEY-----", "")),
            "tls_certificate.private_key",
        ),
        (
            check(secret::Kind::CaBundle(CaBundle {
                certificates: "nothing here".into(),
            })),
            "ca_bundle.certificates",
        ),
        (
            check(secret::Kind::CaBundle(CaBundle {
                certificates: format!("{CA}{KEY}"),
            })),
            "ca_bundle.certificates",
        ),
    ];
    for (result, field) in cases {
        let error = result.expect_err(field);
        assert_eq!(error.field, field, "{error}");
        assert!(!error.message.contains("BEGIN"), "{error}");
        assert!(!error.message.contains(&KEY[30..60]), "{error}");
    }
    let none = validate_resource(&Resource::Secret(Secret {
        name: "shop/s".into(),
        kind: None,
    }))
    .unwrap_err();
    assert_eq!(none.field, "tls_certificate");
    let huge = "A".repeat(MAX_PEM_BYTES + 1);
    assert!(
        tls(CERT, &huge)
            .unwrap_err()
            .message
            .contains("larger than")
    );
}

#[test]
fn secret_references_must_name_a_secret_of_the_right_sort() {
    let key = |kind, name: &str| Some(ResourceKey::new(kind, name));
    let mut s = full();
    s.remove(&ResourceKey::new(Kind::Secret, "shop/cert"));
    let err = validate_snapshot(&s).unwrap_err();
    assert_eq!(
        (err.resource.clone(), err.field.as_str()),
        (key(Kind::Namespace, "shop"), "tls_secret"),
        "{err}"
    );
    assert!(err.message.contains("shop/cert"), "{err}");

    // Once the namespace no longer needs it, the backend's reference fails.
    s.insert(parse_one(
        "namespaces:\n  - {name: shop, hosts: [shop.test, \"*.shop.test\"]}\n",
    ));
    let err = validate_snapshot(&s).unwrap_err();
    assert_eq!(
        (err.resource.clone(), err.field.as_str()),
        (
            key(Kind::Backend, "shop/web"),
            "tls.client_certificate_secret"
        ),
        "{err}"
    );

    // A CA bundle where a certificate with its key is wanted, and the reverse.
    let mut s = full();
    s.insert(ca_secret("shop/cert"));
    let err = validate_snapshot(&s).unwrap_err();
    assert_eq!(err.field, "tls_secret", "{err}");
    assert!(err.message.contains("tls_certificate"), "{err}");
    let mut s = full();
    s.insert(cert_secret("shop/ca"));
    let err = validate_snapshot(&s).unwrap_err();
    assert_eq!(err.field, "tls.ca_secret", "{err}");
    let mut s = full();
    s.insert(cert_secret("shop/clients"));
    let err = validate_snapshot(&s).unwrap_err();
    assert_eq!(err.field, "client_ca_secret", "{err}");
    assert!(err.message.contains("ca_bundle"), "{err}");

    // A secret of another namespace does not count.
    let mut s = full();
    s.remove(&ResourceKey::new(Kind::Secret, "shop/ca"));
    s.insert(ca_secret("fallback/ca"));
    assert_eq!(validate_snapshot(&s).unwrap_err().field, "tls.ca_secret");
}

fn parse_one(document: &str) -> Resource {
    let mut resources = parse_policy(document).expect("parses");
    assert_eq!(resources.len(), 1);
    resources.remove(0)
}

#[test]
fn weighted_backends_must_exist() {
    let mut s = full();
    s.remove(&ResourceKey::new(Kind::Backend, "shop/canary"));
    let err = validate_snapshot(&s).unwrap_err();
    assert_eq!(err.field, "backends[1].name", "{err}");
    assert_eq!(
        err.resource,
        Some(ResourceKey::new(Kind::Route, "shop/api"))
    );
    assert!(err.message.contains("shop/canary"), "{err}");
}

#[test]
fn the_catch_all_host_belongs_to_one_namespace() {
    let mut s = full();
    s.insert(parse_one(
        "namespaces:\n  - {name: other, hosts: [\"*\"]}\n",
    ));
    let err = validate_snapshot(&s).unwrap_err();
    assert_eq!(err.field, "hosts[0]", "{err}");
    assert!(err.message.contains("fallback"), "{err}");
}

#[test]
fn a_route_host_must_be_answered_by_its_own_namespace() {
    // `fallback` owns `*`, but `shop.test` is `shop`'s: a `fallback` route
    // for it would never match.
    let mut s = full();
    s.insert(parse_one(
        "routes:\n  - {name: fallback/r, match: {host: a.shop.test, prefix: /}, backend: web}\n",
    ));
    let err = validate_snapshot(&s).unwrap_err();
    assert_eq!(err.field, "match.host", "{err}");
    assert!(err.message.contains("`shop`"), "{err}");
    // A host nobody else answers for is the catch-all's.
    let mut s = full();
    s.insert(parse_one(
        "routes:\n  - {name: fallback/r, match: {host: other.test, prefix: /}, backend: web}\n",
    ));
    assert_eq!(validate_snapshot(&s), Ok(()));
}

#[test]
fn routes_with_one_full_match_are_rejected_whatever_the_order() {
    let route = |name: &str, m: &str| {
        parse_one(&format!(
            "routes:\n  - {{name: {name}, match: {m}, backend: web}}\n"
        ))
    };
    let mut s = full();
    s.insert(route(
        "shop/same",
        "{prefix: /api/, methods: [POST, GET], headers: [{name: X-DEBUG, absent: true}, {name: x-env, exact: prod}], query_params: [{name: v, regex: \"[0-9]+\"}]}",
    ));
    let err = validate_snapshot(&s).unwrap_err();
    assert_eq!(err.field, "match", "{err}");
    assert!(err.message.contains("shop/api"), "{err}");

    // Another method, header value or query rule makes another match.
    for m in [
        "{prefix: /api/, methods: [GET], headers: [{name: X-DEBUG, absent: true}, {name: x-env, exact: prod}], query_params: [{name: v, regex: \"[0-9]+\"}]}",
        "{prefix: /api/, methods: [POST, GET], headers: [{name: X-DEBUG, absent: true}, {name: x-env, exact: dev}], query_params: [{name: v, regex: \"[0-9]+\"}]}",
        "{prefix: /api/, methods: [POST, GET], headers: [{name: X-DEBUG, absent: true}, {name: x-env, exact: prod}]}",
        "{regex: /api/, methods: [POST, GET], headers: [{name: X-DEBUG, absent: true}, {name: x-env, exact: prod}], query_params: [{name: v, regex: \"[0-9]+\"}]}",
    ] {
        let mut s = full();
        s.insert(route("shop/other", m));
        assert_eq!(validate_snapshot(&s), Ok(()), "{m}");
    }
}

#[test]
fn deleting_a_referenced_secret_is_refused() {
    let mut s = full();
    s.remove(&ResourceKey::new(Kind::Secret, "shop/ca"));
    let err = validate_snapshot(&s).unwrap_err();
    assert_eq!(
        err.resource,
        Some(ResourceKey::new(Kind::Backend, "shop/web"))
    );
    assert_eq!(err.field, "tls.ca_secret");
}

#[test]
fn regexes_are_bounded() {
    let long = format!("/{}", "a".repeat(MAX_REGEX_BYTES));
    assert_eq!(
        route_field(&format!("match: {{regex: \"{long}\"}}, backend: web")),
        "match.regex"
    );
    // Small to write, huge to compile.
    assert_eq!(
        route_field("match: {regex: \"/((a{100}){100}){100}\"}, backend: web"),
        "match.regex"
    );
}

fn ns(name: &str, hosts: &[&str]) -> Resource {
    Resource::Namespace(Namespace {
        name: name.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        ..Default::default()
    })
}

fn backend(name: &str, addr: &str) -> Resource {
    Resource::Backend(Backend {
        name: name.into(),
        endpoints: vec![Endpoint {
            address: addr.into(),
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn route(name: &str, host: &str, prefix: &str, backend: &str) -> Resource {
    Resource::Route(Route {
        name: name.into(),
        r#match: Some(RouteMatch {
            host: host.into(),
            path: Some(route_match::Path::Prefix(prefix.into())),
            ..Default::default()
        }),
        backend: backend.into(),
        ..Default::default()
    })
}

#[test]
fn a_consistent_policy_passes() {
    let s = Snapshot::from_resources(
        1,
        [
            ns("demo", &["demo.local", "*.demo.test"]),
            backend("demo/web", "127.0.0.1:8081"),
            route("demo/root", "a.demo.test", "/", "web"),
        ],
    );
    assert_eq!(validate_snapshot(&s), Ok(()));
}

#[test]
fn field_errors_name_the_field() {
    let err = validate_resource(&backend("demo/web", "127.0.0.1")).unwrap_err();
    assert_eq!(err.field, "endpoints[0].address");
    let err = validate_resource(&backend("web", "127.0.0.1:80")).unwrap_err();
    assert_eq!(err.field, "name");
    let err = validate_resource(&route("demo/r", "", "nope", "web")).unwrap_err();
    assert_eq!(err.field, "match.prefix");
    let err = validate_resource(&route("demo/r", "Demo.Local", "/", "web")).unwrap_err();
    assert_eq!(err.field, "match.host");
    let err = validate_resource(&ns("demo", &["a.test", "a.test"])).unwrap_err();
    assert_eq!(err.field, "hosts[1]");
}

#[test]
fn dangling_references_are_rejected() {
    let s = Snapshot::from_resources(
        1,
        [
            ns("demo", &["demo.local"]),
            route("demo/root", "", "/", "missing"),
        ],
    );
    let err = validate_snapshot(&s).unwrap_err();
    assert_eq!(err.field, "backend");
    assert_eq!(
        err.resource,
        Some(ResourceKey::new(Kind::Route, "demo/root"))
    );
    assert!(err.message.contains("demo/missing"), "{err}");

    let s = Snapshot::from_resources(1, [backend("ghost/web", "127.0.0.1:80")]);
    assert!(
        validate_snapshot(&s)
            .unwrap_err()
            .message
            .contains("namespace `ghost`")
    );
    let s = Snapshot::from_resources(1, [cert_secret("ghost/cert")]);
    assert_eq!(
        validate_snapshot(&s).unwrap_err().resource,
        Some(ResourceKey::new(Kind::Secret, "ghost/cert"))
    );
}

#[test]
fn hosts_belong_to_one_namespace_and_routes_stay_inside_theirs() {
    let s = Snapshot::from_resources(1, [ns("a", &["x.test"]), ns("b", &["x.test"])]);
    assert_eq!(validate_snapshot(&s).unwrap_err().field, "hosts[0]");

    let s = Snapshot::from_resources(
        1,
        [
            ns("a", &["x.test"]),
            backend("a/web", "127.0.0.1:80"),
            route("a/r", "y.test", "/", "web"),
        ],
    );
    assert_eq!(validate_snapshot(&s).unwrap_err().field, "match.host");
}

#[test]
fn wildcard_hosts_cover_one_or_more_labels() {
    assert!(host_matches("*.a.test", "x.a.test"));
    assert!(host_matches("*.a.test", "y.x.a.test"));
    assert!(!host_matches("*.a.test", "a.test"));
    assert!(!host_matches("*.a.test", "xa.test"));
    assert!(host_matches("*", "anything.test"));
}

#[test]
fn two_routes_with_one_match_are_rejected() {
    let s = Snapshot::from_resources(
        1,
        [
            ns("a", &["x.test"]),
            backend("a/web", "127.0.0.1:80"),
            route("a/r1", "", "/", "web"),
            route("a/r2", "", "/", "web"),
        ],
    );
    assert_eq!(validate_snapshot(&s).unwrap_err().field, "match");
}

/// A resource of the small world the delta properties draw from: two
/// namespaces, their backends and routes that may collide, point nowhere
/// or name a host of the other namespace, and now and then a namespace or
/// a broken backend.
fn world_resource() -> impl Strategy<Value = Resource> {
    let route = (
        0u8..6,
        "a|b",
        prop_oneof![Just(""), Just("a.test"), Just("x.a.test"), Just("b.test")],
        prop_oneof![Just("/"), Just("/p"), Just("/q")],
        "x|y|z",
    )
        .prop_map(|(n, namespace, host, prefix, backend)| {
            route(&format!("{namespace}/r{n}"), host, prefix, &backend)
        });
    let backend = (
        "a|b",
        "x|y",
        prop_oneof![Just("127.0.0.1:80"), Just("nowhere")],
    )
        .prop_map(|(namespace, name, addr)| backend(&format!("{namespace}/{name}"), addr));
    prop_oneof![
        6 => route,
        2 => backend,
        1 => Just(ns("b", &["b.test", "*.a.test"])),
    ]
}

/// A valid snapshot of the world: `resources` are added in turn, each kept
/// only if the snapshot stays valid. Routes no delta touches make up most of
/// it, as in a large policy, so that deltas are checked on their own rather
/// than whole.
fn valid_world(resources: Vec<Resource>) -> Snapshot {
    let mut snapshot = Snapshot::from_resources(
        1,
        [
            ns("a", &["a.test", "*.a.test"]),
            ns("b", &["b.test"]),
            backend("a/x", "127.0.0.1:80"),
            backend("b/x", "127.0.0.1:80"),
        ],
    );
    for i in 0..20 {
        snapshot.insert(route(&format!("a/fill{i}"), "", &format!("/fill/{i}"), "x"));
    }
    for resource in resources {
        let mut next = snapshot.clone();
        next.insert(resource);
        if validate_snapshot(&next).is_ok() {
            snapshot = next;
        }
    }
    snapshot
}

/// A delta of the world: upserts and removals of its keys.
fn world_delta() -> impl Strategy<Value = Delta> {
    let removal = prop_oneof![
        (0u8..6, "a|b").prop_map(|(n, ns)| ResourceKey::new(Kind::Route, format!("{ns}/r{n}"))),
        ("a|b", "x|y").prop_map(|(ns, n)| ResourceKey::new(Kind::Backend, format!("{ns}/{n}"))),
    ];
    (
        proptest::collection::vec(world_resource(), 0..4),
        proptest::collection::vec(removal, 0..3),
    )
        .prop_map(|(upserts, removals)| Delta {
            revision: 2,
            upserts: upserts
                .into_iter()
                .map(|r| std::sync::Arc::new(r.versioned()))
                .collect(),
            removals,
        })
}

proptest! {
    /// Validating a delta gives exactly what validating the whole snapshot
    /// it makes gives, error and all; and the matches it leaves behind are
    /// those of that snapshot, ready for the next delta.
    #[test]
    fn a_delta_validates_as_the_whole_snapshot(
        base in proptest::collection::vec(world_resource(), 0..12).prop_map(valid_world),
        first in world_delta(),
        second in world_delta(),
    ) {
        let mut matches = Matches::of(&base);
        let mut base = base;
        for delta in [first, second] {
            let candidate = base.apply(&delta);
            let whole = validate_snapshot(&candidate);
            let checked = validate_delta(&base, &matches, &delta, &candidate);
            prop_assert_eq!(checked.clone().map(drop), whole);
            if let Ok(checked) = checked {
                match checked {
                    Some(whole) => matches = whole,
                    None => matches.update(&base, &delta, &candidate),
                }
                prop_assert_eq!(&matches, &Matches::of(&candidate));
                base = candidate;
            }
        }
    }
}
