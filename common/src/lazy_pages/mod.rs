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
//!
//! `source.rs` and `destination.rs` hold the two sides; `procfs.rs` what both read of the
//! kernel's sockets and descriptors; this file what both share, and whether a host can
//! take part at all ([`host_problem`]).

mod destination;
mod procfs;
mod source;

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

pub use destination::{prepare_import, LeftBehind, PagesDaemon};
pub use source::{
    arm, pack_images, remove_stale_config, stop_serving, tune_serving, wait_serving, ArmedDump,
    NetworkAttachment,
};

/// The CRIU configuration runc reads when the container names none.
pub const RUNC_CONF: &str = "/etc/criu/runc.conf";
/// The spec annotation by which a container names a CRIU configuration of its own, which
/// runc then reads in place of [`RUNC_CONF`].
pub const CONFIG_ANNOTATION: &str = "org.criu.config";
/// The destination's configuration of one lazy restore, in its work directory
/// (`incoming/<migration>.pages/`).
const RESTORE_CONF: &str = "criu-restore.conf";

/// Where the options of a lazy dump go for a container whose `org.criu.config` is
/// `annotated`: [`RUNC_CONF`] if it names none; the file it names if that is one of this
/// agent's restore configurations (a container restored lazily keeps naming it, long
/// after the file went); otherwise nowhere (Err says why): the options would replace the
/// container's own.
pub fn dump_config(annotated: Option<&Path>) -> Result<PathBuf, String> {
    let Some(path) = annotated else {
        return Ok(PathBuf::from(RUNC_CONF));
    };
    fn name(p: Option<&Path>) -> Option<&str> {
        p.and_then(Path::file_name).and_then(|n| n.to_str())
    }
    let dir = path.parent();
    let ours = name(Some(path)) == Some(RESTORE_CONF)
        && name(dir).is_some_and(|d| d.ends_with(".pages"))
        && name(dir.and_then(Path::parent)) == Some("incoming");
    if ours {
        Ok(path.to_path_buf())
    } else {
        Err(format!(
            "the container names a CRIU configuration of its own ({CONFIG_ANNOTATION} {})",
            path.display()
        ))
    }
}
/// First line of a configuration this module wrote (CRIU skips `#` lines).
const MARKER: &str = "# live-migrate: options of one post-copy checkpoint, removed once it started";

/// Every page of a post-copy restore is on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagesArrived {
    /// How long after the restore the last one came.
    pub after_restore: std::time::Duration,
    /// How many (4 KiB) were fetched from the source.
    pub pages: u64,
}

/// Where the source serves the container's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageServer {
    pub address: Ipv4Addr,
    pub port: u16,
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
    foreign_options(Path::new(RUNC_CONF))
}

/// The options in the CRIU configuration `path`, unless it is absent or one this module
/// wrote for a lazy dump.
fn foreign_options(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.starts_with(MARKER) => Ok(None),
        Ok(text) => Ok(Some(text.lines().collect::<Vec<_>>().join("; "))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("read {}: {e}", path.display())),
    }
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

/// Tunes a page-server connection CRIU holds (a duplicate of its descriptor), on either
/// end: CRIU corks it (TCP_CORK) and flushes after each batch of pages, but not after its
/// last messages (the daemon's close, the server's answer), which the kernel then holds
/// for 200 ms each. Uncorked and without Nagle, they go at once; and a cut link fails it
/// within [`crate::wire::DEAD_PEER_SECONDS`].
fn tune_page_connection(socket: &std::os::fd::OwnedFd) -> anyhow::Result<()> {
    rustix::net::sockopt::set_tcp_cork(socket, false)?;
    Ok(crate::wire::tune_connection(socket)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_takes_its_options_where_runc_reads_them_and_never_over_the_containers_own() {
        assert_eq!(dump_config(None), Ok(PathBuf::from(RUNC_CONF)));
        let restored = Path::new("/var/lib/live-migrate/incoming/0123.pages/criu-restore.conf");
        assert_eq!(dump_config(Some(restored)), Ok(restored.to_path_buf()));
        for own in ["/etc/criu/mine.conf", "/tmp/incoming/x/criu-restore.conf"] {
            assert!(dump_config(Some(Path::new(own))).is_err(), "{own}");
        }
    }
}
