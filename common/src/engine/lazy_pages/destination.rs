//! The destination's side of post-copy: the archive to import lazily, and the
//! lazy-pages daemon that serves the restored processes' faults.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddrV4;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

use super::archive::append_bytes;
use super::criu_config::{CONFIG_ANNOTATION, RESTORE_CONF};
use super::page_server::{tune_page_connection, PageServer, READY_POLL};
use super::procfs::{borrow_fd, connection_held, descriptors, processes_running};
use crate::protocol::PageCredentials;

/// The socket `criu lazy-pages` opens in its work directory for the restore.
const DAEMON_SOCKET: &str = "lazy-pages.socket";
const DAEMON_LOG: &str = "lazy-pages.log";
/// The page connection's certificate and key ([`PageCredentials::write`]).
const TLS_FILE: &str = "pages.pem";

/// Makes `archive` restore lazily with the daemon of `work_dir`: its spec names a CRIU
/// configuration there (`lazy-pages`, and the work directory, where the daemon's socket
/// is), and its images are unpacked there for the daemon. `stopped`: the restored
/// processes stay stopped (`leave-stopped`) until they get SIGCONT. Returns the archive
/// to import.
pub fn prepare_import(archive: &Path, work_dir: &Path, stopped: bool) -> Result<PathBuf> {
    crate::files::create_private_dir(work_dir)?;
    let conf = work_dir.join(RESTORE_CONF);
    let stop = if stopped { "leave-stopped\n" } else { "" };
    // CRIU never locked the fresh network namespace podman restores into, but unlocks it
    // in the freeze all the same: several runs of iptables-restore, some 15 ms. Nothing can
    // reach the half-restored sockets anyway: the agent holds the container's packets
    // here and blackholes its address until the restore is done.
    let options = format!(
        "lazy-pages\n{stop}network-lock skip\nwork-dir {}\n",
        work_dir.display()
    );
    crate::files::write_atomic(&conf, options.as_bytes())?;
    let images = work_dir.join("images");
    let import = work_dir.join("import.tar");
    let mut out = tar::Builder::new(std::io::BufWriter::new(crate::files::create_private_file(
        &import,
    )?));
    // Buffered: tar reads entries in small pieces, and serde_json the spec byte by byte,
    // each a system call on a bare file (some 15 ms of the freeze for a small container).
    let mut input = tar::Archive::new(std::io::BufReader::new(File::open(archive)?));
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
            annotations[CONFIG_ANNOTATION] = conf.display().to_string().into();
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
    process: Process,
    work_dir: PathBuf,
    source: PageServer,
    /// Duplicates of its userfaultfds ([`Self::guard`]).
    held_uffds: Vec<OwnedFd>,
}

