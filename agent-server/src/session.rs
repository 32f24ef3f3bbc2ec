//! One connection from a source agent: the destination's side of a migration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::auth::authenticate_client;
use common::protocol::{ClientMessage, ContainerRef, HostReport, ServerMessage};
use common::transfer::receive_stream;
use common::wire::FramedStream;
use tokio::net::TcpStream;

use crate::ServerContext;

/// An unauthenticated peer gets this long to prove itself.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest image archive accepted.
const IMAGE_LIMIT: u64 = 16 << 30;
/// Largest checkpoint archive accepted.
const CHECKPOINT_LIMIT: u64 = 256 << 30;

/// What this session has made on this host, so it can be undone.
#[derive(Default)]
struct Session {
    archive: Option<PathBuf>,
    restored: Option<ContainerRef>,
    finished: bool,
}

pub async fn serve(tcp: TcpStream, peer: SocketAddr, context: Arc<ServerContext>) -> Result<()> {
    tcp.set_nodelay(true)?;
    let mut stream = FramedStream::new(tcp);
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        authenticate_client(&mut stream, &context.token),
    )
    .await
    {
        Ok(Ok(())) => tracing::info!(%peer, "peer authenticated"),
        Ok(Err(e)) => bail!("rejected {peer}: {e}"),
        Err(_) => bail!("rejected {peer}: no handshake within {HANDSHAKE_TIMEOUT:?}"),
    }
    let mut session = Session::default();
    let result = handle_requests(&mut stream, &context, &mut session).await;
    if !session.finished {
        // The source went away or gave up: drop what it sent. A restored container stays:
        // once it runs here, this host has taken over.
        discard_archive(&mut session);
    }
    result
}

async fn handle_requests(
    stream: &mut FramedStream<TcpStream>,
    context: &ServerContext,
    session: &mut Session,
) -> Result<()> {
    loop {
        let request = match stream.recv::<ClientMessage>().await {
            Ok(request) => request,
            Err(common::wire::WireError::Closed) => return Ok(()),
            Err(e) => {
                let _ = stream
                    .send(&ServerMessage::Error {
                        message: e.to_string(),
                    })
                    .await;
                return Err(e.into());
            }
        };
        let finish = matches!(request, ClientMessage::Finish);
        let reply = match handle(request, stream, context, session).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!("request failed: {e:#}");
                ServerMessage::Error {
                    message: format!("{e:#}"),
                }
            }
        };
        stream.send(&reply).await?;
        if finish {
            return Ok(());
        }
    }
}

async fn handle(
    request: ClientMessage,
    stream: &mut FramedStream<TcpStream>,
    context: &ServerContext,
    session: &mut Session,
) -> Result<ServerMessage> {
    let podman = &context.podman;
    match request {
        ClientMessage::Preflight { container } => Ok(ServerMessage::Preflight(
            preflight(context, &container).await?,
        )),
        ClientMessage::PutImage { image_id } => {
            let mut archive = Vec::new();
            receive_stream(stream, &mut archive, IMAGE_LIMIT).await?;
            podman.load_image(&archive).await?;
            if !podman.image_exists(&image_id).await? {
                bail!("loaded the image archive but image {image_id} is still missing");
            }
            Ok(ServerMessage::ImageLoaded)
        }
        ClientMessage::PutCheckpoint { container } => {
            discard_archive(session);
            let path = context
                .incoming_dir
                .join(format!("{}.checkpoint.tar", container.id));
            session.archive = Some(path.clone());
            let mut file = tokio::fs::File::create(&path)
                .await
                .with_context(|| format!("create {}", path.display()))?;
            let bytes = receive_stream(stream, &mut file, CHECKPOINT_LIMIT).await?;
            tracing::info!(container = %container.name, bytes, "checkpoint received and verified");
            Ok(ServerMessage::CheckpointStored { bytes })
        }
        ClientMessage::Restore { container } => {
            let Some(archive) = session.archive.clone() else {
                bail!("no checkpoint was uploaded in this session");
            };
            let started = Instant::now();
            if let Err(e) = podman.restore_import(&archive).await {
                // Leave no half-restored copy behind.
                if podman.find(&container.id).await.ok().flatten().is_some() {
                    let _ = podman.remove(&container.id).await;
                }
                return Err(e.into());
            }
            let restored = podman.inspect(&container.id).await?;
            if !restored.running {
                let _ = podman.remove(&container.id).await;
                bail!(
                    "container {} was restored but is not running",
                    container.name
                );
            }
            let restore_ms = started.elapsed().as_millis() as u64;
            tracing::info!(container = %container.name, restore_ms, "container restored");
            session.restored = Some(container);
            Ok(ServerMessage::Restored { restore_ms })
        }
        ClientMessage::Abort => {
            if let Some(container) = session.restored.take() {
                podman.remove(&container.id).await?;
                tracing::info!(container = %container.name, "restored copy removed on abort");
            }
            discard_archive(session);
            Ok(ServerMessage::Aborted)
        }
        ClientMessage::Finish => {
            discard_archive(session);
            session.finished = true;
            Ok(ServerMessage::Finished)
        }
        other @ (ClientMessage::Hello { .. }
        | ClientMessage::Prove { .. }
        | ClientMessage::EndOfStream { .. }) => bail!("unexpected message {other:?}"),
    }
}

async fn preflight(context: &ServerContext, container: &ContainerRef) -> Result<HostReport> {
    let podman = &context.podman;
    let engine = podman.engine_info().await?;
    let criu_version = common::criu::version()
        .await
        .unwrap_or_else(|e| format!("missing: {e}"));
    let mut conflicting_container = None;
    for key in [&container.name, &container.id] {
        if let Some(existing) = podman.find(key).await? {
            conflicting_container = Some(existing.name);
        }
    }
    Ok(HostReport {
        hostname: hostname(),
        podman_version: engine.podman_version,
        criu_version,
        oci_runtime: engine.oci_runtime,
        has_image: podman.image_exists(&container.image_id).await?,
        conflicting_container,
    })
}

fn discard_archive(session: &mut Session) {
    if let Some(path) = session.archive.take() {
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("could not remove {}: {e}", path.display());
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}
