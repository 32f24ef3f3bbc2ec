//! What a migration tells its caller: the phases, progress while it runs, and the report
//! of its outcome or its failure.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::migration::mode;

/// The phases, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reach the destination agent and authenticate.
    Connect,
    /// Bring up the WireGuard tunnel to the destination and move the session into it.
    Tunnel,
    /// Check both hosts and make sure the destination has the image.
    Prepare,
    /// Freeze the container and write its checkpoint archive.
    Checkpoint,
    /// Send the archive to the destination.
    Transfer,
    /// Install the flows' conntrack entries on the destination, then restore the container.
    Restore,
    /// Route the container's address (and new connections to its published ports) into
    /// the tunnel, so flows that still arrive here reach it.
    SwitchTraffic,
    /// The memory moves from CRIU's page server: post-copy, while the container runs
    /// there (after the traffic is switched); streamed stop-copy, into the stopped
    /// replica, which then runs (before it).
    Pages,
    /// Remove the source copy and the migration's leftovers.
    CleanUp,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Tunnel => "tunnel",
            Phase::Prepare => "prepare",
            Phase::Checkpoint => "checkpoint",
            Phase::Transfer => "transfer",
            Phase::Restore => "restore",
            Phase::SwitchTraffic => "switch traffic",
            Phase::Pages => "pages",
            Phase::CleanUp => "clean up",
        }
    }
}

/// What a caller (the CLI) is told while a migration runs.
#[derive(Debug, Clone)]
pub enum Progress {
    PhaseStarted(Phase),
    PhaseFinished(Phase, Duration),
    /// Bytes of the checkpoint archive sent so far, out of `total`.
    Transferred {
        sent: u64,
        total: u64,
    },
    /// A step of the rollback after a failure.
    RollingBack(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseTiming {
    pub phase: Phase,
    pub ms: f64,
}

/// The outcome of a successful migration, printed by the CLI (and as JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub container: String,
    pub container_id: String,
    pub destination: String,
    /// The mode it ran in, and why.
    pub mode: mode::ModeChoice,
    pub phases: Vec<PhaseTiming>,
    /// From the start of the checkpoint until the destination reported the container running:
    /// the time the workload could not run.
    pub freeze_to_resume_ms: f64,
    /// Where that time went.
    pub freeze_steps: FreezeSteps,
    pub checkpoint_bytes: u64,
    /// Post-copy: the memory that followed the restore.
    pub pages: Option<PagesReport>,
    /// Post-copy: from the start of the checkpoint until the last page was there.
    pub last_page_ms: Option<f64>,
    /// Packets for the container held here during the freeze and then let through, and
    /// those dropped because the hold was full; `None` if none were held.
    pub held_packets: Option<crate::protocol::HoldReport>,
    /// The same on the destination: packets that reached it directly (not through this
    /// host) before the container ran there.
    pub held_at_destination: Option<crate::protocol::HoldReport>,
    pub image_transferred: bool,
    pub total_ms: f64,
    /// Non-fatal problems after the destination took over.
    pub warnings: Vec<String>,
}

/// Where the freeze went, step by step (milliseconds), and inside podman's calls, what
/// CRIU and runc took.
#[derive(Debug, Clone, Serialize)]
pub struct FreezeSteps {
    /// Checkpoint here, from the packet hold on: podman's checkpoint and export (runc,
    /// CRIU), with the cgroup freeze and the route around it. (Arming a lazy dump comes
    /// before the hold: the container still runs.)
    pub checkpoint_ms: f64,
    /// Of that: freezing the container's cgroup before podman's call.
    pub cgroup_freeze_ms: Option<f64>,
    /// Of that: how many times the cgroup was frozen again for a lazy dump, to step around
    /// a stack pointer on a page boundary (a CRIU bug, `engine::lazy_pages` `stacks.rs`).
    pub stack_refreezes: usize,
    /// CRIU's part of it, from its statistics in the archive (`None` if unreadable, and
    /// for a lazy dump: its archive is packed before CRIU writes them, and the statistics
    /// of a lazy dump count the time it served pages as frozen).
    pub criu_dump: Option<crate::engine::criu::DumpTimes>,
    /// Sending the archive.
    pub transfer_ms: f64,
    /// Reading the container's flows here and installing them on the destination, beside
    /// the checkpoint (not after it, unless the cgroup could not be frozen here).
    pub flows_ms: f64,
    /// The restore request, from sending it to the answer: the destination's restore.
    pub restore_ms: f64,
    /// Streamed stop-copy: from the restore's answer until the replica ran (every page
    /// moved, then `Resume`).
    pub pages_ms: Option<f64>,
    /// Of the restore: podman's restore there, runc's part of it (podman measures it only
    /// for a restore that is not lazy), and CRIU's part of runc's (from its statistics; a
    /// lazy restore's CRIU leaves them in the lazy-pages daemon's work directory).
    pub destination_podman_ms: f64,
    pub destination_runtime_ms: Option<f64>,
    pub destination_criu_ms: Option<f64>,
}

pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Why a migration failed, and what became of the container.
#[derive(Debug)]
pub struct MigrationFailure {
    pub phase: Phase,
    pub error: anyhow::Error,
    pub resolution: Resolution,
}

impl std::fmt::Display for MigrationFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "migration failed during {}: {:#}",
            self.phase.label(),
            self.error
        )?;
        match &self.resolution {
            Resolution::RolledBack { problems } => {
                for e in problems {
                    write!(f, "\n  rollback problem: {e}")?;
                }
            }
            Resolution::RolledForward { warnings } => {
                write!(f, "\n  the destination runs the container; the source copy is removed")?;
                for w in warnings {
                    write!(f, "\n  warning: {w}")?;
                }
            }
            Resolution::Lost { warnings } => {
                write!(
                    f,
                    "\n  the container could not go on: neither host has all of its memory, and it runs on neither host"
                )?;
                for w in warnings {
                    write!(f, "\n  {w}")?;
                }
            }
            Resolution::InDoubt { reason } => write!(
                f,
                "\n  in doubt: {reason}\n  the container stays stopped here; agent-server on this host keeps asking and finishes the migration either way"
            )?,
        }
        Ok(())
    }
}

impl std::error::Error for MigrationFailure {}

/// How a migration was resolved.
#[derive(Debug, Serialize)]
#[serde(tag = "resolution", rename_all = "snake_case")]
pub enum Resolution {
    /// The container runs here again; `problems` lists undo steps that failed and stay
    /// journaled for `agent-client cleanup`.
    RolledBack { problems: Vec<String> },
    /// The destination runs it; `warnings` lists what could not be tidied here.
    RolledForward { warnings: Vec<String> },
    /// The destination did not answer: the container stays stopped here, and the journal
    /// stays for the adopter to ask again.
    InDoubt { reason: String },
    /// Post-copy failed after the destination took over: the container stopped on both
    /// hosts (its memory was split between them); `warnings` says what else went wrong.
    Lost { warnings: Vec<String> },
}

/// What the page transfer of a post-copy migration took.
#[derive(Debug, Clone, Serialize)]
pub struct PagesReport {
    /// From the restore's answer until the last page was on the destination.
    pub after_restore_ms: f64,
    /// Pages (4 KiB) the destination fetched from the source after the restore.
    pub pages: u64,
}

impl PagesReport {
    pub fn bytes(&self) -> u64 {
        self.pages * 4096
    }
}
