//! `agent-client drain`: empties h1 onto h2 and h3 while clients talk to the containers,
//! plans without changing anything (`--dry-run`), and leaves a container that no
//! destination takes where it is, with exit code 1.

use std::io::{BufRead, BufReader, Read};

use anyhow::{ensure, Context, Result};
use lab::flow::FlowClient;
use lab::Lab;

use super::{exists, flow_survived, is_running, outgoing_is_empty};

/// `agent-client drain --to h2,h3 --json OPTIONS` on h1: exit code and the JSON.
fn drain(lab: &Lab, options: &[&str]) -> Result<(Option<i32>, serde_json::Value)> {
    let mut argv = vec!["agent-client", "drain", "--to", "h2,h3", "--json"];
    argv.extend_from_slice(options);
    let out = lab.exec_timeout("h1", &argv, std::time::Duration::from_secs(600))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "[h1] {}: {}\n{}{stdout}",
        argv.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json = serde_json::from_str(&stdout).context("drain prints JSON")?;
    Ok((out.status.code(), json))
}

fn running_names(lab: &Lab, host: &str) -> Result<Vec<String>> {
    Ok(lab
        .podman(host, &["ps", "--format", "{{.Names}}"])?
        .lines()
        .map(str::to_string)
        .collect())
}

/// The plan's entry for `container`.
fn placement<'a>(json: &'a serde_json::Value, container: &str) -> Result<&'a serde_json::Value> {
    json["plan"]
        .as_array()
        .context("plan")?
        .iter()
        .find(|p| p["container"] == container)
        .with_context(|| format!("{container} not in the plan: {json}"))
}

/// Removes every container the drain moved, at its destination: they came from this
/// test or from earlier scenarios' leftovers on h1, which nothing needs any more.
fn remove_moved(lab: &Lab, json: &serde_json::Value) -> Result<()> {
    for result in json["results"].as_array().into_iter().flatten() {
        if let (true, Some(to), Some(name)) = (
            result["moved"] == true,
            result["destination"].as_str(),
            result["container"].as_str(),
        ) {
            lab.podman(to, &["rm", "-f", "-t", "0", name])?;
        }
    }
    Ok(())
}

const DRAINED: [&str; 3] = ["drain-tcp1", "drain-tcp2", "drain-udp"];

pub fn drain_empties_the_host_and_keeps_clients(lab: &Lab) -> Result<()> {
    for (name, port) in [(DRAINED[0], 5101), (DRAINED[1], 5102)] {
        let mapping = format!("{port}:5000");
        lab.run_container("h1", name, &["-p", &mapping], "localhost/tcp-echo", &[])?;
        let addr = std::net::SocketAddr::from(([10, 77, 0, 11], port));
        lab.wait_tcp("client", addr, std::time::Duration::from_secs(15))?;
    }
    lab.run_container(
        "h1",
        DRAINED[2],
        &["-p", "5103:5001/udp"],
        "localhost/udp-echo",
        &[],
    )?;
    let clients = [
        FlowClient::start(lab, "tcp", "10.77.0.11:5101", None)?,
        FlowClient::start(lab, "tcp", "10.77.0.11:5102", None)?,
        FlowClient::start(lab, "udp", "10.77.0.11:5103", None)?,
    ];

    let (code, plan) = drain(lab, &["--dry-run"])?;
    ensure!(code == Some(0), "dry run exit code {code:?}: {plan}");
    ensure!(
        plan["results"].is_null(),
        "a dry run has no results: {plan}"
    );
    for name in DRAINED {
        let to = placement(&plan, name)?["destination"].clone();
        ensure!(to == "h2" || to == "h3", "{name} planned to {to}");
        ensure!(is_running(lab, "h1", name)?, "dry run stopped {name}");
        for host in ["h2", "h3"] {
            ensure!(!exists(lab, host, name)?, "dry run made {name} on {host}");
        }
    }
    outgoing_is_empty(lab, "h1")?;

    let (code, done) = drain(lab, &[])?;
    let checked = (|| {
        ensure!(code == Some(0), "drain exit code {code:?}: {done}");
        let left = running_names(lab, "h1")?;
        ensure!(left.is_empty(), "h1 still runs {left:?}");
        for name in DRAINED {
            let result = done["results"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["container"] == name))
                .with_context(|| format!("{name} has no result: {done}"))?;
            let to = result["destination"].as_str().context("destination")?;
            ensure!(result["moved"] == true, "{name}: {result}");
            ensure!(is_running(lab, to, name)?, "{name} does not run on {to}");
        }
        Ok(())
    })();
    // The clients first (while their containers still run), then the containers, whatever
    // failed above.
    let flows: Vec<Result<serde_json::Value>> = clients.into_iter().map(flow_survived).collect();
    remove_moved(lab, &done)?;
    checked?;
    for flow in flows {
        flow?;
    }
    Ok(())
}

