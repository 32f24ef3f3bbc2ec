//! Shared code of the live-migration agents: the wire protocol and its authentication, the
//! engine-facing module, and the migration phases.

pub mod auth;
pub mod config;
pub mod conntrack;
pub mod criu;
pub mod fault;
pub mod files;
pub mod forwarding;
pub mod freezer;
pub mod history;
pub mod hold;
pub mod housekeeping;
pub mod lazy_pages;
pub mod migration;
pub mod nfnetlink;
pub mod nft;
pub mod overlay;
pub mod podman;
pub mod preflight;
pub mod process;
pub mod protocol;
pub mod remote;
pub mod routing;
pub mod sock_diag;
pub mod transfer;
pub mod validate;
pub mod wire;
pub mod wireguard;
