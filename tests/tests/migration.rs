//! End-to-end migrations in one shared lab with real podman, runc and CRIU.
//!
//! Scenarios run one after the other (they share hosts), each cleaning up its containers.
//! The operator's commands (check, Ctrl-C, status, cleanup, the interactive prompt) are in
//! `migration/operator.rs`.
//! Needs root and the tools of `scripts/setup-host.sh`; without root, or with
//! `LM_LAB_SKIP=1`, they are ignored (and the reason said).

use std::io::{BufRead, BufReader};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use lab::flow::FlowClient;
use lab::{wait_for, Lab, LabOptions};
use libtest_mimic::{Arguments, Failed, Trial};
use nix::sys::signal::Signal;

#[path = "migration/drain.rs"]
mod drain;
#[path = "migration/faults.rs"]
mod faults;
#[path = "migration/metrics.rs"]
mod metrics;
#[path = "migration/operator.rs"]
mod operator;
#[path = "migration/peer_input.rs"]
mod peer_input;
#[path = "migration/post_copy.rs"]
mod post_copy;
#[path = "migration/streamed.rs"]
mod streamed;

type Scenario = fn(&Lab) -> Result<()>;

const SCENARIOS: &[(&str, Scenario)] = &[
    (
        "counter_continues_h1_h2_h1_and_podman_sees_a_normal_container",
        counter_round_trip,
    ),
    (
        "stop_copy_archive_memhog_256mib_memory_intact",
        memhog_memory_intact,
    ),
    (
        "post_copy_memhog_256mib_memory_intact_and_source_keeps_nothing",
        post_copy::memory_intact_and_source_keeps_nothing,
    ),
    (
        "post_copy_auto_picks_each_mode_on_either_side_of_the_threshold",
        post_copy::auto_picks_each_mode_on_either_side_of_the_threshold,
    ),
    (
        "post_copy_live_tcp_client_keeps_its_connection",
        post_copy::live_tcp_client_keeps_its_connection,
    ),
    (
        "post_copy_link_cut_while_pages_move_stops_the_container",
        post_copy::link_cut_while_pages_move_stops_the_container,
    ),
    (
        "post_copy_guard_left_by_a_killed_client_is_cleaned_up",
        post_copy::guard_left_by_a_killed_client_is_cleaned_up,
    ),
    (
        "streamed_memhog_256mib_memory_intact_and_source_keeps_nothing",
        streamed::memory_intact_and_source_keeps_nothing,
    ),
    (
        "streamed_link_cut_while_memory_streams_rolls_back",
        streamed::link_cut_while_memory_streams_rolls_back,
    ),
    (
        "streamed_client_killed_while_memory_streams_rolls_back",
        streamed::client_killed_while_memory_streams_rolls_back,
    ),
    (
        "streamed_client_killed_at_the_pre_dump_hook_rolls_back",
        streamed::client_killed_at_the_pre_dump_hook_rolls_back,
    ),
    (
        "streamed_client_killed_after_the_last_page_resumes_the_replica",
        streamed::client_killed_after_the_last_page_resumes_the_replica,
    ),
    (
        "streamed_destination_agent_killed_while_memory_streams_takes_over",
        streamed::destination_agent_killed_while_memory_streams_takes_over,
    ),
    (
        "streamed_destination_agent_down_until_the_last_page_keeps_the_replica",
        streamed::destination_agent_down_until_the_last_page_keeps_the_replica,
    ),
    (
        "missing_image_is_sent_before_the_freeze",
        missing_image_is_sent,
    ),
    ("events_stream_shows_every_phase", events_stream),
    (
        "metrics_scrape_counts_migrations",
        metrics::scrape_counts_migrations,
    ),
    (
        "drain_empties_the_host_and_keeps_clients",
        drain::drain_empties_the_host_and_keeps_clients,
    ),
    (
        "drain_keeps_what_no_destination_takes",
        drain::drain_keeps_what_no_destination_takes,
    ),
    (
        "drain_interrupted_starts_nothing_new",
        drain::drain_interrupted_starts_nothing_new,
    ),
    ("wrong_token_is_rejected", wrong_token),
    ("unknown_container_is_an_error", unknown_container),
    ("stopped_container_is_an_error", stopped_container),
    (
        "destination_down_keeps_container_on_source",
        destination_down,
    ),
    (
        "destination_killed_mid_transfer_rolls_back",
        destination_killed_mid_transfer,
    ),
    ("garbage_frames_do_not_hurt_the_daemon", garbage_frames),
    (
        "bad_peer_input_is_refused",
        peer_input::peer_input_is_refused,
    ),
    (
        "twenty_thousand_flows_migrate",
        peer_input::twenty_thousand_flows_migrate,
    ),
    ("tcp_and_udp_flows_survive_h1_h2_h3_h1", flows_survive_hops),
    (
        "udp_packets_beyond_the_hold_are_counted",
        hold_overflow_is_counted,
    ),
    ("new_connections_reach_the_moved_container", new_connections),
    (
        "failure_after_checkpoint_keeps_flows_on_source",
        failure_after_checkpoint,
    ),
    ("outbound_connection_survives_h1_h2", outbound_connection),
    (
        "forwarding_yields_to_a_new_local_container",
        forwarding_yields_to_a_new_local_container,
    ),
    (
        "forwarding_is_removed_once_nothing_needs_it",
        forwarding_removed,
    ),
    ("check_reports_conflicts", operator::check_reports_conflicts),
    (
        "ctrl_c_aborts_before_switch",
        operator::ctrl_c_aborts_before_switch,
    ),
    (
        "cleanup_after_crashed_client",
        operator::cleanup_after_crashed_client,
    ),
    (
        "interactive_migration_in_a_terminal",
        operator::interactive_migration_in_a_terminal,
    ),
    ("fault_matrix_keeps_exactly_one_copy", faults::fault_matrix),
    (
        "failed_return_keeps_the_former_host_forwarding",
        faults::failed_return_keeps_the_former_host_forwarding,
    ),
    (
        "second_migration_of_a_container_is_refused",
        faults::second_migration_is_refused,
    ),
];

