//! Where an agent finds its token, its podman service and its state: the same flags (and
//! environment variables) for `agent-client` and `agent-server`.

use std::path::PathBuf;

use crate::podman::DEFAULT_SOCKET;

#[derive(clap::Args, Debug, Clone)]
pub struct HostPaths {
    /// File holding the pre-shared token (the same on every host of the cluster).
    #[arg(
        long,
        global = true,
        env = "LM_TOKEN_FILE",
        default_value = "/etc/live-migrate/token"
    )]
    pub token_file: PathBuf,
    /// Socket of this host's podman service (`podman system service`).
    #[arg(long, global = true, env = "LM_PODMAN_SOCKET", default_value = DEFAULT_SOCKET)]
    pub podman_socket: PathBuf,
    /// The agent's state: its WireGuard key, checkpoint archives in flight, migration journals,
    /// forward records and the migration history.
    #[arg(
        long,
        global = true,
        env = "LM_STATE_DIR",
        default_value = "/var/lib/live-migrate"
    )]
    pub state_dir: PathBuf,
}
