//! The Markdown report: how the run was made, then one table per scenario.

use std::fmt::Write as _;
use std::time::Duration;

use crate::drive::Scenario;
use crate::openloop;
use crate::peers::Target;
use crate::results::{Measurement, Row, summarize, summarize_open_loop};

/// Everything about the run that is not a measurement.
#[derive(Clone, Debug)]
pub struct Meta {
    pub date: String,
    pub machine: String,
    pub versions: Vec<(&'static str, String)>,
    pub runs: u32,
    pub seconds: u64,
    pub warmup_seconds: u64,
    pub targets: Vec<Target>,
    pub scenarios: Vec<Scenario>,
    /// `(scenario, load generator command)`.
    pub load: Vec<(Scenario, String)>,
    pub proxy_cpus: String,
    pub load_cpus: String,
}

/// The whole report.
pub fn render(meta: &Meta, measurements: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Load: Prism side by side with nginx, HAProxy and Envoy\n"
    );
    let _ = writeln!(out, "- Date: {}; machine: {}.", meta.date, meta.machine);
    let versions: Vec<String> = meta
        .versions
        .iter()
        .map(|(tool, version)| format!("{tool}: {version}"))
        .collect();
    let _ = writeln!(out, "- Tools: {}.", versions.join("; "));
    let _ = writeln!(
        out,
        "- Runs: {runs}, interleaved (for each run, each scenario, each target; the target \
         order rotates by one each run), {secs} s measured after a {warm} s warm-up of the same \
         load; every measurement on a freshly started proxy. Each cell is the median across \
         runs; ratios are the median of per-run ratios (target ÷ Prism in the same run; > 1 \
         means the target did more).",
        runs = meta.runs,
        secs = meta.seconds,
        warm = meta.warmup_seconds,
    );
    let _ = writeln!(
        out,
        "- Pinning: each proxy on CPU {proxy} (`taskset -c {proxy}`) with one worker (Prism \
         `--workers 1`, nginx `worker_processes 1` with `master_process off`, HAProxy \
         `nbthread 1`, Envoy `--concurrency 1`); load generators, origin and Prism's control \
         plane on CPU {load}.",
        proxy = meta.proxy_cpus,
        load = meta.load_cpus,
    );
    for (scenario, command) in &meta.load {
        let _ = writeln!(out, "- Load, {}: {command}.", scenario.name());
    }
    let _ = writeln!(
        out,
        "- Upstream: every proxy keeps connections alive to one origin (hyper, 128-byte body; \
         gRPC calls echoed with `grpc-status: 0`): HTTP/1.1 for h1 and h2c clients, HTTP/2 \
         (h2c) for gRPC. No access logs; 5 s connect and 30 s request timeouts. Every 2xx \
         counted is checked against the requests the origin answered."
    );
    let _ = writeln!(
        out,
        "- Latency: wrk's own histogram (via its Lua `done` hook); for h2load, nearest-rank \
         percentiles of the per-request durations in its `--log-file`. Both from request \
         sent to response complete."
    );
    if meta.scenarios.contains(&Scenario::Open) {
        let _ = writeln!(
            out,
            "- Open loop: requests are due at a fixed rate whatever the answers; latency \
             counts from each request's due time, so a stall is charged to every request it \
             delayed (wrk2's correction of coordinated omission). Late: requests sent more \
             than {late:?} after they were due. Unanswered: not answered {drain:?} after the \
             last was due (a saturated target), counted with that wait as their latency.",
            late = openloop::LATE_AFTER,
            drain = openloop::DRAIN,
        );
    }
    if meta.scenarios.contains(&Scenario::Stream) {
        let _ = writeln!(
            out,
            "- Streams: the msg/s column counts messages echoed back whole; latency is one \
             message's round trip on its stream; k msg/s/core = messages ÷ proxy CPU seconds ÷ \
             1000. Every stream must end with `grpc-status: 0`."
        );
    }
    let _ = writeln!(
        out,
        "- Proxy CPU: user + system seconds of the proxy's process tree during the measured \
         window (/proc/<pid>/stat; for Prism the proxy alone, not its control plane); kRPS/core = 2xx responses ÷ those seconds ÷ 1000. RSS: \
         `VmRSS` before any load (idle) and `VmHWM` at the end (peak). start→200: exec of the \
         proxy to the first 200 answered through it (an HTTP/1.1 GET polled every 1 ms); \
         Prism starts from its on-disk last-good snapshot with its control plane running."
    );
    for &scenario in &meta.scenarios {
        let _ = writeln!(out, "\n## {} — {}\n", scenario.name(), scenario.title());
        let (unit, per_core) = scenario.units();
        let _ = writeln!(
            out,
            "| target | {unit} | p50 | p99 | proxy CPU s | {per_core} | idle RSS | peak RSS | \
             start→200 | {unit} ÷ Prism | {per_core} ÷ Prism |"
        );
        let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        for (target, row) in summarize(measurements, scenario, &meta.targets) {
            let _ = writeln!(out, "{}", table_row(target, &row));
        }
        if scenario == Scenario::Open {
            let _ = writeln!(
                out,
                "\n| target | asked RPS | p99.9 | max | late | unanswered |\n|---|--:|--:|--:|--:|--:|"
            );
            for (target, [asked, p999, max, late, unanswered]) in
                summarize_open_loop(measurements, scenario, &meta.targets)
            {
                let seconds = |s: f64| millis(Duration::from_secs_f64(s));
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} |",
                    target.name(),
                    opt(asked, thousands),
                    opt(p999, seconds),
                    opt(max, seconds),
                    opt(late, |l| format!("{l:.0}")),
                    opt(unanswered, |u| format!("{u:.0}")),
                );
            }
        }
    }
    let failures: Vec<&Measurement> = measurements.iter().filter(|m| m.outcome.is_err()).collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## Errors\n");
        for m in failures {
            if let Err(error) = &m.outcome {
                let _ = writeln!(
                    out,
                    "- run {}, {}, {}: {error}",
                    m.run,
                    m.scenario.name(),
                    m.target.name()
                );
            }
        }
    }
    out
}

fn table_row(target: Target, row: &Row) -> String {
    let name = match target {
        Target::Direct => "direct (no proxy)".to_string(),
        other => other.name().to_string(),
    };
    let name = if row.failures > 0 {
        format!("{name} ({}/{} failed)", row.failures, row.runs)
    } else {
        name
    };
    let cells = [
        name,
        opt(row.rps, thousands),
        opt(row.p50, millis),
        opt(row.p99, millis),
        opt(row.cpu_seconds, |c| format!("{c:.2}")),
        opt(row.krps_per_core, |k| format!("{k:.1}")),
        opt(row.idle_rss, mib),
        opt(row.peak_rss, mib),
        opt(row.start_to_200, millis),
        opt(row.rps_vs_prism, |r| format!("{r:.2}")),
        opt(row.krps_per_core_vs_prism, |r| format!("{r:.2}")),
    ];
    format!("| {} |", cells.join(" | "))
}

fn opt<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "—".to_string(), show)
}

fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / 1_048_576.0)
}

/// `123456.7` → `123,457`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
