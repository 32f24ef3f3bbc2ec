//! The agent's WireGuard tunnels (one interface per remote agent, one peer per interface).
//!
//! Configuration goes through `wireguard-control`; the interface's MTU and up/down state go
//! through rtnetlink ([`crate::routing`]). No `ip`/`wg` command is run.
//!
//! # Backends
//!
//! [`backend()`] picks the kernel implementation when the kernel knows the `wireguard`
//! generic-netlink family, and otherwise the userspace one: `wireguard-control` then starts
//! `wireguard-go <ifname>` (or `$WG_USERSPACE_IMPLEMENTATION`) itself the first time the
//! interface is configured, and talks to it over `/var/run/wireguard/<ifname>.sock`.
//! `LM_WG_BACKEND=kernel|userspace` ([`BACKEND_ENV`]) overrides the choice.
//!
//! Facts about the userspace backend that shaped this module (wireguard-go 0.0.20220316):
//! * `wireguard-go` daemonizes: the process `wireguard-control` starts creates the TUN device
//!   and the UAPI socket, re-executes itself in the background and exits; the daemon is
//!   re-parented to PID 1 (which, on these machines, does not reap it: a stopped daemon stays
//!   a zombie). If `LOG_LEVEL` is set in the environment the daemon keeps the parent's stdout,
//!   and `wireguard-control` (which waits for the output of the start command) would hang: the
//!   start is therefore bounded by a timeout here.
//! * The daemon stops by itself both when its TUN link is deleted and when its socket file is
//!   removed. [`remove_tunnel`] does both, then waits for the process (found via
//!   `SO_PEERCRED` on the socket) to end, and sends it SIGTERM if it did not.
//! * The socket directory is per *mount* namespace, not per network namespace: two network
//!   namespaces sharing `/var/run` cannot both have a userspace interface of the same name.
//!   Before touching an existing socket this module checks (via `SO_PEERCRED` and
//!   `/proc/<pid>/ns/net`) that the daemon behind it lives in the caller's network namespace,
//!   and refuses otherwise.
//!
//! # Network namespaces
//!
//! Everything acts on the network namespace of the calling thread (netlink sockets are bound
//! at creation, and the `wireguard-go` child inherits the namespace of the thread that
//! forks it). Blocking `wireguard-control` calls run on tokio's blocking pool, whose threads
//! are spawned from runtime threads: call these functions from a runtime all of whose threads
//! live in the intended namespace (the normal case: the whole process is in one namespace).

use std::{
    collections::BTreeSet,
    fmt,
    fs::{self, OpenOptions},
    io::{ErrorKind, Write},
    net::{IpAddr, SocketAddr},
    os::unix::{
        fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
        io::AsRawFd,
        net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{debug, info, warn};
use wireguard_control::{
    AllowedIp, Backend as WgBackend, Device, DeviceUpdate, InterfaceName, PeerConfigBuilder,
};

pub use wireguard_control::Key;

use crate::routing::Routing;

/// Every interface the agent creates is called `lmwg-<something>`.
pub const INTERFACE_PREFIX: &str = "lmwg-";
/// Linux limit on interface names (IFNAMSIZ - 1).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;
/// MTU of the tunnel interfaces (1500 minus WireGuard's IPv6 worst-case overhead).
pub const TUNNEL_MTU: u32 = 1420;
/// Transmit queue of a tunnel, packets: room for all the packets held during a freeze,
/// let through at once ([`crate::hold::DEFAULT_BOUND`]). A userspace tunnel's TUN device
/// keeps 500 by default and drops the rest of such a burst.
pub const TUNNEL_TXQUEUELEN: u32 = crate::hold::DEFAULT_BOUND;
/// File holding the agent's private key (base64, like `wg genkey`) inside its state dir.
pub const KEY_FILE_NAME: &str = "wireguard.key";
/// Where userspace implementations put their UAPI sockets.
pub const USERSPACE_SOCKET_DIR: &str = "/var/run/wireguard";
/// Environment variable forcing the backend: `kernel` or `userspace`.
pub const BACKEND_ENV: &str = "LM_WG_BACKEND";

/// How long starting/configuring an interface may take before we give up.
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `remove_tunnel` waits for a wireguard-go daemon to exit by itself.
const USERSPACE_EXIT_TIMEOUT: Duration = Duration::from_secs(2);

// ----------------------------------------------------------------------------- names

/// Check that `name` is a valid name for one of the agent's interfaces: starts with
/// [`INTERFACE_PREFIX`], at most [`MAX_INTERFACE_NAME_LEN`] bytes, only `[A-Za-z0-9_.-]`
/// after the prefix and at least one such character.
pub fn validate_interface_name(name: &str) -> Result<()> {
    let Some(suffix) = name.strip_prefix(INTERFACE_PREFIX) else {
        bail!("interface name {name:?} does not start with {INTERFACE_PREFIX:?}");
    };
    if name.len() > MAX_INTERFACE_NAME_LEN {
        bail!(
            "interface name {name:?} is {} bytes long, the limit is {MAX_INTERFACE_NAME_LEN}",
            name.len()
        );
    }
    if suffix.is_empty() {
        bail!("interface name {name:?} has nothing after {INTERFACE_PREFIX:?}");
    }
    if let Some(c) = suffix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        bail!("interface name {name:?} contains {c:?} (allowed: A-Z a-z 0-9 - _ .)");
    }
    Ok(())
}

/// `lmwg-<suffix>`, validated.
pub fn interface_name(suffix: &str) -> Result<String> {
    let name = format!("{INTERFACE_PREFIX}{suffix}");
    validate_interface_name(&name)?;
    Ok(name)
}

fn wg_name(name: &str) -> Result<InterfaceName> {
    validate_interface_name(name)?;
    name.parse::<InterfaceName>()
        .map_err(|e| anyhow!("interface name {name:?}: {e}"))
}

// ------------------------------------------------------------------------------ keys

/// The agent's WireGuard identity.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    private: Key,
    public: Key,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public.to_base64())
            .field("private", &"<redacted>")
            .finish()
    }
}

