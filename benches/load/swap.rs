//! Prism alone, since the peers have no live configuration API to compare
//! with: how fast a proxy starts, and what a large configuration swap under
//! load does to it.
//!
//! - Start → first proxied `200`, timed like every target's start, from the
//!   on-disk last-good snapshot (a restarted proxy) and from a fresh
//!   subscription (an empty data directory: the proxy waits for its local
//!   control plane), the median of a few starts each.
//! - A swap under load: a policy of `--swap-routes` routes (distinct path
//!   prefixes in the bench namespace, all to the origin) is applied through
//!   the control plane's admin API; once the proxy serves it, the same wrk
//!   load at one of those routes runs three times — with no change, while a
//!   revision rewriting some of the routes (the loaded one among them; their
//!   timeouts alternate) is applied every `SWAP_EVERY`, and with no change
//!   again (how far p99 moves between runs with nothing changing). The
//!   proxy's admin `/status` confirms each swap was applied during the run
//!   and says how long each apply took on the proxy.
//!
//! It runs after every other measurement: the big policy stays applied.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::drive::{Driver, Measured};
use crate::peers::{Launcher, Started};

/// How often the policy is swapped during the measured run.
const SWAP_EVERY: Duration = Duration::from_millis(500);
/// Routes each swap rewrites, the loaded one among them.
const ROUTES_PER_SWAP: usize = 100;
/// Starts timed of each kind.
const STARTS: usize = 3;
/// How long the proxy may take to serve a revision the control plane has.
const APPLY_DEADLINE: Duration = Duration::from_secs(30);
/// Timeout of one admin request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`run`] measures, rendered by [`Section::render`].
#[derive(Debug, Default)]
pub struct Section {
    /// Start → first `200` from the last-good snapshot, one per start.
    pub from_snapshot: Vec<Duration>,
    /// Start → first `200` with an empty data directory, one per start.
    pub fresh: Vec<Duration>,
    /// The swap measurement, when `--swap-routes` is not 0.
    pub swap: Option<Result<Swap, String>>,
}

/// A swap under load.
#[derive(Debug)]
pub struct Swap {
    pub routes: usize,
    /// The proxy's apply time of the whole policy, from its `/status`.
    pub initial_apply: Option<Duration>,
    /// wrk with no change.
    pub steady: Measured,
    /// wrk while swapping.
    pub swapping: Measured,
    /// wrk with no change again, after the swaps: how far p99 moves between
    /// two runs of the same load on this machine with nothing changing.
    pub steady_again: Measured,
    /// Revisions posted to the control plane during the run.
    pub posted: usize,
    /// Changed revisions the proxy applied during the run (its `/status`).
    pub applied: u64,
    /// The proxy's apply time of each swap it reported.
    pub apply_times: Vec<Duration>,
}

/// Times the starts, then (with `routes` > 0) the swap.
pub fn run(
    launcher: &Launcher,
    driver: &Driver,
    runtime: &tokio::runtime::Runtime,
    routes: usize,
    seconds: u64,
    warmup: u64,
) -> Result<Section> {
    let mut section = Section::default();
    for _ in 0..STARTS {
        let started = launcher.start(crate::peers::Target::Prism)?;
        section.from_snapshot.extend(started.start_to_200);
        stop(started);
        let started = launcher.start_prism_fresh()?;
        section.fresh.extend(started.start_to_200);
        stop(started);
    }
    if routes > 0 {
        let swap = swap(launcher, driver, runtime, routes, seconds, warmup);
        section.swap = Some(swap.map_err(|e| format!("{e:#}")));
    }
    Ok(section)
}

fn stop(started: Started) {
    if let Some(process) = started.process {
        process.stop(Duration::from_secs(5));
    }
}

