//! The scenarios and the load generators that drive them: wrk for HTTP/1.1
//! keep-alive, h2load for h2c and unary gRPC, all closed loop; the harness's
//! own generators for HTTP/1.1 at a fixed rate (`openloop`) and for
//! streaming gRPC (`stream`). Also the probes that check, before any load,
//! that a target answers a scenario correctly (status, body, gRPC trailers).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::ValueEnum;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::openloop::{self, OpenLoad};
use crate::origin::{BODY, GRPC_PATH, grpc_request};
use crate::process::{CpuSet, pinned};
use crate::results::OpenLoopFigures;
use crate::stream::{self, STREAM_PATH, StreamLoad, stream_message};

/// How long a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// wrk's per-request timeout: long enough that only a stuck proxy hits it.
const WRK_TIMEOUT: &str = "10s";

/// Prefix of the line the wrk script prints with its results.
const WRK_MARK: &str = "PRISM-LOAD";

/// wrk's `done` hook: exact counts and percentiles from wrk's own histogram.
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "PRISM-LOAD requests=%.0f duration_us=%.0f p50_us=%.0f p99_us=%.0f connect=%.0f read=%.0f write=%.0f status=%.0f timeout=%.0f\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"#;

/// A kind of traffic every target is driven with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Scenario {
    /// HTTP/1.1 keep-alive GETs (wrk).
    H1,
    /// HTTP/2 prior-knowledge cleartext GETs (h2load).
    H2c,
    /// Unary gRPC over h2c: a framed POST echoed with `grpc-status: 0` (h2load).
    Grpc,
    /// HTTP/1.1 keep-alive GETs at a fixed rate, open loop (the harness).
    Open,
    /// Bidirectional gRPC streams, each echoing many small messages (the harness).
    Stream,
}

/// The closed-loop load, the same for every target.
#[derive(Clone, Debug)]
pub struct Load {
    /// wrk connections.
    pub connections: u32,
    /// h2load connections.
    pub h2_connections: u32,
    /// h2load concurrent streams per connection.
    pub streams: u32,
    /// Threads of each load generator.
    pub threads: u32,
    /// The open-loop scenario's rate (requests/s) and connections.
    pub open: OpenLoad,
}

/// What one load-generator run measured. Any error (non-2xx, socket error,
/// failed stream) makes the run an `Err` instead.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Requests answered with 2xx.
    pub requests: u64,
    /// Length of the measurement.
    pub seconds: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// The open-loop scenario's own figures.
    pub open_loop: Option<OpenLoopFigures>,
}

/// Runs the load generators, pinned to the load CPUs.
#[derive(Clone, Debug)]
pub struct Driver {
    pub load: Load,
    pub taskset: PathBuf,
    pub cpus: CpuSet,
    pub wrk: Option<PathBuf>,
    pub h2load: Option<PathBuf>,
    /// The wrk script and the gRPC request body live here.
    pub dir: PathBuf,
    /// The harness's runtime, where its own generators run.
    pub runtime: tokio::runtime::Handle,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::H1 => "h1",
            Scenario::H2c => "h2c",
            Scenario::Grpc => "grpc",
            Scenario::Open => "open",
            Scenario::Stream => "stream",
        }
    }

    /// The load generator it needs.
    pub fn tool(self) -> &'static str {
        match self {
            Scenario::H1 => "wrk",
            Scenario::H2c | Scenario::Grpc => "h2load",
            Scenario::Open => "open-loop generator",
            Scenario::Stream => "stream client",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Scenario::H1 => "HTTP/1.1 keep-alive (wrk)",
            Scenario::H2c => "HTTP/2 h2c (h2load)",
            Scenario::Grpc => "unary gRPC over h2c (h2load)",
            Scenario::Open => "HTTP/1.1 keep-alive at a fixed rate (open loop)",
            Scenario::Stream => "streaming gRPC over h2c (bidirectional echo)",
        }
    }

    /// What the scenario counts per second and per proxy core: requests, or
    /// messages for `stream`.
    pub fn units(self) -> (&'static str, &'static str) {
        match self {
            Scenario::Stream => ("msg/s", "k msg/s/core"),
            _ => ("RPS", "kRPS/core"),
        }
    }
}

