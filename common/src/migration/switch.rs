//! The switch of traffic on the source, once the destination owns the container: its
//! address into the tunnel, new connections to its published ports after it, and the
//! forward record that keeps them until nothing needs them.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::engine::podman::ContainerInfo;
use crate::kernel::conntrack::Proto;
use crate::kernel::nft::Firewall;
use crate::kernel::overlay::{TunnelEnd, MAIN_TABLE};
use crate::kernel::routing::{Route, RouteKind, Routing};
use crate::migration::forwarding::ForwardRecord;
use crate::protocol::HoldReport;

/// Everything the switch of traffic needs, journaled before the restore request so that
/// whoever finishes the migration (after a crash too) can switch it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchPlan {
    pub container_id: String,
    pub container_name: String,
    pub container_ip: Ipv4Addr,
    /// The tunnel to the destination.
    pub interface: String,
    /// The destination agent, reached through the tunnel (its address stays the same if
    /// the LAN's changes).
    pub next_agent: SocketAddr,
    /// Published ports whose new connections go to the container: (protocol, host port,
    /// container port). Empty with `--no-forward-new`.
    pub ports: Vec<(Proto, u16, u16)>,
}

impl SwitchPlan {
    pub fn new(
        tunnel: &TunnelEnd,
        container_ip: Ipv4Addr,
        container: &ContainerInfo,
        forward_new_connections: bool,
        agent_port: u16,
    ) -> Self {
        let ports = if forward_new_connections {
            container
                .published_ports
                .iter()
                .map(|port| (port.protocol, port.host_port, port.container_port))
                .collect()
        } else {
            Vec::new()
        };
        Self {
            container_id: container.id.clone(),
            container_name: container.name.clone(),
            container_ip,
            interface: tunnel.interface.clone(),
            next_agent: tunnel.peer_agent(agent_port),
            ports,
        }
    }
}

/// Switch traffic: flows that still arrive here for the container go through the tunnel,
/// the packets held during the freeze first. Runs after the destination owns the
/// container, so it is never undone; every step is idempotent, so it can be run again
/// after a crash. Returns what the hold did, if this process held the packets, and what
/// `then` returned: it runs once the held packets are on their way (or the switch
/// failed), while the hold's rule goes, so that the destination, told there, lets its own
/// held packets go without waiting for that nftables commit. New connections follow with
/// [`forward_new_connections`], for the same reason.
pub async fn switch_traffic<T>(
    plan: &SwitchPlan,
    then: impl Future<Output = T>,
) -> (Result<Option<HoldReport>>, T) {
    if let Err(e) = route_container_into(plan.container_ip, &plan.interface).await {
        return (Err(e), then.await);
    }
    let mut releasing = crate::kernel::hold::start_release(plan.container_ip);
    releasing.held_through().await;
    let then = then.await;
    (releasing.finish().await, then)
}

/// New connections to the container's published ports in the plan go through the tunnel
/// too, and a forward record tells `agent-server` to remove all this once nothing needs it
/// ([`crate::migration::forwarding`]). Idempotent, never undone, like [`switch_traffic`].
pub async fn forward_new_connections(plan: &SwitchPlan, state_dir: &Path) -> Result<()> {
    for &(protocol, host_port, container_port) in &plan.ports {
        let container_ip = plan.container_ip;
        tokio::task::spawn_blocking(move || {
            Firewall::ensure()?.forward_port(protocol, host_port, container_ip, container_port)
        })
        .await??;
    }
    ForwardRecord {
        container_id: plan.container_id.clone(),
        container_name: plan.container_name.clone(),
        container_ip: plan.container_ip,
        next_agent: plan.next_agent,
        ports: plan.ports.iter().map(|&(p, h, _)| (p, h)).collect(),
        downstream_alive: true,
    }
    .save(state_dir)?;
    Ok(())
}

/// Undo of the blackhole route [`crate::migration::phases::checkpoint`] makes for the container.
pub async fn route_container_locally(container_ip: Ipv4Addr) -> Result<()> {
    Routing::new()?
        .delete_route(IpAddr::V4(container_ip), 32, MAIN_TABLE)
        .await?;
    Ok(())
}

/// Routes the container's address into the tunnel `interface`, to where it lives now.
pub async fn route_container_into(container_ip: Ipv4Addr, interface: &str) -> Result<()> {
    Routing::new()?
        .replace_route(&Route::device_v4(container_ip, 32, MAIN_TABLE, interface))
        .await
}

/// The tunnel this host routes the container's address into, if it does: the container
/// lived here and moved on.
pub async fn tunnel_of(container_ip: Ipv4Addr) -> Result<Option<String>> {
    let routes = Routing::new()?.routes_in_table(MAIN_TABLE).await?;
    Ok(routes.into_iter().find_map(|route| match route.kind {
        RouteKind::Device(interface)
            if route.dst == IpAddr::V4(container_ip) && route.prefix == 32 =>
        {
            Some(interface)
        }
        _ => None,
    }))
}