fn swap(
    launcher: &Launcher,
    driver: &Driver,
    runtime: &tokio::runtime::Runtime,
    routes: usize,
    seconds: u64,
    warmup: u64,
) -> Result<Swap> {
    let (admin, token) = launcher
        .prism_admin()
        .context("Prism's control plane is not running")?;
    let admin = admin.to_string();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}")
            .parse()
            .context("the admin token is not a header value")?,
    );
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(ADMIN_TIMEOUT)
        .build()
        .context("cannot build an HTTP client")?;
    let target = routes / 2;
    let path = format!("/{}/", route_name(target));

    let started = launcher.start(crate::peers::Target::Prism)?;
    let proxy = started
        .admin
        .context("the Prism proxy has an admin address")?;
    let initial_apply = runtime.block_on(async {
        let revision = apply(&client, &admin, &policy(0..routes, 0)).await?;
        anyhow::Ok(wait_applied(&client, proxy, revision).await?.last_apply)
    })?;

    let addr = started.h1;
    driver.wrk_at(addr, &path, warmup).context("warm-up")?;
    let steady = driver.wrk_at(addr, &path, seconds).context("no swaps")?;

    // The swapper posts a revision every SWAP_EVERY and reads the proxy's
    // status just before posting the next; it stops when the load has ended.
    let before = runtime.block_on(status(&client, proxy))?;
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let swapper = {
        let client = client.clone();
        let admin = admin.clone();
        let mut applied_seen = before.applied;
        runtime.spawn(async move {
            let mut posted = Vec::new();
            let mut apply_times = Vec::new();
            let mut ticker = tokio::time::interval(SWAP_EVERY);
            for round in 1.. {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = done_rx.changed() => break,
                }
                if round > 1 {
                    let now = status(&client, proxy).await?;
                    if now.applied > applied_seen {
                        apply_times.extend(now.last_apply);
                        applied_seen = now.applied;
                    }
                }
                posted.push(apply(&client, &admin, &swap_policy(routes, target, round)).await?);
            }
            anyhow::Ok((posted, apply_times, applied_seen))
        })
    };
    let swapping = driver.wrk_at(addr, &path, seconds);
    let _ = done_tx.send(true);
    let (posted, mut apply_times, applied_seen) = runtime
        .block_on(swapper)
        .context("the swapper panicked")??;
    let swapping = swapping.context("while swapping")?;
    let last = posted.last().copied().context("no swap was posted")?;
    let after = runtime.block_on(wait_applied(&client, proxy, last))?;
    if after.applied > applied_seen {
        apply_times.extend(after.last_apply);
    }
    let steady_again = driver
        .wrk_at(addr, &path, seconds)
        .context("no swaps, again")?;
    if let Some(mut process) = started.process {
        process.check_alive()?;
        process.stop(Duration::from_secs(5));
    }
    Ok(Swap {
        routes,
        initial_apply,
        steady,
        swapping,
        steady_again,
        posted: posted.len(),
        applied: after.applied - before.applied,
        apply_times,
    })
}

/// What the proxy's `/status` says.
#[derive(Debug)]
struct Status {
    revision: Option<u64>,
    applied: u64,
    last_apply: Option<Duration>,
}

async fn status(client: &reqwest::Client, proxy_admin: SocketAddr) -> Result<Status> {
    let body: Value = client
        .get(format!("http://{proxy_admin}/status"))
        .send()
        .await
        .context("GET /status of the proxy")?
        .error_for_status()?
        .json()
        .await?;
    Ok(Status {
        revision: body["revision"].as_u64(),
        applied: body["applied"].as_u64().unwrap_or(0),
        last_apply: body["last_apply_seconds"]
            .as_f64()
            .map(Duration::from_secs_f64),
    })
}