fn main() {
    let args = Arguments::from_args();
    let skip = lab::skip_reason();
    if let Some(why) = &skip {
        eprintln!("{why}: the lab scenarios are ignored");
    }
    let lab = if skip.is_some() {
        None
    } else {
        lab::install_signal_cleanup().expect("signal handler");
        Some(std::sync::Arc::new(
            Lab::up(LabOptions::default()).expect("bring up the lab"),
        ))
    };
    let trials = SCENARIOS
        .iter()
        .map(|&(name, scenario)| {
            let lab = lab.clone();
            let why = skip.clone().unwrap_or_default();
            Trial::test(name, move || match lab {
                // The agents' logs say what they did about it (sweeps, recovery).
                Some(lab) => scenario(&lab).map_err(|e| {
                    let logs: String = ["h1", "h2"]
                        .iter()
                        .map(|h| {
                            let tail = lab
                                .agent_log_tail(h, 1500)
                                .unwrap_or_else(|e| format!("{e:#}"));
                            format!("\n--- agent-server log of {h}, last lines ---\n{tail}")
                        })
                        .collect();
                    // What a failed scenario left would fail those after it (some wait for
                    // the hosts' forwarding to go): its containers go, and with them, at
                    // the sweepers' next round, the forwarding they kept.
                    for h in ["h1", "h2"] {
                        let _ = lab.exec_unchecked(h, &["podman", "rm", "-a", "-f", "-t", "0"]);
                    }
                    Failed::from(format!("{e:#}{logs}"))
                }),
                // Run although ignored (`--include-ignored`): no lab, no pass.
                None => Err(Failed::from(format!("no lab: {why}"))),
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect();
    // Scenarios share hosts: one at a time.
    let conclusion = libtest_mimic::run(
        &Arguments {
            test_threads: Some(1),
            ..args
        },
        trials,
    );
    if let Some(lab) = lab {
        match std::sync::Arc::try_unwrap(lab) {
            Ok(lab) => lab.down().expect("tear down the lab"),
            Err(_) => panic!("lab still shared at the end"),
        }
    }
    conclusion.exit();
}

/// Runs `agent-client` in `host`; returns (success, stdout, stderr).
fn agent_client(lab: &Lab, host: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let mut argv = vec!["agent-client"];
    argv.extend_from_slice(args);
    let out = lab.exec_timeout(host, &argv, Duration::from_secs(300))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("[{host}] agent-client {}\n{stderr}{stdout}", args.join(" "));
    Ok((out.status.success(), stdout, stderr))
}

/// Migrates and returns the JSON report; fails if the migration fails.
fn migrate(lab: &Lab, from: &str, container: &str, to: &str) -> Result<serde_json::Value> {
    migrate_with(lab, from, container, to, &[])
}

/// [`migrate`] with more options for `agent-client`.
fn migrate_with(
    lab: &Lab,
    from: &str,
    container: &str,
    to: &str,
    options: &[&str],
) -> Result<serde_json::Value> {
    let mut args = vec!["--container", container, "--dest", to, "--json"];
    args.extend_from_slice(options);
    let (ok, stdout, stderr) = agent_client(lab, from, &args)?;
    ensure!(ok, "migration {from} -> {to} failed: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).context("report is JSON")?;
    eprintln!(
        "{container} {from} -> {to}: freeze-to-resume {:.0} ms, total {:.0} ms",
        report["freeze_to_resume_ms"].as_f64().unwrap_or(-1.0),
        report["total_ms"].as_f64().unwrap_or(-1.0)
    );
    Ok(report)
}

/// Expects a migration to fail with a message containing `cause`, and `--json` to say so
/// on stdout: the phase, the error and what became of the container.
fn migrate_fails(lab: &Lab, from: &str, container: &str, to: &str, cause: &str) -> Result<()> {
    let (ok, stdout, stderr) = agent_client(
        lab,
        from,
        &["--container", container, "--dest", to, "--json"],
    )?;
    ensure!(
        !ok,
        "migration of {container} to {to} unexpectedly succeeded"
    );
    ensure!(
        stderr.contains(cause),
        "error does not name the cause {cause:?}: {stderr}"
    );
    let failure: serde_json::Value =
        serde_json::from_str(&stdout).with_context(|| format!("failure JSON: {stdout}"))?;
    ensure!(
        failure["ok"] == false
            && failure["phase"].is_string()
            && failure["error"].as_str().is_some_and(|e| e.contains(cause))
            && failure["resolution"].is_string(),
        "failure JSON lacks ok, phase, error or resolution: {failure}"
    );
    Ok(())
}

fn is_running(lab: &Lab, host: &str, name: &str) -> Result<bool> {
    let out = lab.exec_unchecked(
        host,
        &["podman", "inspect", "--format", "{{.State.Running}}", name],
    )?;
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "true")
}

fn exists(lab: &Lab, host: &str, name: &str) -> Result<bool> {
    Ok(lab
        .exec_unchecked(host, &["podman", "container", "exists", name])?
        .status
        .success())
}

fn logs(lab: &Lab, host: &str, name: &str) -> Result<String> {
    lab.podman(host, &["logs", name])
}

/// The numbers the counter printed, checked to be one run with no restart, gap or repeat.
fn counter_values(lab: &Lab, host: &str, name: &str) -> Result<Vec<u64>> {
    let values: Vec<u64> = logs(lab, host, name)?
        .lines()
        .map(|l| {
            l.trim()
                .parse()
                .with_context(|| format!("counter line {l:?}"))
        })
        .collect::<Result<_>>()?;
    ensure!(!values.is_empty(), "counter printed nothing on {host}");
    for pair in values.windows(2) {
        ensure!(
            pair[1] == pair[0] + 1,
            "counter on {host} jumped from {} to {}",
            pair[0],
            pair[1]
        );
    }
    Ok(values)
}

/// The counter goes on counting on the host it runs on.
fn counter_advances(lab: &Lab, host: &str, name: &str, beyond: u64) -> Result<u64> {
    let mut last = 0;
    wait_for(
        &format!("{name} on {host} to count past {beyond}"),
        Duration::from_secs(10),
        || {
            last = *counter_values(lab, host, name)?.last().expect("not empty");
            Ok(last > beyond + 3)
        },
    )?;
    Ok(last)
}

fn outgoing_is_empty(lab: &Lab, host: &str) -> Result<()> {
    let listing = lab.agent_state(host, "outgoing")?;
    ensure!(
        listing.is_empty(),
        "{host} kept checkpoint archives: {listing}"
    );
    Ok(())
}

fn counter_round_trip(lab: &Lab) -> Result<()> {
    lab.run_container("h1", "counter", &[], "localhost/counter", &[])?;
    let id = lab.podman("h1", &["inspect", "--format", "{{.Id}}", "counter"])?;
    let before = counter_advances(lab, "h1", "counter", 5)?;

    migrate(lab, "h1", "counter", "h2")?;
    ensure!(
        !exists(lab, "h1", "counter")?,
        "source copy still exists on h1"
    );
    podman_sees_it_running(lab, "h2", "counter", &id)?;
    let on_h2 = counter_advances(lab, "h2", "counter", before)?;
    let values = counter_values(lab, "h2", "counter")?;
    ensure!(
        values[0] == 0,
        "log on h2 does not start at 0: the run restarted"
    );

    migrate(lab, "h2", "counter", "h1")?;
    ensure!(
        !exists(lab, "h2", "counter")?,
        "source copy still exists on h2"
    );
    podman_sees_it_running(lab, "h1", "counter", &id)?;
    counter_advances(lab, "h1", "counter", on_h2)?;
    outgoing_is_empty(lab, "h1")?;
    outgoing_is_empty(lab, "h2")?;
    // A migrated container stops like any other.
    lab.podman("h1", &["stop", "-t", "2", "counter"])?;
    let status = lab.podman(
        "h1",
        &["inspect", "--format", "{{.State.Status}}", "counter"],
    )?;
    ensure!(
        status == "exited",
        "counter on h1 is {status} after podman stop"
    );
    lab.podman("h1", &["rm", "-f", "-t", "0", "counter"])?;
    Ok(())
}

/// podman on `host` shows the migrated container as it shows any running one: listed by
/// `ps` with its ID, running in `inspect`, not paused, and its `logs` there.
fn podman_sees_it_running(lab: &Lab, host: &str, name: &str, id: &str) -> Result<()> {
    let listed = lab.podman(
        host,
        &["ps", "--no-trunc", "--format", "{{.ID}} {{.Names}}"],
    )?;
    ensure!(
        listed.lines().any(|l| l == format!("{id} {name}")),
        "podman ps on {host} does not list {name} ({id}): {listed}"
    );
    let state = lab.podman(
        host,
        &[
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.Paused}}",
            name,
        ],
    )?;
    ensure!(state == "running false", "{name} on {host} is {state}");
    ensure!(
        !logs(lab, host, name)?.is_empty(),
        "no logs of {name} on {host}"
    );
    Ok(())
}

fn memhog_verify(lab: &Lab, host: &str, name: &str, pages: u64) -> Result<()> {
    let before = logs(lab, host, name)?.matches("verify").count();
    lab.podman(host, &["kill", "--signal", "USR1", name])?;
    let mut verdict = String::new();
    wait_for("memhog's verdict", Duration::from_secs(60), || {
        let text = logs(lab, host, name)?;
        verdict = text
            .lines()
            .filter(|l| l.contains("verify"))
            .nth(before)
            .unwrap_or("")
            .to_string();
        Ok(!verdict.is_empty())
    })?;
    ensure!(
        verdict.trim() == format!("memhog: verify ok pages={pages}"),
        "memhog on {host}: {verdict}"
    );
    Ok(())
}

fn start_memhog(lab: &Lab, host: &str, name: &str, mib: u64, dirty_percent: u32) -> Result<()> {
    let mib_env = format!("MEMHOG_MIB={mib}");
    let dirty_env = format!("MEMHOG_DIRTY_PERCENT={dirty_percent}");
    lab.run_container(
        host,
        name,
        &["-e", &mib_env, "-e", &dirty_env],
        "localhost/memhog",
        &[],
    )?;
    wait_for("memhog to fill its memory", Duration::from_secs(60), || {
        Ok(logs(lab, host, name)?.contains("memhog: ready"))
    })
}

fn memhog_memory_intact(lab: &Lab) -> Result<()> {
    start_memhog(lab, "h1", "memhog", 256, 5)?;
    let report = migrate_with(
        lab,
        "h1",
        "memhog",
        "h3",
        &["--mode", "stop-copy", "--archive"],
    )?;
    let bytes = report["checkpoint_bytes"].as_u64().unwrap_or(0);
    ensure!(
        bytes > 256 << 20,
        "checkpoint of {bytes} bytes cannot hold 256 MiB"
    );
    memhog_verify(lab, "h3", "memhog", 256 * 256)?;
    lab.podman("h3", &["rm", "-f", "-t", "0", "memhog"])?;
    Ok(())
}

fn missing_image_is_sent(lab: &Lab) -> Result<()> {
    // An image only h1 has: a commit of a running counter.
    lab.run_container("h1", "base", &[], "localhost/counter", &[])?;
    lab.podman("h1", &["commit", "base", "localhost/counter-h1-only"])?;
    lab.podman("h1", &["rm", "-f", "-t", "0", "base"])?;
    let image_on_h3 = || -> Result<bool> {
        Ok(lab
            .exec_unchecked(
                "h3",
                &["podman", "image", "exists", "localhost/counter-h1-only"],
            )?
            .status
            .success())
    };
    ensure!(!image_on_h3()?, "h3 has the image before the migration");
    lab.run_container("h1", "fresh", &[], "localhost/counter-h1-only", &[])?;
    let before = counter_advances(lab, "h1", "fresh", 3)?;
    let report = migrate(lab, "h1", "fresh", "h3")?;
    ensure!(
        report["image_transferred"] == true,
        "report says the image was not sent"
    );
    ensure!(image_on_h3()?, "h3 has no image after the migration");
    counter_advances(lab, "h3", "fresh", before)?;
    lab.podman("h3", &["rm", "-f", "-t", "0", "fresh"])?;
    Ok(())
}

/// `--events`: every line of stderr that is a JSON object is an event of the schema
/// (`common::migration::events`); each phase starts and finishes in order, and the last
/// event says the migration succeeded.
fn events_stream(lab: &Lab) -> Result<()> {
    lab.run_container("h1", "evented", &[], "localhost/counter", &[])?;
    let (ok, _, stderr) = agent_client(
        lab,
        "h1",
        &["--container", "evented", "--dest", "h2", "--events"],
    )?;
    ensure!(ok, "migration failed: {stderr}");
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect::<Result<_>>()?;
    ensure!(
        events
            .iter()
            .all(|e| e["v"] == 1 && e["container"] == "evented" && e["at_ms"].is_number()),
        "events without their common fields: {stderr}"
    );
    let of = |kind: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["event"] == kind)
            .map(|e| e["phase"].as_str().unwrap_or("?").to_string())
            .collect()
    };
    let started = of("phase_started");
    ensure!(
        started == of("phase_finished"),
        "phases started {started:?}, finished {:?}",
        of("phase_finished")
    );
    let expected = [
        "connect",
        "tunnel",
        "prepare",
        "checkpoint",
        "transfer",
        "restore",
    ];
    ensure!(
        started.len() > expected.len()
            && started[..expected.len()] == expected
            && started.ends_with(&["switch_traffic".to_string(), "clean_up".to_string()]),
        "phases out of order: {started:?}"
    );
    let last = events.last().context("no event")?;
    ensure!(
        last["event"] == "finished"
            && last["ok"] == true
            && last["freeze_to_resume_ms"].is_number(),
        "last event: {last}"
    );
    ensure!(
        !stderr.contains(" ..."),
        "the progress display is mixed into the events: {stderr}"
    );
    lab.podman("h2", &["rm", "-f", "-t", "0", "evented"])?;
    Ok(())
}

