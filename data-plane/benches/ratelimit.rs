//! The rate limiter's hot path: one token taken from a shared bucket, single
//! threaded. A bucket with room for every call measures the admitted path; an
//! empty one the refused path. The Rust-ServiceMesh seed does 20 M ops/s.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prism_data_plane::bench::Bucket;

fn acquire(c: &mut Criterion) {
    let mut group = c.benchmark_group("ratelimit");
    group.throughput(Throughput::Elements(1));
    // Refills far faster than one thread can take: every call is admitted.
    let open = Bucket::new(u32::MAX, u32::MAX);
    group.bench_function("acquire_admitted", |b| b.iter(|| black_box(open.acquire())));
    // One token a second: after the first, every call is refused.
    let empty = Bucket::new(1, 1);
    group.bench_function("acquire_refused", |b| b.iter(|| black_box(empty.acquire())));
    group.finish();
}

criterion_group!(benches, acquire);
criterion_main!(benches);