/// Waits until the proxy serves `revision` or a later one.
async fn wait_applied(
    client: &reqwest::Client,
    proxy_admin: SocketAddr,
    revision: u64,
) -> Result<Status> {
    let start = Instant::now();
    loop {
        let now = status(client, proxy_admin).await?;
        if now.revision.is_some_and(|r| r >= revision) {
            return Ok(now);
        }
        ensure!(
            start.elapsed() < APPLY_DEADLINE,
            "the proxy did not apply revision {revision} within {APPLY_DEADLINE:?} (it serves \
             {:?})",
            now.revision
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Applies a policy document; the revision it made.
async fn apply(client: &reqwest::Client, admin: &str, document: &str) -> Result<u64> {
    let response = client
        .post(format!("{admin}/v1/apply"))
        .header("content-type", "application/yaml")
        .body(document.to_string())
        .send()
        .await
        .context("POST /v1/apply")?;
    let code = response.status();
    let body: Value = response.json().await.context("the apply answer")?;
    ensure!(code.is_success(), "apply answered {code}: {body}");
    body["revision"]
        .as_u64()
        .with_context(|| format!("apply answered no revision: {body}"))
}

fn route_name(index: usize) -> String {
    format!("swap-{index:05}")
}

/// Routes `indexes` in the bench namespace (applied on top of the bench
/// policy), each to the origin with a timeout that `flip` alternates.
fn policy(indexes: impl Iterator<Item = usize>, flip: usize) -> String {
    let timeout = if flip.is_multiple_of(2) { 30 } else { 29 };
    let mut out = String::from("routes:\n");
    for i in indexes {
        let name = route_name(i);
        let _ = writeln!(
            out,
            "  - name: bench/{name}\n    match: {{prefix: \"/{name}/\"}}\n    backend: \
             origin-http1\n    timeout: {timeout}s"
        );
    }
    out
}

/// The `round`th swap: the loaded route and the next window of others.
fn swap_policy(routes: usize, target: usize, round: usize) -> String {
    // Consecutive indexes modulo `routes`: distinct while `per <= routes`.
    let per = ROUTES_PER_SWAP.min(routes);
    let window = (0..per.saturating_sub(1))
        .map(|k| (round * per + k) % routes)
        .filter(|&i| i != target);
    policy(std::iter::once(target).chain(window), round)
}

impl Section {
    /// The Markdown section.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n## Prism: start and configuration swap\n");
        let _ = writeln!(
            out,
            "Prism only: nginx, HAProxy and Envoy (static bootstrap) have no live \
             configuration API to swap through.\n"
        );
        let _ = writeln!(out, "| start → first proxied 200 | median | all |");
        let _ = writeln!(out, "|---|--:|---|");
        for (what, values) in [
            ("from the last-good snapshot", &self.from_snapshot),
            (
                "fresh subscription (empty data dir, local control plane)",
                &self.fresh,
            ),
        ] {
            let _ = writeln!(
                out,
                "| {what} | {} | {} |",
                median(values).map_or_else(|| "—".into(), millis),
                values
                    .iter()
                    .map(|d| millis(*d))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        match &self.swap {
            None => {}
            Some(Err(error)) => {
                let _ = writeln!(out, "\nSwap under load FAILED: {error}");
            }
            Some(Ok(swap)) => {
                let _ = writeln!(
                    out,
                    "\nSwap under load: {routes} routes applied through the control plane \
                     (proxy apply {initial}), wrk at one of them; during the second run a \
                     revision rewriting {per} routes (the loaded one among them) was posted \
                     every {every} ms.\n",
                    routes = swap.routes,
                    initial = swap.initial_apply.map_or_else(|| "—".into(), millis),
                    per = ROUTES_PER_SWAP.min(swap.routes),
                    every = SWAP_EVERY.as_millis(),
                );
                let _ = writeln!(
                    out,
                    "| run | RPS | p50 | p99 | p99 ÷ no swaps | failed | swaps posted / applied | proxy apply per swap (median / max) |"
                );
                let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|");
                let mut row = |run: &str, m: &Measured, ratio: f64, swaps: &str, apply: &str| {
                    let _ = writeln!(
                        out,
                        "| {run} | {:.0} | {} | {} | {ratio:.2} | 0 | {swaps} | {apply} |",
                        m.requests as f64 / m.seconds.max(f64::EPSILON),
                        millis(m.p50),
                        millis(m.p99),
                    );
                };
                row("no swaps", &swap.steady, 1.0, "—", "—");
                row(
                    "swapping",
                    &swap.swapping,
                    swap.p99_ratio(),
                    &format!("{} / {}", swap.posted, swap.applied),
                    &format!(
                        "{} / {}",
                        median(&swap.apply_times).map_or_else(|| "—".into(), millis),
                        swap.apply_times
                            .iter()
                            .max()
                            .map_or_else(|| "—".into(), |d| millis(*d)),
                    ),
                );
                row(
                    "no swaps, again",
                    &swap.steady_again,
                    ratio(swap.steady_again.p99, swap.steady.p99),
                    "—",
                    "—",
                );
                let _ = writeln!(
                    out,
                    "\nThe last row repeats the first after the swaps: how far p99 moves \
                     between two runs of the same load with nothing changing, the floor \
                     under which a swap's effect cannot be told from noise here."
                );
                let _ = writeln!(
                    out,
                    "\n\"failed\" is wrk's non-2xx responses and socket errors, which fail \
                     the run if any."
                );
            }
        }
        out
    }

    /// Whether the swap measurement failed.
    pub fn failed(&self) -> bool {
        matches!(self.swap, Some(Err(_)))
    }
}

impl Swap {
    /// p99 while swapping ÷ p99 with no swaps.
    pub fn p99_ratio(&self) -> f64 {
        ratio(self.swapping.p99, self.steady.p99)
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(f64::EPSILON)
}

fn median(values: &[Duration]) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied()
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}
