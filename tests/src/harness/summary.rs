//! The Markdown summary.

use std::fmt::Write;

use serde::Serialize;

use super::analysis::{spread, DirectionStats, Spread};
use super::forwarded::Forwarded;
use super::runs::{EchoHop, IperfRun, Migration, SensitivityPoint, UDP_RATES};

/// Everything one harness invocation measured (written as report.json).
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub started_unix: u64,
    pub hosts: usize,
    pub runs: Vec<IperfRun>,
    pub sensitivity: Vec<SensitivityPoint>,
    pub echo: Vec<EchoHop>,
    /// Over the echo hops: the client-observed pause, the freeze-to-resume time, and how
    /// much longer the client paused than the container was frozen.
    pub echo_pause: Option<Spread>,
    pub echo_freeze: Option<Spread>,
    pub echo_pause_beyond_freeze: Option<Spread>,
    /// One TCP connection through all the echo hops (flowcheck's summary).
    pub echo_long_lived: serde_json::Value,
    /// Plain podman checkpoint/restore of the same workload (`--baseline`), and its freeze.
    pub echo_baseline: Vec<Migration>,
    pub echo_baseline_freeze: Option<Spread>,
    /// Over the echo hops, each step of the freeze (`freeze_steps` of the report, by key).
    pub echo_steps: Vec<(String, Spread)>,
    /// UDP datagrams lost per hop, by rate: count, and percent of those sent in the freeze.
    pub echo_udp_lost: Vec<UdpSpread>,
    /// Steady throughput before and after a move (`--forwarded`).
    pub forwarded: Option<Forwarded>,
    /// Number of migrations (all runs), for quick checks.
    pub migrations: usize,
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.0}"))
}

fn dir_cell(d: &DirectionStats, what: &str) -> String {
    match (what, d.resumed) {
        ("outage", false) => "no traffic until the end".into(),
        (_, false) => format!("{:.0} / 0", d.mbps_before),
        ("outage", true) => format!("{:.0}", d.outage_ms),
        _ => format!("{:.0} / {:.0}", d.mbps_before, d.mbps_after),
    }
}

