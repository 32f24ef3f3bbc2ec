//! Test-only fault injection at named steps of a migration, compiled into debug builds
//! only (release builds, which users run, have none of it).
//!
//! `LM_FAULT=POINT:ACTION[,POINT:ACTION...]` in the environment of `agent-client` or
//! `agent-server`, or the same text in the file `STATE_DIR/inject-fault` (read when the
//! point is reached, so a running agent can be armed; removed once it fires). Actions:
//! - `stop`: print `fault point POINT reached` on stderr and stop the process (SIGSTOP), so
//!   a test can act at exactly that step (kill it, cut the link, or let it go on with
//!   SIGCONT);
//! - `fail`: the step fails with an error.
//!
//! Points: `guarded` (source, lazy dumps: the page server's port is guarded and
//! journaled, nothing frozen yet), `frozen` (source, lazy dumps: the container's packets
//! are held and its cgroup frozen, and CRIU waits on the pre-dump hook), `checkpointed` (source: the container is stopped,
//! before the transfer), `transferring` (source: after the first part of the archive is sent),
//! `restore-requested` (source: the restore request is sent, before its answer), `pages`
//! (source, lazy dumps: before it waits for the destination's last page), `restored`
//! (destination: it owns the container, before it answers), `switching` (source: before
//! the traffic is switched), `restore` (destination: podman's restore).

use std::path::Path;

#[cfg(debug_assertions)]
pub fn at(state_dir: &Path, point: &str) -> anyhow::Result<()> {
    let file = state_dir.join("inject-fault");
    let from_file = std::fs::read_to_string(&file).ok();
    let spec = from_file
        .clone()
        .or_else(|| std::env::var("LM_FAULT").ok())
        .unwrap_or_default();
    let Some(action) = spec.split(',').find_map(|entry| {
        let (name, action) = entry.trim().split_once(':')?;
        (name == point).then(|| action.to_string())
    }) else {
        return Ok(());
    };
    if from_file.is_some() {
        let _ = std::fs::remove_file(&file);
    }
    match action.as_str() {
        "stop" => {
            eprintln!("fault point {point} reached");
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP)?;
            Ok(())
        }
        "fail" => anyhow::bail!("injected fault at {point}"),
        other => anyhow::bail!("unknown fault action {other:?} at {point}"),
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn at(_state_dir: &Path, _point: &str) -> anyhow::Result<()> {
    Ok(())
}
