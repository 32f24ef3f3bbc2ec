//! Checks of the identifiers a peer sends. Authentication proves who the peer is, not that
//! what it sends is sane: these values end up in file names, podman API paths and
//! WireGuard configuration, so anything but the exact expected shape is refused.

use base64::Engine;

/// Longest container name accepted (podman's names are also host names).
const MAX_NAME_LEN: usize = 253;
/// Characters of an offending value quoted in an error: enough to recognise it, and a
/// hostile peer cannot fill the logs.
const QUOTED_CHARS: usize = 80;

/// A value from a peer that does not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value}: {problem}")]
pub struct InvalidInput {
    /// What the value was meant to be, e.g. "container ID".
    pub field: &'static str,
    /// The value, quoted, escaped and shortened.
    pub value: String,
    pub problem: String,
}

impl InvalidInput {
    fn new(field: &'static str, value: &str, problem: impl Into<String>) -> Self {
        let mut quoted: String = value.chars().take(QUOTED_CHARS).collect();
        if quoted.len() < value.len() {
            quoted.push('…');
        }
        Self {
            field,
            value: format!("{quoted:?}"),
            problem: problem.into(),
        }
    }
}

/// A full podman container ID: 64 lowercase hex characters.
pub fn container_id(s: &str) -> Result<(), InvalidInput> {
    lower_hex("container ID", s, 64)
}

