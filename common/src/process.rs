//! Ending processes by PID: the copies of a container that must never run again, and
//! CRIU's page server.

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

/// Whether `pid` still exists (until its parent reaps it).
pub fn exists(pid: i32) -> bool {
    signal(Pid::from_raw(pid), None).is_ok()
}
