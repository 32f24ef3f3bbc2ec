//! Steady throughput of the forwarded path (`harness --forwarded N`): iperf3 `--bidir` from
//! the client to a port published on h1, N runs straight to the container on h1, then N
//! runs after it moved to h2, when every byte crosses h1's WireGuard tunnel.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use lab::Lab;
use serde::Serialize;
use serde_json::Value;

use super::analysis::{spread, Spread};
use super::runs::{migrate, wait_swept, Method, Migration};

/// Length of one iperf3 run: long enough for TCP to reach its steady rate.
pub const SECONDS: u64 = 10;
const NAME: &str = "iperf-fwd";
const PORT: u16 = 5299;

/// Per-run throughput of one path, Gbit/s; up = client -> container.
#[derive(Debug, Default, Serialize)]
pub struct PathRuns {
    pub up_gbps: Vec<f64>,
    pub down_gbps: Vec<f64>,
}

impl PathRuns {
    /// `| path | up p50 | up worst | down p50 | down worst | runs |`: worst is the slowest run.
    fn row(&self, path: &str) -> String {
        let cells = |v: &[f64]| match spread(v) {
            Some(Spread { p50, n, .. }) => {
                let worst = v.iter().copied().fold(f64::INFINITY, f64::min);
                (format!("{p50:.2} | {worst:.2}"), n)
            }
            None => ("- | -".into(), 0),
        };
        let (up, n) = cells(&self.up_gbps);
        let (down, _) = cells(&self.down_gbps);
        format!("| {path} | {up} | {down} | {n} |")
    }
}

/// What `--forwarded` measured.
#[derive(Debug, Default, Serialize)]
pub struct Forwarded {
    /// Which WireGuard served h1's tunnel: `kernel`, or the userspace daemon's version.
    pub tunnel: String,
    pub seconds: u64,
    /// Before the move: client -> h1 -> container on h1 (veths only).
    pub direct: PathRuns,
    /// After the move: client -> h1 -> tunnel -> h2 -> container.
    pub forwarded: PathRuns,
    pub migration: Option<Migration>,
}

impl Forwarded {
    /// The summary's section.
    pub fn markdown(&self) -> String {
        format!(
            "## Forwarded path, steady\n\niperf3 `--bidir`, {} s per run, from the client to h1:{PORT}; \
             Gbit/s per direction (up = client -> container), worst = the slowest run. Tunnel: {}.\n\n\
             | path | up p50 | up worst | down p50 | down worst | runs |\n|---|---|---|---|---|---|\n{}\n{}\n",
            self.seconds,
            if self.tunnel.is_empty() { "-" } else { &self.tunnel },
            self.direct.row("direct, container on h1"),
            self.forwarded.row("forwarded, container moved to h2"),
        )
    }
}

/// Runs the measurement; the container is removed afterwards, whatever happened.
pub fn measure(lab: &Lab, runs: usize, pb: &ProgressBar) -> Result<Forwarded> {
    wait_swept(lab, pb)?;
    let mapping = format!("{PORT}:5201");
    lab.run_container(
        "h1",
        NAME,
        &["-p", &mapping],
        "localhost/iperf3",
        &["/usr/bin/iperf3", "-s", "-p", "5201"],
    )?;
    let result = measure_placed(lab, runs, pb);
    for h in lab.hosts() {
        let _ = lab.exec_unchecked(&h.name, &["podman", "rm", "-f", "-t", "0", NAME]);
    }
    result
}

fn measure_placed(lab: &Lab, runs: usize, pb: &ProgressBar) -> Result<Forwarded> {
    let addr = format!("10.77.0.11:{PORT}").parse()?;
    lab.wait_tcp("client", addr, Duration::from_secs(15))?;
    let mut report = Forwarded {
        seconds: SECONDS,
        ..Default::default()
    };
    for i in 0..runs {
        pb.set_message(format!("direct path, run {}/{runs}", i + 1));
        bidir(lab, &mut report.direct)?;
        pb.inc(1);
    }
    pb.set_message("moving the iperf3 server h1 -> h2");
    let moved = migrate(lab, Method::LiveMigrate, NAME, "h1", "h2");
    if !moved.ok {
        bail!(
            "moving {NAME} h1 -> h2: {}",
            moved.error.unwrap_or_default()
        );
    }
    report.migration = Some(moved);
    report.tunnel = tunnel_daemon(lab)?;
    for i in 0..runs {
        pb.set_message(format!("forwarded path, run {}/{runs}", i + 1));
        bidir(lab, &mut report.forwarded)?;
        pb.inc(1);
    }
    Ok(report)
}

/// One `iperf3 --bidir` run from the client; appends each direction's received rate.
fn bidir(lab: &Lab, into: &mut PathRuns) -> Result<()> {
    let port = PORT.to_string();
    let seconds = SECONDS.to_string();
    let args = [
        "iperf3",
        "-c",
        "10.77.0.11",
        "-p",
        &port,
        "-t",
        &seconds,
        "--bidir",
        "-J",
    ];
    let out = lab.exec_timeout("client", &args, Duration::from_secs(SECONDS + 30))?;
    let doc: Value = serde_json::from_slice(&out.stdout).context("iperf3's JSON")?;
    if !out.status.success() {
        bail!(
            "iperf3 failed: {}",
            doc["error"].as_str().unwrap_or("no message")
        );
    }
    let gbps = |key: &str| {
        doc["end"][key]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .with_context(|| format!("iperf3's JSON has no end.{key}"))
    };
    into.up_gbps.push(gbps("sum_received")?);
    into.down_gbps.push(gbps("sum_received_bidir_reverse")?);
    Ok(())
}

/// `kernel`, or `userspace: <version>` when a `wireguard-go` process runs in h1's network
/// namespace (the agents start one per tunnel where the kernel has no WireGuard).
fn tunnel_daemon(lab: &Lab) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let h1 = std::fs::metadata(&lab.host("h1")?.ns.netns_path)?.ino();
    let userspace = std::fs::read_dir("/proc")?.flatten().any(|p| {
        let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        let netns = std::fs::metadata(p.path().join("ns/net")).map(|m| m.ino());
        comm.trim() == "wireguard-go" && netns.ok() == Some(h1)
    });
    if !userspace {
        return Ok("kernel".into());
    }
    let version = lab.exec_stdout("h1", &["wireguard-go", "--version"])?;
    Ok(format!(
        "userspace: {}",
        version.lines().next().unwrap_or("wireguard-go")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_gives_the_median_and_the_slowest_run_of_each_direction() {
        let runs = PathRuns {
            up_gbps: vec![1.2, 0.7, 1.4],
            down_gbps: vec![1.0, 1.5, 1.3, 1.1],
        };
        assert_eq!(runs.row("p"), "| p | 1.20 | 0.70 | 1.20 | 1.00 | 3 |");
        assert_eq!(PathRuns::default().row("p"), "| p | - | - | - | - | 0 |");
    }
}
