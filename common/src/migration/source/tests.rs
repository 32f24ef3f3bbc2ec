//! Every source stage, with the destination owning the container or not, reachable or
//! not, and the process dying before and after every step of its resolution; then
//! the adopter resolves what is left. At no moment may two copies run, and at the end
//! exactly one does, with nothing left over.

use std::sync::{Arc, Mutex};

use super::*;
use crate::migration::crash::{Crash, CrashPoint};

/// Both hosts, as far as the migration is concerned.
#[derive(Debug, Clone, Default)]
struct World {
    source_runs: bool,
    source_copy: bool,
    archive: bool,
    blackholed: bool,
    held: bool,
    dest_runs: bool,
    /// Streamed stop-copy: the destination holds a stopped replica, with every page.
    replica: bool,
    /// The processes CRIU held here for the lazy checkpoint live on.
    held_alive: bool,
    dest_fenced: bool,
    dest_settled: bool,
    switched: bool,
    /// New connections to the published ports follow the container.
    forwarded: bool,
    reachable: bool,
    two_copies_seen: bool,
}

struct Fake {
    world: Arc<Mutex<World>>,
    crash: CrashPoint,
    state_dir: std::path::PathBuf,
}

impl Fake {
    fn new(world: &Arc<Mutex<World>>, state_dir: &Path, crash: Option<Crash>) -> Self {
        Self {
            world: world.clone(),
            crash: CrashPoint::new(crash),
            state_dir: state_dir.to_path_buf(),
        }
    }

    async fn step<T>(&self, effect: impl FnOnce(&mut World) -> Result<T>) -> Result<T> {
        self.crash.step(&self.world, effect).await
    }
}

impl SourceActions for Fake {
    fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    async fn ask(&self, _: &JournalRecord, _: Duration) -> Result<Verdict> {
        self.step(|w| {
            anyhow::ensure!(w.reachable, "unreachable");
            if w.dest_runs {
                Ok(Verdict::DestinationOwns)
            } else {
                w.dest_fenced = true;
                w.replica = false;
                Ok(Verdict::Fenced)
            }
        })
        .await
    }

    fn held_processes_alive(&self, _: &JournalRecord) -> bool {
        self.world.lock().unwrap().held_alive
    }

    async fn resume(&self, _: &JournalRecord, _: Duration) -> Result<Verdict> {
        self.step(|w| {
            anyhow::ensure!(w.reachable, "unreachable");
            if w.replica {
                w.two_copies_seen |= w.source_runs;
                w.replica = false;
                w.dest_runs = true;
            }
            Ok(if w.dest_runs {
                Verdict::DestinationOwns
            } else {
                Verdict::Fenced
            })
        })
        .await
    }

    async fn undo(&self, step: &Undo) -> Result<()> {
        let step = step.clone();
        self.step(move |w| {
            match step {
                Undo::RestartOnSource { .. } => {
                    anyhow::ensure!(w.source_copy || w.archive, "no copy to start");
                    w.two_copies_seen |= w.dest_runs;
                    w.source_runs = true;
                    w.source_copy = true;
                }
                Undo::RemoveFile(_) => w.archive = false,
                Undo::RemoveContainerRoute(_) => w.blackholed = false,
                Undo::ReleaseHold(_) => w.held = false,
                Undo::Thaw(_) | Undo::StopPageServer { .. } | Undo::Unguard(_) => {}
                Undo::FenceReplica { .. } => {
                    anyhow::ensure!(w.reachable, "unreachable");
                    anyhow::ensure!(!w.dest_runs, "the destination runs it");
                    w.replica = false;
                    w.dest_fenced = true;
                }
            }
            Ok(())
        })
        .await
    }

    async fn pages_arrived(&self, _: &JournalRecord) -> Result<()> {
        Ok(())
    }

    async fn switch_traffic<T>(
        &self,
        _: &SwitchPlan,
        then: impl std::future::Future<Output = T>,
    ) -> (Result<Option<HoldReport>>, T) {
        let switched = self
            .step(|w| {
                w.switched = true;
                w.held = false;
                Ok(None)
            })
            .await;
        (switched, then.await)
    }

