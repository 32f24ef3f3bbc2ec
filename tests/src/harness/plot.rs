//! PNG plots with plotters (bitmap backend; text through ab_glyph with a DejaVu font from
//! the `fonts-dejavu-core` package, installed by scripts/setup-host.sh).

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::runs::{EchoHop, IperfRun, SensitivityPoint};

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Lowest value of the log throughput axis; no traffic is drawn here.
const FLOOR: f64 = 0.1;

static FONT: Once = Once::new();

fn register_font() -> Result<()> {
    let mut result = Ok(());
    FONT.call_once(|| {
        result = (|| {
            let path = FONT_PATHS
                .iter()
                .find(|p| Path::new(p).exists())
                .ok_or_else(|| {
                    anyhow!("no DejaVuSans.ttf (install fonts-dejavu-core: scripts/setup-host.sh)")
                })?;
            let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| anyhow!("{path}: not a usable font"))
        })();
    });
    result
}

/// The series legend every plot here draws, at `position`.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(position)
        .draw()
        .map_err(err)
}

fn save(root: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>, path: &Path) -> Result<()> {
    root.present()
        .map_err(err)
        .with_context(|| format!("writing {}", path.display()))
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// Throughput over time, one panel per run, each direction a line, migrations shaded.
pub fn throughput(path: &Path, runs: &[IperfRun]) -> Result<()> {
    register_font()?;
    let panels = runs.len().max(1);
    let root = BitMapBackend::new(path, (1200, 380 * panels as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((panels, 1));
    for (run, area) in runs.iter().zip(areas.iter()) {
        let up = run.series.delivered(true);
        let down = run.series.delivered(false);
        let ymax = up.iter().chain(down).map(|s| s.mbps).fold(1.0f64, f64::max) * 1.1;
        let xmax = run.duration_s as f64 + 0.5;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{} ({}) - iperf3 {} throughput, 0.1 s intervals",
                    run.method.label(),
                    if run.migrations.iter().all(|m| m.survived) {
                        "connection survived"
                    } else {
                        "connection LOST"
                    },
                    run.mode.to_uppercase()
                ),
                ("sans-serif", 20),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, (FLOOR..ymax).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since iperf3 started")
            .y_desc("Mbit/s (log; 0 drawn at 0.1)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for m in &run.migrations {
            let g = &m.migration;
            let color = if m.survived { BLUE } else { RED };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(g.start_s, FLOOR), (g.end_s.max(g.start_s + 0.05), ymax)],
                    color.mix(0.15).filled(),
                )))
                .map_err(err)?
                .label(format!(
                    "{} -> {} ({:.1}-{:.1} s)",
                    g.from, g.to, g.start_s, g.end_s
                ))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.mix(0.3).filled())
                });
        }
        for (name, series, color) in [
            ("client -> server", up, RGBColor(0, 120, 0)),
            ("server -> client", down, RGBColor(200, 100, 0)),
        ] {
            if series.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(
                    series
                        .iter()
                        .map(|s| ((s.start + s.end) / 2.0, s.mbps.max(FLOOR))),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], color));
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    }
    save(&root, path)
}

/// Freeze-to-resume and total migration time against memory size, one line per mode (the
/// mean over the dirty rates; every run is a dot).
pub fn sensitivity(path: &Path, points: &[SensitivityPoint]) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ok: Vec<&SensitivityPoint> = points.iter().filter(|p| p.migration.ok).collect();
    let ymax = ok
        .iter()
        .filter_map(|p| p.migration.total_ms)
        .fold(1000.0f64, f64::max)
        / 1000.0
        * 1.1;
    let xs: Vec<f64> = ok.iter().map(|p| (p.mib as f64).log2()).collect();
    let xmin = xs.iter().cloned().fold(f64::INFINITY, f64::min).min(4.0) - 0.3;
    let xmax = xs.iter().cloned().fold(0.0, f64::max).max(10.0) + 0.3;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "memhog: freeze and total time vs. resident memory, per mode",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(xmin..xmax, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("container memory, MiB (log scale)")
        .y_desc("seconds")
        .x_label_formatter(&|x| format!("{:.0}", 2f64.powf(*x)))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let mut modes: Vec<&str> = ok.iter().map(|p| p.mode.as_str()).collect();
    modes.sort();
    modes.dedup();
    let palette = [
        RGBColor(0, 90, 200),
        RGBColor(200, 60, 0),
        RGBColor(0, 150, 60),
        RGBColor(130, 60, 170),
        RGBColor(110, 110, 110),
    ];
    for (i, mode) in modes.iter().enumerate() {
        let color = palette[i % palette.len()];
        for (what, dashed) in [("freeze-to-resume", false), ("total", true)] {
            let value = |p: &SensitivityPoint| {
                if dashed {
                    p.migration.total_ms
                } else {
                    p.migration.freeze_to_resume_ms
                }
            };
            let runs: Vec<(u64, f64)> = ok
                .iter()
                .filter(|p| p.mode == *mode)
                .filter_map(|p| Some((p.mib, value(p)? / 1000.0)))
                .collect();
            let mut sizes: Vec<u64> = runs.iter().map(|r| r.0).collect();
            sizes.sort();
            sizes.dedup();
            let line: Vec<(f64, f64)> = sizes
                .iter()
                .map(|&mib| {
                    let at: Vec<f64> = runs.iter().filter(|r| r.0 == mib).map(|r| r.1).collect();
                    (
                        (mib as f64).log2(),
                        at.iter().sum::<f64>() / at.len() as f64,
                    )
                })
                .collect();
            let style = if dashed {
                color.mix(0.5).stroke_width(2)
            } else {
                color.stroke_width(3)
            };
            chart
                .draw_series(LineSeries::new(line, style))
                .map_err(err)?
                .label(format!("{what}, {mode}"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], style));
            chart
                .draw_series(
                    runs.iter()
                        .map(|&(mib, v)| Circle::new(((mib as f64).log2(), v), 4, color.filled())),
                )
                .map_err(err)?;
        }
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    save(&root, path)
}

/// Each echo migration as a point: the client's longest pause against the freeze, with the
/// line where they are equal (a client that waited no longer than the container was
/// frozen) and the target line, 100 ms above it.
pub fn outage_vs_freeze(path: &Path, hops: &[EchoHop]) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (800, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let points: Vec<(f64, f64)> = hops
        .iter()
        .filter_map(|h| Some((h.freeze_to_resume_ms?, h.max_pause_ms)))
        .filter(|(_, pause)| pause.is_finite())
        .collect();
    let top = points
        .iter()
        .map(|&(f, p)| f.max(p))
        .fold(500.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "echo migrations: client-observed outage vs. freeze",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..top, 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("freeze-to-resume, ms")
        .y_desc("longest pause the client saw, ms")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (label, offset, color) in [
        ("outage = freeze", 0.0, BLACK.mix(0.6)),
        (
            "outage = freeze + 100 ms (target)",
            100.0,
            RGBColor(0, 150, 60).mix(0.9),
        ),
    ] {
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new([(0.0, offset), (top - offset, top)], style))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], style));
    }
    let blue = RGBColor(0, 90, 200);
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 5, blue.filled())))
        .map_err(err)?
        .label("one migration")
        .legend(move |(x, y)| Circle::new((x + 7, y), 5, blue.filled()));
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    save(&root, path)
}
