//! Whether the tests that need the kernel (and, in `tests/`, the lab) can run on this
//! machine, and a runner that reports them as ignored, with the reason said once, when
//! they cannot: never as passed. The lab crate of `tests/` includes this file too
//! (`tests/src/testing.rs`): `common` cannot depend on it.

use libtest_mimic::{Arguments, Failed, Trial};

/// Why these tests cannot run here, or `None` when they can: `LM_LAB_SKIP` set to
/// anything but `0`, or not root (network and mount namespaces, netlink, nftables,
/// podman, CRIU).
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
