//! `harness`: what a client sees while its server container migrates. Brings up a lab,
//! runs iperf3 (TCP or UDP, both directions) against the `iperf3` container on h1 while it
//! is migrated h1 -> h2 -> h3 at set times, and writes report.json, summary.md and
//! throughput.png. Optional: the same run with plain podman checkpoint/restore
//! (`--baseline`), a memory sweep with memhog (`--sensitivity`), and the client-observed
//! outage of the small TCP echo workload over N hops (`--echo N`), and the steady
//! throughput of the forwarded path (`--forwarded N`). See README, Performance.

#[path = "../harness/mod.rs"]
mod harness;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use lab::{Lab, LabOptions};

use harness::runs::{self, IperfPlan, Method};
use harness::summary::{markdown, Report};

#[derive(Parser, Debug)]
#[command(about = "iperf3 / memhog / echo measurements of live migration in a lab")]
struct Args {
    /// iperf3 mode(s): tcp, udp or both (comma-separated). Empty list: no iperf3 run.
    #[arg(long, default_value = "tcp", value_delimiter = ',')]
    mode: Vec<String>,
    /// iperf3 test length, seconds.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Seconds after the iperf3 start at which to migrate (h1 -> h2, h2 -> h3, ...).
    #[arg(long, default_value = "6,13", value_delimiter = ',')]
    migrate_at: Vec<f64>,
    /// UDP: target bitrate per direction (iperf3 syntax: 10M = 10 Mbit/s).
    #[arg(long, default_value = "10M")]
    udp_rate: String,
    /// UDP: datagram payload size, bytes (small datagrams make a high packet rate).
    #[arg(long, default_value_t = 200)]
    udp_len: u32,
    /// Also run the same workload migrated by plain podman checkpoint/restore.
    #[arg(long)]
    baseline: bool,
    /// memhog sweep: sizes 16, 64, 256, 1024 MiB (see --sizes) at 0% and 20% dirtied/s, in
    /// each mode (see --sweep-modes).
    #[arg(long)]
    sensitivity: bool,
    /// Sizes of the sweep, MiB.
    #[arg(long, default_value = "16,64,256,1024", value_delimiter = ',')]
    sizes: Vec<u64>,
    /// Add 2048 MiB to the sweep.
    #[arg(long)]
    with_2g: bool,
    /// Dirty rates of the sweep, percent of the pages rewritten per second.
    #[arg(long, default_value = "0,20", value_delimiter = ',')]
    dirty: Vec<u64>,
    /// Modes of the sweep, side by side: agent-client's --mode values, stop-copy-archive
    /// (--mode stop-copy --archive), and podman (plain podman checkpoint/restore, the
    /// baseline).
    #[arg(
        long,
        default_value = "podman,stop-copy-archive,stop-copy,post-copy",
        value_delimiter = ','
    )]
    sweep_modes: Vec<String>,
    /// Passes over the whole sweep; each cell reports the median and 95th percentile of
    /// its runs.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Migrate the small TCP echo workload N times (h1 <-> h2) and report the p50, p95 and
    /// worst of the client-observed pause, the freeze, and the pause beyond the freeze, where
    /// the freeze went, and the UDP datagrams lost at 50/s and 6,250/s as a UDP echo server
    /// takes the same hops; with a plot of pause against freeze (outage_vs_freeze.png).
    /// With --baseline, plain podman checkpoint/restore of the same workload first.
    #[arg(long, default_value_t = 0)]
    echo: usize,
    /// Steady throughput of the forwarded path: N runs of 10 s of iperf3 --bidir to a port
    /// published on h1, straight to the container there, then N more after it moved to h2
    /// (through h1's WireGuard tunnel).
    #[arg(long, default_value_t = 0)]
    forwarded: usize,
    /// Quick check for `make test`: TCP, 12 s, one migration at 2 s, two hosts (the
    /// migration must end before iperf3 does, also on a loaded machine).
    #[arg(long)]
    smoke: bool,
    /// Output directory (default target/harness/<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Draw the memory sweep's plot again from a run's report.json (into --out, or
    /// beside it), without running anything.
    #[arg(long, value_name = "REPORT")]
    replot: Option<PathBuf>,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(report) = &args.replot {
        #[derive(serde::Deserialize)]
        struct Swept {
            sensitivity: Vec<harness::runs::SensitivityPoint>,
        }
        let swept: Swept = serde_json::from_slice(
            &std::fs::read(report).with_context(|| format!("reading {}", report.display()))?,
        )
        .with_context(|| format!("{} is no harness report", report.display()))?;
        let dir = match &args.out {
            Some(dir) => dir.clone(),
            None => report.parent().map(PathBuf::from).unwrap_or_default(),
        };
        let plot = dir.join("sensitivity.png");
        harness::plot::sensitivity(&plot, &swept.sensitivity)?;
        eprintln!("wrote {}", plot.display());
        return Ok(());
    }
    if args.smoke {
        args.mode = vec!["tcp".into()];
        args.duration = 12;
        args.migrate_at = vec![2.0];
        args.baseline = false;
        args.sensitivity = false;
        args.echo = 0;
        args.forwarded = 0;
    }
    if args.rounds == 0 {
        bail!("--rounds: at least 1");
    }
    args.mode.retain(|m| !m.is_empty());
    if args.mode.iter().any(|m| m == "both") {
        args.mode = vec!["tcp".into(), "udp".into()];
    }
    for m in &args.mode {
        if m != "tcp" && m != "udp" {
            bail!("--mode: tcp, udp or both, not {m:?}");
        }
    }
    if args
        .migrate_at
        .iter()
        .any(|&t| t < 0.0 || t >= args.duration as f64)
    {
        bail!("--migrate-at times must lie within --duration");
    }
    if args.with_2g && !args.sizes.contains(&2048) {
        args.sizes.push(2048);
    }
    let started = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let out = args.out.clone().unwrap_or_else(|| {
        lab::images::workspace_root()
            .join("target/harness")
            .join(started.to_string())
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;

    let hosts = if args.migrate_at.len() >= 2 { 3 } else { 2 };
    lab::install_signal_cleanup()?;
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {msg}",
    )?);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb.set_message(format!("bringing up a lab of {hosts} hosts"));
    let lab = Lab::up(LabOptions {
        hosts,
        ..Default::default()
    })?;
    let mut report = Report {
        started_unix: started,
        hosts,
        ..Default::default()
    };
    let result = run(&lab, &args, &mut report, &pb);
    pb.set_message("tearing the lab down");
    let down = lab.down();
    pb.finish_and_clear();
    // Write whatever was measured, even after an error.
    let written = write(&out, &mut report);
    result?;
    down?;
    written?;
    eprintln!("{}", std::fs::read_to_string(out.join("summary.md"))?);
    eprintln!("results in {}", out.display());
    Ok(())
}