/// A container on h1 for the failure scenarios; returns its counter value.
fn victim(lab: &Lab) -> Result<u64> {
    if !exists(lab, "h1", "victim")? {
        lab.run_container("h1", "victim", &[], "localhost/counter", &[])?;
    }
    counter_advances(lab, "h1", "victim", 0)
}

/// After a failed migration the victim still runs on h1 and counts on without a restart.
fn victim_survived(lab: &Lab, before: u64) -> Result<()> {
    ensure!(
        is_running(lab, "h1", "victim")?,
        "victim is not running on h1"
    );
    counter_advances(lab, "h1", "victim", before)?;
    for host in ["h2", "h3"] {
        ensure!(
            !exists(lab, host, "victim")?,
            "{host} holds a copy of victim"
        );
    }
    outgoing_is_empty(lab, "h1")
}

fn wrong_token(lab: &Lab) -> Result<()> {
    let before = victim(lab)?;
    let path = format!("/tmp/lm-wrong-token-{}", std::process::id());
    // Mode 0600, so that the agent gets as far as the handshake.
    lab::host::write_secret(
        std::path::Path::new(&path),
        "this-is-not-the-lab-token-0000",
    )?;
    let result = agent_client(
        lab,
        "h1",
        &[
            "--container",
            "victim",
            "--dest",
            "h2",
            "--token-file",
            &path,
        ],
    );
    std::fs::remove_file(&path)?;
    let (ok, _, stderr) = result?;
    ensure!(!ok, "migration with a wrong token succeeded");
    ensure!(
        stderr.contains("authentication failed"),
        "no authentication error: {stderr}"
    );
    victim_survived(lab, before)
}

