//! podman's answer about itself, kept in the state directory.
//!
//! A host report names podman's version and its default OCI runtime, which only podman's
//! `/info` tells. `/info` (and `/version`) run a package query (`dpkg-query`, `rpm`) for
//! every program they name: 0.35-0.45 s here, in the prepare phase of every migration, on
//! both hosts. The answer changes only with an upgrade or a new configuration, so the last
//! one is kept in a file that a host's agents share. It serves for [`TTL`] while podman's
//! `_ping`, a millisecond, names the same version; `agent-server` asks anew every
//! [`REFRESH`], so that no migration waits for `/info`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::podman::{EngineInfo, PodmanClient, PodmanError};

/// How long a kept answer serves.
pub const TTL: Duration = Duration::from_secs(15 * 60);
/// How often `agent-server` asks podman anew; well within [`TTL`].
pub const REFRESH: Duration = Duration::from_secs(5 * 60);

const FILE: &str = "engine-info.json";

#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    /// What `_ping` named when the answer came.
    pinged_version: String,
    podman_version: String,
    oci_runtime: String,
    /// When the answer came, seconds since the epoch.
    asked_unix: u64,
}

impl Kept {
    /// Whether it still serves, at `now_unix`, for a podman whose `_ping` names
    /// `pinged_version`. One from the future (the clock went back) does not.
    fn serves(&self, pinged_version: &str, now_unix: u64) -> bool {
        self.pinged_version == pinged_version
            && now_unix
                .checked_sub(self.asked_unix)
                .is_some_and(|age| age < TTL.as_secs())
    }
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// podman's version and default runtime: the kept answer if it serves, else podman's own,
/// which is then kept.
pub async fn engine_info(
    podman: &PodmanClient,
    state_dir: &Path,
) -> Result<EngineInfo, PodmanError> {
    let pinged = podman.pinged_version().await?;
    let kept = std::fs::read(path(state_dir))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Kept>(&bytes).ok())
        .filter(|kept| kept.serves(&pinged, now_unix()));
    match kept {
        Some(kept) => Ok(EngineInfo {
            podman_version: kept.podman_version,
            oci_runtime: kept.oci_runtime,
        }),
        None => ask(podman, state_dir, pinged).await,
    }
}

/// Asks podman (`/info`) and keeps the answer.
pub async fn refresh(podman: &PodmanClient, state_dir: &Path) -> Result<EngineInfo, PodmanError> {
    let pinged = podman.pinged_version().await?;
    ask(podman, state_dir, pinged).await
}

async fn ask(
    podman: &PodmanClient,
    state_dir: &Path,
    pinged_version: String,
) -> Result<EngineInfo, PodmanError> {
    let info = podman.engine_info().await?;
    let kept = Kept {
        pinged_version,
        podman_version: info.podman_version.clone(),
        oci_runtime: info.oci_runtime.clone(),
        asked_unix: now_unix(),
    };
    // Only a shortcut: if it cannot be kept, the next report asks podman again.
    if let Ok(bytes) = serde_json::to_vec(&kept) {
        if let Err(e) = crate::files::write_atomic(&path(state_dir), &bytes) {
            tracing::debug!("keeping podman's info in {}: {e}", state_dir.display());
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_answer_serves_the_same_podman_until_it_is_too_old() {
        let kept = Kept {
            pinged_version: "5.4.2".into(),
            podman_version: "5.4.2".into(),
            oci_runtime: "runc".into(),
            asked_unix: 1_000_000,
        };
        assert!(kept.serves("5.4.2", 1_000_000));
        assert!(kept.serves("5.4.2", 1_000_000 + TTL.as_secs() - 1));
        assert!(!kept.serves("5.4.2", 1_000_000 + TTL.as_secs()), "too old");
        assert!(!kept.serves("5.5.0", 1_000_001), "another podman");
        assert!(!kept.serves("5.4.2", 999_999), "asked in the future");
    }
}