fn extra(d: &DirectionStats) -> String {
    match (d.retransmits, d.lost_packets) {
        (_, Some(lost)) => format!(
            "lost {lost}, jitter {}",
            d.jitter_ms_max.map_or("-".into(), |j| format!("{j:.2} ms"))
        ),
        (Some(r), None) => format!("{r} retr"),
        _ => "-".into(),
    }
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# live-migrate harness results\n");
    if !r.runs.is_empty() {
        let _ = writeln!(
            s,
            "iperf3 from the client namespace to a published port of h1 (5201, 5202, ...: one per run), bidirectional, \
             0.1 s intervals. Outage = longest run of intervals in which the client sent \
             (up) or received (down) no byte, around the migration; up = client -> server, down = server -> \
             client. Throughput is the mean of the 2 s before / after, Mbit/s. Retransmits \
             (TCP, sender side) and loss (UDP) from 1 s before to 3 s after.\n"
        );
        let _ = writeln!(
            s,
            "| mode | method | hop | freeze-to-resume ms | migration total ms | outage up ms | outage down ms | Mbit/s up before/after | Mbit/s down before/after | up retr/loss | down retr/loss | connection survived |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for run in &r.runs {
            for m in &run.migrations {
                let g = &m.migration;
                let down = m.down.clone().unwrap_or_default();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} -> {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    run.mode,
                    run.method.label(),
                    g.from,
                    g.to,
                    if g.ok {
                        opt(g.freeze_to_resume_ms)
                    } else {
                        "failed".into()
                    },
                    opt(g.total_ms),
                    dir_cell(&m.up, "outage"),
                    dir_cell(&down, "outage"),
                    dir_cell(&m.up, "tp"),
                    dir_cell(&down, "tp"),
                    extra(&m.up),
                    extra(&down),
                    if m.survived { "yes" } else { "**no**" }
                );
            }
        }
        for run in &r.runs {
            if let Some(e) = &run.iperf_error {
                let _ = writeln!(
                    s,
                    "\n{} / {}: iperf3 reported: `{e}`",
                    run.mode,
                    run.method.label()
                );
            }
        }
        let _ = writeln!(s, "\nPlot: `throughput.png`.\n");
    }
    if let Some(f) = &r.forwarded {
        s.push_str(&f.markdown());
    }
    if !r.sensitivity.is_empty() {
        let _ = writeln!(
            s,
            "## Memory sensitivity (memhog, live-migrate)\n\nMilliseconds; p50 and p95 over the runs of each cell that succeeded (`--rounds`).\n\n| MiB | dirty %/s | mode | runs | freeze-to-resume p50 | p95 | total p50 | last page p50 | p95 | moved MiB | memory intact | ok |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for cell in sweep_cells(&r.sensitivity) {
            let n = cell.runs.len();
            let of = |k: usize| match k == n {
                true => format!("{k}/{n}"),
                false => format!("**{k}/{n}**"),
            };
            let (freeze, last_page) = (cell.freeze(), cell.last_page());
            let _ = writeln!(
                s,
                "| {} | {} | {} | {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell.mib,
                cell.dirty_percent,
                cell.mode,
                opt(freeze.map(|v| v.p50)),
                opt(freeze.map(|v| v.p95)),
                opt(cell.total().map(|v| v.p50)),
                opt(last_page.map(|v| v.p50)),
                opt(last_page.map(|v| v.p95)),
                opt(cell.bytes_moved().map(|v| v.p50 / 1048576.0)),
                of(cell.runs.iter().filter(|p| p.memory_intact).count()),
                of(cell.runs.iter().filter(|p| p.migration.ok).count()),
            );
        }
        for line in post_copy_ratios(&r.sensitivity) {
            let _ = writeln!(s, "\n{line}");
        }
        let _ = writeln!(s, "\nPlot: `sensitivity.png`.\n");
    }
    if !r.echo.is_empty() {
        let intact = r.echo.iter().filter(|h| h.ok && h.flow_ok).count();
        let _ = writeln!(
            s,
            "## Small TCP echo workload: {} migrations alternating h1 <-> h2\n\nClient connected to h1:5000 (flowcheck, a message every 20 ms); outage = longest pause between replies.\n",
            r.echo.len()
        );
        let row = |what: &str, v: &Option<Spread>| {
            format!(
                "| {what} | {} | {} | {} |",
                opt(v.map(|v| v.p50)),
                opt(v.map(|v| v.p95)),
                opt(v.map(|v| v.max))
            )
        };
        let _ = writeln!(
            s,
            "| | p50 ms | p95 ms | worst ms |\n|---|---|---|---|\n{}\n{}\n{}",
            row("client-observed outage", &r.echo_pause),
            row("freeze-to-resume (agent)", &r.echo_freeze),
            row("outage beyond the freeze", &r.echo_pause_beyond_freeze),
        );
        if !r.echo_baseline.is_empty() {
            let _ = writeln!(
                s,
                "{}",
                row(
                    "baseline: plain podman checkpoint + restore",
                    &r.echo_baseline_freeze
                )
            );
        }
        let long = &r.echo_long_lived;
        let _ = writeln!(
            s,
            "\nConnections intact: {intact}/{}. One connection through all hops: {}, longest pause {} ms. Plot: `outage_vs_freeze.png`.\n",
            r.echo.len(),
            if long["ok"] == true { "intact" } else { "**broken**" },
            opt(long["max_pause_ms"].as_f64())
        );
        if !r.echo_steps.is_empty() {
            let _ = writeln!(
                s,
                "Where the freeze went (`freeze_steps` of the reports; milliseconds, but for the counts `pages_written` and `stack_refreezes`):\n\n| step | p50 | p95 | worst |\n|---|---|---|---|"
            );
            for (step, spread) in &r.echo_steps {
                let _ = writeln!(s, "{}", row(step, &Some(*spread)));
            }
        }
        if !r.echo_udp_lost.is_empty() {
            let _ = writeln!(
                s,
                "\nUDP echo server through the same hops, one flow per rate:\n\n| datagrams/s | lost per hop p50 | p95 | worst | % of those sent in the freeze, p50 | p95 | worst | reordered (not lost) per hop, p50 | p95 | worst |\n|---|---|---|---|---|---|---|---|---|---|"
            );
            for UdpSpread {
                rate,
                lost,
                lost_of_freeze_percent: percent,
                reordered,
            } in &r.echo_udp_lost
            {
                let cell = |v: &Option<Spread>, f: fn(&Spread) -> f64| {
                    v.as_ref().map_or("-".into(), |v| format!("{:.1}", f(v)))
                };
                let _ = writeln!(
                    s,
                    "| {rate:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    cell(lost, |v| v.p50),
                    cell(lost, |v| v.p95),
                    cell(lost, |v| v.max),
                    cell(percent, |v| v.p50),
                    cell(percent, |v| v.p95),
                    cell(percent, |v| v.max),
                    cell(reordered, |v| v.p50),
                    cell(reordered, |v| v.p95),
                    cell(reordered, |v| v.max),
                );
            }
        }
    }
    s
}

