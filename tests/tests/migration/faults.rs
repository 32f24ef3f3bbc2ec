//! The fault matrix: a migration h1 -> h2 of an echo service that counts (`tcp-echo` with
//! `COUNT_MS`), with a live TCP client, hit by one fault at one exact step. The step is
//! reached through the agents' test-only fault points (`common::fault`): the process
//! stops itself there (SIGSTOP), the fault is applied, and the process is let go on.
//!
//! Every cell asserts, with no manual step: never two running copies while it resolves;
//! exactly one copy runs, on the host the ownership model says, within 40 s; the counter
//! ran once, with no gap and no repeat; the client's connection survived unless the cut
//! link carried it; and nothing of the migration is left on either host.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lab::flow::FlowClient;
use lab::{wait_for, Lab};
use nix::sys::signal::Signal;

use super::{agent_client, answers, flow_survived, is_running};

/// Where the fault hits.
#[derive(Debug, Clone, Copy)]
enum Point {
    /// The container is checkpointed, nothing sent yet.
    Checkpoint,
    /// Part of the archive is on its way.
    Transfer,
    /// The restore request is sent; the destination restores.
    Restore,
    /// The destination owns the container and has not yet said so.
    RestoredUnheard,
    /// The source heard it, and has not switched the traffic yet.
    Switch,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillClient,
    TermClient,
    /// SIGKILL of h2's agent-server, started again 5 s later.
    KillDestination,
    /// The link between h1 and h2 is cut for 20 s.
    CutLink,
}

const POINTS: [Point; 5] = [
    Point::Checkpoint,
    Point::Transfer,
    Point::Restore,
    Point::RestoredUnheard,
    Point::Switch,
];
const FAULTS: [Fault; 4] = [
    Fault::KillClient,
    Fault::TermClient,
    Fault::KillDestination,
    Fault::CutLink,
];

/// Within this, exactly one copy runs once the fault hit.
const RESOLVED_WITHIN: Duration = Duration::from_secs(40);
const CUT_FOR: Duration = Duration::from_secs(20);

impl Point {
    /// `LM_FAULT` of the client, or `None` when the destination's agent stops instead.
    fn client_fault(self) -> Option<&'static str> {
        match self {
            Point::Checkpoint => Some("checkpointed:stop"),
            Point::Transfer => Some("transferring:stop"),
            Point::Restore => Some("restore-requested:stop"),
            Point::RestoredUnheard => None,
            Point::Switch => Some("switching:stop"),
        }
    }

    /// Where the container runs once the model resolved the fault: the destination once
    /// a restore was requested and it restored the container, the source before.
    fn owner(self) -> &'static str {
        match self {
            Point::Checkpoint | Point::Transfer => "h1",
            Point::Restore | Point::RestoredUnheard | Point::Switch => "h2",
        }
    }
}

/// One row per cell, for the log: what happened and how long recovery took.
pub fn fault_matrix(lab: &Lab) -> Result<()> {
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    // `LM_FAULT_CELLS=Restore/KillDestination,...` runs only those cells (to debug one).
    let only = std::env::var("LM_FAULT_CELLS").unwrap_or_default();
    let chosen = |cell: &str| only.is_empty() || only.split(',').any(|c| c == cell);
    let mut index = 0;
    for point in POINTS {
        for fault in FAULTS {
            index += 1;
            if !chosen(&format!("{point:?}/{fault:?}")) {
                continue;
            }
            let outcome = run_cell(lab, index, point, Some(fault));
            report(
                &mut rows,
                &mut failures,
                format!("{point:?} / {fault:?}"),
                outcome,
            );
        }
    }
    index += 1;
    if chosen("Restore/RestoreFails") {
        let outcome = run_cell(lab, index, Point::Restore, None);
        report(
            &mut rows,
            &mut failures,
            "Restore / restore fails on h2".into(),
            outcome,
        );
    }
    eprintln!("fault matrix:\n{}", rows.join("\n"));
    ensure!(
        failures.is_empty(),
        "cells failed:\n{}",
        failures.join("\n")
    );
    Ok(())
}

