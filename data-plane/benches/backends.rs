//! The backends' hot path, single-threaded: circuit breaker operations and
//! balancer picks. The Rust-ServiceMesh proxy's breaker does 52 M ops/s on
//! one thread; ours must beat that. One breaker op is admit + record, as the
//! breaker stage does it per request.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use prism_data_plane::bench::{Balancer, Breaker};
use prism_proto::LbPolicy;

fn breaker(c: &mut Criterion) {
    let mut group = c.benchmark_group("circuit_breaker");
    group.throughput(Throughput::Elements(1));
    let closed = Breaker::new();
    group.bench_function("admit_record_success", |b| {
        b.iter(|| black_box(closed.call(black_box(true))))
    });
    // Five failures open it for 30 s: every call after is refused (and
    // reads the clock to see whether the timeout has run out).
    let open = Breaker::new();
    while open.call(false) {}
    group.bench_function("admit_refused_open", |b| {
        b.iter(|| black_box(open.call(black_box(true))))
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
        for endpoints in [2, 10, 100] {
            let balancer = Balancer::new(policy, endpoints);
            let mut key = 0u64;
            group.bench_with_input(BenchmarkId::new(name, endpoints), &endpoints, |b, _| {
                b.iter(|| {
                    key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    black_box(balancer.pick(black_box(key)))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, breaker, balancers);
criterion_main!(benches);
