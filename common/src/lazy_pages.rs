//! Post-copy: CRIU's lazy pages, under podman, which does not expose them.
//!
//! **Source.** runc reads extra CRIU options from `/etc/criu/runc.conf`, and CRIU lets them
//! override runc's own (`cr-service.c`, "to overwrite all RPC settings"). For one
//! checkpoint the file says `lazy-pages`, `address`, `port` ([`arm`]): CRIU writes every
//! image except the processes' private memory, then serves that memory from the stopped
//! processes on the address (the source's tunnel end, so pages travel encrypted) until the
//! destination has all of it; only then does podman's call return. CRIU listens only
//! once every other image is on disk ([`wait_serving`]), so the agent packs those itself
//! ([`pack_images`]) rather than wait for podman's export.
//!
//! **Destination.** The archive's spec gets the annotation `org.criu.config`, naming a file
//! that says `lazy-pages` and a work directory ([`prepare_import`]); there `criu
//! lazy-pages` waits for the restore, takes the faults of the restored processes, and
//! copies the rest in the background ([`PagesDaemon`]).

use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// The CRIU configuration runc reads when the container names none.
pub const RUNC_CONF: &str = "/etc/criu/runc.conf";
/// First line of a configuration this module wrote (CRIU skips `#` lines).
const MARKER: &str = "# live-migrate: options of one post-copy checkpoint, removed once it started";
/// Held while a configuration of ours exists: one post-copy checkpoint starts at a time.
const LOCK: &str = "/run/live-migrate/criu.lock";
/// The socket `criu lazy-pages` opens in its work directory for the restore.
const DAEMON_SOCKET: &str = "lazy-pages.socket";
/// The configuration file the destination's restore reads.
const RESTORE_CONF: &str = "criu-restore.conf";
const DAEMON_LOG: &str = "lazy-pages.log";

/// Where the source serves the container's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageServer {
    pub address: Ipv4Addr,
    pub port: u16,
}

/// The host's runc configuration says to dump lazily, for one checkpoint; it goes with
/// [`ArmedDump::disarm`] (or when this is dropped).
pub struct ArmedDump {
    pub server: PageServer,
    _lock: Flock<File>,
    armed: bool,
}

/// Makes the next checkpoint on this host a lazy one, serving pages on `address`. Waits up
/// to 10 s for another post-copy checkpoint of this host to start first. A runc
/// configuration of the operator's own is left alone: post-copy is refused instead.
pub async fn arm(address: Ipv4Addr) -> Result<ArmedDump> {
    let lock = open_lock()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lock = lock;
    let lock = loop {
        match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
            Ok(held) => break held,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                lock = file;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err((_, e)) => bail!("another post-copy checkpoint is starting on this host: {e}"),
        }
    };
    if let Some(foreign) = foreign_config()? {
        bail!("{RUNC_CONF} holds options of its own ({foreign}); post-copy would change them for this checkpoint: use --mode stop-copy");
    }
    let port = std::net::TcpListener::bind((address, 0))
        .with_context(|| format!("find a free port on {address}"))?
        .local_addr()?
        .port();
    let server = PageServer { address, port };
    let dir = Path::new(RUNC_CONF).parent().expect("has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let content = format!("{MARKER}\nlazy-pages\naddress {address}\nport {port}\n");
    crate::files::write_atomic(Path::new(RUNC_CONF), content.as_bytes())?;
    Ok(ArmedDump {
        server,
        _lock: lock,
        armed: true,
    })
}

impl ArmedDump {
    /// Later checkpoints on this host are plain ones again.
    pub fn disarm(&mut self) -> Result<()> {
        if std::mem::take(&mut self.armed) {
            crate::files::remove_if_present(Path::new(RUNC_CONF))
                .with_context(|| format!("remove {RUNC_CONF}"))?;
        }
        Ok(())
    }
}

impl Drop for ArmedDump {
    fn drop(&mut self) {
        if let Err(e) = self.disarm() {
            tracing::error!("{e:#}");
        }
    }
}

