//! What the test binaries share: whether the lab tests can run on this machine, a runner
//! that reports them as ignored (with the reason, said once) when they cannot, and waiting
//! on a condition instead of sleeping.

use std::time::Duration;

use anyhow::Result;
use libtest_mimic::{Arguments, Failed, Trial};

use crate::cmd;

/// Why the lab tests cannot run here, or `None` when they can: `LM_LAB_SKIP` set to
/// anything but `0`, or not root (network and mount namespaces, podman, CRIU). Such tests
/// are reported as ignored, never as passed.
pub fn skip_reason() -> Option<String> {
    if std::env::var_os("LM_LAB_SKIP").is_some_and(|v| v != "0") {
        return Some("LM_LAB_SKIP is set".into());
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    None
}

/// Runs `tests` with libtest's command line and output, and exits. With a `skip` reason
/// (see [`skip_reason`]) every test is ignored, and the reason is said once.
pub fn run_tests(skip: Option<String>, tests: &[(&'static str, fn())]) -> ! {
    let args = Arguments::from_args();
    if let Some(why) = &skip {
        eprintln!("{why}: these tests are ignored");
    }
    let trials = tests
        .iter()
        .map(|&(name, test)| {
            Trial::test(name, move || {
                test();
                Ok::<(), Failed>(())
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}

/// Waits until `check` says yes, asking every 100 ms; an error naming `what` after
/// `timeout`, or the first error of `check`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    cmd::poll(timeout, Duration::from_millis(100), what, || {
        Ok(check()?.then_some(()))
    })
}
