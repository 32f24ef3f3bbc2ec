//! The WireGuard tunnel between two agents, and the traffic plumbing that rides on it.
//!
//! Each pair of agents shares one tunnel. What both ends must agree on is derived from the
//! two public keys, so they agree without negotiating: the interface name and the /31 of
//! tunnel addresses. What only matters on one host (its listen port, and the firewall mark
//! and routing table that send the replies of flows that came in through the tunnel back
//! into it) comes from a slot that each host allocates among its own tunnels.
//!
//! Traffic plumbing on a host, per tunnel:
//! - connections that enter through the tunnel get conntrack mark `mark` (nft);
//! - packets of such connections from anywhere else get fwmark `mark` (nft), and
//!   `ip rule fwmark mark lookup table` sends them to `table`, whose default route is the
//!   tunnel: replies return the way the flow came, whatever the host's own routes say.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::kernel::nft::Firewall;
use crate::kernel::routing::{Route, Routing, AGENT_TABLE_MIN};
use crate::kernel::wireguard::{self, KeyPair, TunnelSpec};

/// The kernel's main routing table, where the agent routes a migrated container's address.
pub const MAIN_TABLE: u32 = 254;

/// Tunnel addresses come from this /16 of the shared address space (RFC 6598), which
/// container networks and LANs rarely use.
const TUNNEL_NET: [u8; 2] = [100, 127];
/// Base UDP port of tunnels; each peer gets its own, so one host can have many tunnels.
const BASE_LISTEN_PORT: u16 = 51800;
/// How many distinct tunnels (marks, tables, ports) one host can tell apart.
const SLOTS: u32 = 100;
/// So the source's end of a fresh tunnel announces itself at once and stays reachable.
const KEEPALIVE_SECS: u16 = 25;

/// One end of the tunnel between this agent and a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelEnd {
    pub interface: String,
    /// This end's tunnel address (/31 with the peer's).
    pub local_address: Ipv4Addr,
    pub peer_address: Ipv4Addr,
    pub listen_port: u16,
    /// Conntrack/fwmark for flows that entered through this tunnel.
    pub mark: u32,
    /// Routing table whose default route is this tunnel.
    pub table: u32,
    /// Rule priority of the fwmark rule.
    pub priority: u32,
}

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

/// Serialises slot choice and creation of tunnels in this process; [`HOST_LOCK`] does the
/// same between the agents of one host.
static ALLOCATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Locked (flock) while a tunnel's slot is chosen and the tunnel made: `agent-client` and
/// `agent-server` of one host may both be making one. In /run: the lock is about this
/// boot's links.
const HOST_LOCK: &str = "/run/live-migrate/tunnels.lock";

impl TunnelEnd {
    /// This host's end of the tunnel to `peer_public`: the one that exists (with its slot),
    /// or a new one in the first free slot, starting from the slot the peer's key
    /// suggests. Call [`TunnelEnd::bring_up`] to make sure it is up.
    pub async fn to_peer(local_public: &str, peer_public: &str) -> Result<Self> {
        let wanted = Self::with_slot(local_public, peer_public, preferred_slot(peer_public));
        let mut taken = Vec::new();
        for interface in wireguard::list_tunnels() {
            let Some(slot) = wireguard::tunnel_info(&interface)
                .await?
                .listen_port
                .and_then(slot_of_port)
            else {
                continue;
            };
            if interface == wanted.interface {
                return Ok(Self::with_slot(local_public, peer_public, slot));
            }
            taken.push(slot);
        }
        let slot = free_slot(preferred_slot(peer_public), &taken)
            .with_context(|| format!("all {SLOTS} tunnel slots of this host are in use"))?;
        Ok(Self::with_slot(local_public, peer_public, slot))
    }

    /// The end of an existing tunnel to `peer_public` listening on `listen_port`; `None`
    /// if that port belongs to no slot.
    pub fn existing(local_public: &str, peer_public: &str, listen_port: u16) -> Option<Self> {
        slot_of_port(listen_port).map(|slot| Self::with_slot(local_public, peer_public, slot))
    }

    /// [`TunnelEnd::to_peer`], brought up: created, or checked and repaired if it exists.
    /// `peer_endpoint` is where the peer listens, if known (the side that connects knows it).
    pub async fn ensure(
        keys: &KeyPair,
        peer_public: &str,
        peer_endpoint: Option<SocketAddr>,
    ) -> Result<Self> {
        let _in_this_process = ALLOCATION.lock().await;
        let _on_this_host = lock_host().await?;
        let end = Self::to_peer(&keys.public_base64(), peer_public).await?;
        end.bring_up(keys, peer_public, peer_endpoint).await?;
        Ok(end)
    }