    async fn forward_new_connections(&self, _: &SwitchPlan) -> Result<()> {
        self.step(|w| {
            w.forwarded = true;
            Ok(())
        })
        .await
    }

    async fn remove_source_copy(&self, _: &str) -> Result<()> {
        self.step(|w| {
            w.source_copy = false;
            w.source_runs = false;
            Ok(())
        })
        .await
    }

    async fn settle_destination(&self, _: &JournalRecord) -> Result<()> {
        self.step(|w| {
            anyhow::ensure!(w.reachable, "unreachable");
            w.dest_settled = true;
            Ok(())
        })
        .await
    }
}

fn plan() -> SwitchPlan {
    SwitchPlan {
        container_id: "c".repeat(64),
        container_name: "web".into(),
        container_ip: "10.88.1.2".parse().unwrap(),
        interface: "lmwg-0".into(),
        next_agent: "100.127.0.1:7878".parse().unwrap(),
        ports: Vec::new(),
    }
}

/// A migration journaled at `stage`, and the world it left.
fn journaled(state_dir: &Path, stage: SourceStage, dest_runs: bool) -> (UndoLog, World) {
    let frozen = stage >= SourceStage::Frozen;
    let steps = if frozen {
        vec![
            Undo::RemoveFile("/tmp/lm-test.tar".into()),
            Undo::ReleaseHold("10.88.1.2".parse().unwrap()),
            Undo::RemoveContainerRoute("10.88.1.2".parse().unwrap()),
            Undo::RestartOnSource {
                container: "web".into(),
                archive: "/tmp/lm-test.tar".into(),
            },
        ]
    } else {
        Vec::new()
    };
    let log = UndoLog::create(
        state_dir,
        JournalRecord {
            migration_id: "0".repeat(32),
            container: "web".into(),
            container_id: "c".repeat(64),
            destination: "h2:7878".into(),
            stage,
            steps,
            switch: Some(plan()),
            held_init: None,
        },
    )
    .unwrap();
    let world = World {
        source_runs: !frozen,
        source_copy: true,
        archive: frozen,
        blackholed: frozen,
        held: frozen,
        dest_runs,
        reachable: true,
        ..World::default()
    };
    (log, world)
}

/// A streamed stop-copy journaled at [`SourceStage::Streaming`]: CRIU's page server
/// still runs here; the processes it holds live on (`held_alive`) or it ended them; the
/// destination has a replica with every page (`replica`) or none.
fn streaming(state_dir: &Path, held_alive: bool, replica: bool) -> (UndoLog, World) {
    let (mut log, mut world) = journaled(state_dir, SourceStage::Streaming, false);
    log.record.steps.extend([
        Undo::StopPageServer {
            server: crate::engine::lazy_pages::PageServer {
                address: "100.127.0.1".parse().unwrap(),
                port: 40000,
            },
            held: None,
        },
        Undo::FenceReplica {
            destination: "h2:7878".into(),
            migration_id: "0".repeat(32),
        },
    ]);
    log.save().unwrap();
    // Its archive holds no memory: only the live processes can run again here.
    world.archive = false;
    world.source_copy = held_alive;
    world.held_alive = held_alive;
    world.replica = replica;
    (log, world)
}

/// Resolves, dying at `crash`; then the adopter resolves what is left (the destination
/// reachable again). Returns the world at the end.
async fn resolve_with(
    stage: SourceStage,
    dest_runs: bool,
    reachable_at_first: bool,
    crash: Option<Crash>,
) -> (World, usize) {
    resolve_from(
        |dir| journaled(dir, stage, dest_runs),
        reachable_at_first,
        crash,
    )
    .await
}

