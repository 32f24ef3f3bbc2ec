//! Removes forwarding state this host keeps for containers that moved away, once nothing
//! needs it (see `common::migration::forwarding`): the host it went to says it no longer lives there
//! or downstream.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::migration::forwarding::{self, ForwardRecord};
use tokio_util::sync::CancellationToken;

use crate::ServerContext;

/// Runs [`forwarding::sweep`] every `interval`, until `stopping`.
pub async fn run(context: Arc<ServerContext>, interval: Duration, stopping: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stopping.cancelled() => return,
        }
        match forwarding::sweep(&context.state_dir, &context.podman, &context.token).await {
            Ok(removed) => {
                context.actions.swept.inc_by(removed.len() as u64);
            }
            Err(e) => tracing::warn!("forwarding sweep failed: {e:#}"),
        }
    }
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
