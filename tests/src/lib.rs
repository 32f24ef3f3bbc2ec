//! A multi-host lab on one machine for end-to-end tests of live migration.
//!
//! A lab is `N` simulated hosts (`h1`..`hN`) and a `client`, each a network namespace with
//! a veth to one bridge (10.77.0.0/24), plus per host a persistent mount namespace with
//! private podman state, a `podman system service` and an `agent-server`. See
//! `/work/shared/lab-notes.md` for why each piece is needed.
//!
//! ```no_run
//! let lab = lab::Lab::up(lab::LabOptions { hosts: 2, ..Default::default() })?;
//! lab.exec("h1", &["podman", "run", "-d", "--name", "c1", "localhost/counter"])?;
//! let out = lab.exec("h1", &["podman", "ps"])?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! // dropped (or `lab.down()`): everything is removed
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Call [`install_signal_cleanup`] once in a test binary so that Ctrl-C/SIGTERM also tears
//! down the labs it owns; [`gc`] removes labs left by processes that died anyway.

pub mod cleanup;
pub mod cmd;
pub mod flow;
pub mod host;
pub mod images;
pub mod netns;
pub mod plan;
pub mod procfs;
pub mod testing;

use std::collections::BTreeSet;
use std::fs;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context, Result};

pub use cleanup::{gc, LabStatus, TeardownReport};
pub use host::Daemon;
pub use images::{ImageMeta, ImageSource, PortSpec};
pub use plan::{
    ClientDescription, HostDescription, LabDescription, LabState, NsFiles, Owner, CLIENT,
};
pub use testing::{run_tests, skip_reason, wait_for};

/// Labs owned by this process (torn down by the signal handler).
static OWNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
/// Serialises teardowns in this process (Drop vs. signal handler).
static TEARDOWN: Mutex<()> = Mutex::new(());
/// Set by the signal handler: a lab being created stops at its next step.
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// How long to wait for the podman service and the agents to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`Lab::up`] builds.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Number of hosts (default 3).
    pub hosts: usize,
    /// Lab name (default `lm` + 6 random characters).
    pub name: Option<String>,
    /// Start `agent-server` in every host and wait for it to listen (default true).
    pub start_agents: bool,
    /// Build the workload images and load them into every host (default true).
    pub images: bool,
    /// Where agent-server/agent-client are (default: see [`host::find_bin_dir`]).
    pub bin_dir: Option<PathBuf>,
    /// Workspace root (default: see [`images::workspace_root`]).
    pub workspace: Option<PathBuf>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            hosts: 3,
            name: None,
            start_agents: true,
            images: true,
            bin_dir: None,
            workspace: None,
        }
    }
}

/// A running lab. Dropping an owned lab tears it down.
pub struct Lab {
    desc: LabDescription,
    images: Vec<ImageMeta>,
    /// Whether this process tears the lab down on drop.
    owned: bool,
}

