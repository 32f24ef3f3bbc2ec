//! The running agent: accepts sessions, runs the sweeper, the adopter and the refresh of
//! podman's kept answer about itself, and shuts down in order when told to.
//!
//! On shutdown it stops accepting. Sessions without a migration close at once (at their
//! next request, or in their handshake); a session with a migration goes on until the
//! source is done with it, for at most [`GRACE`]. The sweeper and the adopter finish the
//! round they are in. What is still running after the grace ends as it would in a crash:
//! everything is journaled, and the next start recovers it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{adopter, engine_info, session, sweeper, ServerContext};

/// Connections still in the handshake at once; more wait in the listen queue.
const MAX_UNAUTHENTICATED: usize = 16;
/// How often this host's outgoing migrations are checked for an `agent-client` that died.
const ADOPT_INTERVAL: Duration = Duration::from_secs(2);
/// How long migrations under way may take to finish once shutdown is asked for; within
/// systemd's default stop timeout (90 s).
pub const GRACE: Duration = Duration::from_secs(60);

/// Serves `listener` until the first message on `shutdown` (what asked for it), then
/// winds down (see the module); a second message ends the grace early.
pub async fn run(
    listener: TcpListener,
    context: Arc<ServerContext>,
    sweep_interval: Duration,
    mut shutdown: mpsc::Receiver<&'static str>,
) -> Result<()> {
    let stopping = CancellationToken::new();
    let background = TaskTracker::new();
    background.spawn(sweeper::run(
        context.clone(),
        sweep_interval,
        stopping.clone(),
    ));
    background.spawn(adopter::run(
        context.clone(),
        ADOPT_INTERVAL,
        stopping.clone(),
    ));
    background.spawn(engine_info::run(context.clone(), stopping.clone()));
    background.close();
    let sessions = TaskTracker::new();

    tokio::select! {
        why = shutdown.recv() => tracing::info!(
            "{}: shutting down; no new sessions",
            why.unwrap_or("shutdown channel closed")
        ),
        result = accept(&listener, &context, &sessions, &stopping) => result?,
    }
    stopping.cancel();
    drop(listener);
    sessions.close();
    if !sessions.is_empty() {
        tracing::info!(
            "waiting up to {GRACE:?} for {} session(s) to end",
            sessions.len()
        );
    }
    let ended = async {
        sessions.wait().await;
        background.wait().await;
    };
    tokio::select! {
        () = ended => tracing::info!("agent-server stopped"),
        () = tokio::time::sleep(GRACE) => tracing::warn!(
            "{} session(s) still running after {GRACE:?}: stopping anyway; the next start recovers them",
            sessions.len()
        ),
        Some(why) = shutdown.recv() => tracing::warn!(
            "{why} again: stopping now; the next start recovers what runs"
        ),
    }
    Ok(())
}

/// Accepts sessions for ever (an error only if the semaphore closes, which it does not).
async fn accept(
    listener: &TcpListener,
    context: &Arc<ServerContext>,
    sessions: &TaskTracker,
    stopping: &CancellationToken,
) -> Result<()> {
    let handshakes = Arc::new(Semaphore::new(MAX_UNAUTHENTICATED));
    loop {
        let permit = handshakes.clone().acquire_owned().await?;
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, for one: retrying at once would only spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (context, stopping) = (context.clone(), stopping.clone());
        sessions.spawn(async move {
            if let Err(e) = session::serve(stream, peer, context, permit, stopping).await {
                tracing::warn!(%peer, "session ended with an error: {e:#}");
            }
        });
    }
}

/// Sends the name of every SIGTERM and SIGINT to `to`.
pub fn forward_signals(to: mpsc::Sender<&'static str>) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        loop {
            let why = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if to.send(why).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}
