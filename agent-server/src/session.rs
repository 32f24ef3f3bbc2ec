//! One connection from a source agent: the destination's side of a migration. Every peer
//! input is validated here before it reaches the host, authenticated or not.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use common::engine::lazy_pages::PageServer;
use common::kernel::conntrack;
use common::kernel::nft::Firewall;
use common::kernel::overlay::{TunnelEnd, MAIN_TABLE};
use common::kernel::routing::{Route, Routing};
use common::migration::destination::post_copy;
use common::migration::destination::{self, IncomingMigration, ResumeError, Shared};
use common::migration::forwarding::ForwardRecord;
use common::migration::history::{self, Direction, HistoryEntry};
use common::migration::ownership::{self, DestinationStage};
use common::protocol::{
    ClientMessage, ContainerRef, ErrorCode, LazyRestore, RestoreTimes, ServerMessage,
    MAX_FLOWS_PER_BATCH,
};
use common::session::auth::authenticate_client;
use common::session::transfer::receive_stream;
use common::session::validate;
use common::session::wire::FramedStream;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::ServerContext;

/// An unauthenticated peer gets this long to prove itself.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that sends no request for this long is closed. Long enough for the source to
/// checkpoint a large container between two requests; a dead peer is found sooner, by the
/// connection's keepalive.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long packets of a returning container that come through a tunnel stay untracked
/// after its restore may have ended: the source's held packets arrive within milliseconds
/// of its answer.
const RETURNING_MARGIN: Duration = Duration::from_secs(5);
/// Largest image archive accepted.
const IMAGE_LIMIT: u64 = 16 << 30;
/// Largest checkpoint archive accepted.
const CHECKPOINT_LIMIT: u64 = 256 << 30;