fn report(
    rows: &mut Vec<String>,
    failures: &mut Vec<String>,
    cell: String,
    outcome: Result<Duration>,
) {
    match outcome {
        Ok(took) => rows.push(format!(
            "  {cell:<36} passed, resolved in {:.1} s",
            took.as_secs_f64()
        )),
        Err(e) => {
            rows.push(format!("  {cell:<36} FAILED: {e:#}"));
            failures.push(format!("{cell}: {e:#}"));
        }
    }
}

/// `fault` `None`: the restore fails on the destination.
fn run_cell(lab: &Lab, index: u16, point: Point, fault: Option<Fault>) -> Result<Duration> {
    let name = format!("fm{index}");
    let port = 5300 + index;
    let published = format!("{port}:5000");
    lab.run_container(
        "h1",
        &name,
        &["-p", &published, "-e", "COUNT_MS=50"],
        "localhost/tcp-echo",
        &[],
    )?;
    let ip = lab.container_ip("h1", &name)?;
    let result = cell(lab, &name, port, point, fault);
    // Whatever happened: no stopped process, no cut, no armed fault, no container left.
    if let Ok(Some(pid)) = lab.agent_pid("h2") {
        lab::procfs::kill(pid, Signal::SIGCONT);
    }
    let _ = lab.join_link();
    let _ = lab.clear_agent_fault("h2");
    let _ = lab.start_agent("h2");
    for host in ["h1", "h2"] {
        let _ = lab.podman(host, &["rm", "-f", "-t", "0", &name]);
    }
    let (took, flow_closed) = result?;
    nothing_left(lab, &ip, port, flow_closed)?;
    Ok(took)
}

/// Returns how long recovery took, and whether the client's flow survived (and so was
/// closed in order).
fn cell(
    lab: &Lab,
    name: &str,
    port: u16,
    point: Point,
    fault: Option<Fault>,
) -> Result<(Duration, bool)> {
    let addr = format!("10.77.0.11:{port}");
    lab.wait_tcp("client", addr.parse()?, Duration::from_secs(10))?;
    let flow = FlowClient::start(lab, "tcp", &addr, None)?;
    let before = counted(lab, "h1", name)?;

    match fault {
        Some(_) if point.client_fault().is_none() => {
            lab.inject_agent_fault("h2", "restored:stop")?
        }
        None => lab.inject_agent_fault("h2", "restore:fail")?,
        Some(_) => {}
    }
    let client = Client::start(lab, name, fault.and(point.client_fault()))?;
    let hit = Instant::now();
    if let Some(fault) = fault {
        let stopped_pid = match point.client_fault() {
            Some(_) => client.pid,
            None => destination_pid(lab)?,
        };
        wait_for(
            &format!("the fault point of {point:?}"),
            Duration::from_secs(60),
            || Ok(lab::procfs::is_stopped(stopped_pid)),
        )?;
        if matches!(point, Point::Restore)
            && matches!(fault, Fault::KillDestination | Fault::CutLink)
        {
            // Let the restore under way finish first, so the cell is the same every run.
            wait_for("h2 to run the container", Duration::from_secs(30), || {
                is_running(lab, "h2", name)
            })?;
        }
        apply(lab, fault, stopped_pid, client.pid)?;
    }
    let owner = if fault.is_none() { "h1" } else { point.owner() };
    let other = if owner == "h1" { "h2" } else { "h1" };
    // Never two copies; within the bound, one copy where the model says, and both hosts
    // done with the migration.
    let bound = RESOLVED_WITHIN
        + if matches!(fault, Some(Fault::CutLink)) {
            CUT_FOR
        } else {
            Duration::ZERO
        };
    let deadline = hit + bound;
    let mut cut_restored = !matches!(fault, Some(Fault::CutLink));
    let took = loop {
        let (here, there) = (is_running(lab, owner, name)?, is_running(lab, other, name)?);
        ensure!(
            !(here && there),
            "two copies run: on {owner} and on {other}"
        );
        if !cut_restored && hit.elapsed() >= CUT_FOR {
            lab.join_link()?;
            cut_restored = true;
        }
        if here && cut_restored && migration_settled(lab)? {
            break hit.elapsed();
        }
        if Instant::now() > deadline {
            let left = leftovers(lab)?;
            let seen = client.finish()?;
            bail!(
                "not resolved after {:.0} s: {owner} runs it: {here}, {other} runs it: {there}; left: {left}\n{seen}",
                hit.elapsed().as_secs_f64(),
            );
        }
        // Polls often enough to see two copies running at once.
        std::thread::sleep(Duration::from_millis(200));
    };
    let client_log = client.finish()?;
    if took > bound {
        bail!("resolved only after {:.1} s", took.as_secs_f64());
    }
    let after = counted(lab, owner, name)?;
    ensure!(
        after.last() > before.last(),
        "the counter on {owner} did not go on past {:?}",
        before.last()
    );
    let flow = flow_survived(flow);
    let link_carried_it = matches!(fault, Some(Fault::CutLink)) && owner == "h2";
    let survived = match flow {
        Ok(_) => true,
        Err(e) if link_carried_it => {
            eprintln!("{name}: the flow did not survive the cut: {e:#}");
            false
        }
        Err(e) => return Err(e.context(client_log)),
    };
    Ok((took, survived))
}

