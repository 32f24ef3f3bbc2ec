//! Processes and namespaces as /proc shows them: a namespace's identity, a process's state
//! and start time, signals.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The inode of `/proc/PID/ns/KIND` (`net`, `mnt`, `uts`), i.e. the namespace's identity.
pub fn ns_inode(pid: u32, kind: &str) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|m| m.ino())
}

/// The namespace inode behind a namespace file, or `None` if the file is missing or is a
/// plain file with nothing mounted on it (then its inode is a file-system one, which could
/// coincide with a namespace inode number).
pub fn ns_file_inode(p: &Path) -> Option<u64> {
    let m = fs::metadata(p).ok()?;
    let parent = fs::metadata(p.parent()?).ok()?;
    (m.dev() != parent.dev()).then_some(m.ino())
}

/// Whether `pid` is a zombie (or gone).
pub fn is_zombie(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => stat_fields(&s).first().is_none_or(|st| *st == "Z"),
        Err(_) => true,
    }
}

/// Whether `pid` is stopped (by SIGSTOP: a fault point it reached).
pub fn is_stopped(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| stat_fields(&s).first().is_some_and(|st| *st == "T"))
}

/// Fields of /proc/PID/stat after the `(comm)` field (comm may contain spaces): the
/// first is the state (field 3), index 19 is the start time (field 22).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// Start time (clock ticks since boot) of `pid`.
pub fn start_time(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&s).get(19)?.parse().ok()
}

/// Sends `sig` to `pid` (errors ignored: it may be gone already).
pub fn kill(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_handles_spaces_in_comm() {
        let s = "123 (a b) c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        let f = stat_fields(s);
        assert_eq!(f[0], "S");
        assert_eq!(f[19], "98765");
    }
}
