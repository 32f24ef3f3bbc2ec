//! What this module reads and writes: routes, policy rules and link states.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
};

/// What a route does with the packets it matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// Unicast out of this interface, no gateway (`dev IFNAME`, scope link).
    Device(String),
    /// Silently drop (`blackhole`).
    Blackhole,
    /// Only in read-back results: a route this module does not create (unreachable,
    /// gateway route, ...), described for logs.
    Other(String),
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteKind::Device(dev) => write!(f, "dev {dev}"),
            RouteKind::Blackhole => write!(f, "blackhole"),
            RouteKind::Other(desc) => write!(f, "{desc}"),
        }
    }
}

/// One route: `dst/prefix` in `table`, doing `kind`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix: u8,
    pub table: u32,
    pub kind: RouteKind,
}

impl Route {
    /// A device route for an IPv4 destination.
    pub fn device_v4(dst: Ipv4Addr, prefix: u8, table: u32, dev: impl Into<String>) -> Self {
        Route {
            dst: IpAddr::V4(dst),
            prefix,
            table,
            kind: RouteKind::Device(dev.into()),
        }
    }

    /// A blackhole route for an IPv4 destination.
    pub fn blackhole_v4(dst: Ipv4Addr, prefix: u8, table: u32) -> Self {
        Route {
            dst: IpAddr::V4(dst),
            prefix,
            table,
            kind: RouteKind::Blackhole,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {} table {}",
            self.dst, self.prefix, self.kind, self.table
        )
    }
}

/// A policy rule as read back from the kernel (only the fields the agent cares about).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleEntry {
    /// 4 or 6.
    pub ip_version: u8,
    pub priority: u32,
    pub table: u32,
    pub fwmark: Option<u32>,
    pub fwmask: Option<u32>,
    /// "to_table", "blackhole", ... (lower-case Debug of the rule action).
    pub action: String,
    /// True if the rule has selectors besides fwmark (source/destination prefix, interfaces,
    /// ...), i.e. it is not a plain fwmark rule.
    pub other_selectors: bool,
}

impl RuleEntry {
    /// Whether this is exactly the fwmark rule `add_fwmark_rule(mark, mask, table, priority)`
    /// would create.
    pub fn is_fwmark_rule(&self, mark: u32, mask: u32, table: u32, priority: u32) -> bool {
        self.ip_version == 4
            && self.priority == priority
            && self.table == table
            && self.fwmark == Some(mark)
            && self.fwmask.unwrap_or(u32::MAX) == mask
            && self.action == "to_table"
            && !self.other_selectors
    }
}

/// State of a link as read from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub mtu: Option<u32>,
    /// Transmit queue length, packets.
    pub txqueuelen: Option<u32>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// `IFLA_INFO_KIND` ("wireguard", "tun", "veth", ...), if the link reports one.
    pub kind: Option<String>,
}
