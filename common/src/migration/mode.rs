//! How the container's memory moves: all of it during the freeze (stop-copy), or after
//! it, while the container already runs on the destination (post-copy,
//! [`crate::engine::lazy_pages`]). There is no pre-copy: it needs the kernel's soft-dirty
//! tracking (`criu check --feature mem_dirty_track`).
//!
//! Stop-copy streams the memory where both hosts can serve lazy pages: CRIU's page server
//! sends it straight into a stopped copy on the destination, which runs only once it is
//! all there ([`MemoryPath::PageServer`]). Otherwise, or when asked, it goes in podman's
//! checkpoint archive, written to disk on both hosts ([`MemoryPath::Archive`]).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The freeze covers the whole copy: it grows with the container's memory. If either
    /// host fails midway, the container runs on the source again.
    StopCopy,
    /// The freeze covers everything but the memory, which follows on demand and in the
    /// background. Until the last page has arrived the container needs both hosts: if
    /// either, or the link, fails then, it stops.
    PostCopy,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::StopCopy => "stop-copy",
            Mode::PostCopy => "post-copy",
        }
    }
}

/// How the memory reaches the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryPath {
    /// In podman's checkpoint archive, on disk on both hosts.
    Archive,
    /// From CRIU's page server on the source, straight to the destination under TLS,
    /// into the restored processes (userfaultfd): on disk nowhere.
    PageServer,
}

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeRequest {
    /// Post-copy for containers of at least this many resident bytes, where both hosts
    /// can; stop-copy otherwise.
    Auto {
        post_copy_above: u64,
    },
    Fixed(Mode),
}

/// The default threshold of [`ModeRequest::Auto`]: below it, a stop-copy freeze is about
/// as short as a post-copy one, and nothing depends on two hosts.
pub const DEFAULT_POST_COPY_ABOVE: u64 = 256 << 20;

/// The mode a migration runs in, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModeChoice {
    pub mode: Mode,
    pub reason: String,
    pub memory: MemoryPath,
}

/// Picks the mode for a container of `memory` resident bytes; `post_copy_problem` says
/// why lazy pages cannot run between these hosts (`None`: they can), and `stop_copy`
/// how a stop-copy should move the memory where they can. Asking for post-copy where it
/// cannot run is an error.
pub fn choose(
    request: ModeRequest,
    memory: Option<u64>,
    post_copy_problem: Option<&str>,
    stop_copy: MemoryPath,
) -> anyhow::Result<ModeChoice> {
    let mib = |bytes: u64| bytes >> 20;
    let choice = |mode, reason: String| {
        let memory = match (mode, post_copy_problem) {
            (Mode::PostCopy, _) => MemoryPath::PageServer,
            (Mode::StopCopy, None) => stop_copy,
            (Mode::StopCopy, Some(_)) => MemoryPath::Archive,
        };
        Ok(ModeChoice {
            mode,
            reason,
            memory,
        })
    };
    match (request, post_copy_problem) {
        (ModeRequest::Fixed(Mode::PostCopy), Some(problem)) => {
            anyhow::bail!("post-copy cannot run: {problem}")
        }
        (ModeRequest::Fixed(mode), _) => choice(mode, "asked for".into()),
        (ModeRequest::Auto { .. }, Some(problem)) => {
            choice(Mode::StopCopy, format!("post-copy cannot run: {problem}"))
        }
        (ModeRequest::Auto { post_copy_above }, None) => match memory {
            Some(used) if used >= post_copy_above => choice(
                Mode::PostCopy,
                format!(
                    "{} MiB resident, at least the {} MiB threshold",
                    mib(used),
                    mib(post_copy_above)
                ),
            ),
            Some(used) => choice(
                Mode::StopCopy,
                format!(
                    "{} MiB resident, below the {} MiB threshold",
                    mib(used),
                    mib(post_copy_above)
                ),
            ),
            None => choice(
                Mode::StopCopy,
                "podman did not say how much memory it uses".into(),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTO: ModeRequest = ModeRequest::Auto {
        post_copy_above: 256 << 20,
    };
    const STREAM: MemoryPath = MemoryPath::PageServer;

    #[test]
    fn stop_copy_streams_only_where_lazy_pages_run_and_archive_was_not_asked() {
        let stop = ModeRequest::Fixed(Mode::StopCopy);
        let via = |problem, wanted| choose(stop, Some(1 << 30), problem, wanted).unwrap().memory;
        assert_eq!(via(None, STREAM), MemoryPath::PageServer);
        assert_eq!(via(None, MemoryPath::Archive), MemoryPath::Archive);
        assert_eq!(via(Some("no userfaultfd"), STREAM), MemoryPath::Archive);
        let post = choose(AUTO, Some(1 << 30), None, MemoryPath::Archive).unwrap();
        assert_eq!(
            (post.mode, post.memory),
            (Mode::PostCopy, MemoryPath::PageServer)
        );
    }

    #[test]
    fn auto_picks_each_mode_on_either_side_of_the_threshold() {
        let at = |bytes| choose(AUTO, Some(bytes), None, STREAM).unwrap().mode;
        assert_eq!(at((256 << 20) - 1), Mode::StopCopy);
        assert_eq!(at(256 << 20), Mode::PostCopy);
        assert_eq!(at(2 << 30), Mode::PostCopy);
        assert_eq!(
            choose(AUTO, None, None, STREAM).unwrap().mode,
            Mode::StopCopy
        );
    }

    #[test]
    fn post_copy_only_where_both_hosts_can() {
        let auto = choose(AUTO, Some(1 << 30), Some("no userfaultfd on h2"), STREAM).unwrap();
        assert_eq!(auto.mode, Mode::StopCopy);
        assert!(auto.reason.contains("no userfaultfd on h2"));
        let fixed = ModeRequest::Fixed(Mode::PostCopy);
        assert!(choose(fixed, Some(1 << 30), Some("no userfaultfd"), STREAM).is_err());
        assert_eq!(
            choose(fixed, Some(1), None, STREAM).unwrap().mode,
            Mode::PostCopy
        );
        let stop = ModeRequest::Fixed(Mode::StopCopy);
        assert_eq!(
            choose(stop, Some(1 << 30), None, STREAM).unwrap().mode,
            Mode::StopCopy
        );
    }
}
