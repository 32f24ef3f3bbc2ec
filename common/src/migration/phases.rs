//! One function per migration phase. A phase that changes something records its undo on
//! the [`UndoLog`] as soon as the change exists, before anything else can fail.

use std::path::{Path, PathBuf};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::migration::mode::{MemoryPath, ModeChoice, ModeRequest};
use crate::migration::ownership::SourceStage;
use crate::migration::report::{millis, PagesReport, Progress};
use crate::migration::source::held_processes_alive;
use crate::migration::source::journal::Undo;
use crate::migration::source::UndoLog;

use crate::engine::lazy_pages::{FreezeHook, PageServer};
use crate::engine::podman::{ContainerInfo, PodmanClient};
use crate::kernel::conntrack;
use crate::kernel::overlay::{TunnelEnd, MAIN_TABLE};
use crate::kernel::routing::{Route, Routing};
use crate::kernel::wireguard::KeyPair;
use crate::migration::freeze;
use crate::migration::preflight::{self, Finding};
use crate::protocol::{
    ContainerRef, HostReport, LazyRestore, PageCredentials, RestoreTimes, MAX_FLOWS_PER_BATCH,
};
use crate::session::auth::Token;
use crate::session::remote::RemoteAgent;

/// Connect: reach the destination agent and authenticate both ways. Nothing to undo: the
/// connection closes with the migration.
pub async fn connect(destination: &str, token: &Token) -> Result<RemoteAgent> {
    RemoteAgent::connect(destination, token).await
}

/// Tunnel: bring up the WireGuard tunnel to the destination (reused if it exists) and
/// prove it carries traffic: a second session with the destination agent, through the
/// tunnel, must authenticate. The migration itself stays on the direct session, which is
/// encrypted too and not limited by the tunnel's speed; the second session is returned,
/// for what must follow the container's packets through the tunnel. Nothing to undo: the
/// tunnel is kept for later migrations between the same hosts.
pub async fn tunnel(
    remote: &mut RemoteAgent,
    token: &Token,
    keys: &KeyPair,
) -> Result<(TunnelEnd, RemoteAgent)> {
    let ours = keys.public_base64();
    let (theirs, listen_port) = remote.open_tunnel(&ours).await?;
    let agent_addr = remote.peer_addr()?;
    let end = TunnelEnd::ensure(
        keys,
        &theirs,
        Some(SocketAddr::new(agent_addr.ip(), listen_port)),
    )
    .await?;
    let through = end.peer_agent(agent_addr.port());
    let probe = RemoteAgent::connect(&through.to_string(), token)
        .await
        .context("reaching the destination agent through the tunnel")?;
    Ok((end, probe))
}

/// What the prepare phase (and `agent-client check`) learned about the container and both
/// hosts.
#[derive(Debug, Serialize)]
pub struct Survey {
    pub container: ContainerInfo,
    /// Memory the container uses: about the size of its checkpoint.
    pub memory_bytes: Option<u64>,
    pub source: HostReport,
    /// `None` when the destination agent could not be reached (`check` says why).
    pub destination: Option<HostReport>,
    pub findings: Vec<Finding>,
}

/// Looks at the container here and asks the destination (if reached) what it has; changes
/// nothing.
pub async fn survey(
    podman: &PodmanClient,
    remote: Option<&mut RemoteAgent>,
    container: &str,
    state_dir: &Path,
) -> Result<Survey> {
    let info = podman.inspect_running(container).await?;
    let container = info.to_ref();
    let ask_destination = async {
        match remote {
            Some(agent) => agent.preflight(&container).await.map(Some),
            None => Ok(None),
        }
    };
    let (memory_bytes, source, destination) = tokio::try_join!(
        async { Ok(podman.memory_usage(&info.id).await?) },
        preflight::host_report(podman, state_dir, None),
        ask_destination,
    )?;
    let findings = preflight::assess(&source, destination.as_ref(), &container, memory_bytes);
    Ok(Survey {
        container: info,
        memory_bytes,
        source,
        destination,
        findings,
    })
}

