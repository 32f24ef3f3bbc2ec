//! A migration as a sequence of named phases, run by the source agent, and the
//! destination's side of it.
//!
//! Each phase ([`phases`]) does one job and, when it changes anything, records how to undo
//! it on an [`source::UndoLog`], journaled ([`journal`]) before the change. Both sides
//! follow one model of who owns the container at each step ([`ownership`]): if a phase
//! fails, [`source::settle`] rolls the migration back (the container runs on the source
//! again and whatever the migration made is removed), rolls it forward (the destination
//! owns it), or keeps it stopped while the destination's answer is outstanding. The
//! destination's state is [`destination`].

#[cfg(test)]
mod crash;
pub mod destination;
pub mod events;
pub mod journal;
pub mod mode;
pub mod ownership;
pub mod phases;
pub mod post_copy;
pub mod source;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::Token;
use crate::history::{Direction, HistoryEntry};
use crate::podman::PodmanClient;
use crate::preflight::Finding;
use crate::remote::RemoteAgent;
use journal::JournalRecord;
use ownership::SourceStage;
use source::{Resolution, SourceHost, UndoLog};

/// How long a migration whose destination stopped answering after the restore request
/// keeps asking it, before it leaves the question to `agent-server`'s adopter.
const IN_DOUBT_PATIENCE: Duration = Duration::from_secs(30);

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

/// Everything a migration needs to know before it starts.
pub struct MigrationRequest {
    /// Name or ID of the container on the source host.
    pub container: String,
    /// `HOST[:PORT]` of the destination agent.
    pub destination: String,
    pub token: Token,
    /// The source host's podman service.
    pub podman: PodmanClient,
    /// The source agent's state directory: its WireGuard key, and checkpoint archives
    /// while a migration runs.
    pub state_dir: PathBuf,
    /// Also forward new connections to the container's published ports on this host.
    pub forward_new_connections: bool,
    /// Packets for the container held here during the freeze, at most ([`crate::hold`]);
    /// 0: dropped instead.
    pub hold_packets: u32,
    /// Stop-copy, post-copy, or either by the container's memory ([`mode`]).
    pub mode: mode::ModeRequest,
    /// How a stop-copy moves the memory where both hosts can serve lazy pages.
    pub stop_copy_memory: mode::MemoryPath,
    /// Cancelled by the operator: the migration stops at the next safe point before the
    /// restore request and rolls back. Later it is ignored: from then on only the
    /// destination decides.
    pub cancel: CancellationToken,
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
    pub pages: Option<phases::PagesReport>,
    /// Post-copy: from the start of the checkpoint until the last page was there.
    pub last_page_ms: Option<f64>,
    /// Packets for the container held here during the freeze and then let through, and
    /// those dropped because the hold was full; `None` if none were held.
    pub held_packets: Option<crate::hold::HoldReport>,
    /// The same on the destination: packets that reached it directly (not through this
    /// host) before the container ran there.
    pub held_at_destination: Option<crate::hold::HoldReport>,
    pub image_transferred: bool,
    pub total_ms: f64,
    /// Non-fatal problems after the destination took over.
    pub warnings: Vec<String>,
}

/// Where the freeze went, step by step (milliseconds), and inside podman's calls, what
/// CRIU and runc took.
#[derive(Debug, Clone, Serialize)]
pub struct FreezeSteps {
    /// Checkpoint here: podman's checkpoint and export (runc, CRIU), with the packet hold,
    /// the cgroup freeze and the route around it.
    pub checkpoint_ms: f64,
    /// Of that: freezing the container's cgroup before podman's call.
    pub cgroup_freeze_ms: Option<f64>,
    /// CRIU's part of it, from its statistics in the archive (`None` if unreadable).
    pub criu_dump: Option<crate::criu::DumpTimes>,
    /// Sending the archive.
    pub transfer_ms: f64,
    /// Reading the container's flows here and installing them on the destination.
    pub flows_ms: f64,
    /// The restore request, from sending it to the answer: the destination's restore.
    pub restore_ms: f64,
    /// Streamed stop-copy: from the restore's answer until the replica ran (every page
    /// moved, then `Resume`).
    pub pages_ms: Option<f64>,
    /// Of the restore: podman's restore there, runc's part of it, and CRIU's part of
    /// runc's.
    pub destination_podman_ms: f64,
    pub destination_runtime_ms: Option<f64>,
    pub destination_criu_ms: Option<f64>,
}