fn unknown_container(lab: &Lab) -> Result<()> {
    migrate_fails(
        lab,
        "h1",
        "no-such-container",
        "h2",
        "no such container: no-such-container",
    )
}

fn stopped_container(lab: &Lab) -> Result<()> {
    lab.podman(
        "h1",
        &[
            "create",
            "--pull=never",
            "--name",
            "sleeper",
            "localhost/counter",
        ],
    )?;
    let result = migrate_fails(lab, "h1", "sleeper", "h2", "is not running");
    lab.podman("h1", &["rm", "-f", "sleeper"])?;
    result
}

fn destination_down(lab: &Lab) -> Result<()> {
    let before = victim(lab)?;
    lab.stop_agent("h2")?;
    let result = migrate_fails(lab, "h1", "victim", "h2", "cannot reach destination agent");
    lab.start_agent("h2")?;
    result?;
    victim_survived(lab, before)
}

/// Whether `line` of `agent-client --events` is the event that `phase` started
/// (`common::migration::events`); log lines are not events.
fn phase_started(line: &str, phase: &str) -> bool {
    line.starts_with('{')
        && serde_json::from_str::<serde_json::Value>(line)
            .is_ok_and(|e| e["event"] == "phase_started" && e["phase"] == phase)
}

/// Migrates `container` h1 -> h2 by stop-copy through the archive (the memory is in it, so
/// its transfer takes a while) and calls `at_transfer` with the client's pid once, as soon
/// as its events say the transfer started. Returns the client's exit status, its stderr
/// (events and messages) and whether the transfer was reached.
fn migrate_acting_at_transfer(
    lab: &Lab,
    container: &str,
    mut at_transfer: impl FnMut(u32) -> Result<()>,
) -> Result<(std::process::ExitStatus, String, bool)> {
    let mut child = lab.spawn(
        "h1",
        &[
            "agent-client",
            "--container",
            container,
            "--dest",
            "h2",
            "--mode",
            "stop-copy",
            "--archive",
            "--events",
        ],
    )?;
    let stderr = child.stderr.take().expect("piped");
    let mut seen = String::new();
    let mut reached = false;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        seen.push_str(&line);
        seen.push('\n');
        if !reached && phase_started(&line, "transfer") {
            reached = true;
            // nsenter execs agent-client: the child is the client itself.
            at_transfer(child.id())?;
        }
    }
    Ok((child.wait()?, seen, reached))
}

