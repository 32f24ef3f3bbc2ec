//! Which WireGuard implementation serves the tunnels, and the lifecycle of the userspace
//! one.
//!
//! # Backends
//!
//! [`backend()`] picks the kernel implementation when the kernel knows the `wireguard`
//! generic-netlink family, and otherwise the userspace one: `wireguard-control` then starts
//! `wireguard-go <ifname>` (or `$WG_USERSPACE_IMPLEMENTATION`) itself the first time the
//! interface is configured, and talks to it over `/var/run/wireguard/<ifname>.sock`.
//! `LM_WG_BACKEND=kernel|userspace` ([`BACKEND_ENV`]) overrides the choice.
//!
//! # The userspace daemon
//!
//! Facts about the userspace backend that shaped this module (wireguard-go 0.0.20220316):
//! * `wireguard-go` daemonizes: the process `wireguard-control` starts creates the TUN device
//!   and the UAPI socket, re-executes itself in the background and exits; the daemon is
//!   re-parented to PID 1 (which, on these machines, does not reap it: a stopped daemon stays
//!   a zombie). If `LOG_LEVEL` is set in the environment the daemon keeps the parent's stdout,
//!   and `wireguard-control` (which waits for the output of the start command) would hang: the
//!   start is therefore bounded by a timeout (see the device module).
//! * The daemon stops by itself both when its TUN link is deleted and when its socket file is
//!   removed. [`super::remove_tunnel`] does both, then waits for the process (found via
//!   `SO_PEERCRED` on the socket) to end, and sends it SIGTERM if it did not
//!   ([`await_exit`]).
//! * The socket directory is per *mount* namespace, not per network namespace: two network
//!   namespaces sharing `/var/run` cannot both have a userspace interface of the same name.
//!   Before touching an existing socket this module checks (via `SO_PEERCRED` and
//!   `/proc/<pid>/ns/net`) that the daemon behind it lives in the caller's network namespace
//!   ([`socket_owner`]), and the device module refuses otherwise.

use std::{
    fmt, fs,
    os::unix::{fs::MetadataExt, net::UnixStream},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tracing::{debug, info, warn};
use wireguard_control::Backend as WgBackend;

use super::interface::validate_interface_name;
use crate::kernel::process;

/// Where userspace implementations put their UAPI sockets.
pub const USERSPACE_SOCKET_DIR: &str = "/var/run/wireguard";
/// Environment variable forcing the backend: `kernel` or `userspace`.
pub const BACKEND_ENV: &str = "LM_WG_BACKEND";

/// How long `remove_tunnel` waits for a wireguard-go daemon to exit by itself.
const USERSPACE_EXIT_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// The same choice, as `wireguard-control` names it.
    pub(super) fn wg(self) -> WgBackend {
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

pub(super) fn socket_path(name: &str) -> PathBuf {
    Path::new(USERSPACE_SOCKET_DIR).join(format!("{name}.sock"))
}

/// Who is behind `/var/run/wireguard/<name>.sock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SocketOwner {
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

/// The process at the other end of `stream` (`SO_PEERCRED`).
fn peer_pid(stream: &UnixStream) -> std::io::Result<i32> {
    let cred = getsockopt(stream, PeerCredentials)?;
    Ok(cred.pid())
}

pub(super) fn socket_owner(name: &str) -> SocketOwner {
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

impl SocketOwner {
    /// Remove the socket of interface `name` (and its `.name` file) unless a daemon in
    /// another network namespace serves it. The daemon of this namespace, if any, then stops
    /// by itself: its pid is returned, for [`await_exit`].
    pub(super) fn remove_socket(self, name: &str) -> Option<i32> {
        if matches!(self, SocketOwner::Here { .. } | SocketOwner::Stale) {
            let path = socket_path(name);
            if let Err(e) = crate::files::remove_if_present(&path) {
                warn!(path = %path.display(), "cannot remove socket: {e}");
            }
            let _ = fs::remove_file(Path::new(USERSPACE_SOCKET_DIR).join(format!("{name}.name")));
        }
        match self {
            SocketOwner::Here { pid } => Some(pid),
            _ => None,
        }
    }
}

/// The interfaces (ours by name) whose UAPI socket is served by a daemon in the caller's
/// network namespace. `wireguard-control`'s own enumeration only looks at `.name` files,
/// which wireguard-go does not write on Linux, so this reads the socket directory.
pub(super) fn served_here() -> Vec<String> {
    let Ok(dir) = fs::read_dir(USERSPACE_SOCKET_DIR) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let file = entry.file_name();
            let name = file.to_str()?.strip_suffix(".sock")?.to_string();
            validate_interface_name(&name).ok()?;
            matches!(socket_owner(&name), SocketOwner::Here { .. }).then_some(name)
        })
        .collect()
}

/// Wait for the daemon `pid` that served `interface` to exit (up to 2 s), send it SIGTERM
/// if it did not, and wait as long again.
pub(super) async fn await_exit(pid: i32, interface: &str) -> Result<()> {
    if wait_gone(pid, USERSPACE_EXIT_TIMEOUT).await {
        return Ok(());
    }
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    warn!(
        pid,
        comm = comm.trim(),
        "userspace WireGuard daemon still running; SIGTERM"
    );
    if !comm.trim().is_empty() {
        // The pid served this interface's socket. A daemon that ended meanwhile is fine.
        if let Err(e) = process::terminate(pid) {
            debug!(pid, "SIGTERM: {e}");
        }
    }
    if !wait_gone(pid, USERSPACE_EXIT_TIMEOUT).await {
        bail!("userspace WireGuard daemon {pid} for {interface} did not exit");
    }
    Ok(())
}

async fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if process::gone(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
