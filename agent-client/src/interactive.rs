//! The interactive way in: pick a container and a destination, see the preflight, confirm.

use anyhow::{bail, Context, Result};
use common::migration::history;
use common::migration::mode::{self, MemoryPath, Mode, ModeRequest};
use common::migration::{phases, MigrationRequest};
use dialoguer::theme::ColorfulTheme;
use dialoguer::{Confirm, FuzzySelect, Input};
use indicatif::HumanBytes;

use crate::{check, output, CommonArgs};

/// Asks the operator what to migrate where; `None` if they decline.
pub async fn choose(
    args: &CommonArgs,
    mode: ModeRequest,
    stop_copy_memory: MemoryPath,
) -> Result<Option<MigrationRequest>> {
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        bail!("no --container given and stdin is not a terminal: use --container NAME --dest HOST[:PORT]");
    }
    // Ctrl-C (or SIGTERM, SIGHUP) at a prompt: nothing has been changed yet, but the prompt
    // hid the cursor.
    let mut interrupts = crate::interrupts()?;
    let on_interrupt = tokio::spawn(async move {
        if interrupts.recv().await.is_some() {
            let _ = console::Term::stderr().show_cursor();
            crate::say("\ncancelled: nothing was changed");
            std::process::exit(130);
        }
    });
    let chosen = ask(args, mode, stop_copy_memory).await;
    if chosen.as_ref().is_err_and(interrupted) {
        // The prompt saw the signal first; the handler above ends the process.
        std::future::pending::<()>().await;
    }
    on_interrupt.abort();
    chosen
}

fn interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::Interrupted)
            || matches!(
                cause.downcast_ref::<dialoguer::Error>(),
                Some(dialoguer::Error::IO(io)) if io.kind() == std::io::ErrorKind::Interrupted
            )
    })
}

async fn ask(
    args: &CommonArgs,
    mode: ModeRequest,
    stop_copy_memory: MemoryPath,
) -> Result<Option<MigrationRequest>> {
    let theme = ColorfulTheme::default();
    let Some(container) = pick_container(args, &theme).await? else {
        return Ok(None);
    };
    let Some(destination) = pick_destination(args, &theme)? else {
        return Ok(None);
    };
    let mut request = args.request(&container, &destination)?;
    request.mode = mode;
    request.stop_copy_memory = stop_copy_memory;
    let survey = check::survey(args, &request).await?;
    output::print_survey(&survey, false)?;
    if check::has_problems(&survey) {
        bail!("the preflight found problems (above); nothing was changed");
    }
    let choice = mode::choose(
        mode,
        survey.memory_bytes,
        phases::post_copy_problem(&survey).as_deref(),
        stop_copy_memory,
    )?;
    let go = Confirm::with_theme(&theme)
        .with_prompt(format!(
            "Migrate {container} to {destination}, {} ({})? {}",
            choice.mode.label(),
            choice.reason,
            match (choice.mode, choice.memory) {
                (Mode::StopCopy, MemoryPath::PageServer) =>
                    "It is frozen from the checkpoint until it runs there; its memory streams there meanwhile",
                (Mode::StopCopy, MemoryPath::Archive) =>
                    "It is frozen from the checkpoint until it runs there; its memory goes in the archive",
                (Mode::PostCopy, _) =>
                    "It is frozen briefly; until its memory has moved it needs both hosts",
            }
        ))
        .default(false)
        .interact()
        .context("reading the confirmation")?;
    Ok(go.then_some(request))
}

async fn pick_container(args: &CommonArgs, theme: &ColorfulTheme) -> Result<Option<String>> {
    let podman = args.podman();
    let containers = podman.list_running().await?;
    if containers.is_empty() {
        bail!("no running containers on this host");
    }
    let mut rows = Vec::new();
    for c in &containers {
        let memory = podman
            .memory_usage(&c.id)
            .await?
            .map_or("?".to_string(), |m| HumanBytes(m).to_string());
        rows.push(vec![
            c.name.clone(),
            c.image_name.clone(),
            c.ipv4().map_or("-".to_string(), |ip| ip.to_string()),
            output::ports(c),
            memory,
        ]);
    }
    let header = ["NAME", "IMAGE", "IP", "PORTS", "MEMORY"]
        .map(String::from)
        .to_vec();
    let lines = aligned(&header, &rows);
    let choice = FuzzySelect::with_theme(theme)
        .with_prompt(format!(
            "Container to migrate (arrows or type to filter, Enter; Esc quits)\n    {}",
            lines[0]
        ))
        .items(&lines[1..])
        .default(0)
        .interact_opt()
        .context("reading the container choice")?;
    Ok(choice.map(|i| containers[i].name.clone()))
}

fn pick_destination(args: &CommonArgs, theme: &ColorfulTheme) -> Result<Option<String>> {
    let used = history::destinations(&args.paths.state_dir);
    if !used.is_empty() {
        let mut items = used.clone();
        items.push("another host ...".to_string());
        let Some(i) = FuzzySelect::with_theme(theme)
            .with_prompt("Destination (used before; arrows or type to filter)")
            .items(&items)
            .default(0)
            .interact_opt()
            .context("reading the destination choice")?
        else {
            return Ok(None);
        };
        if i < used.len() {
            return Ok(Some(used[i].clone()));
        }
    }
    let dest: String = Input::with_theme(theme)
        .with_prompt("Destination agent (HOST[:PORT])")
        .validate_with(|s: &String| -> Result<(), String> {
            crate::destination_arg(s.trim()).map(drop)
        })
        .interact_text()
        .context("reading the destination")?;
    Ok(Some(dest.trim().to_string()))
}

/// Rows as lines with aligned columns (the header first).
fn aligned(header: &[String], rows: &[Vec<String>]) -> Vec<String> {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            std::iter::once(header)
                .chain(rows.iter().map(Vec::as_slice))
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    std::iter::once(header)
        .chain(rows.iter().map(Vec::as_slice))
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect()
}
