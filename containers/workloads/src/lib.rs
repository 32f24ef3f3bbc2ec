//! Helpers shared by the test workloads that run inside migrated containers.

use std::io::Write;
use std::str::FromStr;

/// Prints `usage` and exits when the workload is run with `-h` or `--help`. The workloads
/// take no arguments: they run as a container's entrypoint and read their settings from
/// the environment, which `usage` lists.
pub fn help_if_asked(usage: &str) {
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        println!("{usage}");
        std::process::exit(0);
    }
}

/// Reads a setting from the environment, falling back to `default` when it is
/// unset; a malformed value is fatal so a typo in a lab scenario is not
/// silently replaced by the default.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("invalid value for {name}: {v:?}");
            std::process::exit(2)
        }),
        Err(_) => default,
    }
}

/// Makes SIGTERM/SIGINT end the process immediately.
///
/// The workloads run as PID 1 of their container, and the kernel drops
/// signals whose action is the default for a namespace's init, so without a
/// handler `podman stop` would wait for its timeout and then SIGKILL.
pub fn exit_on_termination() {
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // SAFETY: the handler only calls `_exit`, which is async-signal-safe.
        let res =
            unsafe { signal_hook::low_level::register(sig, || signal_hook::low_level::exit(0)) };
        if let Err(e) = res {
            eprintln!("cannot install handler for signal {sig}: {e}");
        }
    }
}

/// Prints one line and flushes, because stdout is a pipe under podman (block
/// buffered) and the lab waits for these lines in the container log.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not kill the workload: its output is informational.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
