//! The source's side of a migration that cannot go on as planned: after a failure, a
//! cancel, or a crash of the process that ran it. [`settle`] carries out
//! [`ownership::source_action`]: roll back (undo everything, the container runs here
//! again), roll forward (the destination runs it: switch the traffic, remove the copy
//! here), or, while the destination has not answered, keep the container stopped and say
//! the migration is in doubt. The same code serves `agent-client`, `agent-server`'s
//! adopter and `agent-client cleanup`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use super::journal::{self, Journal, JournalRecord};
use super::ownership::{self, SourceAction, SourceStage, Verdict};
use super::{phases, Progress, Undo};
use crate::auth::Token;
use crate::podman::PodmanClient;
use crate::remote::RemoteAgent;

/// What resolving a migration needs of this host.
pub struct SourceHost<'a> {
    pub podman: &'a PodmanClient,
    pub token: &'a Token,
    pub state_dir: &'a Path,
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

    /// Records how to undo a change, durably, before the change is made.
    pub fn push(&mut self, undo: Undo) -> Result<()> {
        self.record.steps.push(undo);
        self.save()
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
}

/// Resolves the migration of `log` as [`ownership::source_action`] says, asking the
/// destination for up to `patience` where its answer decides.
pub async fn settle(
    log: &mut UndoLog,
    host: &SourceHost<'_>,
    patience: Duration,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Resolution {
    let stage = log.record.stage;
    let mut verdict = None;
    let mut unanswered = String::new();
    if stage == SourceStage::RestoreRequested {
        match ask(&log.record, host.token, patience).await {
            Ok(answer) => verdict = Some(answer),
            Err(e) => unanswered = format!("{e:#}"),
        }
    }
    match ownership::source_action(stage, verdict) {
        SourceAction::RollBack => roll_back(log, host, progress).await,
        SourceAction::RollForward => {
            if let Err(e) = log.enter(SourceStage::DestinationOwns) {
                return Resolution::InDoubt {
                    reason: format!("{e:#}"),
                };
            }
            let mut warnings = match &log.record.switch {
                Some(plan) => match phases::switch_traffic(plan, host.state_dir).await {
                    Ok(()) => Vec::new(),
                    Err(e) => vec![format!("could not switch the traffic: {e:#}")],
                },
                None => Vec::new(),
            };
            warnings.extend(release_source(log, host, None).await);
            Resolution::RolledForward { warnings }
        }
        SourceAction::Ask => Resolution::InDoubt {
            reason: format!(
                "destination {} did not say who owns {}: {unanswered}",
                log.record.destination, log.record.container
            ),
        },
    }
}

/// Asks the destination who owns the migration, on fresh connections (the migration's own
/// may be mid-frame or dead), until it answers or `patience` runs out.
async fn ask(record: &JournalRecord, token: &Token, patience: Duration) -> Result<Verdict> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let answer = async {
            let mut agent = RemoteAgent::connect(&record.destination, token).await?;
            let verdict = agent.resolve(&record.migration_id).await?;
            let _ = agent.finish().await;
            anyhow::Ok(verdict)
        }
        .await;
        match answer {
            Ok(verdict) => return Ok(verdict),
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
    host: &SourceHost<'_>,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Resolution {
    let mut problems = Vec::new();
    let mut failed = Vec::new();
    while let Some(step) = log.record.steps.last().cloned() {
        progress(Progress::RollingBack(step.to_string()));
        let result = match &step {
            Undo::RestartOnSource { container, archive } => {
                phases::restart_on_source(host.podman, container, archive).await
            }
            Undo::RemoveFile(path) => crate::files::remove_if_present(path).map_err(Into::into),
            Undo::RemoveContainerRoute(ip) => phases::route_container_locally(*ip).await,
        };
        if let Err(e) = result {
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

/// The destination runs the container: remove the stopped source copy and the migration's
/// files, and let the destination forget the migration (on `remote`, the migration's own
/// connection, if it is still good). Returns warnings: nothing here may undo the
/// migration. The journal stays until the destination has heard, so that it can be told
/// later.
pub async fn release_source(
    log: &mut UndoLog,
    host: &SourceHost<'_>,
    remote: Option<&mut RemoteAgent>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let container = log.record.container_id.clone();
    match host.podman.find(&container).await {
        Ok(Some(_)) => {
            if let Err(e) = host.podman.remove(&container).await {
                warnings.push(format!(
                    "could not remove the source copy of {}: {e}",
                    log.record.container
                ));
            }
        }
        Ok(None) => {}
        Err(e) => warnings.push(format!("could not look for the source copy: {e}")),
    }
    let files: Vec<PathBuf> = log
        .record
        .steps
        .iter()
        .filter_map(|s| match s {
            Undo::RemoveFile(path) => Some(path.clone()),
            _ => None,
        })
        .collect();
    for path in files {
        if let Err(e) = crate::files::remove_if_present(&path) {
            warnings.push(format!("could not remove {}: {e}", path.display()));
        }
    }
    log.record.steps.clear();
    let told = match remote {
        Some(agent) => agent.finish().await,
        None => {
            async {
                let mut agent = RemoteAgent::connect(&log.record.destination, host.token).await?;
                agent.settle(&log.record.migration_id).await?;
                agent.finish().await
            }
            .await
        }
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

/// Resolves the migrations whose process died; returns one line per migration saying what
/// was done. `destination_lost`: the operator declares the destination gone for good, so
/// a migration in doubt is rolled back without its answer.
pub async fn recover_abandoned(host: &SourceHost<'_>, destination_lost: bool) -> Vec<String> {
    let mut report = Vec::new();
    for entry in journal::list(host.state_dir)
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
        });
    }
    report
}