impl KeyPair {
    /// A fresh random key pair (not stored anywhere).
    pub fn generate() -> Self {
        Self::from_private(Key::generate_private())
    }

    /// The key pair of a private key.
    pub fn from_private(private: Key) -> Self {
        let public = private.get_public();
        KeyPair { private, public }
    }

    /// Parse a base64 private key (the format of `wg genkey`).
    pub fn from_private_base64(b64: &str) -> Result<Self> {
        let key = Key::from_base64(b64.trim())
            .map_err(|_| anyhow!("not a base64-encoded 32-byte WireGuard key"))?;
        Ok(Self::from_private(key))
    }

    /// Load the private key from `state_dir/wireguard.key`, creating it (mode 0600, atomically:
    /// written to a temporary file then linked into place) if it does not exist. A key file
    /// readable or writable by group/others is reset to 0600 with a warning. A symlink or a
    /// non-regular file, or content that is not a key, is an error (the file is not replaced).
    pub fn load_or_create(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(KEY_FILE_NAME);
        match Self::load(&path) {
            Ok(kp) => return Ok(kp),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let kp = Self::generate();
        let tmp = state_dir.join(format!(".{KEY_FILE_NAME}.tmp.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // The mode given to open() is filtered by the umask; make sure of 0600.
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            writeln!(f, "{}", kp.private.to_base64())?;
            f.sync_all()
        };
        let written = write().with_context(|| format!("writing {}", tmp.display()));
        // hard_link does not overwrite: if another process created the key meanwhile, keep
        // theirs.
        let linked = written.and_then(|()| match fs::hard_link(&tmp, &path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(anyhow!(e).context(format!("creating {}", path.display()))),
        });
        let _ = fs::remove_file(&tmp);
        if linked? {
            info!(path = %path.display(), public = %kp.public_base64(), "created WireGuard key");
            Ok(kp)
        } else {
            Self::load(&path)
        }
    }

    fn load(path: &Path) -> Result<Self> {
        let meta = fs::symlink_metadata(path)
            .with_context(|| format!("reading WireGuard key {}", path.display()))?;
        if !meta.file_type().is_file() {
            bail!(
                "WireGuard key {} is not a regular file (symlinks are refused)",
                path.display()
            );
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "WireGuard key was accessible to group/others; resetting to 0600"
            );
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .with_context(|| format!("chmod 0600 {}", path.display()))?;
        }
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading WireGuard key {}", path.display()))?;
        Self::from_private_base64(&text)
            .with_context(|| format!("WireGuard key file {}", path.display()))
    }

    /// The private key (for [`TunnelSpec::private_key`]).
    pub fn private_key(&self) -> &Key {
        &self.private
    }

    /// The public key.
    pub fn public_key(&self) -> &Key {
        &self.public
    }

    /// The public key in base64, as exchanged with the peer agent.
    pub fn public_base64(&self) -> String {
        self.public.to_base64()
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == ErrorKind::NotFound)
    })
}

