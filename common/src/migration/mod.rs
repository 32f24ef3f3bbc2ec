//! A migration as a sequence of named phases, run by the source agent.
//!
//! Each phase ([`phases`]) does one job and, when it changes anything, records how to undo
//! it on an [`UndoLog`]. If a phase fails, the log is unwound newest first, so the container
//! runs again on the source and whatever the migration made is removed; the driver never
//! needs to know which phase made what.

pub mod journal;
pub mod phases;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::Token;
use crate::conntrack::Proto;
use crate::history::{Direction, HistoryEntry};
use crate::podman::PodmanClient;
use crate::preflight::Finding;
use crate::remote::RemoteAgent;

/// The phases, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
    /// Cancelled by the operator: the migration stops at the next safe point before the
    /// switch of traffic and rolls back. Later it is ignored: the destination has taken
    /// over by then.
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
    pub phases: Vec<PhaseTiming>,
    /// From the start of the checkpoint until the destination reported the container running:
    /// the time the workload could not run.
    pub freeze_to_resume_ms: f64,
    pub checkpoint_bytes: u64,
    pub image_transferred: bool,
    pub total_ms: f64,
    /// Non-fatal problems after the destination took over.
    pub warnings: Vec<String>,
}

/// Why a migration failed, and what the rollback did about it.
#[derive(Debug)]
pub struct MigrationFailure {
    pub phase: Phase,
    pub error: anyhow::Error,
    /// Undo steps that themselves failed: what may need a hand.
    pub rollback_errors: Vec<String>,
}

impl std::fmt::Display for MigrationFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "migration failed during {}: {:#}",
            self.phase.label(),
            self.error
        )?;
        for e in &self.rollback_errors {
            write!(f, "\n  rollback problem: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for MigrationFailure {}

/// How to take back one thing a phase did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Undo {
    /// The container was checkpointed (and so stopped) on the source: start it again from
    /// its checkpoint, falling back to the exported archive.
    RestartOnSource { container: String, archive: PathBuf },
    /// The destination received (and maybe restored) the container: make it drop both.
    DiscardOnDestination,
    /// A local file the migration wrote.
    RemoveFile(PathBuf),
    /// The container's address was routed away from this host (blackhole, then tunnel).
    RemoveContainerRoute(std::net::Ipv4Addr),
    /// New connections to a published port were forwarded to the migrated container.
    UnforwardPort { protocol: Proto, host_port: u16 },
    /// A forward record was written for the sweeper of `agent-server`.
    ForgetForwarding(PathBuf),
}

impl std::fmt::Display for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undo::RestartOnSource { container, .. } => {
                write!(f, "start {container} on this host again")
            }
            Undo::DiscardOnDestination => write!(f, "have the destination drop its copy"),
            Undo::RemoveFile(path) => write!(f, "remove {}", path.display()),
            Undo::RemoveContainerRoute(ip) => write!(f, "route {ip} to this host again"),
            Undo::UnforwardPort {
                protocol,
                host_port,
            } => write!(f, "stop forwarding {protocol}/{host_port}"),
            Undo::ForgetForwarding(path) => {
                write!(f, "remove the forward record {}", path.display())
            }
        }
    }
}

/// The undo steps recorded so far, newest last, mirrored to a [`journal::Journal`] so that
/// `agent-client cleanup` can finish the job if this process dies.
#[derive(Debug, Default)]
pub struct UndoLog {
    steps: Vec<Undo>,
    journal: Option<journal::Journal>,
}

impl UndoLog {
    pub fn push(&mut self, undo: Undo) {
        self.steps.push(undo);
        self.save();
    }

    /// The destination runs the container now: a crash from here on must not restart it
    /// on the source.
    fn mark_taken_over(&mut self) {
        if let Some(journal) = &mut self.journal {
            journal.taken_over = true;
        }
        self.save();
    }

    fn save(&self) {
        self.save_steps(&self.steps);
    }

    fn save_steps(&self, steps: &[Undo]) {
        if let Some(journal) = &self.journal {
            if let Err(e) = journal.save(steps) {
                tracing::warn!("could not write the migration journal: {e:#}");
            }
        }
    }