/// What a migration that got through the freeze hands on.
struct Frozen {
    prepared: phases::Prepared,
    checkpoint_bytes: u64,
    archive: PathBuf,
    /// Post-copy: the memory still to come.
    lazy: Option<phases::LazyDump>,
    /// Streamed stop-copy: how the memory came, during the freeze.
    streamed: Option<phases::PagesReport>,
    frozen_at: Instant,
    resumed_at: Instant,
    steps: FreezeSteps,
}

fn millis(d: Duration) -> f64 {
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

/// How to take back one thing a phase did on the source. The destination's part is not
/// here: it follows [`ownership`] on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Undo {
    /// The container was checkpointed (and so stopped) on the source: start it again from
    /// its checkpoint, falling back to the exported archive.
    RestartOnSource { container: String, archive: PathBuf },
    /// A local file the migration wrote.
    RemoveFile(PathBuf),
    /// The container's address was blackholed here while it is frozen.
    RemoveContainerRoute(std::net::Ipv4Addr),
    /// Packets for the container's address are held here while it is frozen
    /// ([`crate::hold`]): let them through (to wherever it is routed by then).
    ReleaseHold(std::net::Ipv4Addr),
    /// The container's cgroup was frozen here ([`crate::freezer`]): thaw it.
    Thaw(String),
    /// CRIU serves the container's memory here ([`crate::lazy_pages`]), holding the
    /// processes of cgroup `held`: stop it. Before their last page has gone, that lets
    /// them run again.
    StopPageServer {
        server: crate::lazy_pages::PageServer,
        held: Option<String>,
    },
    /// The destination may hold a stopped replica (streamed stop-copy): fence it (it is
    /// removed there, and never runs).
    FenceReplica {
        destination: String,
        migration_id: String,
    },
}

impl std::fmt::Display for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undo::RestartOnSource { container, .. } => {
                write!(f, "start {container} on this host again")
            }
            Undo::RemoveFile(path) => write!(f, "remove {}", path.display()),
            Undo::RemoveContainerRoute(ip) => write!(f, "route {ip} to this host again"),
            Undo::ReleaseHold(ip) => write!(f, "let the held packets for {ip} through"),
            Undo::Thaw(cgroup) => write!(f, "thaw cgroup {cgroup}"),
            Undo::StopPageServer { server, .. } => write!(
                f,
                "stop CRIU's page server on {}:{}",
                server.address, server.port
            ),
            Undo::FenceReplica { destination, .. } => {
                write!(f, "fence the stopped replica on {destination}")
            }
        }
    }
}

/// Times phases and tells the caller about them.
struct PhaseClock<'a> {
    timings: Vec<PhaseTiming>,
    progress: &'a (dyn Fn(Progress) + Send + Sync),
}

