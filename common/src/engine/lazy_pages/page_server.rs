//! Where the source serves a container's memory, the tuning of CRIU's page connections,
//! and whether this host can take part in a post-copy migration at all.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::criu_config::{foreign_config, RUNC_CONF};

/// How often the freeze looks whether CRIU is ready: its page server listening on the
/// source (only podman hears runc's status pipe), its lazy-pages daemon's socket on the
/// destination. Every millisecond of the wait is the container's; a look costs
/// microseconds.
pub(super) const READY_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// Where the source serves the container's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageServer {
    pub address: Ipv4Addr,
    pub port: u16,
}

impl PageServer {
    /// A port of `address` that is free now (the kernel's choice), for CRIU to serve on.
    pub fn on_a_free_port(address: Ipv4Addr) -> anyhow::Result<PageServer> {
        use anyhow::Context;
        let port = std::net::TcpListener::bind((address, 0))
            .with_context(|| format!("find a free port on {address}"))?
            .local_addr()?
            .port();
        Ok(PageServer { address, port })
    }
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

/// Tunes a page-server connection CRIU holds (a duplicate of its descriptor), on either
/// end: CRIU corks it (TCP_CORK) and flushes after each batch of pages, but not after its
/// last messages (the daemon's close, the server's answer), which the kernel then holds
/// for 200 ms each. Uncorked and without Nagle, they go at once; and a cut link fails it
/// within [`crate::session::wire::DEAD_PEER_SECONDS`].
pub(super) fn tune_page_connection(socket: &std::os::fd::OwnedFd) -> anyhow::Result<()> {
    rustix::net::sockopt::set_tcp_cork(socket, false)?;
    Ok(crate::session::wire::tune_connection(socket)?)
}
