//! `agent-server`: the daemon on every host that can receive a migrating container.

mod session;
mod sweeper;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use common::auth::Token;
use common::config::HostPaths;
use common::incoming;
use common::podman::PodmanClient;
use common::wireguard::KeyPair;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Receives containers migrated by `agent-client` from other hosts: authenticates the peer,
/// sets up a WireGuard tunnel to it, loads images, stores and verifies checkpoint archives,
/// installs the conntrack entries that keep the container's flows alive, and restores the
/// container through podman.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address and port to accept migrations on.
    #[arg(long, env = "LM_LISTEN", default_value = "0.0.0.0:7878")]
    listen: SocketAddr,
    #[command(flatten)]
    paths: HostPaths,
    /// How often to check whether forwarding kept for containers that left is still needed.
    #[arg(long, env = "LM_SWEEP_SECONDS", default_value_t = 5)]
    sweep_seconds: u64,
}

/// What every session shares.
pub struct ServerContext {
    pub token: Token,
    /// This agent's WireGuard key pair.
    pub keys: KeyPair,
    pub podman: PodmanClient,
    pub incoming_dir: PathBuf,
    /// One journal file per open session, for recovery after a crash.
    pub journal_dir: PathBuf,
    /// Also holds the forward records of containers that left this host.
    pub state_dir: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let token = Token::from_file(&args.paths.token_file)?;
    let _running = incoming::lock_server(&args.paths.state_dir)?;
    let incoming_dir = incoming::archive_dir(&args.paths.state_dir);
    // Archives of sessions that died with a previous run are of no use to anyone.
    let _ = std::fs::remove_dir_all(&incoming_dir);
    std::fs::create_dir_all(&incoming_dir)
        .with_context(|| format!("create {}", incoming_dir.display()))?;
    let keys = KeyPair::load_or_create(&args.paths.state_dir)?;
    let podman = PodmanClient::new(&args.paths.podman_socket);
    let journal_dir = incoming::journal_dir(&args.paths.state_dir);
    incoming::recover(&journal_dir, &podman).await?;
    let context = Arc::new(ServerContext {
        token,
        keys,
        podman,
        incoming_dir,
        journal_dir,
        state_dir: args.paths.state_dir.clone(),
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, podman = %args.paths.podman_socket.display(), "agent-server ready");
    tokio::spawn(sweeper::run(
        context.clone(),
        std::time::Duration::from_secs(args.sweep_seconds.max(1)),
    ));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                continue;
            }
        };
        let context = context.clone();
        tokio::spawn(async move {
            if let Err(e) = session::serve(stream, peer, context).await {
                tracing::warn!(%peer, "session ended with an error: {e:#}");
            }
        });
    }
}