fn destination_pid(lab: &Lab) -> Result<u32> {
    lab.agent_pid("h2")?
        .context("agent-server on h2 is not running")
}

/// Applies `fault` while the process `stopped` waits at the fault point.
fn apply(lab: &Lab, fault: Fault, stopped: u32, client: u32) -> Result<()> {
    let cont = |pid| lab::procfs::kill(pid, Signal::SIGCONT);
    match fault {
        Fault::KillClient => {
            lab::procfs::kill(client, Signal::SIGKILL);
            cont(stopped);
        }
        Fault::TermClient => {
            lab::procfs::kill(client, Signal::SIGTERM);
            cont(stopped);
        }
        Fault::KillDestination => {
            lab.kill_agent("h2")?;
            std::thread::sleep(Duration::from_secs(5)); // the fault is 5 s of downtime
            lab.start_agent("h2")?;
            cont(client);
        }
        Fault::CutLink => {
            lab.cut_link("h1", "h2")?;
            cont(stopped);
        }
    }
    Ok(())
}

/// Neither host has a journal, session or archive of the migration left.
fn migration_settled(lab: &Lab) -> Result<bool> {
    Ok(leftovers(lab)?.is_empty())
}

/// What either host keeps of a migration: `host/dir: entries`, one per line.
fn leftovers(lab: &Lab) -> Result<String> {
    let mut left = String::new();
    for (host, dirs) in [
        ("h1", ["journals", "outgoing"]),
        ("h2", ["sessions", "incoming"]),
    ] {
        for dir in dirs {
            let entries = lab.agent_state(host, dir)?;
            if !entries.is_empty() {
                left.push_str(&format!("{host}/{dir}: {}\n", entries.replace('\n', " ")));
            }
        }
    }
    Ok(left)
}

/// Once the container is gone: no journal, session, archive, forward record, route, port
/// forward or live conntrack entry of it on either host.
/// Conntrack entries are checked after a flow that was closed in order; a broken one's
/// linger until the kernel times them out.
fn nothing_left(lab: &Lab, ip: &str, port: u16, flow_closed: bool) -> Result<()> {
    wait_for("h1 to drop its forwarding", Duration::from_secs(20), || {
        Ok(lab.agent_state("h1", "forwards")?.is_empty())
    })?;
    ensure!(
        migration_settled(lab)?,
        "journals, sessions or archives left"
    );
    for host in ["h1", "h2"] {
        let routes = lab.exec_stdout(host, &["ip", "route", "show", "table", "main"])?;
        ensure!(
            !routes
                .lines()
                .any(|r| r.split_whitespace().any(|w| w == ip)),
            "{host} keeps a route of {ip}: {routes}"
        );
        let tracked = lab.exec_stdout(
            host,
            &["conntrack", "-L", "-p", "tcp", "--state", "ESTABLISHED"],
        )?;
        ensure!(
            !flow_closed || !tracked.lines().any(|l| l.contains(&format!("={ip} "))),
            "{host} keeps established conntrack entries of {ip}: {tracked}"
        );
        let nft = lab.exec_unchecked(host, &["nft", "list", "table", "inet", "live_migrate"])?;
        let nft = String::from_utf8_lossy(&nft.stdout);
        ensure!(
            !nft.contains(&format!("dport {port} ")),
            "{host} still forwards port {port}: {nft}"
        );
        let held = lab.hold_rules(host)?;
        ensure!(held.is_empty(), "{host} still holds packets: {held}");
        let (_, stdout, _) = agent_client(lab, host, &["status", "--json"])?;
        let status: serde_json::Value = serde_json::from_str(&stdout)?;
        ensure!(
            status["migrations"].as_array().is_some_and(Vec::is_empty)
                && status["forwards"].as_array().is_some_and(Vec::is_empty),
            "{host}'s status still lists the migration: {status}"
        );
    }
    Ok(())
}

