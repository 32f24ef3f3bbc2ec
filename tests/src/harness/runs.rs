//! Running the workloads in a lab: iperf3 with migrations (live-migrate or plain podman
//! checkpoint/restore), the memhog sweep and the echo-outage series.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use lab::flow::FlowClient;
use lab::Lab;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::analysis::{direction_stats, parse_iperf, DirectionStats, Series};

/// How a container is moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// `agent-client` (this project).
    LiveMigrate,
    /// `podman container checkpoint --export` + `restore --import`, nothing else.
    PodmanCheckpoint,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::LiveMigrate => "live-migrate",
            Method::PodmanCheckpoint => "podman checkpoint/restore",
        }
    }
}

/// What one migration took, measured from outside.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Migration {
    pub from: String,
    pub to: String,
    /// Wall clock, seconds since the iperf3 client started.
    pub start_s: f64,
    pub end_s: f64,
    pub ok: bool,
    pub error: Option<String>,
    pub freeze_to_resume_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub checkpoint_bytes: Option<u64>,
    /// The agent's JSON report (live-migrate only).
    pub agent_report: Option<Value>,
}

/// Runs one migration of `container` and times it.
pub fn migrate(lab: &Lab, method: Method, container: &str, from: &str, to: &str) -> Migration {
    migrate_with(lab, method, container, from, to, &[])
}

/// [`migrate`] with more options for `agent-client` (live-migrate only).
pub fn migrate_with(
    lab: &Lab,
    method: Method,
    container: &str,
    from: &str,
    to: &str,
    options: &[&str],
) -> Migration {
    let t = Instant::now();
    let result = match method {
        Method::LiveMigrate => agent_migrate(lab, container, from, to, options),
        Method::PodmanCheckpoint => podman_migrate(lab, container, from, to),
    };
    let wall_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut m = Migration {
        from: from.into(),
        to: to.into(),
        start_s: 0.0,
        end_s: 0.0,
        ok: result.is_ok(),
        error: None,
        freeze_to_resume_ms: None,
        total_ms: Some(wall_ms),
        checkpoint_bytes: None,
        agent_report: None,
    };
    match result {
        Ok(Some(report)) => {
            m.freeze_to_resume_ms = report["freeze_to_resume_ms"].as_f64();
            m.total_ms = report["total_ms"].as_f64().or(m.total_ms);
            m.checkpoint_bytes = report["checkpoint_bytes"].as_u64();
            m.agent_report = Some(report);
        }
        Ok(None) => {}
        Err(e) => m.error = Some(format!("{e:#}")),
    }
    m
}