/// Parse a base64 public key received from a peer.
pub fn parse_public_key(b64: &str) -> Result<Key> {
    Key::from_base64(b64.trim()).map_err(|_| anyhow!("invalid WireGuard public key {b64:?}"))
}

// ------------------------------------------------------------------------------ spec

/// The desired state of one tunnel interface.
#[derive(Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    /// `lmwg-...`, at most 15 bytes.
    pub interface: String,
    pub private_key: Key,
    /// UDP port to listen on; 0 lets the implementation choose (and is then not compared).
    pub listen_port: u16,
    /// The peer agent's public key, base64.
    pub peer_public_key: String,
    /// Where to send the first handshake. `None` = wait for the peer to contact us (an
    /// endpoint learnt from the peer is then kept).
    pub peer_endpoint: Option<SocketAddr>,
    /// The peer's allowed IPs (also the addresses the tunnel routes *to* the peer from
    /// WireGuard's point of view). `ensure_tunnel` makes the peer's list exactly this one;
    /// see [`set_allowed_ips`] for changing it afterwards.
    pub allowed_ips: Vec<(IpAddr, u8)>,
    /// Persistent keepalive interval in seconds (`None` or `Some(0)` = off).
    pub keepalive: Option<u16>,
}

impl fmt::Debug for TunnelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelSpec")
            .field("interface", &self.interface)
            .field("public_key", &self.private_key.get_public().to_base64())
            .field("listen_port", &self.listen_port)
            .field("peer_public_key", &self.peer_public_key)
            .field("peer_endpoint", &self.peer_endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

impl TunnelSpec {
    fn validate(&self) -> Result<(InterfaceName, Key)> {
        let name = wg_name(&self.interface)?;
        let peer = parse_public_key(&self.peer_public_key)?;
        if peer == self.private_key.get_public() {
            bail!(
                "tunnel {}: the peer's public key is our own",
                self.interface
            );
        }
        check_allowed_ips(&self.allowed_ips)?;
        Ok((name, peer))
    }
}

fn check_allowed_ips(ips: &[(IpAddr, u8)]) -> Result<()> {
    for (ip, prefix) in ips {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if *prefix > max {
            bail!("invalid allowed IP {ip}/{prefix}");
        }
    }
    Ok(())
}

fn allowed_set(ips: &[(IpAddr, u8)]) -> BTreeSet<(IpAddr, u8)> {
    ips.iter().map(|(ip, p)| (mask(*ip, *p), *p)).collect()
}

fn allowed_set_of(ips: &[AllowedIp]) -> BTreeSet<(IpAddr, u8)> {
    ips.iter()
        .map(|a| (mask(a.address, a.cidr), a.cidr))
        .collect()
}

/// `ip` with the host bits beyond `prefix` cleared (WireGuard stores allowed IPs that way).
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

// --------------------------------------------------------------------------- backend

/// Which WireGuard implementation the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TunnelBackend {
    /// The kernel module (`ip link add type wireguard` equivalent, generic netlink).
    Kernel,
    /// `wireguard-go` (or `$WG_USERSPACE_IMPLEMENTATION`) over a UAPI socket.
    Userspace,
}

impl fmt::Display for TunnelBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TunnelBackend::Kernel => "kernel",
            TunnelBackend::Userspace => "userspace",
        })
    }
}

impl TunnelBackend {
    fn wg(self) -> WgBackend {
        match self {
            TunnelBackend::Kernel => WgBackend::Kernel,
            TunnelBackend::Userspace => WgBackend::Userspace,
        }
    }
}

