//! What was measured, kept apart from how it is shown: one [`Measurement`]
//! per (run, scenario, target), medians and ratios per (scenario, target),
//! and a CSV of every measurement for charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::drive::Scenario;
use crate::peers::Target;

/// One load-generator run against one freshly started target.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// 1-based.
    pub run: u32,
    pub scenario: Scenario,
    pub target: Target,
    pub outcome: Result<Sample, String>,
}

/// What a successful measurement saw.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Requests answered 2xx during the measured window.
    pub requests: u64,
    pub seconds: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// The proxy's process; `None` for the origin measured directly.
    pub proxy: Option<ProxyUsage>,
    /// Only for the open-loop scenario.
    pub open_loop: Option<OpenLoopFigures>,
}

/// What only a fixed-rate (open-loop) run has; its latencies count from
/// each request's due time.
#[derive(Clone, Debug)]
pub struct OpenLoopFigures {
    /// The rate asked for; [`Sample::rps`] is the rate achieved.
    pub asked_rps: f64,
    pub p999: Duration,
    pub max: Duration,
    /// Requests sent more than `openloop::LATE_AFTER` after they were due.
    pub late: u64,
    /// Requests still unanswered 5 s after the last was due (a saturated
    /// target); their latency counts until then.
    pub unanswered: u64,
}

/// The proxy process during one measurement.
#[derive(Clone, Debug)]
pub struct ProxyUsage {
    /// User + system CPU seconds of the proxy's process tree in the window.
    pub cpu_seconds: f64,
    /// Resident memory after start, before any load.
    pub idle_rss: u64,
    /// Peak resident memory (`VmHWM`) by the end of the window.
    pub peak_rss: u64,
    /// Exec → first `200` answered through it.
    pub start_to_200: Duration,
}

/// Medians across runs of one target in one scenario; each column is the
/// median of its own values. `None` where nothing was measured.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub runs: usize,
    pub failures: usize,
    pub rps: Option<f64>,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub cpu_seconds: Option<f64>,
    pub krps_per_core: Option<f64>,
    pub idle_rss: Option<f64>,
    pub peak_rss: Option<f64>,
    pub start_to_200: Option<Duration>,
    /// Median over runs of (this target ÷ Prism) in the same run.
    pub rps_vs_prism: Option<f64>,
    pub krps_per_core_vs_prism: Option<f64>,
}

impl Sample {
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Thousands of requests per second of proxy CPU.
    pub fn krps_per_core(&self) -> Option<f64> {
        let cpu = self.proxy.as_ref()?.cpu_seconds;
        (cpu > 0.0).then(|| self.requests as f64 / cpu / 1000.0)
    }
}

/// One [`Row`] per target of `scenario`, in `targets` order.
pub fn summarize(
    measurements: &[Measurement],
    scenario: Scenario,
    targets: &[Target],
) -> Vec<(Target, Row)> {
    let of = |target: Target| {
        measurements
            .iter()
            .filter(move |m| m.scenario == scenario && m.target == target)
    };
    let prism: BTreeMap<u32, &Sample> = of(Target::Prism)
        .filter_map(|m| Some((m.run, m.outcome.as_ref().ok()?)))
        .collect();
    targets
        .iter()
        .map(|&target| {
            let all: Vec<&Measurement> = of(target).collect();
            let ok: Vec<(u32, &Sample)> = all
                .iter()
                .filter_map(|m| Some((m.run, m.outcome.as_ref().ok()?)))
                .collect();
            let samples = || ok.iter().map(|(_, s)| *s);
            let proxy = || samples().filter_map(|s| s.proxy.as_ref());
            let ratio = |metric: fn(&Sample) -> Option<f64>| {
                median(ok.iter().filter_map(|(run, sample)| {
                    let base = metric(prism.get(run)?)?;
                    (base > 0.0).then_some(metric(sample)? / base)
                }))
            };
            let row = Row {
                runs: all.len(),
                failures: all.len() - ok.len(),
                rps: median(samples().map(Sample::rps)),
                p50: median(samples().map(|s| s.p50.as_secs_f64())).map(Duration::from_secs_f64),
                p99: median(samples().map(|s| s.p99.as_secs_f64())).map(Duration::from_secs_f64),
                cpu_seconds: median(proxy().map(|p| p.cpu_seconds)),
                krps_per_core: median(samples().filter_map(Sample::krps_per_core)),
                idle_rss: median(proxy().map(|p| p.idle_rss as f64)),
                peak_rss: median(proxy().map(|p| p.peak_rss as f64)),
                start_to_200: median(proxy().map(|p| p.start_to_200.as_secs_f64()))
                    .map(Duration::from_secs_f64),
                rps_vs_prism: ratio(|s| Some(s.rps())),
                krps_per_core_vs_prism: ratio(Sample::krps_per_core),
            };
            (target, row)
        })
        .collect()
}

