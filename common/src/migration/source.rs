//! The source's side of a migration that cannot go on as planned: after a failure, a
//! cancel, or a crash of the process that ran it. [`settle`] carries out
//! [`ownership::source_action`]: roll back (undo everything, the container runs here
//! again), roll forward (the destination runs it: switch the traffic, remove the copy
//! here), or, while the destination has not answered, keep the container stopped and say
//! the migration is in doubt. The same code serves `agent-client`, `agent-server`'s
//! adopter and `agent-client cleanup`.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use super::journal::{self, Journal, JournalRecord};
use super::ownership::{self, SourceAction, SourceStage, Verdict};
use super::phases::{self, SwitchPlan};
use super::{Progress, Undo};
use crate::auth::Token;
use crate::hold::HoldReport;
use crate::podman::PodmanClient;
use crate::protocol::ErrorCode;
use crate::remote::{RemoteAgent, RemoteError};

/// What resolving a migration does to this host and asks of the destination, one call per
/// step: [`SourceHost`] is the real one; the unit tests below use a fake world that can
/// crash at any step.
#[allow(async_fn_in_trait)] // used with concrete types only, never as `dyn`
pub trait SourceActions {
    fn state_dir(&self) -> &Path;
    /// The destination's answer to `Resolve`, asked for up to `patience`.
    async fn ask(&self, record: &JournalRecord, patience: Duration) -> Result<Verdict>;
    async fn undo(&self, step: &Undo) -> Result<()>;
    /// Also lets the held packets through; says what the hold did, if this process held
    /// them.
    async fn switch_traffic(&self, plan: &SwitchPlan) -> Result<Option<HoldReport>>;
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
        phases::held_processes_alive(record)
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
                phases::restart_on_source(self.podman, container, archive).await
            }
            Undo::RemoveFile(path) => Ok(crate::files::remove_if_present(path)?),
            Undo::RemoveContainerRoute(ip) => phases::route_container_locally(*ip).await,
            Undo::ReleaseHold(ip) => crate::hold::release(*ip).await.map(drop),
            Undo::Thaw(cgroup) => {
                let cgroup = cgroup.clone();
                tokio::task::spawn_blocking(move || crate::freezer::thaw(&cgroup)).await?
            }
            Undo::StopPageServer { server, held } => {
                crate::lazy_pages::stop_serving(*server, held.as_deref()).await
            }
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

    async fn switch_traffic(&self, plan: &SwitchPlan) -> Result<Option<HoldReport>> {
        phases::switch_traffic(plan, self.state_dir).await
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
            .await_pages(&record.migration_id, phases::PAGES_PATIENCE)
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
    pub fn freeze(&mut self, undo: impl IntoIterator<Item = Undo>) -> Result<()> {
        self.record.steps.extend(undo);
        self.enter(SourceStage::Frozen)
    }

    /// Moves to `stage`, durably, before the step it names.
    pub fn enter(&mut self, stage: SourceStage) -> Result<()> {
        self.record.stage = stage;
        self.save()
    }

    pub fn set_switch_plan(&mut self, plan: phases::SwitchPlan) -> Result<()> {
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

/// How a migration was resolved.
#[derive(Debug)]
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
            let (_, mut warnings) = switch_traffic(log, host).await;
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

/// The destination runs the container: route its traffic there as the journal's plan says.
/// Returns what the packet hold did, and warnings: nothing here may undo the migration.
pub async fn switch_traffic(
    log: &UndoLog,
    host: &impl SourceActions,
) -> (Option<HoldReport>, Vec<String>) {
    let Some(plan) = &log.record.switch else {
        return (None, Vec::new());
    };
    match host.switch_traffic(plan).await {
        Ok(held) => (held, Vec::new()),
        Err(e) => (None, vec![format!("could not switch the traffic: {e:#}")]),
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
    // Its files, and the hold if switching the traffic did not end it.
    let leftovers = log.steps_where(|s| matches!(s, Undo::RemoveFile(_) | Undo::ReleaseHold(_)));
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

#[cfg(test)]
mod tests {
    //! Every source stage, with the destination owning the container or not, reachable or
    //! not, and the process dying before and after every step of its resolution; then
    //! the adopter resolves what is left. At no moment may two copies run, and at the end
    //! exactly one does, with nothing left over.

    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::migration::crash::{Crash, CrashPoint};

    /// Both hosts, as far as the migration is concerned.
    #[derive(Debug, Clone, Default)]
    struct World {
        source_runs: bool,
        source_copy: bool,
        archive: bool,
        blackholed: bool,
        held: bool,
        dest_runs: bool,
        /// Streamed stop-copy: the destination holds a stopped replica, with every page.
        replica: bool,
        /// The processes CRIU held here for the lazy checkpoint live on.
        held_alive: bool,
        dest_fenced: bool,
        dest_settled: bool,
        switched: bool,
        reachable: bool,
        two_copies_seen: bool,
    }

    struct Fake {
        world: Arc<Mutex<World>>,
        crash: CrashPoint,
        state_dir: std::path::PathBuf,
    }

    impl Fake {
        fn new(world: &Arc<Mutex<World>>, state_dir: &Path, crash: Option<Crash>) -> Self {
            Self {
                world: world.clone(),
                crash: CrashPoint::new(crash),
                state_dir: state_dir.to_path_buf(),
            }
        }

        async fn step<T>(&self, effect: impl FnOnce(&mut World) -> Result<T>) -> Result<T> {
            self.crash.step(&self.world, effect).await
        }
    }

    impl SourceActions for Fake {
        fn state_dir(&self) -> &Path {
            &self.state_dir
        }

        async fn ask(&self, _: &JournalRecord, _: Duration) -> Result<Verdict> {
            self.step(|w| {
                anyhow::ensure!(w.reachable, "unreachable");
                if w.dest_runs {
                    Ok(Verdict::DestinationOwns)
                } else {
                    w.dest_fenced = true;
                    w.replica = false;
                    Ok(Verdict::Fenced)
                }
            })
            .await
        }

        fn held_processes_alive(&self, _: &JournalRecord) -> bool {
            self.world.lock().unwrap().held_alive
        }

        async fn resume(&self, _: &JournalRecord, _: Duration) -> Result<Verdict> {
            self.step(|w| {
                anyhow::ensure!(w.reachable, "unreachable");
                if w.replica {
                    w.two_copies_seen |= w.source_runs;
                    w.replica = false;
                    w.dest_runs = true;
                }
                Ok(if w.dest_runs {
                    Verdict::DestinationOwns
                } else {
                    Verdict::Fenced
                })
            })
            .await
        }

        async fn undo(&self, step: &Undo) -> Result<()> {
            let step = step.clone();
            self.step(move |w| {
                match step {
                    Undo::RestartOnSource { .. } => {
                        anyhow::ensure!(w.source_copy || w.archive, "no copy to start");
                        w.two_copies_seen |= w.dest_runs;
                        w.source_runs = true;
                        w.source_copy = true;
                    }
                    Undo::RemoveFile(_) => w.archive = false,
                    Undo::RemoveContainerRoute(_) => w.blackholed = false,
                    Undo::ReleaseHold(_) => w.held = false,
                    Undo::Thaw(_) | Undo::StopPageServer { .. } => {}
                    Undo::FenceReplica { .. } => {
                        anyhow::ensure!(w.reachable, "unreachable");
                        anyhow::ensure!(!w.dest_runs, "the destination runs it");
                        w.replica = false;
                        w.dest_fenced = true;
                    }
                }
                Ok(())
            })
            .await
        }

        async fn pages_arrived(&self, _: &JournalRecord) -> Result<()> {
            Ok(())
        }

        async fn switch_traffic(&self, _: &SwitchPlan) -> Result<Option<HoldReport>> {
            self.step(|w| {
                w.switched = true;
                w.held = false;
                Ok(None)
            })
            .await
        }

        async fn remove_source_copy(&self, _: &str) -> Result<()> {
            self.step(|w| {
                w.source_copy = false;
                w.source_runs = false;
                Ok(())
            })
            .await
        }

        async fn settle_destination(&self, _: &JournalRecord) -> Result<()> {
            self.step(|w| {
                anyhow::ensure!(w.reachable, "unreachable");
                w.dest_settled = true;
                Ok(())
            })
            .await
        }
    }

    fn plan() -> SwitchPlan {
        SwitchPlan {
            container_id: "c".repeat(64),
            container_name: "web".into(),
            container_ip: "10.88.1.2".parse().unwrap(),
            interface: "lmwg-0".into(),
            next_agent: "100.127.0.1:7878".parse().unwrap(),
            ports: Vec::new(),
        }
    }

    /// A migration journaled at `stage`, and the world it left.
    fn journaled(state_dir: &Path, stage: SourceStage, dest_runs: bool) -> (UndoLog, World) {
        let frozen = stage >= SourceStage::Frozen;
        let steps = if frozen {
            vec![
                Undo::RemoveFile("/tmp/lm-test.tar".into()),
                Undo::ReleaseHold("10.88.1.2".parse().unwrap()),
                Undo::RemoveContainerRoute("10.88.1.2".parse().unwrap()),
                Undo::RestartOnSource {
                    container: "web".into(),
                    archive: "/tmp/lm-test.tar".into(),
                },
            ]
        } else {
            Vec::new()
        };
        let log = UndoLog::create(
            state_dir,
            JournalRecord {
                migration_id: "0".repeat(32),
                container: "web".into(),
                container_id: "c".repeat(64),
                destination: "h2:7878".into(),
                stage,
                steps,
                switch: Some(plan()),
                held_init: None,
            },
        )
        .unwrap();
        let world = World {
            source_runs: !frozen,
            source_copy: true,
            archive: frozen,
            blackholed: frozen,
            held: frozen,
            dest_runs,
            reachable: true,
            ..World::default()
        };
        (log, world)
    }

    /// A streamed stop-copy journaled at [`SourceStage::Streaming`]: CRIU's page server
    /// still runs here; the processes it holds live on (`held_alive`) or it ended them; the
    /// destination has a replica with every page (`replica`) or none.
    fn streaming(state_dir: &Path, held_alive: bool, replica: bool) -> (UndoLog, World) {
        let (mut log, mut world) = journaled(state_dir, SourceStage::Streaming, false);
        log.record.steps.extend([
            Undo::StopPageServer {
                server: crate::lazy_pages::PageServer {
                    address: "100.127.0.1".parse().unwrap(),
                    port: 40000,
                },
                held: None,
            },
            Undo::FenceReplica {
                destination: "h2:7878".into(),
                migration_id: "0".repeat(32),
            },
        ]);
        log.save().unwrap();
        // Its archive holds no memory: only the live processes can run again here.
        world.archive = false;
        world.source_copy = held_alive;
        world.held_alive = held_alive;
        world.replica = replica;
        (log, world)
    }

    /// Resolves, dying at `crash`; then the adopter resolves what is left (the destination
    /// reachable again). Returns the world at the end.
    async fn resolve_with(
        stage: SourceStage,
        dest_runs: bool,
        reachable_at_first: bool,
        crash: Option<Crash>,
    ) -> (World, usize) {
        resolve_from(
            |dir| journaled(dir, stage, dest_runs),
            reachable_at_first,
            crash,
        )
        .await
    }

    async fn resolve_from(
        start: impl Fn(&Path) -> (UndoLog, World),
        reachable_at_first: bool,
        crash: Option<Crash>,
    ) -> (World, usize) {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut start) = start(dir.path());
        let stage = log.record.stage;
        start.reachable = reachable_at_first;
        let world = Arc::new(Mutex::new(start));
        let first = Fake::new(&world, dir.path(), crash);
        // Long enough for every step that does not die; the one that does never returns.
        let _ = tokio::time::timeout(
            Duration::from_millis(20),
            settle(&mut log, &first, Duration::ZERO, &|_| {}),
        )
        .await;
        drop(log); // the process is gone, or done: its lock goes
        world.lock().unwrap().reachable = true;
        let adopter = Fake::new(&world, dir.path(), None);
        for _ in 0..3 {
            recover_abandoned(&adopter, false).await;
        }
        assert!(
            journal::list(dir.path()).is_empty(),
            "a journal is left: {stage:?} {crash:?}"
        );
        let end = world.lock().unwrap().clone();
        (end, first.crash.taken())
    }

    fn assert_resolved(end: &World, case: &str) {
        assert!(!end.two_copies_seen, "two copies ran: {case}: {end:?}");
        assert!(
            end.source_runs != end.dest_runs,
            "not exactly one copy: {case}: {end:?}"
        );
        if end.dest_runs {
            assert!(
                !end.source_copy && end.switched && end.dest_settled && !end.archive && !end.held,
                "rolled forward only in part: {case}: {end:?}"
            );
        } else {
            assert!(
                !end.blackholed && !end.archive && !end.held && !end.replica,
                "rolled back only in part: {case}: {end:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_streamed_migration_ends_with_exactly_one_copy_after_a_crash_anywhere() {
        // The processes here outlived CRIU (whatever the replica), or CRIU ended them once
        // every page was on the destination's replica.
        for (held_alive, replica) in [(true, true), (true, false), (false, true)] {
            for reachable in [true, false] {
                let start = |dir: &Path| streaming(dir, held_alive, replica);
                let (_, steps) = resolve_from(start, reachable, None).await;
                for crash in Crash::all(steps) {
                    let (end, _) = resolve_from(start, reachable, crash).await;
                    let case = format!(
                        "streaming held_alive={held_alive} replica={replica} reachable={reachable} {crash:?}"
                    );
                    assert_resolved(&end, &case);
                    assert_eq!(end.dest_runs, !held_alive, "the wrong copy runs: {case}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_crash_before_or_after_any_step_leaves_exactly_one_copy() {
        let cases = [
            (SourceStage::Running, false),
            (SourceStage::Frozen, false),
            (SourceStage::RestoreRequested, false),
            (SourceStage::RestoreRequested, true),
            (SourceStage::DestinationOwns, true),
        ];
        for (stage, dest_runs) in cases {
            for reachable in [true, false] {
                let (_, steps) = resolve_with(stage, dest_runs, reachable, None).await;
                for crash in Crash::all(steps) {
                    let (end, _) = resolve_with(stage, dest_runs, reachable, crash).await;
                    let case =
                        format!("{stage:?} dest_runs={dest_runs} reachable={reachable} {crash:?}");
                    assert_resolved(&end, &case);
                }
            }
        }
    }

    #[tokio::test]
    async fn an_unanswered_destination_keeps_the_container_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut start) = journaled(dir.path(), SourceStage::RestoreRequested, true);
        start.reachable = false;
        let world = Arc::new(Mutex::new(start));
        let host = Fake::new(&world, dir.path(), None);
        let outcome = settle(&mut log, &host, Duration::ZERO, &|_| {}).await;
        assert!(matches!(outcome, Resolution::InDoubt { .. }), "{outcome:?}");
        let now = world.lock().unwrap().clone();
        assert!(!now.source_runs && now.blackholed && now.archive, "{now:?}");
        drop(log);
        assert_eq!(journal::list(dir.path()).len(), 1, "the journal stays");
    }
}
