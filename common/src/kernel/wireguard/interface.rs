//! The tunnels' interface names and link settings, which the daemon and the device share.

use anyhow::{anyhow, bail, Result};
use wireguard_control::InterfaceName;

/// Every interface the agent creates is called `lmwg-<something>`.
pub const INTERFACE_PREFIX: &str = "lmwg-";
/// Linux limit on interface names (IFNAMSIZ - 1).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;
/// MTU of the tunnel interfaces (1500 minus WireGuard's IPv6 worst-case overhead).
pub const TUNNEL_MTU: u32 = 1420;
/// Transmit queue of a tunnel, packets: room for all the packets held during a freeze,
/// let through at once ([`crate::kernel::hold::DEFAULT_BOUND`]). A userspace tunnel's TUN device
/// keeps 500 by default and drops the rest of such a burst.
pub const TUNNEL_TXQUEUELEN: u32 = crate::kernel::hold::DEFAULT_BOUND;

// ----------------------------------------------------------------------------- names

/// Check that `name` is a valid name for one of the agent's interfaces: starts with
/// [`INTERFACE_PREFIX`], at most [`MAX_INTERFACE_NAME_LEN`] bytes, only `[A-Za-z0-9_.-]`
/// after the prefix and at least one such character.
pub fn validate_interface_name(name: &str) -> Result<()> {
    let Some(suffix) = name.strip_prefix(INTERFACE_PREFIX) else {
        bail!("interface name {name:?} does not start with {INTERFACE_PREFIX:?}");
    };
    if name.len() > MAX_INTERFACE_NAME_LEN {
        bail!(
            "interface name {name:?} is {} bytes long, the limit is {MAX_INTERFACE_NAME_LEN}",
            name.len()
        );
    }
    if suffix.is_empty() {
        bail!("interface name {name:?} has nothing after {INTERFACE_PREFIX:?}");
    }
    if let Some(c) = suffix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        bail!("interface name {name:?} contains {c:?} (allowed: A-Z a-z 0-9 - _ .)");
    }
    Ok(())
}

/// `lmwg-<suffix>`, validated.
pub fn interface_name(suffix: &str) -> Result<String> {
    let name = format!("{INTERFACE_PREFIX}{suffix}");
    validate_interface_name(&name)?;
    Ok(name)
}

pub(super) fn wg_name(name: &str) -> Result<InterfaceName> {
    validate_interface_name(name)?;
    name.parse::<InterfaceName>()
        .map_err(|e| anyhow!("interface name {name:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(validate_interface_name("lmwg-a").is_ok());
        assert!(validate_interface_name("lmwg-0123456789").is_ok()); // 15 bytes
        assert!(validate_interface_name("lmwg-01234567890").is_err()); // 16 bytes
        assert!(validate_interface_name("lmwg-").is_err());
        assert!(validate_interface_name("wg0").is_err());
        assert!(validate_interface_name("lmwg-a b").is_err());
        assert!(validate_interface_name("lmwg-a/b").is_err());
        assert_eq!(interface_name("peer1").unwrap(), "lmwg-peer1");
        assert!(interface_name("a-very-long-suffix").is_err());
        assert!(wg_name("lmwg-x").is_ok());
    }
}
