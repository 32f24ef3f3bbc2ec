//! The source's side of a migration that cannot go on as planned: after a failure, a
//! cancel, or a crash of the process that ran it. [`settle`] carries out
//! [`ownership::source_action`]: roll back (undo everything, the container runs here
//! again), roll forward (the destination runs it: switch the traffic, remove the copy
//! here), or, while the destination has not answered, keep the container stopped and say
//! the migration is in doubt. The same code serves `agent-client`, `agent-server`'s
//! adopter and `agent-client cleanup`.

pub mod journal;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::engine::podman::PodmanClient;
use crate::migration::ownership::{self, SourceAction, SourceStage};
use crate::migration::report::{Progress, Resolution};
use crate::migration::switch::{self, SwitchPlan};
use crate::protocol::ErrorCode;
use crate::protocol::HoldReport;
use crate::protocol::Verdict;
use crate::session::auth::Token;
use crate::session::remote::{RemoteAgent, RemoteError};
use journal::{Journal, JournalRecord, Undo};

/// What resolving a migration does to this host and asks of the destination, one call per
/// step: [`SourceHost`] is the real one; the unit tests (`tests.rs`) use a fake world that can
/// crash at any step.
#[allow(async_fn_in_trait)] // used with concrete types only, never as `dyn`
pub trait SourceActions {
    fn state_dir(&self) -> &Path;
    /// The destination's answer to `Resolve`, asked for up to `patience`.
    async fn ask(&self, record: &JournalRecord, patience: Duration) -> Result<Verdict>;
    async fn undo(&self, step: &Undo) -> Result<()>;
    /// Also lets the held packets through; says what the hold did, if this process held
    /// them, and what `then` returned ([`switch::switch_traffic`]).
    async fn switch_traffic<T>(
        &self,
        plan: &SwitchPlan,
        then: impl Future<Output = T>,
    ) -> (Result<Option<HoldReport>>, T);
    /// New connections to the published ports follow the container, and the forward record
    /// is written ([`switch::forward_new_connections`]).
    async fn forward_new_connections(&self, plan: &SwitchPlan) -> Result<()>;
    /// Removes the stopped source copy (none is fine).
    async fn remove_source_copy(&self, container_id: &str) -> Result<()>;
    /// Tells the destination, on a connection of its own, that the source copy is gone.
    async fn settle_destination(&self, record: &JournalRecord) -> Result<()>;
    /// Waits, on a connection of its own, until the destination has every page of a
    /// post-copy migration (or says the transfer failed).
    async fn pages_arrived(&self, record: &JournalRecord) -> Result<()>;
    /// Whether the processes CRIU held here for a lazy checkpoint live on.
    fn held_processes_alive(&self, record: &JournalRecord) -> bool;
    /// Asks the destination, for up to `patience`, to resume its replica:
    /// [`Verdict::DestinationOwns`] once it runs, [`Verdict::Fenced`] if it has none.
    async fn resume(&self, record: &JournalRecord, patience: Duration) -> Result<Verdict>;
}

/// This host, and its token for the destination.
pub struct SourceHost<'a> {
    pub podman: &'a PodmanClient,
    pub token: &'a Token,
    pub state_dir: &'a Path,
}