    /// The peer's agent, listening on `port`, as reached through this tunnel.
    pub fn peer_agent(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.peer_address.into(), port)
    }

    fn with_slot(local_public: &str, peer_public: &str, slot: u32) -> Self {
        // Addresses depend on the pair, lower key takes the even address.
        let (low, high) = if local_public < peer_public {
            (local_public, peer_public)
        } else {
            (peer_public, local_public)
        };
        let pair = digest(&[low, high]);
        let even = pair[1] & 0xfe;
        let base = [TUNNEL_NET[0], TUNNEL_NET[1], pair[0], even];
        let low_addr = Ipv4Addr::from(base);
        let high_addr = Ipv4Addr::from([base[0], base[1], base[2], even + 1]);
        let (local_address, peer_address) = if local_public == low {
            (low_addr, high_addr)
        } else {
            (high_addr, low_addr)
        };
        Self {
            interface: format!(
                "{}{}",
                wireguard::INTERFACE_PREFIX,
                &hex::encode(digest(&[peer_public]))[..8]
            ),
            local_address,
            peer_address,
            listen_port: BASE_LISTEN_PORT + slot as u16,
            mark: AGENT_TABLE_MIN + slot,
            table: AGENT_TABLE_MIN + slot,
            priority: AGENT_TABLE_MIN + slot,
        }
    }

    /// Creates or reuses this end: the WireGuard interface (everything allowed: it has one
    /// peer, routes decide what goes in), its address, and the mark/rule/table plumbing.
    async fn bring_up(
        &self,
        keys: &KeyPair,
        peer_public: &str,
        peer_endpoint: Option<SocketAddr>,
    ) -> Result<()> {
        let spec = TunnelSpec {
            interface: self.interface.clone(),
            private_key: keys.private_key().clone(),
            listen_port: self.listen_port,
            peer_public_key: peer_public.to_string(),
            peer_endpoint,
            allowed_ips: vec![(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)],
            keepalive: peer_endpoint.map(|_| KEEPALIVE_SECS),
        };
        let routing = Routing::new()?;
        self.check_no_overlap(&routing).await?;
        wireguard::ensure_tunnel(&spec)
            .await
            .with_context(|| format!("tunnel {}", self.interface))?;
        routing
            .add_address(&self.interface, IpAddr::V4(self.local_address), 31)
            .await?;
        routing
            .replace_route(&Route::device_v4(
                Ipv4Addr::UNSPECIFIED,
                0,
                self.table,
                self.interface.clone(),
            ))
            .await?;
        routing
            .add_fwmark_rule(self.mark, u32::MAX, self.table, self.priority)
            .await?;
        let (interface, mark) = (self.interface.clone(), self.mark);
        // nft is driven through its CLI by the nftables crate: keep it off the async threads.
        tokio::task::spawn_blocking(move || Firewall::ensure()?.mark_tunnel(&interface, mark))
            .await??;
        Ok(())
    }

    /// The tunnel's /31 must not overlap an address of any other link of this host, or the
    /// host would route some of its own traffic into the tunnel.
    async fn check_no_overlap(&self, routing: &Routing) -> Result<()> {
        for link in routing.links().await? {
            if link.name == self.interface {
                continue;
            }
            for (addr, prefix) in routing.addresses(&link.name).await? {
                let IpAddr::V4(addr) = addr else { continue };
                if overlaps(self.local_address, addr, prefix) {
                    anyhow::bail!(
                        "tunnel addresses {}/31 overlap {addr}/{prefix} on {}; free that range or move the tunnel network",
                        self.local_address,
                        link.name
                    );
                }
            }
        }
        Ok(())
    }

    /// Removes this end and all its plumbing. Missing pieces are not an error.
    pub async fn tear_down(&self) -> Result<()> {
        let routing = Routing::new()?;
        routing
            .delete_fwmark_rule(self.mark, u32::MAX, self.table, self.priority)
            .await?;
        routing
            .delete_route(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, self.table)
            .await?;
        let interface = self.interface.clone();
        tokio::task::spawn_blocking(move || Firewall::ensure()?.unmark_tunnel(&interface))
            .await??;
        wireguard::remove_tunnel(&self.interface).await
    }
}