fn destination_killed_mid_transfer(lab: &Lab) -> Result<()> {
    start_memhog(lab, "h1", "bigvictim", 512, 5)?;
    let outcome = migrate_acting_at_transfer(lab, "bigvictim", |_| lab.kill_agent("h2").map(drop));
    lab.start_agent("h2")?;
    let (status, seen, killed) = outcome?;
    eprintln!("{seen}");
    ensure!(killed, "the migration never reached the transfer");
    ensure!(
        !status.success(),
        "migration succeeded although the destination died"
    );
    ensure!(
        seen.contains("failed during transfer") || seen.contains("failed during restore"),
        "error does not name the phase: {seen}"
    );
    ensure!(
        is_running(lab, "h1", "bigvictim")?,
        "bigvictim is not running on h1 again"
    );
    memhog_verify(lab, "h1", "bigvictim", 512 * 256)?;
    ensure!(
        !exists(lab, "h2", "bigvictim")?,
        "h2 holds a half-restored copy"
    );
    outgoing_is_empty(lab, "h1")?;
    lab.podman("h1", &["rm", "-f", "-t", "0", "bigvictim"])?;
    Ok(())
}

fn garbage_frames(lab: &Lab) -> Result<()> {
    use std::io::{Read, Write};
    let agent = std::net::SocketAddr::V4(lab.host("h2")?.agent_addr);
    for junk in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &[0xff, 0xff, 0xff, 0xff, 0][..],
        &[0, 0, 0, 3, 0, b'{', b'}'][..],
    ] {
        let mut conn = lab.connect_tcp("client", agent, Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(15)))?;
        conn.write_all(junk)?;
        let mut reply = Vec::new();
        // The daemon answers with an error frame (or nothing) and closes the connection;
        // closing with our junk unread shows up as a reset.
        match conn.read_to_end(&mut reply) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => {
                other?;
            }
        }
        ensure!(
            !String::from_utf8_lossy(&reply).contains("welcome"),
            "garbage was welcomed"
        );
    }
    ensure!(lab.agent_running("h2")?, "agent-server on h2 died");
    // Still serving: a real migration through it works.
    let before = victim(lab)?;
    migrate(lab, "h1", "victim", "h2")?;
    counter_advances(lab, "h2", "victim", before)?;
    lab.podman("h2", &["rm", "-f", "-t", "0", "victim"])?;
    Ok(())
}