/// A request refused, with the code the source acts on.
struct Refusal {
    code: ErrorCode,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Refusal {
    fn from(error: E) -> Self {
        Self {
            code: ErrorCode::Host,
            error: error.into(),
        }
    }
}

fn refuse(code: ErrorCode, error: impl Into<anyhow::Error>) -> Refusal {
    Refusal {
        code,
        error: error.into(),
    }
}

fn invalid(error: impl Into<anyhow::Error>) -> Refusal {
    refuse(ErrorCode::Invalid, error)
}

type Reply = Result<ServerMessage, Refusal>;

/// The connection's migration, once `PutCheckpoint` started one.
struct Connection {
    peer: SocketAddr,
    migration: Option<Shared>,
}

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
        ClientMessage::PutCheckpoint {
            migration_id,
            container,
        } => put_checkpoint(migration_id, container, stream, context, connection).await,
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
            migration.source_tunnel_address = Some(end.peer_address);
            if migration.held_ip.is_none() {
                // Until the restored sockets exist, packets for the container must be
                // held or dropped here, not answered with a reset by its half-restored
                // network namespace. This also replaces a route into a tunnel left from when the
                // container lived here.
                migration.held_ip = Some(container_ip);
                migration.save()?;
                // Coming back to a former host: it no longer forwards the container
                // elsewhere (the route goes with the blackhole below; the rest waits).
                let state_dir = context.state_dir.clone();
                migration.ahead_of_restore.push(tokio::spawn(async move {
                    for record in ForwardRecord::load_all(&state_dir) {
                        if record.container_ip == container_ip {
                            record.remove(&state_dir, true).await?;
                        }
                    }
                    Ok(())
                }));
                // Packets that reach this host other than through the source's tunnel
                // (it is where the container is published, or a former host forwards to
                // it) wait for the restore, and for the source's held packets to go first.
                // Held before the blackhole replaces the route: the hold comes before
                // routing, and a packet routed in between would be dropped.
                let hold = common::kernel::hold::start(
                    container_ip,
                    common::kernel::hold::DEFAULT_BOUND,
                    Some(&end.interface),
                );
                if let Err(e) = hold.await {
                    tracing::warn!(
                        "packets for {container_ip} are dropped until the restore: {e:#}"
                    );
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
            if !entered_here.is_empty() {
                // The source lets its held packets through once it hears of the restore;
                // those of flows that entered here come back through the tunnel
                // ([`common::kernel::nft`]); untracked until well after the restore.
                let seconds = (migration.restore_window() + RETURNING_MARGIN).as_secs() as u32;
                migration
                    .ahead_of_restore
                    .push(tokio::task::spawn_blocking(move || {
                        Firewall::ensure()?.untrack_returning(&entered_here, seconds)
                    }));
            }
            tracing::info!(flows = migration.flows.len(), %container_ip, "flows prepared");
            Ok(ServerMessage::TrafficPrepared {
                flows: migration.flows.len(),
            })
        }
        ClientMessage::Restore { container, lazy } => {
            let shared = current(connection)?.clone();
            restore(&shared, &container, lazy, context).await
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
            match migration.resume(podman).await {
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
            let held = migration.release_held_ip(podman).await?;
            migration.save()?;
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

fn validate_container(container: &ContainerRef) -> Result<(), Refusal> {
    validate::container_id(&container.id).map_err(invalid)?;
    validate::container_name(&container.name).map_err(invalid)?;
    validate::image_id(&container.image_id).map_err(invalid)?;
    Ok(())
}

fn current(connection: &Connection) -> Result<&Shared, Refusal> {
    connection.migration.as_ref().ok_or_else(|| {
        refuse(
            ErrorCode::State,
            anyhow!("no checkpoint was uploaded on this connection"),
        )
    })
}

/// Requests that change a migration are only taken while it receives: not once it is
/// restored, and never once it was fenced for the source.
fn receiving(migration: &IncomingMigration) -> Result<(), Refusal> {
    if migration.stage == DestinationStage::Receiving {
        Ok(())
    } else {
        Err(refuse(
            ErrorCode::State,
            anyhow!(
                "migration {} is {:?}",
                migration.migration_id,
                migration.stage
            ),
        ))
    }
}

async fn put_checkpoint(
    migration_id: String,
    container: ContainerRef,
    stream: &mut FramedStream<TcpStream>,
    context: &ServerContext,
    connection: &mut Connection,
) -> Reply {
    validate::migration_id(&migration_id).map_err(invalid)?;
    validate_container(&container)?;
    if connection.migration.is_some() {
        return Err(refuse(
            ErrorCode::State,
            anyhow!("this connection already carries a migration"),
        ));
    }
    // Whatever runs here with its ID later is then the migration's, and only that.
    for existing in [&container.id, &container.name] {
        if let Some(found) = context.podman.find(existing).await? {
            return Err(refuse(
                ErrorCode::State,
                anyhow!("container {} already exists here", found.name),
            ));
        }
    }
    let name = container.name.clone();
    let migration = IncomingMigration::new(
        &context.state_dir,
        &migration_id,
        container,
        connection.peer.ip().to_string(),
    )?;
    // Taken by the registry before it is journaled: a migration ID or container that is
    // busy must not overwrite the journal of the one that has it.
    let shared = context
        .migrations
        .insert(migration)
        .map_err(|busy| refuse(ErrorCode::Busy, anyhow!("{busy}")))?;
    let mut migration = shared.lock().await;
    if let Err(e) = migration.save() {
        context.migrations.remove(&migration_id);
        return Err(e.into());
    }
    connection.migration = Some(shared.clone());
    let path = migration
        .archive
        .clone()
        .expect("a new migration has an archive path");
    let mut file = private_file(&path).await?;
    let bytes = receive_stream(stream, &mut file, CHECKPOINT_LIMIT).await?;
    migration.archive_verified = true;
    migration.save()?;
    tracing::info!(container = %name, bytes, "checkpoint received and verified");
    Ok(ServerMessage::CheckpointStored { bytes })
}

/// The archive holds the container's memory: only root reads it.
async fn private_file(path: &std::path::Path) -> anyhow::Result<tokio::fs::File> {
    tokio::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await
        .with_context(|| format!("create {}", path.display()))
}

async fn restore(
    shared: &Shared,
    declared: &ContainerRef,
    lazy: Option<LazyRestore>,
    context: &ServerContext,
) -> Reply {
    let podman = &context.podman;
    let mut migration = shared.lock().await;
    receiving(&migration)?;
    if declared.id != migration.container.id {
        return Err(invalid(anyhow!(
            "container {} is not the one this migration uploaded",
            declared.name
        )));
    }
    let archive = migration
        .archive
        .clone()
        .filter(|_| migration.archive_verified)
        .ok_or_else(|| {
            refuse(
                ErrorCode::State,
                anyhow!("no complete, verified archive in this migration"),
            )
        })?;
    let replica = lazy.is_some_and(|l| l.until_resumed);
    let lazy = match lazy {
        None => None,
        Some(LazyRestore {
            page_server_port, ..
        }) => {
            // Only the port is the peer's: the address is its end of our tunnel.
            let address = migration.source_tunnel_address.ok_or_else(|| {
                refuse(
                    ErrorCode::State,
                    anyhow!("post-copy needs the tunnel: PrepareTraffic first"),
                )
            })?;
            if page_server_port == 0 {
                return Err(invalid(anyhow!("page server port 0")));
            }
            let work_dir = post_copy::work_dir(&context.state_dir, &migration.migration_id);
            let source = PageServer {
                address,
                port: page_server_port,
            };
            migration.page_server = Some(source);
            Some(post_copy::prepare(&archive, &work_dir, source, replica).await?)
        }
    };
    migration.pages_pending = lazy.is_some();
    migration.replica = replica;
    migration.enter(DestinationStage::Restoring)?;
    let started = Instant::now();
    let restored = match (common::fault::at(&context.state_dir, "restore"), &lazy) {
        (Err(e), _) => Err(e),
        (Ok(()), None) => podman.restore_import(&archive).await.map_err(Into::into),
        (Ok(()), Some(lazy)) => podman
            .restore_import_lazily(&lazy.import)
            .await
            .map_err(Into::into),
    };
    let podman_took = started.elapsed();
    let outcome = async {
        let restored = restored?;
        let ids = &restored.ids;
        if *ids != [migration.container.id.clone()] {
            // Not what the source declared: whatever it was goes again.
            for id in ids {
                let _ = podman.remove(id).await;
            }
            anyhow::bail!("the archive held {ids:?}, not the declared container");
        }
        if !podman.inspect(&migration.container.id).await?.running {
            anyhow::bail!(
                "container {} was restored but is not running",
                migration.container.name
            );
        }
        anyhow::Ok(restored)
    }
    .await;
    let restored = match outcome {
        Ok(restored) => restored,
        Err(e) => {
            if let Some(lazy) = lazy {
                lazy.abandon().await;
            }
            // Leave no half-restored copy behind: the migration is fenced, and the source's
            // Resolve hears so.
            migration.discard(podman).await?;
            context.migrations.remove(&migration.migration_id);
            return Err(e.into());
        }
    };
    for work in std::mem::take(&mut migration.ahead_of_restore) {
        match work.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("preparing for the restore: {e:#}"),
            Err(e) => tracing::warn!("preparing for the restore: {e}"),
        }
    }
    let times = RestoreTimes {
        podman_us: podman_took.as_micros() as u64,
        runtime_us: restored.runtime_us,
        criu_us: restored.criu_us,
    };
    if let Some(lazy) = lazy {
        migration.pages = Some(lazy.watch(shared.clone(), podman.clone()));
    }
    if replica {
        // Stopped, and not ours: it runs (and its address is routed here) on `Resume`.
        migration.enter(DestinationStage::Replica)?;
        tracing::info!(container = %migration.container.name, ?times, "replica restored, stopped until its memory is here and the source resumes it");
        return Ok(ServerMessage::Restored { times });
    }
    // Its sockets exist: its address is routed here again. Packets held here wait for the
    // source's (`TrafficSwitched`).
    migration.route_here().await?;
    // The decision point: journaled before the source hears of it.
    migration.enter(DestinationStage::Owns)?;
    common::fault::at(&context.state_dir, "restored")?;
    tracing::info!(container = %migration.container.name, ?times, "container restored; this host owns it");
    Ok(ServerMessage::Restored { times })
}

/// Creates the conntrack entry of an incoming flow; returns whether it is ours. An entry
/// with the very same tuples is a leftover of an earlier stay of the container here (its
/// sequence numbers long out of date, so the container's answers would be invalid): ours
/// replaces it. One that clashes only on the reply tuple is the flow's own, DNATed entry
/// here, where it enters: it is not ours, and stays (undo must leave it).
async fn track_flow(flow: &conntrack::Flow) -> anyhow::Result<bool> {
    if conntrack::create(flow).await? {
        return Ok(true);
    }
    conntrack::delete(flow).await?;
    conntrack::create(flow).await
}

/// How the packets of `flow` addressed to the container arrive: protocol, from, to.
fn arriving(
    flow: &conntrack::Flow,
    container_ip: std::net::Ipv4Addr,
) -> Option<(
    conntrack::Proto,
    std::net::SocketAddrV4,
    std::net::SocketAddrV4,
)> {
    let towards = flow.towards(container_ip.into())?;
    match (towards.src, towards.dst) {
        (SocketAddr::V4(from), SocketAddr::V4(to)) => Some((flow.proto, from, to)),
        _ => None,
    }
}

/// The source removed its copy: nothing is left to decide about an owned migration.
async fn settle(migration: &mut IncomingMigration, context: &ServerContext) -> Result<(), Refusal> {
    if migration.stage != DestinationStage::Owns {
        return Err(refuse(
            ErrorCode::State,
            anyhow!(
                "migration {} is {:?}, not owned here",
                migration.migration_id,
                migration.stage
            ),
        ));
    }
    migration.release_held_ip(&context.podman).await?;
    migration.forget()?;
    context.migrations.remove(&migration.migration_id);
    Ok(())
}
