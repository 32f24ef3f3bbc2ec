use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::engine::podman::PodmanClient;
use crate::migration::history::{Direction, HistoryEntry};
use crate::migration::mode;
use crate::migration::ownership::SourceStage;
use crate::migration::phases;
use crate::migration::preflight::Finding;
use crate::migration::report::{
    millis, FreezeSteps, MigrationFailure, MigrationReport, PagesReport, Phase, PhaseTiming,
    Progress, Resolution,
};
use crate::migration::source;
use crate::migration::source::journal::JournalRecord;
use crate::migration::source::{SourceHost, UndoLog};
use crate::migration::switch::SwitchPlan;
use crate::session::auth::Token;
use crate::session::remote::RemoteAgent;

/// How long a migration whose destination stopped answering after the restore request
/// keeps asking it, before it leaves the question to `agent-server`'s adopter.
const IN_DOUBT_PATIENCE: Duration = Duration::from_secs(30);

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
    /// Packets for the container held here during the freeze, at most ([`crate::kernel::hold`]);
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

/// What a migration that got through the freeze hands on.
struct Frozen {
    prepared: phases::Prepared,
    checkpoint_bytes: u64,
    archive: PathBuf,
    /// Post-copy: the memory still to come.
    lazy: Option<phases::LazyDump>,
    /// Streamed stop-copy: how the memory came, during the freeze.
    streamed: Option<PagesReport>,
    frozen_at: Instant,
    resumed_at: Instant,
    steps: FreezeSteps,
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
        let keys = crate::kernel::wireguard::KeyPair::load_or_create(&request.state_dir)?;
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
                    "{} up ({} WireGuard), agent reached through it ({:.0} ms)",
                    tunnel.interface,
                    crate::kernel::wireguard::backend(),
                    millis(took)
                ),
            ));
            Ok(survey)
        }
        Err(e) => {
            let mut survey = phases::survey(podman, None, container, state_dir).await?;
            let mismatch = e.chain().any(|c| {
                c.downcast_ref::<crate::session::auth::AuthError>()
                    .is_some_and(crate::session::auth::AuthError::is_token_mismatch)
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
    let destination = crate::session::remote::agent_address(&request.destination)
        .unwrap_or_else(|_| request.destination.clone());

    let outcome: anyhow::Result<Frozen> = async {
        // Journaled (and locked against a second migration of it) before anything else; a
        // container that is not running is refused by the prepare phase, after this check,
        // so that a second migration of a frozen one hears why.
        let info = request.podman.inspect(&request.container).await?;
        let log = undo.insert(UndoLog::create(
            state_dir,
            JournalRecord {
                migration_id: crate::session::validate::new_migration_id(),
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
            let keys = crate::kernel::wireguard::KeyPair::load_or_create(state_dir)?;
            let (tunnel, through_tunnel) = phases::tunnel(agent, &request.token, &keys).await?;
            anyhow::Ok((keys, tunnel, through_tunnel))
        };
        let ((keys, tunnel, through_tunnel), _) = clock
            .run(&mut phase, Phase::Tunnel, may_cancel, tunnelling)
            .await?;
        tunneled = Some(through_tunnel);

        let migration_id = log.record.migration_id.clone();
        let preparing = async {
            let prepared = phases::prepare(
                &request.podman,
                agent,
                &info.id,
                request.mode,
                request.stop_copy_memory,
                state_dir,
            )
            .await?;
            phases::begin(agent, &keys, &migration_id, &prepared.container.to_ref()).await?;
            anyhow::Ok(prepared)
        };
        let (prepared, _) = clock
            .run(
                &mut phase,
                Phase::Prepare,
                may_cancel,
                cancellable(cancel, preparing),
            )
            .await?;
        let container_ip = prepared.container.ipv4();
        if let Some(ip) = container_ip {
            log.set_switch_plan(SwitchPlan::new(
                &tunnel,
                ip,
                &prepared.container,
                request.forward_new_connections,
                agent.peer_addr()?.port(),
            ))?;
        }

        let lazy_pages = prepared.mode.memory == mode::MemoryPath::PageServer;
        // Pages go straight to the destination, under TLS (faster than the tunnel): CRIU
        // serves them where this session leaves this host.
        let page_server = match (agent.local_addr()?.ip(), agent.peer_addr()?.ip()) {
            _ if !lazy_pages => None,
            (std::net::IpAddr::V4(at), std::net::IpAddr::V4(to)) => {
                Some(phases::ServePages { at, to })
            }
            _ => anyhow::bail!("lazy pages need the agents to talk over IPv4 (CRIU's page server is served on this session's address)"),
        };
        // Streamed stop-copy: the memory moves during the freeze, into a stopped replica.
        let replica = lazy_pages && prepared.mode.mode == mode::Mode::StopCopy;
        // Not cancellable halfway: podman would finish the checkpoint anyway. A cancel
        // is seen right after it, and the container restarted.
        let checkpointing = async {
            let flows = async {
                let started = Instant::now();
                if let Some(ip) = container_ip {
                    phases::prepare_flows(agent, &keys, ip).await?;
                }
                anyhow::Ok(millis(started.elapsed()))
            };
            let checkpoint = phases::checkpoint(
                &request.podman,
                &prepared.container,
                state_dir,
                request.hold_packets,
                page_server,
                log,
                flows,
            )
            .await?;
            crate::fault::at(state_dir, "checkpointed")?;
            anyhow::Ok(checkpoint)
        };
        let ((checkpoint, flows_ms), _) = clock
            .run(&mut phase, Phase::Checkpoint, may_cancel, checkpointing)
            .await?;
        let frozen_at = checkpoint.frozen_at;
        let checkpoint_ms = millis(frozen_at.elapsed());
        let mut lazy = checkpoint.lazy;
        warnings.extend(checkpoint.problems);
        let cgroup_freeze_ms = checkpoint.cgroup_frozen_in.map(millis);
        let stack_refreezes = checkpoint.stack_refreezes;
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
            let requested = Instant::now();
            let page_server = lazy.as_ref().map(|l| crate::protocol::LazyRestore {
                page_server_port: l.server.port,
                until_resumed: replica,
                credentials: l.credentials.clone(),
            });
            let container = prepared.container.to_ref();
            let restore = phases::restore(
                agent,
                &container,
                page_server,
                log,
                state_dir,
            );
            let (resumed_at, destination) = match &lazy {
                None => restore.await?,
                Some(dump) => {
                    let (restored, tuned) =
                        crate::engine::lazy_pages::tune_serving_during(dump.server, dump.criu, restore)
                            .await;
                    if let Err(e) = tuned {
                        tracing::warn!("CRIU's page server keeps its defaults: {e:#}");
                    }
                    restored?
                }
            };
            let restore_ms = millis(requested.elapsed());
            if lazy.is_some() && !replica {
                if let Err(e) = phases::end_source_processes(&prepared.container) {
                    warnings.push(format!("{e:#}"));
                }
            }
            anyhow::Ok((resumed_at, destination, restore_ms))
        };
        let ((mut resumed_at, destination, restore_ms), _) = clock
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
                stack_refreezes,
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
    // Once the packets held here are on their way, the destination's go: told through the
    // tunnel, the message comes behind them.
    let migration_id = log.record.migration_id.clone();
    let tell_destination = async {
        let Some(agent) = tunneled.as_mut() else {
            return Ok(None);
        };
        let held = agent.traffic_switched(&migration_id).await?;
        agent.finish().await?;
        anyhow::Ok(held)
    };
    let (held_packets, switch_warnings, told) =
        source::switch_traffic(log, &host, tell_destination).await;
    warnings.extend(switch_warnings);
    let held_at_destination = told.unwrap_or_else(|e| {
        warnings.push(format!(
            "destination not told that the traffic is switched: {e:#}"
        ));
        None
    });
    warnings.extend(source::forward_new_connections(log, &host).await);
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
        tokio::task::spawn_blocking(move || crate::engine::criu::dump_times_in_archive(&archive))
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
    if let Err(e) = crate::migration::history::record(state_dir, entry) {
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