/// Stops a flow and fails unless every reply came back intact and in order (TCP), or the
/// flow resumed (UDP).
fn flow_survived(flow: FlowClient) -> Result<serde_json::Value> {
    let what = flow.what().to_string();
    let summary = flow.finish()?;
    eprintln!("{what}: {summary}");
    eprintln!(
        "{what}: longest pause the client saw: {:.0} ms",
        summary["max_pause_ms"].as_f64().unwrap_or(-1.0)
    );
    ensure!(summary["ok"] == true, "{what} broke: {}", summary["error"]);
    ensure!(
        summary["received"].as_u64().unwrap_or(0) > 10,
        "{what} saw almost no replies"
    );
    Ok(summary)
}

/// One short flow: the service answers a new connection.
fn answers(lab: &Lab, proto: &str, addr: &str) -> Result<()> {
    let out = lab.exec_timeout(
        "client",
        &["flowcheck", proto, addr, "--seconds", "1"],
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "{proto} {addr} not answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

fn flows_survive_hops(lab: &Lab) -> Result<()> {
    lab.publish_tcp("h1", "tcpecho", "localhost/tcp-echo", 5000)?;
    lab.run_container(
        "h1",
        "udpecho",
        &["-p", "5001:5001/udp"],
        "localhost/udp-echo",
        &[],
    )?;
    let tcp = FlowClient::start(lab, "tcp", "10.77.0.11:5000", None)?;
    let udp = FlowClient::start(lab, "udp", "10.77.0.11:5001", None)?;
    // Load: a second of traffic before the first hop, two seconds after each.
    std::thread::sleep(Duration::from_secs(1));
    let mut held = Ok(());
    for (from, to) in [("h1", "h2"), ("h2", "h3"), ("h3", "h1")] {
        for container in ["tcpecho", "udpecho"] {
            let report = migrate(lab, from, container, to)?;
            held = held.and(no_packet_dropped_in_the_freeze(&report));
        }
        let rules = lab.hold_rules(from)?;
        ensure!(rules.is_empty(), "{from} still holds packets: {rules}");
        std::thread::sleep(Duration::from_secs(2));
    }
    let tcp = flow_survived(tcp);
    let udp = flow_survived(udp);
    lab.podman("h1", &["rm", "-f", "-t", "0", "tcpecho", "udpecho"])?;
    tcp?;
    let udp = udp?;
    held?;
    // 50 datagrams/s, none dropped at the source: none may be lost.
    ensure!(
        udp["lost"] == 0,
        "udp datagrams lost over three hops: {}",
        udp["lost"]
    );
    Ok(())
}

/// The client's packets of the freeze were held, not dropped: on the source, or, when
/// they enter at the destination (the container returns to where it is published), there
/// (it holds them from `BeginMigration` on, and they never reach the source).
fn no_packet_dropped_in_the_freeze(report: &serde_json::Value) -> Result<()> {
    let count = |hold: &serde_json::Value, what: &str| hold[what].as_u64();
    let (hold, at_destination) = (&report["held_packets"], &report["held_at_destination"]);
    let held = count(hold, "held").unwrap_or(0) + count(at_destination, "held").unwrap_or(0);
    ensure!(
        held > 0 && count(hold, "dropped") == Some(0),
        "{}: packets not held during the freeze: here {hold}, at the destination {at_destination} ({})",
        report["container"],
        report["warnings"]
    );
    ensure!(
        at_destination.is_null() || at_destination["dropped"] == 0,
        "{}: the destination dropped held packets: {at_destination}",
        report["container"]
    );
    Ok(())
}

/// A hold smaller than the traffic of the freeze: what overflows is dropped and counted,
/// and the migration goes on.
fn hold_overflow_is_counted(lab: &Lab) -> Result<()> {
    lab.run_container(
        "h1",
        "udpburst",
        &["-p", "5002:5001/udp"],
        "localhost/udp-echo",
        &[],
    )?;
    let udp = FlowClient::start(lab, "udp", "10.77.0.11:5002", None)?;
    // Load: the flow runs for a second before the migration.
    std::thread::sleep(Duration::from_secs(1));
    // 50 datagrams/s over a freeze of at least a few hundred ms: more than 3.
    let report = migrate_with(lab, "h1", "udpburst", "h2", &["--hold-packets", "3"]);
    let udp = flow_survived(udp);
    lab.podman("h2", &["rm", "-f", "-t", "0", "udpburst"])?;
    let report = report?;
    let udp = udp?;
    let hold = &report["held_packets"];
    // The queue was full (3), and what came while the held ones were let through joined
    // the queue behind them (one or two at 50/s).
    let held = hold["held"].as_u64().unwrap_or(0);
    ensure!(
        (3..=5).contains(&held) && hold["bound"] == 3 && hold["dropped"].as_u64() > Some(0),
        "the overflow is not counted: {hold}"
    );
    ensure!(
        udp["lost"].as_u64() >= hold["dropped"].as_u64(),
        "the client lost fewer datagrams ({}) than the hold dropped: {hold}",
        udp["lost"]
    );
    let rules = lab.hold_rules("h1")?;
    ensure!(rules.is_empty(), "h1 still holds packets: {rules}");
    Ok(())
}

fn new_connections(lab: &Lab) -> Result<()> {
    lab.run_container(
        "h1",
        "newconn",
        &["-p", "5100:5000"],
        "localhost/tcp-echo",
        &[],
    )?;
    lab.wait_tcp(
        "client",
        "10.77.0.11:5100".parse()?,
        Duration::from_secs(10),
    )?;
    migrate(lab, "h1", "newconn", "h2")?;
    // Through the old host (forwarded into the tunnel) and directly at the new one.
    answers(lab, "tcp", "10.77.0.11:5100")?;
    answers(lab, "tcp", "10.77.0.12:5100")?;
    // Back to h1 and away again under a connection that entered h1: the returning flow's
    // packets are untracked on the hosts it comes back to, but new connections that h1
    // forwards to h2 meanwhile are tracked (and answered) as usual.
    let flow = FlowClient::start(lab, "tcp", "10.77.0.11:5100", None)?;
    let moved = migrate(lab, "h2", "newconn", "h1")
        .and_then(|_| migrate(lab, "h1", "newconn", "h2"))
        .and_then(|_| answers(lab, "tcp", "10.77.0.11:5100"));
    let flow = flow_survived(flow);
    lab.podman("h2", &["rm", "-f", "-t", "0", "newconn"])?;
    moved?;
    flow?;
    Ok(())
}

/// A new container on the old host that publishes the departed one's port gets that
/// port's new connections: the forwarding into the tunnel yields to it.
fn forwarding_yields_to_a_new_local_container(lab: &Lab) -> Result<()> {
    lab.run_container(
        "h1",
        "leaver",
        &["-p", "5110:5000"],
        "localhost/tcp-echo",
        &[],
    )?;
    lab.wait_tcp(
        "client",
        "10.77.0.11:5110".parse()?,
        Duration::from_secs(10),
    )?;
    migrate(lab, "h1", "leaver", "h2")?;
    let forwarded = |lab: &Lab| -> Result<bool> {
        let out = lab.exec_unchecked("h1", &["nft", "list", "table", "inet", "live_migrate"])?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("dport 5110 "))
    };
    let outcome = (|| {
        ensure!(
            forwarded(lab)?,
            "h1 does not forward port 5110 after the move"
        );
        lab.run_container(
            "h1",
            "newcomer",
            &["-p", "5110:5000"],
            "localhost/tcp-echo",
            &[],
        )?;
        wait_for(
            "h1's forwarding to yield port 5110",
            Duration::from_secs(20),
            || Ok(!forwarded(lab)?),
        )?;
        // The departed container is still forwarded to (its address), not its old port.
        let (_, stdout, _) = agent_client(lab, "h1", &["status", "--json"])?;
        let status: serde_json::Value = serde_json::from_str(&stdout)?;
        ensure!(
            status["forwards"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["container"] == "leaver")),
            "the departed container's forwarding went altogether: {status}"
        );
        answers(lab, "tcp", "10.77.0.11:5110")
    })();
    let _ = lab.podman("h1", &["rm", "-f", "-t", "0", "newcomer"]);
    lab.podman("h2", &["rm", "-f", "-t", "0", "leaver"])?;
    outcome
}

