//! `agent-client cleanup`: the removal of what the agents keep on this host and nothing
//! needs any more.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Result;

use super::tunnels::tunnels;
use crate::engine::podman::PodmanClient;
use crate::kernel::conntrack::{self, Proto};
use crate::kernel::nft::{Firewall, RuleKind};
use crate::kernel::overlay::MAIN_TABLE;
use crate::kernel::routing::{RouteKind, Routing};
use crate::kernel::wireguard;
use crate::migration::destination::{self, Registry};
use crate::migration::forwarding::{self, ForwardRecord};
use crate::migration::source::journal;
use crate::migration::source::{self, SourceHost};
use crate::session::auth::Token;

/// Removes what the agents keep on this host and nothing needs any more; returns one line
/// per thing removed:
/// - migrations whose `agent-client` died: rolled back, or finished if the destination
///   had taken over ([`source::recover_abandoned`]);
/// - with no `agent-server` running: its unfinished incoming sessions, as its restart
///   would ([`destination::recover`]);
/// - a lazy-dump configuration of CRIU's that a crash left ([`crate::engine::lazy_pages`]);
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
    done.extend(crate::engine::lazy_pages::remove_stale_config()?);
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