/// Why post-copy cannot run between the surveyed hosts (`None`: it can).
pub fn post_copy_problem(survey: &Survey) -> Option<String> {
    if survey.destination.is_none() {
        return Some("the destination was not reached".into());
    }
    if let Err(problem) =
        crate::engine::lazy_pages::dump_config(survey.container.criu_config.as_deref())
    {
        return Some(problem);
    }
    [Some(&survey.source), survey.destination.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|host| {
            let problem = host.post_copy_problem.as_ref()?;
            Some(format!("{}: {problem}", host.hostname))
        })
}

/// What the prepare phase hands on.
pub struct Prepared {
    pub container: ContainerInfo,
    pub image_transferred: bool,
    /// The mode the migration runs in ([`super::mode::choose`]).
    pub mode: ModeChoice,
}

/// Prepare: check the container and both hosts (refusing on any problem), and give the
/// destination the image while the container still runs. Nothing to undo: an image on the
/// destination harms nobody and makes the next migration faster.
pub async fn prepare(
    podman: &PodmanClient,
    remote: &mut RemoteAgent,
    container: &str,
    mode: ModeRequest,
    stop_copy_memory: MemoryPath,
    state_dir: &Path,
) -> Result<Prepared> {
    let survey = survey(podman, Some(&mut *remote), container, state_dir).await?;
    preflight::refuse_on_problems(&survey.findings)?;
    let mode = super::mode::choose(
        mode,
        survey.memory_bytes,
        post_copy_problem(&survey).as_deref(),
        stop_copy_memory,
    )?;
    let info = survey.container;
    let image_transferred = !survey.destination.is_some_and(|d| d.has_image);
    if image_transferred {
        // Exported by name: an archive made from the bare ID carries no name, and restore
        // looks the image up by name.
        let reference = if info.image_name.is_empty() {
            &info.image_id
        } else {
            &info.image_name
        };
        let archive = podman.export_image(reference).await?;
        tracing::info!(bytes = archive.len(), image = %info.image_name, "sending image");
        remote
            .put_image(&info.image_id, &archive)
            .await
            .context("sending the container image to the destination")?;
    }
    Ok(Prepared {
        container: info,
        image_transferred,
        mode,
    })
}

/// What the checkpoint phase hands on.
pub struct Checkpoint {
    /// What the destination restores from: podman's export (stop-copy), or the images
    /// packed here while CRIU serves the memory (post-copy).
    pub archive: PathBuf,
    /// When the container's traffic stopped reaching it (held or dropped), the start of
    /// the freeze its clients see; what came before (the lazy dump armed) did not stop it.
    pub frozen_at: std::time::Instant,
    /// How long freezing the container's cgroup took, if it was frozen before CRIU's work.
    pub cgroup_frozen_in: Option<std::time::Duration>,
    /// How many times the cgroup was frozen again, for a lazy dump, to step around a
    /// page-aligned stack pointer ([`crate::engine::lazy_pages::refreeze_off_aligned_stacks`]).
    pub stack_refreezes: usize,
    /// What did not go as it should and made the freeze worse (packets dropped, not held;
    /// CRIU left to freeze the container).
    pub problems: Vec<String>,
    /// Post-copy: CRIU serves the container's memory from here until the destination has
    /// all of it.
    pub lazy: Option<LazyDump>,
}

/// Where a lazy checkpoint serves the container's memory (`at`, this host's address of
/// the session with the destination), and the one host let in (`to`, the destination).
#[derive(Debug, Clone, Copy)]
pub struct ServePages {
    pub at: Ipv4Addr,
    pub to: Ipv4Addr,
}

