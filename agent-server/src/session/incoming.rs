//! The requests that carry an incoming migration: its checkpoint, its restore, and its
//! settling once the source let go.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use common::engine::lazy_pages::PageServer;
use common::kernel::conntrack;
use common::kernel::nft::Firewall;
use common::kernel::overlay::TunnelEnd;
use common::migration::destination::post_copy;
use common::migration::destination::{IncomingMigration, Shared};
use common::migration::ownership::DestinationStage;
use common::protocol::{ContainerRef, ErrorCode, LazyRestore, RestoreTimes, ServerMessage};
use common::session::transfer::receive_stream;
use common::session::validate;
use common::session::wire::FramedStream;
use tokio::net::TcpStream;

use super::refusal::*;
use crate::ServerContext;

/// Largest checkpoint archive accepted.
const CHECKPOINT_LIMIT: u64 = 256 << 30;

/// How long packets of a returning container that come through a tunnel stay untracked
/// after its restore may have ended: the source's held packets arrive within milliseconds
/// of its answer.
const RETURNING_MARGIN: Duration = Duration::from_secs(5);

/// The connection's migration, once `BeginMigration` started one.
pub(super) struct Connection {
    pub(super) peer: SocketAddr,
    pub(super) migration: Option<Shared>,
}

pub(super) fn validate_container(container: &ContainerRef) -> Result<(), Refusal> {
    validate::container_id(&container.id).map_err(invalid)?;
    validate::container_name(&container.name).map_err(invalid)?;
    validate::image_id(&container.image_id).map_err(invalid)?;
    Ok(())
}

pub(super) fn current(connection: &Connection) -> Result<&Shared, Refusal> {
    connection.migration.as_ref().ok_or_else(|| {
        refuse(
            ErrorCode::State,
            anyhow!("no migration was begun on this connection"),
        )
    })
}

