//! One connection from a source agent: the destination's side of a migration. Every peer
//! input is validated here before it reaches the host, authenticated or not.

mod incoming;
mod refusal;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use common::kernel::overlay::{TunnelEnd, MAIN_TABLE};
use common::kernel::routing::{Route, Routing};
use common::migration::destination::post_copy;
use common::migration::destination::{self, ResumeError, Shared};
use common::migration::history::{self, Direction, HistoryEntry};
use common::migration::ownership::{self, DestinationStage};
use common::migration::switch;
use common::protocol::{ClientMessage, ErrorCode, ServerMessage, MAX_FLOWS_PER_BATCH};
use common::session::auth::authenticate_client;
use common::session::transfer::receive_stream;
use common::session::validate;
use common::session::wire::FramedStream;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::ServerContext;
use incoming::*;
use refusal::*;

/// An unauthenticated peer gets this long to prove itself.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that sends no request for this long is closed. Long enough for the source to
/// checkpoint a large container between two requests; a dead peer is found sooner, by the
/// connection's keepalive.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest image archive accepted.
const IMAGE_LIMIT: u64 = 16 << 30;

/// Serves one connection. `unauthenticated` is its place among the connections still in
/// the handshake, given up once the peer proved itself.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    context: Arc<ServerContext>,
    unauthenticated: tokio::sync::OwnedSemaphorePermit,
    stopping: CancellationToken,
) -> anyhow::Result<()> {
    common::session::wire::tune_connection(&tcp)?;
    let mut stream = FramedStream::new(tcp);
    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        authenticate_client(&mut stream, &context.token),
    );
    let handshake = tokio::select! {
        done = handshake => done,
        () = stopping.cancelled() => return Ok(()),
    };
    match handshake {
        Ok(Ok(())) => tracing::info!(%peer, "peer authenticated"),
        Ok(Err(e)) => anyhow::bail!("rejected {peer}: {e}"),
        Err(_) => anyhow::bail!("rejected {peer}: no handshake within {HANDSHAKE_TIMEOUT:?}"),
    }
    drop(unauthenticated);
    let mut connection = Connection {
        peer,
        migration: None,
    };
    let result = handle_requests(&mut stream, &context, &mut connection, &stopping).await;
    if let Some(shared) = connection.migration.take() {
        wind_down(&context, &shared, &result).await;
    }
    result
}

/// The connection is gone: carry out [`ownership::on_connection_lost`].
async fn wind_down(context: &ServerContext, shared: &Shared, result: &anyhow::Result<()>) {
    let mut migration = shared.lock().await;
    let owned = migration.stage == DestinationStage::Owns;
    let id = migration.migration_id.clone();
    let action = ownership::on_connection_lost(migration.stage);
    match migration.apply(action, &context.podman).await {
        Ok(true) => {
            tracing::info!(migration = %id, "connection closed; this host owns the container until the source settles")
        }
        Ok(false) => context.migrations.remove(&id),
        Err(e) => tracing::error!(migration = %id, "could not wind the migration down: {e:#}"),
    }
    let mut entry = HistoryEntry::now(
        Direction::Incoming,
        &migration.container.name,
        &migration.source,
    );
    entry.succeeded = owned;
    if !owned {
        entry.failed_phase = Some(migration.stage.phase());
        entry.error = Some(match result {
            Err(e) => format!("{e:#}"),
            Ok(()) => "the source gave up or went away".to_string(),
        });
    }
    if let Err(e) = history::record(&context.state_dir, &entry) {
        tracing::warn!("could not record the migration: {e:#}");
    }
}

