//! The destination's actions on the real host: podman, the cgroup freezer, conntrack, and
//! the route and packet hold of the container's address.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};

use super::post_copy;
use super::{DestinationActions, IncomingMigration, Shared};
use crate::engine::podman::PodmanClient;
use crate::kernel::conntrack::{self, Flow};
use crate::protocol::HoldReport;

impl DestinationActions for PodmanClient {
    async fn container(&self, id: &str) -> Result<Option<bool>> {
        Ok(self.find(id).await?.map(|c| c.running))
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        Ok(self.remove(id).await?)
    }

    async fn stop_container(&self, id: &str) -> Result<()> {
        let Some(info) = self.find(id).await? else {
            return Ok(());
        };
        // Frozen first, so no thread runs while the others die; killed through its init
        // (the kernel then kills the rest of its PID namespace); thawed, to let them die.
        if let Some(cgroup) = info.cgroup_path.clone() {
            tokio::task::spawn_blocking(move || crate::kernel::freezer::freeze(&cgroup)).await??;
        }
        if let Some(pid) = info.pid {
            crate::kernel::process::kill_in(pid, id)
                .with_context(|| format!("kill container {id} (pid {pid})"))?;
        }
        if let Some(cgroup) = info.cgroup_path {
            tokio::task::spawn_blocking(move || crate::kernel::freezer::thaw(&cgroup)).await??;
        }
        Ok(self.remove(id).await?)
    }

    async fn resume_container(&self, id: &str, cgroup: Option<&str>) -> Result<()> {
        let cgroup =
            match cgroup {
                Some(cgroup) => cgroup.to_string(),
                None => self.inspect(id).await?.cgroup_path.with_context(|| {
                    format!("podman did not say which cgroup container {id} is in")
                })?,
            };
        let pids = tokio::task::spawn_blocking(move || crate::kernel::freezer::processes(&cgroup))
            .await??;
        // A process gone since the cgroup was read is passed over: in the lab, where the
        // hosts share one cgroup tree, the source's copy, which CRIU ended, is listed too.
        crate::kernel::process::resume_all(&pids)
            .map_err(|(pid, e)| anyhow::anyhow!("resume pid {pid} of {id}: {e}"))
    }

    async fn delete_flow(&self, flow: &Flow) -> Result<()> {
        conntrack::delete(flow).await
    }

    async fn release_ip(
        &self,
        ip: Ipv4Addr,
        into_tunnel: Option<&str>,
    ) -> Result<Option<HoldReport>> {
        match into_tunnel {
            Some(interface) => {
                crate::migration::switch::route_container_into(ip, interface).await?
            }
            None => crate::migration::switch::route_container_locally(ip).await?,
        }
        crate::kernel::hold::release(ip).await
    }

    fn take_over_pages(
        &self,
        state_dir: &Path,
        shared: &Shared,
        migration: &mut IncomingMigration,
    ) -> String {
        post_copy::take_over(state_dir, shared, migration, self.clone())
    }
}