fn outbound_connection(lab: &Lab) -> Result<()> {
    // The container opens the connection: to a checking server in the client namespace,
    // echoing what it sends (busybox nc), masqueraded by h1 on the way out.
    let server = FlowClient::listen(lab, "10.77.0.100:6000")?;
    wait_for("flowcheck to listen", Duration::from_secs(10), || {
        tcp_socket(lab, "client", "listening", 6000)
    })?;
    let echo_to_server = ["nc", "10.77.0.100", "6000", "-e", "/bin/cat"];
    lab.run_container("h1", "outbound", &[], "localhost/counter", &echo_to_server)?;
    wait_for(
        "the container to connect to flowcheck",
        Duration::from_secs(10),
        || tcp_socket(lab, "client", "established", 6000),
    )?;
    let migrated = migrate(lab, "h1", "outbound", "h2");
    // Load: two seconds of the flow on h2.
    std::thread::sleep(Duration::from_secs(2));
    let flow = flow_survived(server);
    let host = if exists(lab, "h2", "outbound")? {
        "h2"
    } else {
        "h1"
    };
    lab.podman(host, &["rm", "-f", "-t", "0", "outbound"])?;
    migrated?;
    flow.map(|_| ())
}

/// Whether `node` has a TCP socket in `state` (`listening`, `established`, as `ss` names
/// them) on its local port `port`.
fn tcp_socket(lab: &Lab, node: &str, state: &str, port: u16) -> Result<bool> {
    let sport = format!("sport = :{port}");
    Ok(!lab
        .exec_stdout(node, &["ss", "-Htn", "state", state, &sport])?
        .is_empty())
}

