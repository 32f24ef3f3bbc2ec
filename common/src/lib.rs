//! Shared code of the live-migration agents. The folders are its layers, each using only
//! the ones listed before it:
//! - [`protocol`]: every type that crosses the wire between agents, documented in one place;
//! - [`kernel`]: one module per kernel subsystem (routing, nftables, conntrack, WireGuard,
//!   the cgroup freezer, processes), talking netlink where it can;
//! - [`session`]: an authenticated, sealed connection to the other agent and the typed
//!   requests over it;
//! - [`engine`]: the container engine: podman's API, CRIU, and CRIU's lazy pages under podman;
//! - [`migration`]: the use case: its phases, both sides' model of who owns the container,
//!   the journal, the preflight, and what a migration leaves behind (forwarding, history);
//! - [`housekeeping`]: a host's status and the removal of leftovers.
//!
//! [`files`] (private, atomic files) and [`fault`] (test-only fault points) serve all of
//! them. The programs' flags and configuration file are in the `agent-config` crate, so
//! that this library does not depend on a command-line parser.

pub mod engine;
pub mod fault;
pub mod files;
pub mod housekeeping;
pub mod kernel;
pub mod migration;
pub mod protocol;
pub mod session;
