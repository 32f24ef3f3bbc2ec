//! The source's side of post-copy: the one lazy checkpoint's CRIU configuration, waiting
//! for CRIU to serve, stopping it, and packing the images it wrote.

use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::archive::append_bytes;
use super::criu_config::{foreign_config, foreign_options, MARKER, RUNC_CONF};
use super::page_server::{tune_page_connection, PageServer, READY_POLL};
use super::procfs::{
    borrow_fd, connection_held, descriptors, listener_held, socket_holder, tcp_sockets,
};

/// Held while a configuration of ours exists: one post-copy checkpoint starts at a time.
const LOCK: &str = "/run/live-migrate/criu.lock";

/// The CRIU configuration runc reads says to dump lazily, for one checkpoint; it goes
/// with [`ArmedDump::disarm`] (or when this is dropped).
pub struct ArmedDump {
    pub server: PageServer,
    _lock: Flock<File>,
    config: PathBuf,
    armed: bool,
}

/// Makes the next checkpoint on this host a lazy one, serving pages on `server` (a port
/// found free, [`PageServer::on_a_free_port`]) to `peer` alone ([`guard`], until
/// [`stop_serving`] or [`unguard`]), under TLS with the credentials in `tls`
/// ([`crate::protocol::PageCredentials::write`]), with options in `config` (where runc
/// reads them for the container, [`super::dump_config`]), and CRIU's hook
/// `action_script` ([`super::FreezeHook`]). Waits up to 10 s for another
/// lazy checkpoint of this host to start first. A runc configuration of the operator's own
/// is left alone: post-copy is refused instead.
pub async fn arm(
    server: PageServer,
    peer: Ipv4Addr,
    tls: &Path,
    config: &Path,
    action_script: &Path,
) -> Result<ArmedDump> {
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
    // One of ours, under this lock, is left by a dump that died: it is replaced.
    if let Some(foreign) = foreign_options(config)? {
        bail!("{} holds options of its own ({foreign}); a lazy dump would change them for this checkpoint: use --mode stop-copy --archive", config.display());
    }
    let PageServer { address, port } = server;
    let dir = config
        .parent()
        .context("a configuration file in no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    guard(server, peer).await?;
    // No network lock of CRIU's: a failed lazy dump never lifts it (`cr_dump_finish`),
    // and the agent's packet hold, outside the container, keeps its traffic away anyway.
    let mut content = format!(
        "{MARKER}\nlazy-pages\nnetwork-lock skip\naddress {address}\nport {port}\naction-script {}\n",
        action_script.display()
    );
    for (option, value) in super::tls::criu_options(tls) {
        match value {
            Some(path) => content.push_str(&format!("{option} {}\n", path.display())),
            None => content.push_str(&format!("{option}\n")),
        }
    }
    if let Err(e) = crate::files::write_atomic(config, content.as_bytes()) {
        let _ = unguard(server).await;
        return Err(e.into());
    }
    Ok(ArmedDump {
        server,
        _lock: lock,
        config: config.to_path_buf(),
        armed: true,
    })
}

impl ArmedDump {
    /// Later checkpoints on this host are plain ones again.
    pub fn disarm(&mut self) -> Result<()> {
        if std::mem::take(&mut self.armed) {
            crate::files::remove_if_present(&self.config)
                .with_context(|| format!("remove {}", self.config.display()))?;
            if self.config != Path::new(RUNC_CONF) {
                // The gone restore's directory, made again for this file.
                let _ = std::fs::remove_dir(self.config.parent().expect("has a parent"));
            }
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
    checkpoint: &tokio::task::JoinHandle<T>,
) -> Result<()> {
    let at = SocketAddrV4::new(server.address, server.port);
    // Not awaited here: the caller reads the call's error from it.
    while !crate::kernel::sock_diag::tcp_listening(at)? {
        if checkpoint.is_finished() {
            bail!("the checkpoint ended before CRIU served the container's memory");
        }
        tokio::time::sleep(READY_POLL).await;
    }
    Ok(())
}

/// Stops the CRIU process that serves pages on `server`, if one still does: the
/// processes it holds (those of cgroup `held`) run again (undo before the destination
/// restored them), or were killed already (after). Its sockets are destroyed
/// ([`crate::kernel::sock_diag`]), so that CRIU fails its dump as on a broken connection and lets
/// the processes go; killing it would leave them seized. CRIU does not take a failed lazy
/// dump's TCP connections out of repair mode: this does ([`release_repair`]). Only a
/// CRIU that does not end within 10 s is killed.
pub async fn stop_serving(server: PageServer, held: Option<&str>) -> Result<()> {
    let stopped = stop_server_process(server, held).await;
    let unguarded = unguard(server).await;
    stopped.and(unguarded)
}

/// Lets only `peer` reach the page server's port ([`crate::kernel::nft`]): CRIU serves
/// the first connection it gets, and one from elsewhere would fail the migration.
async fn guard(server: PageServer, peer: Ipv4Addr) -> Result<()> {
    let at = SocketAddrV4::new(server.address, server.port);
    tokio::task::spawn_blocking(move || {
        crate::kernel::nft::Firewall::ensure()?.guard_pages(at, peer)
    })
    .await?
}

/// Removes the guard of the page server's port ([`guard`]): it serves no more.
pub async fn unguard(server: PageServer) -> Result<()> {
    let at = SocketAddrV4::new(server.address, server.port);
    tokio::task::spawn_blocking(move || {
        if !crate::kernel::nft::Firewall::table_exists()? {
            return Ok(());
        }
        crate::kernel::nft::Firewall::ensure()?.unguard_pages(at)
    })
    .await?
}

async fn stop_server_process(server: PageServer, held: Option<&str>) -> Result<()> {
    let at = SocketAddrV4::new(server.address, server.port);
    // Listening, or (CRIU serves one restore) connected to the destination.
    let sockets: Vec<_> = tcp_sockets()?
        .into_iter()
        .filter(|s| s.local == at)
        .collect();
    let inodes: Vec<u64> = sockets.iter().map(|s| s.inode).collect();
    let holder = tokio::task::spawn_blocking(move || inodes.into_iter().find_map(socket_holder));
    let Some(pid) = holder.await? else {
        return Ok(());
    };
    let destroyed = tokio::task::spawn_blocking(move || {
        sockets.iter().try_for_each(|s| {
            crate::kernel::sock_diag::destroy_tcp(s.local, (!s.listening).then_some(s.remote))
        })
    });
    if let Err(e) = destroyed.await? {
        tracing::warn!("CRIU's page server is killed: {e:#}");
        crate::kernel::process::kill(pid)
            .with_context(|| format!("stop CRIU's page server (pid {pid})"))?;
    }
    if !ended_within(pid, Duration::from_secs(10)).await {
        tracing::warn!("CRIU's page server (pid {pid}) did not end on its own: killed");
        crate::kernel::process::kill(pid)
            .with_context(|| format!("stop CRIU's page server (pid {pid})"))?;
        if !ended_within(pid, Duration::from_secs(10)).await {
            bail!("CRIU's page server (pid {pid}) did not stop");
        }
    }
    if let Some(cgroup) = held.map(str::to_string) {
        tokio::task::spawn_blocking(move || release_repair(&cgroup)).await??;
    }
    Ok(())
}

/// Takes the TCP connections of the processes in `cgroup` out of repair mode, as CRIU
/// does when a dump fails before the lazy pages (`libsoccr_resume`); after a failed lazy
/// transfer it does not, and they would stay dead. A socket that is not a TCP
/// connection refuses, and is left as it is. A cgroup that is gone has none.
fn release_repair(cgroup: &str) -> Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let Ok(pids) = crate::kernel::freezer::processes(cgroup) else {
        return Ok(());
    };
    for pid in pids {
        for fd in descriptors(pid, |link| link.starts_with("socket:[")) {
            let Ok(socket) = borrow_fd(pid, fd) else {
                continue; // it has gone meanwhile
            };
            // Off (0) is also what the kernel's TCP_REPAIR_OFF is.
            let _ = setsockopt(&socket, sockopt::TcpRepair, &0);
        }
    }
    Ok(())
}

/// Whether process `pid` is gone within `patience` (runc, CRIU's parent, reaps it).
async fn ended_within(pid: i32, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while crate::kernel::process::exists(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Runs `work` (the destination's restore) and meanwhile tunes CRIU's end of the page
/// connection ([`super::page_server::tune_page_connection`]) as soon as CRIU serves the
/// destination's daemon on it, within that restore: until then CRIU's answers can wait in
/// the kernel, and the restore, then the pages, wait on them. `criu` is the CRIU process
/// that serves. Returns `work`'s output, and whether the connection was tuned.
pub async fn tune_serving_during<T>(
    server: PageServer,
    criu: Option<i32>,
    work: impl std::future::Future<Output = T>,
) -> (T, Result<()>) {
    let Some(criu) = criu else {
        let tuned = Err(anyhow::anyhow!("CRIU's process is not known"));
        return (work.await, tuned);
    };
    let mut work = std::pin::pin!(work);
    let mut serving = Serving::default();
    let mut tuned = false;
    let output = loop {
        tokio::select! {
            output = &mut work => break output,
            // Not there yet (or not readable): looked for again at the next poll.
            _ = tokio::time::sleep(READY_POLL), if !tuned => {
                tuned = tune_serving(server, criu, &mut serving).unwrap_or(false);
            }
        }
    };
    let tuned = match tuned {
        true => Ok(()),
        false => tune_serving(server, criu, &mut serving).and_then(|tuned| {
            tuned
                .then_some(())
                .context("no connection to CRIU's page server")
        }),
    };
    (output, tuned)
}

/// What [`tune_serving`] found of CRIU's page server so far.
#[derive(Default)]
struct Serving {
    /// Its listening socket is without Nagle's delay.
    listener_tuned: bool,
    /// CRIU's end of the daemon's connection.
    connection: Option<OwnedFd>,
}

/// Tunes CRIU's end of the daemon's connection, found among the descriptors of process
/// `criu` and kept in `serving`; false if there is none yet, or CRIU does not serve on
/// it yet: it corks the connection when it starts to (`page_server_serve`), which would
/// undo an uncork made before. This runs every millisecond of the destination's restore,
/// on the cores the restore needs, so each look must cost microseconds.
///
/// While CRIU listens, its listener loses Nagle's delay (TCP_NODELAY), which the
/// connection it accepts inherits. The TLS handshake comes first on that connection, and
/// CRIU writes its part in several pieces: with Nagle, a piece written while the one
/// before is not acknowledged yet waited for the daemon's delayed acknowledgement (40 ms),
/// and the restore waited too, on its first fault (every second migration of a small
/// container here).
fn tune_serving(server: PageServer, criu: i32, serving: &mut Serving) -> Result<bool> {
    if serving.connection.is_none() {
        let at = SocketAddrV4::new(server.address, server.port);
        // CRIU closes its listening socket once it accepted the daemon (`run_tcp_server`):
        // until then there is no connection to look for. Looking costs a read of every
        // descriptor's link, and CRIU holds two pipes for each 4 MiB of the memory it
        // serves: at 2 GiB, each look took 2 ms, most of a core beside the restore.
        if crate::kernel::sock_diag::tcp_listening(at)? {
            if !serving.listener_tuned {
                if let Some(listener) = listener_held(criu, at)? {
                    rustix::net::sockopt::set_tcp_nodelay(&listener, true)?;
                    serving.listener_tuned = true;
                }
            }
            return Ok(false);
        }
        serving.connection = connection_held(criu, |local, _| local == at)?.map(|c| c.socket);
    }
    let Some(connection) = serving.connection.as_ref() else {
        return Ok(false);
    };
    if !rustix::net::sockopt::tcp_cork(connection)? {
        return Ok(false);
    }
    tune_page_connection(connection)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