/// The backend in use: [`BACKEND_ENV`] if set, otherwise kernel if the kernel has WireGuard,
/// otherwise userspace. Decided once per process.
pub fn backend() -> TunnelBackend {
    static BACKEND: OnceLock<TunnelBackend> = OnceLock::new();
    *BACKEND.get_or_init(|| {
        let chosen = match std::env::var(BACKEND_ENV).ok().as_deref() {
            Some("kernel") => TunnelBackend::Kernel,
            Some("userspace") => TunnelBackend::Userspace,
            other => {
                if let Some(v) = other {
                    warn!("{BACKEND_ENV}={v:?} is neither kernel nor userspace; detecting");
                }
                match kernel_has_wireguard() {
                    Ok(true) => TunnelBackend::Kernel,
                    Ok(false) => TunnelBackend::Userspace,
                    Err(e) => {
                        warn!("could not probe for kernel WireGuard ({e:#}); using userspace");
                        TunnelBackend::Userspace
                    }
                }
            }
        };
        info!(backend = %chosen, "WireGuard backend");
        chosen
    })
}

/// Ask generic netlink whether the `wireguard` family exists (this also makes the kernel
/// load the module if it is modular).
fn kernel_has_wireguard() -> Result<bool> {
    use rtnetlink::sys::{constants::NETLINK_GENERIC, Socket, SocketAddr as NlAddr};
    const GENL_ID_CTRL: u16 = 0x10;
    const CTRL_CMD_GETFAMILY: u8 = 3;
    const CTRL_ATTR_FAMILY_NAME: u16 = 2;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;

    let family = b"wireguard\0";
    let nla_len = 4 + family.len();
    let nla_padded = (nla_len + 3) & !3;
    let total = 16 + 4 + nla_padded;
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&GENL_ID_CTRL.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&[CTRL_CMD_GETFAMILY, 1, 0, 0]);
    msg.extend_from_slice(&(nla_len as u16).to_ne_bytes());
    msg.extend_from_slice(&CTRL_ATTR_FAMILY_NAME.to_ne_bytes());
    msg.extend_from_slice(family);
    msg.resize(total, 0);

    let socket = Socket::new(NETLINK_GENERIC).context("opening generic netlink socket")?;
    socket
        .send_to(&msg, &NlAddr::new(0, 0), 0)
        .context("sending CTRL_CMD_GETFAMILY")?;
    let (reply, _) = socket
        .recv_from_full()
        .context("receiving CTRL_CMD_GETFAMILY reply")?;
    if reply.len() < 16 {
        bail!("short generic netlink reply ({} bytes)", reply.len());
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind == NLMSG_ERROR {
        let code = reply
            .get(16..20)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0);
        // Error code 0 would be a bare ACK without the family: treat as absent.
        debug!(code, "generic netlink has no wireguard family");
        return Ok(false);
    }
    Ok(kind == GENL_ID_CTRL)
}

// ---------------------------------------------------------------- userspace sockets

fn socket_path(name: &str) -> PathBuf {
    Path::new(USERSPACE_SOCKET_DIR).join(format!("{name}.sock"))
}

/// Who is behind `/var/run/wireguard/<name>.sock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SocketOwner {
    /// No socket file.
    Absent,
    /// A file nobody listens on.
    Stale,
    /// A daemon in the caller's network namespace.
    Here { pid: i32 },
    /// A daemon in another network namespace (same mount namespace).
    Elsewhere { pid: i32 },
}

fn netns_id(path: &str) -> std::io::Result<(u64, u64)> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

fn peer_pid(stream: &UnixStream) -> std::io::Result<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid ucred.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid)
}

fn socket_owner(name: &str) -> SocketOwner {
    let path = socket_path(name);
    if fs::symlink_metadata(&path).is_err() {
        return SocketOwner::Absent;
    }
    let Ok(stream) = UnixStream::connect(&path) else {
        return SocketOwner::Stale;
    };
    let Ok(pid) = peer_pid(&stream) else {
        return SocketOwner::Stale;
    };
    drop(stream);
    let ours = netns_id("/proc/thread-self/ns/net");
    let theirs = netns_id(&format!("/proc/{pid}/ns/net"));
    match (ours, theirs) {
        (Ok(a), Ok(b)) if a != b => SocketOwner::Elsewhere { pid },
        _ => SocketOwner::Here { pid },
    }
}

/// Whether process `pid` is gone (or a zombie).
fn process_gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
    }
}

async fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if process_gone(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ------------------------------------------------------------------ blocking helpers

async fn blocking<T: Send + 'static>(
    what: String,
    timeout: Duration,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Err(_) => bail!("{what}: timed out after {timeout:?}"),
        Ok(Err(join)) => bail!("{what}: task failed: {join}"),
        Ok(Ok(Err(e))) => Err(anyhow!(e).context(what)),
        Ok(Ok(Ok(v))) => Ok(v),
    }
}

async fn get_device(name: InterfaceName, be: TunnelBackend) -> Result<Device> {
    blocking(
        format!("reading WireGuard configuration of {name} ({be})"),
        APPLY_TIMEOUT,
        move || Device::get(&name, be.wg()),
    )
    .await
}

async fn apply(update: DeviceUpdate, name: InterfaceName, be: TunnelBackend) -> Result<()> {
    let what = format!("configuring WireGuard interface {name} ({be})");
    blocking(what, APPLY_TIMEOUT, move || update.apply(&name, be.wg())).await
}

// ------------------------------------------------------------------------ operations

fn peer_builder(
    spec: &TunnelSpec,
    peer: &Key,
    current_keepalive: Option<u16>,
) -> PeerConfigBuilder {
    let mut b = PeerConfigBuilder::new(peer).replace_allowed_ips();
    if let Some(ep) = spec.peer_endpoint {
        b = b.set_endpoint(ep);
    }
    match spec.keepalive.filter(|k| *k != 0) {
        Some(k) => b = b.set_persistent_keepalive_interval(k),
        None if current_keepalive.is_some() => b = b.unset_persistent_keepalive(),
        None => {}
    }
    for (ip, prefix) in &spec.allowed_ips {
        b = b.add_allowed_ip(*ip, *prefix);
    }
    b
}

/// The configuration change that turns `dev` into `spec`, or `None` if it already matches.
fn device_delta(spec: &TunnelSpec, peer: &Key, dev: &Device) -> Option<DeviceUpdate> {
    let mut update = DeviceUpdate::new();
    let mut changed = false;
    if dev.private_key.as_ref() != Some(&spec.private_key) {
        update = update.set_private_key(spec.private_key.clone());
        changed = true;
    }
    if spec.listen_port != 0 && dev.listen_port != Some(spec.listen_port) {
        update = update.set_listen_port(spec.listen_port);
        changed = true;
    }
    for other in dev.peers.iter().filter(|p| &p.config.public_key != peer) {
        update = update.remove_peer_by_key(&other.config.public_key);
        changed = true;
    }
    let current = dev.peers.iter().find(|p| &p.config.public_key == peer);
    let current_keepalive = current
        .and_then(|p| p.config.persistent_keepalive_interval)
        .filter(|k| *k != 0);
    let peer_ok = current.is_some_and(|p| {
        (spec.peer_endpoint.is_none() || p.config.endpoint == spec.peer_endpoint)
            && current_keepalive == spec.keepalive.filter(|k| *k != 0)
            && allowed_set_of(&p.config.allowed_ips) == allowed_set(&spec.allowed_ips)
    });
    if !peer_ok {
        update = update.add_peer(peer_builder(spec, peer, current_keepalive));
        changed = true;
    }
    changed.then_some(update)
}

/// After a failed configuration: " already in use" if binding the UDP port fails with
/// EADDRINUSE in this namespace (the userspace backend reports every error as "invalid
/// input"), else "".
fn port_hint(port: u16) -> &'static str {
    if port == 0 {
        return "";
    }
    let in_use = |addr: IpAddr| {
        matches!(
            std::net::UdpSocket::bind((addr, port)),
            Err(e) if e.kind() == ErrorKind::AddrInUse
        )
    };
    if in_use(IpAddr::from([0u8; 4])) || in_use(IpAddr::from([0u16; 8])) {
        " already in use"
    } else {
        ""
    }
}

