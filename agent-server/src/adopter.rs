//! Adopts the outgoing migrations of an `agent-client` on this host that died (killed,
//! crashed, its terminal lost) or gave up on a destination that stopped answering, and
//! resolves them as the ownership model says ([`common::migration::source`]): the
//! container runs here again, or the destination's copy is confirmed and this one removed.
//! A migration in doubt is asked about again on every round. Each round also removes the
//! CRIU configuration of a lazy dump whose client died before CRIU read it.

use std::sync::Arc;
use std::time::Duration;

use common::migration::source::{self, SourceHost};
use tokio_util::sync::CancellationToken;

use crate::ServerContext;

/// Runs [`source::recover_abandoned`] every `interval`, until `stopping`.
pub async fn run(context: Arc<ServerContext>, interval: Duration, stopping: CancellationToken) {
    let host = SourceHost {
        podman: &context.podman,
        token: &context.token,
        state_dir: &context.state_dir,
    };
    loop {
        let adopted = source::recover_abandoned(&host, false).await;
        for line in &adopted {
            tracing::info!("adopted migration: {line}");
        }
        context.actions.recovered("adopted", adopted.len());
        // A lazy-dump configuration left by a client that died before CRIU read it would
        // make every later checkpoint here wait for a destination.
        match common::engine::lazy_pages::remove_stale_config() {
            Ok(Some(line)) => tracing::info!("{line}"),
            Ok(None) => {}
            Err(e) => tracing::warn!("{e:#}"),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stopping.cancelled() => return,
        }
    }
}