impl PagesDaemon {
    /// Starts it in `work_dir` (prepared by [`prepare_import`]) and waits until the restore
    /// can find it; it connects to `source` under TLS with `credentials`. CRIU's lazy-pages
    /// daemon exists only as the `criu` command (fixed arguments, no shell).
    pub async fn start(
        work_dir: &Path,
        source: PageServer,
        credentials: &PageCredentials,
    ) -> Result<Self> {
        let socket = work_dir.join(DAEMON_SOCKET);
        crate::files::remove_if_present(&socket)?;
        let tls = work_dir.join(TLS_FILE);
        credentials.write(&tls)?;
        let mut command = tokio::process::Command::new("criu");
        // `lazy-pages` first: [`Self::find_left_behind`] knows the daemon by it.
        command.arg("lazy-pages");
        for (option, value) in super::tls::criu_options(&tls) {
            command.arg(format!("--{option}"));
            command.args(value);
        }
        let mut child = command
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
            tokio::time::sleep(READY_POLL).await;
        }
        Ok(Self {
            process: Process::Child(child),
            work_dir: work_dir.to_path_buf(),
            source,
            held_uffds: Vec::new(),
        })
    }

    /// After the restore, once it is connected to the source:
    /// - its connection gets the agents' dead-peer timeouts
    ///   ([`crate::session::wire::DEAD_PEER_SECONDS`]), so a cut link fails it within seconds,
    ///   not after TCP's 15 minutes with the container stalled on a fault, and it is
    ///   uncorked ([`super::page_server::tune_page_connection`]);
    /// - this agent holds duplicates of its userfaultfds until [`Self::release`]: if it
    ///   dies, a closed userfaultfd would let the container read zeros where its pages
    ///   are missing, while a held one keeps a faulting thread waiting until the
    ///   container is stopped.
    ///
    /// Both through `pidfd_getfd`: the options are set on the daemon's own socket.
    ///
    /// Returns whether any memory is to come: the restore hands the daemon a userfaultfd
    /// for each process with lazy memory. None (CRIU wrote every page into the images
    /// after all) means nothing waits for the source; the daemon then has nothing to do.
    pub async fn guard(&mut self) -> Result<bool> {
        let pid = self
            .process
            .pid()
            .ok_or_else(|| anyhow!("criu lazy-pages has exited"))?;
        for fd in descriptors(pid, |link| link == "anon_inode:[userfaultfd]") {
            self.held_uffds.push(borrow_fd(pid, fd)?);
        }
        let lazy = !self.held_uffds.is_empty();
        let to = SocketAddrV4::new(self.source.address, self.source.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        let connection = loop {
            if let Some(connection) = connection_held(pid, |_, peer| peer == to)? {
                break connection;
            }
            // A daemon without a userfaultfd may be done already, its connection closed.
            if !lazy {
                return Ok(false);
            }
            if Instant::now() > deadline {
                bail!("criu lazy-pages did not connect to the source's page server at {to}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Also when it has no userfaultfd left: its goodbye to the page server may still
        // sit corked (200 ms).
        tune_page_connection(&connection.socket)?;
        Ok(lazy)
    }

    /// Lets go of the userfaultfds [`Self::guard`] held: every page is here, or the
    /// container is stopped.
    pub fn release(&mut self) {
        self.held_uffds.clear();
    }

    /// Waits until it exits: `Ok` once every page arrived, with how many it fetched.
    pub async fn wait(&mut self) -> Result<u64> {
        let failed = match &mut self.process {
            Process::Child(child) => {
                let status = child.wait().await?;
                (!status.success()).then(|| status.to_string())
            }
            Process::Adopted { pidfd, exited, .. } => {
                exit_of(pidfd).await?;
                *exited = true;
                ended_in_order(&self.log()).err()
            }
        };
        match failed {
            None => Ok(transferred_pages(&self.log())),
            Some(how) => bail!(
                "the page transfer from {}:{} failed ({how}): {}",
                self.source.address,
                self.source.port,
                last_error(&self.work_dir)
            ),
        }
    }

    /// Stops it at once (its uffds close: only after the container is stopped). Its
    /// connection to the source is destroyed first, which resets it: a daemon that just
    /// exits may close it in order, and CRIU's page server takes an orderly close for the
    /// end of a complete transfer, after which it ends the source's processes.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(pid) = self.process.pid() {
            let source = SocketAddrV4::new(self.source.address, self.source.port);
            let reset = tokio::task::spawn_blocking(move || {
                match connection_held(pid, |_, peer| peer == source)? {
                    Some(c) => crate::kernel::sock_diag::destroy_tcp(c.local, Some(c.peer)),
                    None => Ok(()),
                }
            });
            if let Err(e) = reset.await? {
                tracing::error!("the source's page server may take the lazy-pages daemon's end for a finished transfer: {e:#}");
            }
        }
        match &mut self.process {
            Process::Child(child) => Ok(child.kill().await?),
            Process::Adopted { pidfd, exited, .. } => {
                if !*exited {
                    // Gone already is as good.
                    let _ = pidfd_send_signal(&**pidfd, Signal::KILL);
                    exit_of(pidfd).await?;
                    *exited = true;
                }
                Ok(())
            }
        }
    }

    /// Finds the daemon of `work_dir` that a previous run of this agent started, if it did:
    /// a daemon goes on without its agent, and its end decides the source's processes (in
    /// order: CRIU ends them), so the restarted agent must learn how it ended, or watch it
    /// end.
    pub fn find_left_behind(work_dir: &Path, source: PageServer) -> Result<LeftBehind> {
        let dir = work_dir.to_string_lossy();
        let running = processes_running(|args| {
            args[0].ends_with("criu")
                && args.get(1) == Some(&"lazy-pages")
                && args
                    .windows(2)
                    .any(|pair| pair[0] == "--work-dir" && pair[1] == dir)
        });
        if let Some(&pid) = running.first() {
            let opened = Pid::from_raw(pid)
                .ok_or_else(|| anyhow!("pid {pid}"))
                .and_then(|p| Ok(pidfd_open(p, PidfdFlags::empty())?));
            match opened {
                Ok(pidfd) => {
                    return Ok(LeftBehind::Running(Box::new(Self {
                        process: Process::Adopted {
                            pid,
                            pidfd: Arc::new(pidfd),
                            exited: false,
                        },
                        work_dir: work_dir.to_path_buf(),
                        source,
                        held_uffds: Vec::new(),
                    })))
                }
                // It ended in between: its log says how.
                Err(e) => tracing::debug!("criu lazy-pages {pid} is gone: {e:#}"),
            }
        }
        let log = std::fs::read_to_string(work_dir.join(DAEMON_LOG));
        Ok(LeftBehind::Ended(match log {
            Ok(log) => ended_in_order(&log).map(|()| transferred_pages(&log)),
            Err(e) => Err(format!("no log of a lazy-pages daemon: {e}")),
        }))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work_dir.join(DAEMON_LOG)).unwrap_or_default()
    }
}

