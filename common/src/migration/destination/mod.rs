//! The destination's side of a migration, as state: what an incoming migration has made on
//! this host (archive, conntrack entries, a held address, a restored container) and where
//! it stands in the ownership model ([`super::ownership`]). Each migration is journaled
//! atomically on every change, so that after a crash `agent-server` (or `agent-client
//! cleanup` while it is down) carries out the model: it keeps what it owns, and removes
//! what it does not.

mod host;
pub mod post_copy;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::lazy_pages::PageServer;
use crate::kernel::conntrack::Flow;
use crate::migration::forwarding::ForwardRecord;
use crate::migration::ownership::{self, DestinationAction, DestinationStage};
use crate::protocol::HoldReport;
use crate::protocol::Verdict;
use crate::protocol::{ContainerRef, Proto};

/// How long a restarted agent waits for a restore that podman may still finish on its own
/// (the agent died after handing podman the archive) before it counts it as not coming:
/// this much, plus the time podman takes to read the archive at [`LATE_RESTORE_RATE`].
/// The source gets no answer meanwhile (the agent listens only once it has recovered).
const LATE_RESTORE_WAIT: Duration = Duration::from_secs(10);
/// Bytes per second podman reads a checkpoint archive at, at least, on a slow host.
const LATE_RESTORE_RATE: u64 = 50 << 20;

fn server_lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent-server.lock")
}

/// Takes the lock `agent-server` holds for as long as it runs on `state_dir`: one server
/// per state directory, and `agent-client cleanup` knows whether one runs.
pub fn lock_server(state_dir: &Path) -> Result<File> {
    crate::files::create_private_dir(state_dir)
        .with_context(|| format!("create {}", state_dir.display()))?;
    let path = server_lock_path(state_dir);
    let file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => anyhow::bail!(
            "another agent-server runs with the state directory {}",
            state_dir.display()
        ),
        Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("lock {}", path.display())),
    }
}

/// Whether an `agent-server` runs on `state_dir` (holds its lock).
pub fn server_running(state_dir: &Path) -> bool {
    File::open(server_lock_path(state_dir))
        .is_ok_and(|f| matches!(f.try_lock_shared(), Err(TryLockError::WouldBlock)))
}

/// Directory of the incoming migrations' journals.
pub fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("sessions")
}

/// Directory of the incoming checkpoint archives.
pub fn archive_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("incoming")
}

/// What carrying out the model does to this host, one call per step: the real host
/// ([`crate::engine::podman::PodmanClient`] with the kernel's conntrack and routes), or in the unit tests (`tests.rs`)
/// a fake that can crash at any step.
#[allow(async_fn_in_trait)] // used with concrete types only, never as `dyn`
pub trait DestinationActions {
    /// Whether a container with `id` exists here (`Some`), and whether it runs.
    async fn container(&self, id: &str) -> Result<Option<bool>>;
    async fn remove_container(&self, id: &str) -> Result<()>;
    /// Stops a container at once, without letting it run another instruction: its
    /// memory may be incomplete (a failed post-copy).
    async fn stop_container(&self, id: &str) -> Result<()>;
    /// Lets a replica's stopped processes go on (SIGCONT to each), found in `cgroup` if
    /// known, or else where podman says it is.
    async fn resume_container(&self, id: &str, cgroup: Option<&str>) -> Result<()>;
    async fn delete_flow(&self, flow: &Flow) -> Result<()>;
    /// Ends the hold on `ip` (its blackhole, and its held packets): it is routed into the
    /// tunnel `into_tunnel`, or else locally, again. Says what the packet hold did, if this
    /// process held packets.
    async fn release_ip(
        &self,
        ip: Ipv4Addr,
        into_tunnel: Option<&str>,
    ) -> Result<Option<HoldReport>>;
    /// Takes over the page transfer of `migration`, restored lazily by a previous run of
    /// the agent with its memory still coming ([`post_copy::take_over`]). Returns
    /// what it found, for the report.
    fn take_over_pages(
        &self,
        state_dir: &Path,
        shared: &Shared,
        migration: &mut IncomingMigration,
    ) -> String;
}

/// A journal found in the state directory.
#[derive(Debug)]
pub enum Journaled {
    Readable(Box<IncomingMigration>),
    /// Reported, never silently deleted: it may name a copy or conntrack entries.
    Unreadable {
        path: PathBuf,
        error: String,
    },
}