/// Create or update the tunnel interface described by `spec` in the caller's network
/// namespace, then set its MTU to [`TUNNEL_MTU`], its transmit queue to
/// [`TUNNEL_TXQUEUELEN`], and bring it up.
///
/// * Missing interface: created with the [`backend()`] (userspace: `wireguard-go` is
///   started), configured with key, port and exactly one peer.
/// * Existing, healthy interface: only what differs is changed (other peers removed, the
///   peer's endpoint/keepalive/allowed IPs updated, key or port changed) without dropping the
///   peer's session; nothing at all is written if it already matches (cost: one link lookup
///   and one configuration read).
/// * Half-made interface (link without a readable WireGuard configuration, configuration
///   without private key, link down, a userspace socket without link): torn down and created
///   again.
pub async fn ensure_tunnel(spec: &TunnelSpec) -> Result<()> {
    let (name, peer) = spec.validate()?;
    let ifname = spec.interface.as_str();
    let be = backend();
    let routing = Routing::new()?;
    let started = Instant::now();

    let mut link = routing.link(ifname).await?;
    let owner = socket_owner(ifname);
    if let SocketOwner::Elsewhere { pid } = owner {
        bail!(
            "cannot manage {ifname}: {} belongs to process {pid} in another network namespace",
            socket_path(ifname).display()
        );
    }

    // What exists, and is it usable?
    let exists = link.is_some() || matches!(owner, SocketOwner::Here { .. } | SocketOwner::Stale);
    let mut device = None;
    let mut broken: Option<String> = None;
    if exists {
        let readable = match be {
            TunnelBackend::Userspace => matches!(owner, SocketOwner::Here { .. }),
            TunnelBackend::Kernel => link
                .as_ref()
                .is_some_and(|l| l.kind.as_deref() == Some("wireguard")),
        };
        if link.is_none() {
            broken = Some("socket without link".into());
        } else if !readable {
            broken = Some(format!(
                "link (kind {:?}) has no {be} WireGuard device",
                link.as_ref().and_then(|l| l.kind.clone())
            ));
        } else {
            match get_device(name, be).await {
                Err(e) => broken = Some(format!("{e:#}")),
                Ok(dev) if dev.private_key.is_none() => broken = Some("no private key".into()),
                Ok(dev) => device = Some(dev),
            }
            if broken.is_none() && !link.as_ref().is_some_and(|l| l.up) {
                broken = Some("link is down".into());
            }
        }
    }
    if let Some(why) = broken {
        warn!(interface = ifname, reason = %why, "half-made WireGuard interface; recreating");
        remove_tunnel(ifname).await?;
        device = None;
        link = None;
    }

    match &device {
        None => {
            let update = DeviceUpdate::new()
                .set_private_key(spec.private_key.clone())
                .set_listen_port(spec.listen_port)
                .replace_peers()
                .add_peer(peer_builder(spec, &peer, None));
            if let Err(e) = apply(update, name, be).await {
                // Do not leave a half-made interface (or a stuck daemon) behind.
                if let Err(cleanup) = remove_tunnel(ifname).await {
                    warn!(
                        interface = ifname,
                        "cleanup after failed creation: {cleanup:#}"
                    );
                }
                return Err(e.context(format!(
                    "creating tunnel {ifname} (listen port {}{}, peer {})",
                    spec.listen_port,
                    port_hint(spec.listen_port),
                    spec.peer_public_key
                )));
            }
            info!(interface = ifname, backend = %be, elapsed = ?started.elapsed(), "created WireGuard interface");
            link = routing.link(ifname).await?;
        }
        Some(dev) => {
            if let Some(update) = device_delta(spec, &peer, dev) {
                apply(update, name, be).await.with_context(|| {
                    format!(
                        "reconfiguring tunnel {ifname} (listen port {}{}, peer {})",
                        spec.listen_port,
                        port_hint(spec.listen_port),
                        spec.peer_public_key
                    )
                })?;
                info!(interface = ifname, "reconfigured WireGuard interface");
            }
        }
    }

    let link = link.ok_or_else(|| {
        anyhow!("WireGuard interface {ifname} was configured but no link of that name exists in this network namespace")
    })?;
    if link.mtu != Some(TUNNEL_MTU) || link.txqueuelen != Some(TUNNEL_TXQUEUELEN) || !link.up {
        routing
            .configure_link_up(ifname, TUNNEL_MTU, TUNNEL_TXQUEUELEN)
            .await?;
    }
    debug!(interface = ifname, elapsed = ?started.elapsed(), "ensure_tunnel done");
    Ok(())
}