/// The daemon's process.
enum Process {
    Child(tokio::process::Child),
    /// Left running by a previous run of the agent ([`PagesDaemon::find_left_behind`]): not
    /// a child of this one, so its exit status is lost, and its log tells how it ended.
    Adopted {
        pid: i32,
        pidfd: Arc<OwnedFd>,
        exited: bool,
    },
}

/// Waits until the process of `pidfd` has exited (its pidfd turns readable). On a thread
/// of its own: registering the descriptor with tokio's reactor takes `unsafe`.
async fn exit_of(pidfd: &Arc<OwnedFd>) -> Result<()> {
    let pidfd = pidfd.clone();
    tokio::task::spawn_blocking(move || loop {
        let mut ready = [PollFd::new(&*pidfd, PollFlags::IN)];
        match poll(&mut ready, None) {
            Err(rustix::io::Errno::INTR) => continue,
            done => return done.map(drop).context("wait for criu lazy-pages to exit"),
        }
    })
    .await?
}

impl Process {
    fn pid(&self) -> Option<i32> {
        match self {
            Process::Child(child) => child.id().map(|pid| pid as i32),
            Process::Adopted { pid, exited, .. } => (!exited).then_some(*pid),
        }
    }
}

/// What a previous run of the agent left of a lazy restore's daemon.
pub enum LeftBehind {
    /// It still runs: to be watched as one started here.
    Running(Box<PagesDaemon>),
    /// It ended while no agent watched: every page came (how many), or why not.
    Ended(Result<u64, String>),
}

/// Whether a daemon ended in order, by its log: it said goodbye to the page server
/// ("Disconnect from the page server") and logged no error. A daemon that fails logs an
/// `Error (file:line)` first (and still says goodbye); one that was killed says nothing
/// more.
fn ended_in_order(log: &str) -> Result<(), String> {
    if let Some(error) = log.lines().find(|l| l.contains("Error (")) {
        return Err(error.trim().to_string());
    }
    if !log.contains("Disconnect from the page server") {
        return Err("it stopped before the end of the transfer".to_string());
    }
    Ok(())
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
    fn transferred_pages_are_summed_over_processes() {
        let log = "(01.3) uffd: 1-12: UFFD transferred pages: (65619/65619)\n(01.4) uffd: 7-14: UFFD transferred pages: (20/20)\n";
        assert_eq!(transferred_pages(log), 65_639);
    }

    #[test]
    fn an_orderly_end_is_told_from_a_failure_by_the_log() {
        let done = "(00.2) uffd: 1-12: UFFD transferred pages: (256/256)\n(00.2) Disconnect from the page server\n";
        assert_eq!(ended_in_order(done), Ok(()));
        // A failing daemon still says goodbye, after its error.
        let failed = "(00.1) Error (criu/page-xfer.c:1660): Remote side closed connection\n(00.1) Disconnect from the page server\n";
        assert!(ended_in_order(failed)
            .unwrap_err()
            .contains("Remote side closed"));
        // Killed mid-transfer: no goodbye.
        let killed = "(00.1) uffd: 1-12: xfer pages\n";
        assert!(ended_in_order(killed).is_err());
    }
}
