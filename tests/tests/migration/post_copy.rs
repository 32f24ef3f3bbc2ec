//! Post-copy migrations (`--mode post-copy`, CRIU's lazy pages): memory intact, nothing
//! left on the source, a live connection kept, `--mode auto` on either side of its
//! threshold, and the expected failure when the hosts' link is cut while pages move.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use lab::flow::FlowClient;
use lab::{wait_for, Lab};
use nix::sys::signal::Signal;

use super::faults::Client;
use super::{
    agent_client, flow_survived, is_running, memhog_verify, migrate_with, outgoing_is_empty,
    start_memhog,
};

/// The CRIU processes of `host` (page servers, lazy-pages daemons, dumps and restores).
pub(super) fn criu_processes(lab: &Lab, host: &str) -> Result<Vec<u32>> {
    // Processes of every host show here: only those of this host's network count.
    let listed = lab.exec_stdout(
        host,
        &[
            "sh",
            "-c",
            "for p in $(pgrep -x criu); do [ \"$(readlink /proc/$p/ns/net)\" = \"$(readlink /proc/self/ns/net)\" ] && echo $p; done; true",
        ],
    )?;
    Ok(listed
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Starts a 1 GiB memhog's migration to h2 in `mode` (one that moves the memory from
/// CRIU's page server) and holds it at the `pages` phase, with the source's page server
/// stopped (SIGSTOP), so that the memory is still moving, whatever the machine's speed.
/// Returns the client and the page server's PID.
pub(super) fn hold_while_pages_move(lab: &Lab, name: &str, mode: &str) -> Result<(Client, u32)> {
    start_memhog(lab, "h1", name, 1024, 0)?;
    let client = Client::start_with(lab, name, Some("pages:stop"), &["--mode", mode])?;
    wait_for("the pages phase", Duration::from_secs(120), || {
        Ok(lab::procfs::is_stopped(client.pid))
    })?;
    let servers = criu_processes(lab, "h1")?;
    ensure!(
        servers.len() == 1,
        "h1 has not one CRIU page server: {servers:?}"
    );
    lab::procfs::kill(servers[0], Signal::SIGSTOP);
    pages_come_under_tls(lab)?;
    only_h2_reaches_the_page_server(lab)?;
    Ok((client, servers[0]))
}

/// h1 lets only h2 reach the port of its page server: h3's connection is dropped (it
/// times out; it is not refused, nor taken).
fn only_h2_reaches_the_page_server(lab: &Lab) -> Result<()> {
    let guard = page_server_guard(lab, "h1")?.context("h1 does not guard its page server")?;
    let (address, port) = guard.rsplit_once(':').context("the guard's address")?;
    let tried = lab.exec_unchecked(
        "h3",
        &[
            "timeout",
            "2",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{address}/{port}"),
        ],
    )?;
    ensure!(
        tried.status.code() == Some(124),
        "h3's connection to h1's page server {guard} was not dropped: {tried:?}"
    );
    Ok(())
}

/// Where the guard of a page server in `host`'s table lets only its destination in, if
/// one is there.
fn page_server_guard(lab: &Lab, host: &str) -> Result<Option<String>> {
    let table = lab.exec_unchecked(host, &["nft", "list", "table", "inet", "live_migrate"])?;
    let table = String::from_utf8_lossy(&table.stdout);
    Ok(table
        .lines()
        .filter(|l| l.contains("lm:guard-pages"))
        .flat_map(str::split_whitespace)
        .find_map(|word| word.strip_prefix("at="))
        .map(str::to_string))
}

/// The lazy-pages daemon of h2 reached the source's page server under TLS (its log says
/// so only once the handshake and the check of the source's certificate passed).
fn pages_come_under_tls(lab: &Lab) -> Result<()> {
    let logs = format!(
        "{}/incoming/*.pages/lazy-pages.log",
        lab::plan::STATE_DIR_IN_HOST
    );
    let log = lab.exec_stdout("h2", &["sh", "-c", &format!("cat {logs}")])?;
    ensure!(
        log.contains("TLS handshake completed"),
        "h2's lazy-pages daemon did not connect under TLS:\n{log}"
    );
    Ok(())
}

/// Both hosts are done with every migration: no journal, session or archive is left.
pub(super) fn wait_settled(lab: &Lab) -> Result<()> {
    wait_for("both hosts to settle", Duration::from_secs(60), || {
        Ok(["h1", "h2"].iter().all(|h| {
            ["journals", "sessions", "incoming", "outgoing"]
                .iter()
                .all(|d| lab.agent_state(h, d).is_ok_and(|s| s.is_empty()))
        }))
    })
}

/// A client killed once the page server's port is guarded, before the checkpoint (fault
/// point `guarded`): its journal names the guard and the credentials' file, so
/// `agent-client cleanup` rolls it back and leaves nothing (and removes CRIU's
/// configuration); the container runs on h1, its memory intact.
pub fn guard_left_by_a_killed_client_is_cleaned_up(lab: &Lab) -> Result<()> {
    let name = "guardme";
    start_memhog(lab, "h1", name, 16, 0)?;
    let client = Client::stopped_at(lab, name, "guarded", &["--mode", "post-copy"])?;
    ensure!(
        page_server_guard(lab, "h1")?.is_some(),
        "h1 has no guard at the fault point"
    );
    lab::procfs::kill(client.pid, Signal::SIGKILL);
    let (ok, _) = client.finish_with_status()?;
    ensure!(!ok, "the killed client reported success");
    let (ok, stdout, stderr) = agent_client(lab, "h1", &["cleanup"])?;
    ensure!(ok, "cleanup failed: {stderr}");
    ensure!(
        stdout.contains(name) && stdout.contains("rolled back"),
        "cleanup did not report the rollback: {stdout}"
    );
    no_post_copy_left(lab, "h1")?;
    ensure!(is_running(lab, "h1", name)?, "{name} is not running on h1");
    memhog_verify(lab, "h1", name, 16 * 256)?;
    lab.podman("h1", &["rm", "-f", "-t", "0", name])?;
    Ok(())
}

/// Nothing of a post-copy checkpoint is left on `host`: no lazy-dump configuration, no
/// CRIU process (page server or lazy-pages daemon), no archive, journal or session.
pub(super) fn no_post_copy_left(lab: &Lab, host: &str) -> Result<()> {
    let conf = lab.exec_stdout(
        host,
        &["sh", "-c", "cat /etc/criu/runc.conf 2>/dev/null || true"],
    )?;
    ensure!(conf.is_empty(), "{host} keeps a CRIU configuration: {conf}");
    if let Some(guard) = page_server_guard(lab, host)? {
        bail!("{host} keeps the guard of a page server on {guard}");
    }
    wait_for(
        &format!("CRIU to end on {host}"),
        Duration::from_secs(30),
        || Ok(criu_processes(lab, host)?.is_empty()),
    )?;
    for dir in ["journals", "sessions", "incoming"] {
        let left = lab.agent_state(host, dir)?;
        ensure!(left.is_empty(), "{host}/{dir} keeps {left}");
    }
    outgoing_is_empty(lab, host)
}

pub fn memory_intact_and_source_keeps_nothing(lab: &Lab) -> Result<()> {
    start_memhog(lab, "h1", "lazyhog", 256, 20)?;
    let report = migrate_with(lab, "h1", "lazyhog", "h2", &["--mode", "post-copy"])?;
    ensure!(
        report["mode"]["mode"] == "post-copy",
        "ran as {}",
        report["mode"]
    );
    let archive = report["checkpoint_bytes"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        archive < 32 << 20,
        "the archive holds {archive} bytes: the memory was not left to post-copy"
    );
    let lazy = report["pages"]["pages"].as_u64().unwrap_or(0);
    ensure!(
        lazy >= 256 * 256,
        "only {lazy} pages were post-copied: {}",
        report["pages"]
    );
    ensure!(
        report["last_page_ms"].as_f64().unwrap_or(0.0)
            >= report["freeze_to_resume_ms"].as_f64().unwrap_or(f64::MAX),
        "the last page came before the container ran"
    );
    memhog_verify(lab, "h2", "lazyhog", 256 * 256)?;
    ensure!(!super::exists(lab, "h1", "lazyhog")?, "h1 keeps its copy");
    no_post_copy_left(lab, "h1")?;
    no_post_copy_left(lab, "h2")?;
    lab.podman("h2", &["rm", "-f", "-t", "0", "lazyhog"])?;
    Ok(())
}

pub fn auto_picks_each_mode_on_either_side_of_the_threshold(lab: &Lab) -> Result<()> {
    start_memhog(lab, "h1", "autohog", 64, 0)?;
    let above = migrate_with(lab, "h1", "autohog", "h2", &["--post-copy-above", "16"])?;
    ensure!(
        above["mode"]["mode"] == "post-copy",
        "64 MiB above a 16 MiB threshold ran as {}",
        above["mode"]
    );
    memhog_verify(lab, "h2", "autohog", 64 * 256)?;
    // Back the other way, now with the threshold above it.
    let migrated = super::agent_client(
        lab,
        "h2",
        &[
            "--container",
            "autohog",
            "--dest",
            "h1",
            "--json",
            "--post-copy-above",
            "1024",
        ],
    )?;
    ensure!(migrated.0, "migration back failed: {}", migrated.2);
    let below: serde_json::Value = serde_json::from_str(&migrated.1)?;
    ensure!(
        below["mode"]["mode"] == "stop-copy",
        "64 MiB below a 1024 MiB threshold ran as {}",
        below["mode"]
    );
    // Streamed (it was restored lazily, and still names that restore's CRIU
    // configuration): every page came before it ran.
    ensure!(
        below["mode"]["memory"] == "page-server",
        "not streamed: {}",
        below["mode"]
    );
    ensure!(
        below["last_page_ms"].as_f64() <= below["freeze_to_resume_ms"].as_f64(),
        "stop-copy moved pages after the container ran: {}",
        below["pages"]
    );
    memhog_verify(lab, "h1", "autohog", 64 * 256)?;
    lab.podman("h1", &["rm", "-f", "-t", "0", "autohog"])?;
    Ok(())
}

pub fn live_tcp_client_keeps_its_connection(lab: &Lab) -> Result<()> {
    lab.publish_tcp("h1", "lazyecho", "localhost/tcp-echo", 5000)?;
    let addr = "10.77.0.11:5000";
    lab.wait_tcp("client", addr.parse()?, Duration::from_secs(10))?;
    let flow = FlowClient::start(lab, "tcp", addr, None)?;
    let report = migrate_with(lab, "h1", "lazyecho", "h2", &["--mode", "post-copy"])?;
    ensure!(
        report["mode"]["mode"] == "post-copy",
        "ran as {}",
        report["mode"]
    );
    flow_survived(flow)?;
    lab.podman("h2", &["rm", "-f", "-t", "0", "lazyecho"])?;
    Ok(())
}

/// The link between the hosts goes while pages still move: the container had its memory
/// on both hosts and cannot go on. The destination stops its copy (never running on
/// missing pages), the source's processes were ended at the restore, both say so, and
/// once the link is back nothing of the migration is left.
pub fn link_cut_while_pages_move_stops_the_container(lab: &Lab) -> Result<()> {
    let (client, server) = hold_while_pages_move(lab, "cuthog", "post-copy")?;
    ensure!(
        is_running(lab, "h2", "cuthog")?,
        "h2 does not run it post-copy"
    );
    lab.cut_link("h1", "h2")?;
    lab::procfs::kill(server, Signal::SIGCONT);
    lab::procfs::kill(client.pid, Signal::SIGCONT);
    let cut = std::time::Instant::now();
    // The destination sees its page transfer fail within the dead-peer timeouts.
    wait_for("h2 to stop its copy", Duration::from_secs(40), || {
        Ok(!is_running(lab, "h2", "cuthog")?)
    })?;
    eprintln!(
        "h2 stopped its copy {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    let (ok, said) = client.finish_with_status()?;
    ensure!(!ok, "the migration claims success");
    ensure!(
        said.contains("could not go on"),
        "agent-client does not say the container could not go on: {said}"
    );
    for host in ["h1", "h2"] {
        ensure!(!is_running(lab, host, "cuthog")?, "{host} runs it");
    }
    lab.join_link()?;
    // The source's agent-server settles with the destination once it can reach it.
    wait_settled(lab)?;
    for host in ["h1", "h2"] {
        ensure!(!super::exists(lab, host, "cuthog")?, "{host} keeps a copy");
        no_post_copy_left(lab, host)?;
    }
    wait_for("h1 to drop its forwarding", Duration::from_secs(90), || {
        Ok(lab.agent_state("h1", "forwards")?.is_empty())
    })
}
