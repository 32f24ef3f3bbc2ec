//! The destination's side of a restore whose memory comes from the source's page server,
//! through the lazy-pages daemon ([`crate::engine::lazy_pages`]): post-copy (the container runs at
//! once, and until the last page is here it needs both hosts), or a streamed stop-copy
//! (a replica that stays stopped until the source says `Resume`). If the transfer fails,
//! the container is stopped before it can read a page that never came, and the source
//! hears so (`AwaitPages` -> [`crate::protocol::ErrorCode::PostCopyFailed`]); a replica
//! is discarded with it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use tokio::sync::watch;

use super::{DestinationActions, IncomingMigration, PagesState, Shared};
use crate::engine::lazy_pages::{LeftBehind, PageServer, PagesDaemon};
use crate::engine::podman::PodmanClient;
use crate::migration::ownership::DestinationStage;
use crate::protocol::{PageCredentials, PagesArrived};

/// How long a lazy-pages daemon that holds no userfaultfd may take to end on its own.
const NOTHING_TO_FETCH: std::time::Duration = std::time::Duration::from_secs(10);

/// What a post-copy restore imports, and the daemon that will serve its faults.
pub struct Prepared {
    pub import: PathBuf,
    pub daemon: PagesDaemon,
    work_dir: PathBuf,
}

/// Prepares the restore of `archive` in `work_dir`, its pages coming from `source` under
/// TLS with `credentials`; `stopped`: a replica, whose processes stay stopped.
pub async fn prepare(
    archive: &Path,
    work_dir: &Path,
    source: PageServer,
    credentials: &PageCredentials,
    stopped: bool,
) -> Result<Prepared> {
    let (from, dir) = (archive.to_path_buf(), work_dir.to_path_buf());
    let prepared = async {
        let import = tokio::task::spawn_blocking(move || {
            crate::engine::lazy_pages::prepare_import(&from, &dir, stopped)
        })
        .await??;
        let daemon = PagesDaemon::start(work_dir, source, credentials).await?;
        anyhow::Ok((import, daemon))
    };
    match prepared.await {
        Ok((import, daemon)) => Ok(Prepared {
            import,
            daemon,
            work_dir: work_dir.to_path_buf(),
        }),
        Err(e) => {
            remove_dir(work_dir);
            Err(e)
        }
    }
}

impl Prepared {
    /// The restore failed: the daemon and its files go.
    pub async fn abandon(mut self) {
        if let Err(e) = self.daemon.kill().await {
            tracing::warn!("stop criu lazy-pages: {e:#}");
        }
        remove_dir(&self.work_dir);
    }

    /// How long CRIU's restore took, microseconds: it leaves its statistics in the work
    /// directory, where podman does not look for them.
    pub fn criu_restore_us(&self) -> Option<u64> {
        let image = std::fs::read(self.work_dir.join(crate::engine::criu::RESTORE_STATS)).ok()?;
        crate::engine::criu::restore_time_us(&image)
    }

    /// The container is restored: watch the page transfer until it ends ([`watch`]).
    pub fn watch(self, migration: Shared, host: PodmanClient) -> watch::Receiver<PagesState> {
        watch(self.daemon, self.work_dir, migration, host)
    }
}

/// Where the lazy restore of migration `migration_id` keeps its daemon's files.
pub fn work_dir(state_dir: &Path, migration_id: &str) -> PathBuf {
    super::archive_dir(state_dir).join(format!("{migration_id}.pages"))
}

