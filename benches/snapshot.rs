//! Snapshot/Delta algebra at fleet-sized policies: how long the control plane
//! takes to diff two 10,000-resource snapshots (once per push) and a proxy to
//! apply the delta.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use prism_proto::pb::config::v1::{Backend, Endpoint, Namespace, Route, RouteMatch, route_match};
use prism_proto::{Resource, Snapshot, validate_snapshot};

fn policy(revision: u64, namespaces: usize, changed_port: u16) -> Snapshot {
    let mut resources = Vec::new();
    for n in 0..namespaces {
        let ns = format!("ns{n}");
        resources.push(Resource::Namespace(Namespace {
            name: ns.clone(),
            hosts: vec![format!("{ns}.test")],
            ..Default::default()
        }));
        for b in 0..5 {
            let port = if n == 0 && b == 0 {
                changed_port
            } else {
                8000 + b
            };
            resources.push(Resource::Backend(Backend {
                name: format!("{ns}/b{b}"),
                endpoints: vec![Endpoint {
                    address: format!("10.0.{}.{b}:{port}", n % 250),
                    ..Default::default()
                }],
                ..Default::default()
            }));
            resources.push(Resource::Route(Route {
                name: format!("{ns}/r{b}"),
                r#match: Some(RouteMatch {
                    host: String::new(),
                    path: Some(route_match::Path::Prefix(format!("/p{b}"))),
                    ..Default::default()
                }),
                backend: format!("b{b}"),
                ..Default::default()
            }));
        }
    }
    Snapshot::from_resources(revision, resources)
}

fn bench(c: &mut Criterion) {
    // 1,000 namespaces × (1 + 5 backends + 5 routes) = 11,000 resources.
    let a = policy(1, 1000, 9000);
    let b = policy(2, 1000, 9001);
    c.bench_function("diff 11k resources, one changed", |bench| {
        bench.iter(|| Snapshot::diff(black_box(&a), black_box(&b)))
    });
    let delta = Snapshot::diff(&a, &b);
    c.bench_function("apply one-resource delta to 11k", |bench| {
        bench.iter(|| black_box(&a).apply(black_box(&delta)))
    });
    c.bench_function("validate 11k resources", |bench| {
        bench.iter(|| validate_snapshot(black_box(&b)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
