//! Streamed stop-copy (`--mode stop-copy` where both hosts serve lazy pages): the memory
//! goes from CRIU's page server into a stopped replica on the destination, which runs only
//! once all of it is there and the source's processes are gone. Memory intact and nothing
//! left; and the faults that decide it: the link cut while the memory streams (the source
//! runs it again), the source's agent-client killed at CRIU's pre-dump hook, and before
//! and after the last page (its agent-server rolls back, or has the destination resume
//! the replica), and the destination's agent-server killed while it streams (restarted,
//! it takes over the transfer, or learns that it ended, and keeps the replica).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use lab::{wait_for, Lab};
use nix::sys::signal::Signal;

use super::faults::Client;
use super::post_copy::{criu_processes, hold_while_pages_move, no_post_copy_left, wait_settled};
use super::{exists, is_running, memhog_verify, migrate_with, start_memhog};

/// The state letter of the container's init (`T`: stopped), or `None` if it has none.
fn init_state(lab: &Lab, host: &str, name: &str) -> Result<Option<char>> {
    let pid = lab.podman(host, &["inspect", "--format", "{{.State.Pid}}", name])?;
    let pid: u32 = pid.trim().parse().context("podman's pid")?;
    if pid == 0 {
        return Ok(None);
    }
    // One PID namespace for all the lab's hosts: its /proc is ours.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    Ok(stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next()))
}

/// [`hold_while_pages_move`] in a streamed stop-copy, whose replica on h2 stays stopped.
fn hold_while_streaming(lab: &Lab, name: &str) -> Result<(Client, u32)> {
    let held = hold_while_pages_move(lab, name, "stop-copy")?;
    ensure!(
        init_state(lab, "h2", name)? == Some('T'),
        "h2's replica is not stopped"
    );
    Ok(held)
}

