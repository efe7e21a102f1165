//! The open-loop scenario: HTTP/1.1 GETs at a fixed total rate, whatever the
//! target's latency, so that latency is measured without saturation.
//!
//! Neither wrk nor h2load can do this (h2load's `--rate` counts connections,
//! and wrk2 is not packaged), so the generator lives here. A pacer thread
//! walks a fixed schedule — request `i` is due at `start + i / rate` — and
//! hands each due time, round robin, to one of `connections` keep-alive
//! HTTP/1.1 connections (hyper's client connection). A connection sends its
//! requests one at a time; a request whose connection is still busy waits in
//! that connection's queue, and its latency still counts from the time it was
//! *due*, not from when it went out. That is wrk2's correction of coordinated
//! omission: a target that stalls is charged for every request the schedule
//! wanted to send during the stall, not only for the one that was stuck.
//!
//! The pacer is an OS thread (`std::thread::sleep`, microsecond precision)
//! rather than a tokio timer, whose 1 ms tick would add up to a millisecond
//! to every figure. The connections run on the harness's runtime, on the load
//! CPUs.
//!
//! The default rate, 10,000 requests/s over 32 connections, is under half of
//! what one quiet core of the slowest peer forwards closed loop (Envoy,
//! 20–30k RPS on the README's machine), so every target is measured
//! unsaturated at the same rate. On a busy machine a proxy gets less of its
//! core and may saturate: the achieved rate falls below the asked one and
//! the tail grows to seconds. Lower `--rate` then.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::origin::BODY;

/// A request that went out more than this after it was due is counted late:
/// its connection was still busy, or the generator fell behind.
pub const LATE_AFTER: Duration = Duration::from_millis(1);

/// How long, after the last request was due, answers are still awaited.
/// A request unanswered by then is counted as unanswered, with this wait as
/// the lower bound of its latency: a saturated target shows as a long tail
/// and a low achieved rate, not as an error.
pub const DRAIN: Duration = Duration::from_secs(5);

/// The fixed-rate load, the same for every target.
#[derive(Clone, Copy, Debug)]
pub struct OpenLoad {
    /// Requests per second, all connections together.
    pub rate: u32,
    /// Keep-alive HTTP/1.1 connections.
    pub connections: u32,
}

/// What one open-loop run saw.
#[derive(Clone, Debug)]
pub struct OpenRun {
    /// Requests answered `200` with the origin's body.
    pub ok: u64,
    /// Requests the schedule wanted sent.
    pub asked: u64,
    /// From the first due time to the last answer.
    pub seconds: f64,
    /// Latencies from due time to complete answer, sorted; an unanswered
    /// request counts with its wait until the drain ended.
    pub latencies: Vec<Duration>,
    /// Requests sent more than [`LATE_AFTER`] after they were due.
    pub late: u64,
    /// Requests not answered when the drain ended.
    pub unanswered: u64,
    /// Requests answered wrongly or lost with their connection, and the
    /// first reason seen.
    pub failed: u64,
    pub first_failure: Option<String>,
}

/// One connection's share of the run.
#[derive(Default)]
struct Tally {
    ok: u64,
    late: u64,
    unanswered: u64,
    failed: u64,
    first_failure: Option<String>,
    latencies: Vec<Duration>,
    last_answer: Option<Instant>,
}

impl Tally {
    fn fail(&mut self, why: String) {
        self.failed += 1;
        self.first_failure.get_or_insert(why);
    }
}

