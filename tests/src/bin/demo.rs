//! `demo`: the main job, end to end. Brings up a lab of three simulated hosts, then
//! 1. starts the `counter` workload on h1, migrates it to h2 and shows it counting on from
//!    where it was (its state lives only in memory);
//! 2. starts a TCP echo service on h1 with a published port, connects a client to it that
//!    prints its replies live, and moves the service h1 -> h2 -> h3 while the client keeps
//!    talking through h1: the client sees a pause at each hop and never a break.
//!
//! It prints the phase timings and what h1 keeps for the container that left (`agent-client
//! status`), and tears everything down (also on Ctrl-C).

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use lab::flow::FlowClient;
use lab::{Lab, LabOptions};

/// The main job, end to end: brings up a lab of three simulated hosts (h1, h2, h3 and a
/// client), migrates the `counter` workload h1 -> h2 and shows it counting on, then moves a
/// TCP echo service h1 -> h2 -> h3 while a client stays connected through h1 and prints
/// what it sees. Needs root and `scripts/setup-host.sh`; takes no options (`make demo`).
#[derive(Parser)]
struct Args {}

fn main() -> Result<()> {
    Args::parse();
    lab::install_signal_cleanup()?;
    println!("== bringing up a lab: hosts h1, h2, h3 and a client on one LAN");
    let lab = Lab::up(LabOptions::default())?;
    let result = run(&lab);
    println!("== tearing the lab down");
    lab.down()?;
    result
}

fn run(lab: &Lab) -> Result<()> {
    counter(lab)?;
    live_connection(lab)
}

fn live_connection(lab: &Lab) -> Result<()> {
    println!("\n== starting `tcp-echo` on h1, published as h1:5000; a client connects to h1:5000");
    lab.publish_tcp("h1", "echo", "localhost/tcp-echo", 5000)?;
    let client = FlowClient::start(lab, "tcp", "10.77.0.11:5000", Some(50))?;
    // For the viewer: two seconds of the client's replies before each hop and after it.
    std::thread::sleep(Duration::from_secs(2));
    for (from, to) in [("h1", "h2"), ("h2", "h3")] {
        println!("== {from}$ agent-client --container echo --dest {to}");
        let out = lab.exec(from, &["agent-client", "--container", "echo", "--dest", to])?;
        print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
        std::thread::sleep(Duration::from_secs(2));
    }
    let summary = client.finish()?;
    println!(
        "== the client's connection to h1:5000 {}: {} messages, {} replies checked, longest pause {:.0} ms",
        if summary["ok"] == true { "never broke" } else { "BROKE" },
        summary["sent"],
        summary["received"],
        summary["max_pause_ms"].as_f64().unwrap_or(-1.0)
    );
    println!("== h1$ agent-client status   (what h1 keeps for the container that left)");
    let out = lab.exec("h1", &["agent-client", "status"])?;
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    Ok(())
}

fn counter(lab: &Lab) -> Result<()> {
    println!(
        "== starting `counter` on h1 (prints 0, 1, 2, ... every 100 ms; state only in memory)"
    );
    lab.run_container("h1", "counter", &[], "localhost/counter", &[])?;
    // For the viewer: a log tail of two seconds of counting.
    std::thread::sleep(Duration::from_secs(2));
    let before = last_lines(lab, "h1", 3)?;
    println!("   h1 log tail: {}", before.join(" "));

    println!("== h1$ agent-client --container counter --dest h2");
    let out = lab.exec(
        "h1",
        &["agent-client", "--container", "counter", "--dest", "h2"],
    )?;
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));

    // For the viewer: a second of counting on h2 to show.
    std::thread::sleep(Duration::from_secs(1));
    let gone = !lab
        .exec_unchecked("h1", &["podman", "container", "exists", "counter"])?
        .status
        .success();
    println!("   counter removed from h1: {gone}");
    let after = last_lines(lab, "h2", 3)?;
    println!(
        "   h2 log tail: {} (continues from {}, no restart)",
        after.join(" "),
        before.last().map(String::as_str).unwrap_or("?")
    );
    Ok(())
}

fn last_lines(lab: &Lab, host: &str, n: usize) -> Result<Vec<String>> {
    let logs = lab
        .podman(host, &["logs", "counter"])
        .context("counter logs")?;
    let lines: Vec<String> = logs.lines().map(str::to_string).collect();
    Ok(lines[lines.len().saturating_sub(n)..].to_vec())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}
