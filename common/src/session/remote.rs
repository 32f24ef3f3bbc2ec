//! The source agent's handle on a destination agent: one authenticated connection and a
//! typed method per request of [`crate::protocol`].

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::net::TcpStream;

use crate::protocol::{
    ClientMessage, ContainerRef, ErrorCode, HoldReport, HostReport, LazyRestore, RestoreTimes,
    ServerMessage, Verdict, DEFAULT_PORT,
};
use crate::session::auth::{authenticate_to_server, Token};
use crate::session::transfer::{send_file, send_stream};
use crate::session::wire::FramedStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Replies that involve podman on the far side (load, restore) may take a while.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// A request the destination agent refused, with its code (for callers and logs; nothing
/// matches on the message).
#[derive(Debug, thiserror::Error)]
#[error("destination agent {agent}: {message}")]
pub struct RemoteError {
    pub agent: String,
    pub code: ErrorCode,
    pub message: String,
}

/// The reply if it matches `pattern` (and its guard), as `value`; otherwise an error
/// naming the request it answers. Refusals (`Error`) are errors already ([`RemoteAgent::reply`]).
macro_rules! expect_reply {
    ($reply:expr, $request:literal, $pattern:pat $(if $guard:expr)? => $value:expr) => {
        match $reply {
            $pattern $(if $guard)? => Ok($value),
            other => Err(anyhow!(concat!("unexpected reply to ", $request, ": {:?}"), other)),
        }
    };
}

pub struct RemoteAgent {
    stream: FramedStream<TcpStream>,
    address: String,
}

/// The socket address of the agent at `destination`, `HOST[:PORT]` (an IPv6 address in
/// brackets where a port follows), with the default port where none is given; or why it
/// is not one.
pub fn agent_address(destination: &str) -> Result<String, String> {
    let (host, port) = match destination.rsplit_once(':') {
        // A bare IPv6 address has colons but no port unless bracketed.
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => (host, Some(port)),
        _ => (destination, None),
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{destination:?} is not HOST[:PORT]"));
    }
    match port {
        None if host.contains(':') && !host.starts_with('[') => {
            Ok(format!("[{host}]:{DEFAULT_PORT}"))
        }
        None => Ok(format!("{host}:{DEFAULT_PORT}")),
        Some(port) => match port.parse::<u64>() {
            Ok(1..=65535) => Ok(destination.to_string()),
            Ok(n) => Err(format!("port {n} is out of range (1-65535)")),
            Err(_) => Err(format!("port {port:?} is not a number")),
        },
    }
}