fn run(lab: &Lab, args: &Args, report: &mut Report, pb: &ProgressBar) -> Result<()> {
    let bar = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos:>4}/{len} {msg}",
    )?;
    // UDP runs last: their conntrack entries keep the former hosts' forwards for 120 s.
    let (tcp, udp): (Vec<&String>, Vec<&String>) = args.mode.iter().partition(|m| *m == "tcp");
    iperf_runs(lab, args, &tcp, report, pb, &bar)?;
    if args.forwarded > 0 {
        pb.set_style(bar.clone());
        pb.set_length(2 * args.forwarded as u64);
        pb.set_position(0);
        report.forwarded = Some(harness::forwarded::measure(lab, args.forwarded, pb)?);
    }
    if args.sensitivity {
        pb.set_style(bar.clone());
        pb.set_length(
            (args.rounds * args.sizes.len() * args.dirty.len() * args.sweep_modes.len()) as u64,
        );
        pb.set_position(0);
        report.sensitivity = runs::sensitivity(
            lab,
            &args.sizes,
            &args.dirty,
            &args.sweep_modes,
            args.rounds,
            pb,
        )?;
    }
    if args.echo > 0 {
        pb.set_style(bar.clone());
        if args.baseline {
            pb.set_length(args.echo as u64);
            pb.set_position(0);
            report.echo_baseline = runs::echo_baseline(lab, args.echo, pb)?;
        }
        pb.set_length(args.echo as u64);
        pb.set_position(0);
        (report.echo, report.echo_long_lived) = runs::echo_series(lab, args.echo, pb)?;
    }
    iperf_runs(lab, args, &udp, report, pb, &bar)
}

fn iperf_runs(
    lab: &Lab,
    args: &Args,
    modes: &[&String],
    report: &mut Report,
    pb: &ProgressBar,
    bar: &ProgressStyle,
) -> Result<()> {
    for mode in modes {
        let plan = IperfPlan {
            mode: mode.to_string(),
            duration: args.duration,
            migrate_at: args.migrate_at.clone(),
            udp_rate: args.udp_rate.clone(),
            udp_len: args.udp_len,
        };
        // The baseline first: it leaves no agent state (routes, forwards) behind.
        let methods: &[Method] = if args.baseline {
            &[Method::PodmanCheckpoint, Method::LiveMigrate]
        } else {
            &[Method::LiveMigrate]
        };
        for &method in methods {
            pb.set_style(bar.clone());
            pb.set_length(args.duration * 10);
            pb.set_position(0);
            pb.set_message(format!("{mode} {}: iperf3 running", method.label()));
            let port = 5201 + report.runs.len() as u16;
            let run = runs::iperf_run(lab, &plan, method, port, pb)?;
            report.runs.push(run);
        }
    }
    Ok(())
}

fn write(out: &std::path::Path, report: &mut Report) -> Result<()> {
    report.migrations = report
        .runs
        .iter()
        .map(|r| r.migrations.len())
        .sum::<usize>()
        + report.sensitivity.len()
        + report.echo.len();
    report.summarize_echo();
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(out.join("summary.md"), markdown(report))?;
    if !report.runs.is_empty() {
        harness::plot::throughput(&out.join("throughput.png"), &report.runs)?;
    }
    if !report.sensitivity.is_empty() {
        harness::plot::sensitivity(&out.join("sensitivity.png"), &report.sensitivity)?;
    }
    if !report.echo.is_empty() {
        harness::plot::outage_vs_freeze(&out.join("outage_vs_freeze.png"), &report.echo)?;
    }
    Ok(())
}
