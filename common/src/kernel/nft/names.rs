//! The names and priorities of the agent's table and its chains.

use nftables::types::NfFamily;

/// Name of the agent's table (family `inet`).
pub const TABLE: &str = "live_migrate";

/// Family of the agent's table.
pub const FAMILY: NfFamily = NfFamily::INet;

/// Filter chain at prerouting/mangle: connection marks.
pub const PREROUTING_CHAIN: &str = "prerouting";

/// NAT chain at prerouting, before netavark's: port forwards to migrated containers.
pub const NAT_PREROUTING_CHAIN: &str = "nat_prerouting";

/// Filter chain at postrouting, after source NAT: drops clashing returns.
pub const POSTROUTING_CHAIN: &str = "postrouting";

/// Filter chain at prerouting, before conntrack: untracks returning packets.
pub const RAW_PREROUTING_CHAIN: &str = "raw_prerouting";

/// Flows whose returning packets are untracked, with a timeout.
pub const RETURNING_SET: &str = "returning_flows";

/// Priority of [`PREROUTING_CHAIN`] (`mangle`).
pub const PREROUTING_PRIORITY: i32 = -150;

/// Priority of [`NAT_PREROUTING_CHAIN`] (`dstnat - 10`).
pub const NAT_PREROUTING_PRIORITY: i32 = -110;

/// Priority of [`POSTROUTING_CHAIN`] (`srcnat + 10`).
pub const POSTROUTING_PRIORITY: i32 = 110;

/// Priority of [`RAW_PREROUTING_CHAIN`] (`raw`).
pub const RAW_PREROUTING_PRIORITY: i32 = -300;