/// Watches the page transfer of a restored container until it ends. On failure the
/// container is stopped (and removed), and a replica's migration discarded; either way
/// the migration's `pages_pending` is cleared and the outcome published.
pub fn watch(
    mut daemon: PagesDaemon,
    work_dir: PathBuf,
    migration: Shared,
    host: PodmanClient,
) -> watch::Receiver<PagesState> {
    let (tell, outcome) = watch::channel(PagesState::Pending);
    tokio::spawn(async move {
        let restored_at = Instant::now();
        let transfer = match daemon.guard().await {
            Ok(true) => daemon.wait().await,
            // No userfaultfd: the daemon has finished already (a small container's
            // pages come within milliseconds), or the archive held all of the memory,
            // and then it may never end on its own.
            Ok(false) => match tokio::time::timeout(NOTHING_TO_FETCH, daemon.wait()).await {
                Ok(finished) => finished,
                Err(_) => {
                    tracing::warn!("the archive held all of the memory: no page to fetch");
                    daemon.kill().await.map(|()| 0)
                }
            },
            Err(e) => Err(e.context("cannot watch the page transfer")),
        };
        let mut migration = migration.lock().await;
        let state = match transfer {
            Ok(pages) => {
                tracing::info!(container = %migration.container.name, pages, "every page is here");
                PagesState::Arrived(PagesArrived {
                    after_restore: restored_at.elapsed(),
                    pages,
                })
            }
            Err(e) => {
                tracing::error!(container = %migration.container.name, "post-copy failed: {e:#}; stopping the container");
                let _ = daemon.kill().await;
                PagesState::Failed(stop_failed(&mut migration, &host, format!("{e:#}")).await)
            }
        };
        daemon.release();
        migration.pages_pending = false;
        if let Err(e) = migration.save() {
            tracing::error!("{e:#}");
        }
        remove_dir(&work_dir);
        let _ = tell.send(state);
    });
    outcome
}

/// The memory of `migration`'s container cannot all arrive: it is stopped (and removed)
/// before it reads a page that never came, and a replica's migration is discarded (the
/// source's processes live on). Returns `why`, with whatever of that failed.
async fn stop_failed(
    migration: &mut IncomingMigration,
    host: &impl DestinationActions,
    mut why: String,
) -> String {
    if let Err(stop) = host.stop_container(&migration.container.id).await {
        why.push_str(&format!("; and stopping the container failed: {stop:#}"));
    }
    if migration.stage == DestinationStage::Replica {
        if let Err(e) = migration.discard(host).await {
            why.push_str(&format!("; and discarding the replica failed: {e:#}"));
        }
    }
    why
}

/// Takes over the page transfer of `migration`, which a previous run of this agent
/// restored lazily and left with its memory still coming. Its daemon goes on without the
/// agent, and how it ends decides the source's processes (in order, CRIU ends them), so a
/// replica whose memory all came must wait for the source's `Resume`, not go:
/// - the daemon still runs: it is watched again, as one started here;
/// - it ended in order (by its log): every page is here;
/// - otherwise nothing here vouches for the memory, and the migration stays pending: the
///   container is stopped ([`IncomingMigration::apply`]).
///
/// Returns what it found, for the report.
pub fn take_over(
    state_dir: &Path,
    shared: &Shared,
    migration: &mut IncomingMigration,
    host: PodmanClient,
) -> String {
    let name = migration.container.name.clone();
    let Some(source) = migration.page_server else {
        return format!("{name}: restored lazily, from no known page server");
    };
    let dir = work_dir(state_dir, &migration.migration_id);
    match PagesDaemon::find_left_behind(&dir, source) {
        Ok(LeftBehind::Running(daemon)) => {
            migration.pages = Some(watch(*daemon, dir, shared.clone(), host));
            format!("{name}: its memory is still coming; the lazy-pages daemon is watched again")
        }
        Ok(LeftBehind::Ended(Ok(pages))) => {
            migration.pages_pending = false;
            let arrived = PagesArrived {
                after_restore: std::time::Duration::ZERO,
                pages,
            };
            migration.pages = Some(watch::channel(PagesState::Arrived(arrived)).1);
            remove_dir(&dir);
            format!("{name}: all of its memory ({pages} pages) arrived while the agent was down")
        }
        Ok(LeftBehind::Ended(Err(why))) => {
            format!("{name}: its page transfer did not end while the agent was down: {why}")
        }
        Err(e) => format!("{name}: cannot find its lazy-pages daemon: {e:#}"),
    }
}

/// Waits for the outcome of a watched transfer: how long after the restore the last
/// page arrived and how many came, or why it failed.
pub async fn arrived(mut outcome: watch::Receiver<PagesState>) -> Result<PagesArrived, String> {
    let state = outcome
        .wait_for(|s| *s != PagesState::Pending)
        .await
        .map_err(|_| "the page transfer's watcher is gone".to_string())?
        .clone();
    match state {
        PagesState::Arrived(arrived) => Ok(arrived),
        PagesState::Failed(why) => Err(why),
        PagesState::Pending => unreachable!("waited for"),
    }
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("could not remove {}: {e}", dir.display());
        }
    }
}