impl Driver {
    /// Writes the wrk script and the gRPC body into `dir`.
    pub fn new(
        load: Load,
        taskset: PathBuf,
        cpus: CpuSet,
        wrk: Option<PathBuf>,
        h2load: Option<PathBuf>,
        dir: PathBuf,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self> {
        std::fs::write(dir.join("report.lua"), WRK_SCRIPT)?;
        std::fs::write(dir.join("grpc-request.bin"), grpc_request())?;
        Ok(Self {
            load,
            taskset,
            cpus,
            wrk,
            h2load,
            dir,
            runtime,
        })
    }

    /// Drives `scenario` at `addr` for `seconds`.
    pub fn run(&self, scenario: Scenario, addr: SocketAddr, seconds: u64) -> Result<Measured> {
        match scenario {
            Scenario::H1 => self.wrk(addr, seconds),
            Scenario::H2c => self.h2load(addr, seconds, false),
            Scenario::Grpc => self.h2load(addr, seconds, true),
            Scenario::Open => self.open_loop(addr, seconds),
            Scenario::Stream => self.stream(addr, seconds),
        }
    }

    /// The command line of `scenario`, for the report.
    pub fn describe(&self, scenario: Scenario) -> String {
        let Load {
            connections,
            h2_connections,
            streams,
            threads,
            open,
        } = self.load;
        match scenario {
            Scenario::H1 => format!("`wrk -t{threads} -c{connections}`, GET /, closed loop"),
            Scenario::H2c => {
                format!("`h2load -t{threads} -c{h2_connections} -m{streams}`, GET /, closed loop")
            }
            Scenario::Grpc => format!(
                "`h2load -t{threads} -c{h2_connections} -m{streams}`, POST {GRPC_PATH} ({}-byte framed message), closed loop",
                grpc_request().len()
            ),
            Scenario::Open => format!(
                "the harness, GET / at {} requests/s over {} HTTP/1.1 connections, open loop \
                 (latency from each request's due time)",
                open.rate, open.connections
            ),
            Scenario::Stream => format!(
                "the harness, {h2_connections} h2c connections × {streams} streams on \
                 {STREAM_PATH}, {}-byte messages echoed, one in flight per stream (closed loop)",
                stream_message().len()
            ),
        }
    }

    fn wrk(&self, addr: SocketAddr, seconds: u64) -> Result<Measured> {
        self.wrk_at(addr, "/", seconds)
    }

    /// wrk's GETs of `path` (from `/`) at `addr` for `seconds`.
    pub fn wrk_at(&self, addr: SocketAddr, path: &str, seconds: u64) -> Result<Measured> {
        let wrk = self.wrk.as_deref().context("wrk is not installed")?;
        let Load {
            connections,
            threads,
            ..
        } = self.load;
        let output = pinned(&self.taskset, &self.cpus, wrk)
            .arg(format!("-t{threads}"))
            .arg(format!("-c{}", connections.max(threads)))
            .arg(format!("-d{seconds}s"))
            .args(["--timeout", WRK_TIMEOUT, "-s"])
            .arg(self.dir.join("report.lua"))
            .arg(format!("http://{addr}{path}"))
            .output()
            .context("cannot run wrk")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "wrk failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix(WRK_MARK))
            .with_context(|| format!("wrk printed no results: {stdout}"))?;
        let field = |name: &str| -> Result<u64> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("wrk's results lack `{name}`: {line}"))
        };
        let errors = [
            ("connect errors", field("connect")?),
            ("read errors", field("read")?),
            ("write errors", field("write")?),
            ("responses with status >= 400", field("status")?),
            ("timeouts", field("timeout")?),
        ];
        let failed: Vec<String> = errors
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(what, n)| format!("{n} {what}"))
            .collect();
        ensure!(failed.is_empty(), "wrk counted {}", failed.join(", "));
        let requests = field("requests")?;
        ensure!(requests > 0, "wrk completed no request");
        Ok(Measured {
            requests,
            seconds: field("duration_us")? as f64 / 1e6,
            p50: Duration::from_micros(field("p50_us")?),
            p99: Duration::from_micros(field("p99_us")?),
            open_loop: None,
        })
    }

    fn h2load(&self, addr: SocketAddr, seconds: u64, grpc: bool) -> Result<Measured> {
        let h2load = self.h2load.as_deref().context("h2load is not installed")?;
        let Load {
            h2_connections,
            streams,
            threads,
            ..
        } = self.load;
        let log = self.dir.join("h2load-requests.log");
        let _ = std::fs::remove_file(&log);
        let mut command = pinned(&self.taskset, &self.cpus, h2load);
        command
            .arg(format!("-t{threads}"))
            .arg(format!("-c{}", h2_connections.max(threads)))
            .arg(format!("-m{streams}"))
            .arg(format!("-D{seconds}"))
            .arg("--log-file")
            .arg(&log);
        let url = if grpc {
            command
                .arg("-d")
                .arg(self.dir.join("grpc-request.bin"))
                .args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
            format!("http://{addr}{GRPC_PATH}")
        } else {
            format!("http://{addr}/")
        };
        let output = command.arg(url).output().context("cannot run h2load")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "h2load failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let summary = H2loadSummary::parse(&stdout)?;
        let latencies = read_h2load_log(&log);
        let _ = std::fs::remove_file(&log);
        let mut latencies = latencies?;
        let mut failed = Vec::new();
        for (what, n) in [
            ("failed", summary.failed),
            ("errored", summary.errored),
            ("timed out", summary.timeout),
        ] {
            if n > 0 {
                failed.push(format!("{n} requests {what}"));
            }
        }
        if summary.non_2xx > 0 {
            failed.push(format!("{} non-2xx responses", summary.non_2xx));
        }
        ensure!(failed.is_empty(), "h2load counted {}", failed.join(", "));
        ensure!(summary.ok > 0, "h2load completed no request");
        ensure!(
            !latencies.is_empty(),
            "h2load's --log-file holds no completed request"
        );
        latencies.sort_unstable();
        Ok(Measured {
            requests: summary.ok,
            seconds: summary.seconds,
            p50: percentile(&latencies, 50.0),
            p99: percentile(&latencies, 99.0),
            open_loop: None,
        })
    }

    fn open_loop(&self, addr: SocketAddr, seconds: u64) -> Result<Measured> {
        let run = openloop::run(&self.runtime, self.load.open, addr, seconds)?;
        if run.failed > 0 {
            bail!(
                "{} of {} requests failed; the first: {}",
                run.failed,
                run.asked,
                run.first_failure.as_deref().unwrap_or("unknown")
            );
        }
        ensure!(run.ok > 0, "no request was answered");
        Ok(Measured {
            requests: run.ok,
            seconds: run.seconds,
            p50: percentile(&run.latencies, 50.0),
            p99: percentile(&run.latencies, 99.0),
            open_loop: Some(OpenLoopFigures {
                asked_rps: f64::from(self.load.open.rate),
                p999: percentile(&run.latencies, 99.9),
                max: run.latencies.last().copied().unwrap_or_default(),
                late: run.late,
                unanswered: run.unanswered,
            }),
        })
    }

    fn stream(&self, addr: SocketAddr, seconds: u64) -> Result<Measured> {
        let load = StreamLoad {
            connections: self.load.h2_connections,
            streams_per_connection: self.load.streams,
        };
        let run = stream::run(&self.runtime, load, addr, seconds)?;
        Ok(Measured {
            requests: run.messages,
            seconds: run.seconds,
            p50: percentile(&run.latencies, 50.0),
            p99: percentile(&run.latencies, 99.0),
            open_loop: None,
        })
    }
}