/// The `count N` lines of the container's log: one run, no gap, no repeat.
fn counted(lab: &Lab, host: &str, name: &str) -> Result<Vec<u64>> {
    let mut values = Vec::new();
    wait_for(
        &format!("{name} on {host} to count"),
        Duration::from_secs(10),
        || {
            values = lab
                .podman(host, &["logs", name])?
                .lines()
                .filter_map(|l| l.strip_prefix("count "))
                .map(|n| n.trim().parse().context("count line"))
                .collect::<Result<Vec<u64>>>()?;
            Ok(values.len() >= 3)
        },
    )?;
    for (i, n) in values.iter().enumerate() {
        ensure!(
            *n == i as u64 + 1,
            "the counter on {host} ran more than once or skipped: {values:?}"
        );
    }
    Ok(values)
}

/// `agent-client` migrating the cell's container, its stderr collected.
pub(super) struct Client {
    child: Child,
    pub(super) pid: u32,
    stderr: std::thread::JoinHandle<String>,
}

impl Client {
    /// A stop-copy through the archive: the matrix's points are the archive's steps (a
    /// streamed stop-copy has its own tests, in `streamed`).
    fn start(lab: &Lab, name: &str, fault: Option<&str>) -> Result<Self> {
        Self::start_with(lab, name, fault, &["--mode", "stop-copy", "--archive"])
    }

    /// [`Self::start_with`] with `LM_FAULT=POINT:stop`, once the client has stopped at
    /// fault point `point`.
    pub(super) fn stopped_at(lab: &Lab, name: &str, point: &str, options: &[&str]) -> Result<Self> {
        let client = Self::start_with(lab, name, Some(&format!("{point}:stop")), options)?;
        wait_for(
            &format!("the fault point {point}"),
            Duration::from_secs(60),
            || Ok(lab::procfs::is_stopped(client.pid)),
        )?;
        Ok(client)
    }

    /// [`Self::start`] with more options for `agent-client`.
    pub(super) fn start_with(
        lab: &Lab,
        name: &str,
        fault: Option<&str>,
        options: &[&str],
    ) -> Result<Self> {
        let mut args = vec!["agent-client", "--container", name, "--dest", "h2"];
        args.extend_from_slice(options);
        let mut command = lab.command("h1", &args)?;
        if let Some(fault) = fault {
            command.env("LM_FAULT", fault);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("start agent-client")?;
        let pipe = child.stderr.take().expect("piped");
        let stderr = std::thread::spawn(move || {
            let mut seen = String::new();
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                seen.push_str(&line);
                seen.push('\n');
            }
            seen
        });
        // nsenter execs agent-client: the child is the client itself.
        let pid = child.id();
        Ok(Self { child, pid, stderr })
    }

    /// Waits for the client to end (killing it if it has not after 60 s); returns what
    /// it printed.
    fn finish(self) -> Result<String> {
        self.finish_with_status().map(|(_, seen)| seen)
    }

    /// [`Self::finish`], and whether it succeeded.
    pub(super) fn finish_with_status(mut self) -> Result<(bool, String)> {
        lab::cmd::wait_timeout(&mut self.child, Duration::from_secs(60))?;
        let _ = self.child.kill();
        let status = self.child.wait()?;
        let seen = self.stderr.join().unwrap_or_default();
        eprintln!("agent-client ({status}):\n{seen}");
        Ok((status.success(), seen))
    }
}

