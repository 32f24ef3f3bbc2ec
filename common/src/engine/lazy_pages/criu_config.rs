//! The CRIU configuration files that carry the lazy-pages options past podman and runc:
//! where a dump's options go, and how the agent recognises the files it wrote.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

/// The CRIU configuration runc reads when the container names none.
pub const RUNC_CONF: &str = "/etc/criu/runc.conf";

/// The spec annotation by which a container names a CRIU configuration of its own, which
/// runc then reads in place of [`RUNC_CONF`].
pub const CONFIG_ANNOTATION: &str = "org.criu.config";

/// The destination's configuration of one lazy restore, in its work directory
/// (`incoming/<migration>.pages/`).
pub(super) const RESTORE_CONF: &str = "criu-restore.conf";

/// Where the options of a lazy dump go for a container whose `org.criu.config` is
/// `annotated`: [`RUNC_CONF`] if it names none; the file it names if that is one of this
/// agent's restore configurations (a container restored lazily keeps naming it, long
/// after the file went); otherwise nowhere (Err says why): the options would replace the
/// container's own.
pub fn dump_config(annotated: Option<&Path>) -> Result<PathBuf, String> {
    let Some(path) = annotated else {
        return Ok(PathBuf::from(RUNC_CONF));
    };
    fn name(p: Option<&Path>) -> Option<&str> {
        p.and_then(Path::file_name).and_then(|n| n.to_str())
    }
    let dir = path.parent();
    let ours = name(Some(path)) == Some(RESTORE_CONF)
        && name(dir).is_some_and(|d| d.ends_with(".pages"))
        && name(dir.and_then(Path::parent)) == Some("incoming");
    if ours {
        Ok(path.to_path_buf())
    } else {
        Err(format!(
            "the container names a CRIU configuration of its own ({CONFIG_ANNOTATION} {})",
            path.display()
        ))
    }
}

/// First line of a configuration this module wrote (CRIU skips `#` lines).
pub(super) const MARKER: &str =
    "# live-migrate: options of one post-copy checkpoint, removed once it started";

/// What the runc configuration holds if it is not ours: `None` if there is none, or ours.
pub(super) fn foreign_config() -> Result<Option<String>> {
    foreign_options(Path::new(RUNC_CONF))
}

/// The options in the CRIU configuration `path`, unless it is absent or one this module
/// wrote for a lazy dump.
pub(super) fn foreign_options(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.starts_with(MARKER) => Ok(None),
        Ok(text) => Ok(Some(text.lines().collect::<Vec<_>>().join("; "))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_takes_its_options_where_runc_reads_them_and_never_over_the_containers_own() {
        assert_eq!(dump_config(None), Ok(PathBuf::from(RUNC_CONF)));
        let restored = Path::new("/var/lib/live-migrate/incoming/0123.pages/criu-restore.conf");
        assert_eq!(dump_config(Some(restored)), Ok(restored.to_path_buf()));
        for own in ["/etc/criu/mine.conf", "/tmp/incoming/x/criu-restore.conf"] {
            assert!(dump_config(Some(Path::new(own))).is_err(), "{own}");
        }
    }
}
