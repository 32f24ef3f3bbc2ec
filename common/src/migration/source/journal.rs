//! The source's journal of a migration: where it stands in the ownership model, its undo
//! steps and what the switch of traffic needs, in a file the migrating process keeps
//! locked. Every change appends the whole record as one JSON line and syncs it before the
//! step it describes runs; readers take the last complete line, so a process killed
//! mid-write leaves the previous state readable. When that process dies, the lock goes
//! with it, and whoever takes the lock next (`agent-server`'s adopter within seconds, or
//! `agent-client cleanup`) resolves the migration ([`super::settle`]).

use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::migration::ownership::SourceStage;
use crate::migration::switch::SwitchPlan;

pub fn journals_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journals")
}

/// What a journal file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalRecord {
    pub migration_id: String,
    pub container: String,
    pub container_id: String,
    pub destination: String,
    pub stage: SourceStage,
    pub steps: Vec<Undo>,
    /// How to switch the traffic to the destination, known before the restore request.
    pub switch: Option<SwitchPlan>,
    /// A lazy checkpoint's: the init of the container's processes, which CRIU holds here
    /// while it serves their memory (and ends once the last page has gone).
    #[serde(default)]
    pub held_init: Option<i32>,
}

/// The open, locked journal of a migration this process runs (or has adopted).
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Starts the journal of a new migration of `record.container_id`; refused while
    /// another journal of that container exists (running, or left to be resolved).
    pub fn create(state_dir: &Path, record: &JournalRecord) -> Result<Self> {
        let dir = journals_dir(state_dir);
        crate::files::create_private_dir(&dir)
            .with_context(|| format!("create {}", dir.display()))?;
        // Two clients starting at once must not both see no other journal. Beside the
        // directory, not in it: the directory holds journals only.
        let guard = File::create(state_dir.join("journals.lock"))?;
        guard.lock()?;
        if let Some(other) = list(state_dir).into_iter().find(|j| {
            j.record
                .as_ref()
                .is_some_and(|r| r.container_id == record.container_id)
        }) {
            let how = if other.running {
                "is migrating now"
            } else {
                "has an unresolved migration (agent-server resolves it; see agent-client status)"
            };
            bail!(
                "container {} {how}: {}",
                record.container,
                other.path.display()
            );
        }
        // Written and locked under a name no reader lists, then renamed into place: an
        // adopter never sees it unlocked.
        let path = dir.join(format!("{}.json", record.migration_id));
        let new = dir.join(format!(".{}.new", record.migration_id));
        let file = File::options()
            .append(true)
            .create_new(true)
            .open(&new)
            .with_context(|| format!("create {}", new.display()))?;
        file.lock()
            .with_context(|| format!("lock {}", new.display()))?;
        let journal = Self { path, file };
        journal.save(record)?;
        std::fs::rename(&new, &journal.path)
            .with_context(|| format!("create {}", journal.path.display()))?;
        Ok(journal)
    }

    /// Takes over the journal at `path` if no process holds it.
    pub fn adopt(path: &Path) -> Option<Self> {
        let mut file = File::options().append(true).open(path).ok()?;
        file.try_lock().ok()?;
        // A line torn by a kill is ended, so the next record starts a line of its own.
        let torn = std::fs::read(path)
            .ok()
            .is_some_and(|bytes| bytes.last().is_some_and(|b| *b != b'\n'));
        if torn {
            file.write_all(b"\n").ok()?;
        }
        Some(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends `record` and syncs it to disk.
    pub fn save(&self, record: &JournalRecord) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        (&self.file)
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("write the migration journal {}", self.path.display()))
    }

    pub fn delete(self) -> Result<()> {
        crate::files::remove_if_present(&self.path)
            .with_context(|| format!("remove {}", self.path.display()))
    }
}

/// Removes journals whose process died before it put them in place (see
/// [`Journal::create`]): no migration had started. Returns how many.
pub fn remove_unborn(state_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(journals_dir(state_dir)) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "new"))
        .filter(|p| {
            // Locked: its migration is being created right now.
            File::open(p).is_ok_and(|f| f.try_lock().is_ok())
                && crate::files::remove_if_present(p).is_ok()
        })
        .count()
}

/// A migration that has a journal on this host.
#[derive(Debug, Clone, Serialize)]
pub struct JournalEntry {
    pub path: PathBuf,
    /// `None`: unreadable. Reported, never deleted: it may list the only way back.
    pub record: Option<JournalRecord>,
    /// Its process still runs (it holds the lock).
    pub running: bool,
}