/// A post-copy checkpoint that is still serving the container's memory.
pub struct LazyDump {
    pub server: PageServer,
    /// What the destination's end of the page connection needs ([`crate::engine::lazy_pages`]).
    pub credentials: PageCredentials,
    /// The cgroup of the processes CRIU holds.
    pub held: Option<String>,
    /// The CRIU process that dumped the container and serves its pages, as its pre-dump
    /// hook showed it (None if the hook's process had gone).
    pub criu: Option<i32>,
    /// podman's checkpoint call: it returns once the last page has moved (its export,
    /// of what CRIU wrote without the memory, is of no use).
    pub podman_call: tokio::task::JoinHandle<Result<u64, crate::engine::podman::PodmanError>>,
}

/// Checkpoint: freeze the container (with its established TCP connections), export the
/// checkpoint into `STATE_DIR/outgoing`, and keep its traffic here until the destination runs it.
/// Packets for it are held, at most `hold_packets` ([`crate::kernel::hold`]), and the address is
/// blackholed, so that whatever is not held is dropped. Answering them, or letting them
/// reach a network namespace whose sockets are not restored yet, would reset the client's
/// connections; dropped ones are retransmitted. Its packets are held and its cgroup frozen
/// ([`freeze`]) just before CRIU stops it: before podman's call, or for a lazy dump at
/// CRIU's pre-dump hook ([`FreezeHook`]), so that podman's and runc's start is not in the
/// freeze. Undo: start it again on the source (and thaw it), route its address locally
/// again, then let the held packets through (in that order, for the same reason).
///
/// Post-copy or streamed stop-copy (`page_server` is the address to serve the memory on):
/// CRIU dumps lazily ([`crate::engine::lazy_pages`]), under TLS with credentials made for
/// this migration; the phase ends as soon as CRIU serves the memory, with the other images
/// packed here. Undo then first stops CRIU's page server, which lets the processes run
/// again.
///
/// `alongside` runs beside podman's call once the cgroup is frozen, so that it costs the
/// freeze nothing ([`freeze::Stopped::beside`]).
pub async fn checkpoint<T>(
    podman: &PodmanClient,
    container: &ContainerInfo,
    state_dir: &Path,
    hold_packets: u32,
    page_server: Option<ServePages>,
    undo: &mut UndoLog,
    alongside: impl std::future::Future<Output = Result<T>>,
) -> Result<(Checkpoint, T)> {
    let work_dir = &state_dir.join("outgoing");
    crate::files::create_private_dir(work_dir)
        .with_context(|| format!("create work directory {}", work_dir.display()))?;
    let id = undo.record.migration_id.clone();
    let archive = work_dir.join(format!("{id}.tar"));
    let export = work_dir.join(format!("{id}.export.tar"));
    let container_ip = container.ipv4();
    let tls = work_dir.join(format!("{id}.pages.pem"));
    let mut armed = match page_server {
        Some(ServePages { at, to }) => {
            // Whether the processes outlive CRIU decides a streamed stop-copy.
            let pid = container
                .pid
                .context("podman did not say which process is the container's init")?;
            undo.record.held_init = Some(pid);
            let config = crate::engine::lazy_pages::dump_config(container.criu_config.as_deref())
                .map_err(|problem| anyhow::anyhow!(problem))?;
            let server = PageServer::on_a_free_port(at)?;
            // Journaled first: an agent that dies right after leaves nothing unaccounted.
            undo.register(
                FreezeHook::paths(work_dir, &id)
                    .into_iter()
                    .chain([tls.clone()])
                    .map(Undo::RemoveFile)
                    .chain([Undo::Unguard(server)]),
            )?;
            let credentials = PageCredentials::generate()?;
            credentials.write(&tls)?;
            let hook = FreezeHook::create(work_dir, &id)?;
            let armed =
                crate::engine::lazy_pages::arm(server, to, &tls, &config, hook.script()).await?;
            Some((armed, credentials, hook, pid))
        }
        None => None,
    };
    if armed.is_some() {
        // Guarded and journaled, nothing frozen yet: a client killed here is rolled back
        // from its journal alone.
        crate::fault::at(state_dir, "guarded")?;
    }
    // Registered before the call: a checkpoint that fails halfway may still have stopped it.
    undo.freeze(
        [Undo::RemoveFile(archive.clone())]
            .into_iter()
            .chain(armed.iter().map(|_| Undo::RemoveFile(export.clone())))
            .chain(
                container_ip
                    .into_iter()
                    .flat_map(|ip| [Undo::ReleaseHold(ip), Undo::RemoveContainerRoute(ip)]),
            )
            .chain(container.cgroup_path.clone().map(Undo::Thaw))
            .chain([Undo::RestartOnSource {
                container: container.name.clone(),
                archive: archive.clone(),
            }])
            .chain(armed.as_ref().map(|(a, ..)| Undo::StopPageServer {
                server: a.server,
                held: container.cgroup_path.clone(),
            })),
    )?;
    let mut problems = Vec::new();
    // The hold's rule is an nftables commit (10-15 ms here): made while the container
    // still runs, its packets passing through the queue as they come.
    let hold = match container_ip.filter(|_| hold_packets > 0) {
        Some(ip) => match crate::kernel::hold::arm(ip, hold_packets, None).await {
            Ok(()) => Some(ip),
            Err(e) => {
                freeze::not_held(&mut problems, ip, &format!("{e:#}"));
                None
            }
        },
        None => None,
    };
    let cgroup = container.cgroup_path.clone();
    let (stopped, lazy, beside) = match armed.as_mut() {
        None => {
            let stopped = freeze::stop(hold, cgroup, false, &mut problems).await?;
            let checkpointing = podman.checkpoint_to_file(&container.name, &archive);
            let (checkpointed, beside) = stopped.beside(checkpointing, alongside).await;
            (
                stopped,
                checkpointed.map(|_| None).map_err(Into::into),
                beside,
            )
        }
        Some((armed, credentials, hook, pid)) => {
            let (podman, name, to) = (podman.clone(), container.name.clone(), export.clone());
            let mut podman_call =
                tokio::spawn(async move { podman.checkpoint_to_file(&name, &to).await });
            // The container runs on while podman, runc and CRIU start.
            let pre_dump = tokio::select! {
                pre_dump = hook.pre_dump(*pid) => pre_dump?,
                called = &mut podman_call => {
                    called??;
                    bail!("podman's checkpoint returned before CRIU's pre-dump hook ran");
                }
            };
            // CRIU has read its configuration: later checkpoints here are plain ones again.
            armed.disarm()?;
            let stopped = freeze::stop(hold, cgroup, true, &mut problems).await?;
            crate::fault::at(state_dir, "frozen")?;
            let criu = pre_dump.criu;
            pre_dump.proceed().await?;
            let serving = async {
                let serving =
                    crate::engine::lazy_pages::wait_serving(armed.server, &podman_call).await;
                if let Err(e) = serving {
                    if podman_call.is_finished() {
                        (&mut podman_call).await??; // podman's error says more
                    }
                    return Err(e);
                }
                Ok(())
            };
            let (served, beside) = stopped.beside(serving, alongside).await;
            let lazy = served.map(|()| {
                Some(LazyDump {
                    server: armed.server,
                    credentials: credentials.clone(),
                    held: container.cgroup_path.clone(),
                    criu,
                    podman_call,
                })
            });
            (stopped, lazy, beside)
        }
    };
    let lazy = lazy?;
    let beside = beside?;
    if let Some(ip) = container_ip {
        Routing::new()?
            .replace_route(&Route::blackhole_v4(ip, 32, MAIN_TABLE))
            .await?;
    }
    if lazy.is_some() {
        let bundle = container
            .bundle
            .clone()
            .context("podman did not say where the container's files are")?;
        let (networks, upper, to) = (
            container.networks.clone(),
            container.upper_dir.clone(),
            archive.clone(),
        );
        tokio::task::spawn_blocking(move || {
            crate::engine::lazy_pages::pack_images(&bundle, &networks, upper.as_deref(), &to)
        })
        .await??;
    }
    let checkpoint = Checkpoint {
        archive,
        frozen_at: stopped.at,
        cgroup_frozen_in: stopped.cgroup_frozen_in,
        stack_refreezes: stopped.stack_refreezes,
        problems,
        lazy,
    };
    Ok((checkpoint, beside))
}