fn check_not_shutting_down() -> Result<()> {
    if SHUTTING_DOWN.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Prints a progress line with the time since `t0` to stderr when `LM_LAB_VERBOSE` is set.
fn progress(t0: Instant, what: &str) {
    if std::env::var_os("LM_LAB_VERBOSE").is_some() {
        eprintln!("[lab {:>6.2}s] {what}", t0.elapsed().as_secs_f64());
    }
}

/// Runs `f` for every item on its own thread; the first error wins (all threads finish).
fn parallel<T: Sync>(items: &[T], f: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = items.iter().map(|it| s.spawn(|| f(it))).collect();
        let mut first = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(anyhow!("setup thread panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `mount --bind DIR DIR; mount --make-private DIR`: `unshare --mount=FILE` refuses a FILE
/// whose directory could propagate the namespace mount into the namespace itself.
fn private_bind_self(dir: &Path) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .context("bind-mounting the ns dir")?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the ns dir private")?;
    Ok(())
}

fn write_state(desc: &LabDescription, owner: Option<Owner>) -> Result<()> {
    let state = LabState {
        owner,
        created_at: now_secs(),
        description: desc.clone(),
    };
    let path = desc.dir.join("state.json");
    let tmp = desc.dir.join("state.json.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(&state)?)?;
    fs::rename(&tmp, &path)?;
    Ok(())
}

impl Lab {
    /// Creates a lab. On failure everything created so far is removed again.
    pub fn up(opts: LabOptions) -> Result<Lab> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the lab needs root (network/mount namespaces, podman, CRIU)");
        }
        // Labs of test processes that died (SIGKILL, crash) would otherwise pile up.
        let (removed, errors) = gc(false);
        for e in errors {
            eprintln!("lab: gc of stale lab: {e}");
        }
        if !removed.is_empty() {
            eprintln!("lab: removed stale labs {removed:?}");
        }
        let name = match &opts.name {
            Some(n) => n.clone(),
            None => loop {
                let n = plan::random_name();
                if !plan::lab_dir(&n).exists() {
                    break n;
                }
            },
        };
        let bin_dir = opts.bin_dir.clone().or_else(host::find_bin_dir);
        let desc = LabDescription::plan(&name, opts.hosts, bin_dir)?;
        if desc.dir.exists() || desc.data_dir.exists() {
            bail!("lab {name} already exists (see `lab list`)");
        }
        if let Some(ns) = desc.all_netns().into_iter().find(|n| netns::exists(n)) {
            bail!("network namespace {ns} already exists");
        }
        OWNED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone());
        let mut lab = Lab {
            desc,
            images: Vec::new(),
            owned: true,
        };
        match lab.build(&opts) {
            Ok(()) => Ok(lab),
            Err(e) => {
                let rep = lab.teardown();
                lab.owned = false;
                if rep.errors.is_empty() {
                    Err(e.context(format!("creating lab {name}")))
                } else {
                    Err(e.context(format!(
                        "creating lab {name} (and cleaning up: {})",
                        rep.errors.join("; ")
                    )))
                }
            }
        }
    }

    fn build(&mut self, opts: &LabOptions) -> Result<()> {
        let t0 = Instant::now();
        let desc = self.desc.clone();
        fs::create_dir_all(&desc.dir)?;
        // state.json first: from now on teardown/gc know this lab and its owner.
        write_state(&desc, Some(cleanup::current_owner()))?;
        fs::create_dir_all(&desc.data_dir)?;
        let token = hex::encode(rand::random::<[u8; 32]>());
        host::write_secret(&desc.token_file, &token)?;
        let ns_dir = plan::ns_dir(&desc.name);
        fs::create_dir_all(&ns_dir)?;
        private_bind_self(&ns_dir)?;

        check_not_shutting_down()?;
        netns::setup_lan(&desc).context("setting up the LAN")?;
        progress(t0, "LAN up");

        check_not_shutting_down()?;
        std::thread::scope(|s| -> Result<()> {
            let client = s.spawn(|| host::setup_client(&desc, &desc.client));
            let hosts = parallel(&desc.hosts, |h| {
                check_not_shutting_down()?;
                host::prepare_host_files(&desc, h, &token)?;
                host::setup_host_namespaces(h)
                    .with_context(|| format!("mount namespace of {}", h.name))?;
                check_not_shutting_down()?;
                let pid = host::start_daemon(h, Daemon::Podman, desc.bin_dir.as_deref())?;
                host::wait_podman(h, pid, READY_TIMEOUT)
            });
            client
                .join()
                .map_err(|_| anyhow!("client setup panicked"))?
                .context("setting up the client")?;
            hosts
        })?;
        progress(t0, "hosts up, podman services listening");

        if opts.images {
            check_not_shutting_down()?;
            let ws = opts
                .workspace
                .clone()
                .unwrap_or_else(images::workspace_root);
            let sources = images::build_workloads(&ws)?;
            progress(t0, "workload images built");
            check_not_shutting_down()?;
            let cache = images::images_dir(&ws);
            images::distribute(&desc.hosts, &sources, Some(&cache), &desc.data_dir)?;
            self.images = sources.into_iter().map(|s| s.meta).collect();
            progress(t0, "images loaded into every host");
        }

        if opts.start_agents {
            check_not_shutting_down()?;
            parallel(&desc.hosts, |h| self.start_agent(&h.name))?;
            progress(t0, "agents listening");
        }
        Ok(())
    }

    /// Opens an existing lab (for the CLI). The returned handle does not own the lab:
    /// dropping it leaves the lab running.
    pub fn open(name: &str) -> Result<Lab> {
        plan::validate_name(name)?;
        let state = cleanup::read_state(name).with_context(|| format!("no lab named {name}"))?;
        Ok(Lab {
            desc: state.description,
            images: Vec::new(),
            owned: false,
        })
    }

    /// Detaches the lab from this process: it survives our exit and `gc` leaves it alone
    /// (unless `gc --all`). Used by `lab up`.
    pub fn disown(mut self) -> Result<LabDescription> {
        write_state(&self.desc, None)?;
        self.owned = false;
        OWNED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.desc.name);
        Ok(self.desc.clone())
    }

    pub fn name(&self) -> &str {
        &self.desc.name
    }

    pub fn description(&self) -> &LabDescription {
        &self.desc
    }

    pub fn hosts(&self) -> &[HostDescription] {
        &self.desc.hosts
    }

    /// A host by name (`h1`...).
    pub fn host(&self, name: &str) -> Result<&HostDescription> {
        self.desc
            .host(name)
            .ok_or_else(|| anyhow!("lab {} has no host {name}", self.desc.name))
    }

    pub fn client(&self) -> &ClientDescription {
        &self.desc.client
    }

    /// Metadata of the workload images loaded into the hosts (empty without `images`).
    pub fn images(&self) -> &[ImageMeta] {
        &self.images
    }

    /// The shared agent token.
    pub fn token(&self) -> Result<String> {
        Ok(fs::read_to_string(&self.desc.token_file)?
            .trim()
            .to_string())
    }

    fn node(&self, node: &str) -> Result<&NsFiles> {
        self.desc
            .node_ns(node)
            .ok_or_else(|| anyhow!("lab {} has no host or client named {node}", self.desc.name))
    }

    /// A command that runs `args` inside `node` (a host or `client`), with the agent
    /// binaries first in PATH. Configure stdio yourself; paths must be absolute (nsenter
    /// resets the working directory to `/`).
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, node: &str, args: &[S]) -> Result<Command> {
        if args.is_empty() {
            bail!("no command given");
        }
        let mut c = host::nsenter(self.node(node)?);
        c.args(args)
            .env("PATH", host::path_env(self.desc.bin_dir.as_deref()));
        Ok(c)
    }

    /// Runs `args` in `node` and returns its output; an error naming the command and its
    /// stderr if it does not exit 0.
    pub fn exec<S: AsRef<std::ffi::OsStr>>(&self, node: &str, args: &[S]) -> Result<Output> {
        let mut c = self.command(node, args)?;
        cmd::output(&mut c).with_context(|| format!("in {node}"))
    }

    /// Like [`Lab::exec`] but returns the output whatever the exit status.
    pub fn exec_unchecked<S: AsRef<std::ffi::OsStr>>(
        &self,
        node: &str,
        args: &[S],
    ) -> Result<Output> {
        cmd::output_unchecked(&mut self.command(node, args)?)
    }

    /// Like [`Lab::exec_unchecked`], killing the command after `timeout`.
    pub fn exec_timeout<S: AsRef<std::ffi::OsStr>>(
        &self,
        node: &str,
        args: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        cmd::output_timeout(&mut self.command(node, args)?, timeout)
    }

    /// Runs `args` in `node` and returns its trimmed stdout (error if it fails).
    pub fn exec_stdout<S: AsRef<std::ffi::OsStr>>(&self, node: &str, args: &[S]) -> Result<String> {
        let out = self.exec(node, args)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The entries of `dir` in the agents' state directory of `host` (e.g. `forwards`),
    /// one per line; empty when that directory does not exist.
    pub fn agent_state(&self, host: &str, dir: &str) -> Result<String> {
        let path = format!("{}/{dir}", plan::STATE_DIR_IN_HOST);
        let out = self.exec_unchecked(host, &["ls", "-A", &path])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("No such file") {
            bail!("ls {path} in {host}: {stderr}");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The last `max` bytes of the log of `agent-server` in `host`, to explain a failure.
    pub fn agent_log_tail(&self, host: &str, max: u64) -> Result<String> {
        Ok(host::log_tail(
            &Daemon::Agent.log_file(self.host(host)?),
            max,
        ))
    }

    /// The packet-hold rules left in `host` (the agent's table `ip live_migrate_hold`), one
    /// per line; empty when there are none.
    pub fn hold_rules(&self, host: &str) -> Result<String> {
        let out =
            self.exec_unchecked(host, &["nft", "list", "table", "ip", "live_migrate_hold"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("lm:hold"))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Starts a long-running command in `node` (stdin null, stdout/stderr piped). The
    /// caller must kill/wait it; teardown kills whatever is still in the lab anyway.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(&self, node: &str, args: &[S]) -> Result<Child> {
        let mut c = self.command(node, args)?;
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn()
            .with_context(|| format!("spawning `{}` in {node}", cmd::describe(&c)))
    }

    /// `podman ARGS...` in `host`, stdout trimmed.
    pub fn podman(&self, host: &str, args: &[&str]) -> Result<String> {
        let mut v = vec!["podman"];
        v.extend_from_slice(args);
        self.exec_stdout(host, &v)
    }

    /// `podman run -d --pull=never --name NAME OPTIONS... IMAGE ARGS...` in `host` (no
    /// registry is reachable: a missing image must fail at once).
    pub fn run_container(
        &self,
        host: &str,
        name: &str,
        options: &[&str],
        image: &str,
        args: &[&str],
    ) -> Result<()> {
        let mut argv = vec!["run", "-d", "--pull=never", "--name", name];
        argv.extend_from_slice(options);
        argv.push(image);
        argv.extend_from_slice(args);
        self.podman(host, &argv).map(|_| ())
    }

    /// Runs `image` in `host` as `name` with TCP `port` published on the same host port,
    /// and waits until the client namespace can connect to it. Returns that address.
    pub fn publish_tcp(
        &self,
        host: &str,
        name: &str,
        image: &str,
        port: u16,
    ) -> Result<SocketAddr> {
        let mapping = format!("{port}:{port}");
        self.run_container(host, name, &["-p", &mapping], image, &[])?;
        let addr = SocketAddr::from((self.host(host)?.address, port));
        self.wait_tcp("client", addr, Duration::from_secs(15))?;
        Ok(addr)
    }

    /// The IP address of a container on the default network.
    pub fn container_ip(&self, host: &str, container: &str) -> Result<String> {
        self.podman(
            host,
            &[
                "inspect",
                "--format",
                "{{.NetworkSettings.IPAddress}}",
                container,
            ],
        )
    }

    /// Runs `f` on a thread inside `node`'s network namespace; see [`netns::in_netns`].
    pub fn in_netns<T: Send>(&self, node: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        netns::in_netns(&self.node(node)?.netns_path, f)
    }

    /// A TCP connection made from inside `node` (usually `client`). The returned stream can
    /// be used from any thread.
    pub fn connect_tcp(
        &self,
        node: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpStream> {
        netns::connect_tcp(self.node(node)?, addr, timeout)
    }

    /// A UDP socket bound inside `node`.
    pub fn bind_udp(&self, node: &str, bind: SocketAddr) -> Result<UdpSocket> {
        netns::bind_udp(self.node(node)?, bind)
    }

    /// Waits until `addr` accepts TCP connections from `node`.
    pub fn wait_tcp(&self, node: &str, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let ns = self.node(node)?.clone();
        cmd::poll(
            timeout,
            Duration::from_millis(50),
            &format!("{addr} from {node}"),
            || {
                Ok(netns::connect_tcp(&ns, addr, Duration::from_millis(200))
                    .ok()
                    .map(|_| ()))
            },
        )
    }

    /// Starts `agent-server` in `host` (if not running) and waits until its port accepts
    /// connections from the client namespace.
    pub fn start_agent(&self, host: &str) -> Result<()> {
        let h = self.host(host)?;
        let pid = match host::daemon_pid(h, Daemon::Agent) {
            Some(pid) => pid,
            None => host::start_daemon(h, Daemon::Agent, self.desc.bin_dir.as_deref())?,
        };
        let client = self.desc.client.ns.clone();
        let addr = SocketAddr::V4(h.agent_addr);
        cmd::poll(
            READY_TIMEOUT,
            Duration::from_millis(50),
            &format!("agent-server on {host} ({addr})"),
            || {
                // By pid alone: a fresh process has not entered the host's namespaces yet.
                if procfs::is_zombie(pid) {
                    bail!(
                        "agent-server in {host} exited: {}",
                        host::log_tail(&Daemon::Agent.log_file(h), 2000)
                    );
                }
                Ok(
                    netns::connect_tcp(&client, addr, Duration::from_millis(200))
                        .ok()
                        .map(|_| ()),
                )
            },
        )
    }

    /// Stops `agent-server` in `host` (SIGTERM, SIGKILL after 3 s). Returns whether it was
    /// running. Tests use it to make a destination fail.
    pub fn stop_agent(&self, host: &str) -> Result<bool> {
        host::stop_daemon(self.host(host)?, Daemon::Agent, Duration::from_secs(3))
    }

    /// Kills `agent-server` in `host` at once (SIGKILL): a crash rather than a shutdown.
    pub fn kill_agent(&self, host: &str) -> Result<bool> {
        host::stop_daemon(self.host(host)?, Daemon::Agent, Duration::ZERO)
    }

    /// The pid of `agent-server` in `host`, if it runs.
    pub fn agent_pid(&self, host: &str) -> Result<Option<u32>> {
        Ok(host::daemon_pid(self.host(host)?, Daemon::Agent))
    }

    /// Arms a fault point of `agent-server` in `host` (`POINT:ACTION`, see
    /// `common::fault`): the running agent reads it when it reaches the point.
    pub fn inject_agent_fault(&self, host: &str, spec: &str) -> Result<()> {
        let path = format!("{}/inject-fault", plan::STATE_DIR_IN_HOST);
        let mut c = self.command(host, &["tee", &path])?;
        c.stdin(Stdio::piped()).stdout(Stdio::null());
        let mut child = c.spawn()?;
        std::io::Write::write_all(&mut child.stdin.take().expect("piped"), spec.as_bytes())?;
        ensure!(child.wait()?.success(), "writing {path} in {host}");
        Ok(())
    }

    /// Removes a fault point armed with [`Lab::inject_agent_fault`] that did not fire.
    pub fn clear_agent_fault(&self, host: &str) -> Result<()> {
        let path = format!("{}/inject-fault", plan::STATE_DIR_IN_HOST);
        self.exec(host, &["rm", "-f", &path])?;
        Ok(())
    }

    /// Drops all traffic between hosts `a` and `b` on the LAN (the client still reaches
    /// both), as a cut cable between them would; [`Lab::join_link`] undoes it.
    pub fn cut_link(&self, a: &str, b: &str) -> Result<()> {
        let (a, b) = (
            self.host(a)?.address.to_string(),
            self.host(b)?.address.to_string(),
        );
        let table = "lm_lab_cut";
        self.lan_nft(&["add", "table", "bridge", table])?;
        self.lan_nft(&[
            "add",
            "chain",
            "bridge",
            table,
            "forward",
            "{ type filter hook forward priority 0 ; }",
        ])?;
        for (from, to) in [(&a, &b), (&b, &a)] {
            self.lan_nft(&[
                "add", "rule", "bridge", table, "forward", "ip", "saddr", from, "ip", "daddr", to,
                "drop",
            ])?;
        }
        Ok(())
    }

    /// Ends every cut of [`Lab::cut_link`].
    pub fn join_link(&self) -> Result<()> {
        self.lan_nft(&["delete", "table", "bridge", "lm_lab_cut"])
    }

    /// `nft ARGS...` in the LAN namespace (a network namespace only: no mount namespace
    /// to enter).
    fn lan_nft(&self, args: &[&str]) -> Result<()> {
        cmd::run(
            Command::new("ip")
                .args(["netns", "exec", &self.desc.lan.netns, "nft"])
                .args(args),
        )
    }

    /// Whether `agent-server` runs in `host`.
    pub fn agent_running(&self, host: &str) -> Result<bool> {
        Ok(host::daemon_pid(self.host(host)?, Daemon::Agent).is_some())
    }

    /// Stops and starts `agent-server` in `host`.
    pub fn restart_agent(&self, host: &str) -> Result<()> {
        self.stop_agent(host)?;
        self.start_agent(host)
    }

    /// Imports rootfs tarballs as images into every host with identical image ids
    /// (import into the first host, save, load into the others).
    pub fn import_images(&self, sources: &[ImageSource]) -> Result<()> {
        let scratch = self
            .desc
            .data_dir
            .join(format!("import-{}", rand::random::<u32>()));
        fs::create_dir_all(&scratch)?;
        let r = images::distribute(&self.desc.hosts, sources, None, &scratch);
        let _ = fs::remove_dir_all(&scratch);
        r
    }

    /// Tears the lab down (whether or not this process owns it). Errors list everything
    /// that could not be removed; the teardown still went as far as it could.
    pub fn down(mut self) -> Result<()> {
        let rep = self.teardown();
        self.owned = false;
        if rep.errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "tearing down lab {}: {}",
                self.desc.name,
                rep.errors.join("; ")
            ))
        }
    }

    fn teardown(&mut self) -> TeardownReport {
        let rep = teardown_named(&self.desc.name);
        OWNED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.desc.name);
        rep
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned {
            let rep = self.teardown();
            for e in rep.errors {
                eprintln!("lab {}: teardown: {e}", self.desc.name);
            }
        }
    }
}

/// Tears down lab `name` (serialised with other teardowns in this process).
pub fn teardown_named(name: &str) -> TeardownReport {
    let _g = TEARDOWN.lock().unwrap_or_else(|e| e.into_inner());
    cleanup::teardown(name)
}

/// Installs a Ctrl-C/SIGTERM/SIGHUP handler that tears down every lab owned by this
/// process, then exits with status 130. Safe to call more than once.
pub fn install_signal_cleanup() -> Result<()> {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
    }
    ctrlc::set_handler(|| {
        SHUTTING_DOWN.store(true, Ordering::SeqCst);
        let names: Vec<String> = OWNED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        for name in names {
            eprintln!("lab: signal received, tearing down {name}");
            for e in teardown_named(&name).errors {
                eprintln!("lab {name}: teardown: {e}");
            }
        }
        std::process::exit(130);
    })
    .context("installing the signal handler")?;
    *installed = true;
    Ok(())
}