/// Requests that change a migration are only taken while it receives: not once it is
/// restored, and never once it was fenced for the source.
pub(super) fn receiving(migration: &IncomingMigration) -> Result<(), Refusal> {
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

/// Starts the migration of `container` on this connection, before the source freezes it,
/// and arms the hold of the packets that reach this host for its address other than
/// through the source's tunnel: its nftables commit would lengthen the freeze. They still
/// go where they are routed until `PrepareTraffic` holds them back.
pub(super) async fn begin_migration(
    migration_id: String,
    container: ContainerRef,
    source_public_key: String,
    context: &ServerContext,
    connection: &mut Connection,
) -> Reply {
    validate::migration_id(&migration_id).map_err(invalid)?;
    validate_container(&container)?;
    validate::public_key(&source_public_key).map_err(invalid)?;
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
    let address = container.address;
    let end = TunnelEnd::to_peer(&context.keys.public_base64(), &source_public_key).await?;
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
    if let Some(ip) = address {
        // Journaled before it exists: a crash right after leaves no hold unaccounted.
        migration.holding = Some(ip);
    }
    if let Err(e) = migration.save() {
        context.migrations.remove(&migration_id);
        return Err(e.into());
    }
    connection.migration = Some(shared.clone());
    if let Some(ip) = address {
        // Still journaled if it failed: releasing it removes whatever it left, and
        // `PrepareTraffic` tries again.
        let armed = common::kernel::hold::arm(
            ip,
            common::kernel::hold::DEFAULT_BOUND,
            Some(&end.interface),
        );
        if let Err(e) = armed.await {
            tracing::warn!("packets for {ip} cannot be held yet: {e:#}");
        }
    }
    tracing::info!(container = %migration.container.name, %migration_id, "migration begun");
    Ok(ServerMessage::MigrationBegun)
}

/// Packets for the incoming container's `ip` that reach this host other than through the
/// source's tunnel (it is where the container is published, or a former host forwards to
/// it) wait for the restore, and for the source's held packets to go first.
pub(super) async fn hold_packets(ip: std::net::Ipv4Addr, end: &TunnelEnd) -> anyhow::Result<()> {
    common::kernel::hold::start(
        ip,
        common::kernel::hold::DEFAULT_BOUND,
        Some(&end.interface),
    )
    .await
}

/// Receives the checkpoint archive of the migration begun on this connection.
pub(super) async fn put_checkpoint(
    migration_id: String,
    container: ContainerRef,
    stream: &mut FramedStream<TcpStream>,
    connection: &mut Connection,
) -> Reply {
    let mut migration = current(connection)?.lock().await;
    receiving(&migration)?;
    if migration_id != migration.migration_id || container != migration.container {
        return Err(invalid(anyhow!(
            "migration {migration_id} of {} is not the one begun on this connection",
            container.name
        )));
    }
    if migration.archive_verified {
        return Err(refuse(
            ErrorCode::State,
            anyhow!("migration {migration_id} has its archive already"),
        ));
    }
    let path = migration
        .archive
        .clone()
        .expect("a new migration has an archive path");
    let mut file = private_file(&path).await?;
    let bytes = receive_stream(stream, &mut file, CHECKPOINT_LIMIT).await?;
    migration.archive_verified = true;
    migration.save()?;
    tracing::info!(container = %container.name, bytes, "checkpoint received and verified");
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

/// `source`: the address the source's session comes from, where its page server listens.
pub(super) async fn restore(
    shared: &Shared,
    declared: &ContainerRef,
    lazy: Option<LazyRestore>,
    source: std::net::IpAddr,
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
    let replica = lazy.as_ref().is_some_and(|l| l.until_resumed);
    let lazy = match lazy {
        None => None,
        Some(LazyRestore {
            page_server_port,
            credentials,
            ..
        }) => {
            // Only the port is the peer's: the address is where its session comes from.
            let std::net::IpAddr::V4(address) = source else {
                return Err(invalid(anyhow!(
                    "lazy pages need the agents to talk over IPv4, not {source}"
                )));
            };
            if page_server_port == 0 {
                return Err(invalid(anyhow!("page server port 0")));
            }
            credentials.validate().map_err(invalid)?;
            let work_dir = post_copy::work_dir(&context.state_dir, &migration.migration_id);
            let source = PageServer {
                address,
                port: page_server_port,
            };
            migration.page_server = Some(source);
            Some(post_copy::prepare(&archive, &work_dir, source, &credentials, replica).await?)
        }
    };
    migration.pages_pending = lazy.is_some();
    migration.replica = replica;
    migration.enter(DestinationStage::Restoring)?;
    let returning = std::mem::take(&mut migration.returning);
    if !returning.is_empty() {
        // The source lets its held packets through once it hears of the restore; those of
        // flows that entered here come back through the tunnel ([`common::kernel::nft`]):
        // untracked until well after the restore, which the archive's size bounds.
        let seconds = (migration.restore_window() + RETURNING_MARGIN).as_secs() as u32;
        migration
            .ahead_of_restore
            .push(tokio::task::spawn_blocking(move || {
                Firewall::ensure()?.untrack_returning(&returning, seconds)
            }));
    }
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
        let info = podman.inspect(&migration.container.id).await?;
        if !info.running {
            anyhow::bail!(
                "container {} was restored but is not running",
                migration.container.name
            );
        }
        anyhow::Ok((restored, info.cgroup_path))
    }
    .await;
    let restored = match outcome {
        Ok((restored, cgroup)) => {
            migration.cgroup = cgroup;
            restored
        }
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
        criu_us: restored
            .criu_us
            .or_else(|| lazy.as_ref().and_then(|l| l.criu_restore_us())),
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
    migration.route_here(&context.state_dir).await?;
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
pub(super) async fn track_flow(flow: &conntrack::Flow) -> anyhow::Result<bool> {
    if conntrack::create(flow).await? {
        return Ok(true);
    }
    conntrack::delete(flow).await?;
    conntrack::create(flow).await
}

/// How the packets of `flow` addressed to the container arrive: protocol, from, to.
pub(super) fn arriving(
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
pub(super) async fn settle(
    migration: &mut IncomingMigration,
    context: &ServerContext,
) -> Result<(), Refusal> {
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
    migration.release_held_ip(&context.podman, true).await?;
    migration.forget()?;
    context.migrations.remove(&migration.migration_id);
    Ok(())
}
