//! Who owns the container at each step of a migration: the one model both sides follow.
//!
//! The decision point is the destination's durable record that it runs the container
//! ([`DestinationStage::Owns`], written before it answers `Restored`). Until that record
//! exists the source owns the container; from then on the destination does, and the source
//! never restarts its copy on its own. Between the source's request to restore and an
//! answer, ownership is *in doubt*: the source keeps its copy stopped and asks the
//! destination (`Resolve`) until it answers. The destination answers either "I own it" or
//! fences the migration (removes any copy, and will start none) and says so. A lost
//! connection is never an answer.
//!
//! A streamed stop-copy moves the decision: the destination restores a stopped replica
//! ([`DestinationStage::Replica`]) whose memory fills in from CRIU's page server here,
//! while the processes here stay alive, held by CRIU. CRIU ends them only once their last
//! page has gone. So, with CRIU stopped, the processes here decide
//! ([`after_streaming`]): alive, the migration rolls back and the replica is fenced; gone,
//! the destination must resume the replica (`Resume`), and owns it from then on. The
//! replica never runs on its own: only the source says `Resume`, and only once its own
//! processes are gone.
//!
//! The functions below are the whole policy; the source ([`super::migrate`], the journal's
//! recovery) and the destination ([`super::destination`]) only carry it out.

use serde::{Deserialize, Serialize};

use crate::migration::report::Phase;
use crate::protocol::Verdict;

/// Where a migration stands on the source, journaled durably before the step it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceStage {
    /// Nothing is stopped yet (connect, tunnel, prepare).
    Running,
    /// The container is stopped here. The destination cannot run it: it restores only on a
    /// `Restore` request, and none was sent.
    Frozen,
    /// A `Restore` was (or may have been) sent: ownership is in doubt until the
    /// destination answers.
    RestoreRequested,
    /// Streamed stop-copy: the destination holds a stopped replica that fills with the
    /// memory from CRIU's page server here; the processes here live on, held by CRIU,
    /// until their last page has gone ([`after_streaming`]).
    Streaming,
    /// The destination said it runs the container.
    DestinationOwns,
}

/// What the source does with a migration that cannot go on as planned (a failure, a
/// cancel, or a journal left by a process that died).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAction {
    /// Undo everything and start the container here again.
    RollBack,
    /// The destination runs it: switch the traffic, remove the source copy.
    RollForward,
    /// Ask the destination; the container stays stopped here until it answers.
    Ask,
    /// Neither host has a whole copy (the processes here are gone, and so is the replica).
    Lost,
}

/// The source's next step at `stage`, given the destination's answer if it gave one.
pub fn source_action(stage: SourceStage, verdict: Option<Verdict>) -> SourceAction {
    match (stage, verdict) {
        (SourceStage::Running | SourceStage::Frozen, _) => SourceAction::RollBack,
        (SourceStage::DestinationOwns, _) => SourceAction::RollForward,
        (SourceStage::RestoreRequested, Some(Verdict::DestinationOwns)) => {
            SourceAction::RollForward
        }
        (SourceStage::RestoreRequested, Some(Verdict::Fenced)) => SourceAction::RollBack,
        (SourceStage::RestoreRequested, None) => SourceAction::Ask,
        // Decided by the processes here: [`after_streaming`].
        (SourceStage::Streaming, _) => SourceAction::Ask,
    }
}

/// The source's next step at [`SourceStage::Streaming`], once CRIU's page server here is
/// stopped: whether the processes here survived it, and the destination's answer to
/// `Resume` if it was asked (only when they did not).
pub fn after_streaming(source_alive: bool, resumed: Option<Verdict>) -> SourceAction {
    match (source_alive, resumed) {
        (true, _) => SourceAction::RollBack,
        (false, Some(Verdict::DestinationOwns)) => SourceAction::RollForward,
        (false, Some(Verdict::Fenced)) => SourceAction::Lost,
        (false, None) => SourceAction::Ask,
    }
}

