//! `agent-client drain`: moves every running container off this host, for maintenance.
//!
//! First a plan: each container is checked against every listed destination (the same
//! preflight as `check`) and goes to the one with the most memory available among those
//! that pass, counting what the plan already sends there. A container that no
//! destination passes stays, with the reasons. Then the moves, a few at a time, each a
//! normal migration with its own rollback; Ctrl-C stops new moves and aborts the running
//! ones that can still abort, as it does for one migration.

pub mod plan;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::engine::podman::PodmanClient;
use common::migration::preflight::Severity;
use common::migration::Resolution;
use common::migration::{migrate, MigrationRequest, Phase, Progress};
use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::migrate::{EventLines, CANCELLED};
use crate::{output, say, CommonArgs};
use plan::{Candidate, Moved};

/// Checks `container` against each destination, as `check` does.
async fn candidates(
    request: impl Fn(&str, &str) -> Result<MigrationRequest>,
    container: &str,
    destinations: &[String],
) -> Result<(Option<u64>, Vec<Candidate>)> {
    let mut memory = None;
    let mut out = Vec::new();
    for destination in destinations {
        let survey = common::migration::check(&request(container, destination)?).await?;
        memory = memory.or(survey.memory_bytes);
        let problems: Vec<String> = survey
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Problem)
            .map(|f| format!("{} {}", f.check, f.detail))
            .collect();
        let verdict = match (&survey.destination, problems.is_empty()) {
            (Some(report), true) => Ok(report.memory_available_bytes),
            _ => Err(problems.join(", ")),
        };
        out.push(Candidate {
            destination: destination.clone(),
            verdict,
        });
    }
    Ok((memory, out))
}

pub async fn run(
    args: &CommonArgs,
    podman: &PodmanClient,
    destinations: &[String],
    parallel: usize,
    dry_run: bool,
    request: impl Fn(&str, &str) -> Result<MigrationRequest>,
) -> Result<ExitCode> {
    let running = podman.list_running().await?;
    if !args.quiet && !args.events {
        say(&format!(
            "checking {} running container(s) against {} ...",
            running.len(),
            destinations.join(", ")
        ));
    }
    let mut checked = Vec::new();
    for container in &running {
        let (memory, candidates) = candidates(&request, &container.name, destinations).await?;
        checked.push((container.name.clone(), memory, candidates));
    }
    let plan = plan::place(checked);
    let all_placed = plan.iter().all(|p| p.destination.is_some());
    if dry_run {
        output::print_drain(&plan, None, args.json)?;
        return Ok(exit(all_placed));
    }
    if !args.json {
        output::print_drain(&plan, None, false)?;
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    let running: Arc<std::sync::Mutex<Vec<Running>>> = Arc::default();
    let on_interrupt = tokio::spawn(stop_on_interrupt(
        crate::interrupts()?,
        interrupted.clone(),
        running.clone(),
    ));
    let lines = Lines::new(args.quiet || args.events);
    let moves = plan.iter().filter_map(|p| {
        let destination = p.destination.clone()?;
        let request = request(&p.container, &destination);
        let (interrupted, running, lines) = (interrupted.clone(), running.clone(), lines.clone());
        let events = args.events.then(|| EventLines::new(&p.container));
        Some(async move {
            let mut moved = Moved {
                container: p.container.clone(),
                destination: Some(destination.clone()),
                moved: false,
                freeze_to_resume_ms: None,
                error: None,
            };
            if interrupted.load(Ordering::SeqCst) {
                moved.error = Some("not started: the drain was interrupted".into());
                return moved;
            }
            let request = match request {
                Ok(request) => request,
                Err(e) => {
                    moved.error = Some(format!("{e:#}"));
                    return moved;
                }
            };
            let past_restore = Arc::new(AtomicBool::new(false));
            running.lock().unwrap().push(Running {
                cancel: request.cancel.clone(),
                past_restore: past_restore.clone(),
            });
            let line = lines.add(&p.container, &destination);
            let on_progress = |event: Progress| {
                if let Progress::PhaseStarted(phase) = event {
                    if phase == Phase::Restore {
                        past_restore.store(true, Ordering::SeqCst);
                    }
                    line.set(phase.label());
                }
                if let Some(events) = &events {
                    events.progress(&event);
                }
            };
            let outcome = migrate(request, &on_progress).await;
            if let Some(events) = &events {
                events.finished(&outcome);
            }
            match outcome {
                Ok(report) => {
                    line.done(&format!(
                        "moved, froze {:.0} ms",
                        report.freeze_to_resume_ms
                    ));
                    moved.moved = true;
                    moved.freeze_to_resume_ms = Some(report.freeze_to_resume_ms);
                }
                Err(failure) => {
                    // Failed after the destination took over: it runs there all the same.
                    moved.moved = matches!(failure.resolution, Resolution::RolledForward { .. });
                    line.done(&format!("not moved: {failure}"));
                    moved.error = Some(failure.to_string());
                }
            }
            moved
        })
    });
    let results: Vec<Moved> = futures_util::stream::iter(moves)
        .buffered(parallel.max(1))
        .collect()
        .await;
    on_interrupt.abort();
    output::print_drain(&plan, Some(&results), args.json)?;
    if interrupted.load(Ordering::SeqCst) {
        return Ok(ExitCode::from(CANCELLED));
    }
    Ok(exit(all_placed && results.iter().all(|r| r.moved)))
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A move under way, for Ctrl-C.
struct Running {
    cancel: CancellationToken,
    past_restore: Arc<AtomicBool>,
}

/// Ctrl-C (or SIGTERM, SIGHUP): no new moves; running ones abort where they still can.
async fn stop_on_interrupt(
    mut interrupts: crate::Interrupts,
    interrupted: Arc<AtomicBool>,
    running: Arc<std::sync::Mutex<Vec<Running>>>,
) {
    while let Some(interrupt) = interrupts.recv().await {
        interrupted.store(true, Ordering::SeqCst);
        say(&format!(
            "{interrupt}: no new moves; the running ones abort, or finish if the destination decides already"
        ));
        for move_ in running.lock().unwrap().iter() {
            if !move_.past_restore.load(Ordering::SeqCst) {
                move_.cancel.cancel();
            }
        }
    }
}

/// One progress line per container: a spinner on a terminal, plain lines otherwise.
#[derive(Clone)]
struct Lines {
    bars: Option<MultiProgress>,
    quiet: bool,
}

struct Line {
    label: String,
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Lines {
    fn new(quiet: bool) -> Self {
        let bars = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self { bars, quiet }
    }

    fn add(&self, container: &str, destination: &str) -> Line {
        let label = format!("{container} -> {destination}");
        let bar = self.bars.as_ref().map(|bars| {
            let bar = bars.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("  {spinner:.cyan} {prefix}: {msg} {elapsed}")
                    .unwrap(),
            );
            bar.set_prefix(label.clone());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Line {
            label,
            bar,
            quiet: self.quiet,
        }
    }
}

impl Line {
    fn set(&self, phase: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(phase.to_string()),
            None if !self.quiet => say(&format!("  {}: {phase} ...", self.label)),
            None => {}
        }
    }

    fn done(&self, outcome: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_style(ProgressStyle::with_template("  {prefix}: {msg}").unwrap());
                bar.finish_with_message(outcome.to_string());
            }
            None if !self.quiet => say(&format!("  {}: {outcome}", self.label)),
            None => {}
        }
    }
}
