//! Route lookup, single-threaded: what the route stage does per request once
//! the runtime is loaded. An exact host and exact path in a small table (the
//! Rust-ServiceMesh seed's exact-match router does 30 M lookups/s), and a
//! 10,000-route table (100 namespaces of 40 exact, 40 prefix and 20 regex
//! routes) hit on each kind of path and missed.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use prism_data_plane::bench::RouteTable;
use prism_proto::pb::config::v1::{Backend, Endpoint, Namespace, Route, RouteMatch, route_match};
use prism_proto::{Resource, Snapshot, validate_snapshot};

fn table(namespaces: usize, exact: usize, prefix: usize, regex: usize) -> RouteTable {
    let mut resources = Vec::new();
    for n in 0..namespaces {
        let ns = format!("ns{n}");
        resources.push(Resource::Namespace(Namespace {
            name: ns.clone(),
            hosts: vec![format!("{ns}.test"), format!("*.{ns}.test")],
            ..Default::default()
        }));
        resources.push(Resource::Backend(Backend {
            name: format!("{ns}/b"),
            endpoints: vec![Endpoint {
                address: "10.0.0.1:8080".into(),
                ..Default::default()
            }],
            ..Default::default()
        }));
        let paths = (0..exact)
            .map(|i| route_match::Path::Exact(format!("/exact/{i}")))
            .chain((0..prefix).map(|i| route_match::Path::Prefix(format!("/prefix/{i}/"))))
            .chain((0..regex).map(|i| route_match::Path::Regex(format!("/regex/{i}/[0-9]+"))));
        for (i, path) in paths.enumerate() {
            resources.push(Resource::Route(Route {
                name: format!("{ns}/r{i}"),
                r#match: Some(RouteMatch {
                    path: Some(path),
                    ..Default::default()
                }),
                backend: "b".into(),
                ..Default::default()
            }));
        }
    }
    let snapshot = Snapshot::from_resources(1, resources);
    validate_snapshot(&snapshot).expect("valid policy");
    RouteTable::compile(&snapshot).expect("compiles")
}

fn lookups(c: &mut Criterion) {
    let headers = HeaderMap::new();
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));

    let small = table(1, 8, 4, 0);
    assert_eq!(
        small.lookup("ns0.test", &Method::GET, "/exact/3", None, &headers),
        Some("ns0/r3")
    );
    group.bench_function("exact_host_exact_path", |b| {
        b.iter(|| {
            small.lookup(
                black_box("ns0.test"),
                &Method::GET,
                black_box("/exact/3"),
                None,
                &headers,
            )
        })
    });

    let large = table(100, 40, 40, 20);
    let cases = [
        ("exact", "ns57.test", "/exact/39", Some("ns57/r39")),
        ("prefix", "ns57.test", "/prefix/17/a/b", Some("ns57/r57")),
        ("regex", "ns57.test", "/regex/19/123", Some("ns57/r99")),
        ("wildcard_host", "a.ns57.test", "/exact/1", Some("ns57/r1")),
        ("miss", "ns57.test", "/nothing/here", None),
    ];
    for (what, host, path, expected) in cases {
        assert_eq!(
            large.lookup(host, &Method::GET, path, None, &headers),
            expected,
            "{what}"
        );
        group.bench_function(format!("10k_routes_{what}"), |b| {
            b.iter(|| {
                large.lookup(
                    black_box(host),
                    &Method::GET,
                    black_box(path),
                    None,
                    &headers,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
