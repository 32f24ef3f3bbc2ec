//! Small file-system helpers shared by the agents' state handling.

use std::path::Path;

/// Removes the file at `path`; one that is already gone is not an error (undo steps and
/// clean-ups may run twice, or after a crash that removed it already).
pub fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
