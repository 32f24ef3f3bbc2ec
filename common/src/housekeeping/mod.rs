//! What the agents keep on this host, for `agent-client status` ([`status`]), and its
//! removal once nothing needs it, for `agent-client cleanup` ([`clean_up`]).

mod cleanup;
mod status;
mod tunnels;

pub use cleanup::clean_up;
pub use status::{status, ForwardStatus, HostStatus, MigrationStatus, TunnelStatus, HISTORY_SHOWN};