async fn resolve_from(
    start: impl Fn(&Path) -> (UndoLog, World),
    reachable_at_first: bool,
    crash: Option<Crash>,
) -> (World, usize) {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut start) = start(dir.path());
    let stage = log.record.stage;
    start.reachable = reachable_at_first;
    let world = Arc::new(Mutex::new(start));
    let first = Fake::new(&world, dir.path(), crash);
    // Long enough for every step that does not die; the one that does never returns.
    let _ = tokio::time::timeout(
        Duration::from_millis(20),
        settle(&mut log, &first, Duration::ZERO, &|_| {}),
    )
    .await;
    drop(log); // the process is gone, or done: its lock goes
    world.lock().unwrap().reachable = true;
    let adopter = Fake::new(&world, dir.path(), None);
    for _ in 0..3 {
        recover_abandoned(&adopter, false).await;
    }
    assert!(
        journal::list(dir.path()).is_empty(),
        "a journal is left: {stage:?} {crash:?}"
    );
    let end = world.lock().unwrap().clone();
    (end, first.crash.taken())
}

fn assert_resolved(end: &World, case: &str) {
    assert!(!end.two_copies_seen, "two copies ran: {case}: {end:?}");
    assert!(
        end.source_runs != end.dest_runs,
        "not exactly one copy: {case}: {end:?}"
    );
    if end.dest_runs {
        assert!(
            !end.source_copy
                && end.switched
                && end.forwarded
                && end.dest_settled
                && !end.archive
                && !end.held,
            "rolled forward only in part: {case}: {end:?}"
        );
    } else {
        assert!(
            !end.blackholed && !end.archive && !end.held && !end.replica,
            "rolled back only in part: {case}: {end:?}"
        );
    }
}

#[tokio::test]
async fn a_streamed_migration_ends_with_exactly_one_copy_after_a_crash_anywhere() {
    // The processes here outlived CRIU (whatever the replica), or CRIU ended them once
    // every page was on the destination's replica.
    for (held_alive, replica) in [(true, true), (true, false), (false, true)] {
        for reachable in [true, false] {
            let start = |dir: &Path| streaming(dir, held_alive, replica);
            let (_, steps) = resolve_from(start, reachable, None).await;
            for crash in Crash::all(steps) {
                let (end, _) = resolve_from(start, reachable, crash).await;
                let case = format!(
                    "streaming held_alive={held_alive} replica={replica} reachable={reachable} {crash:?}"
                );
                assert_resolved(&end, &case);
                assert_eq!(end.dest_runs, !held_alive, "the wrong copy runs: {case}");
            }
        }
    }
}

#[tokio::test]
async fn a_crash_before_or_after_any_step_leaves_exactly_one_copy() {
    let cases = [
        (SourceStage::Running, false),
        (SourceStage::Frozen, false),
        (SourceStage::RestoreRequested, false),
        (SourceStage::RestoreRequested, true),
        (SourceStage::DestinationOwns, true),
    ];
    for (stage, dest_runs) in cases {
        for reachable in [true, false] {
            let (_, steps) = resolve_with(stage, dest_runs, reachable, None).await;
            for crash in Crash::all(steps) {
                let (end, _) = resolve_with(stage, dest_runs, reachable, crash).await;
                let case =
                    format!("{stage:?} dest_runs={dest_runs} reachable={reachable} {crash:?}");
                assert_resolved(&end, &case);
            }
        }
    }
}

#[tokio::test]
async fn an_unanswered_destination_keeps_the_container_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut start) = journaled(dir.path(), SourceStage::RestoreRequested, true);
    start.reachable = false;
    let world = Arc::new(Mutex::new(start));
    let host = Fake::new(&world, dir.path(), None);
    let outcome = settle(&mut log, &host, Duration::ZERO, &|_| {}).await;
    assert!(matches!(outcome, Resolution::InDoubt { .. }), "{outcome:?}");
    let now = world.lock().unwrap().clone();
    assert!(!now.source_runs && now.blackholed && now.archive, "{now:?}");
    drop(log);
    assert_eq!(journal::list(dir.path()).len(), 1, "the journal stays");
}
