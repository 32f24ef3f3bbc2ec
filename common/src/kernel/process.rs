//! Ending processes by PID: the copies of a container that must never run again, CRIU's
//! page server, and a userspace WireGuard daemon that outlives its interface; and what
//! procfs says of one (alive, parent).

use nix::errno::Errno;
use nix::sys::signal::{kill as signal, Signal};
use nix::unistd::Pid;

/// SIGKILL to `pid`; a process that is gone already is fine.
pub fn kill(pid: i32) -> nix::Result<()> {
    match signal(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// SIGKILL to `pid` if it is a process of the container `container_id` (its cgroup names
/// it): a PID that its process gave back, and that another one took since, is left alone.
/// The signal goes through a pidfd opened before the check, so it reaches the process that
/// was checked or none. Returns whether it was sent.
pub fn kill_in(pid: i32, container_id: &str) -> std::io::Result<bool> {
    use rustix::process::{pidfd_open, pidfd_send_signal, Pid as RawPid, PidfdFlags};
    let Some(raw) = RawPid::from_raw(pid) else {
        return Ok(false);
    };
    let pidfd = match pidfd_open(raw, PidfdFlags::empty()) {
        Ok(pidfd) => pidfd,
        Err(rustix::io::Errno::SRCH) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if !in_container(pid, container_id) {
        return Ok(false);
    }
    match pidfd_send_signal(&pidfd, rustix::process::Signal::KILL) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::SRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// SIGTERM to `pid`; a process that is gone already is fine.
pub fn terminate(pid: i32) -> nix::Result<()> {
    match signal(Pid::from_raw(pid), Signal::SIGTERM) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `pid` still exists (until its parent reaps it).
pub fn exists(pid: i32) -> bool {
    signal(Pid::from_raw(pid), None).is_ok()
}

/// SIGCONT to each of `pids`: they go on after a stop (CRIU's `leave-stopped` restore).
/// One that is gone meanwhile needs none. Err names the first that refused.
pub fn resume_all(pids: &[i32]) -> Result<(), (i32, nix::Error)> {
    for &pid in pids {
        match signal(Pid::from_raw(pid), Signal::SIGCONT) {
            Ok(()) | Err(nix::Error::ESRCH) => {}
            Err(e) => return Err((pid, e)),
        }
    }
    Ok(())
}

/// Whether `pid` is a live process of the container `container_id` (its cgroup names
/// it): not gone, not a zombie, and no SIGKILL pending (CRIU has ended it, it just has not
/// died yet).
pub fn alive_in(pid: i32, container_id: &str) -> bool {
    let read = |file: &str| std::fs::read_to_string(format!("/proc/{pid}/{file}"));
    let (Ok(stat), Ok(status)) = (read("stat"), read("status")) else {
        return false;
    };
    let state = state_of(&stat);
    let dying = status.lines().any(|line| {
        line.strip_prefix("SigPnd:")
            .or_else(|| line.strip_prefix("ShdPnd:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (Signal::SIGKILL as u64 - 1)) != 0)
    });
    !matches!(state, None | Some("Z" | "X" | "x")) && !dying && in_container(pid, container_id)
}

/// Whether the cgroup of `pid` names the container `container_id` (podman's cgroups do).
fn in_container(pid: i32, container_id: &str) -> bool {
    !container_id.is_empty()
        && std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|cgroup| cgroup.contains(container_id))
}

/// The parent of `pid`, if it is still there.
pub fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    after_command(&stat)?.nth(1)?.parse().ok()
}

/// Whether `pid` is gone, or dead and not reaped yet (a zombie).
pub fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => state_of(&stat).is_some_and(|s| s.starts_with(['Z', 'X'])),
    }
}

/// The state letter in the text of `/proc/<pid>/stat`.
fn state_of(stat: &str) -> Option<&str> {
    after_command(stat)?.next()
}

/// The fields of the text of `/proc/<pid>/stat` after the command name, from the state
/// on (`<state> <ppid> ...`): the name is in parentheses and may hold anything.
fn after_command(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat.rsplit_once(')')?.1.split_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_passes_over_a_process_that_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id() as i32;
        child.wait().unwrap();
        let me = std::process::id() as i32;
        assert_eq!(resume_all(&[gone, me]), Ok(()));
        // Above pid_max: no such process either.
        assert_eq!(resume_all(&[i32::MAX]), Ok(()));
    }

    #[test]
    fn this_process_is_alive_only_in_its_own_cgroup() {
        let pid = std::process::id() as i32;
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let ours = cgroup
            .lines()
            .next()
            .and_then(|l| l.rsplit('/').next())
            .unwrap();
        if !ours.is_empty() {
            assert!(alive_in(pid, ours));
        }
        assert!(!alive_in(pid, "no-such-container-0123456789abcdef"));
        assert!(!alive_in(i32::MAX, ours));
    }

    #[test]
    fn only_a_missing_process_is_gone() {
        assert!(!gone(std::process::id() as i32));
        assert!(gone(i32::MAX));
        assert_eq!(state_of("12 (a) b) S 1 2"), Some("S"));
        assert_eq!(
            after_command("12 (a) b) S 1 2").and_then(|mut f| f.nth(1)),
            Some("1")
        );
        assert_eq!(state_of("12 (a"), None);
    }
}
