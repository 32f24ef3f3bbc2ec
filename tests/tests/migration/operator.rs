//! Scenarios of the operator's commands: `check`, Ctrl-C, `status`, `cleanup` after a
//! crashed client, and the interactive prompt driven through a real terminal (tmux).

use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use lab::{wait_for, Lab};
use nix::sys::signal::Signal;

use super::{
    agent_client, exists, is_running, memhog_verify, migrate_acting_at_transfer, outgoing_is_empty,
    start_memhog,
};

/// `check` names a port conflict on the destination with its fix, and passes once it is gone.
pub fn check_reports_conflicts(lab: &Lab) -> Result<()> {
    lab.run_container(
        "h1",
        "checkme",
        &["-p", "5100:5000"],
        "localhost/tcp-echo",
        &[],
    )?;
    lab.run_container(
        "h2",
        "squatter",
        &["-p", "5100:5000"],
        "localhost/tcp-echo",
        &[],
    )?;
    let (ok, stdout, _) = agent_client(
        lab,
        "h1",
        &["check", "--container", "checkme", "--dest", "h2", "--json"],
    )?;
    ensure!(!ok, "check passed despite the port conflict");
    let survey: serde_json::Value = serde_json::from_str(&stdout).context("check --json")?;
    let problems: Vec<&serde_json::Value> = survey["findings"]
        .as_array()
        .context("findings")?
        .iter()
        .filter(|f| f["severity"] == "problem")
        .collect();
    ensure!(
        problems.len() == 1 && problems[0]["check"] == "ports",
        "expected exactly the port conflict: {problems:?}"
    );
    ensure!(
        problems[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("tcp/5100 (squatter)"))
            && problems[0]["fix"].is_string(),
        "the problem names neither the culprit nor a fix: {:?}",
        problems[0]
    );
    // A migration is refused for the same reason, and changes nothing.
    let (ok, _, stderr) = agent_client(lab, "h1", &["--container", "checkme", "--dest", "h2"])?;
    ensure!(
        !ok && stderr.contains("tcp/5100 (squatter)"),
        "migration was not refused: {stderr}"
    );
    ensure!(is_running(lab, "h1", "checkme")?, "checkme stopped on h1");

    lab.podman("h2", &["rm", "-f", "-t", "0", "squatter"])?;
    let (ok, stdout, _) = agent_client(
        lab,
        "h1",
        &["check", "--container", "checkme", "--dest", "h2"],
    )?;
    ensure!(ok, "check failed without a conflict:\n{stdout}");
    ensure!(
        stdout.contains("tunnel") && stdout.contains("runc") && stdout.contains("CRIU"),
        "check output lacks the tunnel, runtime or CRIU lines:\n{stdout}"
    );
    ensure!(
        ["(userspace WireGuard)", "(kernel WireGuard)"]
            .iter()
            .any(|backend| stdout.contains(backend)),
        "check does not say which WireGuard serves the tunnel:\n{stdout}"
    );
    // An unreachable destination is a problem with a fix, next to the source's findings.
    lab.stop_agent("h2")?;
    let checked = agent_client(
        lab,
        "h1",
        &["check", "--container", "checkme", "--dest", "h2"],
    );
    lab.start_agent("h2")?;
    let (ok, stdout, _) = checked?;
    ensure!(!ok, "check passed with the destination agent down");
    ensure!(
        stdout.contains("PROBLEM") && stdout.contains("start agent-server on h2"),
        "check does not say the agent is down and how to fix it:\n{stdout}"
    );
    ensure!(
        stdout.contains("h1") && stdout.contains("runc"),
        "check lost the source's findings:\n{stdout}"
    );
    lab.podman("h1", &["rm", "-f", "-t", "0", "checkme"])?;
    Ok(())
}

/// Starts migrating a 512 MiB memhog h1 -> h2 and sends `signal` to the client as soon as
/// the transfer starts; returns the client's exit status.
fn interrupt_at_transfer(lab: &Lab, name: &str, signal: Signal) -> Result<ExitStatus> {
    start_memhog(lab, "h1", name, 512, 5)?;
    let (status, seen, sent) = migrate_acting_at_transfer(lab, name, |client| {
        lab::procfs::kill(client, signal);
        Ok(())
    })?;
    eprintln!("{seen}");
    ensure!(sent, "the migration never reached the transfer");
    Ok(status)
}

/// The memhog of [`interrupt_at_transfer`] runs on h1 with its memory intact, and neither
/// host keeps anything of the migration that did not happen.
fn back_on_source_intact(lab: &Lab, name: &str) -> Result<()> {
    ensure!(is_running(lab, "h1", name)?, "{name} is not running on h1");
    memhog_verify(lab, "h1", name, 512 * 256)?;
    ensure!(!exists(lab, "h2", name)?, "h2 holds a copy of {name}");
    outgoing_is_empty(lab, "h1")?;
    let (ok, stdout, _) = agent_client(lab, "h1", &["status", "--json"])?;
    ensure!(ok, "status failed");
    let status: serde_json::Value = serde_json::from_str(&stdout)?;
    ensure!(
        status["migrations"].as_array().is_some_and(Vec::is_empty),
        "migrations still under way on h1: {}",
        status["migrations"]
    );
    wait_for("h2 to drop the archive", Duration::from_secs(10), || {
        Ok(lab.agent_state("h2", "incoming")?.is_empty())
    })
}

