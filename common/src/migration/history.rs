//! The migrations this host took part in, one JSON line each in the state directory:
//! what `agent-client status` shows, and where the interactive client finds the
//! destinations used before.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::migration::report::{MigrationFailure, Phase};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This host sent the container.
    Outgoing,
    /// This host received it.
    Incoming,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Seconds since the Unix epoch, when it ended.
    pub at: u64,
    pub direction: Direction,
    pub container: String,
    /// The other host: the destination agent (outgoing) or the source's address (incoming).
    pub peer: String,
    /// Whether the container moved.
    pub succeeded: bool,
    /// The error, for a migration that did not happen.
    pub error: Option<String>,
    pub freeze_to_resume_ms: Option<f64>,
    pub total_ms: Option<f64>,
    /// Where a migration that did not happen failed.
    #[serde(default)]
    pub failed_phase: Option<Phase>,
    /// Checkpoint and memory sent (outgoing, once it moved).
    #[serde(default)]
    pub transferred_bytes: Option<u64>,
}

impl HistoryEntry {
    pub fn now(direction: Direction, container: &str, peer: &str) -> Self {
        Self {
            at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            direction,
            container: container.to_string(),
            peer: peer.to_string(),
            succeeded: false,
            error: None,
            freeze_to_resume_ms: None,
            total_ms: None,
            failed_phase: None,
            transferred_bytes: None,
        }
    }

    pub fn failed(&mut self, failure: &MigrationFailure) {
        self.error = Some(failure.to_string());
        self.failed_phase = Some(failure.phase);
    }
}

fn history_file(state_dir: &Path) -> PathBuf {
    state_dir.join("history.jsonl")
}

/// Appends `entry`. One `write` per line, so concurrent agents do not interleave.
pub fn record(state_dir: &Path, entry: &HistoryEntry) -> Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("create {}", state_dir.display()))?;
    let mut line = serde_json::to_vec(entry)?;
    line.push(b'\n');
    let path = history_file(state_dir);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(&line))
        .with_context(|| format!("append to {}", path.display()))
}

/// The newest `limit` entries, oldest first; unreadable lines are skipped.
pub fn recent(state_dir: &Path, limit: usize) -> Vec<HistoryEntry> {
    let text = std::fs::read_to_string(history_file(state_dir)).unwrap_or_default();
    let all: Vec<HistoryEntry> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    all[all.len().saturating_sub(limit)..].to_vec()
}

/// Destinations this host sent containers to, most recently used first, each once.
pub fn destinations(state_dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for entry in recent(state_dir, usize::MAX).into_iter().rev() {
        if entry.direction == Direction::Outgoing && !out.contains(&entry.peer) {
            out.push(entry.peer);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_lists_destinations_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        for (peer, direction) in [
            ("h2:7878", Direction::Outgoing),
            ("10.77.0.13", Direction::Incoming),
            ("h3:7878", Direction::Outgoing),
            ("h2:7878", Direction::Outgoing),
        ] {
            record(dir.path(), &HistoryEntry::now(direction, "web", peer)).unwrap();
        }
        assert_eq!(destinations(dir.path()), ["h2:7878", "h3:7878"]);
        let last_two = recent(dir.path(), 2);
        assert_eq!(last_two.len(), 2);
        assert_eq!(last_two[0].peer, "h3:7878");
    }
}
