//! `agent-client`: moves a running container from this host to another one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use common::auth::Token;
use common::migration::{migrate, MigrationReport, MigrationRequest, Progress};
use common::podman::{PodmanClient, DEFAULT_SOCKET};
use tracing_subscriber::EnvFilter;

/// Live-migrates a podman container from this host to the agent-server on another host.
/// The container is checkpointed with its established TCP connections, sent to the
/// destination, restored there, and removed here only once it runs there. If anything
/// fails, it runs here again.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Name or ID of the running container to migrate.
    #[arg(long)]
    container: String,
    /// Destination agent, `HOST[:PORT]` (default port 7878).
    #[arg(long)]
    dest: String,
    /// File holding the pre-shared token (the same on every host).
    #[arg(long, env = "LM_TOKEN_FILE", default_value = "/etc/live-migrate/token")]
    token_file: PathBuf,
    /// Socket of this host's podman service.
    #[arg(long, env = "LM_PODMAN_SOCKET", default_value = DEFAULT_SOCKET)]
    podman_socket: PathBuf,
    /// Directory for this agent's WireGuard key and the checkpoint archive.
    #[arg(long, env = "LM_STATE_DIR", default_value = "/var/lib/live-migrate")]
    state_dir: PathBuf,
    /// Do not forward new connections to the container's published ports on this host
    /// after it moved (flows that already exist are kept either way).
    #[arg(long)]
    no_forward_new: bool,
    /// Print the report as JSON on stdout (progress goes to stderr).
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<()> {
    let request = MigrationRequest {
        container: args.container.clone(),
        destination: args.dest.clone(),
        token: Token::from_file(&args.token_file)?,
        podman: PodmanClient::new(&args.podman_socket),
        state_dir: args.state_dir.clone(),
        forward_new_connections: !args.no_forward_new,
    };
    eprintln!("migrating {} to {}", args.container, args.dest);
    let report = migrate(request, &print_progress).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(())
}

fn print_progress(event: Progress) {
    match event {
        Progress::PhaseStarted(phase) => eprintln!("  {} ...", phase.label()),
        Progress::PhaseFinished(phase, took) => {
            eprintln!(
                "  {} done in {:.0} ms",
                phase.label(),
                took.as_secs_f64() * 1e3
            )
        }
        Progress::Transferred { .. } => {}
        Progress::RollingBack(step) => eprintln!("  rolling back: {step}"),
    }
}

fn print_summary(report: &MigrationReport) {
    println!(
        "migrated {} ({}) to {}",
        report.container,
        &report.container_id[..12.min(report.container_id.len())],
        report.destination
    );
    for t in &report.phases {
        println!("  {:<12} {:>8.0} ms", t.phase.label(), t.ms);
    }
    println!("  {:<12} {:>8.0} ms", "freeze", report.freeze_to_resume_ms);
    println!("  {:<12} {:>8.0} ms", "total", report.total_ms);
    println!("  checkpoint   {:>8} bytes", report.checkpoint_bytes);
    for w in &report.warnings {
        println!("warning: {w}");
    }
}
