//! `demo`: the main job, end to end. Brings up a lab of three simulated hosts, starts the
//! `counter` workload on h1, migrates it to h2 with `agent-client`, shows that it goes on
//! counting from where it was, prints the phase timings and tears everything down (also on
//! Ctrl-C).

use std::time::Duration;

use anyhow::{Context, Result};
use lab::{Lab, LabOptions};

fn main() -> Result<()> {
    lab::install_signal_cleanup()?;
    println!("== bringing up a lab: hosts h1, h2, h3 and a client on one LAN");
    let lab = Lab::up(LabOptions::default())?;
    let result = run(&lab);
    println!("== tearing the lab down");
    lab.down()?;
    result
}

fn run(lab: &Lab) -> Result<()> {
    println!(
        "== starting `counter` on h1 (prints 0, 1, 2, ... every 100 ms; state only in memory)"
    );
    lab.podman(
        "h1",
        &[
            "run",
            "-d",
            "--pull=never",
            "--name",
            "counter",
            "localhost/counter",
        ],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let before = last_lines(lab, "h1", 3)?;
    println!("   h1 log tail: {}", before.join(" "));

    println!("== h1$ agent-client --container counter --dest h2");
    let out = lab.exec(
        "h1",
        &["agent-client", "--container", "counter", "--dest", "h2"],
    )?;
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));

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