fn open_lock() -> Result<File> {
    let dir = Path::new(LOCK).parent().expect("has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .with_context(|| format!("open {LOCK}"))
}

/// Why this host cannot take part in a post-copy migration, if it cannot. `uffd`: whether
/// CRIU found non-cooperative userfaultfd (`criu check --feature uffd-noncoop`).
pub fn host_problem(uffd: bool) -> Option<String> {
    if !uffd {
        return Some(
            "no non-cooperative userfaultfd here (criu check --feature uffd-noncoop)".into(),
        );
    }
    match foreign_config() {
        Ok(Some(options)) => {
            return Some(format!("{RUNC_CONF} holds options of its own ({options})"))
        }
        Err(e) => return Some(format!("{e:#}")),
        Ok(None) => {}
    }
    // CRIU's page server sizes its pipes to 819 pages (F_SETPIPE_SZ rounds that up to
    // 4 MiB): beyond fs.pipe-max-size that needs CAP_SYS_RESOURCE, and without it the
    // first fault far into a large area fails ("tee: ... Operation not permitted").
    const PIPE_BYTES: u64 = 4 << 20;
    let pipe_max: u64 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if pipe_max < PIPE_BYTES && !has_cap_sys_resource() {
        return Some(format!(
            "CRIU's page server needs pipes of {PIPE_BYTES} bytes: fs.pipe-max-size is {pipe_max} and this agent lacks CAP_SYS_RESOURCE (sysctl fs.pipe-max-size={PIPE_BYTES})"
        ));
    }
    None
}

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of `CapEff`); CRIU, run by runc as
/// the same root, has the same.
fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// What the runc configuration holds if it is not ours: `None` if there is none, or ours.
fn foreign_config() -> Result<Option<String>> {
    match std::fs::read_to_string(RUNC_CONF) {
        Ok(text) if text.starts_with(MARKER) => Ok(None),
        Ok(text) => Ok(Some(text.lines().collect::<Vec<_>>().join("; "))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("read {RUNC_CONF}: {e}")),
    }
}

/// Removes a lazy-dump configuration left by a process that died before its checkpoint
/// started (it would make every later checkpoint here wait for a destination). Says so if
/// there was one.
pub fn remove_stale_config() -> Result<Option<String>> {
    let Ok(lock) = open_lock() else {
        return Ok(None);
    };
    let Ok(_held) = Flock::lock(lock, FlockArg::LockExclusiveNonblock) else {
        return Ok(None); // a live checkpoint is starting
    };
    if Path::new(RUNC_CONF).exists() && foreign_config()?.is_none() {
        crate::files::remove_if_present(Path::new(RUNC_CONF))?;
        return Ok(Some(format!(
            "removed {RUNC_CONF}: a post-copy checkpoint that never started left it"
        )));
    }
    Ok(None)
}