/// The journals of incoming migrations (open ones, ones kept because this host owns the
/// container until the source settles, or, with no server running, abandoned ones).
pub fn list(state_dir: &Path) -> Vec<Journaled> {
    let Ok(entries) = std::fs::read_dir(journal_dir(state_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(read_journal)
        .collect();
    out.sort_by_key(|j| match j {
        Journaled::Readable(m) => m.journal.clone(),
        Journaled::Unreadable { path, .. } => path.clone(),
    });
    out
}

fn read_journal(path: PathBuf) -> Journaled {
    let parsed = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            serde_json::from_slice::<IncomingMigration>(&bytes).map_err(|e| e.to_string())
        });
    match parsed {
        Ok(mut migration) => {
            migration.journal = path;
            Journaled::Readable(Box::new(migration))
        }
        Err(error) => Journaled::Unreadable { path, error },
    }
}

/// One incoming migration: what it has made on this host, so it can be undone, and where
/// it stands.
#[derive(Debug, Serialize, Deserialize)]
pub struct IncomingMigration {
    #[serde(skip)]
    journal: PathBuf,
    pub migration_id: String,
    pub stage: DestinationStage,
    /// The container the source declared; the only one this migration may restore.
    pub container: ContainerRef,
    /// The source's address, for the history.
    pub source: String,
    pub archive: Option<PathBuf>,
    /// Conntrack entries this migration created (entries that existed before are not ours).
    pub flows: Vec<Flow>,
    /// The incoming container's address, held: blackholed, and its packets held, until
    /// the container runs.
    pub held_ip: Option<Ipv4Addr>,
    /// The container's address, routed as before, with a hold on its packets: armed (they
    /// pass) from `BeginMigration` until `PrepareTraffic` holds them and blackholes the
    /// address (`held_ip` then stands for the hold), and holding again once it runs, routed
    /// here, until the source's held packets are through (`TrafficSwitched`).
    #[serde(default)]
    pub holding: Option<Ipv4Addr>,
    /// The tunnel this host routed the container's address into until `PrepareTraffic`
    /// blackholed it: the container had moved on from here and comes back. Its address
    /// goes back into that tunnel if it does not come, and this host's forwarding of it
    /// ([`crate::migration::forwarding`]) stays until it runs here.
    #[serde(default)]
    pub forwarded_via: Option<String>,
    /// The whole archive arrived and matched its SHA-256: only then may it be restored.
    #[serde(default)]
    pub archive_verified: bool,
    /// Work for the restore started ahead of it, off the freeze's critical path; the
    /// restore waits for it before it answers.
    #[serde(skip)]
    pub ahead_of_restore: Vec<tokio::task::JoinHandle<Result<()>>>,
    /// How the packets of flows that entered this host arrive back through the tunnel
    /// (protocol, from, to): untracked from the restore on. Not journaled: before the
    /// restore a restarted agent drops the migration, and the untracking times out.
    #[serde(skip)]
    pub returning: Vec<(Proto, SocketAddrV4, SocketAddrV4)>,
    /// Restored post-copy, and not all of its memory is here yet: it needs the source's
    /// page server until then ([`crate::engine::lazy_pages`]).
    #[serde(default)]
    pub pages_pending: bool,
    /// Where the memory of a lazy restore comes from.
    #[serde(default)]
    pub page_server: Option<PageServer>,
    /// Restored as a replica, to run only on the source's `Resume`.
    #[serde(default)]
    pub replica: bool,
    /// The restored container's cgroup, as podman reported it right after the restore:
    /// `Resume` needs no podman call in the freeze to find its processes.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// How the page transfer of this process's restore goes; `None` when no process of
    /// this agent watches it (after a restart).
    #[serde(skip)]
    pub pages: Option<tokio::sync::watch::Receiver<PagesState>>,
    /// Settled or discarded: nothing of it may be journaled again.
    #[serde(skip)]
    done: bool,
}

/// Where the memory of a post-copy restore stands.
#[derive(Debug, Clone, PartialEq)]
pub enum PagesState {
    Pending,
    Arrived(crate::protocol::PagesArrived),
    /// The transfer failed and the container was stopped: it could not go on.
    Failed(String),
}

