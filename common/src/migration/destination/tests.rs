//! Every destination stage, with podman running the container or not, and the agent
//! dying before and after every step of winding the migration down; then the agent
//! starts again and recovers. It keeps the container exactly when it owns it (or a
//! restore podman finished without it made it the owner), and removes everything
//! else.

use std::sync::{Arc, Mutex};

use super::*;
use crate::migration::crash::{Crash, CrashPoint};

#[derive(Debug, Clone, Default)]
struct World {
    /// podman's container: `Some(running)`.
    container: Option<bool>,
    flows: usize,
    address: Address,
    removed_an_owned_copy: bool,
}

/// Where the container's address goes.
#[derive(Debug, Clone, Default, PartialEq)]
enum Address {
    #[default]
    Held,
    Local,
    Tunnel(String),
}

/// The tunnel a returning container's address was routed into before the migration.
const BACK: &str = "lmwg-back";

struct Fake {
    world: Arc<Mutex<World>>,
    owned: bool,
    crash: CrashPoint,
}

impl Fake {
    async fn step<T>(&self, effect: impl FnOnce(&mut World) -> T) -> Result<T> {
        Ok(self.crash.step(&self.world, effect).await)
    }
}

impl DestinationActions for Fake {
    async fn container(&self, _: &str) -> Result<Option<bool>> {
        self.step(|w| w.container).await
    }

    async fn remove_container(&self, _: &str) -> Result<()> {
        let owned = self.owned;
        self.step(move |w| {
            w.removed_an_owned_copy |= owned;
            w.container = None;
        })
        .await
    }

    async fn stop_container(&self, id: &str) -> Result<()> {
        self.remove_container(id).await
    }

    async fn resume_container(&self, _: &str, _: Option<&str>) -> Result<()> {
        self.step(|_| ()).await
    }

    async fn delete_flow(&self, _: &Flow) -> Result<()> {
        // A flow already gone is fine, as for conntrack (ENOENT).
        self.step(|w| w.flows = w.flows.saturating_sub(1)).await
    }

    async fn release_ip(&self, _: Ipv4Addr, into: Option<&str>) -> Result<Option<HoldReport>> {
        let to = into.map_or(Address::Local, |tunnel| Address::Tunnel(tunnel.into()));
        self.step(|w| w.address = to).await?;
        Ok(None)
    }

    fn take_over_pages(&self, _: &Path, _: &Shared, _: &mut IncomingMigration) -> String {
        // No daemon here: nothing vouches for the memory.
        "no lazy-pages daemon".into()
    }
}

fn container() -> ContainerRef {
    ContainerRef {
        id: "a".repeat(64),
        name: "web".into(),
        image_id: "b".repeat(64),
        image_name: String::new(),
        address: Some(Ipv4Addr::new(10, 88, 1, 2)),
        published_ports: Vec::new(),
    }
}

/// A migration journaled at `stage` with two flows and a held address, which was routed
/// into a tunnel before if the container is `returning`; podman has `container`. Returns
/// the state directory and the world.
fn journaled(
    stage: DestinationStage,
    container: Option<bool>,
    returning: bool,
) -> (tempfile::TempDir, World) {
    let dir = tempfile::tempdir().unwrap();
    let mut migration = IncomingMigration::new(
        dir.path(),
        &"0".repeat(32),
        super::tests::container(),
        "h1".into(),
    )
    .unwrap();
    let flow = Flow::tcp(
        "10.77.0.100:40000".parse().unwrap(),
        "10.88.1.2:5000".parse().unwrap(),
    );
    migration.flows = vec![flow.clone(), flow];
    migration.held_ip = Some(Ipv4Addr::new(10, 88, 1, 2));
    migration.forwarded_via = returning.then(|| BACK.to_string());
    migration.stage = stage;
    migration.save().unwrap();
    let world = World {
        container,
        flows: 2,
        ..World::default()
    };
    (dir, world)
}

