//! Memory per idle keep-alive connection: N (default 10,000) HTTP/1.1
//! connections opened to a freshly started proxy, each with one GET answered
//! `200` in full, then all held open while the proxy's resident memory is
//! read. (RSS with N connections − idle RSS) ÷ N is what one idle client
//! connection costs the proxy, upstream side done.
//!
//! The connections are opened from the harness's runtime (on the load CPUs),
//! at most [`CONCURRENCY`] at a time and within [`OPEN_DEADLINE`]. Once all
//! are open, RSS is polled until it stops moving (bounded by
//! [`SETTLE_DEADLINE`] and [`HOLD_BUDGET`]), and every connection is checked to be still open
//! before the figure counts: a proxy that closed some while idle fails the
//! measurement instead of looking cheap.
//!
//! It needs N client sockets in the harness (plus the origin's), so the
//! harness raises its soft `RLIMIT_NOFILE` to the hard limit first; the
//! proxies inherit it, and nginx and HAProxy are configured for N clients
//! (see `peers`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::origin::BODY;
use crate::peers::{Launcher, Target};
use crate::process::Proc;
use crate::report::{mib, thousands};

/// Connections being opened (connect, GET, full answer) at once.
pub const CONCURRENCY: usize = 256;
/// How long opening all connections may take.
const OPEN_DEADLINE: Duration = Duration::from_secs(60);
/// How long one connect or one GET may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often RSS is read while waiting for it to settle.
const SETTLE_EVERY: Duration = Duration::from_millis(200);
/// The longest wait for RSS to settle; the last reading counts after it.
const SETTLE_DEADLINE: Duration = Duration::from_secs(3);
/// The longest time from the first connection opened to the RSS reading:
/// below the shortest idle timeout of the targets (Prism closes an idle
/// HTTP/1 connection after its 10 s header read timeout), as every
/// connection must still be open when RSS is read. Settling is cut short
/// to stay within it.
const HOLD_BUDGET: Duration = Duration::from_secs(9);
/// RSS is settled when two readings [`SETTLE_EVERY`] apart differ by less.
const SETTLED_BYTES: u64 = 64 * 1024;
/// File descriptors the harness needs besides the idle connections: the
/// origin's upstream connections, the load generators' pipes, logs.
const SPARE_FDS: u64 = 4096;

/// The idle-connection measurement of one target.
#[derive(Clone, Debug)]
pub struct IdleMeasurement {
    pub target: Target,
    pub outcome: Result<IdleSample, String>,
}

/// What one idle-connection measurement saw.
#[derive(Clone, Debug)]
pub struct IdleSample {
    /// Connections held open when RSS was read.
    pub connections: usize,
    /// Seconds to open them all and get every first answer.
    pub open_seconds: f64,
    /// Resident memory after start, before any connection (`VmRSS`).
    pub idle_rss: u64,
    /// Resident memory with every connection open and idle, once settled.
    pub rss_with_conns: u64,
}

impl IdleSample {
    /// RSS added by the connections (0 if RSS fell).
    pub fn added(&self) -> u64 {
        self.rss_with_conns.saturating_sub(self.idle_rss)
    }