impl Report {
    /// Fills the echo spreads from the hops.
    pub fn summarize_echo(&mut self) {
        let pauses: Vec<f64> = self.echo.iter().map(|h| h.max_pause_ms).collect();
        let freezes: Vec<f64> = self
            .echo
            .iter()
            .filter_map(|h| h.freeze_to_resume_ms)
            .collect();
        let beyond: Vec<f64> = self
            .echo
            .iter()
            .filter_map(|h| Some(h.max_pause_ms - h.freeze_to_resume_ms?))
            .collect();
        self.echo_pause = spread(&pauses);
        self.echo_freeze = spread(&freezes);
        self.echo_pause_beyond_freeze = spread(&beyond);
        let baseline: Vec<f64> = self
            .echo_baseline
            .iter()
            .filter_map(|m| m.freeze_to_resume_ms)
            .collect();
        self.echo_baseline_freeze = spread(&baseline);
        self.echo_steps = step_spreads(&self.echo);
        self.echo_udp_lost = UDP_RATES
            .iter()
            .map(|&rate| {
                let hops: Vec<_> = self
                    .echo
                    .iter()
                    .flat_map(|h| &h.udp)
                    .filter(|u| u.rate_per_s == rate)
                    .collect();
                let lost: Vec<f64> = hops.iter().map(|u| u.lost as f64).collect();
                let percent: Vec<f64> = hops
                    .iter()
                    .filter_map(|u| u.lost_of_freeze_percent)
                    .collect();
                let reordered: Vec<f64> = hops.iter().map(|u| u.reordered as f64).collect();
                UdpSpread {
                    rate,
                    lost: spread(&lost),
                    lost_of_freeze_percent: spread(&percent),
                    reordered: spread(&reordered),
                }
            })
            .collect();
    }
}

/// The UDP flows of one rate over the echo hops.
#[derive(Debug, Clone, Serialize)]
pub struct UdpSpread {
    pub rate: f64,
    /// Lost per hop.
    pub lost: Option<Spread>,
    /// Lost, as a share of the datagrams sent during the freeze.
    pub lost_of_freeze_percent: Option<Spread>,
    /// Came after newer ones (not lost), per hop.
    pub reordered: Option<Spread>,
}

/// The spread of each numeric step of the hops' `freeze_steps` (nested ones as
/// `outer.inner`), in the order of the first report.
fn step_spreads(hops: &[EchoHop]) -> Vec<(String, Spread)> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, f64)>) {
        match v {
            serde_json::Value::Number(n) => out.extend(n.as_f64().map(|x| (prefix.to_string(), x))),
            serde_json::Value::Object(fields) => {
                for (k, v) in fields {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            _ => {}
        }
    }
    let mut keys: Vec<String> = Vec::new();
    let mut values: Vec<Vec<(String, f64)>> = Vec::new();
    for hop in hops {
        let mut steps = Vec::new();
        if let Some(v) = &hop.freeze_steps {
            flatten("", v, &mut steps);
        }
        for (k, _) in &steps {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        values.push(steps);
    }
    keys.into_iter()
        .filter_map(|key| {
            let v: Vec<f64> = values
                .iter()
                .filter_map(|steps| steps.iter().find(|(k, _)| *k == key).map(|(_, x)| *x))
                .collect();
            Some((key, spread(&v)?))
        })
        .collect()
}

/// The post-copy freeze at each size beside the smallest size's, per dirty rate, medians
/// (the target: at most 1.5 times); and the time until the last page beside what the
/// bytes moved would take at the rate the archive of a stop-copy through it was sent at
/// (the target: at most 1.5 times that, plus 1 s).
fn post_copy_ratios(points: &[SensitivityPoint]) -> Vec<String> {
    let cells = sweep_cells(points);
    let post: Vec<&SweepCell> = cells.iter().filter(|c| c.mode == "post-copy").collect();
    let mut lines = freeze_ratios(&post);
    let mut rates: Vec<f64> = points
        .iter()
        .filter(|p| p.mode == "stop-copy-archive" && p.migration.ok && p.mib >= 256)
        .filter_map(|p| {
            let report = p.migration.agent_report.as_ref()?;
            let ms = report["freeze_steps"]["transfer_ms"].as_f64()?;
            Some(p.migration.checkpoint_bytes? as f64 / ms * 1e3)
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    let Some(&rate) = rates.get(rates.len() / 2) else {
        return lines;
    };
    let checks: Vec<String> = post
        .iter()
        .filter_map(|c| {
            let (moved, last) = (c.bytes_moved()?.p50, c.last_page()?);
            let bound = 1.5 * moved / rate * 1e3 + 1000.0;
            Some(format!(
                "{} MiB {}%: p50 {:.0} ms, p95 {:.0} ms (bound {bound:.0} ms{})",
                c.mib,
                c.dirty_percent,
                last.p50,
                last.p95,
                if last.p95 <= bound {
                    ""
                } else if last.p50 <= bound {
                    ", p95 **over**"
                } else {
                    ", **over**"
                }
            ))
        })
        .collect();
    lines.push(format!(
        "Post-copy, until the last page, against 1.5 x bytes moved (p50) / {:.0} MB/s (the median rate of the stop-copy archives' transfer) + 1 s: {}",
        rate / 1e6,
        checks.join("; ")
    ));
    lines
}

/// Each size's median post-copy freeze beside the smallest size's, per dirty rate.
fn freeze_ratios(post: &[&SweepCell]) -> Vec<String> {
    let Some(smallest) = post.iter().map(|c| c.mib).min() else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    for base in post.iter().filter(|c| c.mib == smallest) {
        let Some(base_ms) = base.freeze().map(|f| f.p50) else {
            continue;
        };
        let ratios: Vec<String> = post
            .iter()
            .filter(|c| c.dirty_percent == base.dirty_percent && c.mib != smallest)
            .filter_map(|c| Some(format!("{} MiB {:.2}x", c.mib, c.freeze()?.p50 / base_ms)))
            .collect();
        lines.push(format!(
            "Post-copy freeze, p50 against {smallest} MiB's ({base_ms:.0} ms), at {}% dirtied/s: {}",
            base.dirty_percent,
            ratios.join(", ")
        ));
    }
    lines
}

/// The runs of one cell of the memory sweep (a size, a dirty rate and a mode) over the
/// rounds (`--rounds`). Its spreads are over the runs that succeeded.
pub struct SweepCell<'a> {
    pub mib: u64,
    pub dirty_percent: u64,
    pub mode: &'a str,
    pub runs: Vec<&'a SensitivityPoint>,
}

impl SweepCell<'_> {
    fn spread_of(&self, value: impl Fn(&SensitivityPoint) -> Option<f64>) -> Option<Spread> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|p| p.migration.ok)
            .filter_map(|p| value(p))
            .collect();
        spread(&v)
    }

    pub fn freeze(&self) -> Option<Spread> {
        self.spread_of(|p| p.migration.freeze_to_resume_ms)
    }

    pub fn total(&self) -> Option<Spread> {
        self.spread_of(|p| p.migration.total_ms)
    }

    pub fn last_page(&self) -> Option<Spread> {
        self.spread_of(|p| p.last_page_ms)
    }

    pub fn bytes_moved(&self) -> Option<Spread> {
        self.spread_of(|p| p.bytes_moved.map(|b| b as f64))
    }
}