async fn handle_requests(
    stream: &mut FramedStream<TcpStream>,
    context: &ServerContext,
    connection: &mut Connection,
    stopping: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let next = tokio::time::timeout(IDLE_TIMEOUT, stream.recv::<ClientMessage>());
        // Shutting down: a session with a migration goes on until the source is done.
        let received = tokio::select! {
            received = next => received,
            () = stopping.cancelled(), if connection.migration.is_none() => {
                tracing::info!(peer = %connection.peer, "closing the session: shutting down");
                return Ok(());
            }
        };
        let received = received.map_err(|_| anyhow!("no request within {IDLE_TIMEOUT:?}"))?;
        let request = match received {
            Ok(request) => request,
            Err(common::session::wire::WireError::Closed) => return Ok(()),
            Err(e) => {
                let _ = stream
                    .send(&ServerMessage::Error {
                        code: ErrorCode::Protocol,
                        message: e.to_string(),
                    })
                    .await;
                return Err(e.into());
            }
        };
        let finish = matches!(request, ClientMessage::Finish);
        let reply = match handle(request, stream, context, connection).await {
            Ok(reply) => reply,
            Err(Refusal { code, error }) => {
                tracing::warn!(?code, "request refused: {error:#}");
                ServerMessage::Error {
                    code,
                    message: format!("{error:#}"),
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
    connection: &mut Connection,
) -> Reply {
    let podman = &context.podman;
    match request {
        ClientMessage::OpenTunnel { public_key } => {
            validate::public_key(&public_key).map_err(invalid)?;
            let ours = context.keys.public_base64();
            let end = TunnelEnd::ensure(&context.keys, &public_key, None).await?;
            tracing::info!(interface = %end.interface, "tunnel to source ready");
            Ok(ServerMessage::TunnelReady {
                public_key: ours,
                listen_port: end.listen_port,
            })
        }
        ClientMessage::QueryContainer { id } => {
            validate::container_id(&id).map_err(invalid)?;
            Ok(ServerMessage::ContainerStatus {
                alive: crate::sweeper::container_alive(context, &id).await?,
            })
        }
        ClientMessage::Preflight { container } => {
            validate_container(&container)?;
            Ok(ServerMessage::Preflight(Box::new(
                common::migration::preflight::host_report(
                    podman,
                    &context.state_dir,
                    Some(&container),
                )
                .await?,
            )))
        }
        ClientMessage::PutImage { image_id } => {
            validate::image_id(&image_id).map_err(invalid)?;
            // Into a file, not memory: an image may be large. Removed when dropped.
            let dir = destination::archive_dir(&context.state_dir);
            common::files::create_private_dir(&dir)?;
            let archive = tempfile::Builder::new()
                .prefix("image-")
                .permissions(std::fs::Permissions::from_mode(0o600))
                .tempfile_in(&dir)?;
            let mut file = tokio::fs::File::from_std(archive.reopen()?);
            receive_stream(stream, &mut file, IMAGE_LIMIT).await?;
            podman.load_image_file(archive.path()).await?;
            if !podman.image_exists(&image_id).await? {
                return Err(anyhow!(
                    "loaded the image archive but image {image_id} is still missing"
                )
                .into());
            }
            Ok(ServerMessage::ImageLoaded)
        }
        ClientMessage::BeginMigration {
            migration_id,
            container,
            source_public_key,
        } => {
            begin_migration(
                migration_id,
                container,
                source_public_key,
                context,
                connection,
            )
            .await
        }
        ClientMessage::PutCheckpoint {
            migration_id,
            container,
        } => put_checkpoint(migration_id, container, stream, connection).await,
        ClientMessage::PrepareTraffic {
            source_public_key,
            container_ip,
            flows,
        } => {
            validate::public_key(&source_public_key).map_err(invalid)?;
            let mut migration = current(connection)?.clone().lock_owned().await;
            receiving(&migration)?;
            if migration.container.address != Some(container_ip) {
                return Err(invalid(anyhow!(
                    "{container_ip} is not the address of container {}",
                    migration.container.name
                )));
            }
            if flows.len() > MAX_FLOWS_PER_BATCH {
                return Err(invalid(anyhow!(
                    "{} flows in one batch; at most {MAX_FLOWS_PER_BATCH}",
                    flows.len()
                )));
            }
            if let Some(foreign) = flows.iter().find(|f| !f.involves(container_ip.into())) {
                return Err(invalid(anyhow!(
                    "flow {foreign} does not involve the container's address {container_ip}"
                )));
            }
            let end = TunnelEnd::to_peer(&context.keys.public_base64(), &source_public_key).await?;
            if migration.held_ip.is_none() {
                // Coming back to a former host: the route into the tunnel that the
                // blackhole below replaces is put back if the container does not come.
                // Read before anything changes, so that a failure here leaves all as it was.
                let forwarded_via = switch::tunnel_of(container_ip).await?;
                // Until the restored sockets exist, packets for the container must be
                // held or dropped here, not answered with a reset by its half-restored
                // network namespace.
                migration.held_ip = Some(container_ip);
                migration.forwarded_via = forwarded_via;
                // Armed by `BeginMigration`: from now on `held_ip` stands for that hold
                // too, and its release ends both.
                let held_already = migration.holding.take() == Some(container_ip)
                    && common::kernel::hold::hold_back(container_ip).await;
                migration.save()?;
                // Held before the blackhole replaces the route: the hold comes before
                // routing, and a packet routed in between would be dropped.
                if !held_already {
                    if let Err(e) = hold_packets(container_ip, &end).await {
                        tracing::warn!(
                            "packets for {container_ip} are dropped until the restore: {e:#}"
                        );
                    }
                }
                Routing::new()?
                    .replace_route(&Route::blackhole_v4(container_ip, 32, MAIN_TABLE))
                    .await?;
            }
            // Journaled once per batch, not per entry (a batch is up to 2000): a crash
            // within a batch leaves its entries unrecorded; they carry the tunnel's mark
            // and time out.
            let mut created = Ok(());
            let mut entered_here = Vec::new();
            for flow in flows {
                let flow = flow.with_mark(end.mark);
                match track_flow(&flow).await {
                    Ok(true) => migration.flows.push(flow),
                    Ok(false) => entered_here.extend(arriving(&flow, container_ip)),
                    Err(e) => {
                        created = Err(e);
                        break;
                    }
                }
            }
            migration.save()?;
            created?;
            // Untracked from the restore on ([`incoming::restore`]).
            migration.returning.extend(entered_here);
            tracing::info!(flows = migration.flows.len(), %container_ip, "flows prepared");
            Ok(ServerMessage::TrafficPrepared {
                flows: migration.flows.len(),
            })
        }
        ClientMessage::Restore { container, lazy } => {
            let shared = current(connection)?.clone();
            restore(&shared, &container, lazy, connection.peer.ip(), context).await
        }
        ClientMessage::Resume { migration_id } => {
            validate::migration_id(&migration_id).map_err(invalid)?;
            let gone = || {
                refuse(
                    ErrorCode::ReplicaGone,
                    anyhow!("no copy of migration {migration_id} is here to run"),
                )
            };
            let shared = context.migrations.get(&migration_id).ok_or_else(gone)?;
            let mut migration = shared.lock().await;
            match migration.resume(podman, &context.state_dir).await {
                Ok(()) => {
                    tracing::info!(container = %migration.container.name, "replica resumed; this host owns it");
                    Ok(ServerMessage::Resumed)
                }
                Err(ResumeError::Gone) => Err(gone()),
                Err(ResumeError::Other(e)) => Err(e.into()),
            }
        }
        ClientMessage::AwaitPages { migration_id } => {
            validate::migration_id(&migration_id).map_err(invalid)?;
            let no_transfer = || {
                refuse(
                    ErrorCode::State,
                    anyhow!("no post-copy restore of migration {migration_id} here"),
                )
            };
            let shared = context
                .migrations
                .get(&migration_id)
                .ok_or_else(no_transfer)?;
            // Not locked while waiting: the transfer's watcher needs the migration too.
            let pages = shared.lock().await.pages.clone().ok_or_else(no_transfer)?;
            match post_copy::arrived(pages).await {
                Ok(arrived) => Ok(ServerMessage::PagesArrived {
                    after_restore_ms: arrived.after_restore.as_millis() as u64,
                    pages: arrived.pages,
                }),
                Err(why) => Err(refuse(ErrorCode::PostCopyFailed, anyhow!(why))),
            }
        }
        ClientMessage::TrafficSwitched { migration_id } => {
            validate::migration_id(&migration_id).map_err(invalid)?;
            let shared = context.migrations.get(&migration_id).ok_or_else(|| {
                refuse(
                    ErrorCode::State,
                    anyhow!("no migration {migration_id} here"),
                )
            })?;
            let mut migration = shared.lock().await;
            if migration.stage != DestinationStage::Owns {
                return Err(refuse(
                    ErrorCode::State,
                    anyhow!("the container of this migration is not restored here"),
                ));
            }
            let held = migration.release_held_ip(podman, true).await?;
            migration.save()?;
            tracing::info!(container = %migration.container.name, ?held, "traffic switched: the packets held here are through");
            Ok(ServerMessage::HoldReleased { held })
        }
        ClientMessage::Finish => {
            // An owned migration is settled; anything else winds down as the connection
            // closes (where the history is written, for both).
            if let Some(shared) = &connection.migration {
                let mut migration = shared.lock().await;
                if migration.stage == DestinationStage::Owns {
                    settle(&mut migration, context).await?;
                }
            }
            Ok(ServerMessage::Finished)
        }
        ClientMessage::Resolve { migration_id } => {
            validate::migration_id(&migration_id).map_err(invalid)?;
            let verdict = context.migrations.resolve(&migration_id, podman).await?;
            tracing::info!(migration = %migration_id, ?verdict, "resolved for the source");
            Ok(ServerMessage::Resolved { verdict })
        }
        ClientMessage::Settle { migration_id } => {
            validate::migration_id(&migration_id).map_err(invalid)?;
            if let Some(shared) = context.migrations.get(&migration_id) {
                settle(&mut *shared.lock().await, context).await?;
            }
            Ok(ServerMessage::Settled)
        }
        other @ (ClientMessage::Hello { .. }
        | ClientMessage::Prove { .. }
        | ClientMessage::EndOfStream { .. }) => Err(refuse(
            ErrorCode::Protocol,
            anyhow!("unexpected message {other:?}"),
        )),
    }
}
