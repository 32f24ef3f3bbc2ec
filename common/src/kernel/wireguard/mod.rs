//! The agent's WireGuard tunnels (one interface per remote agent, one peer per interface).
//!
//! Configuration goes through `wireguard-control`; the interface's MTU and up/down state go
//! through rtnetlink ([`crate::kernel::routing`]). No `ip`/`wg` command is run.
//!
//! Four parts, each in its own file:
//! * keys: the agent's identity ([`KeyPair`], stored in `state_dir/`[`KEY_FILE_NAME`]) and
//!   the peers' public keys ([`parse_public_key`]);
//! * daemon: which implementation serves the tunnels ([`backend()`]: the kernel's, or the
//!   userspace `wireguard-go` daemon) and that daemon's UAPI socket and lifecycle;
//! * device: the tunnels themselves ([`ensure_tunnel`], [`set_allowed_ips`],
//!   [`tunnel_info`], [`remove_tunnel`], [`list_tunnels`]);
//! * interface: what they share, the interface names and the tunnels' link settings.
//!
//! # Network namespaces
//!
//! Everything acts on the network namespace of the calling thread (netlink sockets are bound
//! at creation, and the `wireguard-go` child inherits the namespace of the thread that
//! forks it). Blocking `wireguard-control` calls run on tokio's blocking pool, whose threads
//! are spawned from runtime threads: call these functions from a runtime all of whose threads
//! live in the intended namespace (the normal case: the whole process is in one namespace).

mod daemon;
mod device;
mod interface;
mod keys;

pub use daemon::{backend, TunnelBackend, BACKEND_ENV, USERSPACE_SOCKET_DIR};
pub use device::{
    ensure_tunnel, list_tunnels, remove_tunnel, set_allowed_ips, tunnel_info, PeerInfo, TunnelInfo,
    TunnelSpec,
};
pub use keys::{parse_public_key, Key, KeyPair, KEY_FILE_NAME};

pub use interface::{
    interface_name, validate_interface_name, INTERFACE_PREFIX, MAX_INTERFACE_NAME_LEN, TUNNEL_MTU,
    TUNNEL_TXQUEUELEN,
};
