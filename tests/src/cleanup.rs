//! Teardown and garbage collection.
//!
//! Teardown works from the lab name alone (paths are derived in `plan`; `state.json`, if
//! readable, only adds the host list), so it can finish a lab whose creation was cut short.
//! It is idempotent and best-effort: every step runs even if an earlier one failed, and the
//! errors are returned together. The lab directory (with `state.json`) is removed only when
//! the namespaces are gone, so a failed teardown can be retried by `lab gc`/`lab down`.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::Signal;

use crate::cmd;
use crate::host::{self, Daemon};
use crate::plan::{
    self, host_index, lab_data_dir, lab_dir, ns_dir, HostDescription, LabDescription, LabState,
    Owner, MAX_HOSTS, RUN_ROOT,
};
use crate::procfs::{is_zombie, kill, ns_file_inode, ns_inode, start_time};

/// How long `podman rm -af` may take in one host before we stop waiting and kill.
const PODMAN_RM_TIMEOUT: Duration = Duration::from_secs(30);

/// The current process as a lab owner.
pub fn current_owner() -> Owner {
    let pid = std::process::id();
    Owner {
        pid,
        start_time: start_time(pid).unwrap_or(0),
    }
}

/// Whether the owner process still exists (same pid and same start time).
pub fn owner_alive(o: &Owner) -> bool {
    !is_zombie(o.pid) && start_time(o.pid) == Some(o.start_time)
}

/// Reads a lab's state file.
pub fn read_state(name: &str) -> Result<LabState> {
    let p = lab_dir(name).join("state.json");
    let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// Every lab name with a directory under /run/lm-lab or /var/lib/lm-lab.
pub fn list_labs() -> Vec<String> {
    let mut names: Vec<String> = [RUN_ROOT, plan::DATA_ROOT]
        .iter()
        .filter_map(|root| fs::read_dir(root).ok())
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| plan::validate_name(n).is_ok())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Best-effort description of lab `name` for teardown: from state.json if readable,
/// otherwise reconstructed from the host directories and namespaces that exist.
fn description_for_teardown(name: &str) -> LabDescription {
    if let Ok(s) = read_state(name) {
        return s.description;
    }
    let mut max = 0;
    let candidates = [lab_dir(name), lab_data_dir(name), ns_dir(name)];
    for dir in &candidates {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            let stem = f.split('.').next().unwrap_or("");
            if let Some(i) = host_index(stem) {
                max = max.max(i);
            }
        }
    }
    for i in 1..=MAX_HOSTS {
        if Path::new(plan::NETNS_DIR)
            .join(plan::netns_name(name, &plan::host_name(i)))
            .exists()
        {
            max = max.max(i);
        }
    }
    LabDescription::plan(name, max.max(1), None).expect("valid lab name")
}

/// Mount points (in our mount namespace) at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn umount(p: &Path) -> Result<()> {
    umount2(p, MntFlags::MNT_DETACH).with_context(|| format!("umount {}", p.display()))
}

/// Container ids of a host, from its storage directory (works without podman).
fn container_ids(host: &HostDescription) -> Vec<String> {
    let dir = host.data_dir.join("containers/storage/overlay-containers");
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.len() == 64 && n.chars().all(|c| c.is_ascii_hexdigit()))
        .collect()
}

/// Pids of processes whose net, mnt or uts namespace is one of `inodes`.
fn procs_in(inodes: &HashSet<u64>) -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && !is_zombie(pid))
        .filter(|&pid| {
            ["net", "mnt", "uts"]
                .iter()
                .any(|k| ns_inode(pid, k).is_some_and(|i| inodes.contains(&i)))
        })
        .collect()
}

/// Cgroup directories podman (cgroupfs manager) made for the given containers, in every
/// v1 controller and the v2 hierarchy, deepest first.
fn container_cgroups(ids: &HashSet<String>) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if ids.is_empty() {
        return found;
    }
    fn walk(dir: &Path, ids: &HashSet<String>, depth: usize, found: &mut Vec<PathBuf>) {
        if depth > 4 {
            return;
        }
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if ids.iter().any(|id| name.contains(id.as_str())) {
                found.push(p);
            } else if depth < 2 {
                // only look inside libpod_parent-style parents, not the whole tree
                walk(&p, ids, depth + 1, found);
            }
        }
    }
    for ctl in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        walk(&ctl.path(), ids, 0, &mut found);
    }
    found
}