/// The sweep's points grouped by cell, in the order the sweep first measured each.
pub fn sweep_cells(points: &[SensitivityPoint]) -> Vec<SweepCell<'_>> {
    let mut cells: Vec<SweepCell> = Vec::new();
    for p in points {
        let same = |c: &&mut SweepCell| {
            (c.mib, c.dirty_percent, c.mode) == (p.mib, p.dirty_percent, p.mode.as_str())
        };
        match cells.iter_mut().find(same) {
            Some(cell) => cell.runs.push(p),
            None => cells.push(SweepCell {
                mib: p.mib,
                dirty_percent: p.dirty_percent,
                mode: &p.mode,
                runs: vec![p],
            }),
        }
    }
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(mib: u64, mode: &str, round: usize, freeze: f64, ok: bool) -> SensitivityPoint {
        SensitivityPoint {
            mib,
            dirty_percent: 20,
            mode: mode.into(),
            round,
            migration: Migration {
                from: "h1".into(),
                to: "h2".into(),
                start_s: 0.0,
                end_s: 0.0,
                ok,
                error: None,
                freeze_to_resume_ms: Some(freeze),
                total_ms: Some(2.0 * freeze),
                checkpoint_bytes: None,
                agent_report: None,
            },
            last_page_ms: None,
            bytes_moved: None,
            memory_intact: ok,
        }
    }

    #[test]
    fn sweep_cells_gather_each_cells_rounds_and_spread_the_runs_that_succeeded() {
        let points = [
            point(16, "post-copy", 0, 300.0, true),
            point(1024, "post-copy", 0, 450.0, true),
            point(16, "post-copy", 1, 200.0, true),
            point(1024, "post-copy", 1, 9999.0, false),
            point(16, "post-copy", 2, 250.0, true),
            point(16, "stop-copy", 2, 280.0, true),
        ];
        let cells = sweep_cells(&points);
        let shape: Vec<(u64, &str, usize)> = cells
            .iter()
            .map(|c| (c.mib, c.mode, c.runs.len()))
            .collect();
        assert_eq!(
            shape,
            [
                (16, "post-copy", 3),
                (1024, "post-copy", 2),
                (16, "stop-copy", 1)
            ]
        );
        let small = cells[0].freeze().unwrap();
        assert_eq!((small.p50, small.p95, small.n), (250.0, 300.0, 3));
        let large = cells[1].freeze().unwrap();
        assert_eq!(
            (large.p50, large.n),
            (450.0, 1),
            "the failed run is not measured"
        );
        assert_eq!(cells[0].total().unwrap().p50, 500.0);
        assert!(cells[0].last_page().is_none());
    }
}