/// Runs `check`, then removes what the drain moved, whatever `check` found.
fn remove_moved_after(
    lab: &Lab,
    json: &serde_json::Value,
    check: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let checked = check();
    remove_moved(lab, json)?;
    checked
}

pub fn drain_keeps_what_no_destination_takes(lab: &Lab) -> Result<()> {
    lab.run_container(
        "h1",
        "stuck",
        &["-p", "5104:5000"],
        "localhost/tcp-echo",
        &[],
    )?;
    for host in ["h2", "h3"] {
        lab.run_container(
            host,
            "squat",
            &["-p", "5104:5000"],
            "localhost/tcp-echo",
            &[],
        )?;
    }
    let (code, json) = drain(lab, &[])?;
    let result = remove_moved_after(lab, &json, || {
        ensure!(
            code == Some(1),
            "exit code {code:?} with a container left: {json}"
        );
        let stuck = placement(&json, "stuck")?;
        ensure!(stuck["destination"].is_null(), "stuck was placed: {stuck}");
        let reason = stuck["reason"].as_str().unwrap_or_default();
        ensure!(
            reason.contains("h2") && reason.contains("h3") && reason.contains("5104"),
            "the reason names neither destinations nor the port: {reason}"
        );
        ensure!(
            is_running(lab, "h1", "stuck")?,
            "stuck stopped running on h1"
        );
        Ok(())
    });
    lab.podman("h1", &["rm", "-f", "-t", "0", "stuck"])?;
    for host in ["h2", "h3"] {
        lab.podman(host, &["rm", "-f", "-t", "0", "squat"])?;
    }
    result
}

/// Ctrl-C as the first move starts (one at a time): that move aborts or finishes, the
/// next never starts, and every container runs exactly once, on h1 or where it went.
pub fn drain_interrupted_starts_nothing_new(lab: &Lab) -> Result<()> {
    const HALTED: [&str; 2] = ["halt1", "halt2"];
    for name in HALTED {
        lab.run_container("h1", name, &[], "localhost/counter", &[])?;
    }
    let mut child = lab.spawn(
        "h1",
        &[
            "agent-client",
            "drain",
            "--to",
            "h2",
            "--parallel",
            "1",
            "--json",
            "--events",
        ],
    )?;
    let stderr = child.stderr.take().expect("piped");
    let mut sent = false;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        eprintln!("{line}");
        let started = serde_json::from_str::<serde_json::Value>(&line)
            .is_ok_and(|e| e["event"] == "phase_started");
        if started && !sent {
            // nsenter execs agent-client: the child is the client itself.
            lab::cmd::run(
                std::process::Command::new("kill").args(["-INT", &child.id().to_string()]),
            )?;
            sent = true;
        }
    }
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)?;
    let status = child.wait()?;
    let json: serde_json::Value = serde_json::from_str(&stdout).context("drain prints JSON")?;
    let checked = (|| {
        ensure!(sent, "no move started");
        ensure!(
            status.code() == Some(130),
            "exit {status} after Ctrl-C: {json}"
        );
        let results = json["results"].as_array().context("results")?;
        let not_started = results
            .iter()
            .filter(|r| {
                r["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("not started"))
            })
            .count();
        ensure!(
            not_started + 1 == results.len(),
            "one move runs, the others do not start: {json}"
        );
        for result in results {
            let name = result["container"].as_str().context("container")?;
            let (here, there) = (is_running(lab, "h1", name)?, is_running(lab, "h2", name)?);
            ensure!(here != there, "{name}: runs on h1 {here}, on h2 {there}");
            ensure!(
                there == (result["moved"] == true),
                "{name} on h2 contradicts {result}"
            );
        }
        Ok(())
    })();
    remove_moved(lab, &json)?;
    for name in HALTED {
        if exists(lab, "h1", name)? {
            lab.podman("h1", &["rm", "-f", "-t", "0", name])?;
        }
    }
    checked
}