/// The lines of h2load's summary the harness reads.
#[derive(Debug, Default)]
struct H2loadSummary {
    seconds: f64,
    /// Requests completed with 2xx or 3xx (3xx is counted as an error too).
    ok: u64,
    non_2xx: u64,
    failed: u64,
    errored: u64,
    timeout: u64,
}

impl H2loadSummary {
    /// Reads `finished in 2.00s, …`, `requests: N total, N started, N done,
    /// N succeeded, N failed, N errored, N timeout` and `status codes: N 2xx,
    /// N 3xx, N 4xx, N 5xx`. Requests still in flight when the time is up
    /// are started but not done, and not failed.
    fn parse(stdout: &str) -> Result<Self> {
        let line = |prefix: &str| {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .with_context(|| format!("h2load printed no `{prefix}` line: {stdout}"))
        };
        // "N word" pairs separated by commas: the count before `word`.
        let count = |text: &str, word: &str| -> Result<u64> {
            text.split(',')
                .find_map(|part| {
                    let mut words = part.split_whitespace();
                    let n = words.next()?.parse().ok()?;
                    (words.next()? == word).then_some(n)
                })
                .with_context(|| format!("h2load's `{text}` has no count of `{word}`"))
        };
        let finished = line("finished in")?;
        let took = finished.split(',').next().unwrap_or("").trim();
        let seconds = parse_duration(took)
            .with_context(|| format!("cannot read h2load's duration `{took}`"))?
            .as_secs_f64();
        let requests = line("requests:")?;
        let status = line("status codes:")?;
        Ok(Self {
            seconds,
            ok: count(requests, "succeeded")?,
            non_2xx: count(status, "3xx")? + count(status, "4xx")? + count(status, "5xx")?,
            failed: count(requests, "failed")?,
            errored: count(requests, "errored")?,
            timeout: count(requests, "timeout")?,
        })
    }
}

