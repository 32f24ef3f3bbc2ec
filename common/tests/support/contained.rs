//! A process in a freezer cgroup of its own, for the tests that need the kernel: the
//! cgroup (cgroup v1's freezer hierarchy on hybrid hosts, else the v2 root) is made for
//! it, and removed with it, even when an assertion fails. Included with `#[path]` by the
//! tests that use it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::kernel::freezer;

pub struct Contained {
    pub child: Child,
    /// Its cgroup as podman names a container's: `/NAME`.
    pub cgroup: String,
    dir: PathBuf,
}

impl Contained {
    /// Spawns `command` and moves it into a new cgroup `name`.
    pub fn spawn(name: &str, command: &mut Command) -> Contained {
        let v1 = Path::new("/sys/fs/cgroup/freezer");
        let dir = if v1.is_dir() {
            v1
        } else {
            Path::new("/sys/fs/cgroup")
        }
        .join(name);
        std::fs::create_dir(&dir).unwrap();
        let contained = Contained {
            child: command.spawn().unwrap(),
            cgroup: format!("/{name}"),
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
        let _ = freezer::thaw(&self.cgroup);
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The cgroup can be removed once its last process is reaped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
