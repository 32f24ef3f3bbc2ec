//! `agent-client`: moves a running container from this host to another one.

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use common::auth::Token;
use common::config::HostPaths;
use common::migration::{migrate, MigrationReport, MigrationRequest, Progress};
use common::podman::PodmanClient;
use tracing_subscriber::EnvFilter;

/// Live-migrates a podman container from this host to the agent-server on another host.
/// The container is checkpointed with its established TCP connections, sent through a
/// WireGuard tunnel to the destination, restored there, and removed here only once it runs
/// there; flows that still arrive here are forwarded to it through the tunnel. If anything
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
    #[command(flatten)]
    paths: HostPaths,
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
        token: Token::from_file(&args.paths.token_file)?,
        podman: PodmanClient::new(&args.paths.podman_socket),
        state_dir: args.paths.state_dir.clone(),
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