/// The migrations with a journal here: running ones, and ones their process left.
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
            Some(JournalEntry {
                record: read_last_record(&path),
                path,
                running,
            })
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn read_last_record(path: &Path) -> Option<JournalRecord> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
}

/// The record of an adopted journal.
pub fn read(journal: &Journal) -> Option<JournalRecord> {
    read_last_record(&journal.path)
}

/// How to take back one thing a phase did on the source. The destination's part is not
/// here: it follows [`crate::migration::ownership`] on its own.
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
    /// ([`crate::kernel::hold`]): let them through (to wherever it is routed by then).
    ReleaseHold(std::net::Ipv4Addr),
    /// The container's cgroup was frozen here ([`crate::kernel::freezer`]): thaw it.
    Thaw(String),
    /// CRIU serves the container's memory here ([`crate::engine::lazy_pages`]), holding the
    /// processes of cgroup `held`, to the destination alone: stop it, and remove the guard
    /// of its port. Before their last page has gone, that lets them run again.
    StopPageServer {
        server: crate::engine::lazy_pages::PageServer,
        held: Option<String>,
    },
    /// The port of CRIU's page server here is guarded: remove the guard. Journaled before
    /// the guard exists; it outlives CRIU until the clean-up, out of the freeze.
    Unguard(crate::engine::lazy_pages::PageServer),
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
            Undo::Unguard(server) => write!(
                f,
                "remove the guard of the page server's port {}:{}",
                server.address, server.port
            ),
            Undo::FenceReplica { destination, .. } => {
                write!(f, "fence the stopped replica on {destination}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> JournalRecord {
        JournalRecord {
            migration_id: id.into(),
            container: "web".into(),
            container_id: "c".repeat(64),
            destination: "h2:7878".into(),
            stage: SourceStage::Running,
            steps: Vec::new(),
            switch: None,
            held_init: None,
        }
    }

    #[test]
    fn a_journal_is_running_while_its_process_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = record("a");
        let journal = Journal::create(dir.path(), &rec).unwrap();
        rec.stage = SourceStage::Frozen;
        rec.steps = vec![Undo::RemoveFile("/tmp/x.tar".into())];
        journal.save(&rec).unwrap();
        let listed = list(dir.path());
        assert_eq!(listed.len(), 1);
        assert!(listed[0].running);
        assert_eq!(listed[0].record.as_ref(), Some(&rec));
        assert!(
            Journal::adopt(&listed[0].path).is_none(),
            "held by its process"
        );

        // A write cut short by a kill leaves the previous record readable.
        (&journal.file)
            .write_all(b"{\"migration_id\":\"a\",\"conta")
            .unwrap();
        assert_eq!(list(dir.path())[0].record.as_ref(), Some(&rec));

        drop(journal); // as when the process dies: the lock goes, the file stays
        let listed = list(dir.path());
        assert!(!listed[0].running);
        let adopted = Journal::adopt(&listed[0].path).expect("free to adopt");
        assert_eq!(read(&adopted), Some(rec));
    }

    #[test]
    fn a_second_migration_of_the_same_container_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = Journal::create(dir.path(), &record("a")).unwrap();
        let refused = Journal::create(dir.path(), &record("b")).unwrap_err();
        assert!(
            format!("{refused:#}").contains("is migrating now"),
            "{refused:#}"
        );
        drop(first); // abandoned, not resolved: still refused
        let refused = Journal::create(dir.path(), &record("b")).unwrap_err();
        assert!(format!("{refused:#}").contains("unresolved"), "{refused:#}");
    }

    #[test]
    fn a_journal_its_process_never_put_in_place_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let journals = journals_dir(dir.path());
        std::fs::create_dir_all(&journals).unwrap();
        let unborn = journals.join(".a.new");
        std::fs::write(&unborn, b"{}").unwrap();
        let held = File::open(&unborn).unwrap();
        held.lock().unwrap();
        assert_eq!(remove_unborn(dir.path()), 0, "its creator still holds it");
        drop(held);
        assert_eq!(remove_unborn(dir.path()), 1);
        assert!(!unborn.exists());
    }

    #[test]
    fn an_unreadable_journal_is_listed_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(journals_dir(dir.path())).unwrap();
        std::fs::write(journals_dir(dir.path()).join("x.json"), b"garbage").unwrap();
        let listed = list(dir.path());
        assert_eq!(listed.len(), 1);
        assert!(listed[0].record.is_none());
    }
}
