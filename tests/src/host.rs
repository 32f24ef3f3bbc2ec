//! One simulated host: its private mount/UTS namespaces, podman configuration and daemons.
//!
//! Rootful podman keeps global state in fixed paths (/run/containers, /run/libpod, the
//! runc state in /run/runc, /dev/shm/libpod_lock, /var/lib/containers, /etc/containers)
//! that two podman instances on one machine would share. Each host therefore gets a
//! persistent mount namespace in which private directories are mounted over those paths.
//! All of /run is replaced by the host's own directory, a tmpfs as on a real host (a superset of binding
//! /run/containers, /run/libpod, /run/podman, /run/netns, /run/wireguard one by one: it
//! also covers /run/runc, /run/crun, /run/lock and whatever else a tool may put there).
//! Every command for a host then runs through `nsenter --mount --uts --net`. nsenter opens
//! all namespace files before switching, so the host's netns file (in the root /run/netns)
//! is found even though /run looks different inside the host.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::cmd;
use crate::plan::{
    podman_network_json, ClientDescription, HostDescription, LabDescription, NsFiles, RUN_ROOT,
};

/// Paths inside a host that must exist in the root file system as mount points. Creating
/// an empty directory there is the only change made to the root file system outside
/// /run/lm-lab and /var/lib/lm-lab.
const ROOT_MOUNT_POINTS: &[&str] = &[
    "/etc/containers",
    "/etc/criu",
    "/etc/live-migrate",
    "/var/lib/containers",
    "/var/lib/live-migrate",
];

/// `nsenter --mount=M --uts=U --net=N --` : prefix of every command run in a node.
pub fn nsenter(ns: &NsFiles) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(flag("--mount=", &ns.mount_ns))
        .arg(flag("--uts=", &ns.uts_ns))
        .arg(flag("--net=", &ns.netns_path))
        .arg("--");
    // podman 5 warns about cgroups v1 on every call; the hybrid layout is a given here.
    c.env("PODMAN_IGNORE_CGROUPSV1_WARNING", "1");
    c
}

fn flag(name: &str, path: &Path) -> OsString {
    let mut s = OsString::from(name);
    s.push(path);
    s
}

/// Runs `args` in node `ns`; error with stderr on failure.
fn in_node(ns: &NsFiles, args: &[&str]) -> Result<()> {
    cmd::run(nsenter(ns).args(args))
}

/// Host-side layout of a host's private directories.
pub struct HostPaths {
    /// Becomes /run inside the host.
    pub run: PathBuf,
    pub etc_containers: PathBuf,
    pub etc_live_migrate: PathBuf,
    /// CRIU's configuration for runc: a post-copy checkpoint writes one for itself.
    pub etc_criu: PathBuf,
    pub etc_hosts: PathBuf,
    pub var_lib_containers: PathBuf,
    pub var_lib_live_migrate: PathBuf,
    /// Temporary parking place for /sys/fs/cgroup while sysfs is remounted.
    pub sysmove: PathBuf,
}

impl HostPaths {
    pub fn of(host: &HostDescription) -> HostPaths {
        HostPaths {
            run: host.dir.join("run"),
            etc_containers: host.dir.join("etc/containers"),
            etc_live_migrate: host.dir.join("etc/live-migrate"),
            etc_criu: host.dir.join("etc/criu"),
            etc_hosts: host.dir.join("etc/hosts"),
            var_lib_containers: host.data_dir.join("containers"),
            var_lib_live_migrate: host.data_dir.join("live-migrate"),
            sysmove: host.dir.join("sysmove"),
        }
    }
}

