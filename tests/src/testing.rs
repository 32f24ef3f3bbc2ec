//! What the test binaries share: whether the lab tests can run on this machine, a runner
//! that reports them as ignored (with the reason, said once) when they cannot, and waiting
//! on a condition instead of sleeping.

use std::time::Duration;

use crate::cmd;
use anyhow::Result;

// One copy of the rule for both crates' tests: `common` cannot depend on this one.
#[path = "../../common/tests/support/mod.rs"]
mod support;
pub use support::{run_tests, skip_reason};

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