/// A podman container name: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 253 characters.
pub fn container_name(s: &str) -> Result<(), InvalidInput> {
    let invalid = |problem: String| Err(InvalidInput::new("container name", s, problem));
    let Some(first) = s.chars().next() else {
        return invalid("it is empty".into());
    };
    if s.len() > MAX_NAME_LEN {
        return invalid(format!(
            "it is {} bytes long, at most {MAX_NAME_LEN} are allowed",
            s.len()
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return invalid(format!("it starts with {first:?}, not a letter or digit"));
    }
    match s
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        Some(c) => invalid(format!(
            "it contains {c:?}; only letters, digits, '_', '.' and '-' are allowed"
        )),
        None => Ok(()),
    }
}

/// An image ID: 64 lowercase hex characters, optionally prefixed with `sha256:`.
pub fn image_id(s: &str) -> Result<(), InvalidInput> {
    lower_hex("image ID", s.strip_prefix("sha256:").unwrap_or(s), 64)
        .map_err(|e| InvalidInput::new(e.field, s, e.problem))
}

/// A migration session ID, as made by [`new_migration_id`]: 32 lowercase hex characters.
pub fn migration_id(s: &str) -> Result<(), InvalidInput> {
    lower_hex("migration ID", s, 32)
}

/// A fresh random migration session ID (128 bits, lowercase hex).
pub fn new_migration_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// A WireGuard public key: standard base64 (padded) of exactly 32 bytes.
pub fn public_key(s: &str) -> Result<(), InvalidInput> {
    let invalid = |problem: String| Err(InvalidInput::new("public key", s, problem));
    match base64::engine::general_purpose::STANDARD.decode(s) {
        Ok(bytes) if bytes.len() == 32 => Ok(()),
        Ok(bytes) => invalid(format!("it decodes to {} bytes, not 32", bytes.len())),
        Err(e) => invalid(format!("it is not padded standard base64 ({e})")),
    }
}

fn lower_hex(field: &'static str, s: &str, len: usize) -> Result<(), InvalidInput> {
    if let Some(c) = s.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
        return Err(InvalidInput::new(
            field,
            s,
            format!("it contains {c:?}; only lowercase hex digits (0-9, a-f) are allowed"),
        ));
    }
    if s.len() != len {
        return Err(InvalidInput::new(
            field,
            s,
            format!("it is {} hex digits long, not {len}", s.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const PATHS: [&str; 6] = ["../../etc", "/etc/passwd", "a/b", "..", ".", ""];

    #[test]
    fn container_ids() {
        assert_eq!(container_id(HEX64), Ok(()));
        for bad in PATHS {
            assert!(container_id(bad).is_err(), "{bad:?}");
        }
        assert!(container_id(&HEX64.to_uppercase()).is_err());
        assert!(container_id(&HEX64[..63]).is_err());
        assert!(container_id(&format!("{HEX64}0")).is_err());
        assert!(container_id(&format!("{}g", &HEX64[..63])).is_err());
        assert!(container_id(&format!("{}/", &HEX64[..63])).is_err());
    }

    #[test]
    fn container_names() {
        for good in ["a", "victim", "web-1", "my_app.v2", "0abc", "A-b_c.D"] {
            assert_eq!(container_name(good), Ok(()), "{good:?}");
        }
        assert_eq!(container_name(&"a".repeat(253)), Ok(()));
        for bad in PATHS {
            assert!(container_name(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "-rf", ".hidden", "_x", "a b", "a\nb", "a\0", "ä", "a:b", "a;b",
        ] {
            assert!(container_name(bad).is_err(), "{bad:?}");
        }
        assert!(container_name(&"a".repeat(254)).is_err());
    }

    #[test]
    fn image_ids() {
        assert_eq!(image_id(HEX64), Ok(()));
        assert_eq!(image_id(&format!("sha256:{HEX64}")), Ok(()));
        for bad in PATHS {
            assert!(image_id(bad).is_err(), "{bad:?}");
        }
        assert!(image_id("sha256:").is_err());
        assert!(image_id(&format!("sha512:{HEX64}")).is_err());
        assert!(image_id(&format!("sha256:sha256:{HEX64}")).is_err());
        assert!(image_id(&HEX64.to_uppercase()).is_err());
        assert!(image_id(&format!("sha256:{}", &HEX64[..63])).is_err());
        assert!(image_id(&format!("{HEX64}0")).is_err());
        // The error quotes what the peer sent, prefix included.
        let e = image_id("sha256:../x").unwrap_err();
        assert_eq!(e.value, "\"sha256:../x\"");
    }

    #[test]
    fn migration_ids() {
        let id = new_migration_id();
        assert_eq!(migration_id(&id), Ok(()));
        assert_ne!(id, new_migration_id());
        for bad in PATHS {
            assert!(migration_id(bad).is_err(), "{bad:?}");
        }
        assert!(migration_id(&HEX64[..32].to_uppercase()).is_err());
        assert!(migration_id(&HEX64[..31]).is_err());
        assert!(migration_id(&HEX64[..33]).is_err());
        assert!(migration_id(HEX64).is_err());
    }

    #[test]
    fn public_keys() {
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(key.len(), 44);
        assert_eq!(public_key(&key), Ok(()));
        for bad in PATHS {
            assert!(public_key(bad).is_err(), "{bad:?}");
        }
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        assert!(public_key(&b64(31)).is_err());
        assert!(public_key(&b64(33)).is_err());
        assert!(public_key(key.trim_end_matches('=')).is_err());
        assert!(public_key(&format!(" {key}")).is_err());
        // The URL-safe alphabet is not WireGuard's.
        assert!(public_key(&key.replace('c', "_")).is_err());
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let e = container_id("../../etc").unwrap_err();
        assert_eq!(e.field, "container ID");
        assert_eq!(
            e.to_string(),
            "invalid container ID \"../../etc\": it contains '.'; only lowercase hex digits \
             (0-9, a-f) are allowed"
        );
        assert_eq!(
            migration_id("abc").unwrap_err().to_string(),
            "invalid migration ID \"abc\": it is 3 hex digits long, not 32"
        );
        assert_eq!(
            container_name("-x").unwrap_err().to_string(),
            "invalid container name \"-x\": it starts with '-', not a letter or digit"
        );
        assert!(public_key("x")
            .unwrap_err()
            .to_string()
            .starts_with("invalid public key"));
        // A huge value is shortened in the message.
        let long = "/".repeat(10_000);
        assert!(container_name(&long).unwrap_err().to_string().len() < 300);
    }
}