/// Waits until CRIU listens on `server` (then every image but the lazy memory is on disk),
/// or `checkpoint` ends first (it failed: a lazy one ends only once the pages moved).
pub async fn wait_serving<T>(
    server: PageServer,
    checkpoint: &mut tokio::task::JoinHandle<T>,
) -> Result<()> {
    loop {
        if listener(server)?.is_some() {
            return Ok(());
        }
        tokio::select! {
            biased;
            _ = &mut *checkpoint => bail!("the checkpoint ended before CRIU served the container's memory"),
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
}

/// One line of `/proc/net/tcp`.
struct TcpSocket {
    local: SocketAddrV4,
    remote: SocketAddrV4,
    listening: bool,
    inode: u64,
}

/// The IPv4 TCP sockets of this network namespace. procfs, because sock_diag over netlink
/// would need a crate of its own for this one lookup.
fn tcp_sockets() -> Result<Vec<TcpSocket>> {
    let text = std::fs::read_to_string("/proc/net/tcp").context("read /proc/net/tcp")?;
    Ok(text.lines().skip(1).filter_map(parse_tcp_line).collect())
}

fn parse_tcp_line(line: &str) -> Option<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let address = |field: &str| -> Option<SocketAddrV4> {
        let (ip, port) = field.split_once(':')?;
        // The kernel prints the address as a native-endian number of network-order bytes.
        let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
        Some(SocketAddrV4::new(ip, u16::from_str_radix(port, 16).ok()?))
    };
    Some(TcpSocket {
        local: address(fields.get(1)?)?,
        remote: address(fields.get(2)?)?,
        listening: *fields.get(3)? == "0A",
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// The inode of the socket listening on `server`, if any.
fn listener(server: PageServer) -> Result<Option<u64>> {
    let at = SocketAddrV4::new(server.address, server.port);
    Ok(tcp_sockets()?
        .into_iter()
        .find(|s| s.listening && s.local == at)
        .map(|s| s.inode))
}

/// The descriptors of process `pid` whose link (`socket:[inode]`, ...) is `wanted`.
fn descriptors(pid: i32, wanted: impl Fn(&str) -> bool) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|link| link.to_str().is_some_and(&wanted))
        })
        .filter_map(|fd| fd.file_name().to_str()?.parse().ok())
        .collect()
}

/// The process that holds socket `inode`.
fn socket_holder(inode: u64) -> Option<i32> {
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|&pid| !descriptors(pid, |link| link == wanted).is_empty())
}

/// Stops the CRIU process that serves pages on `server`, if one still does: the
/// processes it holds run again (undo before the destination restored them), or were
/// killed already (after). Returns whether there was one.
pub async fn stop_serving(server: PageServer) -> Result<bool> {
    let at = SocketAddrV4::new(server.address, server.port);
    // Listening, or (CRIU serves one restore) connected to the destination.
    let inodes: Vec<u64> = tcp_sockets()?
        .into_iter()
        .filter(|s| s.local == at)
        .map(|s| s.inode)
        .collect();
    let holder = tokio::task::spawn_blocking(move || inodes.into_iter().find_map(socket_holder));
    let Some(pid) = holder.await? else {
        return Ok(false);
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    let kill = |signal| nix::sys::signal::kill(pid, signal);
    match kill(Some(nix::sys::signal::Signal::SIGKILL)) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => bail!("stop CRIU's page server (pid {pid}): {e}"),
    }
    // runc, its parent, reaps it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while kill(None).is_ok() {
        if Instant::now() > deadline {
            bail!("CRIU's page server (pid {pid}) did not stop");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(true)
}

/// What the source knows of the container's network, for `network.status` in the archive:
/// podman restores the address and MAC from it (podman writes its own only after the
/// checkpoint, too late for post-copy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttachment {
    pub network: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub mac: String,
}

/// `network.status` as podman writes it; the interface names come from the container's
/// configuration (`config.dump`'s `newNetworks`).
fn network_status(
    attachments: &[NetworkAttachment],
    config: &serde_json::Value,
) -> serde_json::Value {
    let mut status = serde_json::Map::new();
    for a in attachments {
        let interface = config["newNetworks"][&a.network]["interface_name"]
            .as_str()
            .unwrap_or("eth0");
        let mut subnet = serde_json::json!({ "ipnet": format!("{}/{}", a.address, a.prefix_len) });
        if let Some(gateway) = a.gateway {
            subnet["gateway"] = gateway.to_string().into();
        }
        status.insert(
            a.network.clone(),
            serde_json::json!({ "interfaces": { interface: {
                "subnets": [subnet], "mac_address": a.mac } } }),
        );
    }
    status.into()
}

