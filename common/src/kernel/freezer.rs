//! A container's cgroup freezer, frozen just before its checkpoint.
//!
//! CRIU freezes the container itself when asked to checkpoint it, but it polls the
//! freezer's state every 100 ms, and a cgroup-v1 freezer is never frozen at the first
//! look: that costs a whole 100 ms of the freeze (CRIU's `freezing_time`, `seize.c`). A
//! freezer that is frozen already is taken as it is. Frozen here, it takes microseconds to
//! a few milliseconds; then CRIU seizes the processes at once (and thaws the cgroup once
//! they are seized). If the checkpoint fails, CRIU leaves the freezer as it found it,
//! frozen: the migration's undo thaws it ([`thaw`]).
//!
//! Cgroup v1 (`freezer.state`, also on hybrid hosts) and v2 (`cgroup.freeze`). Blocking
//! file I/O: from async code, use `tokio::task::spawn_blocking`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Longer than any freeze seen; past it the freezer is thawed again and CRIU freezes.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_micros(200);

/// The freezer interface of the cgroup at `cgroup` (as podman reports it, e.g.
/// `/libpod_parent/libpod-<id>`).
enum Freezer {
    /// `freezer.state`: THAWED, FREEZING or FROZEN.
    V1(PathBuf),
    /// The cgroup directory: `cgroup.freeze` (0 or 1) and `cgroup.events` (`frozen 1`).
    V2(PathBuf),
}

impl Freezer {
    fn of(cgroup: &str) -> Result<Self> {
        if !cgroup.starts_with('/') || cgroup.split('/').any(|part| part == "..") {
            bail!("unexpected cgroup path {cgroup:?}");
        }
        let v1 = PathBuf::from(format!("{CGROUP_ROOT}/freezer{cgroup}/freezer.state"));
        if v1.exists() {
            return Ok(Freezer::V1(v1));
        }
        let v2 = PathBuf::from(format!("{CGROUP_ROOT}{cgroup}"));
        if v2.join("cgroup.freeze").exists() {
            return Ok(Freezer::V2(v2));
        }
        bail!("no freezer for cgroup {cgroup}")
    }

    fn request(&self, frozen: bool) -> Result<()> {
        let (path, value) = match self {
            Freezer::V1(state) => (state.clone(), if frozen { "FROZEN" } else { "THAWED" }),
            Freezer::V2(dir) => (dir.join("cgroup.freeze"), if frozen { "1" } else { "0" }),
        };
        std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))
    }

    fn processes(&self) -> PathBuf {
        match self {
            Freezer::V1(state) => state.with_file_name("cgroup.procs"),
            Freezer::V2(dir) => dir.join("cgroup.procs"),
        }
    }

    fn threads(&self) -> PathBuf {
        match self {
            Freezer::V1(state) => state.with_file_name("tasks"),
            Freezer::V2(dir) => dir.join("cgroup.threads"),
        }
    }

    fn is_frozen(&self) -> Result<bool> {
        Ok(match self {
            Freezer::V1(state) => std::fs::read_to_string(state)?.trim() == "FROZEN",
            Freezer::V2(dir) => std::fs::read_to_string(dir.join("cgroup.events"))?
                .lines()
                .any(|l| l == "frozen 1"),
        })
    }
}

/// Freezes the cgroup and waits until it is frozen; thaws it again and fails if that
/// takes longer than [`FREEZE_TIMEOUT`].
pub fn freeze(cgroup: &str) -> Result<Duration> {
    let freezer = Freezer::of(cgroup)?;
    let started = Instant::now();
    freezer.request(true)?;
    while !freezer.is_frozen()? {
        if started.elapsed() > FREEZE_TIMEOUT {
            freezer.request(false)?;
            bail!("cgroup {cgroup} did not freeze within {FREEZE_TIMEOUT:?}");
        }
        std::thread::sleep(POLL);
    }
    Ok(started.elapsed())
}

/// Thaws the cgroup; one that is gone (the checkpoint ended the container) is fine.
pub fn thaw(cgroup: &str) -> Result<()> {
    match Freezer::of(cgroup) {
        Ok(freezer) => freezer.request(false),
        Err(_) => Ok(()),
    }
}

/// Whether the cgroup is frozen.
pub fn is_frozen(cgroup: &str) -> Result<bool> {
    Freezer::of(cgroup)?.is_frozen()
}

/// The processes in the cgroup (by the freezer's hierarchy).
pub fn processes(cgroup: &str) -> Result<Vec<i32>> {
    read_ids(Freezer::of(cgroup)?.processes())
}

/// The threads in the cgroup, of every process (by the freezer's hierarchy).
pub fn threads(cgroup: &str) -> Result<Vec<i32>> {
    read_ids(Freezer::of(cgroup)?.threads())
}

fn read_ids(path: PathBuf) -> Result<Vec<i32>> {
    let listed =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    listed
        .lines()
        .map(|pid| {
            pid.parse()
                .with_context(|| format!("{}: {pid:?}", path.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_stay_under_the_cgroup_root() {
        assert!(Freezer::of("libpod_parent/x").is_err());
        assert!(Freezer::of("/libpod_parent/../../etc").is_err());
        assert!(thaw("/no/such/cgroup/of/lm-tests").is_ok());
    }
}
