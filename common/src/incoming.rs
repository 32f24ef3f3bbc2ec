//! The destination's side of a migration, as state: what an incoming session has made on
//! this host (archive, conntrack entries, a held address, a restored container), journaled
//! so that whatever the source did not see through can be undone, also after a crash
//! ([`recover`], run when `agent-server` starts and by `agent-client cleanup`).

use std::fs::{File, TryLockError};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::conntrack::{self, Flow};
use crate::overlay::MAIN_TABLE;
use crate::podman::PodmanClient;
use crate::protocol::ContainerRef;
use crate::routing::Routing;

fn server_lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent-server.lock")
}

/// Takes the lock `agent-server` holds for as long as it runs on `state_dir`: one server
/// per state directory, and `agent-client cleanup` knows whether one runs.
pub fn lock_server(state_dir: &Path) -> Result<File> {
    std::fs::create_dir_all(state_dir)
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

/// Directory of the incoming sessions' journals.
pub fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("sessions")
}

/// Directory of the incoming checkpoint archives.
pub fn archive_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("incoming")
}

/// The journals of open sessions (or, with no server running, abandoned ones).
pub fn list(state_dir: &Path) -> Vec<IncomingSession> {
    let Ok(entries) = std::fs::read_dir(journal_dir(state_dir)) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| read_journal(e.ok()?.path()))
        .collect()
}

/// The session journaled at `path`; `None` if it cannot be read.
fn read_journal(path: PathBuf) -> Option<IncomingSession> {
    let bytes = std::fs::read(&path).ok()?;
    let mut session: IncomingSession = serde_json::from_slice(&bytes).ok()?;
    session.journal = path;
    Some(session)
}

/// What this session has made on this host, so it can be undone. Saved to the state
/// directory on every change, so that an agent that died mid-migration cleans up after
/// itself when it starts again ([`recover`]).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct IncomingSession {
    #[serde(skip)]
    journal: PathBuf,
    pub archive: Option<PathBuf>,
    /// Conntrack entries this session made for the incoming container's flows (not those
    /// that existed already): undo deletes them.
    pub flows: Vec<Flow>,
    /// The incoming container's address, held (blackholed) until it runs.
    pub held_ip: Option<Ipv4Addr>,
    /// A restore was asked for and not yet confirmed to the source.
    pub restoring: Option<ContainerRef>,
    /// The container runs here and the source was told so: this host has taken over.
    pub restored: Option<ContainerRef>,
    pub finished: bool,
    /// Name of the container whose checkpoint came in: the session is a migration, and goes
    /// into the history.
    pub incoming: Option<String>,
}

impl IncomingSession {
    pub fn new(journal_dir: &Path) -> Self {
        Self {
            journal: journal_dir.join(format!("{:016x}.json", rand::random::<u64>())),
            ..Self::default()
        }
    }

    pub fn save(&self) -> Result<()> {
        let json = serde_json::to_vec(self)?;
        std::fs::write(&self.journal, json)
            .with_context(|| format!("write {}", self.journal.display()))
    }

    /// Undoes whatever the source did not see through, then forgets the session. A
    /// container that was confirmed restored stays, with its flows.
    pub async fn wind_down(mut self, podman: &PodmanClient) {
        self.discard_archive();
        if let Err(e) = self.release_held_ip().await {
            tracing::warn!("could not release the container address: {e:#}");
        }
        if self.restored.is_none() && !self.finished {
            if let Some(container) = self.restoring.take() {
                if let Ok(Some(_)) = podman.find(&container.id).await {
                    tracing::info!(container = %container.name, "removing an unconfirmed restore");
                    if let Err(e) = podman.remove(&container.id).await {
                        tracing::warn!("could not remove {}: {e}", container.name);
                    }
                }
            }
            for flow in self.flows.drain(..) {
                if let Err(e) = conntrack::delete(&flow).await {
                    tracing::warn!("could not remove a conntrack entry: {e:#}");
                }
            }
        }
        let _ = std::fs::remove_file(&self.journal);
    }

    /// The container's address is routed locally again (its sockets exist, or it is not coming).
    pub async fn release_held_ip(&mut self) -> Result<()> {
        if let Some(ip) = self.held_ip.take() {
            Routing::new()?
                .delete_route(IpAddr::V4(ip), 32, MAIN_TABLE)
                .await?;
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
}

/// Winds down the sessions a previous run of the agent left unfinished.
/// Returns how many it wound down.
pub async fn recover(journal_dir: &Path, podman: &PodmanClient) -> Result<usize> {
    std::fs::create_dir_all(journal_dir)
        .with_context(|| format!("create {}", journal_dir.display()))?;
    let mut wound_down = 0;
    for entry in std::fs::read_dir(journal_dir)? {
        let path = entry?.path();
        match read_journal(path.clone()) {
            Some(session) => {
                tracing::info!(journal = %path.display(), "winding down a session of a previous run");
                session.wind_down(podman).await;
                wound_down += 1;
            }
            None => {
                tracing::warn!(journal = %path.display(), "unreadable session journal removed");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(wound_down)
}
