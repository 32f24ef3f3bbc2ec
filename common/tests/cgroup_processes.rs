//! `common::kernel::process::kill_in` on real processes: a `sleep` in a freezer cgroup of
//! its own (`lm-kill-<pid>`, removed with the process even when an assertion fails), and
//! one outside it. Runs only as root and when `LM_LAB_SKIP` is unset; otherwise its tests
//! are reported as ignored, and it says why.

use std::process::Command;

use common::kernel::process::kill_in;

#[path = "support/contained.rs"]
mod contained;
mod support;

use contained::Contained;

fn main() {
    support::run_tests(
        support::skip_reason(),
        &[(
            "only_a_process_of_the_named_container_is_killed",
            only_a_process_of_the_named_container_is_killed,
        )],
    )
}

fn only_a_process_of_the_named_container_is_killed() {
    let name = format!("lm-kill-{}", std::process::id());
    let mut inside = Contained::spawn(&name, Command::new("sleep").arg("60"));
    let mut outside = Command::new("sleep").arg("60").spawn().unwrap();

    let outside_killed = kill_in(outside.id() as i32, &name).unwrap();
    assert!(!outside_killed, "killed a process of another cgroup");
    assert!(
        outside.try_wait().unwrap().is_none(),
        "it died all the same"
    );
    let _ = outside.kill();
    let _ = outside.wait();
    // Reaped: its PID names no process now (or another one, in another cgroup).
    assert!(!kill_in(outside.id() as i32, &name).unwrap());

    assert!(kill_in(inside.child.id() as i32, &name).unwrap());
    let status = inside.child.wait().unwrap();
    assert!(
        !status.success(),
        "the contained process was killed: {status}"
    );
}