fn agent_migrate(
    lab: &Lab,
    container: &str,
    from: &str,
    to: &str,
    options: &[&str],
) -> Result<Option<Value>> {
    let mut args = vec![
        "agent-client",
        "--container",
        container,
        "--dest",
        to,
        "--json",
    ];
    args.extend_from_slice(options);
    let out = lab.exec_timeout(from, &args, Duration::from_secs(600))?;
    if !out.status.success() {
        bail!(
            "agent-client {from} -> {to} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let report = serde_json::from_slice(&out.stdout).context("agent-client report")?;
    Ok(Some(report))
}

/// The usual script: checkpoint with export on the source, restore from the archive on the
/// destination (/tmp is shared by the lab hosts), no network handling at all.
fn podman_migrate(lab: &Lab, container: &str, from: &str, to: &str) -> Result<Option<Value>> {
    let archive = format!("/tmp/lm-harness-{}-{container}.tar.gz", std::process::id());
    let _ = std::fs::remove_file(&archive);
    let t = Instant::now();
    let out = lab.exec_timeout(
        from,
        &[
            "podman",
            "container",
            "checkpoint",
            "--tcp-established",
            "--export",
            &archive,
            container,
        ],
        Duration::from_secs(600),
    )?;
    if !out.status.success() {
        bail!(
            "podman checkpoint on {from}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let size = std::fs::metadata(&archive).map(|m| m.len()).ok();
    let _ = lab.exec_unchecked(from, &["podman", "rm", "-f", "-t", "0", container]);
    let out = lab.exec_timeout(
        to,
        &[
            "podman",
            "container",
            "restore",
            "--tcp-established",
            "--import",
            &archive,
        ],
        Duration::from_secs(600),
    )?;
    let _ = std::fs::remove_file(&archive);
    if !out.status.success() {
        bail!(
            "podman restore on {to}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // The container does not run between the start of the checkpoint and the end of the
    // restore: that is this method's freeze-to-resume.
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    Ok(Some(serde_json::json!({
        "freeze_to_resume_ms": ms,
        "total_ms": ms,
        "checkpoint_bytes": size,
    })))
}

/// Per-migration result of an iperf3 run.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationResult {
    #[serde(flatten)]
    pub migration: Migration,
    /// client -> server
    pub up: DirectionStats,
    /// server -> client (bidirectional runs)
    pub down: Option<DirectionStats>,
    /// The iperf3 test went on after this migration: bytes flowed again in every
    /// direction and iperf3 ended without error.
    pub survived: bool,
}

/// One iperf3 run with migrations.
#[derive(Clone, Debug, Serialize)]
pub struct IperfRun {
    pub mode: String,
    pub method: Method,
    pub duration_s: u64,
    pub iperf_error: Option<String>,
    /// iperf3 exchanged its final results (the control connection survived too).
    pub completed: bool,
    pub migrations: Vec<MigrationResult>,
    pub series: Series,
}

/// Settings of an iperf3 run.
#[derive(Clone, Debug)]
pub struct IperfPlan {
    pub mode: String,
    pub duration: u64,
    pub migrate_at: Vec<f64>,
    pub udp_rate: String,
    pub udp_len: u32,
}

const IPERF_NAME: &str = "iperf";

/// Starts the iperf3 server on h1, runs the client from the client namespace, migrates at
/// the planned times along h1 -> h2 -> h3 ..., and analyses iperf3's intervals.
/// `port` is the port published on h1 (a fresh one per run: a former host keeps forwarding
/// the previous run's port until its agent sweeps the record).
pub fn iperf_run(
    lab: &Lab,
    plan: &IperfPlan,
    method: Method,
    port: u16,
    pb: &ProgressBar,
) -> Result<IperfRun> {
    for h in lab.hosts() {
        let _ = lab.exec_unchecked(&h.name, &["podman", "rm", "-f", "-t", "0", IPERF_NAME]);
    }
    wait_swept(lab, pb)?;
    let tcp = format!("{port}:5201");
    let udp = format!("{port}:5201/udp");
    lab.run_container(
        "h1",
        IPERF_NAME,
        &["-p", &tcp, "-p", &udp],
        "localhost/iperf3",
        // JSON and 0.1 s intervals on the server too, for --get-server-output.
        &["/usr/bin/iperf3", "-s", "-p", "5201", "-J", "-i", "0.1"],
    )?;
    lab.wait_tcp(
        "client",
        format!("10.77.0.11:{port}").parse()?,
        Duration::from_secs(15),
    )?;
    // The readiness probe above was a connection iperf3 may still be tearing down.
    std::thread::sleep(Duration::from_millis(300));
    let duration = plan.duration.to_string();
    let port_s = port.to_string();
    let mut args: Vec<&str> = vec![
        "iperf3",
        "-c",
        "10.77.0.11",
        "-p",
        &port_s,
        "-t",
        &duration,
        "-i",
        "0.1",
        "-J",
        "--get-server-output",
        "--bidir",
    ];
    let len = plan.udp_len.to_string();
    if plan.mode == "udp" {
        args.extend(["-u", "-b", &plan.udp_rate, "-l", &len]);
    }
    let mut child = lab.spawn("client", &args)?;
    let t0 = Instant::now();
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let hosts: Vec<String> = lab.hosts().iter().map(|h| h.name.clone()).collect();
    let mut migrations = Vec::new();
    let mut at = 0usize;
    for (i, &when) in plan.migrate_at.iter().enumerate() {
        let from = hosts[at % hosts.len()].clone();
        let to = hosts[(at + 1) % hosts.len()].clone();
        sleep_until(t0, when, pb);
        pb.set_message(format!(
            "{} {}: {} {from} -> {to}",
            plan.mode,
            method.label(),
            i + 1
        ));
        let start = t0.elapsed().as_secs_f64();
        let mut m = migrate(lab, method, IPERF_NAME, &from, &to);
        m.start_s = start;
        m.end_s = t0.elapsed().as_secs_f64();
        pb.suspend(|| {
            eprintln!(
                "  {} {} {from} -> {to} at {start:.1}-{:.1} s: {}",
                plan.mode,
                method.label(),
                m.end_s,
                match (&m.error, m.freeze_to_resume_ms) {
                    (Some(e), _) => format!("FAILED: {e}"),
                    (None, Some(f)) => format!("freeze-to-resume {f:.0} ms"),
                    _ => "ok".into(),
                }
            )
        });
        if m.ok {
            at += 1;
        }
        migrations.push(m);
    }
    pb.set_message(format!(
        "{} {}: iperf3 running to the end",
        plan.mode,
        method.label()
    ));
    // Give iperf3 its duration plus slack; a test whose connection died may hang: SIGTERM
    // makes iperf3 print the JSON it has (with an "interrupt" error).
    let deadline = plan.duration as f64 + 10.0;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        let el = t0.elapsed().as_secs_f64();
        pb.set_position((el * 10.0) as u64);
        if el > deadline {
            // Our own child (nsenter exec'd iperf3): two seconds to print its JSON.
            lab::procfs::kill(child.id(), Signal::SIGTERM);
            let _ = lab::cmd::wait_timeout(&mut child, Duration::from_secs(2));
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        // Polls the client while the progress bar moves.
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let doc: Value = serde_json::from_str(out.trim()).unwrap_or_else(
        |_| serde_json::json!({"error": format!("no JSON from iperf3: {}", err.trim())}),
    );
    let parsed = parse_iperf(&doc);
    let test_end = plan.duration as f64;
    let bidir = parsed.series.bidirectional();
    let results = migrations
        .into_iter()
        .map(|m| {
            let up = direction_stats(&parsed.series, true, m.start_s, m.end_s, test_end);
            let down =
                bidir.then(|| direction_stats(&parsed.series, false, m.start_s, m.end_s, test_end));
            let survived = m.ok
                && parsed.error.is_none()
                && up.resumed
                && down.as_ref().is_none_or(|d| d.resumed);
            MigrationResult {
                migration: m,
                up,
                down,
                survived,
            }
        })
        .collect();
    for h in &hosts {
        let _ = lab.exec_unchecked(h, &["podman", "rm", "-f", "-t", "0", IPERF_NAME]);
    }
    Ok(IperfRun {
        mode: plan.mode.clone(),
        method,
        duration_s: plan.duration,
        iperf_error: parsed.error,
        completed: parsed.completed,
        migrations: results,
        series: parsed.series,
    })
}

/// Waits until no host keeps forwarding state for a container that left (the agents sweep
/// records every 5 s once no flow passes), so that a new container on a former host is not
/// shadowed by a route into a tunnel.
pub fn wait_swept(lab: &Lab, pb: &ProgressBar) -> Result<()> {
    let t = Instant::now();
    loop {
        let mut left = Vec::new();
        for h in lab.hosts() {
            if !lab.agent_state(&h.name, "forwards")?.is_empty() {
                left.push(h.name.clone());
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        // UDP conntrack entries of a finished test live up to 120 s.
        if t.elapsed() > Duration::from_secs(150) {
            pb.suspend(|| {
                eprintln!("  warning: forward records still present on {left:?} after 150 s")
            });
            return Ok(());
        }
        pb.set_message(format!(
            "waiting for the agents to sweep forwards on {left:?}"
        ));
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn sleep_until(t0: Instant, at: f64, pb: &ProgressBar) {
    loop {
        let el = t0.elapsed().as_secs_f64();
        pb.set_position((el * 10.0) as u64);
        if el >= at {
            return;
        }
        std::thread::sleep(Duration::from_secs_f64((at - el).min(0.1)));
    }
}

/// How the sweep moves a memhog for `mode`: one of agent-client's `--mode` values,
/// `stop-copy-archive` (`--mode stop-copy --archive`: the memory in podman's archive), or
/// `podman` (plain podman checkpoint/restore: the baseline).
fn sweep_method(mode: &str) -> (Method, Vec<&str>) {
    match mode {
        "podman" => (Method::PodmanCheckpoint, Vec::new()),
        "stop-copy-archive" => (
            Method::LiveMigrate,
            vec!["--mode", "stop-copy", "--archive"],
        ),
        mode => (Method::LiveMigrate, vec!["--mode", mode]),
    }
}

/// One point of the memory sweep.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SensitivityPoint {
    pub mib: u64,
    pub dirty_percent: u64,
    /// `stop-copy` (streamed where the hosts can), `stop-copy-archive`, `post-copy` or
    /// `podman` ([`sweep_method`]).
    pub mode: String,
    /// Which pass over the whole sweep measured it (`--rounds`), from 0.
    #[serde(default)]
    pub round: usize,
    #[serde(flatten)]
    pub migration: Migration,
    /// Post-copy: from the start of the checkpoint until the last page was there.
    pub last_page_ms: Option<f64>,
    /// The archive and, post-copy, the pages fetched after the restore.
    pub bytes_moved: Option<u64>,
    /// memhog checked every page after the move (SIGUSR1).
    pub memory_intact: bool,
}

/// memhog of each size and dirty rate, migrated once in each mode per round, alternating
/// h1 -> h2, h2 -> h1; memhog checks its memory after every move. Each round passes over
/// the whole sweep, so that the machine's drift spreads over every cell rather than
/// falling on a few.
pub fn sensitivity(
    lab: &Lab,
    sizes: &[u64],
    dirty: &[u64],
    modes: &[String],
    rounds: usize,
    pb: &ProgressBar,
) -> Result<Vec<SensitivityPoint>> {
    wait_swept(lab, pb)?;
    let mut points = Vec::new();
    let mut on = "h1";
    for round in 0..rounds {
        for &mib in sizes {
            for &d in dirty {
                for mode in modes {
                    let other = if on == "h1" { "h2" } else { "h1" };
                    pb.set_message(format!(
                        "memhog {mib} MiB, {d}% dirty/s, {mode}: {on} -> {other}"
                    ));
                    let name = format!("memhog-{mib}-{d}");
                    let env_mib = format!("MEMHOG_MIB={mib}");
                    let env_d = format!("MEMHOG_DIRTY_PERCENT={d}");
                    lab.run_container(
                        on,
                        &name,
                        &["-e", &env_mib, "-e", &env_d],
                        "localhost/memhog",
                        &[],
                    )?;
                    wait_logged(lab, on, &name, "memhog: ready", 0)?;
                    // Let the dirtying run for a moment.
                    std::thread::sleep(Duration::from_secs(1));
                    let (method, options) = sweep_method(mode);
                    let m = migrate_with(lab, method, &name, on, other, &options);
                    let here = if m.ok { other } else { on };
                    let memory_intact = memhog_intact(lab, here, &name, mib).unwrap_or(false);
                    let report = m.agent_report.as_ref();
                    let last_page_ms = report.and_then(|r| r["last_page_ms"].as_f64());
                    let pages = report
                        .and_then(|r| r["pages"]["pages"].as_u64())
                        .unwrap_or(0);
                    let bytes_moved = m.checkpoint_bytes.map(|b| b + pages * 4096);
                    pb.suspend(|| {
                    eprintln!(
                        "  memhog {mib} MiB {d}% {mode}: {} freeze-to-resume {:.0} ms, total {:.0} ms, last page {:.0} ms, memory {}",
                        if m.ok { "ok" } else { "FAILED" },
                        m.freeze_to_resume_ms.unwrap_or(f64::NAN),
                        m.total_ms.unwrap_or(f64::NAN),
                        last_page_ms.unwrap_or(f64::NAN),
                        if memory_intact { "intact" } else { "NOT INTACT" },
                    )
                });
                    let _ = lab.exec_unchecked(here, &["podman", "rm", "-f", "-t", "0", &name]);
                    if m.ok {
                        on = other;
                    }
                    points.push(SensitivityPoint {
                        mib,
                        dirty_percent: d,
                        mode: mode.clone(),
                        round,
                        migration: m,
                        last_page_ms,
                        bytes_moved,
                        memory_intact,
                    });
                    pb.inc(1);
                }
            }
        }
    }
    Ok(points)
}

/// Waits until the container's log has more than `seen` lines containing `text`; returns
/// the first new one.
fn wait_logged(lab: &Lab, host: &str, name: &str, text: &str, seen: usize) -> Result<String> {
    let t = Instant::now();
    loop {
        let logs = lab.podman(host, &["logs", name])?;
        if let Some(line) = logs.lines().filter(|l| l.contains(text)).nth(seen) {
            return Ok(line.to_string());
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{name} on {host} never logged {text:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// memhog's own check of every page (SIGUSR1).
fn memhog_intact(lab: &Lab, host: &str, name: &str, mib: u64) -> Result<bool> {
    let seen = lab
        .podman(host, &["logs", name])?
        .matches("memhog: verify")
        .count();
    lab.podman(host, &["kill", "--signal", "USR1", name])?;
    let verdict = wait_logged(lab, host, name, "memhog: verify", seen)?;
    Ok(verdict.trim() == format!("memhog: verify ok pages={}", mib * 256))
}

/// One hop of the echo series: the longest pause the echo client saw, where the freeze
/// went, and the UDP datagrams lost at two rates when the UDP echo server took the same hop.
#[derive(Clone, Debug, Serialize)]
pub struct EchoHop {
    pub from: String,
    pub to: String,
    pub ok: bool,
    pub flow_ok: bool,
    /// The fresh connection's flowcheck summary (sent, received, error).
    pub flow: Value,
    pub max_pause_ms: f64,
    pub freeze_to_resume_ms: Option<f64>,
    pub total_ms: Option<f64>,
    /// The agent's `freeze_steps` for the TCP hop.
    pub freeze_steps: Option<Value>,
    /// Packets held at the source during the TCP hop.
    pub held_packets: Option<Value>,
    /// The UDP echo server's hop, watched at 50 and 6,250 datagrams/s.
    pub udp: Vec<UdpHop>,
}

/// A UDP flow through one migration of the UDP echo server.
#[derive(Clone, Debug, Serialize)]
pub struct UdpHop {
    pub rate_per_s: f64,
    pub ok: bool,
    pub error: Option<String>,
    pub sent: u64,
    pub lost: u64,
    /// Datagrams that came after newer ones (not lost).
    pub reordered: u64,
    /// That hop's freeze-to-resume.
    pub freeze_to_resume_ms: Option<f64>,
    /// Lost, as a share of the datagrams sent during the freeze (percent).
    pub lost_of_freeze_percent: Option<f64>,
}

/// Rates of the UDP flows of the echo series: 50/s (one every 20 ms), and 6,250/s.
pub const UDP_RATES: [f64; 2] = [50.0, 6250.0];

/// `tcp-echo` on h1 published as h1:5000 and `udp-echo` as h1:5001; `n` hops alternating
/// h1 -> h2 -> h1 ... Each TCP hop is watched by a fresh `flowcheck` connection to h1:5000
/// (20 ms between messages), and all of them by one long-lived connection; then the UDP
/// server takes the same hop, watched by one UDP flow per rate of [`UDP_RATES`]. Returns
/// the hops and the long-lived connection's summary.
pub fn echo_series(lab: &Lab, n: usize, pb: &ProgressBar) -> Result<(Vec<EchoHop>, Value)> {
    wait_swept(lab, pb)?;
    lab.publish_tcp("h1", "echo", "localhost/tcp-echo", 5000)?;
    lab.run_container(
        "h1",
        "uecho",
        &["-p", "5001:5001/udp"],
        "localhost/udp-echo",
        &[],
    )?;
    let long_lived = FlowClient::start(lab, "tcp", "10.77.0.11:5000", None)?;
    let mut hops = Vec::new();
    let (mut on, mut udp_on) = ("h1", "h1");
    for i in 0..n {
        let to = if on == "h1" { "h2" } else { "h1" };
        pb.set_message(format!("echo hop {}/{n}: {on} -> {to}", i + 1));
        let flow = FlowClient::start(lab, "tcp", "10.77.0.11:5000", None)?;
        // Measured: a second of the flow before the hop and 1.5 s after it.
        std::thread::sleep(Duration::from_secs(1));
        let m = migrate(lab, Method::LiveMigrate, "echo", on, to);
        std::thread::sleep(Duration::from_millis(1500));
        let summary = flow.finish()?;
        let udp = if udp_on == on {
            let (moved, udp) = udp_hop(lab, on, to)?;
            if moved {
                udp_on = to;
            }
            udp
        } else {
            Vec::new()
        };
        let report = m.agent_report.as_ref();
        let hop = EchoHop {
            from: on.into(),
            to: to.into(),
            ok: m.ok,
            flow_ok: summary["ok"] == true,
            max_pause_ms: summary["max_pause_ms"].as_f64().unwrap_or(f64::NAN),
            flow: summary,
            freeze_to_resume_ms: m.freeze_to_resume_ms,
            total_ms: m.total_ms,
            freeze_steps: report.map(|r| r["freeze_steps"].clone()),
            held_packets: report.map(|r| r["held_packets"].clone()),
            udp,
        };
        pb.suspend(|| {
            eprintln!(
                "  echo {on} -> {to}: migration {}, flow {}, longest pause {:.0} ms; udp lost {}",
                if hop.ok { "ok" } else { "FAILED" },
                if hop.flow_ok { "intact" } else { "BROKEN" },
                hop.max_pause_ms,
                hop.udp
                    .iter()
                    .map(|u| format!(
                        "{} at {}/s ({} reordered)",
                        u.lost, u.rate_per_s, u.reordered
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        if m.ok {
            on = to;
        }
        hops.push(hop);
        pb.inc(1);
    }
    let long_lived = long_lived.finish()?;
    let _ = lab.exec_unchecked(on, &["podman", "rm", "-f", "-t", "0", "echo"]);
    let _ = lab.exec_unchecked(udp_on, &["podman", "rm", "-f", "-t", "0", "uecho"]);
    Ok((hops, long_lived))
}

/// Migrates the UDP echo server `from` -> `to` under one flow per rate of [`UDP_RATES`];
/// returns whether it moved, and the flows.
fn udp_hop(lab: &Lab, from: &str, to: &str) -> Result<(bool, Vec<UdpHop>)> {
    let flows = UDP_RATES
        .iter()
        .map(|&rate| FlowClient::start_udp_at(lab, "10.77.0.11:5001", rate))
        .collect::<Result<Vec<_>>>()?;
    // Measured: a second of the flows before the hop and 1.5 s after it.
    std::thread::sleep(Duration::from_secs(1));
    let m = migrate(lab, Method::LiveMigrate, "uecho", from, to);
    std::thread::sleep(Duration::from_millis(1500));
    let mut hops = Vec::new();
    for (flow, rate) in flows.into_iter().zip(UDP_RATES) {
        let summary = flow.finish()?;
        let lost = summary["lost"].as_u64().unwrap_or(0);
        hops.push(UdpHop {
            rate_per_s: rate,
            ok: summary["ok"] == true,
            error: summary["error"].as_str().map(String::from),
            sent: summary["sent"].as_u64().unwrap_or(0),
            lost,
            reordered: summary["reordered"].as_u64().unwrap_or(0),
            freeze_to_resume_ms: m.freeze_to_resume_ms,
            lost_of_freeze_percent: m
                .freeze_to_resume_ms
                .map(|ms| 100.0 * lost as f64 / (rate * ms / 1e3)),
        });
    }
    Ok((m.ok, hops))
}

/// Plain podman checkpoint/restore of the TCP echo server, `n` times between h1 and h2:
/// the baseline freeze (no connection survives it).
pub fn echo_baseline(lab: &Lab, n: usize, pb: &ProgressBar) -> Result<Vec<Migration>> {
    lab.run_container("h1", "bare", &[], "localhost/tcp-echo", &[])?;
    let mut on = "h1";
    let mut done = Vec::new();
    for i in 0..n {
        let to = if on == "h1" { "h2" } else { "h1" };
        pb.set_message(format!("baseline hop {}/{n}: {on} -> {to}", i + 1));
        let m = migrate(lab, Method::PodmanCheckpoint, "bare", on, to);
        if m.ok {
            on = to;
        }
        done.push(m);
        pb.inc(1);
    }
    let _ = lab.exec_unchecked(on, &["podman", "rm", "-f", "-t", "0", "bare"]);
    Ok(done)
}