fn forwarding_removed(lab: &Lab) -> Result<()> {
    lab.run_container(
        "h1",
        "shortlived",
        &["-p", "5300:5000"],
        "localhost/tcp-echo",
        &[],
    )?;
    let ip = lab.container_ip("h1", "shortlived")?;
    lab.wait_tcp(
        "client",
        "10.77.0.11:5300".parse()?,
        Duration::from_secs(10),
    )?;
    migrate(lab, "h1", "shortlived", "h2")?;
    let route = lab.exec_stdout("h1", &["ip", "route", "show", &format!("{ip}/32")])?;
    ensure!(
        route.contains("lmwg-"),
        "h1 does not route {ip} into the tunnel: {route}"
    );
    answers(lab, "tcp", "10.77.0.11:5300")?;
    // Still needed while the container lives on h2: a few sweeps (every 5 s) change
    // nothing. The wait is the test.
    std::thread::sleep(Duration::from_secs(12));
    answers(lab, "tcp", "10.77.0.11:5300")?;
    lab.podman("h2", &["rm", "-f", "-t", "0", "shortlived"])?;
    wait_for("h1 to drop the forwarding", Duration::from_secs(60), || {
        Ok(no_agent_state(lab, "h1", &ip, 5300).is_ok())
    })?;
    let records = lab.agent_state("h1", "forwards")?;
    ensure!(records.is_empty(), "h1 keeps forward records: {records}");
    Ok(())
}

/// Nothing of a migration of the container with address `ip` and published `port` is
/// left on `host`.
fn no_agent_state(lab: &Lab, host: &str, ip: &str, port: u16) -> Result<()> {
    let route = lab.exec_stdout(
        host,
        &["ip", "route", "show", "table", "main", &format!("{ip}/32")],
    )?;
    ensure!(route.is_empty(), "{host} still routes {ip}: {route}");
    let sessions = lab.agent_state(host, "sessions")?;
    ensure!(sessions.is_empty(), "{host} has open sessions: {sessions}");
    let rules = lab.exec_stdout(
        host,
        &[
            "sh",
            "-c",
            "nft list table inet live_migrate 2>/dev/null || true",
        ],
    )?;
    ensure!(
        !rules.contains(&format!("port={port} ")),
        "{host} still forwards port {port}: {rules}"
    );
    let held = lab.hold_rules(host)?;
    ensure!(held.is_empty(), "{host} still holds packets: {held}");
    let marked = lab.exec_stdout(
        host,
        &[
            "sh",
            "-c",
            "conntrack -L -d \"$1\" 2>/dev/null | grep -c 'mark=78' || true",
            "sh",
            ip,
        ],
    )?;
    ensure!(
        marked.trim() == "0",
        "{host} keeps {marked} marked conntrack entries for {ip}"
    );
    outgoing_is_empty(lab, host)
}

fn failure_after_checkpoint(lab: &Lab) -> Result<()> {
    lab.run_container(
        "h1",
        "fragile",
        &["-p", "5200:5000"],
        "localhost/tcp-echo",
        &[],
    )?;
    let ip = lab.container_ip("h1", "fragile")?;
    lab.wait_tcp(
        "client",
        "10.77.0.11:5200".parse()?,
        Duration::from_secs(10),
    )?;
    let flow = FlowClient::start(lab, "tcp", "10.77.0.11:5200", None)?;
    // Load: the flow runs for a second before the migration.
    std::thread::sleep(Duration::from_secs(1));
    // The client stops itself once part of the archive is sent; the destination dies
    // then, with its session journaled, and the client goes on.
    let mut command = lab.command(
        "h1",
        &["agent-client", "--container", "fragile", "--dest", "h2"],
    )?;
    command
        .env("LM_FAULT", "transferring:stop")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn()?;
    let pid = child.id();
    wait_for(
        "the client to stop in the transfer",
        Duration::from_secs(60),
        || Ok(lab::procfs::is_stopped(pid)),
    )?;
    // The archive's first bytes are sent; the destination journals the session as it
    // takes them.
    wait_for(
        "h2 to journal the incoming migration",
        Duration::from_secs(30),
        || Ok(!lab.agent_state("h2", "sessions")?.is_empty()),
    )?;
    lab.kill_agent("h2")?;
    lab::procfs::kill(pid, Signal::SIGCONT);
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        seen.push_str(&line?);
        seen.push('\n');
    }
    let status = child.wait()?;
    eprintln!("{seen}");
    // With the agent still down, `cleanup` winds down what it left (as its restart would).
    let h2_status = agent_client(lab, "h2", &["status", "--json"]);
    let cleaned = agent_client(lab, "h2", &["cleanup"]);
    lab.start_agent("h2")?;
    // Load: two more seconds of the flow after the failure.
    std::thread::sleep(Duration::from_secs(2));
    let flow = flow_survived(flow);
    let running = is_running(lab, "h1", "fragile");
    lab.podman("h1", &["rm", "-f", "-t", "0", "fragile"])?;
    ensure!(
        !status.success(),
        "migration succeeded although the destination died"
    );
    ensure!(running?, "fragile is not running on h1 again");
    let h2_status: serde_json::Value = serde_json::from_str(&h2_status?.1)?;
    ensure!(
        h2_status["server_running"] == false
            && h2_status["migrations"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["direction"] == "incoming")),
        "h2's status does not show the stopped agent's session: {h2_status}"
    );
    let (ok, stdout, stderr) = cleaned?;
    ensure!(
        ok && stdout.contains("incoming migration left Receiving by a previous run wound down"),
        "cleanup on h2 did not wind down the session: {stdout}{stderr}"
    );
    flow?;
    ensure!(!exists(lab, "h2", "fragile")?, "h2 holds a copy");
    no_agent_state(lab, "h1", &ip, 5200)?;
    no_agent_state(lab, "h2", &ip, 5200)
}