pub fn memory_intact_and_source_keeps_nothing(lab: &Lab) -> Result<()> {
    start_memhog(lab, "h1", "streamhog", 256, 20)?;
    let report = migrate_with(lab, "h1", "streamhog", "h2", &["--mode", "stop-copy"])?;
    ensure!(
        report["mode"]["mode"] == "stop-copy" && report["mode"]["memory"] == "page-server",
        "ran as {}",
        report["mode"]
    );
    let archive = report["checkpoint_bytes"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        archive < 32 << 20,
        "the archive holds {archive} bytes: the memory did not stream"
    );
    let streamed = report["pages"]["pages"].as_u64().unwrap_or(0);
    ensure!(
        streamed >= 256 * 256,
        "only {streamed} pages streamed: {}",
        report["pages"]
    );
    ensure!(
        report["freeze_steps"]["pages_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "the freeze does not cover the memory: {}",
        report["freeze_steps"]
    );
    // CRIU's restore time comes from the lazy-pages work directory; runc's, which podman
    // does not measure for a lazy restore, is unknown rather than 0.
    let steps = &report["freeze_steps"];
    ensure!(
        steps["destination_criu_ms"].as_f64().unwrap_or(0.0) > 0.0
            && steps["destination_runtime_ms"].is_null(),
        "the destination's steps: {steps}"
    );
    ensure!(
        init_state(lab, "h2", "streamhog")? != Some('T'),
        "h2's copy is still stopped"
    );
    memhog_verify(lab, "h2", "streamhog", 256 * 256)?;
    ensure!(!exists(lab, "h1", "streamhog")?, "h1 keeps its copy");
    no_post_copy_left(lab, "h1")?;
    no_post_copy_left(lab, "h2")?;
    lab.podman("h2", &["rm", "-f", "-t", "0", "streamhog"])?;
    Ok(())
}

/// The link goes while the memory streams: the replica never runs and goes; the
/// processes on h1, which CRIU still held, run on with their memory intact.
pub fn link_cut_while_memory_streams_rolls_back(lab: &Lab) -> Result<()> {
    let (client, server) = hold_while_streaming(lab, "cutstream")?;
    lab.cut_link("h1", "h2")?;
    lab::procfs::kill(server, Signal::SIGCONT);
    lab::procfs::kill(client.pid, Signal::SIGCONT);
    let (ok, said) = client.finish_with_status()?;
    ensure!(!ok, "the migration claims success");
    ensure!(
        said.contains("rolling back: start cutstream on this host again"),
        "agent-client does not say the container runs on h1: {said}"
    );
    ensure!(is_running(lab, "h1", "cutstream")?, "h1 does not run it");
    // h2 sees its page transfer fail within the dead-peer timeouts.
    wait_for("h2 to drop its replica", Duration::from_secs(40), || {
        Ok(!exists(lab, "h2", "cutstream")?)
    })?;
    lab.join_link()?;
    wait_settled(lab)?;
    memhog_verify(lab, "h1", "cutstream", 1024 * 256)?;
    for host in ["h1", "h2"] {
        no_post_copy_left(lab, host)?;
    }
    ensure!(!exists(lab, "h2", "cutstream")?, "h2 keeps a copy");
    lab.podman("h1", &["rm", "-f", "-t", "0", "cutstream"])?;
    Ok(())
}

/// agent-client dies while the memory streams: h1's agent-server adopts the migration,
/// stops the page server, finds the processes alive and rolls back; the replica is
/// fenced.
pub fn client_killed_while_memory_streams_rolls_back(lab: &Lab) -> Result<()> {
    // The page server stays stopped: the adopter stops it for good.
    let (client, _server) = hold_while_streaming(lab, "killstream")?;
    lab::procfs::kill(client.pid, Signal::SIGKILL);
    let _ = client.finish_with_status()?;
    wait_settled(lab)?;
    ensure!(is_running(lab, "h1", "killstream")?, "h1 does not run it");
    ensure!(!exists(lab, "h2", "killstream")?, "h2 keeps its replica");
    memhog_verify(lab, "h1", "killstream", 1024 * 256)?;
    for host in ["h1", "h2"] {
        no_post_copy_left(lab, host)?;
    }
    lab.podman("h1", &["rm", "-f", "-t", "0", "killstream"])?;
    Ok(())
}

/// agent-client dies while CRIU waits on its pre-dump hook, the container frozen and its
/// packets held: the hook fails CRIU's dump, so nothing was checkpointed; h1's
/// agent-server rolls the migration back from its journal, the container runs on h1
/// again (thawed: memhog answers), and nothing is left on either host.
pub fn client_killed_at_the_pre_dump_hook_rolls_back(lab: &Lab) -> Result<()> {
    let name = "hookstream";
    start_memhog(lab, "h1", name, 16, 0)?;
    let client = Client::stopped_at(lab, name, "frozen", &["--mode", "stop-copy"])?;
    let cgroup = lab.podman(
        "h1",
        &["inspect", "--format", "{{.State.CgroupPath}}", name],
    )?;
    ensure!(
        common::kernel::freezer::is_frozen(cgroup.trim())?,
        "not frozen at the hook"
    );
    lab::procfs::kill(client.pid, Signal::SIGKILL);
    let (ok, _) = client.finish_with_status()?;
    ensure!(!ok, "the killed client reported success");
    wait_settled(lab)?;
    ensure!(is_running(lab, "h1", name)?, "h1 does not run it");
    ensure!(!exists(lab, "h2", name)?, "h2 has a copy");
    memhog_verify(lab, "h1", name, 16 * 256)?;
    for host in ["h1", "h2"] {
        no_post_copy_left(lab, host)?;
    }
    lab.podman("h1", &["rm", "-f", "-t", "0", name])?;
    Ok(())
}

/// agent-client dies once the last page is on h2 (CRIU has ended the processes on h1):
/// only the replica can run, and h1's agent-server has h2 resume it.
pub fn client_killed_after_the_last_page_resumes_the_replica(lab: &Lab) -> Result<()> {
    start_memhog(lab, "h1", "laststream", 256, 0)?;
    let client = Client::start_with(
        lab,
        "laststream",
        Some("pages:stop"),
        &["--mode", "stop-copy"],
    )?;
    wait_for("the pages phase", Duration::from_secs(120), || {
        Ok(lab::procfs::is_stopped(client.pid))
    })?;
    // The page server ends once h2 has every page, and CRIU with it ends the processes.
    wait_for(
        "the last page to leave h1",
        Duration::from_secs(120),
        || Ok(criu_processes(lab, "h1")?.is_empty()),
    )?;
    ensure!(
        init_state(lab, "h2", "laststream")? == Some('T'),
        "h2's replica runs before it was resumed"
    );
    lab::procfs::kill(client.pid, Signal::SIGKILL);
    let _ = client.finish_with_status()?;
    wait_settled(lab)?;
    ensure!(!exists(lab, "h1", "laststream")?, "h1 keeps its copy");
    ensure!(
        is_running(lab, "h2", "laststream")? && init_state(lab, "h2", "laststream")? != Some('T'),
        "h2 does not run its replica"
    );
    memhog_verify(lab, "h2", "laststream", 256 * 256)?;
    for host in ["h1", "h2"] {
        no_post_copy_left(lab, host)?;
    }
    lab.podman("h2", &["rm", "-f", "-t", "0", "laststream"])?;
    Ok(())
}

/// h2's agent-server dies while the memory streams; its lazy-pages daemon goes on
/// without it. Restarted, the agent watches the daemon again; once the last page is
/// there (and CRIU has ended the processes on h1), the replica is the only copy, and it
/// runs when the source says so.
pub fn destination_agent_killed_while_memory_streams_takes_over(lab: &Lab) -> Result<()> {
    let (client, server) = hold_while_streaming(lab, "orphanstream")?;
    lab.kill_agent("h2")?;
    ensure!(
        !criu_processes(lab, "h2")?.is_empty(),
        "h2's lazy-pages daemon died with its agent"
    );
    lab.start_agent("h2")?;
    lab::procfs::kill(server, Signal::SIGCONT);
    resumed_on_h2_after_the_last_page(lab, client, "orphanstream")
}

/// h2's agent-server dies while the memory streams, and every page arrives while it is
/// down: restarted, it learns so from the daemon's log and keeps the replica, which
/// runs when the source says so.
pub fn destination_agent_down_until_the_last_page_keeps_the_replica(lab: &Lab) -> Result<()> {
    let (client, server) = hold_while_streaming(lab, "downstream")?;
    lab.kill_agent("h2")?;
    lab::procfs::kill(server, Signal::SIGCONT);
    wait_for(
        "h2's lazy-pages daemon to end",
        Duration::from_secs(120),
        || Ok(criu_processes(lab, "h2")?.is_empty()),
    )?;
    lab.start_agent("h2")?;
    resumed_on_h2_after_the_last_page(lab, client, "downstream")
}

/// Once CRIU has ended the processes on h1 (the last page left), the held agent-client
/// goes on: the migration ends with h2 running the replica, the memory intact, and
/// nothing of it left on either host.
fn resumed_on_h2_after_the_last_page(lab: &Lab, client: Client, name: &str) -> Result<()> {
    wait_for(
        "the last page to leave h1",
        Duration::from_secs(120),
        || Ok(criu_processes(lab, "h1")?.is_empty()),
    )?;
    lab::procfs::kill(client.pid, Signal::SIGCONT);
    let (_, said) = client.finish_with_status()?;
    ensure!(
        said.contains("the destination runs the container"),
        "agent-client does not say h2 runs it: {said}"
    );
    wait_settled(lab)?;
    ensure!(!exists(lab, "h1", name)?, "h1 keeps its copy: {said}");
    ensure!(
        is_running(lab, "h2", name)? && init_state(lab, "h2", name)? != Some('T'),
        "h2 does not run its replica: {said}"
    );
    memhog_verify(lab, "h2", name, 1024 * 256)?;
    for host in ["h1", "h2"] {
        no_post_copy_left(lab, host)?;
    }
    lab.podman("h2", &["rm", "-f", "-t", "0", name])?;
    Ok(())
}
