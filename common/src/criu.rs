//! CRIU facts for preflight checks. CRIU has no library interface for its version or its
//! self-check, so this runs `criu --version` and `criu check` (fixed arguments, no shell).

/// Oldest CRIU that can dump TCP sockets on Linux >= 6.16 (criu issue #2705).
pub const MIN_VERSION: (u32, u32) = (4, 2);

/// The installed CRIU version, e.g. "4.2.1", or a description of why there is none.
pub async fn version() -> Result<String, String> {
    let output = tokio::process::Command::new("criu")
        .arg("--version")
        .output()
        .await
        .map_err(|e| format!("criu not found ({e}); install CRIU >= 4.2"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| format!("unexpected output of criu --version: {text}"))
}

/// Optional features worth knowing about: pre-copy needs dirty-page tracking, lazy pages
/// need non-cooperative userfaultfd. Neither is needed by the current migration.
pub const OPTIONAL_FEATURES: [&str; 2] = ["mem_dirty_track", "uffd-noncoop"];

/// Runs `criu check`: `None` when CRIU finds this host fit to checkpoint, otherwise what it
/// objected to.
pub async fn check() -> Option<String> {
    let output = match tokio::process::Command::new("criu")
        .arg("check")
        .output()
        .await
    {
        Ok(output) => output,
        Err(e) => return Some(format!("criu not found ({e})")),
    };
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    if output.status.success() && text.contains("Looks good") {
        return None;
    }
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("Error")).collect();
    Some(if errors.is_empty() {
        text.trim().to_string()
    } else {
        errors.join("; ")
    })
}

/// Whether this kernel and CRIU support an optional `feature` (`criu check --feature`).
pub async fn has_feature(feature: &str) -> bool {
    tokio::process::Command::new("criu")
        .args(["check", "--feature", feature])
        .output()
        .await
        .is_ok_and(|o| o.status.success())
}

/// Whether `version` ("major.minor[.patch]") is at least [`MIN_VERSION`].
pub fn is_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= MIN_VERSION
}

#[cfg(test)]
mod tests {
    use super::is_supported;

    #[test]
    fn version_gate() {
        assert!(is_supported("4.2.1"));
        assert!(is_supported("5.0"));
        assert!(!is_supported("4.1.1"));
        assert!(!is_supported("3.17"));
        assert!(!is_supported("garbage"));
    }
}