/// `2.00s`, `512.33ms`, `830us`: h2load's way of printing a duration.
fn parse_duration(text: &str) -> Option<Duration> {
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    let value: f64 = number.trim().parse().ok()?;
    Some(Duration::from_secs_f64(value * scale))
}

/// Durations of the completed requests in h2load's `--log-file`: one line
/// per request, tab-separated start time (µs since the epoch), status (`-1`
/// for a failed stream) and microseconds until the end of the response.
fn read_h2load_log(path: &Path) -> Result<Vec<Duration>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read h2load's log {}", path.display()))?;
    let mut latencies = Vec::new();
    for line in text.lines() {
        let mut columns = line.split('\t');
        let (Some(_start), Some(status), Some(micros)) =
            (columns.next(), columns.next(), columns.next())
        else {
            bail!("h2load's log has a line without three columns: `{line}`");
        };
        if status.trim().starts_with('2') {
            let micros: u64 = micros
                .trim()
                .parse()
                .with_context(|| format!("h2load's log: `{micros}` is not microseconds"))?;
            latencies.push(Duration::from_micros(micros));
        }
    }
    Ok(latencies)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One HTTP/1.1 GET / on a fresh connection (`Connection: close`): whether
/// it was answered `200` with the origin's body.
pub fn get_once(addr: SocketAddr, timeout: Duration) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    stream.write_all(
        format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = Vec::with_capacity(1024);
    stream.read_to_end(&mut answer)?;
    Ok(answer.starts_with(b"HTTP/1.1 200") && answer.windows(BODY.len()).any(|w| w == BODY))
}

/// Checks that `addr` answers `scenario` correctly, once, before any load.
pub async fn probe(scenario: Scenario, addr: SocketAddr) -> Result<()> {
    let check = async {
        match scenario {
            Scenario::H1 | Scenario::Open => {
                let ok = tokio::task::spawn_blocking(move || get_once(addr, PROBE_TIMEOUT))
                    .await?
                    .context("HTTP/1.1 GET failed")?;
                ensure!(
                    ok,
                    "HTTP/1.1 GET / was not answered 200 with the origin's body"
                );
                Ok(())
            }
            Scenario::H2c => probe_h2(addr, false).await,
            Scenario::Grpc => probe_h2(addr, true).await,
            Scenario::Stream => stream::probe(addr).await,
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, check)
        .await
        .with_context(|| format!("no answer within {PROBE_TIMEOUT:?}"))?
        .with_context(|| format!("{} probe of {addr}", scenario.name()))
}

/// An h2c GET / (expects 200 and the origin's body) or a unary gRPC call
/// (expects 200, the echoed message and `grpc-status: 0` in the trailers).
async fn probe_h2(addr: SocketAddr, grpc: bool) -> Result<()> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .context("HTTP/2 handshake")?;
    tokio::spawn(connection);
    let request = if grpc {
        Request::post(format!("http://{addr}{GRPC_PATH}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(grpc_request())))?
    } else {
        Request::get(format!("http://{addr}/")).body(Full::new(Bytes::new()))?
    };
    let response = sender.send_request(request).await?;
    let status = response.status();
    let collected = response.into_body().collect().await?;
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    ensure!(status == 200, "answered {status}");
    if grpc {
        let grpc_status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        ensure!(
            grpc_status.as_deref() == Some("0"),
            "gRPC call ended with grpc-status {grpc_status:?} in the trailers, not 0"
        );
        ensure!(
            body.as_ref() == grpc_request().as_slice(),
            "gRPC call did not get its message echoed"
        );
    } else {
        ensure!(
            body.as_ref() == BODY,
            "h2c GET / did not get the origin's body"
        );
    }
    Ok(())
}
