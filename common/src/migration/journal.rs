//! The source's journal of a running migration: its undo steps on disk, in a file the
//! migrating process keeps locked. Every change appends the whole record as one JSON line
//! and readers take the last complete one, so a process killed mid-write leaves the
//! previous state readable (and the lock stays on the one file). When that process dies, the lock goes with it, and
//! [`recover_abandoned`] (run by `agent-client cleanup`) finishes the job: it restarts the
//! container on the source, or, if the destination had already taken over, removes the
//! stopped source copy.

use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{Undo, UndoLog};
use crate::podman::PodmanClient;

pub fn journals_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journals")
}

/// What a journal file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalRecord {
    pub container: String,
    pub destination: String,
    /// The destination confirmed it runs the container.
    pub taken_over: bool,
    pub steps: Vec<Undo>,
}

/// The open, locked journal of the migration this process runs.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    container: String,
    destination: String,
    pub(super) taken_over: bool,
}

impl Journal {
    pub fn create(state_dir: &Path, container: &str, destination: &str) -> Result<Self> {
        let dir = journals_dir(state_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join(format!("{:016x}.json", rand::random::<u64>()));
        let file = File::options()
            .append(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("create {}", path.display()))?;
        file.lock()
            .with_context(|| format!("lock {}", path.display()))?;
        let journal = Self {
            path,
            file,
            container: container.to_string(),
            destination: destination.to_string(),
            taken_over: false,
        };
        journal.save(&[])?;
        Ok(journal)
    }

    pub(super) fn save(&self, steps: &[Undo]) -> Result<()> {
        let record = JournalRecord {
            container: self.container.clone(),
            destination: self.destination.clone(),
            taken_over: self.taken_over,
            steps: steps.to_vec(),
        };
        let mut line = serde_json::to_vec(&record)?;
        line.push(b'\n');
        (&self.file).write_all(&line)?;
        Ok(())
    }

    pub(super) fn delete(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("could not remove {}: {e}", self.path.display());
        }
    }
}

/// A migration that has a journal on this host.
#[derive(Debug, Clone, Serialize)]
pub struct JournalEntry {
    pub path: PathBuf,
    pub record: Option<JournalRecord>,
    /// Its process still runs (it holds the lock).
    pub running: bool,
}

/// The migrations with a journal here: running ones, and abandoned ones their process left.
pub fn list(state_dir: &Path) -> Vec<JournalEntry> {
    let Ok(entries) = std::fs::read_dir(journals_dir(state_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<JournalEntry> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|path| {
            let file = File::open(&path).ok()?;
            let running = matches!(file.try_lock(), Err(TryLockError::WouldBlock));
            let record = std::fs::read_to_string(&path).ok().and_then(|text| {
                text.lines()
                    .rev()
                    .find_map(|line| serde_json::from_str(line).ok())
            });
            Some(JournalEntry {
                path,
                record,
                running,
            })
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Finishes the migrations whose process died; returns one line per migration saying what
/// was done (or what failed).
pub async fn recover_abandoned(state_dir: &Path, podman: &PodmanClient) -> Vec<String> {
    let mut report = Vec::new();
    for entry in list(state_dir).into_iter().filter(|e| !e.running) {
        let Ok(file) = File::options().append(true).open(&entry.path) else {
            continue;
        };
        // Lost a race with another cleanup, or the migration just started.
        if file.try_lock().is_err() {
            continue;
        }
        let Some(record) = entry.record else {
            report.push(format!(
                "{}: unreadable migration journal removed",
                entry.path.display()
            ));
            let _ = std::fs::remove_file(&entry.path);
            continue;
        };
        let line = recover(podman, entry.path, file, record).await;
        report.push(line);
    }
    report
}

async fn recover(
    podman: &PodmanClient,
    path: PathBuf,
    file: File,
    record: JournalRecord,
) -> String {
    let mut steps = record.steps;
    let what = if record.taken_over {
        // The destination runs the container: never restart it here. What remains is the
        // stopped source copy, the archive, and a half-made switch of traffic (complete
        // once its forward record exists; then the sweeper of agent-server owns it).
        let switched = steps
            .iter()
            .any(|s| matches!(s, Undo::ForgetForwarding(p) if p.exists()));
        steps.retain(|s| match s {
            Undo::RemoveFile(_) => true,
            Undo::RestartOnSource { .. } | Undo::DiscardOnDestination => false,
            _ => !switched,
        });
        if let Ok(Some(source_copy)) = podman.find(&record.container).await {
            if !source_copy.running {
                if let Err(e) = podman.remove(&record.container).await {
                    return format!(
                        "{}: could not remove the source copy: {e}",
                        record.container
                    );
                }
            }
        }
        "the destination had taken over: source copy and leftovers removed"
    } else {
        // The destination drops its part by itself when the connection closes.
        steps.retain(|s| *s != Undo::DiscardOnDestination);
        "rolled back: the container runs here again"
    };
    let mut log = UndoLog {
        steps,
        journal: Some(Journal {
            path,
            file,
            container: record.container.clone(),
            destination: record.destination.clone(),
            taken_over: record.taken_over,
        }),
    };
    let errors = log.unwind(podman, None, &|_| {}).await;
    if errors.is_empty() {
        format!(
            "{}: migration to {} was abandoned; {what}",
            record.container, record.destination
        )
    } else {
        format!(
            "{}: migration to {} was abandoned; cleaning up failed: {}",
            record.container,
            record.destination,
            errors.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_is_running_while_its_process_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::create(dir.path(), "web", "h2:7878").unwrap();
        let steps = [Undo::RemoveFile("/tmp/x.tar".into())];
        journal.save(&steps).unwrap();
        let listed = list(dir.path());
        assert_eq!(listed.len(), 1);
        assert!(listed[0].running);
        let record = listed[0].record.as_ref().unwrap();
        assert_eq!(record.container, "web");
        assert_eq!(record.steps, steps);
        assert!(!record.taken_over);

        // A write cut short by a kill leaves the previous record readable.
        (&journal.file)
            .write_all(b"{\"container\":\"web\",\"desti")
            .unwrap();
        assert_eq!(list(dir.path())[0].record.as_ref().unwrap().steps, steps);

        drop(journal); // as when the process dies: the lock goes, the file stays
        let listed = list(dir.path());
        assert_eq!(listed.len(), 1);
        assert!(!listed[0].running);
    }
}