/// Two migrations of one container at once: the second is refused at once, the first
/// goes on.
pub fn second_migration_is_refused(lab: &Lab) -> Result<()> {
    let name = "twice";
    lab.run_container(
        "h1",
        name,
        &["-e", "COUNT_MS=50"],
        "localhost/tcp-echo",
        &[],
    )?;
    let first = Client::start(lab, name, Some("checkpointed:stop"))?;
    let outcome = (|| {
        wait_for(
            "the first migration to freeze",
            Duration::from_secs(60),
            || Ok(lab::procfs::is_stopped(first.pid)),
        )?;
        let started = Instant::now();
        let (ok, _, stderr) = agent_client(lab, "h1", &["--container", name, "--dest", "h3"])?;
        ensure!(!ok, "a second migration of {name} ran");
        ensure!(
            stderr.contains("is migrating now"),
            "the second migration was not refused for the first: {stderr}"
        );
        eprintln!(
            "refused after {:.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        anyhow::Ok(())
    })();
    lab::procfs::kill(first.pid, Signal::SIGCONT);
    let seen = first.finish()?;
    outcome?;
    ensure!(
        is_running(lab, "h2", name)?,
        "the first migration did not finish: {seen}"
    );
    ensure!(!is_running(lab, "h3", name)?, "h3 runs {name} too");
    counted(lab, "h2", name)?;
    lab.podman("h2", &["rm", "-f", "-t", "0", name])?;
    Ok(())
}

/// A container that moved h1 -> h2 fails to come back, twice: the client fails right
/// after the checkpoint (h1 has its flows already: they go beside the checkpoint), then
/// h1's restore fails. Each time it runs on at h2, and h1 forwards it as before the
/// attempt: its address is routed into the tunnel again, not blackholed or routed locally;
/// a flow that enters h1 keeps going, and so do new connections to h1's published port.
pub fn failed_return_keeps_the_former_host_forwarding(lab: &Lab) -> Result<()> {
    let name = "returner";
    lab.run_container("h1", name, &["-p", "5120:5000"], "localhost/tcp-echo", &[])?;
    let ip = lab.container_ip("h1", name)?;
    let addr = "10.77.0.11:5120";
    lab.wait_tcp("client", addr.parse()?, Duration::from_secs(10))?;
    let routed = |lab: &Lab| -> Result<String> {
        let routes = lab.exec_stdout("h1", &["ip", "route", "show", "table", "main"])?;
        Ok(routes
            .lines()
            .find(|r| r.split_whitespace().next() == Some(ip.as_str()))
            .unwrap_or_default()
            .to_string())
    };
    let outcome = (|| {
        super::migrate(lab, "h1", name, "h2")?;
        let before = routed(lab)?;
        ensure!(
            before.contains(" dev lmwg-"),
            "h1 does not route {ip} into a tunnel after the move: {before:?}"
        );
        for (client_fault, agent_fault) in [
            (Some("checkpointed:fail"), None),
            (None, Some("restore:fail")),
        ] {
            let flow = FlowClient::start(lab, "tcp", addr, None)?;
            if let Some(fault) = agent_fault {
                lab.inject_agent_fault("h1", fault)?;
            }
            let mut command =
                lab.command("h2", &["agent-client", "--container", name, "--dest", "h1"])?;
            if let Some(fault) = client_fault {
                command.env("LM_FAULT", fault);
            }
            let out = command.output()?;
            let _ = lab.clear_agent_fault("h1");
            let stderr = String::from_utf8_lossy(&out.stderr);
            eprintln!("[h2] agent-client ({client_fault:?} {agent_fault:?}):\n{stderr}");
            ensure!(
                !out.status.success() && stderr.contains("injected fault"),
                "the return did not fail as injected: {stderr}"
            );
            ensure!(is_running(lab, "h2", name)?, "{name} no longer runs on h2");
            ensure!(!is_running(lab, "h1", name)?, "{name} runs on h1 as well");
            let after = routed(lab)?;
            ensure!(
                after == before,
                "h1 routes {ip} as {after:?} after the failed return, not {before:?}"
            );
            ensure!(
                !lab.agent_state("h1", "forwards")?.is_empty(),
                "h1 dropped its forward record"
            );
            answers(lab, "tcp", addr)?;
            flow_survived(flow)?;
        }
        Ok(())
    })();
    for host in ["h1", "h2"] {
        let _ = lab.podman(host, &["rm", "-f", "-t", "0", name]);
    }
    outcome
}