/// Post-copy, once the destination runs the container: the processes CRIU still holds
/// here (stopped, serving their memory) are killed, so that whatever becomes of CRIU they
/// never run again. The pages stay in CRIU's pipes. Killing the init of the container's
/// PID namespace kills the rest of it.
pub fn end_source_processes(container: &ContainerInfo) -> Result<()> {
    let Some(pid) = container.pid else {
        bail!("podman did not say which process is the container's init");
    };
    // Gone already if CRIU ended them: the PID may be another process's by now.
    crate::kernel::process::kill_in(pid, &container.id)
        .map(drop)
        .with_context(|| format!("kill the source's processes (pid {pid})"))
}

/// Pages: wait until the destination has every page, then for podman's checkpoint call
/// here, which ends with CRIU's page server. If the transfer failed (the destination says
/// so, or cannot be reached), the page server is stopped: the destination has stopped its
/// copy. Post-copy killed the processes here at the restore; a streamed stop-copy's run
/// on once CRIU lets them go.
pub async fn await_pages(
    remote: Option<&mut RemoteAgent>,
    undo: &mut UndoLog,
    lazy: LazyDump,
    until: PagesEnd,
) -> Result<PagesReport> {
    let LazyDump {
        server,
        held,
        mut podman_call,
        ..
    } = lazy;
    let migration_id = undo.record.migration_id.clone();
    let arrived = match remote {
        Some(remote) => remote
            .await_pages(&migration_id, crate::migration::source::PAGES_PATIENCE)
            .await
            .context("waiting for the destination to have every page"),
        None => Err(anyhow::anyhow!("no connection to the destination")),
    };
    let ended = arrived.is_ok()
        && tokio::time::timeout(CALL_AFTER_PAGES, async {
            match until {
                PagesEnd::CallReturned => drop((&mut podman_call).await),
                // podman's call goes on (runc, its export); its container lock keeps the
                // clean-up behind it.
                PagesEnd::ProcessesEnded => {
                    while held_processes_alive(&undo.record) && !podman_call.is_finished() {
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    }
                }
            }
        })
        .await
        .is_ok();
    if !ended {
        crate::engine::lazy_pages::stop_serving(server, held.as_deref()).await?;
        let _ = tokio::time::timeout(CALL_AFTER_PAGES, podman_call).await;
    }
    // A guard left (CRIU ended on its own) goes at the clean-up, by the journal's Unguard:
    // removing it now would lengthen the freeze.
    undo.drop_step(&Undo::StopPageServer { server, held })?;
    let arrived = arrived?;
    Ok(PagesReport {
        after_restore_ms: millis(arrived.after_restore),
        pages: arrived.pages,
    })
}