/// The connection is lost (the agent dying at `crash`), then the agent starts again.
async fn lose_then_restart(
    stage: DestinationStage,
    container: Option<bool>,
    returning: bool,
    crash: Option<Crash>,
) -> (World, bool, usize) {
    let (dir, start) = journaled(stage, container, returning);
    let owned = stage == DestinationStage::Owns;
    let world = Arc::new(Mutex::new(start));
    let dying = Fake {
        world: world.clone(),
        owned,
        crash: CrashPoint::new(crash),
    };
    let mut migration = match list(dir.path()).pop() {
        Some(Journaled::Readable(m)) => *m,
        other => panic!("{other:?}"),
    };
    let _ = tokio::time::timeout(
        Duration::from_millis(20),
        migration.apply(ownership::on_connection_lost(stage), &dying),
    )
    .await;
    let restarted = Fake {
        world: world.clone(),
        // What it owns now: podman runs the container and it was owned, or a restore
        // finished without the agent.
        owned: owned || (stage == DestinationStage::Restoring && container == Some(true)),
        crash: CrashPoint::new(None),
    };
    let registry = Registry::default();
    recover(dir.path(), &restarted, &registry).await.unwrap();
    let kept = registry.get(&"0".repeat(32)).is_some();
    let end = world.lock().unwrap().clone();
    assert_eq!(
        kept,
        dir.path()
            .join("sessions")
            .join(format!("{}.json", "0".repeat(32)))
            .exists(),
        "the registry and the journal disagree"
    );
    (end, kept, dying.crash.taken())
}

/// The agent died during a replica's restore, which podman finished without it: the
/// copy stays a stopped replica, its address held, for the source's word.
#[tokio::test(start_paused = true)]
async fn a_replica_restored_while_the_agent_was_down_stays_a_replica() {
    let (dir, start) = journaled(DestinationStage::Restoring, Some(true), false);
    let path = dir
        .path()
        .join("sessions")
        .join(format!("{}.json", "0".repeat(32)));
    let mut journal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    journal["replica"] = true.into();
    std::fs::write(&path, serde_json::to_vec(&journal).unwrap()).unwrap();
    let world = Arc::new(Mutex::new(start));
    let host = Fake {
        world: world.clone(),
        owned: false,
        crash: CrashPoint::new(None),
    };
    let registry = Registry::default();
    recover(dir.path(), &host, &registry).await.unwrap();
    let kept = registry.get(&"0".repeat(32)).expect("kept");
    assert_eq!(kept.lock().await.stage, DestinationStage::Replica);
    let end = world.lock().unwrap().clone();
    assert!(
        end.address == Address::Held && end.container == Some(true),
        "{end:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_crash_before_or_after_any_step_keeps_exactly_what_it_owns() {
    let cases = [
        (DestinationStage::Receiving, None),
        (DestinationStage::Restoring, None),
        (DestinationStage::Restoring, Some(false)),
        (DestinationStage::Restoring, Some(true)),
        (DestinationStage::Replica, Some(true)),
        (DestinationStage::Owns, Some(true)),
    ];
    for ((stage, container), returning) in cases
        .into_iter()
        .flat_map(|case| [(case, false), (case, true)])
    {
        let (_, _, steps) = lose_then_restart(stage, container, returning, None).await;
        for crash in Crash::all(steps) {
            let (end, kept, _) = lose_then_restart(stage, container, returning, crash).await;
            let case =
                format!("{stage:?} podman={container:?} returning={returning} {crash:?}: {end:?}");
            assert!(!end.removed_an_owned_copy, "removed what it owns: {case}");
            // A replica waits for the source's word with its address held: it does
            // not run. A copy kept runs here; without one, the address goes where the
            // container still lives: back into the tunnel it had left through.
            let expected = if stage == DestinationStage::Replica {
                Address::Held
            } else if kept || !returning {
                Address::Local
            } else {
                Address::Tunnel(BACK.into())
            };
            assert_eq!(end.address, expected, "where the address goes: {case}");
            // Kept exactly when a copy runs, and then with its flows; otherwise nothing
            // is left. Owned stays owned; a restore podman finished without the agent
            // may be kept (if the agent died before removing it) or not.
            if kept {
                assert!(end.container == Some(true), "kept without a copy: {case}");
                assert_eq!(end.flows, 2, "the running copy's flows went: {case}");
            } else {
                assert!(end.container.is_none(), "a copy runs unowned: {case}");
                assert_eq!(end.flows, 0, "flows left: {case}");
            }
            match stage {
                DestinationStage::Owns | DestinationStage::Replica => {
                    assert!(kept, "gave up what it holds for the source: {case}")
                }
                DestinationStage::Receiving => assert!(!kept, "kept nothing it had: {case}"),
                _ => {}
            }
        }
    }
}
