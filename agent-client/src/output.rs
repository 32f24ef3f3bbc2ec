//! What the commands print on stdout: tables for people, JSON with `--json`.

use anyhow::Result;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, Color, Table};
use common::housekeeping::HostStatus;
use common::migration::phases::Survey;
use common::migration::MigrationReport;
use common::preflight::Severity;
use indicatif::{HumanBytes, HumanDuration};
use serde::Serialize;

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    table
}

fn json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn print_report(report: &MigrationReport, as_json: bool) -> Result<()> {
    if as_json {
        return json(report);
    }
    println!(
        "migrated {} ({}) to {}",
        report.container,
        &report.container_id[..12.min(report.container_id.len())],
        report.destination
    );
    let mut phases = table(&["phase", "ms"]);
    for t in &report.phases {
        phases.add_row(vec![t.phase.label().to_string(), format!("{:.0}", t.ms)]);
    }
    phases.add_row(vec![
        "freeze-to-resume".to_string(),
        format!("{:.0}", report.freeze_to_resume_ms),
    ]);
    phases.add_row(vec!["total".to_string(), format!("{:.0}", report.total_ms)]);
    println!("{phases}");
    println!(
        "checkpoint {}{}",
        HumanBytes(report.checkpoint_bytes),
        if report.image_transferred {
            ", image sent too"
        } else {
            ""
        }
    );
    for w in &report.warnings {
        println!("warning: {w}");
    }
    Ok(())
}

pub fn print_survey(survey: &Survey, as_json: bool) -> Result<()> {
    if as_json {
        return json(survey);
    }
    let c = &survey.container;
    println!(
        "{} ({}), {}, {} memory, address {}, ports {}",
        c.name,
        c.image_name,
        &c.id[..12.min(c.id.len())],
        survey
            .memory_bytes
            .map_or("unknown".to_string(), |m| HumanBytes(m).to_string()),
        c.ipv4().map_or("-".to_string(), |ip| ip.to_string()),
        ports(c),
    );
    let mut findings = table(&["host", "check", "", "detail", "fix"]);
    for f in &survey.findings {
        let (mark, color) = match f.severity {
            Severity::Ok => ("ok", Color::Green),
            Severity::Warning => ("warning", Color::Yellow),
            Severity::Problem => ("PROBLEM", Color::Red),
        };
        findings.add_row(vec![
            Cell::new(&f.host),
            Cell::new(&f.check),
            Cell::new(mark).fg(color),
            Cell::new(&f.detail),
            Cell::new(f.fix.as_deref().unwrap_or("")),
        ]);
    }
    println!("{findings}");
    Ok(())
}

pub fn ports(container: &common::podman::ContainerInfo) -> String {
    if container.published_ports.is_empty() {
        return "-".to_string();
    }
    container
        .published_ports
        .iter()
        .map(|p| format!("{}->{}/{}", p.host_port, p.container_port, p.protocol))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn print_status(status: &HostStatus, as_json: bool) -> Result<()> {
    if as_json {
        return json(status);
    }
    println!(
        "host {}: agent-server {}",
        status.hostname,
        if status.server_running {
            "running"
        } else {
            "not running"
        }
    );
    println!("\ntunnels");
    let mut tunnels = table(&[
        "interface",
        "addresses",
        "endpoint",
        "handshake",
        "rx / tx",
        "returning flows",
        "forwarded containers",
    ]);
    for t in &status.tunnels {
        tunnels.add_row(vec![
            t.interface.clone(),
            format!("{} -> {}", t.local_address, t.peer_address),
            t.endpoint.clone().unwrap_or_else(|| "-".into()),
            t.last_handshake_secs.map_or("never".into(), |s| {
                format!("{} ago", HumanDuration(std::time::Duration::from_secs(s)))
            }),
            format!("{} / {}", HumanBytes(t.rx_bytes), HumanBytes(t.tx_bytes)),
            t.returning_flows.to_string(),
            t.forwarded_containers.to_string(),
        ]);
    }
    println!("{tunnels}");
    println!("\nforwarded (containers that left this host)");
    let mut forwards = table(&[
        "container",
        "address",
        "next agent",
        "ports",
        "flows",
        "alive downstream",
    ]);
    for f in &status.forwards {
        forwards.add_row(vec![
            f.container.clone(),
            f.container_ip.to_string(),
            f.next_agent.clone(),
            f.ports.join(", "),
            f.flows.to_string(),
            yes_no(f.downstream_alive).into(),
        ]);
    }
    println!("{forwards}");
    println!("\nmigrations under way");
    let mut running = table(&["direction", "container", "agent running", "state"]);
    for m in &status.migrations {
        running.add_row(vec![
            format!("{:?}", m.direction).to_lowercase(),
            m.container.clone(),
            if m.running {
                "yes".into()
            } else {
                "no: run agent-client cleanup".to_string()
            },
            m.detail.clone(),
        ]);
    }
    println!("{running}");
    println!("\nlast migrations");
    let mut history = table(&[
        "ended",
        "direction",
        "container",
        "peer",
        "result",
        "freeze ms",
        "total ms",
    ]);
    for h in &status.history {
        history.add_row(vec![
            format!("{} ago", HumanDuration(age(h.at))),
            format!("{:?}", h.direction).to_lowercase(),
            h.container.clone(),
            h.peer.clone(),
            if h.succeeded {
                "moved".to_string()
            } else {
                format!("failed: {}", h.error.as_deref().unwrap_or("?"))
            },
            h.freeze_to_resume_ms
                .map_or("-".into(), |ms| format!("{ms:.0}")),
            h.total_ms.map_or("-".into(), |ms| format!("{ms:.0}")),
        ]);
    }
    println!("{history}");
    Ok(())
}

pub fn print_cleanup(done: &[String], as_json: bool) -> Result<()> {
    if as_json {
        return json(&done);
    }
    if done.is_empty() {
        println!("nothing to clean up");
    }
    for line in done {
        println!("{line}");
    }
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn age(unix_secs: u64) -> std::time::Duration {
    let then = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_secs);
    then.elapsed().unwrap_or_default()
}
