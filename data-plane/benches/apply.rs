//! The proxy's configuration apply path at the size of the load harness's
//! swap (`benches/load/swap.rs`): a 10,000-route policy applied fresh, then
//! revisions that each rewrite 100 of its routes,
//! every stage as the proxy runs it: decode, stage and validate, compile,
//! swap and commit, save the last-good snapshot, drop what was replaced.
//! Before criterion's figures it prints the mean time of each stage. The
//! proxy saves the last-good snapshot at most once per two seconds, not per
//! swap; its cost is shown apart.
//!
//! `APPLY_SWAPS=N` sets how many swaps are timed (0: only the fresh apply),
//! so that callgrind can count the instructions of one swap as the
//! difference of two runs:
//!
//! ```text
//! valgrind --tool=callgrind --collect-atstart=no \
//!     --toggle-collect='prism_data_plane::bench::Apply::apply' \
//!     target/release/deps/apply-<hash> --test none
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group};
use prism_data_plane::bench::{Apply, Batch, Stages};
use prism_proto::Resource;
use prism_proto::pb::config::v1::{Backend, Endpoint, Namespace, Route, RouteMatch, route_match};

/// Routes of the policy.
const ROUTES: usize = 10_000;
/// Routes each swap rewrites.
const PER_SWAP: usize = 100;
/// Swaps averaged for the per-stage figures, unless `APPLY_SWAPS` says.
const SWAPS: u32 = 40;

/// The bench namespace, its backend and `ROUTES` prefix routes.
fn policy() -> Vec<Resource> {
    let mut resources = vec![
        Resource::Namespace(Namespace {
            name: "bench".into(),
            hosts: vec!["127.0.0.1".into()],
            default_timeout: Some(seconds(30)),
            ..Default::default()
        }),
        Resource::Backend(Backend {
            name: "bench/origin-http1".into(),
            endpoints: vec![Endpoint {
                address: "127.0.0.1:9".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
    ];
    resources.extend((0..ROUTES).map(|i| route(i, 0)));
    resources
}

/// Route `index` as of `round`: its timeout differs every round, so each
/// swap changes every route it carries.
fn route(index: usize, round: usize) -> Resource {
    let name = format!("swap-{index:05}");
    Resource::Route(Route {
        name: format!("bench/{name}"),
        r#match: Some(RouteMatch {
            path: Some(route_match::Path::Prefix(format!("/{name}/"))),
            ..Default::default()
        }),
        backend: "origin-http1".into(),
        timeout: Some(seconds(30 + round as i64)),
        ..Default::default()
    })
}

fn seconds(seconds: i64) -> pbjson_types::Duration {
    pbjson_types::Duration { seconds, nanos: 0 }
}

/// The `round`th swap (from 1): route 0 and the next window of others.
fn swap(round: usize) -> Batch {
    let window = (0..PER_SWAP - 1)
        .map(|k| (round * PER_SWAP + k) % ROUTES)
        .filter(|&i| i != 0);
    let routes: Vec<Resource> = std::iter::once(0)
        .chain(window)
        .map(|i| route(i, round))
        .collect();
    Batch::new(round as u64 + 1, &routes)
}

/// A proxy serving the whole policy at revision 1.
fn applied(dir: &std::path::Path) -> (Apply, Stages) {
    let mut apply = Apply::new(dir);
    let stages = apply
        .apply(Batch::new(1, &policy()))
        .expect("the policy applies");
    (apply, stages)
}

fn print(what: &str, stages: &Stages, n: u32) {
    let ms = |d: Duration| format!("{:8.3} ms", d.as_secs_f64() * 1e3 / f64::from(n));
    eprintln!(
        "{what:<26} stage+validate {} compile {} swap+commit {} retire {} | last-good encode {} write {}",
        ms(stages.stage),
        ms(stages.compile),
        ms(stages.swap),
        ms(stages.retire),
        ms(stages.encode),
        ms(stages.write),
    );
}

/// Mean time of each stage, fresh and per swap.
fn stages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut apply, fresh) = applied(dir.path());
    print("fresh 10,000 routes", &fresh, 1);
    let swaps = std::env::var("APPLY_SWAPS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(SWAPS);
    if swaps == 0 {
        return;
    }
    let mut sum = Stages::default();
    for round in 1..=swaps as usize {
        let stages = apply.apply(swap(round)).expect("the swap applies");
        sum.stage += stages.stage;
        sum.compile += stages.compile;
        sum.swap += stages.swap;
        sum.encode += stages.encode;
        sum.write += stages.write;
        sum.retire += stages.retire;
    }
    print("swap 100 of 10,000 routes", &sum, swaps);
}

fn apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    group.sample_size(10);
    let dir = tempfile::tempdir().expect("tempdir");
    group.bench_function("fresh 10,000 routes", |b| {
        b.iter_batched(
            || (Apply::new(dir.path()), Batch::new(1, &policy())),
            |(mut apply, batch)| black_box(apply.apply(batch).expect("applies")),
            BatchSize::PerIteration,
        )
    });
    let (mut applied, _) = applied(dir.path());
    let mut round = 0;
    group.bench_function("swap 100 of 10,000 routes", |b| {
        b.iter_batched(
            || {
                round += 1;
                swap(round)
            },
            |batch| black_box(applied.apply(batch).expect("applies")),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, apply);

fn main() {
    stages();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
