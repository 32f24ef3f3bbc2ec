//! Removes forwarding state this host keeps for containers that moved away, once nothing
//! needs it (see `common::forwarding`): no flow of the container passes here any more, and
//! the host it went to says it no longer lives there or downstream.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::forwarding::ForwardRecord;
use common::remote::RemoteAgent;

use crate::ServerContext;

/// Runs [`sweep`] every `interval`, for ever.
pub async fn run(context: Arc<ServerContext>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = sweep(&context).await {
            tracing::warn!("forwarding sweep failed: {e:#}");
        }
    }
}

pub async fn sweep(context: &ServerContext) -> Result<()> {
    for mut record in ForwardRecord::load_all(&context.state_dir) {
        if context.podman.find(&record.container_id).await?.is_some() {
            // It came back: the restore owns its route now, the forwards are stale.
            tracing::info!(container = %record.container_name, "container is local again: forwarding removed");
            record.remove(&context.state_dir, true).await?;
            continue;
        }
        let downstream_alive = match query(context, &record).await {
            Ok(alive) => alive,
            Err(e) => {
                // Unknown is not gone: keep forwarding until the next host answers.
                tracing::debug!(container = %record.container_name, "cannot ask {}: {e:#}", record.next_agent);
                record.downstream_alive
            }
        };
        if !downstream_alive && !record.flows_pass_here().await? {
            tracing::info!(container = %record.container_name, "nothing needs the forwarding any more: removed");
            record.remove(&context.state_dir, false).await?;
        } else if downstream_alive != record.downstream_alive {
            record.downstream_alive = downstream_alive;
            record.save(&context.state_dir)?;
        }
    }
    Ok(())
}

async fn query(context: &ServerContext, record: &ForwardRecord) -> Result<bool> {
    let mut agent = RemoteAgent::connect(&record.next_agent.to_string(), &context.token).await?;
    let alive = agent.query_container(&record.container_id).await?;
    agent.finish().await?;
    Ok(alive)
}

/// Whether `id` exists here (running, or checkpointed while it moves on) or lives
/// downstream of a forward record of this host (as of the last sweep).
pub async fn container_alive(context: &ServerContext, id: &str) -> Result<bool> {
    if context.podman.find(id).await?.is_some() {
        return Ok(true);
    }
    Ok(ForwardRecord::load_all(&context.state_dir)
        .iter()
        .any(|r| r.container_id == id && r.downstream_alive))
}
