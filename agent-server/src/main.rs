//! `agent-server`: the daemon on every host that can receive a migrating container.

mod adopter;
mod engine_info;
mod metrics;
mod server;
mod session;
mod sweeper;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use agent_config::HostPaths;
use anyhow::{Context, Result};
use clap::Parser;
use common::engine::podman::PodmanClient;
use common::kernel::wireguard::KeyPair;
use common::migration::destination::{self, Registry};
use common::session::auth::Token;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Receives containers migrated by `agent-client` from other hosts: authenticates the peer,
/// sets up a WireGuard tunnel to it, loads images, stores and verifies checkpoint archives,
/// installs the conntrack entries that keep the container's flows alive, and restores the
/// container through podman.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Option<ServerCommand>,
    /// Address and port to accept migrations on.
    #[arg(long, env = "LM_LISTEN", default_value = "0.0.0.0:7878")]
    listen: SocketAddr,
    #[command(flatten)]
    paths: HostPaths,
    /// How often to check whether forwarding kept for containers that left is still needed.
    #[arg(long, env = "LM_SWEEP_SECONDS", default_value_t = 5)]
    sweep_seconds: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given). Anyone who
    /// reaches ADDR can read them: container names, peers and counts, nothing secret.
    #[arg(long, env = "LM_METRICS", value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

#[derive(clap::Subcommand, Debug)]
enum ServerCommand {
    /// Writes a new random token to --token-file (mode 0600) and says how to copy it to
    /// the other hosts. A token already there stays, unless --force.
    Init {
        /// Replace a token that is there already (every host then needs the new one).
        #[arg(long)]
        force: bool,
    },
}

/// What every session shares.
pub struct ServerContext {
    pub token: Token,
    /// This agent's WireGuard key pair.
    pub keys: KeyPair,
    pub podman: PodmanClient,
    /// The incoming migrations, each journaled in the state directory.
    pub migrations: Registry,
    /// Also holds the forward records of containers that left this host.
    pub state_dir: PathBuf,
    /// What the sweeper and recovery did, for the metrics.
    pub actions: metrics::Actions,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        // Colours only for a terminal: not in a log file or a pipe.
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args: Args = agent_config::parse("server")?;
    if let Some(ServerCommand::Init { force }) = args.command {
        return init(&args.paths.token_file, force);
    }
    let token = Token::from_file(&args.paths.token_file)?;
    let _running = destination::lock_server(&args.paths.state_dir)?;
    // From here on SIGTERM and SIGINT shut down in order (a signal during the recovery
    // below waits for it).
    let (signals, shutdown) = tokio::sync::mpsc::channel(4);
    server::forward_signals(signals)?;
    let keys = KeyPair::load_or_create(&args.paths.state_dir)?;
    let podman = PodmanClient::new(&args.paths.podman_socket);
    // Before accepting anything: a source that asks must get the reconciled answer.
    let migrations = Registry::default();
    let actions = metrics::Actions::default();
    let recovered = destination::recover(&args.paths.state_dir, &podman, &migrations).await?;
    for line in &recovered {
        tracing::info!("{line}");
    }
    actions.recovered("restart", recovered.len());
    let context = Arc::new(ServerContext {
        token,
        keys,
        podman,
        migrations,
        state_dir: args.paths.state_dir.clone(),
        actions,
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    if let Some(addr) = args.metrics {
        tokio::spawn(metrics::serve(addr, context.clone())?);
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    tracing::info!(listen = %args.listen, podman = %args.paths.podman_socket.display(), "agent-server ready");
    server::run(
        listener,
        context,
        std::time::Duration::from_secs(args.sweep_seconds.max(1)),
        shutdown,
    )
    .await
}

/// `agent-server init`: a new token, and how to share it.
fn init(path: &std::path::Path, force: bool) -> Result<()> {
    Token::create_file(path, force)?;
    let path = path.display();
    println!("wrote a new token to {path} (mode 0600)");
    println!("every host that runs agent-server or agent-client needs the same one, with the same mode, e.g.:");
    println!("  scp -p {path} root@OTHER-HOST:{path}");
    Ok(())
}