impl IncomingMigration {
    /// A migration that is about to receive its archive; [`Self::save`] journals it, once
    /// the [`Registry`] took it.
    pub fn new(
        state_dir: &Path,
        migration_id: &str,
        container: ContainerRef,
        source: String,
    ) -> Result<Self> {
        for dir in [journal_dir(state_dir), archive_dir(state_dir)] {
            crate::files::create_private_dir(&dir)
                .with_context(|| format!("create {}", dir.display()))?;
        }
        let migration = Self {
            journal: journal_dir(state_dir).join(format!("{migration_id}.json")),
            migration_id: migration_id.to_string(),
            stage: DestinationStage::Receiving,
            container,
            source,
            archive: Some(archive_dir(state_dir).join(format!("{migration_id}.tar"))),
            flows: Vec::new(),
            held_ip: None,
            holding: None,
            forwarded_via: None,
            archive_verified: false,
            ahead_of_restore: Vec::new(),
            returning: Vec::new(),
            pages_pending: false,
            page_server: None,
            replica: false,
            cgroup: None,
            pages: None,
            done: false,
        };
        Ok(migration)
    }

    /// Journals the current state durably; a failure stops the request before its next step.
    /// A migration that is done is not journaled again (a connection that closes after
    /// another one settled it must not bring its record back).
    pub fn save(&self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        let json = serde_json::to_vec(self)?;
        crate::files::write_atomic(&self.journal, &json)
            .with_context(|| format!("write the migration journal {}", self.journal.display()))
    }

    /// Moves to `stage`, durably.
    pub fn enter(&mut self, stage: DestinationStage) -> Result<()> {
        self.stage = stage;
        self.save()
    }

    /// Removes everything the migration made here, its copy of the container included,
    /// and fences it: once this returns Ok, this host holds no copy and starts none. On an
    /// error the migration stays journaled (and unfenced), to be tried again.
    pub async fn discard(&mut self, host: &impl DestinationActions) -> Result<()> {
        if matches!(
            self.stage,
            DestinationStage::Restoring | DestinationStage::Replica | DestinationStage::Owns
        ) && host.container(&self.container.id).await?.is_some()
        {
            tracing::info!(container = %self.container.name, "removing this host's copy");
            host.remove_container(&self.container.id).await?;
        }
        while let Some(flow) = self.flows.last() {
            host.delete_flow(flow).await?;
            self.flows.pop();
        }
        self.release_held_ip(host, false).await?;
        self.discard_archive();
        self.stage = DestinationStage::Fenced;
        self.done = true;
        crate::files::remove_if_present(&self.journal)
            .with_context(|| format!("remove {}", self.journal.display()))
    }

    /// The container runs here and the source has removed its copy: nothing is left to
    /// decide, so the journal goes (the container and its flows stay).
    pub fn forget(&mut self) -> Result<()> {
        self.discard_archive();
        self.done = true;
        crate::files::remove_if_present(&self.journal)
            .with_context(|| format!("remove {}", self.journal.display()))
    }

    /// The container's address is routed where the container is again and its held
    /// packets go there: here if it `runs_here` (its sockets exist), else where it was
    /// before (into the tunnel it had left through, or here). Says what the packet hold
    /// did.
    pub async fn release_held_ip(
        &mut self,
        host: &impl DestinationActions,
        runs_here: bool,
    ) -> Result<Option<HoldReport>> {
        let mut held = None;
        if let Some(ip) = self.held_ip {
            let into_tunnel = self.forwarded_via.as_deref().filter(|_| !runs_here);
            held = host.release_ip(ip, into_tunnel).await?;
            self.held_ip = None;
        }
        // Routed here already (and maybe elsewhere again since): only the packets go.
        if let Some(ip) = self.holding {
            held = crate::kernel::hold::release(ip).await?;
            self.holding = None;
        }
        Ok(held)
    }

    /// It runs: its address is routed here again; its packets stay held. If it had moved
    /// on from here before, this host's forwarding of it goes, after the answer.
    pub async fn route_here(&mut self, state_dir: &Path) -> Result<()> {
        if let Some(ip) = self.held_ip.take() {
            crate::migration::switch::route_container_locally(ip).await?;
            self.holding = Some(ip);
        }
        if self.forwarded_via.take().is_some() {
            // Its nftables commits stay off the freeze; if the agent dies first, the
            // sweeper removes it (the container runs here).
            let (state_dir, id) = (state_dir.to_path_buf(), self.container.id.clone());
            tokio::spawn(async move {
                for record in ForwardRecord::load_all(&state_dir) {
                    if record.container_id == id {
                        if let Err(e) = record.remove(&state_dir, true).await {
                            tracing::warn!("the forwarding of a returned container: {e:#}");
                        }
                    }
                }
            });
        }
        Ok(())
    }

