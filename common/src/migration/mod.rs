//! A migration as a sequence of named phases, run by the source agent, and the
//! destination's side of it.
//!
//! [`run`] runs the phases ([`phases`]) in order. Each does one job and, when it changes
//! anything, records how to undo it on an [`source::UndoLog`], journaled
//! ([`source::journal`]) before the change. Both sides follow one model of who owns the
//! container at each step ([`ownership`]): if a phase fails, [`source::settle`] rolls the
//! migration back (the container runs on the source again and whatever the migration made
//! is removed), rolls it forward (the destination owns it), or keeps it stopped while the
//! destination's answer is outstanding. The destination's state is [`destination`].
//!
//! The freeze starts in `freeze`: the container's packets held, then its cgroup frozen,
//! just before CRIU stops it.
//!
//! Before it: the [`preflight`] and the choice of [`mode`]. While it runs: [`report`]'s
//! progress, as JSON [`events`]. After it: the traffic switch ([`switch`]) and the
//! [`forwarding`] it leaves on the source, and a line of [`history`] on both hosts.

#[cfg(test)]
mod crash;
pub mod destination;
pub mod events;
pub mod forwarding;
mod freeze;
pub mod history;
pub mod mode;
pub mod ownership;
pub mod phases;
pub mod preflight;
pub mod report;
pub mod run;
pub mod source;
pub mod switch;

pub use report::{
    FreezeSteps, MigrationFailure, MigrationReport, Phase, PhaseTiming, Progress, Resolution,
};
pub use run::{check, migrate, MigrationRequest};
