//! What the kernel tests share: whether they can run on this machine, and a runner that
//! reports them as ignored (with the reason, said once) when they cannot. (The lab crate
//! of `tests/` has the same rule for the lab tests; `common` cannot depend on it.)

use libtest_mimic::{Arguments, Failed, Trial};

/// Why the kernel tests cannot run here, or `None` when they can: `LM_LAB_SKIP` set to
/// anything but `0`, or not root (network namespaces, netlink, nftables).
pub fn skip_reason() -> Option<String> {
    if std::env::var_os("LM_LAB_SKIP").is_some_and(|v| v != "0") {
        return Some("LM_LAB_SKIP is set".into());
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    None
}

/// Runs `tests` with libtest's command line and output, and exits; all of them ignored
/// when [`skip_reason`] says they cannot run.
pub fn run(tests: &[(&'static str, fn())]) -> ! {
    let args = Arguments::from_args();
    let skip = skip_reason();
    if let Some(why) = &skip {
        eprintln!("{why}: these kernel tests are ignored");
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