/// Writes the archive podman's `restore --import` reads, from the container's bundle
/// directory (`bundle`: the images in `checkpoint/`, `config.dump`, `spec.dump`, its log),
/// its network, its changes to the image (`upper`: the overlay's upper directory, into
/// `rootfs-diff.tar` and `deleted.files`) and its `/dev/shm`. Returns the archive's size.
pub fn pack_images(
    bundle: &Path,
    network: &[NetworkAttachment],
    upper: Option<&Path>,
    archive: &Path,
) -> Result<u64> {
    let file = crate::files::create_private_file(archive)?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.follow_symlinks(false);
    tar.append_dir_all("checkpoint", bundle.join("checkpoint"))
        .context("pack the checkpoint images")?;
    for name in ["config.dump", "spec.dump", "ctr.log"] {
        let path = bundle.join(name);
        if path.exists() {
            tar.append_path_with_name(&path, name)
                .with_context(|| format!("pack {}", path.display()))?;
        }
    }
    let config: serde_json::Value = std::fs::read(bundle.join("config.dump"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    append_bytes(
        &mut tar,
        "network.status",
        &serde_json::to_vec(&network_status(network, &config))?,
    )?;
    if let Some(upper) = upper {
        let (diff, deleted) = rootfs_diff(upper)?;
        if !diff.is_empty() {
            append_bytes(&mut tar, "rootfs-diff.tar", &diff)?;
        }
        if !deleted.is_empty() {
            append_bytes(&mut tar, "deleted.files", &serde_json::to_vec(&deleted)?)?;
        }
    }
    let shm = bundle.join("shm");
    if std::fs::read_dir(&shm).is_ok_and(|mut d| d.next().is_some()) {
        let mut inner = tar::Builder::new(Vec::new());
        inner.append_dir_all(".", &shm).context("pack /dev/shm")?;
        append_bytes(&mut tar, "devshm-checkpoint.tar", &inner.into_inner()?)?;
    }
    let mut out = tar.into_inner()?;
    out.flush()?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

fn append_bytes(tar: &mut tar::Builder<impl Write>, name: &str, bytes: &[u8]) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, name, bytes)
        .with_context(|| format!("pack {name}"))
}

/// The container's changes to its image, as podman's export has them: a tar of what the
/// overlay's upper directory holds, and the paths its whiteouts (0:0 character devices)
/// delete. The processes are stopped, so the directory is still.
fn rootfs_diff(upper: &Path) -> Result<(Vec<u8>, Vec<String>)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    let mut deleted = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = upper.join(&relative);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("read {}", dir.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = relative.join(entry.file_name());
            let meta = entry.metadata()?;
            if meta.file_type().is_char_device() && meta.rdev() == 0 {
                deleted.push(path.display().to_string());
                continue;
            }
            tar.append_path_with_name(entry.path(), &path)
                .with_context(|| format!("pack {}", path.display()))?;
            if meta.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok((tar.into_inner()?, deleted))
}

/// Makes `archive` restore lazily with the daemon of `work_dir`: its spec names a CRIU
/// configuration there (`lazy-pages`, and the work directory, where the daemon's socket
/// is), and its images are unpacked there for the daemon. Returns the archive to import.
pub fn prepare_import(archive: &Path, work_dir: &Path) -> Result<PathBuf> {
    crate::files::create_private_dir(work_dir)?;
    let conf = work_dir.join(RESTORE_CONF);
    let options = format!("lazy-pages\nwork-dir {}\n", work_dir.display());
    crate::files::write_atomic(&conf, options.as_bytes())?;
    let images = work_dir.join("images");
    let import = work_dir.join("import.tar");
    let mut out = tar::Builder::new(std::io::BufWriter::new(crate::files::create_private_file(
        &import,
    )?));
    let mut input = tar::Archive::new(File::open(archive)?);
    for entry in input.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if path == Path::new("spec.dump") {
            let mut spec: serde_json::Value = serde_json::from_reader(&mut entry)?;
            let annotations = spec
                .as_object_mut()
                .ok_or_else(|| anyhow!("spec.dump is not a JSON object"))?
                .entry("annotations")
                .or_insert_with(|| serde_json::json!({}));
            annotations["org.criu.config"] = conf.display().to_string().into();
            append_bytes(&mut out, "spec.dump", &serde_json::to_vec(&spec)?)?;
            continue;
        }
        if let Ok(image) = path.strip_prefix("checkpoint") {
            if let Some(name) = image
                .file_name()
                .filter(|_| entry.header().entry_type().is_file())
            {
                // The daemon reads the process tree and memory maps. Only the file name
                // of the peer's path is used, in a directory of ours.
                crate::files::create_private_dir(&images)?;
                let unpacked = images.join(name);
                entry.unpack(&unpacked)?;
                out.append_path_with_name(&unpacked, Path::new("checkpoint").join(name))?;
                continue;
            }
        }
        let mut header = entry.header().clone();
        out.append_data(&mut header, &path, &mut entry)?;
    }
    let mut file = out.into_inner()?;
    file.flush()?;
    Ok(import)
}