    pub fn discard_archive(&mut self) {
        if let Some(path) = self.archive.take() {
            if let Err(e) = crate::files::remove_if_present(&path) {
                tracing::warn!("could not remove {}: {e}", path.display());
            }
        }
    }

    /// Carries out `action` ([`ownership`]). Returns whether the migration is still kept.
    pub async fn apply(
        &mut self,
        action: DestinationAction,
        host: &impl DestinationActions,
    ) -> Result<bool> {
        if self.done {
            return Ok(false);
        }
        match action {
            DestinationAction::Keep | DestinationAction::Wait
                if self.pages_pending && self.pages.is_none() =>
            {
                // Restored post-copy by an agent that is gone: nothing here knows whether
                // its memory all arrived, so it must not run on.
                tracing::error!(container = %self.container.name, "post-copy restore without a watcher (the agent restarted): stopping the container");
                host.stop_container(&self.container.id).await?;
                self.discard(host).await?;
                Ok(false)
            }
            DestinationAction::Keep => {
                // It runs: its sockets exist and the archive is of no use any more.
                self.release_held_ip(host, true).await?;
                self.discard_archive();
                self.save()?;
                Ok(true)
            }
            DestinationAction::Wait => {
                self.save()?;
                Ok(true)
            }
            DestinationAction::Discard => {
                self.discard(host).await?;
                Ok(false)
            }
            DestinationAction::Reconcile => {
                if self.restore_finished_without_us(host).await? {
                    // A replica stays one: only the source's `Resume` lets it run.
                    self.stage = if self.replica {
                        DestinationStage::Replica
                    } else {
                        DestinationStage::Owns
                    };
                    tracing::info!(container = %self.container.name, stage = ?self.stage, "a restore finished while the agent was down");
                    Box::pin(self.apply(ownership::on_restart(self.stage), host)).await
                } else {
                    self.discard(host).await?;
                    Ok(false)
                }
            }
        }
    }

    /// How long a restore of this migration's archive may take, at most.
    pub fn restore_window(&self) -> Duration {
        let archive_bytes = self
            .archive
            .as_ref()
            .and_then(|a| std::fs::metadata(a).ok())
            .map_or(0, |m| m.len());
        LATE_RESTORE_WAIT + Duration::from_secs(archive_bytes / LATE_RESTORE_RATE)
    }