/// Where an incoming migration stands on the destination, journaled durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationStage {
    /// The archive (and flows) arrive; no container exists for it here.
    Receiving,
    /// podman restores it; a copy may exist, not yet confirmed.
    Restoring,
    /// Streamed stop-copy: a stopped copy exists here, its memory filling in from the
    /// source's page server. It runs only when the source says `Resume`.
    Replica,
    /// It runs here and that is recorded: the decision point.
    Owns,
    /// The source was told this host holds no copy and will start none.
    Fenced,
}

impl DestinationStage {
    /// The source's phase while the destination is at this stage.
    pub fn phase(self) -> Phase {
        match self {
            DestinationStage::Receiving => Phase::Transfer,
            DestinationStage::Restoring | DestinationStage::Fenced => Phase::Restore,
            DestinationStage::Replica => Phase::Pages,
            DestinationStage::Owns => Phase::SwitchTraffic,
        }
    }
}

/// What the destination does with an incoming migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationAction {
    /// Keep the container (and the record, until the source settles).
    Keep,
    /// Leave the stopped replica as it is: only the source knows whether it must run
    /// (`Resume`) or go (`Resolve`).
    Wait,
    /// Remove whatever the migration made here, any copy included.
    Discard,
    /// A restore may have finished without the agent: if podman runs the container,
    /// it is ours ([`DestinationStage::Owns`]); otherwise discard.
    Reconcile,
}

/// When the source's connection closes (or times out) with the migration at `stage`.
pub fn on_connection_lost(stage: DestinationStage) -> DestinationAction {
    match stage {
        DestinationStage::Owns => DestinationAction::Keep,
        DestinationStage::Replica => DestinationAction::Wait,
        // The handler finished with podman before it got here: no restore is in flight.
        DestinationStage::Receiving | DestinationStage::Restoring | DestinationStage::Fenced => {
            DestinationAction::Discard
        }
    }
}

/// When the agent starts again and finds the migration journaled at `stage`.
pub fn on_restart(stage: DestinationStage) -> DestinationAction {
    match stage {
        DestinationStage::Owns => DestinationAction::Keep,
        DestinationStage::Replica => DestinationAction::Wait,
        DestinationStage::Restoring => DestinationAction::Reconcile,
        DestinationStage::Receiving | DestinationStage::Fenced => DestinationAction::Discard,
    }
}

/// The answer to the source's `Resolve`: the owner says so; anything else is fenced first.
pub fn resolve(stage: DestinationStage) -> (DestinationAction, Verdict) {
    match stage {
        DestinationStage::Owns => (DestinationAction::Keep, Verdict::DestinationOwns),
        _ => (DestinationAction::Discard, Verdict::Fenced),
    }
}

