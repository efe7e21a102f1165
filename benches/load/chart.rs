//! The PNG beside the Markdown report: grouped bars of kRPS per proxy core
//! and of p99 per scenario and target (medians across runs, as in the
//! tables), and RSS per idle keep-alive connection when that was measured.
//! Date and machine are in the title, so a copied image still says where
//! its figures come from.
//!
//! Text needs a TrueType font, read at run time (plotters' `ab_glyph`
//! feature: pure Rust, no fontconfig or freetype to build against). The
//! first of [`FONTS`] that exists is used, else any `.ttf` under
//! `/usr/share/fonts`; with none, no PNG is drawn and the harness says so
//! (the Markdown and CSV are written regardless).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::idle::IdleMeasurement;
use crate::peers::Target;
use crate::report::{Meta, thousands};
use crate::results::{Measurement, summarize};

/// Fonts tried in order (Debian `fonts-dejavu-core`, `fonts-liberation`,
/// then Arch's and Fedora's DejaVu paths).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
];
/// Where any `.ttf` is looked for when none of [`FONTS`] exists.
const FONT_DIR: &str = "/usr/share/fonts";
/// The family name the font is registered under for plotters.
const FAMILY: &str = "sans-serif";
/// Width of the image; each panel is [`PANEL_HEIGHT`] high.
const WIDTH: u32 = 1200;
const PANEL_HEIGHT: u32 = 380;
const TITLE_HEIGHT: u32 = 100;

/// One panel's data: a bar per (group, series), `None` where not measured.
struct Bars {
    title: String,
    unit: &'static str,
    groups: Vec<String>,
    series: Vec<(Target, Vec<Option<f64>>)>,
    /// How a bar's value is written above it.
    label: fn(f64) -> String,
}