/// What [`await_pages`] waits for once the pages are through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagesEnd {
    /// podman's checkpoint call has returned (post-copy: nothing waits for the source).
    CallReturned,
    /// CRIU has ended the processes here (streamed stop-copy: the replica waits for it).
    ProcessesEnded,
}

/// How long podman's checkpoint call may take to return once the pages are through.
const CALL_AFTER_PAGES: std::time::Duration = std::time::Duration::from_secs(30);

/// End of the prepare phase: the destination starts the migration, and arms the hold of
/// the packets that reach it for the container (off the freeze: that is an nftables
/// commit); it holds them from `PrepareTraffic` on. Nothing to undo here: the destination
/// drops the migration, and lets its packets go, when the connection closes before a
/// restore.
pub async fn begin(
    remote: &mut RemoteAgent,
    keys: &KeyPair,
    migration_id: &str,
    container: &ContainerRef,
) -> Result<()> {
    remote
        .begin_migration(migration_id, container, &keys.public_base64())
        .await
}

/// Beside the checkpoint, once the container is frozen: tell the destination about the
/// container's flows, as it will see them (without this host's NAT), so it tracks them as
/// established connections that came through the tunnel, and holds the container's address
/// there. The destination removes them unless it comes to own the container.
pub async fn prepare_flows(
    remote: &mut RemoteAgent,
    keys: &KeyPair,
    container_ip: Ipv4Addr,
) -> Result<usize> {
    let flows: Vec<_> = conntrack::involving(&conntrack::list().await?, IpAddr::V4(container_ip))
        .into_iter()
        .map(|f| f.without_nat())
        .collect();
    tracing::info!(flows = flows.len(), %container_ip, "sending the container's flows");
    let mut prepared = 0;
    // An empty batch still holds the address on the destination.
    for batch in flows
        .chunks(MAX_FLOWS_PER_BATCH)
        .chain(flows.is_empty().then_some(&[][..]))
    {
        prepared = remote
            .prepare_traffic(&keys.public_base64(), container_ip, batch.to_vec())
            .await?;
    }
    Ok(prepared)
}