/// Whether a `Resume` may let the copy at `stage` run (a replica, or the copy it already
/// resumed); anything else has no copy to run.
pub fn may_resume(stage: DestinationStage) -> bool {
    matches!(stage, DestinationStage::Replica | DestinationStage::Owns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE_STAGES: [SourceStage; 4] = [
        SourceStage::Running,
        SourceStage::Frozen,
        SourceStage::RestoreRequested,
        SourceStage::DestinationOwns,
    ];
    const DESTINATION_STAGES: [DestinationStage; 5] = [
        DestinationStage::Receiving,
        DestinationStage::Restoring,
        DestinationStage::Replica,
        DestinationStage::Owns,
        DestinationStage::Fenced,
    ];

    /// How many copies can run once both sides followed the policy, for a destination at
    /// `dest` and a source at `source` that got `verdict` (if any).
    fn running_copies(source: SourceStage, dest: DestinationStage, verdict: Option<Verdict>) -> u8 {
        let source_runs = source_action(source, verdict) == SourceAction::RollBack;
        let dest_runs = dest == DestinationStage::Owns;
        u8::from(source_runs) + u8::from(dest_runs)
    }

    #[test]
    fn without_a_restore_request_the_source_rolls_back_alone() {
        for verdict in [None, Some(Verdict::Fenced)] {
            assert_eq!(
                source_action(SourceStage::Frozen, verdict),
                SourceAction::RollBack
            );
        }
    }

    #[test]
    fn a_lost_connection_after_the_restore_request_is_no_answer() {
        assert_eq!(
            source_action(SourceStage::RestoreRequested, None),
            SourceAction::Ask
        );
    }

    #[test]
    fn never_two_copies_whatever_the_destination_answers() {
        // The destination only answers from its own stage; a source that asks gets that
        // answer. The destination can only be at Owns if the source requested a restore.
        for source in SOURCE_STAGES {
            for dest in DESTINATION_STAGES {
                let reachable =
                    dest == DestinationStage::Receiving || source >= SourceStage::RestoreRequested;
                if !reachable {
                    continue;
                }
                let (_, verdict) = resolve(dest);
                let asked = source_action(source, None) == SourceAction::Ask;
                let verdict = asked.then_some(verdict);
                assert!(
                    running_copies(source, dest, verdict) <= 1,
                    "{source:?} / {dest:?} / {verdict:?}"
                );
            }
        }
    }

    #[test]
    fn exactly_one_copy_once_resolved() {
        // After a crash anywhere and the recovery of both sides, one copy runs.
        for dest in DESTINATION_STAGES {
            let dest_after_restart = match on_restart(dest) {
                DestinationAction::Keep | DestinationAction::Wait => dest,
                // Reconcile keeps a copy podman runs, discards otherwise: both cases.
                DestinationAction::Reconcile => DestinationStage::Restoring,
                DestinationAction::Discard => DestinationStage::Fenced,
            };
            for reconciled in [DestinationStage::Owns, dest_after_restart] {
                let (_, verdict) = resolve(reconciled);
                let copies =
                    running_copies(SourceStage::RestoreRequested, reconciled, Some(verdict));
                assert_eq!(copies, 1, "{dest:?} -> {reconciled:?}");
            }
        }
    }

    #[test]
    fn a_streamed_migration_is_decided_by_the_source_processes() {
        // Alive once CRIU is stopped: they run again, whatever the replica; the replica
        // is fenced by the roll-back.
        for answer in [None, Some(Verdict::Fenced), Some(Verdict::DestinationOwns)] {
            assert_eq!(after_streaming(true, answer), SourceAction::RollBack);
        }
        // Gone: only the replica can run, and it runs only once resumed.
        assert_eq!(after_streaming(false, None), SourceAction::Ask);
        assert_eq!(
            after_streaming(false, Some(Verdict::DestinationOwns)),
            SourceAction::RollForward
        );
        assert_eq!(
            after_streaming(false, Some(Verdict::Fenced)),
            SourceAction::Lost
        );
        // The replica never runs unasked, nor survives a source that rolls back.
        assert_eq!(
            on_connection_lost(DestinationStage::Replica),
            DestinationAction::Wait
        );
        assert_eq!(
            on_restart(DestinationStage::Replica),
            DestinationAction::Wait
        );
        assert_eq!(
            resolve(DestinationStage::Replica),
            (DestinationAction::Discard, Verdict::Fenced)
        );
        for stage in DESTINATION_STAGES {
            assert_eq!(
                may_resume(stage),
                matches!(stage, DestinationStage::Replica | DestinationStage::Owns),
                "{stage:?}"
            );
        }
    }

    #[test]
    fn the_destination_keeps_only_what_it_owns() {
        for stage in DESTINATION_STAGES {
            let keeps = on_connection_lost(stage) == DestinationAction::Keep;
            assert_eq!(keeps, stage == DestinationStage::Owns, "{stage:?}");
        }
        assert_eq!(
            on_restart(DestinationStage::Restoring),
            DestinationAction::Reconcile
        );
    }
}