/// Ctrl-C during the transfer: exit 130, the container runs on the source with its memory.
pub fn ctrl_c_aborts_before_switch(lab: &Lab) -> Result<()> {
    let status = interrupt_at_transfer(lab, "abortme", Signal::SIGINT)?;
    ensure!(
        status.code() == Some(130),
        "expected exit status 130 after Ctrl-C, got {status}"
    );
    back_on_source_intact(lab, "abortme")?;
    lab.podman("h1", &["rm", "-f", "-t", "0", "abortme"])?;
    Ok(())
}

/// A client killed mid-transfer leaves a stopped container; `status` shows the abandoned
/// migration and `cleanup` brings the container back on the source.
pub fn cleanup_after_crashed_client(lab: &Lab) -> Result<()> {
    // agent-server would adopt the migration within seconds (the fault matrix shows it):
    // without it, the operator's cleanup does the same.
    lab.stop_agent("h1")?;
    let result = crashed_client_cleaned_up(lab);
    lab.start_agent("h1")?;
    result
}

fn crashed_client_cleaned_up(lab: &Lab) -> Result<()> {
    let status = interrupt_at_transfer(lab, "crashme", Signal::SIGKILL)?;
    ensure!(!status.success(), "the killed client reported success");
    ensure!(
        !is_running(lab, "h1", "crashme")?,
        "crashme runs on h1 although its checkpoint was never finished"
    );
    let (_, stdout, _) = agent_client(lab, "h1", &["status", "--json"])?;
    let status: serde_json::Value = serde_json::from_str(&stdout)?;
    let abandoned = status["migrations"]
        .as_array()
        .context("migrations")?
        .iter()
        .any(|m| m["container"] == "crashme" && m["running"] == false);
    ensure!(
        abandoned,
        "status does not show the abandoned migration: {status}"
    );

    let (ok, stdout, stderr) = agent_client(lab, "h1", &["cleanup"])?;
    ensure!(ok, "cleanup failed: {stderr}");
    ensure!(
        stdout.contains("crashme") && stdout.contains("rolled back"),
        "cleanup did not report the rollback: {stdout}"
    );
    back_on_source_intact(lab, "crashme")?;
    let (_, stdout, _) = agent_client(lab, "h1", &["cleanup"])?;
    ensure!(
        !stdout.contains("crashme"),
        "a second cleanup found crashme again: {stdout}"
    );
    lab.podman("h1", &["rm", "-f", "-t", "0", "crashme"])?;
    Ok(())
}

/// A terminal on h1 in a private tmux server, running `argv`.
struct Terminal {
    socket: String,
}

impl Terminal {
    fn start(lab: &Lab, host: &str, argv: &[&str]) -> Result<Self> {
        let socket = format!("{}-tty", lab.name());
        let host_command = lab.command(host, argv)?;
        // tmux runs the command without a shell: program, arguments and environment are
        // passed as separate words.
        let mut tmux = Command::new("tmux");
        tmux.args([
            "-L",
            &socket,
            "new-session",
            "-d",
            "-s",
            "lm",
            "-x",
            "200",
            "-y",
            "60",
        ]);
        tmux.arg("env");
        for (key, value) in host_command.get_envs() {
            if let Some(value) = value {
                let mut pair = key.to_os_string();
                pair.push("=");
                pair.push(value);
                tmux.arg(pair);
            }
        }
        tmux.arg(host_command.get_program())
            .args(host_command.get_args());
        lab::cmd::run(&mut tmux)?;
        let terminal = Self { socket };
        // Keep the screen once the program exits, to read its last words.
        terminal.tmux(&["set-option", "-t", "lm", "remain-on-exit", "on"])?;
        Ok(terminal)
    }

