//! The start of the freeze: the container's packets are held ([`crate::kernel::hold`]),
//! then its cgroup frozen ([`crate::kernel::freezer`]), just before CRIU stops its
//! processes. CRIU finds the cgroup frozen and takes it as it is: frozen by CRIU itself,
//! a cgroup-v1 freezer costs 100 ms of polling.

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::engine::lazy_pages::refreeze_off_aligned_stacks;

/// The container is stopped: its clients' pause starts `at`.
pub struct Stopped {
    pub at: Instant,
    /// How long freezing its cgroup took; `None` if it could not be frozen (CRIU then
    /// freezes it itself, later and slower).
    pub cgroup_frozen_in: Option<Duration>,
    /// How many times the cgroup was frozen again to step around a page-aligned stack
    /// pointer ([`refreeze_off_aligned_stacks`]).
    pub stack_refreezes: usize,
}

/// Holds the packets for `held` (whose hold is armed), then freezes `cgroup`, and for a
/// `lazy` dump refreezes it off aligned stacks. What goes wrong makes the freeze worse,
/// not the migration fail: it is added to `problems`.
pub async fn stop(
    held: Option<Ipv4Addr>,
    cgroup: Option<String>,
    lazy: bool,
    problems: &mut Vec<String>,
) -> Result<Stopped> {
    let at = Instant::now();
    // Held from before the freeze: packets that arrive while CRIU stops the container
    // would be dropped by its network lock.
    if let Some(ip) = held {
        if !crate::kernel::hold::hold_back(ip).await {
            not_held(problems, ip, "the hold ended before the freeze");
        }
    }
    let mut stopped = Stopped {
        at,
        cgroup_frozen_in: None,
        stack_refreezes: 0,
    };
    let Some(cgroup) = cgroup else {
        return Ok(stopped);
    };
    let freezing = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        crate::kernel::freezer::freeze(&cgroup)?;
        let refrozen = if lazy {
            Some(refreeze_off_aligned_stacks(&cgroup)?)
        } else {
            None
        };
        anyhow::Ok((started.elapsed(), refrozen))
    });
    match freezing.await? {
        Ok((took, refrozen)) => {
            stopped.cgroup_frozen_in = Some(took);
            if let Some(refrozen) = refrozen {
                stopped.stack_refreezes = refrozen.times;
                problems.extend(refrozen.costly);
            }
        }
        Err(e) => problems.push(format!("CRIU froze the container itself (slower): {e:#}")),
    }
    Ok(stopped)
}

impl Stopped {
    /// Runs `alongside` beside `work` (CRIU's), or after it if the cgroup could not be
    /// frozen: only a frozen container can open no connection that `alongside` would miss.
    pub async fn beside<A: Future, B: Future>(
        &self,
        work: A,
        alongside: B,
    ) -> (A::Output, B::Output) {
        if self.cgroup_frozen_in.is_some() {
            tokio::join!(work, alongside)
        } else {
            (work.await, alongside.await)
        }
    }
}

/// Notes that the packets for `ip` are dropped, not held, during the freeze, and why.
pub fn not_held(problems: &mut Vec<String>, ip: Ipv4Addr, why: &str) {
    tracing::warn!("packets for {ip} are dropped during the freeze: {why}");
    problems.push(format!(
        "packets for {ip} were dropped during the freeze, not held: {why}"
    ));
}