/// Drives `addr` at `load.rate` for `seconds`, on `runtime`; blocks until
/// every scheduled request is answered or the drain is over.
pub fn run(runtime: &Handle, load: OpenLoad, addr: SocketAddr, seconds: u64) -> Result<OpenRun> {
    ensure!(load.rate > 0, "--rate must be at least 1");
    ensure!(
        load.connections > 0,
        "--open-connections must be at least 1"
    );
    let asked = u64::from(load.rate) * seconds;
    let senders = runtime.block_on(async {
        let mut senders = Vec::new();
        for _ in 0..load.connections {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("cannot connect to {addr}"))?;
            stream.set_nodelay(true)?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
                    .context("HTTP/1.1 handshake")?;
            tokio::spawn(connection);
            senders.push(sender);
        }
        anyhow::Ok(senders)
    })?;

    let start = Instant::now() + Duration::from_millis(10);
    let interval = Duration::from_secs_f64(1.0 / f64::from(load.rate));
    let scheduled_end = start + interval.mul_f64(asked as f64);
    let deadline = scheduled_end + DRAIN;
    let (queues, tasks): (Vec<_>, Vec<_>) = senders
        .into_iter()
        .map(|sender| {
            let (tx, rx) = mpsc::unbounded_channel::<Instant>();
            (
                tx,
                runtime.spawn(connection_loop(sender, addr, rx, deadline)),
            )
        })
        .unzip();

    // The pacer: hand each due time to its connection once it is due.
    for i in 0..asked {
        let due = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let queue = &queues[(i % u64::from(load.connections)) as usize];
        // A send fails only when the connection's task has ended on an
        // error: the request then counts as failed, below.
        let _ = queue.send(due);
    }
    drop(queues);

    let mut result = OpenRun {
        ok: 0,
        asked,
        seconds: 0.0,
        latencies: Vec::with_capacity(asked as usize),
        late: 0,
        unanswered: 0,
        failed: 0,
        first_failure: None,
    };
    let mut last = start;
    // Every task ends by the deadline: it stops waiting for answers then.
    for task in tasks {
        let tally = runtime
            .block_on(task)
            .context("an open-loop connection task failed")?;
        result.ok += tally.ok;
        result.late += tally.late;
        result.unanswered += tally.unanswered;
        result.failed += tally.failed;
        if result.first_failure.is_none() {
            result.first_failure = tally.first_failure;
        }
        result.latencies.extend(tally.latencies);
        last = last.max(tally.last_answer.unwrap_or(start));
    }
    // Requests handed to a connection that had already failed.
    let lost = asked.saturating_sub(result.ok + result.unanswered + result.failed);
    if lost > 0 {
        result.failed += lost;
        result
            .first_failure
            .get_or_insert_with(|| format!("{lost} requests lost with their connection"));
    }
    result.seconds = last.duration_since(start).as_secs_f64();
    result.latencies.sort_unstable();
    Ok(result)
}

/// Sends each due request on one connection, one at a time, and times it
/// from its due time, until `deadline`.
async fn connection_loop(
    mut sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    mut due_times: mpsc::UnboundedReceiver<Instant>,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    while let Some(due) = due_times.recv().await {
        let now = Instant::now();
        if now >= deadline {
            // Stuck behind an unanswered request: never sent.
            tally.unanswered += 1;
            tally.latencies.push(deadline.duration_since(due));
            continue;
        }
        if now.duration_since(due) > LATE_AFTER {
            tally.late += 1;
        }
        let request = match Request::get("/")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::new())
        {
            Ok(request) => request,
            Err(error) => {
                tally.fail(format!("cannot build the request: {error}"));
                continue;
            }
        };
        let answer = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok((status, body))) if status == 200 && body.as_ref() == BODY => {
                let now = Instant::now();
                tally.ok += 1;
                tally.latencies.push(now.duration_since(due));
                tally.last_answer = Some(now);
            }
            Ok(Ok((status, _))) => tally.fail(format!("answered {status} or a wrong body")),
            Ok(Err(error)) => {
                tally.fail(format!("{error:#}"));
                // The connection is gone: every request still queued on it
                // is lost too (counted by the caller).
                return tally;
            }
            Err(_) => {
                tally.unanswered += 1;
                tally.latencies.push(deadline.duration_since(due));
            }
        }
    }
    tally
}
