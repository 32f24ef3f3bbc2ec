//! What the agents keep on this host, for `agent-client status` ([`status`]), and its
//! removal once nothing needs it, for `agent-client cleanup` ([`clean_up`]).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::auth::Token;
use crate::conntrack::{self, Flow, Proto};
use crate::forwarding::{self, ForwardRecord};
use crate::history::{self, HistoryEntry};
use crate::migration::destination::{self, Journaled, Registry};
use crate::migration::journal;
use crate::migration::ownership::{DestinationStage, SourceStage};
use crate::migration::source::{self, SourceHost};
use crate::nft::{Firewall, RuleKind};
use crate::overlay::{TunnelEnd, MAIN_TABLE};
use crate::podman::PodmanClient;
use crate::routing::{RouteKind, Routing};
use crate::wireguard::{self, KeyPair};

/// Migrations shown by `status`.
const HISTORY_SHOWN: usize = 10;

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

/// A tunnel of this host, and what still uses it.
struct Tunnel {
    end: TunnelEnd,
    info: wireguard::TunnelInfo,
    returning_flows: usize,
    forwarded_containers: usize,
}

impl Tunnel {
    fn in_use(&self) -> bool {
        self.returning_flows > 0 || self.forwarded_containers > 0
    }
}

/// The agent's tunnels here, with their use by `flows` and the forward `records`.
async fn tunnels(
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

/// Everything the agents keep on this host.
pub async fn status(state_dir: &Path) -> Result<HostStatus> {
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
        hostname: crate::preflight::hostname(),
        server_running,
        tunnels,
        forwards,
        migrations,
        history: history::recent(state_dir, HISTORY_SHOWN),
    })
}

/// Removes what the agents keep on this host and nothing needs any more; returns one line
/// per thing removed:
/// - migrations whose `agent-client` died: rolled back, or finished if the destination
///   had taken over ([`source::recover_abandoned`]);
/// - with no `agent-server` running: its unfinished incoming sessions, as its restart
///   would ([`destination::recover`]);
/// - a lazy-dump configuration of CRIU's that a crash left ([`crate::lazy_pages`]);
/// - forwarding of containers that left and that no flow needs ([`forwarding::sweep`]);
/// - with no migration under way: tunnels no flow and no forwarding uses, and routes and
///   port forwards into tunnels that no forward record explains.
pub async fn clean_up(
    state_dir: &Path,
    podman: &PodmanClient,
    token: &Token,
    destination_lost: bool,
) -> Result<Vec<String>> {
    let host = SourceHost {
        podman,
        token,
        state_dir,
    };
    let mut done = source::recover_abandoned(&host, destination_lost).await;
    done.extend(crate::lazy_pages::remove_stale_config()?);
    // As the server's restart would, holding its lock so that it cannot start meanwhile;
    // what it keeps stays journaled for it.
    if let Ok(_server) = destination::lock_server(state_dir) {
        done.extend(destination::recover(state_dir, podman, &Registry::default()).await?);
    }
    done.extend(forwarding::sweep(state_dir, podman, token).await?);

    let busy = !journal::list(state_dir).is_empty() || !destination::list(state_dir).is_empty();
    if busy {
        done.push("a migration is under way: tunnels and routes left alone".into());
        return Ok(done);
    }
    let records = ForwardRecord::load_all(state_dir);
    let flows = conntrack::list().await?;
    for tunnel in tunnels(state_dir, &flows, &records).await? {
        if !tunnel.in_use() {
            tunnel.end.tear_down().await?;
            done.push(format!(
                "tunnel {} to {} removed: nothing uses it",
                tunnel.end.interface, tunnel.end.peer_address
            ));
        }
    }
    done.extend(remove_orphan_routes(&records).await?);
    done.extend(remove_orphan_port_forwards(&records).await?);
    Ok(done)
}

/// /32 routes in the main table into an agent tunnel for an address no record forwards
/// (left by an agent that died between routing and writing its record).
async fn remove_orphan_routes(records: &[ForwardRecord]) -> Result<Vec<String>> {
    let routing = Routing::new()?;
    let mut done = Vec::new();
    for route in routing.routes_in_table(MAIN_TABLE).await? {
        let RouteKind::Device(dev) = &route.kind else {
            continue;
        };
        let IpAddr::V4(ip) = route.dst else {
            continue;
        };
        if dev.starts_with(wireguard::INTERFACE_PREFIX)
            && route.prefix == 32
            && !records.iter().any(|r| r.container_ip == ip)
        {
            routing.delete_route(route.dst, 32, MAIN_TABLE).await?;
            done.push(format!(
                "route of {ip} into {dev} removed: nothing forwards it"
            ));
        }
    }
    Ok(done)
}

/// Port forwards of the agent's nft table that no record explains.
async fn remove_orphan_port_forwards(records: &[ForwardRecord]) -> Result<Vec<String>> {
    let explained: Vec<(Proto, u16)> = records.iter().flat_map(|r| r.ports.clone()).collect();
    tokio::task::spawn_blocking(move || {
        if !Firewall::table_exists()? {
            return Ok(Vec::new());
        }
        let firewall = Firewall::ensure()?;
        let mut done = Vec::new();
        for rule in firewall.rules()? {
            if let RuleKind::ForwardPort {
                proto,
                host_port,
                container,
            } = rule.kind
            {
                if !explained.contains(&(proto, host_port)) {
                    firewall.unforward_port(proto, host_port)?;
                    done.push(format!(
                        "forward of {proto}/{host_port} to {container} removed: nothing forwards it"
                    ));
                }
            }
        }
        Ok(done)
    })
    .await?
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