impl RemoteAgent {
    /// Connects to `destination` (`HOST[:PORT]`) and authenticates both ways.
    pub async fn connect(destination: &str, token: &Token) -> Result<Self> {
        let address = agent_address(destination).map_err(|e| anyhow!("destination {e}"))?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&address))
            .await
            .map_err(|_| {
                anyhow!("destination agent {address} did not answer within {CONNECT_TIMEOUT:?}")
            })?
            .with_context(|| format!("cannot reach destination agent {address}"))?;
        crate::session::wire::tune_connection(&tcp)?;
        let mut stream = FramedStream::new(tcp);
        tokio::time::timeout(CONNECT_TIMEOUT, authenticate_to_server(&mut stream, token))
            .await
            .map_err(|_| anyhow!("destination agent {address} did not complete the handshake"))?
            .with_context(|| format!("handshake with {address}"))?;
        Ok(Self { stream, address })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    async fn request(&mut self, message: &ClientMessage) -> Result<ServerMessage> {
        self.stream.send(message).await?;
        self.reply().await
    }

    async fn reply(&mut self) -> Result<ServerMessage> {
        self.reply_within(REPLY_TIMEOUT).await
    }

    async fn reply_within(&mut self, patience: Duration) -> Result<ServerMessage> {
        let reply = tokio::time::timeout(patience, self.stream.recv::<ServerMessage>())
            .await
            .map_err(|_| anyhow!("destination agent {} stopped answering", self.address))?
            .with_context(|| format!("destination agent {}", self.address))?;
        match reply {
            ServerMessage::Error { code, message } => Err(RemoteError {
                agent: self.address.clone(),
                code,
                message,
            }
            .into()),
            other => Ok(other),
        }
    }

    /// Exchanges WireGuard public keys; returns the destination's key and listen port.
    pub async fn open_tunnel(&mut self, public_key: &str) -> Result<(String, u16)> {
        let reply = self
            .request(&ClientMessage::OpenTunnel {
                public_key: public_key.to_string(),
            })
            .await?;
        expect_reply!(
            reply,
            "open tunnel",
            ServerMessage::TunnelReady { public_key, listen_port } => (public_key, listen_port)
        )
    }

    /// The destination's address as connected to.
    pub fn peer_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.stream.get_ref().peer_addr()?)
    }

    pub fn local_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.stream.get_ref().local_addr()?)
    }

    pub async fn prepare_traffic(
        &mut self,
        source_public_key: &str,
        container_ip: std::net::Ipv4Addr,
        flows: Vec<crate::protocol::Flow>,
    ) -> Result<usize> {
        let reply = self
            .request(&ClientMessage::PrepareTraffic {
                source_public_key: source_public_key.to_string(),
                container_ip,
                flows,
            })
            .await?;
        expect_reply!(
            reply,
            "prepare traffic",
            ServerMessage::TrafficPrepared { flows } => flows
        )
    }

    pub async fn preflight(&mut self, container: &ContainerRef) -> Result<HostReport> {
        let reply = self
            .request(&ClientMessage::Preflight {
                container: container.clone(),
            })
            .await?;
        expect_reply!(
            reply,
            "preflight",
            ServerMessage::Preflight(report) => *report
        )
    }

    pub async fn put_image(&mut self, image_id: &str, archive: &[u8]) -> Result<()> {
        self.stream
            .send(&ClientMessage::PutImage {
                image_id: image_id.to_string(),
            })
            .await?;
        send_stream(&mut self.stream, archive, |_| {}).await?;
        expect_reply!(
            self.reply().await?,
            "image upload",
            ServerMessage::ImageLoaded => ()
        )
    }

    /// Starts migration `migration_id` of `container` on this connection; the destination
    /// holds the packets that reach it for the container from now on.
    pub async fn begin_migration(
        &mut self,
        migration_id: &str,
        container: &ContainerRef,
        source_public_key: &str,
    ) -> Result<()> {
        let reply = self
            .request(&ClientMessage::BeginMigration {
                migration_id: migration_id.to_string(),
                container: container.clone(),
                source_public_key: source_public_key.to_string(),
            })
            .await?;
        expect_reply!(reply, "begin migration", ServerMessage::MigrationBegun => ())
    }

    /// Sends the checkpoint archive of the migration begun on this connection; `progress`
    /// gets the bytes sent so far.
    pub async fn put_checkpoint(
        &mut self,
        migration_id: &str,
        container: &ContainerRef,
        archive: &Path,
        progress: impl FnMut(u64),
    ) -> Result<u64> {
        self.stream
            .send(&ClientMessage::PutCheckpoint {
                migration_id: migration_id.to_string(),
                container: container.clone(),
            })
            .await?;
        let sent = send_file(&mut self.stream, archive, progress)
            .await
            .with_context(|| format!("sending the checkpoint to {}", self.address))?;
        expect_reply!(
            self.reply().await?,
            "checkpoint upload",
            ServerMessage::CheckpointStored { bytes } if bytes == sent => sent
        )
    }

    /// Restores the uploaded checkpoint; returns podman's restore time in milliseconds.
    /// `sent` runs once the request is on its way, before the answer.
    pub async fn restore(
        &mut self,
        container: &ContainerRef,
        lazy: Option<LazyRestore>,
        sent: impl FnOnce(),
    ) -> Result<RestoreTimes> {
        self.stream
            .send(&ClientMessage::Restore {
                container: container.clone(),
                lazy,
            })
            .await?;
        sent();
        expect_reply!(
            self.reply().await?,
            "restore",
            ServerMessage::Restored { times } => times
        )
    }

    /// Who owns the container of migration `migration_id`; unless the destination does,
    /// it is fenced there first (no copy, none to come).
    pub async fn resolve(&mut self, migration_id: &str) -> Result<Verdict> {
        let reply = self
            .request(&ClientMessage::Resolve {
                migration_id: migration_id.to_string(),
            })
            .await?;
        expect_reply!(
            reply,
            "resolve",
            ServerMessage::Resolved { verdict } => verdict
        )
    }

    /// Lets the destination's replica of a streamed stop-copy migration run: the source's
    /// processes are gone. From the answer on, the destination owns the container.
    pub async fn resume(&mut self, migration_id: &str) -> Result<()> {
        let reply = self
            .request(&ClientMessage::Resume {
                migration_id: migration_id.to_string(),
            })
            .await?;
        expect_reply!(
            reply,
            "resume",
            ServerMessage::Resumed => ()
        )
    }

    /// Tells the destination that the source copy of a migration it owns is gone.
    pub async fn settle(&mut self, migration_id: &str) -> Result<()> {
        let reply = self
            .request(&ClientMessage::Settle {
                migration_id: migration_id.to_string(),
            })
            .await?;
        expect_reply!(
            reply,
            "settle",
            ServerMessage::Settled => ()
        )
    }

    /// Whether the container lives at this agent's host or downstream of it.
    pub async fn query_container(&mut self, id: &str) -> Result<bool> {
        let reply = self
            .request(&ClientMessage::QueryContainer { id: id.to_string() })
            .await?;
        expect_reply!(
            reply,
            "query",
            ServerMessage::ContainerStatus { alive } => alive
        )
    }

    /// Tells the destination that the source's held packets are through; returns what the
    /// destination's own hold did.
    pub async fn traffic_switched(&mut self, migration_id: &str) -> Result<Option<HoldReport>> {
        let told = ClientMessage::TrafficSwitched {
            migration_id: migration_id.to_string(),
        };
        expect_reply!(
            self.request(&told).await?,
            "traffic switched",
            ServerMessage::HoldReleased { held } => held
        )
    }

    /// Waits until every page of a post-copy migration is on the destination. A cut link
    /// fails this within the connection's dead-peer timeout, whatever the patience.
    pub async fn await_pages(
        &mut self,
        migration_id: &str,
        patience: Duration,
    ) -> Result<crate::protocol::PagesArrived> {
        self.stream
            .send(&ClientMessage::AwaitPages {
                migration_id: migration_id.to_string(),
            })
            .await?;
        expect_reply!(
            self.reply_within(patience).await?,
            "await pages",
            ServerMessage::PagesArrived { after_restore_ms, pages } => {
                crate::protocol::PagesArrived {
                    after_restore: Duration::from_millis(after_restore_ms),
                    pages,
                }
            }
        )
    }

    pub async fn finish(&mut self) -> Result<()> {
        expect_reply!(
            self.request(&ClientMessage::Finish).await?,
            "finish",
            ServerMessage::Finished => ()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::agent_address;

    #[test]
    fn default_port_is_added_only_when_missing() {
        let ok = |d| agent_address(d).unwrap();
        assert_eq!(ok("h2"), "h2:7878");
        assert_eq!(ok("h2:9000"), "h2:9000");
        assert_eq!(ok("10.0.0.2"), "10.0.0.2:7878");
        assert_eq!(ok("[fd00::2]:9000"), "[fd00::2]:9000");
        assert_eq!(ok("[fd00::2]"), "[fd00::2]:7878");
        assert_eq!(ok("fd00::2"), "[fd00::2]:7878");
    }

    #[test]
    fn a_bad_port_or_host_is_named() {
        let err = |d| agent_address(d).unwrap_err();
        assert_eq!(err("h2:99999"), "port 99999 is out of range (1-65535)");
        assert_eq!(err("h2:0"), "port 0 is out of range (1-65535)");
        assert_eq!(
            err("[fd00::2]:70000"),
            "port 70000 is out of range (1-65535)"
        );
        assert_eq!(err("h2:web"), "port \"web\" is not a number");
        assert_eq!(err(":7878"), "\":7878\" is not HOST[:PORT]");
    }
}
