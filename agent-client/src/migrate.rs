//! Runs a migration with a progress display, and Ctrl-C (or SIGTERM, SIGHUP) as a clean
//! abort until the destination is asked to restore the container.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use common::migration::events::{Event, EventKind, EVENTS_VERSION};
use common::migration::Resolution;
use common::migration::{
    migrate, MigrationFailure, MigrationReport, MigrationRequest, Phase, Progress,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{output, say, CommonArgs, Interrupts};

/// Exit status of a migration the operator cancelled, whatever the signal (as for SIGINT).
pub(crate) const CANCELLED: u8 = 130;

pub async fn run(args: &CommonArgs, request: MigrationRequest) -> Result<ExitCode> {
    let display = Display::new(args.quiet || args.events);
    let events = args.events.then(|| EventLines::new(&request.container));
    let past_restore_request = Arc::new(AtomicBool::new(false));
    let cancel = request.cancel.clone();
    let on_interrupt = tokio::spawn(abort_on_interrupt(
        crate::interrupts()?,
        cancel.clone(),
        past_restore_request.clone(),
        display.clone(),
    ));
    display.line(&format!(
        "migrating {} to {} (Ctrl-C aborts until the destination is asked to restore it)",
        request.container, request.destination
    ));
    let on_progress = |event: Progress| {
        if let Progress::PhaseStarted(Phase::Restore) = event {
            past_restore_request.store(true, Ordering::SeqCst);
        }
        if let Some(events) = &events {
            events.progress(&event);
        }
        display.show(event);
    };
    let outcome = migrate(request, &on_progress).await;
    on_interrupt.abort();
    if let Some(events) = &events {
        events.finished(&outcome);
    }
    if let (Err(failure), true) = (&outcome, args.json) {
        output::print_failure_json(failure)?;
    }
    match outcome {
        Ok(report) => {
            output::print_report(&report, args.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(MigrationFailure {
            phase,
            resolution: Resolution::RolledBack { problems },
            ..
        }) if cancel.is_cancelled() => {
            display.line(&format!(
                "aborted during {}: the container runs on this host again{}",
                phase.label(),
                if problems.is_empty() {
                    String::new()
                } else {
                    format!("; rollback problems:\n  {}", problems.join("\n  "))
                }
            ));
            Ok(ExitCode::from(CANCELLED))
        }
        Err(failure) => Err(failure.into()),
    }
}

async fn abort_on_interrupt(
    mut interrupts: Interrupts,
    cancel: tokio_util::sync::CancellationToken,
    past_restore_request: Arc<AtomicBool>,
    display: Display,
) {
    while let Some(interrupt) = interrupts.recv().await {
        if past_restore_request.load(Ordering::SeqCst) {
            display.line(&format!(
                "{interrupt}: too late to abort, the destination decides now; finishing"
            ));
        } else if cancel.is_cancelled() {
            display.line(&format!(
                "{interrupt}: already aborting, please wait for the rollback"
            ));
        } else {
            display.line(&format!(
                "{interrupt}: aborting; the container will run here again"
            ));
            cancel.cancel();
        }
    }
}

/// Shows the phases on stderr: spinners and a transfer bar on a terminal, plain lines
/// otherwise, nothing with `--quiet`.
#[derive(Clone)]
struct Display {
    mode: Mode,
    current: Arc<Mutex<Option<ProgressBar>>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Bars,
    Lines,
    Quiet,
}

impl Display {
    fn new(quiet: bool) -> Self {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars
        } else {
            Mode::Lines
        };
        Self {
            mode,
            current: Arc::default(),
        }
    }

    fn line(&self, text: &str) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Lines => say(text),
            Mode::Bars => match &*self.current.lock().unwrap() {
                Some(bar) => bar.println(text),
                None => say(text),
            },
        }
    }

    fn show(&self, event: Progress) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Lines => match event {
                Progress::PhaseStarted(phase) => say(&format!("  {} ...", phase.label())),
                Progress::PhaseFinished(phase, took) => say(&format!(
                    "  {} done in {:.0} ms",
                    phase.label(),
                    millis(took)
                )),
                Progress::Transferred { .. } => {}
                Progress::RollingBack(step) => say(&format!("  rolling back: {step}")),
            },
            Mode::Bars => self.show_bars(event),
        }
    }

    fn show_bars(&self, event: Progress) {
        let mut current = self.current.lock().unwrap();
        match event {
            Progress::PhaseStarted(phase) => {
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template("  {spinner:.cyan} {msg} {elapsed}").unwrap(),
                );
                bar.set_message(phase.label());
                bar.enable_steady_tick(Duration::from_millis(100));
                *current = Some(bar);
            }
            Progress::Transferred { sent, total } => {
                if let Some(bar) = current.as_ref() {
                    if bar.length().is_none() {
                        bar.set_length(total);
                        bar.set_style(
                            ProgressStyle::with_template(
                                "  {spinner:.cyan} {msg} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                            )
                            .unwrap()
                            .progress_chars("=> "),
                        );
                    }
                    bar.set_position(sent);
                }
            }
            Progress::PhaseFinished(phase, took) => {
                if let Some(bar) = current.take() {
                    bar.set_style(ProgressStyle::with_template("  ✔ {msg}").unwrap());
                    bar.finish_with_message(format!(
                        "{:<15} {:>7.0} ms",
                        phase.label(),
                        millis(took)
                    ));
                }
            }
            Progress::RollingBack(step) => {
                if let Some(bar) = current.take() {
                    bar.set_style(ProgressStyle::with_template("  ✘ {msg}").unwrap());
                    bar.abandon();
                }
                say(&format!("  rolling back: {step}"));
            }
        }
    }
}

/// `--events`: the progress as JSON lines on stderr ([`common::migration::events`]).
pub(crate) struct EventLines {
    container: String,
    started: Instant,
    /// When the last `transfer` event went out: at most ten a second.
    last_transfer: Mutex<Option<Instant>>,
}

impl EventLines {
    const TRANSFER_EVERY: Duration = Duration::from_millis(100);

    pub(crate) fn new(container: &str) -> Self {
        Self {
            container: container.to_string(),
            started: Instant::now(),
            last_transfer: Mutex::new(None),
        }
    }

    pub(crate) fn progress(&self, progress: &Progress) {
        if let Progress::Transferred { sent, total } = progress {
            let mut last = self.last_transfer.lock().unwrap();
            let due = last.is_none_or(|at| at.elapsed() >= Self::TRANSFER_EVERY);
            if !due && sent < total {
                return;
            }
            *last = Some(Instant::now());
        }
        self.emit(progress.clone().into());
    }

    pub(crate) fn finished(&self, outcome: &Result<MigrationReport, MigrationFailure>) {
        self.emit(match outcome {
            Ok(report) => EventKind::Finished {
                ok: true,
                freeze_to_resume_ms: Some(report.freeze_to_resume_ms),
                phase: None,
                error: None,
            },
            Err(failure) => EventKind::Finished {
                ok: false,
                freeze_to_resume_ms: None,
                phase: Some(failure.phase),
                error: Some(failure.to_string()),
            },
        });
    }

    fn emit(&self, kind: EventKind) {
        let event = Event {
            v: EVENTS_VERSION,
            at_ms: millis(self.started.elapsed()),
            container: &self.container,
            kind,
        };
        match serde_json::to_string(&event) {
            Ok(line) => say(&line),
            Err(e) => tracing::warn!("event not written: {e}"),
        }
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