    /// RSS added per idle connection, in bytes.
    pub fn bytes_per_conn(&self) -> f64 {
        self.added() as f64 / self.connections.max(1) as f64
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` (inherited by every proxy it
/// starts) so that `connections` idle connections fit; an error naming the
/// hard limit if they cannot.
pub fn raise_nofile(connections: usize) -> Result<u64> {
    let needed = connections as u64 + SPARE_FDS;
    let (_, hard) =
        rlimit::getrlimit(rlimit::Resource::NOFILE).context("cannot read RLIMIT_NOFILE")?;
    let soft =
        rlimit::increase_nofile_limit(needed.max(hard)).context("cannot raise RLIMIT_NOFILE")?;
    ensure!(
        soft >= needed,
        "--idle-conns {connections} needs {needed} open files but the hard limit (`ulimit -Hn`) \
         is {hard}: raise it, or pass a smaller --idle-conns"
    );
    Ok(soft)
}

/// Measures every proxy among `targets` in turn, each freshly started,
/// saying how each went on stderr.
pub fn measure_all(
    launcher: &Launcher,
    runtime: &tokio::runtime::Runtime,
    targets: &[Target],
    connections: usize,
    settle: Duration,
) -> Vec<IdleMeasurement> {
    let mut all = Vec::new();
    for &target in targets.iter().filter(|t| t.is_proxy()) {
        let outcome =
            measure(launcher, runtime, target, connections, settle).map_err(|e| format!("{e:#}"));
        match &outcome {
            Ok(s) => eprintln!(
                "  idle {:<7} {} conns: {:.0} bytes/conn ({} → {})",
                target.name(),
                s.connections,
                s.bytes_per_conn(),
                mib(s.idle_rss as f64),
                mib(s.rss_with_conns as f64),
            ),
            Err(error) => eprintln!("  idle {:<7} FAILED: {error}", target.name()),
        }
        all.push(IdleMeasurement { target, outcome });
    }
    all
}

/// Starts `target`, reads its idle RSS, opens `connections` idle keep-alive
/// connections to it (fewer if it is configured for fewer, see
/// [`Launcher::client_limit`]) and reads its RSS once settled.
pub fn measure(
    launcher: &Launcher,
    runtime: &tokio::runtime::Runtime,
    target: Target,
    connections: usize,
    settle: Duration,
) -> Result<IdleSample> {
    ensure!(
        target.is_proxy(),
        "the origin has no process of its own to measure"
    );
    let connections = launcher
        .client_limit(target)
        .map_or(connections, |limit| connections.min(limit));
    let started = launcher.start(target)?;
    let process = started
        .process
        .as_ref()
        .context("a proxy target has a process")?;
    std::thread::sleep(settle);
    let idle_rss = process.rss_bytes();

    let opened = Instant::now();
    let held = runtime.block_on(async {
        tokio::time::timeout(OPEN_DEADLINE, open(started.h1, connections))
            .await
            .with_context(|| {
                format!("{connections} connections not open within {OPEN_DEADLINE:?}")
            })?
    })?;
    let open_seconds = opened.elapsed().as_secs_f64();
    let settle_until = (opened + HOLD_BUDGET).min(Instant::now() + SETTLE_DEADLINE);
    let rss_with_conns = settled_rss(process, settle_until);
    let closed = held.iter().filter(|sender| sender.is_closed()).count();
    ensure!(
        closed == 0,
        "{} closed {closed} of {connections} idle connections within {:.1} s of their opening",
        target.name(),
        opened.elapsed().as_secs_f64()
    );
    // Dropping the senders closes the connections (their tasks end).
    drop(held);
    Ok(IdleSample {
        connections,
        open_seconds,
        idle_rss,
        rss_with_conns,
    })
}

/// Opens `count` connections to `addr`, at most [`CONCURRENCY`] at a time,
/// each with one GET answered `200` with the origin's body; returns them open.
async fn open(addr: SocketAddr, count: usize) -> Result<Vec<SendRequest<Empty<Bytes>>>> {
    let next = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY.min(count) {
        let next = Arc::clone(&next);
        let opened = Arc::clone(&opened);
        workers.spawn(async move {
            let mut held = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                held.push(open_one(addr).await?);
                opened.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(held)
        });
    }
    let mut all = Vec::with_capacity(count);
    while let Some(joined) = workers.join_next().await {
        let held = joined
            .context("a connection task panicked")?
            .with_context(|| {
                format!(
                    "after {} connections to {addr} were open",
                    opened.load(Ordering::Relaxed)
                )
            })?;
        all.extend(held);
    }
    Ok(all)
}

/// One connection with one GET answered in full; the connection stays open
/// (keep-alive) as long as the returned sender lives.
async fn open_one(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>> {
    let step =
        |what: &'static str| move |_| anyhow::anyhow!("{what}: no answer within {STEP_TIMEOUT:?}");
    let stream = tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(step("connect"))?
        .context("connect")?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(connection);
    let request = Request::get("/")
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::new())?;
    let answer = async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    let (status, body) = tokio::time::timeout(STEP_TIMEOUT, answer)
        .await
        .map_err(step("GET /"))?
        .context("GET /")?;
    if status != 200 || body.as_ref() != BODY {
        bail!(
            "GET / was answered {status} with {} bytes, not 200 with the origin's body",
            body.len()
        );
    }
    Ok(sender)
}

/// RSS of `process` once two readings [`SETTLE_EVERY`] apart are within
/// [`SETTLED_BYTES`], or the last reading at `deadline` (at least one
/// reading after a pause, even past it).
fn settled_rss(process: &Proc, deadline: Instant) -> u64 {
    let mut last = process.rss_bytes();
    loop {
        std::thread::sleep(SETTLE_EVERY);
        let now = process.rss_bytes();
        if now.abs_diff(last) < SETTLED_BYTES || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// The Markdown section for `connections` asked for: one row per target,
/// ratios against nginx.
pub fn render(measurements: &[IdleMeasurement], connections: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Idle keep-alive connections — {} connections, memory per connection\n",
        thousands(connections as f64)
    );
    let _ = writeln!(
        out,
        "Each proxy freshly started; {n} HTTP/1.1 connections opened from the harness \
         ({CONCURRENCY} at a time), one GET / answered 200 in full on each, then all held open \
         and idle while the proxy's RSS settles (polled every {every} ms until it moves less \
         than {settled} KiB, at most {deadline} s and until {budget} s after the first \
         connection opened). Bytes/conn = (RSS with the connections − \
         idle RSS) ÷ connections held; memory a proxy allocates up front for its connection slots (nginx's \
         `worker_connections`) is in its idle RSS, not here. Every connection is checked to \
         be still open when RSS is read. HAProxy holds fewer when the open-file limit \
         cannot cover two sockets for each of them (it will not start otherwise).\n",
        n = thousands(connections as f64),
        every = SETTLE_EVERY.as_millis(),
        settled = SETTLED_BYTES / 1024,
        deadline = SETTLE_DEADLINE.as_secs(),
        budget = HOLD_BUDGET.as_secs(),
    );
    let _ = writeln!(
        out,
        "| target | connections | idle RSS | RSS with them | added | bytes/conn | ÷ nginx | \
         opened in |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|");
    let nginx = measurements
        .iter()
        .find(|m| m.target == Target::Nginx)
        .and_then(|m| m.outcome.as_ref().ok())
        .map(IdleSample::bytes_per_conn)
        .filter(|b| *b > 0.0);
    for m in measurements {
        match &m.outcome {
            Ok(s) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
                    m.target.name(),
                    thousands(s.connections as f64),
                    mib(s.idle_rss as f64),
                    mib(s.rss_with_conns as f64),
                    mib(s.added() as f64),
                    thousands(s.bytes_per_conn()),
                    nginx.map_or_else(
                        || "—".to_string(),
                        |n| format!("{:.2}", s.bytes_per_conn() / n)
                    ),
                    s.open_seconds,
                );
            }
            Err(_) => {
                let _ = writeln!(
                    out,
                    "| {} (failed) | — | — | — | — | — | — | — |",
                    m.target.name()
                );
            }
        }
    }
    render_errors(&mut out, measurements);
    out
}

fn render_errors(out: &mut String, measurements: &[IdleMeasurement]) {
    for m in measurements {
        if let Err(error) = &m.outcome {
            let _ = writeln!(out, "\n- {} failed: {error}", m.target.name());
        }
    }
}

/// Every idle-connection measurement, one line each (`report-idle.csv`).
pub fn to_csv(measurements: &[IdleMeasurement]) -> String {
    let mut csv = String::from(
        "target,connections,open_s,idle_rss_bytes,rss_with_conns_bytes,bytes_per_conn,error\n",
    );
    for m in measurements {
        match &m.outcome {
            Ok(s) => {
                let _ = writeln!(
                    csv,
                    "{},{},{:.3},{},{},{:.0},",
                    m.target.name(),
                    s.connections,
                    s.open_seconds,
                    s.idle_rss,
                    s.rss_with_conns,
                    s.bytes_per_conn()
                );
            }
            Err(error) => {
                let _ = writeln!(
                    csv,
                    "{},,,,,,\"{}\"",
                    m.target.name(),
                    error.replace('"', "'")
                );
            }
        }
    }
    csv
}