/// `criu lazy-pages` on the destination: it hands the restored processes the pages they
/// fault on, fetched from the source's page server, and copies the rest in the
/// background; it exits once every page is here.
pub struct PagesDaemon {
    child: tokio::process::Child,
    work_dir: PathBuf,
    source: PageServer,
    /// Duplicates of its userfaultfds ([`Self::guard`]).
    held_uffds: Vec<OwnedFd>,
}

impl PagesDaemon {
    /// Starts it in `work_dir` (prepared by [`prepare_import`]) and waits until the restore
    /// can find it. CRIU's lazy-pages daemon exists only as the `criu` command (fixed
    /// arguments, no shell).
    pub async fn start(work_dir: &Path, source: PageServer) -> Result<Self> {
        let socket = work_dir.join(DAEMON_SOCKET);
        crate::files::remove_if_present(&socket)?;
        let mut child = tokio::process::Command::new("criu")
            .arg("lazy-pages")
            .arg("--page-server")
            .arg("--address")
            .arg(source.address.to_string())
            .arg("--port")
            .arg(source.port.to_string())
            .arg("--images-dir")
            .arg(work_dir.join("images"))
            .arg("--work-dir")
            .arg(work_dir)
            .arg("--log-file")
            .arg(work_dir.join(DAEMON_LOG))
            // Debug level: the count of pages it copied is logged only there.
            .arg("-v4")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("start criu lazy-pages")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "criu lazy-pages exited ({status}) before the restore: {}",
                    last_error(work_dir)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                bail!("criu lazy-pages did not open its socket within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Self {
            child,
            work_dir: work_dir.to_path_buf(),
            source,
            held_uffds: Vec::new(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// After the restore, once it is connected to the source:
    /// - its connection gets the agents' dead-peer timeouts
    ///   ([`crate::wire::DEAD_PEER_SECONDS`]), so a cut link fails it within seconds,
    ///   not after TCP's 15 minutes with the container stalled on a fault;
    /// - this agent holds duplicates of its userfaultfds until [`Self::release`]: if it
    ///   dies, a closed userfaultfd would let the container read zeros where its pages
    ///   are missing, while a held one keeps a faulting thread waiting until the
    ///   container is stopped.
    ///
    /// Both through `pidfd_getfd`: the options are set on the daemon's own socket.
    pub async fn guard(&mut self) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("criu lazy-pages has exited"))? as i32;
        for fd in descriptors(pid, |link| link == "anon_inode:[userfaultfd]") {
            self.held_uffds.push(borrow_fd(pid, fd)?);
        }
        let to = SocketAddrV4::new(self.source.address, self.source.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        let fd = loop {
            let inodes: Vec<u64> = tcp_sockets()?
                .into_iter()
                .filter(|s| s.remote == to && !s.listening)
                .map(|s| s.inode)
                .collect();
            let found = descriptors(pid, |link| {
                inodes.iter().any(|i| link == format!("socket:[{i}]"))
            });
            if let Some(&fd) = found.first() {
                break fd;
            }
            if Instant::now() > deadline {
                bail!("criu lazy-pages did not connect to the source's page server at {to}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        crate::wire::detect_dead_peer(&borrow_fd(pid, fd)?)?;
        Ok(())
    }

    /// Lets go of the userfaultfds [`Self::guard`] held: every page is here, or the
    /// container is stopped.
    pub fn release(&mut self) -> usize {
        std::mem::take(&mut self.held_uffds).len()
    }

    /// Waits until it exits: `Ok` once every page arrived, with how many it fetched.
    pub async fn wait(&mut self) -> Result<u64> {
        let status = self.child.wait().await?;
        if status.success() {
            let log = std::fs::read_to_string(self.work_dir.join(DAEMON_LOG)).unwrap_or_default();
            return Ok(transferred_pages(&log));
        }
        bail!(
            "the page transfer from {}:{} failed ({status}): {}",
            self.source.address,
            self.source.port,
            last_error(&self.work_dir)
        )
    }

    /// Stops it at once (its uffds close: only after the container is stopped).
    pub async fn kill(&mut self) -> Result<()> {
        Ok(self.child.kill().await?)
    }
}

/// The pages the daemon copied in, by its log: one "UFFD transferred pages: (N/M)" per
/// restored process.
fn transferred_pages(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| {
            l.split("UFFD transferred pages: (")
                .nth(1)?
                .split('/')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A duplicate of descriptor `fd` of process `pid`.
fn borrow_fd(pid: i32, fd: i32) -> Result<OwnedFd> {
    use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
    let pid = Pid::from_raw(pid).ok_or_else(|| anyhow!("pid {pid}"))?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
    Ok(pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())?)
}

/// The last error CRIU logged in `work_dir`, for the report.
fn last_error(work_dir: &Path) -> String {
    std::fs::read_to_string(work_dir.join(DAEMON_LOG))
        .ok()
        .and_then(|log| {
            log.lines()
                .rev()
                .find(|l| l.contains("Error"))
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "no error in its log".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_net_tcp_lines() {
        let line = "   0: 0B004D0A:6978 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4367687 1 0000000000000000 100 0 0 10 0";
        let s = parse_tcp_line(line).unwrap();
        assert_eq!(s.local, "10.77.0.11:27000".parse().unwrap());
        assert!(s.listening);
        assert_eq!(s.inode, 4367687);
        assert!(parse_tcp_line("  sl  local_address rem_address").is_none());
    }

    #[test]
    fn transferred_pages_are_summed_over_processes() {
        let log = "(01.3) uffd: 1-12: UFFD transferred pages: (65619/65619)\n(01.4) uffd: 7-14: UFFD transferred pages: (20/20)\n";
        assert_eq!(transferred_pages(log), 65_639);
    }

    #[test]
    fn network_status_is_what_podman_reads() {
        let status = network_status(
            &[NetworkAttachment {
                network: "podman".into(),
                address: "10.88.1.2".parse().unwrap(),
                prefix_len: 16,
                gateway: Some("10.88.0.1".parse().unwrap()),
                mac: "76:42:20:a9:08:50".into(),
            }],
            &serde_json::json!({"newNetworks": {"podman": {"interface_name": "eth1"}}}),
        );
        assert_eq!(
            status["podman"]["interfaces"]["eth1"]["subnets"][0]["ipnet"],
            "10.88.1.2/16"
        );
        assert_eq!(
            status["podman"]["interfaces"]["eth1"]["mac_address"],
            "76:42:20:a9:08:50"
        );
    }

    #[test]
    fn rootfs_diff_lists_whiteouts_as_deleted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/new"), b"x").unwrap();
        nix::sys::stat::mknod(
            &dir.path().join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .unwrap();
        let (diff, deleted) = rootfs_diff(dir.path()).unwrap();
        assert_eq!(deleted, ["gone"]);
        let names: Vec<String> = tar::Archive::new(&diff[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["etc", "etc/new"]);
    }
}
