//! `common::kernel::process::kill_in` on real processes: a `sleep` in a freezer cgroup of
//! its own (`lm-kill-<pid>`, removed with the process even when an assertion fails), and
//! one outside it. Runs only as root and when `LM_LAB_SKIP` is unset; otherwise its tests
//! are reported as ignored, and it says why.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::kernel::process::kill_in;

mod support;

fn main() {
    support::run_tests(
        support::skip_reason(),
        &[(
            "only_a_process_of_the_named_container_is_killed",
            only_a_process_of_the_named_container_is_killed,
        )],
    )
}

/// A `sleep` in a cgroup named `name`, as podman names a container's after its ID.
struct Contained {
    child: Child,
    dir: PathBuf,
}

impl Contained {
    fn start(name: &str) -> Contained {
        // Cgroup v1's freezer hierarchy (hybrid hosts), else the v2 root.
        let v1 = Path::new("/sys/fs/cgroup/freezer");
        let dir = if v1.is_dir() {
            v1
        } else {
            Path::new("/sys/fs/cgroup")
        }
        .join(name);
        std::fs::create_dir(&dir).unwrap();
        let contained = Contained {
            child: Command::new("sleep").arg("60").spawn().unwrap(),
            dir,
        };
        std::fs::write(
            contained.dir.join("cgroup.procs"),
            contained.child.id().to_string(),
        )
        .unwrap();
        contained
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The cgroup can be removed once its last process is reaped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn only_a_process_of_the_named_container_is_killed() {
    let name = format!("lm-kill-{}", std::process::id());
    let mut inside = Contained::start(&name);
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
