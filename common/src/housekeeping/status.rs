//! `agent-client status`: the tunnels, forwarding, migrations and history of this host.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::tunnels::tunnels;
use crate::kernel::conntrack;
use crate::migration::destination::{self, Journaled};
use crate::migration::forwarding::ForwardRecord;
use crate::migration::history::{self, HistoryEntry};
use crate::migration::ownership::{DestinationStage, SourceStage};
use crate::migration::source::journal;

/// Migrations `agent-client status` shows.
pub const HISTORY_SHOWN: usize = 10;

#[derive(Debug, Serialize)]
pub struct HostStatus {
    pub hostname: String,
    /// An `agent-server` runs on this state directory.
    pub server_running: bool,
    pub tunnels: Vec<TunnelStatus>,
    pub forwards: Vec<ForwardStatus>,
    /// Migrations under way (or abandoned by a crashed agent) on this host.
    pub migrations: Vec<MigrationStatus>,
    /// The last migrations this host took part in, oldest first.
    pub history: Vec<HistoryEntry>,
}

#[derive(Debug, Serialize)]
pub struct TunnelStatus {
    pub interface: String,
    pub local_address: Ipv4Addr,
    pub peer_address: Ipv4Addr,
    pub endpoint: Option<String>,
    /// Seconds since the last WireGuard handshake.
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Flows of containers that arrived here whose replies go back through it.
    pub returning_flows: usize,
    /// Containers that left here and are forwarded through it.
    pub forwarded_containers: usize,
}

#[derive(Debug, Serialize)]
pub struct ForwardStatus {
    pub container: String,
    pub container_ip: Ipv4Addr,
    pub next_agent: String,
    pub ports: Vec<String>,
    /// Live flows of the container through this host.
    pub flows: usize,
    pub downstream_alive: bool,
}

#[derive(Debug, Serialize)]
pub struct MigrationStatus {
    pub direction: history::Direction,
    pub container: String,
    /// Its agent still runs; otherwise `cleanup` finishes it.
    pub running: bool,
    pub detail: String,
}

/// Everything the agents keep on this host, with the last `history` migrations.
pub async fn status(state_dir: &Path, history: usize) -> Result<HostStatus> {
    let flows = conntrack::list().await?;
    let records = ForwardRecord::load_all(state_dir);
    let tunnels = tunnels(state_dir, &flows, &records)
        .await?
        .into_iter()
        .map(|t| {
            let peer = t.info.peers.first();
            TunnelStatus {
                interface: t.end.interface.clone(),
                local_address: t.end.local_address,
                peer_address: t.end.peer_address,
                endpoint: peer.and_then(|p| p.endpoint).map(|e| e.to_string()),
                last_handshake_secs: peer
                    .and_then(|p| p.last_handshake)
                    .and_then(|t| t.elapsed().ok())
                    .map(|d| d.as_secs()),
                rx_bytes: peer.map_or(0, |p| p.rx_bytes),
                tx_bytes: peer.map_or(0, |p| p.tx_bytes),
                returning_flows: t.returning_flows,
                forwarded_containers: t.forwarded_containers,
            }
        })
        .collect();
    let forwards = records
        .iter()
        .map(|r| ForwardStatus {
            container: r.container_name.clone(),
            container_ip: r.container_ip,
            next_agent: r.next_agent.to_string(),
            ports: r
                .ports
                .iter()
                .map(|(proto, port)| format!("{proto}/{port}"))
                .collect(),
            flows: conntrack::involving(&flows, IpAddr::V4(r.container_ip)).len(),
            downstream_alive: r.downstream_alive,
        })
        .collect();
    let server_running = destination::server_running(state_dir);
    let mut migrations: Vec<MigrationStatus> = journal::list(state_dir)
        .into_iter()
        .map(|j| {
            let (container, detail) = match &j.record {
                Some(r) => (
                    r.container.clone(),
                    format!("to {}, {}", r.destination, source_stage(r.stage)),
                ),
                None => (
                    "?".into(),
                    format!("unreadable journal {}", j.path.display()),
                ),
            };
            MigrationStatus {
                direction: history::Direction::Outgoing,
                container,
                running: j.running,
                detail,
            }
        })
        .collect();
    migrations.extend(destination::list(state_dir).into_iter().map(|journaled| {
        let (container, detail) = match journaled {
            Journaled::Readable(m) => (
                m.container.name,
                format!("from {}, {}", m.source, destination_stage(m.stage)),
            ),
            Journaled::Unreadable { path, error } => (
                "?".into(),
                format!("unreadable journal {}: {error}", path.display()),
            ),
        };
        MigrationStatus {
            direction: history::Direction::Incoming,
            container,
            running: server_running,
            detail,
        }
    }));
    Ok(HostStatus {
        hostname: crate::migration::preflight::hostname(),
        server_running,
        tunnels,
        forwards,
        migrations,
        history: history::recent(state_dir, history),
    })
}

fn source_stage(stage: SourceStage) -> &'static str {
    match stage {
        SourceStage::Running => "preparing",
        SourceStage::Frozen => "frozen here",
        SourceStage::RestoreRequested => {
            "restore requested: in doubt until the destination answers"
        }
        SourceStage::Streaming => {
            "memory streaming into the destination's stopped replica: decided by the processes here"
        }
        SourceStage::DestinationOwns => "destination owns it",
    }
}

fn destination_stage(stage: DestinationStage) -> &'static str {
    match stage {
        DestinationStage::Receiving => "receiving",
        DestinationStage::Restoring => "restoring",
        DestinationStage::Replica => {
            "stopped replica, waiting for the source to resume or fence it"
        }
        DestinationStage::Owns => "runs here, waiting for the source to settle",
        DestinationStage::Fenced => "fenced",
    }
}