impl SourceActions for SourceHost<'_> {
    fn state_dir(&self) -> &Path {
        self.state_dir
    }

    async fn ask(&self, record: &JournalRecord, patience: Duration) -> Result<Verdict> {
        let destination = &record.destination;
        with_patience(destination, patience, || async {
            let mut agent = RemoteAgent::connect(destination, self.token).await?;
            let verdict = agent.resolve(&record.migration_id).await?;
            let _ = agent.finish().await;
            Ok(verdict)
        })
        .await
    }

    fn held_processes_alive(&self, record: &JournalRecord) -> bool {
        held_processes_alive(record)
    }

    async fn resume(&self, record: &JournalRecord, patience: Duration) -> Result<Verdict> {
        let destination = &record.destination;
        with_patience(destination, patience, || async {
            let mut agent = RemoteAgent::connect(destination, self.token).await?;
            let resumed = agent.resume(&record.migration_id).await;
            let verdict = match resumed {
                Ok(()) => Verdict::DestinationOwns,
                Err(e) => match e.downcast_ref::<RemoteError>() {
                    Some(refused) if refused.code == ErrorCode::ReplicaGone => Verdict::Fenced,
                    _ => return Err(e),
                },
            };
            let _ = agent.finish().await;
            Ok(verdict)
        })
        .await
    }

    async fn undo(&self, step: &Undo) -> Result<()> {
        match step {
            Undo::RestartOnSource { container, archive } => {
                restart_on_source(self.podman, container, archive).await
            }
            Undo::RemoveFile(path) => Ok(crate::files::remove_if_present(path)?),
            Undo::RemoveContainerRoute(ip) => switch::route_container_locally(*ip).await,
            Undo::ReleaseHold(ip) => crate::kernel::hold::release(*ip).await.map(drop),
            Undo::Thaw(cgroup) => {
                let cgroup = cgroup.clone();
                tokio::task::spawn_blocking(move || crate::kernel::freezer::thaw(&cgroup)).await?
            }
            Undo::StopPageServer { server, held } => {
                crate::engine::lazy_pages::stop_serving(*server, held.as_deref()).await
            }
            Undo::Unguard(server) => crate::engine::lazy_pages::unguard(*server).await,
            Undo::FenceReplica {
                destination,
                migration_id,
            } => {
                let fenced = with_patience(destination, Duration::ZERO, || async {
                    let mut agent = RemoteAgent::connect(destination, self.token).await?;
                    let verdict = agent.resolve(migration_id).await?;
                    let _ = agent.finish().await;
                    Ok(verdict)
                })
                .await?;
                anyhow::ensure!(
                    fenced == Verdict::Fenced,
                    "{destination} says it runs the container"
                );
                Ok(())
            }
        }
    }

    async fn switch_traffic<T>(
        &self,
        plan: &SwitchPlan,
        then: impl Future<Output = T>,
    ) -> (Result<Option<HoldReport>>, T) {
        switch::switch_traffic(plan, then).await
    }

    async fn forward_new_connections(&self, plan: &SwitchPlan) -> Result<()> {
        switch::forward_new_connections(plan, self.state_dir).await
    }

    async fn remove_source_copy(&self, container_id: &str) -> Result<()> {
        if self.podman.find(container_id).await?.is_some() {
            self.podman.remove(container_id).await?;
        }
        Ok(())
    }

    async fn settle_destination(&self, record: &JournalRecord) -> Result<()> {
        let mut agent = RemoteAgent::connect(&record.destination, self.token).await?;
        agent.settle(&record.migration_id).await?;
        agent.finish().await
    }

    async fn pages_arrived(&self, record: &JournalRecord) -> Result<()> {
        let mut agent = RemoteAgent::connect(&record.destination, self.token).await?;
        agent
            .await_pages(&record.migration_id, PAGES_PATIENCE)
            .await?;
        agent.finish().await
    }
}

/// The migration's record, mirrored to its journal on every change.
#[derive(Debug)]
pub struct UndoLog {
    pub record: JournalRecord,
    journal: Option<Journal>,
}

impl UndoLog {
    /// Journals a new migration; refused while another one of the container is unresolved.
    pub fn create(state_dir: &Path, record: JournalRecord) -> Result<Self> {
        let journal = Journal::create(state_dir, &record)?;
        Ok(Self {
            record,
            journal: Some(journal),
        })
    }

    /// Records how to undo the freeze and enters [`SourceStage::Frozen`], in one durable
    /// write (it is part of the freeze).
    /// Journals steps to undo before the phase does them, without changing the stage.
    pub fn register(&mut self, undo: impl IntoIterator<Item = Undo>) -> Result<()> {
        self.record.steps.extend(undo);
        self.save()
    }

    pub fn freeze(&mut self, undo: impl IntoIterator<Item = Undo>) -> Result<()> {
        self.record.steps.extend(undo);
        self.enter(SourceStage::Frozen)
    }

    /// Moves to `stage`, durably, before the step it names.
    pub fn enter(&mut self, stage: SourceStage) -> Result<()> {
        self.record.stage = stage;
        self.save()
    }

    pub fn set_switch_plan(&mut self, plan: SwitchPlan) -> Result<()> {
        self.record.switch = Some(plan);
        self.save()
    }

    /// The undo steps that `wanted` picks, oldest first.
    pub fn steps_where(&self, wanted: impl Fn(&Undo) -> bool) -> Vec<Undo> {
        self.record
            .steps
            .iter()
            .filter(|s| wanted(s))
            .cloned()
            .collect()
    }

    /// A step that is done by other means (CRIU's page server ended): no undo needs it.
    pub fn drop_step(&mut self, done: &Undo) -> Result<()> {
        self.record.steps.retain(|s| s != done);
        self.save()
    }