    fn tmux(&self, args: &[&str]) -> Result<String> {
        let out = lab::cmd::output(Command::new("tmux").args(["-L", &self.socket]).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn screen(&self) -> Result<String> {
        self.tmux(&["capture-pane", "-p", "-t", "lm", "-S", "-200"])
    }

    fn wait_for_text(&self, text: &str, timeout: Duration) -> Result<String> {
        let mut screen = String::new();
        wait_for(&format!("{text:?} on the terminal"), timeout, || {
            screen = self.screen()?;
            Ok(screen.contains(text))
        })
        .with_context(|| format!("the terminal shows:\n{screen}"))?;
        Ok(screen)
    }

    /// Waits for the program to exit with `code`. The status comes from tmux, or from the
    /// kernel while the program is a zombie: tmux has been seen to leave one unreaped for a
    /// while, its pane still "alive".
    fn wait_for_exit(&self, code: i32, timeout: Duration) -> Result<()> {
        let pid = self.tmux(&["display", "-p", "-t", "lm", "#{pane_pid}"])?;
        let pid = pid.trim();
        let mut ended = None;
        wait_for("the program to exit", timeout, || {
            let state = self.tmux(&[
                "display",
                "-p",
                "-t",
                "lm",
                "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}",
            ])?;
            ended = match state.trim().split(':').collect::<Vec<_>>()[..] {
                ["1", status, ""] if !status.is_empty() => Some(format!("status {status}")),
                ["1", "", signal] if !signal.is_empty() => Some(format!("signal {signal}")),
                _ => zombie_status(pid),
            };
            Ok(ended.is_some())
        })
        .with_context(|| format!("the terminal shows:\n{}", self.screen().unwrap_or_default()))?;
        let ended = ended.unwrap_or_default();
        ensure!(
            ended == format!("status {code}"),
            "the program ended with {ended}, not with status {code}"
        );
        Ok(())
    }

    fn keys(&self, keys: &[&str]) -> Result<()> {
        let mut args = vec!["send-keys", "-t", "lm"];
        args.extend_from_slice(keys);
        self.tmux(&args).map(drop)
    }
}

/// How process `pid` ended, if it is a zombie: from the `exit_code` field of
/// /proc/PID/stat (field 52, as waitpid(2) reports it).
fn zombie_status(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Fields after the command name start at field 3 (state).
    if fields.first() != Some(&"Z") {
        return None;
    }
    let code: i32 = fields.get(52 - 3)?.parse().ok()?;
    Some(if code & 0x7f == 0 {
        format!("status {}", code >> 8)
    } else {
        format!("signal {}", code & 0x7f)
    })
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

/// The interactive client in a real terminal: the operator picks a container among the
/// running ones, types a destination, reads the preflight, confirms, and sees the phases
/// and the summary. Then `status` on both hosts tells the story.
pub fn interactive_migration_in_a_terminal(lab: &Lab) -> Result<()> {
    lab.run_container("h1", "decoy", &[], "localhost/counter", &[])?;
    lab.run_container(
        "h1",
        "pickme",
        &["-p", "5101:5000"],
        "localhost/tcp-echo",
        &[],
    )?;
    let long = Duration::from_secs(60);

    // Ctrl-C at the first prompt changes nothing and says so.
    let terminal = Terminal::start(lab, "h1", &["agent-client"])?;
    terminal.wait_for_text("Container to migrate", long)?;
    terminal.keys(&["C-c"])?;
    terminal.wait_for_exit(130, long)?;
    terminal.wait_for_text("cancelled: nothing was changed", long)?;
    drop(terminal);

    let terminal = Terminal::start(lab, "h1", &["agent-client"])?;
    let screen = terminal.wait_for_text("Container to migrate", long)?;
    ensure!(
        screen.contains("decoy") && screen.contains("5101->5000/tcp"),
        "the list lacks a running container or its ports:\n{screen}"
    );
    terminal.keys(&["pickme", "Enter"])?;
    let screen = terminal.wait_for_text("Destination", long)?;
    if screen.contains("used before") {
        terminal.keys(&["another", "Enter"])?;
        terminal.wait_for_text("Destination agent", long)?;
    }
    terminal.keys(&["h3", "Enter"])?;
    // A small container: auto picks stop-copy, and the prompt says so.
    let screen = terminal.wait_for_text("Migrate pickme to h3, stop-copy", long)?;
    ensure!(
        screen.contains("tunnel") && screen.contains("ports") && screen.contains("post-copy"),
        "no preflight summary (with post-copy) before the confirmation:\n{screen}"
    );
    terminal.keys(&["y"])?;
    let screen = terminal.wait_for_text("freeze-to-resume", Duration::from_secs(180))?;
    ensure!(
        screen.contains("migrated pickme") && screen.contains("switch traffic"),
        "no phases or summary after the migration:\n{screen}"
    );
    terminal.wait_for_exit(0, Duration::from_secs(10))?;
    ensure!(
        is_running(lab, "h3", "pickme")?,
        "pickme is not running on h3"
    );
    ensure!(!exists(lab, "h1", "pickme")?, "pickme is still on h1");
    ensure!(is_running(lab, "h1", "decoy")?, "decoy was touched");

    let (_, stdout, _) = agent_client(lab, "h1", &["status", "--json"])?;
    let source: serde_json::Value = serde_json::from_str(&stdout)?;
    ensure!(
        source["forwards"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["container"] == "pickme")),
        "h1 does not show the forwarding of pickme: {source}"
    );
    let last = source["history"].as_array().and_then(|h| h.last());
    ensure!(
        last.is_some_and(|h| h["container"] == "pickme"
            && h["direction"] == "outgoing"
            && h["succeeded"] == true),
        "h1's history does not end with the migration: {last:?}"
    );
    let (_, stdout, _) = agent_client(lab, "h3", &["status"])?;
    ensure!(
        stdout.contains("pickme") && stdout.contains("incoming") && stdout.contains("lmwg-"),
        "h3's status lacks the incoming migration or the tunnel:\n{stdout}"
    );
    lab.podman("h3", &["rm", "-f", "-t", "0", "pickme"])?;
    lab.podman("h1", &["rm", "-f", "-t", "0", "decoy"])?;
    Ok(())
}
