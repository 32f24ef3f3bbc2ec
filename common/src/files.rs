//! Small file-system helpers shared by the agents' state handling.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Removes the file at `path`; one that is already gone is not an error (undo steps and
/// clean-ups may run twice, or after a crash that removed it already).
pub fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Prefix of [`write_atomic`]'s temporary files.
const TMP_PREFIX: &str = ".tmp-";

/// Removes the temporary files [`write_atomic`] left in `dir` when its process died
/// mid-write; the file it was replacing is intact. Only for a directory no live process
/// writes to (its owner holds a lock on it).
pub fn remove_torn_writes(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            remove_if_present(&entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file beside it is
/// written, synced and renamed over it, and the directory is synced, so a crash leaves
/// either the old content or the new one, and a record is on disk before the step it
/// describes. Mode 0600: agent state may name containers and flows.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Creates (or truncates) `path`, readable by root only: it holds a container's memory.
pub fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Creates `dir` (and its parents) readable by root only: it holds checkpoint archives,
/// which hold the container's memory.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_the_whole_file_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn torn_writes_are_removed_and_the_record_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        write_atomic(&path, b"kept").unwrap();
        std::fs::write(dir.path().join(".tmp-abc123"), b"half a reco").unwrap();
        assert_eq!(remove_torn_writes(dir.path()).unwrap(), 1);
        assert_eq!(std::fs::read(&path).unwrap(), b"kept");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
