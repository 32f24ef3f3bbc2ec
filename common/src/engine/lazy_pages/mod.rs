//! Post-copy: CRIU's lazy pages, under podman, which does not expose them.
//!
//! **Source.** runc reads extra CRIU options from `/etc/criu/runc.conf`, and CRIU lets them
//! override runc's own (`cr-service.c`, "to overwrite all RPC settings"). For one
//! checkpoint the file says `lazy-pages`, `address`, `port` and TLS ([`arm`]): CRIU writes
//! every image except the processes' private memory, then serves that memory from the
//! stopped processes on the address (the source's end of the agents' session; under TLS,
//! `tls.rs`) until the destination has all of it; only then does podman's call return.
//! CRIU listens only once every other image is on disk ([`wait_serving`]), so the agent
//! packs those itself ([`pack_images`]) rather than wait for podman's export.
//!
//! **Destination.** The archive's spec gets the annotation `org.criu.config`, naming a file
//! that says `lazy-pages` and a work directory ([`prepare_import`]); there `criu
//! lazy-pages` waits for the restore, takes the faults of the restored processes, and
//! copies the rest in the background from the source, under the same TLS
//! ([`PagesDaemon`]).
//!
//! `source.rs` and `destination.rs` hold the two sides; `procfs.rs` what both read of the
//! kernel's sockets and descriptors; `criu_config.rs` the configuration files that carry
//! the options; `tls.rs` the credentials of the page connection; `page_server.rs` where
//! the memory is served, and whether a host can take part at all ([`host_problem`]);
//! `archive.rs` the entries the agent packs itself; `stacks.rs` a CRIU bug that would make
//! a lazy dump copy all of the memory, stepped around; `freeze_hook.rs` CRIU's pre-dump
//! hook, where the migration starts the freeze.

mod archive;
mod criu_config;
mod destination;
pub mod freeze_hook;
mod page_server;
mod procfs;
mod source;
mod stacks;
mod tls;

pub use criu_config::{dump_config, CONFIG_ANNOTATION, RUNC_CONF};
pub use destination::{prepare_import, LeftBehind, PagesDaemon};
pub use freeze_hook::FreezeHook;
pub use page_server::{host_problem, PageServer};
pub use source::{
    arm, pack_images, remove_stale_config, stop_serving, tune_serving_during, unguard,
    wait_serving, ArmedDump, NetworkAttachment,
};
pub use stacks::{refreeze_off_aligned_stacks, Refrozen};
