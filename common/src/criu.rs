//! CRIU facts for preflight checks. CRIU has no library interface for its version, so this
//! runs `criu --version` (fixed arguments, no shell).

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
