//! What the commands print on stdout: tables for people, JSON with `--json`.

use anyhow::Result;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, Color, Table};
use common::housekeeping::HostStatus;
use common::migration::phases::Survey;
use common::migration::preflight::Severity;
use common::migration::{MigrationFailure, MigrationReport, Phase, Resolution};
use indicatif::{HumanBytes, HumanDuration};
use serde::Serialize;

use crate::drain::plan::{self, Moved, Placement};

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    table
}

/// Appends a line to a `String` (which cannot fail).
macro_rules! line {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Writes `text` to stdout. A reader that went away (`| head`) ends the output quietly.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn json(value: &impl Serialize) -> Result<()> {
    emit(&(serde_json::to_string_pretty(value)? + "\n"))
}

/// `--json` after a failed or aborted migration: where it failed, why, and what became of
/// the container (`resolution`, with its problems or warnings).
pub fn print_failure_json(failure: &MigrationFailure) -> Result<()> {
    #[derive(Serialize)]
    struct FailureJson<'a> {
        ok: bool,
        phase: Phase,
        error: String,
        #[serde(flatten)]
        resolution: &'a Resolution,
    }
    json(&FailureJson {
        ok: false,
        phase: failure.phase,
        error: format!("{:#}", failure.error),
        resolution: &failure.resolution,
    })
}

pub fn print_report(report: &MigrationReport, as_json: bool) -> Result<()> {
    if as_json {
        return json(report);
    }
    let mut out = String::new();
    line!(
        out,
        "migrated {} ({}) to {}",
        report.container,
        &report.container_id[..12.min(report.container_id.len())],
        report.destination
    );
    line!(
        out,
        "mode {} ({})",
        report.mode.mode.label(),
        report.mode.reason
    );
    let mut phases = table(&["phase", "ms"]);
    for t in &report.phases {
        phases.add_row(vec![t.phase.label().to_string(), format!("{:.0}", t.ms)]);
    }
    phases.add_row(vec![
        "freeze-to-resume".to_string(),
        format!("{:.0}", report.freeze_to_resume_ms),
    ]);
    if let Some(last) = report.last_page_ms {
        phases.add_row(vec![
            "until the last page".to_string(),
            format!("{last:.0}"),
        ]);
    }
    phases.add_row(vec!["total".to_string(), format!("{:.0}", report.total_ms)]);
    line!(out, "{phases}");
    line!(
        out,
        "checkpoint {}{}",
        HumanBytes(report.checkpoint_bytes),
        if report.image_transferred {
            ", image sent too"
        } else {
            ""
        }
    );
    for (place, hold) in [
        ("here", &report.held_packets),
        ("on the destination", &report.held_at_destination),
    ] {
        if let Some(hold) = hold {
            line!(
                out,
                "packets held {place} during the freeze: {}, dropped: {} (bound {})",
                hold.held,
                hold.dropped,
                hold.bound
            );
        }
    }
    for w in &report.warnings {
        line!(out, "warning: {w}");
    }
    emit(&out)
}

pub fn print_survey(survey: &Survey, as_json: bool) -> Result<()> {
    if as_json {
        return json(survey);
    }
    let mut out = String::new();
    let c = &survey.container;
    line!(
        out,
        "{} ({}), {}, {} memory, address {}, ports {}",
        c.name,
        c.image_name,
        &c.id[..12.min(c.id.len())],
        memory(survey.memory_bytes),
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
    line!(out, "{findings}");
    emit(&out)
}

pub fn ports(container: &common::engine::podman::ContainerInfo) -> String {
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
    let mut out = String::new();
    line!(
        out,
        "host {}: agent-server {}",
        status.hostname,
        if status.server_running {
            "running"
        } else {
            "not running"
        }
    );
    line!(out, "\ntunnels");
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
    line!(out, "{}", or_none(&tunnels, status.tunnels.is_empty()));
    line!(out, "\nforwarded (containers that left this host)");
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
    line!(out, "{}", or_none(&forwards, status.forwards.is_empty()));
    line!(out, "\nmigrations under way");
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
    line!(out, "{}", or_none(&running, status.migrations.is_empty()));
    line!(out, "\nlast migrations");
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
    line!(out, "{}", or_none(&history, status.history.is_empty()));
    emit(&out)
}

pub fn print_cleanup(done: &[String], as_json: bool) -> Result<()> {
    if as_json {
        return json(&done);
    }
    let mut out = String::new();
    if done.is_empty() {
        line!(out, "nothing to clean up");
    }
    for line in done {
        line!(out, "{line}");
    }
    emit(&out)
}

/// `drain`: the plan (before the moves, or alone with `--dry-run`), and then with the
/// results.
pub fn print_drain(plan: &[Placement], results: Option<&[Moved]>, as_json: bool) -> Result<()> {
    if as_json {
        return json(&plan::json(plan, results));
    }
    let mut out = String::new();
    let Some(results) = results else {
        let mut rows = table(&["container", "memory", "goes to"]);
        for p in plan {
            rows.add_row(vec![
                Cell::new(&p.container),
                Cell::new(memory(p.memory_bytes)),
                match (&p.destination, &p.reason) {
                    (Some(destination), _) => Cell::new(destination),
                    (None, reason) => Cell::new(format!(
                        "stays: {}",
                        reason.as_deref().unwrap_or("no destination")
                    ))
                    .fg(Color::Red),
                },
            ]);
        }
        line!(out, "plan:\n{}", or_none(&rows, plan.is_empty()));
        return emit(&out);
    };
    let mut rows = table(&["container", "to", "result", "freeze ms"]);
    for p in plan.iter().filter(|p| p.destination.is_none()) {
        rows.add_row(vec![
            Cell::new(&p.container),
            Cell::new("-"),
            Cell::new(format!(
                "stays: {}",
                p.reason.as_deref().unwrap_or("no destination")
            ))
            .fg(Color::Red),
            Cell::new(""),
        ]);
    }
    for r in results {
        rows.add_row(vec![
            Cell::new(&r.container),
            Cell::new(r.destination.as_deref().unwrap_or("-")),
            if r.moved {
                Cell::new("moved").fg(Color::Green)
            } else {
                Cell::new(format!("not moved: {}", r.error.as_deref().unwrap_or("?")))
                    .fg(Color::Red)
            },
            Cell::new(
                r.freeze_to_resume_ms
                    .map_or(String::new(), |ms| format!("{ms:.0}")),
            ),
        ]);
    }
    let moved = results.iter().filter(|r| r.moved).count();
    line!(out, "{}", or_none(&rows, plan.is_empty()));
    line!(out, "{moved} of {} container(s) moved", plan.len());
    emit(&out)
}

fn memory(bytes: Option<u64>) -> String {
    bytes.map_or("unknown".to_string(), |m| HumanBytes(m).to_string())
}

/// A table, or `none` instead of one without rows.
fn or_none(table: &Table, empty: bool) -> String {
    if empty {
        "  none".to_string()
    } else {
        table.to_string()
    }
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