/// Draws the chart of `measurements` (and `idle`, if any) to `path`.
pub fn draw(
    path: &Path,
    meta: &Meta,
    measurements: &[Measurement],
    idle: &[IdleMeasurement],
) -> Result<()> {
    load_font()?;
    let mut panels = vec![throughput(meta, measurements), latency(meta, measurements)];
    if let Some(memory) = memory(idle) {
        panels.push(memory);
    }
    let height = TITLE_HEIGHT + PANEL_HEIGHT * panels.len() as u32;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (title, body) = root.split_vertically(TITLE_HEIGHT);
    title
        .draw_text(
            "Prism side by side with nginx, HAProxy and Envoy — one proxy core each",
            &(FAMILY, 26).into_font().color(&BLACK),
            (20, 10),
        )
        .map_err(|e| anyhow!("{e}"))?;
    title
        .draw_text(
            &format!(
                "{}; {}; {} run(s) of {} s, medians",
                meta.date, meta.machine, meta.runs, meta.seconds
            ),
            &(FAMILY, 15).into_font().color(&RGBColor(80, 80, 80)),
            (20, 46),
        )
        .map_err(|e| anyhow!("{e}"))?;
    legend(&title, &panels)?;
    let areas = body.split_evenly((panels.len(), 1));
    for (area, panel) in areas.iter().zip(&panels) {
        bars(area, panel)?;
    }
    root.present()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// kRPS per proxy core, per scenario and proxy (the origin has no proxy core).
fn throughput(meta: &Meta, measurements: &[Measurement]) -> Bars {
    let targets: Vec<Target> = meta
        .targets
        .iter()
        .copied()
        .filter(|t| t.is_proxy())
        .collect();
    per_scenario(
        meta,
        measurements,
        &targets,
        |row| row.krps_per_core,
        |v| format!("{v:.1}"),
    )
    .titled(
        "Throughput per proxy core: thousands of requests (stream: messages) per CPU second \
         (higher is better)",
        "k per core-second",
    )
}

/// p99 latency per scenario and target, the origin alone included.
fn latency(meta: &Meta, measurements: &[Measurement]) -> Bars {
    per_scenario(
        meta,
        measurements,
        &meta.targets,
        |row| row.p99.map(|d| d.as_secs_f64() * 1e3),
        |v| format!("{v:.2}"),
    )
    .titled(
        "p99 latency (open: from each request's due time; lower is better)",
        "p99, ms",
    )
}

/// RSS per idle keep-alive connection, per proxy; `None` if none measured.
fn memory(idle: &[IdleMeasurement]) -> Option<Bars> {
    let connections = idle
        .iter()
        .filter_map(|m| Some(m.outcome.as_ref().ok()?.connections))
        .max()?;
    Some(Bars {
        title: format!(
            "Memory per idle keep-alive connection, up to {} held (lower is better)",
            thousands(connections as f64)
        ),
        unit: "bytes per connection",
        groups: vec![format!(
            "(RSS with {} idle HTTP/1.1 connections − idle RSS) ÷ connections",
            thousands(connections as f64)
        )],
        series: idle
            .iter()
            .map(|m| {
                let value = m.outcome.as_ref().ok().map(|s| s.bytes_per_conn());
                (m.target, vec![value])
            })
            .collect(),
        label: thousands,
    })
}

fn per_scenario(
    meta: &Meta,
    measurements: &[Measurement],
    targets: &[Target],
    value: fn(&crate::results::Row) -> Option<f64>,
    label: fn(f64) -> String,
) -> Bars {
    let rows: Vec<_> = meta
        .scenarios
        .iter()
        .map(|&s| summarize(measurements, s, targets))
        .collect();
    Bars {
        title: String::new(),
        unit: "",
        groups: meta
            .scenarios
            .iter()
            // Short names: five long titles would run into each other.
            .map(|s| format!("{} ({})", s.name(), s.tool()))
            .collect(),
        series: targets
            .iter()
            .enumerate()
            .map(|(i, &target)| {
                let values = rows.iter().map(|r| value(&r[i].1)).collect();
                (target, values)
            })
            .collect(),
        label,
    }
}

impl Bars {
    fn titled(mut self, title: &str, unit: &'static str) -> Self {
        self.title = title.to_string();
        self.unit = unit;
        self
    }
}

/// One panel of grouped bars: groups along x, one colour per target, the
/// value above each bar, a legend at the top right.
fn bars(area: &DrawingArea<BitMapBackend<'_>, Shift>, panel: &Bars) -> Result<()> {
    let groups = panel.groups.len().max(1);
    let per_group = panel.series.len().max(1);
    let top = panel
        .series
        .iter()
        .flat_map(|(_, values)| values.iter().flatten())
        .fold(0.0f64, |max, v| max.max(*v));
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FAMILY, 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..(groups as f64 - 0.5), 0f64..top)
        .map_err(|e| anyhow!("{e}"))?;
    let names = panel.groups.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups)
        .x_label_formatter(&|x| {
            let nearest = x.round();
            if (x - nearest).abs() < 1e-6 && nearest >= 0.0 {
                names.get(nearest as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_labels(6)
        .y_label_formatter(&|y| {
            if top >= 100.0 {
                thousands(*y)
            } else {
                format!("{y:.1}")
            }
        })
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .y_desc(panel.unit)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 15))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    // Bars of one group share 80% of its width.
    let width = 0.8 / per_group as f64;
    for (i, (target, values)) in panel.series.iter().enumerate() {
        let colour = colour(*target);
        let left = |group: usize| group as f64 - 0.4 + i as f64 * width;
        let bars = values.iter().enumerate().filter_map(|(g, v)| {
            let v = (*v)?;
            Some(Rectangle::new(
                [(left(g) + width * 0.05, 0.0), (left(g) + width * 0.95, v)],
                colour.filled(),
            ))
        });
        chart.draw_series(bars).map_err(|e| anyhow!("{e}"))?;
        // The value centred just above its bar.
        let above =
            TextStyle::from((FAMILY, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
        let texts = values.iter().enumerate().filter_map(|(g, v)| {
            let v = (*v)?;
            Some(Text::new(
                (panel.label)(v),
                (left(g) + width * 0.5, v + top * 0.01),
                above.clone(),
            ))
        });
        chart.draw_series(texts).map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

/// One legend for every panel (a target has the same colour in each), in a
/// row under the title.
fn legend(area: &DrawingArea<BitMapBackend<'_>, Shift>, panels: &[Bars]) -> Result<()> {
    let mut targets: Vec<Target> = panels
        .iter()
        .flat_map(|p| p.series.iter().map(|(t, _)| *t))
        .collect();
    targets.sort();
    targets.dedup();
    let font = (FAMILY, 16).into_font();
    let mut x = 20;
    for target in targets {
        area.draw(&Rectangle::new(
            [(x, 72), (x + 16, 88)],
            colour(target).filled(),
        ))
        .map_err(|e| anyhow!("{e}"))?;
        area.draw_text(target.name(), &font.color(&BLACK), (x + 22, 71))
            .map_err(|e| anyhow!("{e}"))?;
        x += 110;
    }
    Ok(())
}

/// One colour per target, the same in every panel; Prism in red.
fn colour(target: Target) -> RGBColor {
    match target {
        Target::Prism => RGBColor(214, 39, 40),
        Target::Nginx => RGBColor(44, 160, 44),
        Target::Haproxy => RGBColor(31, 119, 180),
        Target::Envoy => RGBColor(148, 103, 189),
        Target::Direct => RGBColor(150, 150, 150),
    }
}

/// Registers a TrueType font for plotters once per process.
fn load_font() -> Result<()> {
    static LOADED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        let path = find_font().ok_or_else(|| {
            format!(
                "no TrueType font found ({} or any .ttf under {FONT_DIR}); on Debian \
                 `apt-get install fonts-dejavu-core` gives one",
                FONTS.join(", ")
            )
        })?;
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("cannot read the font {}: {e}", path.display()))?;
        // plotters keeps fonts for the life of the process; this runs once.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a font plotters can read", path.display()))?;
        Ok(path)
    });
    match loaded {
        Ok(_) => Ok(()),
        Err(error) => bail!("{error}"),
    }
}

/// The first of [`FONTS`] that exists, else the first `.ttf` under [`FONT_DIR`].
fn find_font() -> Option<PathBuf> {
    if let Some(known) = FONTS.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return Some(known);
    }
    let mut dirs = vec![PathBuf::from(FONT_DIR)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("ttf"))
            {
                return Some(path);
            }
        }
    }
    None
}