/// Kills every process in a cgroup tree and removes its directories (children first).
fn remove_cgroup(dir: &Path) -> Result<()> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        let sub: Vec<PathBuf> = fs::read_dir(&dirs[i])
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        dirs.extend(sub);
        i += 1;
    }
    for d in dirs.iter().rev() {
        let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            kill(pid, Signal::SIGKILL);
        }
    }
    cmd::poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        "cgroup removal",
        || {
            for d in dirs.iter().rev() {
                if d.exists() && fs::remove_dir(d).is_err() {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .with_context(|| format!("removing cgroup {}", dir.display()))
}

/// What teardown did, for reports.
#[derive(Debug, Default)]
pub struct TeardownReport {
    pub killed: usize,
    pub errors: Vec<String>,
}

/// Tears lab `name` down completely. See the module docs.
pub fn teardown(name: &str) -> TeardownReport {
    let mut rep = TeardownReport::default();
    let dir = lab_dir(name);
    let data = lab_data_dir(name);
    let desc = description_for_teardown(name);
    let err = |rep: &mut TeardownReport, e: anyhow::Error| rep.errors.push(format!("{e:#}"));

    // 1. Containers and daemons, per host in parallel: podman knows how to stop its
    //    containers and release their network resources cleanly.
    let host_errors: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = desc
            .hosts
            .iter()
            .map(|h| s.spawn(move || stop_host(h)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    rep.errors.extend(host_errors.into_iter().flatten());

    // 2. Anything left in the lab's namespaces (conmon, a wedged podman, wireguard-go...).
    let mut inodes = HashSet::new();
    let ns_files = desc
        .hosts
        .iter()
        .map(|h| &h.ns)
        .chain(std::iter::once(&desc.client.ns));
    for ns in ns_files {
        for p in [&ns.mount_ns, &ns.uts_ns, &ns.netns_path] {
            inodes.extend(ns_file_inode(p));
        }
    }
    inodes.extend(ns_file_inode(
        &Path::new(plan::NETNS_DIR).join(&desc.lan.netns),
    ));
    for round in 0..50 {
        let pids = procs_in(&inodes);
        if pids.is_empty() {
            break;
        }
        if round == 49 {
            err(
                &mut rep,
                anyhow::anyhow!("processes survive SIGKILL in lab {name}: {pids:?}"),
            );
        }
        rep.killed += pids.len();
        for pid in pids {
            kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // 3. Container processes live in their own namespaces; podman's cgroups find them.
    let ids: HashSet<String> = desc.hosts.iter().flat_map(container_ids).collect();
    for cg in container_cgroups(&ids) {
        if let Err(e) = remove_cgroup(&cg) {
            err(&mut rep, e);
        }
    }

    // 4. Namespace files and the lab's mounts, then the network namespaces.
    for m in mounts_under(&dir) {
        if let Err(e) = umount(&m) {
            err(&mut rep, e);
        }
    }
    let mut netns_left = false;
    for ns in desc.all_netns() {
        if let Err(e) = crate::netns::delete(&ns) {
            err(&mut rep, e);
        }
        netns_left |= crate::netns::exists(&ns);
    }

    // 5. Files. Keep the run dir (state.json) if something could not be removed above, so
    //    that a later `lab gc`/`lab down` can retry.
    if let Err(e) = remove_tree(&data) {
        err(&mut rep, e);
    }
    if netns_left || !mounts_under(&dir).is_empty() {
        err(
            &mut rep,
            anyhow::anyhow!(
                "lab {name}: namespaces or mounts remain; kept {}",
                dir.display()
            ),
        );
    } else if let Err(e) = remove_tree(&dir) {
        err(&mut rep, e);
    }
    rep
}

/// `podman rm -af` and stops the daemons of one host. Errors are collected, never fatal.
fn stop_host(h: &HostDescription) -> Vec<String> {
    let mut errors = Vec::new();
    let alive = ns_file_inode(&h.ns.mount_ns).is_some();
    if let Err(e) = host::stop_daemon(h, Daemon::Agent, Duration::from_secs(3)) {
        errors.push(format!("{}: stopping agent: {e:#}", h.name));
    }
    if alive && Path::new(&h.ns.netns_path).exists() {
        let r = cmd::output_timeout(
            host::nsenter(&h.ns).args(["podman", "rm", "--all", "--force", "--time", "0"]),
            PODMAN_RM_TIMEOUT,
        );
        match r {
            Ok(o) if !o.status.success() => errors.push(format!(
                "{}: {}",
                h.name,
                cmd::failure_message("podman rm -af", &o)
            )),
            Err(e) => errors.push(format!("{}: {e:#}", h.name)),
            Ok(_) => {}
        }
    }
    if let Err(e) = host::stop_daemon(h, Daemon::Podman, Duration::from_secs(3)) {
        errors.push(format!("{}: stopping podman service: {e:#}", h.name));
    }
    errors
}

/// `rm -rf` that tolerates a missing path. Overlay work dirs (mode 000) are no obstacle
/// for root.
fn remove_tree(p: &Path) -> Result<()> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

/// Why `gc` considers a lab garbage (or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabStatus {
    /// Owned by a live process.
    Owned(u32),
    /// Owner process is gone.
    OwnerDead(u32),
    /// Created by the CLI: lives until `lab down`.
    Unowned,
    /// No readable state.json (creation or teardown was cut short).
    Broken,
}

/// A lab's status; a lab without state younger than a few seconds is assumed to be still
/// being created (state.json is written right after the directory).
pub fn status(name: &str) -> LabStatus {
    match read_state(name) {
        Ok(s) => match s.owner {
            None => LabStatus::Unowned,
            Some(o) if owner_alive(&o) => LabStatus::Owned(o.pid),
            Some(o) => LabStatus::OwnerDead(o.pid),
        },
        Err(_) => {
            let young = fs::metadata(lab_dir(name))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age < Duration::from_secs(10));
            if young {
                LabStatus::Owned(0)
            } else {
                LabStatus::Broken
            }
        }
    }
}

/// Tears down every lab whose owner is dead (and broken ones); with `all`, every lab
/// except those owned by a live process. Returns the names removed and the errors.
pub fn gc(all: bool) -> (Vec<String>, Vec<String>) {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for name in list_labs() {
        let garbage = match status(&name) {
            LabStatus::Owned(_) => false,
            LabStatus::OwnerDead(_) | LabStatus::Broken => true,
            LabStatus::Unowned => all,
        };
        if garbage {
            let r = teardown(&name);
            errors.extend(r.errors.into_iter().map(|e| format!("{name}: {e}")));
            removed.push(name);
        }
    }
    (removed, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_owner() {
        let me = current_owner();
        assert!(me.start_time > 0);
        assert!(owner_alive(&me));
        assert!(!owner_alive(&Owner {
            pid: me.pid,
            start_time: me.start_time + 1
        }));
    }
}
