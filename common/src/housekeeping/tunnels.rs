//! The agent's tunnels on this host and what still uses them: `status` shows them,
//! `cleanup` removes the unused ones.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Result;

use crate::kernel::conntrack::Flow;
use crate::kernel::overlay::TunnelEnd;
use crate::kernel::wireguard::{self, KeyPair};
use crate::migration::forwarding::ForwardRecord;

/// A tunnel of this host, and what still uses it.
pub(super) struct Tunnel {
    pub end: TunnelEnd,
    pub info: wireguard::TunnelInfo,
    pub returning_flows: usize,
    pub forwarded_containers: usize,
}

impl Tunnel {
    pub fn in_use(&self) -> bool {
        self.returning_flows > 0 || self.forwarded_containers > 0
    }
}

/// The agent's tunnels here, with their use by `flows` and the forward `records`.
pub(super) async fn tunnels(
    state_dir: &Path,
    flows: &[Flow],
    records: &[ForwardRecord],
) -> Result<Vec<Tunnel>> {
    let ours = KeyPair::load_or_create(state_dir)?.public_base64();
    let mut out = Vec::new();
    for interface in wireguard::list_tunnels() {
        let info = wireguard::tunnel_info(&interface).await?;
        let Some(end) = info
            .peers
            .first()
            .zip(info.listen_port)
            .and_then(|(peer, port)| TunnelEnd::existing(&ours, &peer.public_key, port))
        else {
            continue;
        };
        if end.interface != interface {
            // Made with another key pair (another state directory): not ours to judge.
            continue;
        }
        let returning_flows = flows.iter().filter(|f| f.mark == end.mark).count();
        let forwarded_containers = records
            .iter()
            .filter(|r| r.next_agent.ip() == IpAddr::V4(end.peer_address))
            .count();
        out.push(Tunnel {
            end,
            info,
            returning_flows,
            forwarded_containers,
        });
    }
    Ok(out)
}