impl PhaseClock<'_> {
    fn start(&self, phase: Phase) -> Instant {
        tracing::info!(phase = phase.label(), "phase started");
        (self.progress)(Progress::PhaseStarted(phase));
        Instant::now()
    }

    /// Starts a phase that may still be cancelled: fails instead if the operator asked to.
    fn start_unless_cancelled(
        &self,
        phase: Phase,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Instant> {
        if cancel.is_cancelled() {
            anyhow::bail!("cancelled by the operator");
        }
        Ok(self.start(phase))
    }

    /// Runs `work` as `phase`: `phase` goes into `current` (the phase a failure names), the
    /// start and end are announced and the time recorded. With `cancel`, a phase the
    /// operator cancelled before it starts does not start; without, it is past cancelling.
    /// Returns the work's value and when the phase started.
    async fn run<T>(
        &mut self,
        current: &mut Phase,
        phase: Phase,
        cancel: Option<&CancellationToken>,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<(T, Instant)> {
        *current = phase;
        let started = match cancel {
            Some(cancel) => self.start_unless_cancelled(phase, cancel)?,
            None => self.start(phase),
        };
        let value = work.await?;
        self.finish(phase, started);
        Ok((value, started))
    }

    fn finish(&mut self, phase: Phase, started: Instant) {
        let elapsed = started.elapsed();
        tracing::info!(phase = phase.label(), ms = millis(elapsed), "phase done");
        (self.progress)(Progress::PhaseFinished(phase, elapsed));
        self.timings.push(PhaseTiming {
            phase,
            ms: millis(elapsed),
        });
    }
}

/// Preflight only (`agent-client check`): connect, bring up the tunnel (kept for later
/// migrations, as a migration would) and survey the container and both hosts. Changes
/// nothing else. A destination that cannot be reached is a finding, not an error, so the
/// source's findings are shown too.
pub async fn check(request: &MigrationRequest) -> anyhow::Result<phases::Survey> {
    let reached = async {
        let mut agent = phases::connect(&request.destination, &request.token).await?;
        let keys = crate::wireguard::KeyPair::load_or_create(&request.state_dir)?;
        let started = Instant::now();
        let (tunnel, mut through_tunnel) =
            phases::tunnel(&mut agent, &request.token, &keys).await?;
        through_tunnel.finish().await?;
        anyhow::Ok((agent, tunnel, started.elapsed()))
    }
    .await;
    let (podman, container, state_dir) = (&request.podman, &request.container, &request.state_dir);
    match reached {
        Ok((mut agent, tunnel, took)) => {
            let mut survey = phases::survey(podman, Some(&mut agent), container, state_dir).await?;
            agent.finish().await?;
            survey.findings.push(Finding::ok(
                &request.destination,
                "tunnel",
                format!(
                    "{} up, agent reached through it ({:.0} ms)",
                    tunnel.interface,
                    millis(took)
                ),
            ));
            Ok(survey)
        }
        Err(e) => {
            let mut survey = phases::survey(podman, None, container, state_dir).await?;
            let mismatch = e.chain().any(|c| {
                c.downcast_ref::<crate::auth::AuthError>()
                    .is_some_and(crate::auth::AuthError::is_token_mismatch)
            });
            let fix = if mismatch {
                "use the same token (--token-file) on both hosts".to_string()
            } else {
                format!(
                    "start agent-server on {} and let this host reach its port (default {})",
                    request.destination,
                    crate::protocol::DEFAULT_PORT
                )
            };
            survey.findings.push(Finding::problem(
                &request.destination,
                "agent",
                format!("{e:#}"),
                fix,
            ));
            Ok(survey)
        }
    }
}

/// Runs a migration end to end. On failure (or cancellation before the restore request)
/// the migration is resolved before this returns ([`source::settle`]), and the error says
/// in which phase it failed and what became of the container.
pub async fn migrate(
    request: MigrationRequest,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<MigrationReport, MigrationFailure> {
    let started = Instant::now();
    let mut clock = PhaseClock {
        timings: Vec::new(),
        progress,
    };
    let mut undo: Option<UndoLog> = None;
    let mut remote: Option<RemoteAgent> = None;
    // The second session, through the tunnel: it tells the destination that the held
    // packets are through, behind them.
    let mut tunneled: Option<RemoteAgent> = None;
    let mut phase = Phase::Connect;
    let mut warnings = Vec::new();
    let cancel = &request.cancel;
    let state_dir = &request.state_dir;
    // One that is not HOST[:PORT] fails the connection, which says why.
    let destination = crate::remote::agent_address(&request.destination)
        .unwrap_or_else(|_| request.destination.clone());

    let outcome: anyhow::Result<Frozen> = async {
        // Journaled (and locked against a second migration of it) before anything else; a
        // container that is not running is refused by the prepare phase, after this check,
        // so that a second migration of a frozen one hears why.
        let info = request.podman.inspect(&request.container).await?;
        let log = undo.insert(UndoLog::create(
            state_dir,
            JournalRecord {
                migration_id: crate::validate::new_migration_id(),
                container: info.name.clone(),
                container_id: info.id.clone(),
                destination: destination.clone(),
                stage: SourceStage::Running,
                steps: Vec::new(),
                switch: None,
                held_init: None,
            },
        )?);
        let may_cancel = Some(cancel);
        let (agent, _) = clock
            .run(
                &mut phase,
                Phase::Connect,
                may_cancel,
                cancellable(
                    cancel,
                    phases::connect(&request.destination, &request.token),
                ),
            )
            .await?;
        let agent = remote.insert(agent);

        let tunnelling = async {
            let keys = crate::wireguard::KeyPair::load_or_create(state_dir)?;
            let (tunnel, through_tunnel) = phases::tunnel(agent, &request.token, &keys).await?;
            anyhow::Ok((keys, tunnel, through_tunnel))
        };
        let ((keys, tunnel, through_tunnel), _) = clock
            .run(&mut phase, Phase::Tunnel, may_cancel, tunnelling)
            .await?;
        tunneled = Some(through_tunnel);

        let (prepared, _) = clock
            .run(
                &mut phase,
                Phase::Prepare,
                may_cancel,
                cancellable(
                    cancel,
                    phases::prepare(
                        &request.podman,
                        agent,
                        &info.id,
                        request.mode,
                        request.stop_copy_memory,
                        state_dir,
                    ),
                ),
            )
            .await?;
        let container_ip = prepared.container.ipv4();
        if let Some(ip) = container_ip {
            log.set_switch_plan(phases::SwitchPlan::new(
                &tunnel,
                ip,
                &prepared.container,
                request.forward_new_connections,
                agent.peer_addr()?.port(),
            )?)?;
        }

        let work_dir = state_dir.join("outgoing");
        let lazy_pages = prepared.mode.memory == mode::MemoryPath::PageServer;
        // Streamed stop-copy: the memory moves during the freeze, into a stopped replica.
        let replica = lazy_pages && prepared.mode.mode == mode::Mode::StopCopy;
        // Not cancellable halfway: podman would finish the checkpoint anyway. A cancel
        // is seen right after it, and the container restarted.
        let checkpointing = async {
            let checkpoint = phases::checkpoint(
                &request.podman,
                &prepared.container,
                &work_dir,
                request.hold_packets,
                lazy_pages.then_some(tunnel.local_address),
                log,
            )
            .await?;
            crate::fault::at(state_dir, "checkpointed")?;
            anyhow::Ok(checkpoint)
        };
        let (checkpoint, frozen_at) = clock
            .run(&mut phase, Phase::Checkpoint, may_cancel, checkpointing)
            .await?;
        let checkpoint_ms = millis(frozen_at.elapsed());
        let mut lazy = checkpoint.lazy;
        warnings.extend(checkpoint.problems);
        let cgroup_freeze_ms = checkpoint.cgroup_frozen_in.map(millis);
        let archive = checkpoint.archive;

        let (bytes, sending) = clock
            .run(
                &mut phase,
                Phase::Transfer,
                may_cancel,
                cancellable(
                    cancel,
                    phases::transfer(
                        agent,
                        &log.record.migration_id,
                        &prepared.container.to_ref(),
                        &archive,
                        state_dir,
                        progress,
                    ),
                ),
            )
            .await?;
        let transfer_ms = millis(sending.elapsed());

        // The last chance to cancel: from the restore request on, the destination decides.
        let restoring = async {
            let started = Instant::now();
            if let Some(ip) = container_ip {
                phases::prepare_flows(agent, &keys, ip).await?;
            }
            let flows_ms = millis(started.elapsed());
            let requested = Instant::now();
            let page_server = lazy.as_ref().map(|l| crate::protocol::LazyRestore {
                page_server_port: l.server.port,
                until_resumed: replica,
            });
            let (resumed_at, destination) = phases::restore(
                agent,
                &prepared.container.to_ref(),
                page_server,
                log,
                state_dir,
            )
            .await?;
            let restore_ms = millis(requested.elapsed());
            if let Some(dump) = &lazy {
                if let Err(e) = crate::lazy_pages::tune_serving(dump.server).await {
                    tracing::warn!("CRIU's page server keeps its defaults: {e:#}");
                }
            }
            if lazy.is_some() && !replica {
                if let Err(e) = phases::end_source_processes(&prepared.container) {
                    warnings.push(format!("{e:#}"));
                }
            }
            anyhow::Ok((resumed_at, destination, flows_ms, restore_ms))
        };
        let ((mut resumed_at, destination, flows_ms, restore_ms), _) = clock
            .run(&mut phase, Phase::Restore, may_cancel, restoring)
            .await?;

        let mut streamed = None;
        let mut pages_ms = None;
        if let Some(dump) = lazy.take_if(|_| replica) {
            let streaming = async {
                crate::fault::at(state_dir, "pages")?;
                let pages = phases::await_pages(
                    Some(&mut *agent),
                    log,
                    dump,
                    phases::PagesEnd::ProcessesEnded,
                )
                .await?;
                phases::resume(agent, log).await?;
                anyhow::Ok(pages)
            };
            let (pages, started) = clock.run(&mut phase, Phase::Pages, None, streaming).await?;
            resumed_at = Instant::now();
            pages_ms = Some(millis(started.elapsed()));
            streamed = Some(pages);
        }
        Ok(Frozen {
            prepared,
            checkpoint_bytes: bytes,
            archive,
            lazy,
            streamed,
            frozen_at,
            resumed_at,
            steps: FreezeSteps {
                checkpoint_ms,
                cgroup_freeze_ms,
                criu_dump: None,
                transfer_ms,
                flows_ms,
                restore_ms,
                pages_ms,
                destination_podman_ms: millis(Duration::from_micros(destination.podman_us)),
                destination_runtime_ms: destination
                    .runtime_us
                    .map(|us| millis(Duration::from_micros(us))),
                destination_criu_ms: destination
                    .criu_us
                    .map(|us| millis(Duration::from_micros(us))),
            },
        })
    }
    .await;

    let host = SourceHost {
        podman: &request.podman,
        token: &request.token,
        state_dir,
    };
    let mut history = HistoryEntry::now(Direction::Outgoing, &request.container, &destination);
    let Frozen {
        prepared,
        checkpoint_bytes,
        archive,
        lazy,
        streamed,
        frozen_at,
        resumed_at,
        mut steps,
    } = match outcome {
        Ok(done) => done,
        Err(error) => {
            // The caller reports the failure, with its resolution: logged here only as the
            // start of the resolution, which may take a while.
            tracing::info!(
                phase = phase.label(),
                "migration failed, resolving it: {error:#}"
            );
            // The migration's connection closes first: the destination winds down what it
            // does not own without waiting for it to time out.
            drop(remote);
            let resolution = match undo.as_mut() {
                Some(log) => source::settle(log, &host, IN_DOUBT_PATIENCE, progress).await,
                None => Resolution::RolledBack {
                    problems: Vec::new(),
                },
            };
            let failure = MigrationFailure {
                phase,
                error,
                resolution,
            };
            history.failed(&failure);
            record_history(state_dir, &history);
            return Err(failure);
        }
    };
    let freeze_to_resume = resumed_at - frozen_at;
    let log = undo.as_mut().expect("journaled");

    // The destination owns the container now: from here on nothing is rolled back, and
    // problems are only reported.
    let t = clock.start(Phase::SwitchTraffic);
    if let Err(e) = crate::fault::at(state_dir, "switching") {
        warnings.push(format!("{e:#}"));
    }
    let (held_packets, switch_warnings) = source::switch_traffic(log, &host).await;
    warnings.extend(switch_warnings);
    // The packets held here are through: now the destination's go.
    let held_at_destination = match tunneled.as_mut() {
        Some(agent) => {
            let told = async {
                let held = agent.traffic_switched(&log.record.migration_id).await?;
                agent.finish().await?;
                anyhow::Ok(held)
            };
            told.await.unwrap_or_else(|e| {
                warnings.push(format!(
                    "destination not told that the traffic is switched: {e:#}"
                ));
                None
            })
        }
        None => None,
    };
    clock.finish(Phase::SwitchTraffic, t);
    let mut pages = streamed;
    if let Some(lazy) = lazy {
        let t = clock.start(Phase::Pages);
        if let Err(e) = crate::fault::at(state_dir, "pages") {
            warnings.push(format!("{e:#}"));
        }
        match phases::await_pages(remote.as_mut(), log, lazy, phases::PagesEnd::CallReturned).await
        {
            Ok(report) => pages = Some(report),
            Err(error) => {
                // Its processes here were killed at the restore; the destination stopped its
                // copy (or stops it once it sees the link gone): nothing runs it.
                let mut warnings = source::release_source(log, &host, remote.as_mut()).await;
                warnings.insert(
                    0,
                    "the destination stops its copy: it has not all of its memory".into(),
                );
                let failure = MigrationFailure {
                    phase: Phase::Pages,
                    error,
                    resolution: Resolution::Lost { warnings },
                };
                history.failed(&failure);
                record_history(state_dir, &history);
                return Err(failure);
            }
        }
        clock.finish(Phase::Pages, t);
    }
    let t = clock.start(Phase::CleanUp);
    // Before the archive goes with the source copy.
    steps.criu_dump =
        tokio::task::spawn_blocking(move || crate::criu::dump_times_in_archive(&archive))
            .await
            .ok()
            .flatten();
    warnings.extend(source::release_source(log, &host, remote.as_mut()).await);
    clock.finish(Phase::CleanUp, t);

    history.succeeded = true;
    history.freeze_to_resume_ms = Some(millis(freeze_to_resume));
    history.total_ms = Some(millis(started.elapsed()));
    history.transferred_bytes = Some(checkpoint_bytes + pages.as_ref().map_or(0, |p| p.bytes()));
    record_history(state_dir, &history);
    let last_page_ms = match prepared.mode.mode {
        mode::Mode::PostCopy => pages
            .as_ref()
            .map(|p| millis(freeze_to_resume) + p.after_restore_ms),
        // Before the container ran again.
        mode::Mode::StopCopy => pages.as_ref().map(|_| millis(freeze_to_resume)),
    };
    Ok(MigrationReport {
        container: prepared.container.name.clone(),
        container_id: prepared.container.id.clone(),
        destination,
        mode: prepared.mode,
        phases: clock.timings,
        freeze_to_resume_ms: millis(freeze_to_resume),
        freeze_steps: steps,
        checkpoint_bytes,
        pages,
        last_page_ms,
        held_packets,
        held_at_destination,
        image_transferred: prepared.image_transferred,
        total_ms: millis(started.elapsed()),
        warnings,
    })
}

fn record_history(state_dir: &std::path::Path, entry: &HistoryEntry) {
    if let Err(e) = crate::history::record(state_dir, entry) {
        tracing::warn!("could not record the migration: {e:#}");
    }
}

/// Runs `work` unless the operator cancels first; for work that may be dropped halfway.
async fn cancellable<T>(
    cancel: &CancellationToken,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        result = work => result,
        () = cancel.cancelled() => anyhow::bail!("cancelled by the operator"),
    }
}