    fn save(&self) -> Result<()> {
        match &self.journal {
            Some(journal) => journal.save(&self.record),
            None => Ok(()),
        }
    }

    /// Nothing is left to do: the journal goes.
    fn close(&mut self) -> Result<()> {
        match self.journal.take() {
            Some(journal) => journal.delete(),
            None => Ok(()),
        }
    }
}

/// Resolves the migration of `log` as [`ownership::source_action`] says, asking the
/// destination for up to `patience` where its answer decides.
pub async fn settle(
    log: &mut UndoLog,
    host: &impl SourceActions,
    patience: Duration,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Resolution {
    let stage = log.record.stage;
    let mut unanswered = String::new();
    let action = match stage {
        SourceStage::RestoreRequested => {
            let verdict = match host.ask(&log.record, patience).await {
                Ok(answer) => Some(answer),
                Err(e) => {
                    unanswered = format!("{e:#}");
                    None
                }
            };
            ownership::source_action(stage, verdict)
        }
        SourceStage::Streaming => match after_streaming(log, host, patience).await {
            Ok((action, why)) => {
                unanswered = why;
                action
            }
            Err(e) => {
                return Resolution::InDoubt {
                    reason: format!("{e:#}"),
                }
            }
        },
        _ => ownership::source_action(stage, None),
    };
    match action {
        SourceAction::RollBack => roll_back(log, host, progress).await,
        SourceAction::RollForward => {
            if let Err(e) = log.enter(SourceStage::DestinationOwns) {
                return Resolution::InDoubt {
                    reason: format!("{e:#}"),
                };
            }
            let (_, mut warnings, ()) = switch_traffic(log, host, async {}).await;
            warnings.extend(forward_new_connections(log, host).await);
            warnings.extend(release_source(log, host, None).await);
            Resolution::RolledForward { warnings }
        }
        SourceAction::Ask => Resolution::InDoubt {
            reason: format!(
                "destination {} did not say who owns {}: {unanswered}",
                log.record.destination, log.record.container
            ),
        },
        SourceAction::Lost => {
            // Nothing runs it: its address is routed here again, and the rest goes.
            let mut warnings = vec![format!(
                "the processes here are gone and {} has no replica to resume",
                log.record.destination
            )];
            let routes = log.steps_where(|s| matches!(s, Undo::RemoveContainerRoute(_)));
            warnings.extend(undo_each(host, routes).await);
            warnings.extend(release_source(log, host, None).await);
            Resolution::Lost { warnings }
        }
    }
}

/// [`ownership::after_streaming`], carried out as far as it asks: CRIU's page server here
/// is stopped first (until it is gone it may still end the processes); then, if the
/// processes did not survive it, the destination is asked to resume its replica. Returns
/// the action, and why the destination did not answer if it did not.
async fn after_streaming(
    log: &mut UndoLog,
    host: &impl SourceActions,
    patience: Duration,
) -> Result<(SourceAction, String)> {
    let serving = log.steps_where(|s| matches!(s, Undo::StopPageServer { .. }));
    for step in serving {
        host.undo(&step).await?;
        log.drop_step(&step)?;
    }
    let alive = host.held_processes_alive(&log.record);
    let mut unanswered = String::new();
    let resumed = if alive {
        None
    } else {
        match host.resume(&log.record, patience).await {
            Ok(verdict) => Some(verdict),
            Err(e) => {
                unanswered = format!("{e:#}");
                None
            }
        }
    };
    Ok((ownership::after_streaming(alive, resumed), unanswered))
}

/// How long one `Resolve` (or `Resume`) may take: the destination answers once a restore
/// under way has ended, so this is generous; a destination slower than this is asked
/// again.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Puts one question to the destination at `destination` (`attempt`, on a fresh
/// connection: the migration's own may be mid-frame or dead) until it answers or
/// `patience` runs out.
async fn with_patience<T, F>(
    destination: &str,
    patience: Duration,
    attempt: impl Fn() -> F,
) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let answer = tokio::time::timeout(RESOLVE_TIMEOUT, attempt())
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "{destination} did not answer within {RESOLVE_TIMEOUT:?}"
                ))
            });
        match answer {
            Ok(answer) => return Ok(answer),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) => tracing::info!("asking the destination again: {e:#}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs the undo steps newest first. A container that cannot be started again stops the
/// unwinding there: the steps before it (its archive among them) stay, so the last copy
/// is never removed. Other failed steps stay journaled for `agent-client cleanup`.
async fn roll_back(
    log: &mut UndoLog,
    host: &impl SourceActions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Resolution {
    let mut problems = Vec::new();
    let mut failed = Vec::new();
    while let Some(step) = log.record.steps.last().cloned() {
        progress(Progress::RollingBack(step.to_string()));
        if let Err(e) = host.undo(&step).await {
            tracing::warn!(?step, "undo failed: {e:#}");
            problems.push(format!("{step}: {e:#}"));
            if matches!(step, Undo::RestartOnSource { .. }) {
                log.record.steps.extend(failed);
                let _ = log.save();
                return Resolution::RolledBack { problems };
            }
            failed.insert(0, step);
        }
        log.record.steps.pop();
        // A step leaves the journal only once it has run.
        let mut remaining = log.record.steps.clone();
        remaining.extend(failed.iter().cloned());
        let journaled = JournalRecord {
            steps: remaining,
            ..log.record.clone()
        };
        if let Some(journal) = &log.journal {
            if let Err(e) = journal.save(&journaled) {
                problems.push(format!("{e:#}"));
            }
        }
    }
    log.record.steps = failed;
    if log.record.steps.is_empty() {
        if let Err(e) = log.close() {
            problems.push(format!("{e:#}"));
        }
    } else {
        let _ = log.save();
    }
    Resolution::RolledBack { problems }
}

/// The destination runs the container: route its traffic there as the journal's plan says,
/// running `then` once the held packets are on their way ([`switch::switch_traffic`]).
/// Returns what the packet hold did, warnings (nothing here may undo the migration), and
/// what `then` returned.
pub async fn switch_traffic<T>(
    log: &UndoLog,
    host: &impl SourceActions,
    then: impl Future<Output = T>,
) -> (Option<HoldReport>, Vec<String>, T) {
    let Some(plan) = &log.record.switch else {
        return (None, Vec::new(), then.await);
    };
    match host.switch_traffic(plan, then).await {
        (Ok(held), then) => (held, Vec::new(), then),
        (Err(e), then) => (
            None,
            vec![format!("could not switch the traffic: {e:#}")],
            then,
        ),
    }
}

/// Then new connections: as the journal's plan says. Returns warnings: nothing here may
/// undo the migration.
pub async fn forward_new_connections(log: &UndoLog, host: &impl SourceActions) -> Vec<String> {
    let Some(plan) = &log.record.switch else {
        return Vec::new();
    };
    match host.forward_new_connections(plan).await {
        Ok(()) => Vec::new(),
        Err(e) => vec![format!("could not forward new connections: {e:#}")],
    }
}

/// The destination runs the container: remove the stopped source copy and the migration's
/// files, and let the destination forget the migration (on `remote`, the migration's own
/// connection, if it is still good). Returns warnings: nothing here may undo the
/// migration. The journal stays until the destination has heard, so that it can be told
/// later.
pub async fn release_source(
    log: &mut UndoLog,
    host: &impl SourceActions,
    remote: Option<&mut RemoteAgent>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    // A post-copy page server still runs (its migration's process died): it serves until
    // the destination has every page, and holds podman's lock on the source copy.
    let serving = log.steps_where(|s| matches!(s, Undo::StopPageServer { .. }));
    for step in serving {
        if let Err(e) = host.pages_arrived(&log.record).await {
            warnings.push(format!("post-copy pages: {e:#}"));
        }
        match host.undo(&step).await {
            Ok(()) => {
                let _ = log.drop_step(&step);
            }
            Err(e) => warnings.push(format!("could not {step}: {e:#}")),
        }
    }
    if let Err(e) = host.remove_source_copy(&log.record.container_id).await {
        warnings.push(format!(
            "could not remove the source copy of {}: {e:#}",
            log.record.container
        ));
    }
    // Its files, the hold if switching the traffic did not end it, and the guard of a page
    // server that ended.
    let leftovers = log.steps_where(|s| {
        matches!(
            s,
            Undo::RemoveFile(_) | Undo::ReleaseHold(_) | Undo::Unguard(_)
        )
    });
    warnings.extend(undo_each(host, leftovers).await);
    log.record.steps.clear();
    let told = match remote {
        Some(agent) => agent.finish().await,
        None => host.settle_destination(&log.record).await,
    };
    match told {
        Ok(()) => {
            if let Err(e) = log.close() {
                warnings.push(format!("{e:#}"));
            }
        }
        Err(e) => {
            let _ = log.save();
            warnings.push(format!(
                "destination not told that the source copy is gone ({e:#}); agent-server tells it later"
            ));
        }
    }
    warnings
}

/// Runs each of `steps` where nothing may stop for one that fails; returns what failed.
async fn undo_each(host: &impl SourceActions, steps: Vec<Undo>) -> Vec<String> {
    let mut failed = Vec::new();
    for step in steps {
        if let Err(e) = host.undo(&step).await {
            failed.push(format!("could not {step}: {e:#}"));
        }
    }
    failed
}

/// Resolves the migrations whose process died; returns one line per migration saying what
/// was done. `destination_lost`: the operator declares the destination gone for good, so
/// a migration in doubt is rolled back without its answer.
pub async fn recover_abandoned(host: &impl SourceActions, destination_lost: bool) -> Vec<String> {
    let mut report = Vec::new();
    let unborn = journal::remove_unborn(host.state_dir());
    if unborn > 0 {
        report.push(format!(
            "{unborn} journal(s) of migrations that never started removed"
        ));
    }
    for entry in journal::list(host.state_dir())
        .into_iter()
        .filter(|e| !e.running)
    {
        let Some(journal) = Journal::adopt(&entry.path) else {
            continue; // another adopter took it, or a migration just started
        };
        let Some(mut record) = journal::read(&journal) else {
            report.push(format!(
                "{}: unreadable migration journal; left in place for a look",
                entry.path.display()
            ));
            continue;
        };
        if destination_lost && record.stage == SourceStage::RestoreRequested {
            tracing::warn!(container = %record.container, "destination declared lost: restarting the source copy without its answer");
            record.stage = SourceStage::Frozen;
        }
        let (name, destination) = (record.container.clone(), record.destination.clone());
        let mut log = UndoLog {
            record,
            journal: Some(journal),
        };
        let outcome = settle(&mut log, host, Duration::ZERO, &|_| {}).await;
        if destination_lost && matches!(outcome, Resolution::RolledForward { .. }) {
            // The lost destination cannot be told the source copy is gone: nothing waits
            // for that any more.
            let _ = log.close();
        }
        report.push(match outcome {
            Resolution::RolledBack { problems } if problems.is_empty() => {
                format!("{name}: migration to {destination} was abandoned; rolled back: the container runs here again")
            }
            Resolution::RolledBack { problems } => format!(
                "{name}: migration to {destination} was abandoned; rolling back failed: {}",
                problems.join("; ")
            ),
            Resolution::RolledForward { warnings } => format!(
                "{name}: migration to {destination} was abandoned; the destination had taken over: source copy and leftovers removed{}",
                warnings.iter().map(|w| format!("; {w}")).collect::<String>()
            ),
            Resolution::InDoubt { reason } => format!(
                "{name}: migration to {destination} is in doubt, the container stays stopped here: {reason}. It is asked again; if {destination} is gone for good: agent-client cleanup --destination-lost"
            ),
            Resolution::Lost { warnings } => format!(
                "{name}: post-copy migration to {destination} failed; the container runs on neither host{}",
                warnings.iter().map(|w| format!("; {w}")).collect::<String>()
            ),
        });
    }
    report
}

/// How long the last page of a post-copy migration may take to arrive; a cut link fails
/// it within seconds anyway (the connection's dead-peer timeout).
pub const PAGES_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether the processes a lazy checkpoint held here live on (a record without them: no).
pub fn held_processes_alive(record: &JournalRecord) -> bool {
    record
        .held_init
        .is_some_and(|pid| crate::kernel::process::alive_in(pid, &record.container_id))
}

/// Undo of [`crate::migration::phases::checkpoint`]: bring the container back on the source. The checkpoint kept with
/// the container is tried first (fast); if podman cannot use it, the container is recreated
/// from the exported archive.
pub async fn restart_on_source(
    podman: &PodmanClient,
    container: &str,
    archive: &Path,
) -> Result<()> {
    if let Some(info) = podman.find(container).await? {
        if info.running {
            return Ok(());
        }
        match podman.restore_in_place(container).await {
            Ok(()) => return Ok(()),
            Err(e) if archive.exists() => {
                tracing::warn!("restore in place failed ({e}), restoring from the archive");
                podman.remove(container).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !archive.exists() {
        bail!("container {container} is gone and no checkpoint archive exists");
    }
    podman.restore_import(archive).await?;
    Ok(())
}

#[cfg(test)]
mod tests;
