//! The backends' hot path: circuit breaker operations and balancer picks.
//! The Rust-ServiceMesh seed's breaker does 52 M ops/s on one thread; ours
//! must beat that (one op = admit + record, as the breaker stage does it).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prism_data_plane::bench::{Balancer, Breaker};
use prism_proto::LbPolicy;

fn breaker(c: &mut Criterion) {
    let mut group = c.benchmark_group("circuit_breaker");
    group.throughput(Throughput::Elements(1));
    let b = Breaker::new();
    group.bench_function("admit_record_success", |bench| {
        bench.iter(|| black_box(b.call(black_box(true))))
    });
    group.finish();
}

fn balancers(c: &mut Criterion) {
    let mut group = c.benchmark_group("balancer_pick");
    group.throughput(Throughput::Elements(1));
    for (name, policy) in [
        ("round_robin", LbPolicy::RoundRobin),
        ("least_request", LbPolicy::LeastRequest),
        ("random", LbPolicy::Random),
        ("ring_hash", LbPolicy::RingHash),
        ("maglev", LbPolicy::Maglev),
    ] {
        let balancer = Balancer::new(policy, 16);
        let mut key = 0u64;
        group.bench_function(name, |bench| {
            bench.iter(|| {
                key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                black_box(balancer.pick(black_box(key)))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, breaker, balancers);
criterion_main!(benches);