/// Medians across runs of the open-loop figures of one target, per target
/// of `scenario` in `targets` order: asked RPS, p99.9, max, late and
/// unanswered requests.
pub fn summarize_open_loop(
    measurements: &[Measurement],
    scenario: Scenario,
    targets: &[Target],
) -> Vec<(Target, [Option<f64>; 5])> {
    targets
        .iter()
        .map(|&target| {
            let figures = || {
                measurements
                    .iter()
                    .filter(move |m| m.scenario == scenario && m.target == target)
                    .filter_map(|m| m.outcome.as_ref().ok()?.open_loop.as_ref())
            };
            let cells = [
                median(figures().map(|f| f.asked_rps)),
                median(figures().map(|f| f.p999.as_secs_f64())),
                median(figures().map(|f| f.max.as_secs_f64())),
                median(figures().map(|f| f.late as f64)),
                median(figures().map(|f| f.unanswered as f64)),
            ];
            (target, cells)
        })
        .collect()
}

/// The median (mean of the middle two for an even count), `None` if empty.
pub fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    })
}

/// Every measurement, one line each, for charts and later analysis.
pub fn to_csv(measurements: &[Measurement]) -> String {
    let mut csv = String::from(
        "run,scenario,target,requests,seconds,rps,p50_us,p99_us,proxy_cpu_s,krps_per_core,\
         idle_rss_bytes,peak_rss_bytes,start_to_200_ms,asked_rps,p999_us,max_us,late,unanswered,error\n",
    );
    for m in measurements {
        let _ = write!(csv, "{},{},{},", m.run, m.scenario.name(), m.target.name());
        match &m.outcome {
            Ok(s) => {
                let proxy = s.proxy.as_ref();
                let open = s.open_loop.as_ref();
                let _ = writeln!(
                    csv,
                    "{},{:.3},{:.0},{},{},{},{},{},{},{},{},{},{},{},{},",
                    s.requests,
                    s.seconds,
                    s.rps(),
                    s.p50.as_micros(),
                    s.p99.as_micros(),
                    proxy
                        .map(|p| format!("{:.2}", p.cpu_seconds))
                        .unwrap_or_default(),
                    s.krps_per_core()
                        .map(|k| format!("{k:.2}"))
                        .unwrap_or_default(),
                    proxy.map(|p| p.idle_rss.to_string()).unwrap_or_default(),
                    proxy.map(|p| p.peak_rss.to_string()).unwrap_or_default(),
                    proxy
                        .map(|p| format!("{:.2}", p.start_to_200.as_secs_f64() * 1e3))
                        .unwrap_or_default(),
                    open.map(|o| format!("{:.0}", o.asked_rps))
                        .unwrap_or_default(),
                    open.map(|o| o.p999.as_micros().to_string())
                        .unwrap_or_default(),
                    open.map(|o| o.max.as_micros().to_string())
                        .unwrap_or_default(),
                    open.map(|o| o.late.to_string()).unwrap_or_default(),
                    open.map(|o| o.unanswered.to_string()).unwrap_or_default(),
                );
            }
            Err(error) => {
                let _ = writeln!(csv, ",,,,,,,,,,,,,,,\"{}\"", error.replace('"', "'"));
            }
        }
    }
    csv
}
