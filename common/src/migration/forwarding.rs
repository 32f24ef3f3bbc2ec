//! What a former host of a container keeps so that flows still arriving there reach it: a
//! route of the container's address into the tunnel, and DNAT of new connections to its
//! published ports. Each migration that leaves such state writes a record to the state
//! directory; `agent-server` sweeps the records ([`sweep`]) and removes the state once
//! nothing needs it: the container no longer lives downstream (at the host it went to, or
//! wherever that host forwards it), so no flow through here can reach it anyway.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::podman::{ContainerInfo, PodmanClient};
use crate::kernel::conntrack::Proto;
use crate::kernel::nft::Firewall;
use crate::kernel::overlay::MAIN_TABLE;
use crate::kernel::routing::Routing;
use crate::session::auth::Token;
use crate::session::remote::RemoteAgent;

/// Removes the forwarding of every record that nothing needs any more: the container is
/// local again, or the next host says it no longer lives there or downstream. Forwarding
/// also yields to a new local container that took the address or a published port: its
/// traffic is never sent to the departed one. Run periodically by `agent-server` and once
/// by `agent-client cleanup`; returns what it removed.
pub async fn sweep(state_dir: &Path, podman: &PodmanClient, token: &Token) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let records = ForwardRecord::load_all(state_dir);
    let local = if records.is_empty() {
        Vec::new()
    } else {
        podman.list_running().await?
    };
    for record in records {
        // One record that cannot be handled does not hold up the others.
        match sweep_record(record, &local, state_dir, token).await {
            Ok(done) => removed.extend(done),
            Err(e) => tracing::warn!("forwarding sweep: {e:#}"),
        }
    }
    for line in &removed {
        tracing::info!("{line}");
    }
    Ok(removed)
}

/// Sweeps one record: what it removed of its forwarding.
async fn sweep_record(
    mut record: ForwardRecord,
    local: &[ContainerInfo],
    state_dir: &Path,
    token: &Token,
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    // Running, not merely there: the stopped source copy stays until the migration that
    // wrote this record has removed it.
    if local.iter().any(|c| c.id == record.container_id) {
        // It came back: the restore owns its route now, the forwards are stale.
        record.remove(state_dir, true).await?;
        removed.push(format!(
            "{}: local again, forwarding removed",
            record.container_name
        ));
        return Ok(removed);
    }
    let others = local.iter().filter(|c| c.id != record.container_id);
    if let Some(squatter) = others
        .clone()
        .find(|c| c.ipv4() == Some(record.container_ip))
    {
        record.remove(state_dir, false).await?;
        removed.push(format!(
            "{}: its address {} belongs to local container {} now, forwarding removed",
            record.container_name, record.container_ip, squatter.name
        ));
        return Ok(removed);
    }
    let taken: Vec<(Proto, u16)> = record
        .ports
        .iter()
        .copied()
        .filter(|&(proto, port)| {
            others.clone().any(|c| {
                c.published_ports
                    .iter()
                    .any(|p| p.host_port == port && p.protocol == proto)
            })
        })
        .collect();
    if !taken.is_empty() {
        record.unforward(&taken).await?;
        record.ports.retain(|p| !taken.contains(p));
        record.save(state_dir)?;
        removed.push(format!(
            "{}: port(s) {} published by a local container now, their forwarding removed",
            record.container_name,
            taken
                .iter()
                .map(|(proto, port)| format!("{proto}/{port}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let downstream_alive = match record.ask_downstream(token).await {
        Ok(alive) => alive,
        Err(e) => {
            // Unknown is not gone: keep forwarding until the next host answers.
            tracing::debug!(container = %record.container_name, "cannot ask {}: {e:#}", record.next_agent);
            record.downstream_alive
        }
    };
    if !downstream_alive {
        record.remove(state_dir, false).await?;
        removed.push(format!(
            "{}: gone downstream, forwarding removed",
            record.container_name
        ));
    } else if downstream_alive != record.downstream_alive {
        record.downstream_alive = downstream_alive;
        record.save(state_dir)?;
    }
    Ok(removed)
}

/// Directory of the records, under the agent's state directory.
pub fn records_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("forwards")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForwardRecord {
    pub container_id: String,
    pub container_name: String,
    pub container_ip: Ipv4Addr,
    /// The agent the container went to, reached through the tunnel.
    pub next_agent: SocketAddr,
    /// Published ports whose new connections are forwarded.
    pub ports: Vec<(Proto, u16)>,
    /// Whether the container lived downstream at the last sweep.
    pub downstream_alive: bool,
}

impl ForwardRecord {
    pub fn path(&self, state_dir: &Path) -> PathBuf {
        records_dir(state_dir).join(format!("{}.json", self.container_id))
    }

    pub fn save(&self, state_dir: &Path) -> Result<PathBuf> {
        let dir = records_dir(state_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = self.path(state_dir);
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// All records in `state_dir`; unreadable ones are skipped with a warning.
    pub fn load_all(state_dir: &Path) -> Vec<ForwardRecord> {
        let Ok(entries) = std::fs::read_dir(records_dir(state_dir)) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let bytes = std::fs::read(e.path()).ok()?;
                match serde_json::from_slice(&bytes) {
                    Ok(record) => Some(record),
                    Err(err) => {
                        tracing::warn!(path = %e.path().display(), "unreadable forward record: {err}");
                        None
                    }
                }
            })
            .collect()
    }

    /// Asks the host the container went to whether it still lives there or downstream.
    async fn ask_downstream(&self, token: &Token) -> Result<bool> {
        let mut agent = RemoteAgent::connect(&self.next_agent.to_string(), token).await?;
        let alive = agent.query_container(&self.container_id).await?;
        agent.finish().await?;
        Ok(alive)
    }

    /// Stops forwarding new connections and forgets the record. With `keep_route` the
    /// container's /32 route is left alone (the container is local again and its route
    /// belongs to the restore).
    pub async fn remove(&self, state_dir: &Path, keep_route: bool) -> Result<()> {
        if !keep_route {
            Routing::new()?
                .delete_route(IpAddr::V4(self.container_ip), 32, MAIN_TABLE)
                .await?;
        }
        self.unforward(&self.ports).await?;
        Ok(crate::files::remove_if_present(&self.path(state_dir))?)
    }

    /// Stops forwarding new connections to `ports`.
    async fn unforward(&self, ports: &[(Proto, u16)]) -> Result<()> {
        let ports = ports.to_vec();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let firewall = Firewall::ensure()?;
            for (proto, port) in ports {
                firewall.unforward_port(proto, port)?;
            }
            Ok(())
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrips_through_the_state_dir() {
        let dir = std::env::temp_dir().join(format!("lm-forward-test-{}", std::process::id()));
        let record = ForwardRecord {
            container_id: "abc".into(),
            container_name: "web".into(),
            container_ip: Ipv4Addr::new(10, 88, 1, 2),
            next_agent: "100.127.0.1:7878".parse().unwrap(),
            ports: vec![(Proto::Tcp, 5000)],
            downstream_alive: true,
        };
        let path = record.save(&dir).unwrap();
        assert!(path.ends_with("forwards/abc.json"));
        assert_eq!(ForwardRecord::load_all(&dir), vec![record]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(ForwardRecord::load_all(&dir).is_empty());
    }
}