/// Transfer: stream the archive to the destination, which verifies its SHA-256. Nothing
/// to undo here: until it is asked to restore, the destination drops what it received
/// when the connection closes.
pub async fn transfer(
    remote: &mut RemoteAgent,
    migration_id: &str,
    container: &ContainerRef,
    archive: &Path,
    state_dir: &Path,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<u64> {
    let total = std::fs::metadata(archive)?.len();
    let mut first = true;
    remote
        .put_checkpoint(migration_id, container, archive, |sent| {
            if std::mem::take(&mut first) {
                if let Err(e) = crate::fault::at(state_dir, "transferring") {
                    tracing::error!("{e:#}");
                }
            }
            progress(Progress::Transferred { sent, total })
        })
        .await
}

/// Restore: the destination creates and starts the container from the archive, and owns
/// it once it answers. The request is journaled before it is sent: from then on, who owns
/// the container is in doubt until the destination answers ([`super::ownership`]). Returns
/// when the answer came (the container runs again), and what the restore took there.
///
/// A streamed stop-copy (`lazy.until_resumed`) leaves a stopped replica there instead,
/// which the destination does not own: the migration goes on [`SourceStage::Streaming`],
/// and the replica is fenced if it rolls back.
pub async fn restore(
    remote: &mut RemoteAgent,
    container: &ContainerRef,
    lazy: Option<LazyRestore>,
    undo: &mut UndoLog,
    state_dir: &Path,
) -> Result<(std::time::Instant, RestoreTimes)> {
    let replica = lazy.as_ref().is_some_and(|l| l.until_resumed);
    if replica {
        undo.record.steps.push(Undo::FenceReplica {
            destination: undo.record.destination.clone(),
            migration_id: undo.record.migration_id.clone(),
        });
    }
    undo.enter(SourceStage::RestoreRequested)?;
    let times = remote
        .restore(container, lazy, || {
            if let Err(e) = crate::fault::at(state_dir, "restore-requested") {
                tracing::error!("{e:#}");
            }
        })
        .await?;
    let answered_at = std::time::Instant::now();
    undo.enter(if replica {
        SourceStage::Streaming
    } else {
        SourceStage::DestinationOwns
    })?;
    Ok((answered_at, times))
}

/// Streamed stop-copy, once every page is on the destination and CRIU here has ended: the
/// replica runs if the processes here are gone (CRIU ends them once their last page has
/// left); the destination owns the container from its answer. Processes still alive here
/// fail the migration, which then rolls back.
pub async fn resume(remote: &mut RemoteAgent, undo: &mut UndoLog) -> Result<()> {
    if held_processes_alive(&undo.record) {
        bail!("the processes here outlived CRIU's page server: the replica must not run");
    }
    remote.resume(&undo.record.migration_id).await?;
    undo.enter(SourceStage::DestinationOwns)
}