    /// Whether podman runs the container although the agent never saw the restore end.
    /// A restore that podman is still working on is waited for a little.
    async fn restore_finished_without_us(&self, host: &impl DestinationActions) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + self.restore_window();
        loop {
            if host.container(&self.container.id).await? == Some(true) {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The incoming migrations this agent knows, by migration ID. Each sits behind its own
/// lock, held while a request of it is handled, so a `Resolve` from another connection
/// waits for a restore under way to end and then sees its outcome.
#[derive(Default)]
pub struct Registry {
    /// By migration ID: the container's ID (readable while the migration is locked) and
    /// the migration.
    migrations: std::sync::Mutex<HashMap<String, (String, Shared)>>,
}

pub type Shared = Arc<tokio::sync::Mutex<IncomingMigration>>;

impl Registry {
    /// Adds a migration; refused if it, or another one of the same container, is known.
    pub fn insert(&self, migration: IncomingMigration) -> Result<Shared, Busy> {
        let mut all = self.migrations.lock().expect("registry lock");
        let container = migration.container.id.clone();
        if all.contains_key(&migration.migration_id) || all.values().any(|(c, _)| *c == container) {
            return Err(Busy(Box::new(migration)));
        }
        let id = migration.migration_id.clone();
        let shared = Arc::new(tokio::sync::Mutex::new(migration));
        all.insert(id, (container, shared.clone()));
        Ok(shared)
    }

    pub fn get(&self, migration_id: &str) -> Option<Shared> {
        self.migrations
            .lock()
            .expect("registry lock")
            .get(migration_id)
            .map(|(_, m)| m.clone())
    }

    pub fn remove(&self, migration_id: &str) {
        self.migrations
            .lock()
            .expect("registry lock")
            .remove(migration_id);
    }

    /// Answers `Resolve`: the owner says so; anything else is fenced first.
    pub async fn resolve(
        &self,
        migration_id: &str,
        host: &impl DestinationActions,
    ) -> Result<Verdict> {
        let Some(shared) = self.get(migration_id) else {
            // Never known, or discarded already: no copy here, and none can start (a
            // restore needs the migration's own connection and archive).
            return Ok(Verdict::Fenced);
        };
        let mut migration = shared.lock().await;
        let (action, verdict) = ownership::resolve(migration.stage);
        if !migration.apply(action, host).await? {
            self.remove(migration_id);
        }
        Ok(verdict)
    }
}

impl IncomingMigration {
    /// Answers `Resume`: a replica whose memory is all here becomes this host's (journaled
    /// first: the decision point), then runs. One resumed already is resumed again (a
    /// SIGCONT to a running process does nothing).
    pub async fn resume(
        &mut self,
        host: &impl DestinationActions,
        state_dir: &Path,
    ) -> Result<(), ResumeError> {
        if !ownership::may_resume(self.stage) || self.done {
            return Err(ResumeError::Gone);
        }
        if self.pages_pending {
            return Err(ResumeError::Other(anyhow::anyhow!(
                "the memory of {} is not all here yet",
                self.container.name
            )));
        }
        self.enter(DestinationStage::Owns)?;
        host.resume_container(&self.container.id, self.cgroup.as_deref())
            .await?;
        self.route_here(state_dir).await?;
        Ok(self.save()?)
    }
}

/// Why a `Resume` did not let a copy run.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// No copy of the migration is here to run: it was fenced, or its memory could not all
    /// arrive.
    #[error("no copy of this migration is here to run")]
    Gone,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The migration [`Registry::insert`] refused.
#[derive(Debug, thiserror::Error)]
#[error("container {} is already migrating to or from this host", .0.container.name)]
pub struct Busy(pub Box<IncomingMigration>);

/// Carries out [`ownership::on_restart`] for the migrations a previous run of the agent
/// left; the ones it keeps (this host owns them) go into `registry`. Returns a line per
/// migration it handled.
pub async fn recover(
    state_dir: &Path,
    host: &impl DestinationActions,
    registry: &Registry,
) -> Result<Vec<String>> {
    let mut report = Vec::new();
    match crate::files::remove_torn_writes(&journal_dir(state_dir)) {
        Ok(0) => {}
        Ok(n) => report.push(format!("{n} journal write(s) cut short by a crash removed")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report.push(format!("could not look for torn journal writes: {e}")),
    }
    for journaled in list(state_dir) {
        let migration = match journaled {
            Journaled::Readable(m) => *m,
            Journaled::Unreadable { path, error } => {
                tracing::error!(journal = %path.display(), "unreadable migration journal: {error}");
                report.push(format!(
                    "{}: unreadable migration journal left for a look: {error}",
                    path.display()
                ));
                continue;
            }
        };
        let (id, stage, name) = (
            migration.migration_id.clone(),
            migration.stage,
            migration.container.name.clone(),
        );
        let shared = match registry.insert(migration) {
            Ok(shared) => shared,
            Err(busy) => {
                report.push(format!(
                    "{}: {busy}; journal left for a look",
                    busy.0.journal.display()
                ));
                continue;
            }
        };
        let mut migration = shared.lock().await;
        if migration.pages_pending {
            report.push(host.take_over_pages(state_dir, &shared, &mut migration));
        }
        let kept = match migration.apply(ownership::on_restart(stage), host).await {
            Ok(true) => {
                report.push(format!(
                    "{name}: runs here; kept until its source settles the migration"
                ));
                true
            }
            Ok(false) => {
                report.push(format!(
                    "{name}: incoming migration left {stage:?} by a previous run wound down"
                ));
                false
            }
            Err(e) => {
                // Kept as it is: a Resolve, or the next start, tries again.
                tracing::error!(container = %name, "could not recover the incoming migration: {e:#}");
                report.push(format!(
                    "{name}: incoming migration left {stage:?}; recovering it failed: {e:#}"
                ));
                true
            }
        };
        if !kept {
            registry.remove(&id);
        }
    }
    Ok(report)
}
