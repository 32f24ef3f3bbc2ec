//! Asks podman about itself every [`kept_info::REFRESH`] and keeps the answer in the state
//! directory, so that no migration's prepare phase waits for podman's slow `/info`
//! ([`kept_info`]).

use std::sync::Arc;

use common::engine::kept_info;
use tokio_util::sync::CancellationToken;

use crate::ServerContext;

/// Refreshes the kept answer now and every [`kept_info::REFRESH`], until `stopping`.
pub async fn run(context: Arc<ServerContext>, stopping: CancellationToken) {
    loop {
        if let Err(e) = kept_info::refresh(&context.podman, &context.state_dir).await {
            tracing::warn!("asking podman about itself: {e}");
        }
        tokio::select! {
            () = tokio::time::sleep(kept_info::REFRESH) => {}
            () = stopping.cancelled() => return,
        }
    }
}
