//! Entries the agent writes into a checkpoint archive itself.

use std::io::Write;

use anyhow::{Context, Result};

pub(super) fn append_bytes(
    tar: &mut tar::Builder<impl Write>,
    name: &str,
    bytes: &[u8],
) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, name, bytes)
        .with_context(|| format!("pack {name}"))
}
