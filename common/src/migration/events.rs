//! The progress of a migration as JSON lines, for an orchestrator or a script to follow
//! (`agent-client --events`: one event per line, on stderr). Beside the agents' wire
//! protocol ([`crate::protocol`]), this is the other interface of the tool; this file is
//! its schema.
//!
//! Schema version [`EVENTS_VERSION`]. Every event is one JSON object on one line, with:
//! - `v`: the schema version;
//! - `at_ms`: milliseconds since the migration started;
//! - `container`: the container, as the migration was asked for it;
//! - `event`: what happened, one of:
//!   - `phase_started`, with `phase`;
//!   - `phase_finished`, with `phase` and `ms` (how long it took);
//!   - `transfer`, with `sent` and `total`: bytes of the checkpoint archive (at most ten a
//!     second, and the last one);
//!   - `rolling_back`, with `step`: what the rollback after a failure does;
//!   - `finished`, the last one, with `ok`; and `freeze_to_resume_ms` if it succeeded,
//!     or `phase` (where it failed) and `error` if it did not.
//!
//! `phase` is one of `connect`, `tunnel`, `prepare`, `checkpoint`, `transfer`, `restore`,
//! `switch_traffic`, `pages`, `clean_up` ([`Phase`]), in that order, `pages` only when
//! the memory moves from CRIU's page server. Lines that are not JSON objects are log
//! lines (warnings), not events. New fields may appear within a version; a change that
//! breaks a reader gets a new `v`.

use serde::Serialize;

use crate::migration::report::{millis, Phase, Progress};

pub const EVENTS_VERSION: u32 = 1;

/// One event ([the schema](self)).
#[derive(Debug, Clone, Serialize)]
pub struct Event<'a> {
    pub v: u32,
    pub at_ms: f64,
    pub container: &'a str,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    PhaseStarted {
        phase: Phase,
    },
    PhaseFinished {
        phase: Phase,
        ms: f64,
    },
    Transfer {
        sent: u64,
        total: u64,
    },
    RollingBack {
        step: String,
    },
    Finished {
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        freeze_to_resume_ms: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        phase: Option<Phase>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl From<Progress> for EventKind {
    fn from(progress: Progress) -> Self {
        match progress {
            Progress::PhaseStarted(phase) => EventKind::PhaseStarted { phase },
            Progress::PhaseFinished(phase, took) => EventKind::PhaseFinished {
                phase,
                ms: millis(took),
            },
            Progress::Transferred { sent, total } => EventKind::Transfer { sent, total },
            Progress::RollingBack(step) => EventKind::RollingBack { step },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_flat_json_objects_named_by_their_kind() {
        let line = |kind| {
            serde_json::to_string(&Event {
                v: EVENTS_VERSION,
                at_ms: 1.5,
                container: "web",
                kind,
            })
            .unwrap()
        };
        assert_eq!(
            line(Progress::PhaseStarted(Phase::SwitchTraffic).into()),
            r#"{"v":1,"at_ms":1.5,"container":"web","event":"phase_started","phase":"switch_traffic"}"#
        );
        assert_eq!(
            line(Progress::Transferred { sent: 1, total: 2 }.into()),
            r#"{"v":1,"at_ms":1.5,"container":"web","event":"transfer","sent":1,"total":2}"#
        );
        assert_eq!(
            line(EventKind::Finished {
                ok: false,
                freeze_to_resume_ms: None,
                phase: Some(Phase::Restore),
                error: Some("no".into()),
            }),
            r#"{"v":1,"at_ms":1.5,"container":"web","event":"finished","ok":false,"phase":"restore","error":"no"}"#
        );
    }
}
