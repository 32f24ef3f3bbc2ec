//! The agent's WireGuard identity: its key pair, kept in the state directory, and the
//! public keys of its peers.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{ErrorKind, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

pub use wireguard_control::Key;

/// File holding the agent's private key (base64, like `wg genkey`) inside its state dir.
pub const KEY_FILE_NAME: &str = "wireguard.key";

/// The agent's WireGuard identity.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    private: Key,
    public: Key,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public.to_base64())
            .field("private", &"<redacted>")
            .finish()
    }
}

impl KeyPair {
    /// A fresh random key pair (not stored anywhere).
    pub fn generate() -> Self {
        Self::from_private(Key::generate_private())
    }

    /// The key pair of a private key.
    pub fn from_private(private: Key) -> Self {
        let public = private.get_public();
        KeyPair { private, public }
    }

    /// Parse a base64 private key (the format of `wg genkey`).
    pub fn from_private_base64(b64: &str) -> Result<Self> {
        let key = Key::from_base64(b64.trim())
            .map_err(|_| anyhow!("not a base64-encoded 32-byte WireGuard key"))?;
        Ok(Self::from_private(key))
    }

    /// Load the private key from `state_dir/wireguard.key`, creating it (mode 0600, atomically:
    /// written to a temporary file then linked into place) if it does not exist. A key file
    /// readable or writable by group/others is reset to 0600 with a warning. A symlink or a
    /// non-regular file, or content that is not a key, is an error (the file is not replaced).
    pub fn load_or_create(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(KEY_FILE_NAME);
        match Self::load(&path) {
            Ok(kp) => return Ok(kp),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let kp = Self::generate();
        let tmp = state_dir.join(format!(".{KEY_FILE_NAME}.tmp.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // The mode given to open() is filtered by the umask; make sure of 0600.
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            writeln!(f, "{}", kp.private.to_base64())?;
            f.sync_all()
        };
        let written = write().with_context(|| format!("writing {}", tmp.display()));
        // hard_link does not overwrite: if another process created the key meanwhile, keep
        // theirs.
        let linked = written.and_then(|()| match fs::hard_link(&tmp, &path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(anyhow!(e).context(format!("creating {}", path.display()))),
        });
        let _ = fs::remove_file(&tmp);
        if linked? {
            info!(path = %path.display(), public = %kp.public_base64(), "created WireGuard key");
            Ok(kp)
        } else {
            Self::load(&path)
        }
    }

    fn load(path: &Path) -> Result<Self> {
        let meta = fs::symlink_metadata(path)
            .with_context(|| format!("reading WireGuard key {}", path.display()))?;
        if !meta.file_type().is_file() {
            bail!(
                "WireGuard key {} is not a regular file (symlinks are refused)",
                path.display()
            );
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "WireGuard key was accessible to group/others; resetting to 0600"
            );
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .with_context(|| format!("chmod 0600 {}", path.display()))?;
        }
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading WireGuard key {}", path.display()))?;
        Self::from_private_base64(&text)
            .with_context(|| format!("WireGuard key file {}", path.display()))
    }

    /// The private key (for [`super::device::TunnelSpec::private_key`]).
    pub fn private_key(&self) -> &Key {
        &self.private
    }

    /// The public key.
    pub fn public_key(&self) -> &Key {
        &self.public
    }

    /// The public key in base64, as exchanged with the peer agent.
    pub fn public_base64(&self) -> String {
        self.public.to_base64()
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == ErrorKind::NotFound)
    })
}

/// Parse a base64 public key received from a peer.
pub fn parse_public_key(b64: &str) -> Result<Key> {
    Key::from_base64(b64.trim()).map_err(|_| anyhow!("invalid WireGuard public key {b64:?}"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "lmwg-unit-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn key_file_created_0600_and_reloaded() {
        let dir = temp_dir("create");
        let kp = KeyPair::load_or_create(&dir).unwrap();
        let path = dir.join(KEY_FILE_NAME);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = KeyPair::load_or_create(&dir).unwrap();
        assert_eq!(kp, again);
        assert_eq!(
            kp.public_base64(),
            kp.private_key().get_public().to_base64()
        );
        assert_eq!(kp.public_base64().len(), 44);
        // No temporary file left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        assert!(!format!("{kp:?}").contains(&kp.private_key().to_base64()));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_file_wide_mode_is_fixed() {
        let dir = temp_dir("mode");
        let kp = KeyPair::generate();
        let path = dir.join(KEY_FILE_NAME);
        fs::write(&path, format!("{}\n", kp.private_key().to_base64())).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let loaded = KeyPair::load_or_create(&dir).unwrap();
        assert_eq!(loaded, kp);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_file_garbage_or_symlink_is_refused() {
        let dir = temp_dir("bad");
        let path = dir.join(KEY_FILE_NAME);
        fs::write(&path, "not a key\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(KeyPair::load_or_create(&dir).is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a key\n");
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        assert!(KeyPair::load_or_create(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