    /// The steps, once nothing will be undone any more; the journal is deleted.
    fn close(mut self) -> Vec<Undo> {
        if let Some(journal) = self.journal.take() {
            journal.delete();
        }
        std::mem::take(&mut self.steps)
    }

    /// Runs every step newest first; returns the ones that failed. The journal then keeps
    /// only the failed steps `agent-client cleanup` can retry, or goes.
    async fn unwind(
        &mut self,
        podman: &PodmanClient,
        remote: Option<&mut RemoteAgent>,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Vec<String> {
        let mut remote = remote;
        let mut errors = Vec::new();
        let mut failed = Vec::new();
        // A step leaves the journal only once it has run, so a crash in between leaves
        // it for `agent-client cleanup`; failed ones stay (newer than those not yet run).
        while let Some(step) = self.steps.last().cloned() {
            progress(Progress::RollingBack(step.to_string()));
            let result = match &step {
                Undo::RestartOnSource { container, archive } => {
                    phases::restart_on_source(podman, container, archive).await
                }
                Undo::DiscardOnDestination => match remote.as_deref_mut() {
                    Some(agent) => agent.abort().await.map(|()| {
                        // Whatever it had restored is gone again: the source owns it.
                        if let Some(journal) = &mut self.journal {
                            journal.taken_over = false;
                        }
                    }),
                    None => Ok(()),
                },
                Undo::RemoveFile(path) | Undo::ForgetForwarding(path) => {
                    crate::files::remove_if_present(path).map_err(Into::into)
                }
                Undo::RemoveContainerRoute(ip) => phases::route_container_locally(*ip).await,
                Undo::UnforwardPort {
                    protocol,
                    host_port,
                } => phases::unforward_port(*protocol, *host_port).await,
            };
            self.steps.pop();
            if let Err(e) = result {
                tracing::warn!(?step, "undo failed: {e:#}");
                errors.push(format!("{step}: {e:#}"));
                // The destination's part cannot be retried from here: it winds down on its
                // own once the connection is gone.
                if step != Undo::DiscardOnDestination {
                    failed.insert(0, step);
                }
            }
            self.save_steps(&[self.steps.as_slice(), &failed].concat());
        }
        self.steps = failed;
        if self.steps.is_empty() {
            if let Some(journal) = self.journal.take() {
                journal.delete();
            }
        }
        errors
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

    fn finish(&mut self, phase: Phase, started: Instant) {
        let elapsed = started.elapsed();
        tracing::info!(
            phase = phase.label(),
            ms = elapsed.as_secs_f64() * 1e3,
            "phase done"
        );
        (self.progress)(Progress::PhaseFinished(phase, elapsed));
        self.timings.push(PhaseTiming {
            phase,
            ms: elapsed.as_secs_f64() * 1e3,
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
        let tunnel = phases::tunnel(&mut agent, &request.token, &keys).await?;
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
                    took.as_secs_f64() * 1e3
                ),
            ));
            Ok(survey)
        }
        Err(e) => {
            let mut survey = phases::survey(podman, None, container, state_dir).await?;
            let fix = if e.chain().any(|c| c.to_string().contains("authentication")) {
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

/// Runs a migration end to end. On failure (or cancellation before the switch) everything
/// done so far is undone before this returns, and the error says in which phase it failed.
pub async fn migrate(
    request: MigrationRequest,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<MigrationReport, MigrationFailure> {
    let started = Instant::now();
    let mut clock = PhaseClock {
        timings: Vec::new(),
        progress,
    };
    let mut undo = UndoLog::default();
    let mut remote: Option<RemoteAgent> = None;
    let mut phase = Phase::Connect;
    let cancel = &request.cancel;

    let outcome: anyhow::Result<(phases::Prepared, u64, Instant, Instant)> = async {
        undo.journal = Some(journal::Journal::create(
            &request.state_dir,
            &request.container,
            &request.destination,
        )?);
        let t = clock.start_unless_cancelled(phase, cancel)?;
        let agent = remote.insert(
            cancellable(
                cancel,
                phases::connect(&request.destination, &request.token),
            )
            .await?,
        );
        clock.finish(phase, t);

        phase = Phase::Tunnel;
        let t = clock.start_unless_cancelled(phase, cancel)?;
        let keys = crate::wireguard::KeyPair::load_or_create(&request.state_dir)?;
        let tunnel = phases::tunnel(agent, &request.token, &keys).await?;
        clock.finish(phase, t);

        phase = Phase::Prepare;
        let t = clock.start_unless_cancelled(phase, cancel)?;
        let prepared = cancellable(
            cancel,
            phases::prepare(
                &request.podman,
                agent,
                &request.container,
                &request.state_dir,
            ),
        )
        .await?;
        clock.finish(phase, t);
        let container_ip = prepared.container.ipv4();

        phase = Phase::Checkpoint;
        let frozen_at = clock.start_unless_cancelled(phase, cancel)?;
        let work_dir = request.state_dir.join("outgoing");
        // Not cancellable halfway: podman would finish the checkpoint anyway. A cancel
        // is seen right after it, and the container restarted.
        let archive =
            phases::checkpoint(&request.podman, &prepared.container, &work_dir, &mut undo).await?;
        clock.finish(phase, frozen_at);

        phase = Phase::Transfer;
        let t = clock.start_unless_cancelled(phase, cancel)?;
        let sent = cancellable(
            cancel,
            phases::transfer(
                agent,
                &prepared.container.to_ref(),
                &archive,
                progress,
                &mut undo,
            ),
        )
        .await;
        let bytes = match sent {
            Ok(bytes) => bytes,
            Err(e) => {
                // The stream broke off mid-frame: closing the connection is the abort,
                // the destination then drops what it received.
                remote = None;
                return Err(e);
            }
        };
        clock.finish(phase, t);

        phase = Phase::Restore;
        let t = clock.start_unless_cancelled(phase, cancel)?;
        if let Some(ip) = container_ip {
            phases::prepare_flows(agent, &keys, ip).await?;
        }
        phases::restore(agent, &prepared.container.to_ref()).await?;
        let resumed_at = Instant::now();
        undo.mark_taken_over();
        clock.finish(phase, t);

        phase = Phase::SwitchTraffic;
        // The last chance to cancel: the destination gives the container up again.
        let t = clock.start_unless_cancelled(phase, cancel)?;
        if let Some(ip) = container_ip {
            phases::switch_traffic(
                &tunnel,
                ip,
                &prepared.container,
                request.forward_new_connections,
                &request.state_dir,
                agent.peer_addr()?.port(),
                &mut undo,
            )
            .await?;
        }
        clock.finish(phase, t);
        Ok((prepared, bytes, frozen_at, resumed_at))
    }
    .await;

    let mut history = HistoryEntry::now(
        Direction::Outgoing,
        &request.container,
        &crate::remote::with_default_port(&request.destination),
    );
    let (prepared, checkpoint_bytes, frozen_at, resumed_at) = match outcome {
        Ok(done) => done,
        Err(error) => {
            tracing::error!(phase = phase.label(), "migration failed: {error:#}");
            let rollback_errors = undo
                .unwind(&request.podman, remote.as_mut(), progress)
                .await;
            let failure = MigrationFailure {
                phase,
                error,
                rollback_errors,
            };
            history.error = Some(failure.to_string());
            record_history(&request.state_dir, &history);
            return Err(failure);
        }
    };
    let freeze_to_resume = resumed_at - frozen_at;

    // The destination runs the container now: from here on nothing is rolled back, and
    // problems are only reported.
    let t = clock.start(Phase::CleanUp);
    let agent = remote.as_mut().expect("connected");
    let warnings = phases::clean_up(
        &request.podman,
        agent,
        &prepared.container.name,
        undo.close(),
    )
    .await;
    clock.finish(Phase::CleanUp, t);

    history.succeeded = true;
    history.freeze_to_resume_ms = Some(freeze_to_resume.as_secs_f64() * 1e3);
    history.total_ms = Some(started.elapsed().as_secs_f64() * 1e3);
    record_history(&request.state_dir, &history);
    Ok(MigrationReport {
        container: prepared.container.name.clone(),
        container_id: prepared.container.id.clone(),
        destination: crate::remote::with_default_port(&request.destination),
        phases: clock.timings,
        freeze_to_resume_ms: freeze_to_resume.as_secs_f64() * 1e3,
        checkpoint_bytes,
        image_transferred: prepared.image_transferred,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
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