/// Creates the host's directories and configuration in the root mount namespace: a copy of
/// /etc/containers with the per-host default network, /etc/hosts, the agent token.
pub fn prepare_host_files(
    desc: &LabDescription,
    host: &HostDescription,
    token: &str,
) -> Result<()> {
    for p in ROOT_MOUNT_POINTS {
        fs::create_dir_all(p).with_context(|| format!("creating mount point {p}"))?;
    }
    let p = HostPaths::of(host);
    fs::create_dir_all(&p.run).with_context(|| format!("creating {}", p.run.display()))?;
    mount_tmpfs(&p.run)?;
    for d in [
        &p.run.join("podman"),
        &p.run.join("lock"),
        &p.etc_live_migrate,
        &p.etc_criu,
        &p.var_lib_containers,
        &p.var_lib_live_migrate,
        &p.sysmove,
    ] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // /run/shm is a symlink to /dev/shm on Debian; keep that inside the host's /run.
    let shm = p.run.join("shm");
    if fs::symlink_metadata(&shm).is_err() {
        symlink("/dev/shm", &shm)?;
    }
    fs::set_permissions(&p.etc_live_migrate, fs::Permissions::from_mode(0o700))?;

    if !p.etc_containers.exists() {
        cmd::run(
            Command::new("cp")
                .arg("-a")
                .arg("/etc/containers")
                .arg(&p.etc_containers),
        )?;
    }
    let networks = p.etc_containers.join("networks");
    fs::create_dir_all(&networks)?;
    let net = serde_json::to_string_pretty(&podman_network_json(host))?;
    fs::write(networks.join("podman.json"), net)?;

    fs::write(&p.etc_hosts, desc.etc_hosts())?;
    write_secret(&p.etc_live_migrate.join("token"), token)?;
    Ok(())
}

/// Makes `run` (a host's /run) a tmpfs, as /run is on a real host. CRIU keeps its probe of
/// the kernel (`/run/criu.kdat`) only on a tmpfs; anywhere else it probes again in every
/// call (30-50 ms here, and a migration's freeze holds three calls). The lab's teardown
/// unmounts it with the lab's other mounts.
fn mount_tmpfs(run: &Path) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let mounted = fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*run.to_string_lossy()));
    if !mounted {
        mount(
            Some("lmrun"),
            run,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=256m"),
        )
        .with_context(|| format!("mounting a tmpfs on {}", run.display()))?;
    }
    Ok(())
}

/// Writes `content` to `path` with mode 0600 (created that way, never world-readable): the
/// agents refuse a token file that group or others can access.
pub fn write_secret(path: &Path, content: &str) -> Result<()> {
    use std::io::Write;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // `mode` applies to a new file only; one left by an earlier run keeps its own.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(content.as_bytes())?;
    Ok(())
}

/// Creates the persistent mount + UTS namespaces of a node from inside its network
/// namespace and sets its hostname. The namespace files' directory must already be a
/// private bind mount (see `lib.rs`).
fn create_namespaces(ns: &NsFiles, hostname: &str) -> Result<()> {
    for f in [&ns.mount_ns, &ns.uts_ns] {
        File::create(f).with_context(|| format!("creating {}", f.display()))?;
    }
    cmd::run(
        Command::new("nsenter")
            .arg(flag("--net=", &ns.netns_path))
            .arg("--")
            .arg("unshare")
            .arg(flag("--mount=", &ns.mount_ns))
            .arg(flag("--uts=", &ns.uts_ns))
            .args(["--propagation", "slave", "--", "hostname", hostname]),
    )
}

/// Mounts sysfs anew so /sys/class/net lists the node's own links, keeping the cgroup
/// mounts: a new sysfs instance would hide /sys/fs/cgroup, which podman and runc need.
fn remount_sysfs(ns: &NsFiles, park: &Path) -> Result<()> {
    let park = park.to_str().context("non-UTF-8 path")?;
    in_node(ns, &["mount", "--move", "/sys/fs/cgroup", park])?;
    in_node(ns, &["mount", "-t", "sysfs", "sysfs", "/sys"])?;
    in_node(ns, &["mount", "--move", park, "/sys/fs/cgroup"])
}

fn bind(ns: &NsFiles, src: &Path, dst: &str) -> Result<()> {
    let src = src.to_str().context("non-UTF-8 path")?;
    in_node(ns, &["mount", "--bind", src, dst])
}