/// Waits for [`HOST_LOCK`]; it is held until the returned file is dropped.
async fn lock_host() -> Result<std::fs::File> {
    let path = std::path::Path::new(HOST_LOCK);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let file = std::fs::File::create(path).with_context(|| format!("create {HOST_LOCK}"))?;
    tokio::task::spawn_blocking(move || {
        file.lock()
            .with_context(|| format!("lock {HOST_LOCK}"))
            .map(|()| file)
    })
    .await?
}

/// The slot the peer's key suggests: spreads peers over the slots, so most hosts never
/// need a second choice.
fn preferred_slot(peer_public: &str) -> u32 {
    let peer = digest(&[peer_public]);
    u32::from_be_bytes([peer[0], peer[1], peer[2], peer[3]]) % SLOTS
}

fn slot_of_port(port: u16) -> Option<u32> {
    let slot = u32::from(port.checked_sub(BASE_LISTEN_PORT)?);
    (slot < SLOTS).then_some(slot)
}

/// The first slot from `preferred` on (wrapping) that is not `taken`.
fn free_slot(preferred: u32, taken: &[u32]) -> Option<u32> {
    (0..SLOTS)
        .map(|i| (preferred + i) % SLOTS)
        .find(|slot| !taken.contains(slot))
}

/// Whether the /31 holding `tunnel_address` and the network `addr/prefix` share an address.
fn overlaps(tunnel_address: Ipv4Addr, addr: Ipv4Addr, prefix: u8) -> bool {
    // The larger of the two blocks contains the other iff their common bits agree.
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(31)))
        .unwrap_or(0);
    u32::from(tunnel_address) & mask == u32::from(addr) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_agree() {
        let (a, b) = ("AAAApublicKeyOfHostA=", "BBBBpublicKeyOfHostB=");
        let at_a = TunnelEnd::with_slot(a, b, 3);
        let at_b = TunnelEnd::with_slot(b, a, 17);
        assert_eq!(at_a.local_address, at_b.peer_address);
        assert_eq!(at_a.peer_address, at_b.local_address);
        assert_ne!(at_a.local_address, at_a.peer_address);
        assert!(at_a.interface.len() <= 15);
        assert!(at_a.interface.starts_with("lmwg-"));
        assert_eq!(at_a.local_address.octets()[..2], TUNNEL_NET);
        // One /31: the addresses differ in the last bit only.
        assert_eq!(
            u32::from(at_a.local_address) ^ u32::from(at_a.peer_address),
            1
        );
    }

    #[test]
    fn slots_avoid_the_taken_ones_and_wrap() {
        assert_eq!(free_slot(5, &[]), Some(5));
        assert_eq!(free_slot(5, &[5, 6]), Some(7));
        assert_eq!(free_slot(SLOTS - 1, &[SLOTS - 1]), Some(0));
        let all: Vec<u32> = (0..SLOTS).collect();
        assert_eq!(free_slot(0, &all), None);
        assert_eq!(slot_of_port(BASE_LISTEN_PORT + 7), Some(7));
        assert_eq!(slot_of_port(BASE_LISTEN_PORT - 1), None);
        assert_eq!(slot_of_port(BASE_LISTEN_PORT + SLOTS as u16), None);
    }

    #[test]
    fn overlap_detection() {
        let t = Ipv4Addr::new(100, 127, 4, 6);
        assert!(overlaps(t, Ipv4Addr::new(100, 127, 0, 1), 16));
        assert!(overlaps(t, Ipv4Addr::new(100, 127, 4, 7), 32));
        assert!(overlaps(t, Ipv4Addr::new(100, 127, 4, 6), 31));
        assert!(!overlaps(t, Ipv4Addr::new(100, 127, 4, 8), 30));
        assert!(!overlaps(t, Ipv4Addr::new(10, 88, 0, 1), 16));
        assert!(!overlaps(t, Ipv4Addr::new(127, 0, 0, 1), 8));
    }

    #[test]
    fn numbers_stay_in_the_agent_ranges() {
        let end = TunnelEnd::with_slot("x", "y", preferred_slot("y"));
        assert!(crate::kernel::routing::AGENT_TABLES.contains(&end.table));
        assert!(crate::kernel::routing::AGENT_RULE_PRIORITIES.contains(&end.priority));
        assert!((BASE_LISTEN_PORT..BASE_LISTEN_PORT + SLOTS as u16).contains(&end.listen_port));
    }
}
