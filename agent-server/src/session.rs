//! One connection from a source agent: the destination's side of a migration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use anyhow::{bail, Context, Result};
use common::auth::authenticate_client;
use common::conntrack::{self, Flow};
use common::forwarding::ForwardRecord;
use common::overlay::{TunnelEnd, MAIN_TABLE};
use common::podman::PodmanClient;
use common::protocol::{ClientMessage, ContainerRef, HostReport, ServerMessage};
use common::routing::{Route, Routing};
use common::transfer::receive_stream;
use common::wire::FramedStream;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::ServerContext;

/// An unauthenticated peer gets this long to prove itself.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest image archive accepted.
const IMAGE_LIMIT: u64 = 16 << 30;
/// Largest checkpoint archive accepted.
const CHECKPOINT_LIMIT: u64 = 256 << 30;

/// What this session has made on this host, so it can be undone. Saved to the state
/// directory on every change, so that an agent that died mid-migration cleans up after
/// itself when it starts again ([`recover`]).
#[derive(Default, Serialize, Deserialize)]
struct Session {
    #[serde(skip)]
    journal: PathBuf,
    archive: Option<PathBuf>,
    /// Conntrack entries made for the incoming container's flows.
    flows: Vec<Flow>,
    /// The incoming container's address, held (blackholed) until it runs.
    held_ip: Option<Ipv4Addr>,
    /// A restore was asked for and not yet confirmed to the source.
    restoring: Option<ContainerRef>,
    /// The container runs here and the source was told so: this host has taken over.
    restored: Option<ContainerRef>,
    finished: bool,
}

impl Session {
    fn new(journal_dir: &Path) -> Self {
        Self {
            journal: journal_dir.join(format!("{:016x}.json", rand::random::<u64>())),
            ..Self::default()
        }
    }

    fn save(&self) -> Result<()> {
        let json = serde_json::to_vec(self)?;
        std::fs::write(&self.journal, json)
            .with_context(|| format!("write {}", self.journal.display()))
    }

    /// Undoes whatever the source did not see through, then forgets the session. A
    /// container that was confirmed restored stays, with its flows.
    async fn wind_down(mut self, podman: &PodmanClient) {
        discard_archive(&mut self);
        if let Err(e) = release_held_ip(&mut self).await {
            tracing::warn!("could not release the container address: {e:#}");
        }
        if self.restored.is_none() && !self.finished {
            if let Some(container) = self.restoring.take() {
                if let Ok(Some(_)) = podman.find(&container.id).await {
                    tracing::info!(container = %container.name, "removing an unconfirmed restore");
                    if let Err(e) = podman.remove(&container.id).await {
                        tracing::warn!("could not remove {}: {e}", container.name);
                    }
                }
            }
            for flow in self.flows.drain(..) {
                if let Err(e) = conntrack::delete(&flow).await {
                    tracing::warn!("could not remove a conntrack entry: {e:#}");
                }
            }
        }
        let _ = std::fs::remove_file(&self.journal);
    }
}

/// Winds down the sessions a previous run of the agent left unfinished.
pub async fn recover(journal_dir: &Path, podman: &PodmanClient) -> Result<()> {
    std::fs::create_dir_all(journal_dir)
        .with_context(|| format!("create {}", journal_dir.display()))?;
    for entry in std::fs::read_dir(journal_dir)? {
        let path = entry?.path();
        let session = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Session>(&bytes).ok());
        match session {
            Some(mut session) => {
                tracing::info!(journal = %path.display(), "winding down a session of a previous run");
                session.journal = path;
                session.wind_down(podman).await;
            }
            None => {
                tracing::warn!(journal = %path.display(), "unreadable session journal removed");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(())
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
    let mut session = Session::new(&context.journal_dir);
    let result = handle_requests(&mut stream, &context, &mut session).await;
    // The session ends here; whatever the source did not see through is undone.
    session.wind_down(&context.podman).await;
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
    session: &mut Session,
) -> Result<ServerMessage> {
    let podman = &context.podman;
    match request {
        ClientMessage::OpenTunnel { public_key } => {
            let ours = context.keys.public_base64();
            let end = TunnelEnd::between(&ours, &public_key);
            end.bring_up(&context.keys, &public_key, None).await?;
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
            let end = TunnelEnd::between(&context.keys.public_base64(), &source_public_key);
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
            for flow in flows {
                let flow = flow.with_mark(end.mark);
                session.flows.push(flow.clone());
                session.save()?;
                conntrack::create(&flow).await?;
            }
            tracing::info!(flows = session.flows.len(), %container_ip, "flows prepared");
            Ok(ServerMessage::TrafficPrepared {
                flows: session.flows.len(),
            })
        }
        ClientMessage::QueryContainer { id } => Ok(ServerMessage::ContainerStatus {
            alive: crate::sweeper::container_alive(context, &id).await?,
        }),
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
            session.restoring = Some(container.clone());
            session.save()?;
            let started = Instant::now();
            let restored = podman.restore_import(&archive).await;
            release_held_ip(session).await?;
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
            discard_archive(session);
            release_held_ip(session).await?;
            for flow in session.flows.drain(..) {
                conntrack::delete(&flow).await?;
            }
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

/// The container's address is routed locally again (its sockets exist, or it is not coming).
async fn release_held_ip(session: &mut Session) -> Result<()> {
    if let Some(ip) = session.held_ip.take() {
        Routing::new()?
            .delete_route(IpAddr::V4(ip), 32, MAIN_TABLE)
            .await?;
    }
    Ok(())
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