/// Lazily unmounts, inside the node, every mount under /run/lm-lab but `keep` (a host's
/// own /run): the copies of lab namespace files and of other hosts' /run (this lab's and
/// other labs') that the new mount namespace inherited. Those directories are private, so
/// an unmount in the root namespace would not propagate here, and the copies would keep
/// other namespaces alive after their lab is gone.
fn drop_inherited_lab_mounts(ns: &NsFiles, keep: Option<&Path>) -> Result<()> {
    let out = cmd::output(nsenter(ns).args(["cat", "/proc/self/mountinfo"]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{RUN_ROOT}/");
    let mut points: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix) && Some(Path::new(p)) != keep)
        .collect();
    // Only the outermost ones: `umount -l` detaches a whole subtree.
    points.sort();
    let mut top: Vec<&str> = Vec::new();
    for p in points {
        if !top
            .iter()
            .any(|t| p == *t || p.starts_with(&format!("{t}/")))
        {
            top.push(p);
        }
    }
    for p in top {
        // A parent detached earlier may already have taken this one with it.
        let _ = in_node(ns, &["umount", "-l", p]);
    }
    Ok(())
}

/// Builds the host's mount namespace (see the module docs).
pub fn setup_host_namespaces(host: &HostDescription) -> Result<()> {
    let ns = &host.ns;
    let p = HostPaths::of(host);
    create_namespaces(ns, &host.name)?;
    remount_sysfs(ns, &p.sysmove)?;
    // A fresh /dev/shm: rootful podman keeps one lock segment for all instances there.
    in_node(
        ns,
        &[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "mode=1777,size=1g",
            "lmshm",
            "/dev/shm",
        ],
    )?;
    bind(ns, &p.etc_containers, "/etc/containers")?;
    bind(ns, &p.etc_live_migrate, "/etc/live-migrate")?;
    bind(ns, &p.etc_criu, "/etc/criu")?;
    bind(ns, &p.etc_hosts, "/etc/hosts")?;
    bind(ns, &p.var_lib_containers, "/var/lib/containers")?;
    bind(ns, &p.var_lib_live_migrate, "/var/lib/live-migrate")?;
    drop_inherited_lab_mounts(ns, Some(&p.run))?;
    bind(ns, &p.run, "/run")
}

/// The client only needs its own /etc/hosts and sysfs.
pub fn setup_client(desc: &LabDescription, client: &ClientDescription) -> Result<()> {
    fs::create_dir_all(client.dir.join("sysmove"))?;
    let hosts = client.dir.join("hosts");
    fs::write(&hosts, desc.etc_hosts())?;
    create_namespaces(&client.ns, &client.name)?;
    remount_sysfs(&client.ns, &client.dir.join("sysmove"))?;
    bind(&client.ns, &hosts, "/etc/hosts")?;
    drop_inherited_lab_mounts(&client.ns, None)
}

/// Where each host's agent serves its metrics, inside the host.
pub const METRICS_ADDR: &str = "127.0.0.1:9187";

/// The long-running processes the lab starts in each host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Daemon {
    /// `podman system service --time=0 unix:///run/podman/podman.sock`
    Podman,
    /// `agent-server --metrics` [`METRICS_ADDR`] (no other flags: its defaults match the
    /// host layout).
    Agent,
}

impl Daemon {
    pub fn label(self) -> &'static str {
        match self {
            Daemon::Podman => "podman-service",
            Daemon::Agent => "agent-server",
        }
    }
    pub fn pid_file(self, host: &HostDescription) -> PathBuf {
        host.dir.join(format!("{}.pid", self.label()))
    }
    pub fn log_file(self, host: &HostDescription) -> PathBuf {
        host.dir.join(format!("{}.log", self.label()))
    }
}

/// PATH for commands in a node: the agent binaries' directory first.
pub fn path_env(bin_dir: Option<&Path>) -> OsString {
    let mut v = OsString::new();
    if let Some(b) = bin_dir {
        v.push(b);
        v.push(":");
    }
    v.push(std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()));
    v
}