/// Make the allowed IPs of `peer_public_key` on `interface` exactly `ips` (WireGuard's
/// `replace_allowed_ips`); the peer's endpoint, keepalive and session are kept. Errors if
/// the interface or the peer does not exist (it never creates a peer).
pub async fn set_allowed_ips(
    interface: &str,
    peer_public_key: &str,
    ips: &[(IpAddr, u8)],
) -> Result<()> {
    let name = wg_name(interface)?;
    let peer = parse_public_key(peer_public_key)?;
    check_allowed_ips(ips)?;
    let be = backend();
    let dev = get_device(name, be).await?;
    let Some(current) = dev.peers.iter().find(|p| p.config.public_key == peer) else {
        bail!("interface {interface} has no peer {peer_public_key}");
    };
    if allowed_set_of(&current.config.allowed_ips) == allowed_set(ips) {
        return Ok(());
    }
    let mut b = PeerConfigBuilder::new(&peer).replace_allowed_ips();
    for (ip, prefix) in ips {
        b = b.add_allowed_ip(*ip, *prefix);
    }
    apply(DeviceUpdate::new().add_peer(b), name, be)
        .await
        .with_context(|| format!("setting allowed IPs of {peer_public_key} on {interface}"))
}

/// Summary of a tunnel as the implementation reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelInfo {
    pub interface: String,
    pub public_key: Option<String>,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerInfo>,
}

/// One peer of a [`TunnelInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<(IpAddr, u8)>,
    pub keepalive: Option<u16>,
    pub last_handshake: Option<std::time::SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Read the current state of `interface`.
pub async fn tunnel_info(interface: &str) -> Result<TunnelInfo> {
    let name = wg_name(interface)?;
    let dev = get_device(name, backend()).await?;
    Ok(TunnelInfo {
        interface: interface.to_string(),
        public_key: dev.public_key.as_ref().map(Key::to_base64),
        listen_port: dev.listen_port,
        peers: dev
            .peers
            .iter()
            .map(|p| PeerInfo {
                public_key: p.config.public_key.to_base64(),
                endpoint: p.config.endpoint,
                allowed_ips: p
                    .config
                    .allowed_ips
                    .iter()
                    .map(|a| (a.address, a.cidr))
                    .collect(),
                keepalive: p.config.persistent_keepalive_interval.filter(|k| *k != 0),
                last_handshake: p.stats.last_handshake_time,
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
            })
            .collect(),
    })
}

/// Delete `interface` (one of ours: the name must carry [`INTERFACE_PREFIX`]). For the
/// userspace backend the link is deleted and the UAPI socket removed, then the
/// `wireguard-go` daemon is waited for (up to 2 s) and sent SIGTERM if still alive.
/// Succeeds if there was nothing to remove. A socket of that name owned by a daemon in
/// another network namespace is left alone.
pub async fn remove_tunnel(interface: &str) -> Result<()> {
    validate_interface_name(interface)?;
    let routing = Routing::new()?;
    let owner = socket_owner(interface);
    let deleted = routing
        .delete_link(interface)
        .await
        .with_context(|| format!("removing WireGuard interface {interface}"))?;
    let pid = match owner {
        SocketOwner::Here { pid } => Some(pid),
        _ => None,
    };
    if matches!(owner, SocketOwner::Here { .. } | SocketOwner::Stale) {
        let path = socket_path(interface);
        if let Err(e) = crate::files::remove_if_present(&path) {
            warn!(path = %path.display(), "cannot remove socket: {e}");
        }
        let _ = fs::remove_file(Path::new(USERSPACE_SOCKET_DIR).join(format!("{interface}.name")));
    }
    if let Some(pid) = pid {
        if !wait_gone(pid, USERSPACE_EXIT_TIMEOUT).await {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            warn!(
                pid,
                comm = comm.trim(),
                "userspace WireGuard daemon still running; SIGTERM"
            );
            if !comm.trim().is_empty() {
                // SAFETY: plain kill(2) on the pid that served this interface's socket.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            if !wait_gone(pid, USERSPACE_EXIT_TIMEOUT).await {
                bail!("userspace WireGuard daemon {pid} for {interface} did not exit");
            }
        }
    }
    if deleted || pid.is_some() {
        info!(interface, "removed WireGuard interface");
    }
    Ok(())
}

