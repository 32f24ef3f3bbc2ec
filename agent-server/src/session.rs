//! One connection from a source agent: the destination's side of a migration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::auth::authenticate_client;
use common::conntrack;
use common::forwarding::ForwardRecord;
use common::history::{self, Direction, HistoryEntry};
use common::incoming::IncomingSession;
use common::overlay::{TunnelEnd, MAIN_TABLE};
use common::protocol::{ClientMessage, ServerMessage};
use common::routing::{Route, Routing};
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
    let mut session = IncomingSession::new(&context.journal_dir);
    let result = handle_requests(&mut stream, &context, &mut session).await;
    if let Some(container) = &session.incoming {
        record_history(&context, &session, container, peer, &result);
    }
    // The session ends here; whatever the source did not see through is undone.
    session.wind_down(&context.podman).await;
    result
}

fn record_history(
    context: &ServerContext,
    session: &IncomingSession,
    container: &str,
    peer: SocketAddr,
    result: &Result<()>,
) {
    let mut entry = HistoryEntry::now(Direction::Incoming, container, &peer.ip().to_string());
    entry.succeeded = session.finished && session.restored.is_some();
    if !entry.succeeded {
        entry.error = Some(match result {
            Err(e) => format!("{e:#}"),
            Ok(()) => "the source aborted or went away".to_string(),
        });
    }
    if let Err(e) = history::record(&context.state_dir, &entry) {
        tracing::warn!("could not record the migration: {e:#}");
    }
}

async fn handle_requests(
    stream: &mut FramedStream<TcpStream>,
    context: &ServerContext,
    session: &mut IncomingSession,
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
        session.save()?;
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
    session: &mut IncomingSession,
) -> Result<ServerMessage> {
    let podman = &context.podman;
    match request {
        ClientMessage::OpenTunnel { public_key } => {
            let ours = context.keys.public_base64();
            let end = TunnelEnd::ensure(&context.keys, &public_key, None).await?;
            tracing::info!(interface = %end.interface, "tunnel to source ready");
            Ok(ServerMessage::TunnelReady {
                public_key: ours,
                listen_port: end.listen_port,
            })
        }
        ClientMessage::PrepareTraffic {
            source_public_key,
            container_ip,
            flows,
        } => {
            let end = TunnelEnd::to_peer(&context.keys.public_base64(), &source_public_key).await?;
            // Until the restored sockets exist, packets for the container must be dropped
            // here, not answered with a reset by its half-restored network namespace. This
            // also replaces a route into a tunnel left from when the container lived here.
            session.held_ip = Some(container_ip);
            session.save()?;
            // Coming back to a former host: it no longer forwards the container elsewhere.
            for record in ForwardRecord::load_all(&context.state_dir) {
                if record.container_ip == container_ip {
                    record.remove(&context.state_dir, true).await?;
                }
            }
            Routing::new()?
                .replace_route(&Route::blackhole_v4(container_ip, 32, MAIN_TABLE))
                .await?;
            let prepared = flows.len();
            for flow in flows {
                let flow = flow.with_mark(end.mark);
                // Recorded for undo only once made here: an entry that existed already is
                // not ours to delete. (A crash in between leaves one entry, which times out.)
                if conntrack::create(&flow).await? {
                    session.flows.push(flow);
                    session.save()?;
                }
            }
            tracing::info!(
                flows = prepared,
                created = session.flows.len(),
                %container_ip,
                "flows prepared"
            );
            Ok(ServerMessage::TrafficPrepared { flows: prepared })
        }
        ClientMessage::QueryContainer { id } => Ok(ServerMessage::ContainerStatus {
            alive: crate::sweeper::container_alive(context, &id).await?,
        }),
        ClientMessage::Preflight { container } => Ok(ServerMessage::Preflight(
            common::preflight::host_report(&context.podman, &context.state_dir, Some(&container))
                .await?,
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
            session.discard_archive();
            let path = context
                .incoming_dir
                .join(format!("{}.checkpoint.tar", container.id));
            session.archive = Some(path.clone());
            session.incoming = Some(container.name.clone());
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
            session.restoring = Some(container.clone());
            session.save()?;
            let started = Instant::now();
            let restored = podman.restore_import(&archive).await;
            session.release_held_ip().await?;
            if let Err(e) = restored {
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
            session.restoring = None;
            session.restored = Some(container);
            // Saved before the source hears of it: from here on the container stays.
            session.save()?;
            Ok(ServerMessage::Restored { restore_ms })
        }
        ClientMessage::Abort => {
            if let Some(container) = session.restored.take() {
                podman.remove(&container.id).await?;
                tracing::info!(container = %container.name, "restored copy removed on abort");
            }
            session.discard_archive();
            session.release_held_ip().await?;
            for flow in session.flows.drain(..) {
                conntrack::delete(&flow).await?;
            }
            Ok(ServerMessage::Aborted)
        }
        ClientMessage::Finish => {
            session.discard_archive();
            session.finished = true;
            Ok(ServerMessage::Finished)
        }
        other @ (ClientMessage::Hello { .. }
        | ClientMessage::Prove { .. }
        | ClientMessage::EndOfStream { .. }) => bail!("unexpected message {other:?}"),
    }
}