/// Starts a daemon in `host`, detached from our process group (a Ctrl-C at the terminal
/// must reach only the lab process, which then tears down in order), logging to the host
/// dir. A thread reaps it when it exits so it never lingers as a zombie of ours.
pub fn start_daemon(host: &HostDescription, daemon: Daemon, bin_dir: Option<&Path>) -> Result<u32> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(daemon.log_file(host))?;
    let mut c = nsenter(&host.ns);
    match daemon {
        Daemon::Podman => {
            c.args(["podman", "system", "service", "--time=0"])
                .arg(format!("unix://{}", host.podman_socket.display()));
        }
        Daemon::Agent => {
            let bin = bin_dir
                .map(|d| d.join("agent-server"))
                .filter(|p| p.is_file())
                .context("agent-server binary not found: build the workspace (`cargo build --workspace`) or set LM_BIN_DIR")?;
            c.arg(bin).args(["--metrics", METRICS_ADDR]);
        }
    }
    c.env("PATH", path_env(bin_dir))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let mut child = c
        .spawn()
        .with_context(|| format!("starting {} in {}", daemon.label(), host.name))?;
    let pid = child.id();
    fs::write(daemon.pid_file(host), pid.to_string())?;
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

/// The pid of a running daemon of `host` (checked to still be in the host's mount
/// namespace, which guards against a recycled pid).
pub fn daemon_pid(host: &HostDescription, daemon: Daemon) -> Option<u32> {
    let pid: u32 = fs::read_to_string(daemon.pid_file(host))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let mnt = crate::procfs::ns_file_inode(&host.ns.mount_ns)?;
    (crate::procfs::ns_inode(pid, "mnt") == Some(mnt) && !crate::procfs::is_zombie(pid))
        .then_some(pid)
}

/// SIGTERM, then SIGKILL after `grace`. Returns whether something was running.
pub fn stop_daemon(host: &HostDescription, daemon: Daemon, grace: Duration) -> Result<bool> {
    let Some(pid) = daemon_pid(host, daemon) else {
        let _ = fs::remove_file(daemon.pid_file(host));
        return Ok(false);
    };
    crate::procfs::kill(pid, Signal::SIGTERM);
    let stopped = cmd::poll(grace, Duration::from_millis(20), "", || {
        Ok(daemon_pid(host, daemon).is_none().then_some(()))
    });
    if stopped.is_err() {
        crate::procfs::kill(pid, Signal::SIGKILL);
        cmd::poll(
            Duration::from_secs(5),
            Duration::from_millis(20),
            &format!("{} to die", daemon.label()),
            || Ok(daemon_pid(host, daemon).is_none().then_some(())),
        )?;
    }
    let _ = fs::remove_file(daemon.pid_file(host));
    Ok(true)
}

/// Waits until the host's podman REST socket accepts connections. The socket is reached
/// through its host-side path: unix sockets are file-system objects, not network ones.
/// `pid` is the service's pid (checked by pid alone: right after the spawn the process has
/// not yet entered the host's namespaces).
pub fn wait_podman(host: &HostDescription, pid: u32, timeout: Duration) -> Result<()> {
    let what = format!("podman service of {}", host.name);
    cmd::poll(timeout, Duration::from_millis(25), &what, || {
        if crate::procfs::is_zombie(pid) {
            bail!(
                "{what} exited: {}",
                log_tail(&Daemon::Podman.log_file(host), 2000)
            );
        }
        Ok(
            std::os::unix::net::UnixStream::connect(&host.podman_socket_host_path)
                .ok()
                .map(|_| ()),
        )
    })
}

/// The last `max` bytes of a log file (for error messages).
pub fn log_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    if s.trim().is_empty() {
        format!("(empty log {})", path.display())
    } else {
        format!("log {}:\n{}", path.display(), s.trim_end())
    }
}

/// Directory holding `agent-server` and `agent-client`: `$LM_BIN_DIR`, else the running
/// executable's directory or its parent (cargo puts test binaries in target/debug/deps and
/// bins in target/debug).
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LM_BIN_DIR") {
        return Some(PathBuf::from(d));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let found = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .find(|d| d.join("agent-server").is_file())
        .map(Path::to_path_buf);
    found
}