/// The agent's WireGuard interfaces (`lmwg-*`) in the caller's network namespace.
pub fn list_tunnels() -> Vec<String> {
    let mut names = BTreeSet::new();
    if backend() == TunnelBackend::Kernel {
        match Device::list(WgBackend::Kernel) {
            Ok(list) => names.extend(list.iter().map(|n| n.as_str_lossy().into_owned())),
            Err(e) => warn!("listing kernel WireGuard interfaces: {e}"),
        }
    }
    // Userspace: wireguard-control's own enumeration only looks at `.name` files, which
    // wireguard-go does not write on Linux, so read the socket directory. Keep the sockets
    // whose daemon is in our namespace and whose link exists here.
    if let Ok(dir) = fs::read_dir(USERSPACE_SOCKET_DIR) {
        for entry in dir.flatten() {
            let file = entry.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".sock")) else {
                continue;
            };
            if validate_interface_name(name).is_err() {
                continue;
            }
            if matches!(socket_owner(name), SocketOwner::Here { .. }) && link_exists(name) {
                names.insert(name.to_string());
            }
        }
    }
    names
        .into_iter()
        .filter(|n| n.starts_with(INTERFACE_PREFIX))
        .collect()
}

fn link_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(validate_interface_name("lmwg-a").is_ok());
        assert!(validate_interface_name("lmwg-0123456789").is_ok()); // 15 bytes
        assert!(validate_interface_name("lmwg-01234567890").is_err()); // 16 bytes
        assert!(validate_interface_name("lmwg-").is_err());
        assert!(validate_interface_name("wg0").is_err());
        assert!(validate_interface_name("lmwg-a b").is_err());
        assert!(validate_interface_name("lmwg-a/b").is_err());
        assert_eq!(interface_name("peer1").unwrap(), "lmwg-peer1");
        assert!(interface_name("a-very-long-suffix").is_err());
        assert!(wg_name("lmwg-x").is_ok());
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "lmwg-unit-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn key_file_created_0600_and_reloaded() {
        let dir = temp_dir("create");
        let kp = KeyPair::load_or_create(&dir).unwrap();
        let path = dir.join(KEY_FILE_NAME);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = KeyPair::load_or_create(&dir).unwrap();
        assert_eq!(kp, again);
        assert_eq!(
            kp.public_base64(),
            kp.private_key().get_public().to_base64()
        );
        assert_eq!(kp.public_base64().len(), 44);
        // No temporary file left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        assert!(!format!("{kp:?}").contains(&kp.private_key().to_base64()));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_file_wide_mode_is_fixed() {
        let dir = temp_dir("mode");
        let kp = KeyPair::generate();
        let path = dir.join(KEY_FILE_NAME);
        fs::write(&path, format!("{}\n", kp.private_key().to_base64())).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let loaded = KeyPair::load_or_create(&dir).unwrap();
        assert_eq!(loaded, kp);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_file_garbage_or_symlink_is_refused() {
        let dir = temp_dir("bad");
        let path = dir.join(KEY_FILE_NAME);
        fs::write(&path, "not a key\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(KeyPair::load_or_create(&dir).is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a key\n");
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        assert!(KeyPair::load_or_create(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn spec_validation() {
        let ours = KeyPair::generate();
        let theirs = KeyPair::generate();
        let mut spec = TunnelSpec {
            interface: "lmwg-t".into(),
            private_key: ours.private_key().clone(),
            listen_port: 51820,
            peer_public_key: theirs.public_base64(),
            peer_endpoint: None,
            allowed_ips: vec![("10.0.0.0".parse().unwrap(), 24)],
            keepalive: Some(25),
        };
        assert!(spec.validate().is_ok());
        assert!(!format!("{spec:?}").contains(&ours.private_key().to_base64()));
        spec.allowed_ips.push(("10.0.0.1".parse().unwrap(), 33));
        assert!(spec.validate().is_err());
        spec.allowed_ips.pop();
        spec.peer_public_key = ours.public_base64();
        assert!(spec.validate().is_err());
        spec.peer_public_key = "garbage".into();
        assert!(spec.validate().is_err());
        spec.peer_public_key = theirs.public_base64();
        spec.interface = "wg0".into();
        assert!(spec.validate().is_err());
    }

    #[test]
    fn masking() {
        assert_eq!(
            mask("10.1.2.3".parse().unwrap(), 24),
            "10.1.2.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            mask("10.1.2.3".parse().unwrap(), 0),
            "0.0.0.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            mask("fd00::1:2".parse().unwrap(), 112),
            "fd00::1:0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            allowed_set(&[("10.0.0.7".parse().unwrap(), 32)]),
            allowed_set_of(&["10.0.0.7/32".parse().unwrap()])
        );
    }
}
