//! The control protocol between a source agent (`agent-client`) and a destination agent
//! (`agent-server`). Everything that crosses the wire is defined in this file.
//!
//! # Framing
//! A connection carries frames: `u32` big-endian length `L`, then `L` bytes of which the
//! first is the frame kind and the rest the payload. `L` never exceeds [`MAX_FRAME_LEN`];
//! a larger announced length is an error and the connection is closed before reading it.
//!
//! | kind | payload                                            |
//! |------|----------------------------------------------------|
//! | 0    | one JSON-encoded [`ClientMessage`] or [`ServerMessage`] |
//! | 1    | raw bytes of a stream (image or checkpoint archive), or a Noise handshake message |
//!
//! After the handshake the frames are no longer written as they are: the byte stream they
//! make is cut into records of a `u16` big-endian length and one Noise transport message
//! (AES-256-GCM) of up to 65519 bytes of it. A record that fails authentication closes the
//! connection.
//!
//! # Session
//! 1. Handshake ([`crate::session::auth`]): `Hello` -> `Challenge` -> `Prove` -> `Welcome`. Both sides
//!    prove they hold the pre-shared token with HMAC-SHA256 over fresh nonces; the token
//!    never crosses the wire. The version is checked in the first two messages. Before
//!    `Welcome` the server acts on nothing. Then one data frame each way (client first)
//!    carries the Noise handshake ([`crate::session::auth::NOISE_PARAMS`]: ephemeral X25519, the
//!    token-derived pre-shared key); everything after it is sealed. The checkpoint holds
//!    the container's memory and is never sent in the clear.
//! 2. Requests, each answered by exactly one response:
//!    - `OpenTunnel` -> `TunnelReady` (WireGuard keys exchanged; both ends bring the
//!      tunnel up, see [`crate::kernel::overlay`]). The source proves the tunnel works with a
//!      second session through it, then goes on with this one;
//!    - `Preflight` -> `Preflight` (what the destination has and can do);
//!    - `PutImage` + data frames + `EndOfStream` -> `ImageLoaded`;
//!    - `BeginMigration` -> `MigrationBegun`, before the source freezes the container:
//!      starts the migration `migration_id` (32 hex digits, fresh per migration) of the
//!      declared container on this connection, and, for a container with an address,
//!      arms the hold of the packets that reach the destination for it other than
//!      through the source's tunnel ([`crate::kernel::hold`]), so that its nftables
//!      commit is not in the freeze; they go on as routed until `PrepareTraffic` holds
//!      them. Refused if the container, or a migration of it, is here already;
//!    - `PutCheckpoint` + data frames + `EndOfStream` -> `CheckpointStored`: the archive
//!      of the migration begun on this connection, once (its ID and container must be
//!      the begun ones);
//!    - `PrepareTraffic` -> `TrafficPrepared`, before the restore, before or after the
//!      archive (the source sends it while podman checkpoints the frozen container): the
//!      container's flows get conntrack entries marked for the tunnel, so its replies go
//!      back through it, and the destination blackholes the container's address and holds
//!      its packets. Sent in batches of at most [`MAX_FLOWS_PER_BATCH`]; each flow must
//!      have the container's own address on one end;
//!    - `Restore` -> `Restored`: restores the archive of this connection's migration, and
//!      only the container declared with it. The destination records that it owns the
//!      container before it answers (the decision point, [`crate::migration::ownership`]).
//!      A [`LazyRestore`] with `until_resumed` instead leaves a stopped copy that it does
//!      not own yet (a replica): its memory fills in from the source's page server;
//!    - `TrafficSwitched` -> `HoldReleased`, after `Restored`, on the session the source
//!      keeps through the tunnel (so that it arrives behind the packets it names): the
//!      source has routed the container's address into the tunnel and let through the
//!      packets it held (its hold's rule may still be going: what meets it meanwhile
//!      follows in order). Packets the destination held meanwhile (those that reach it
//!      directly, not through the source's tunnel) are newer: only now are they let
//!      through, so that the container gets them after the source's, in order
//!      ([`crate::kernel::hold`]). They are let through too if the migration's connection closes
//!      first;
//!    - `AwaitPages` -> `PagesArrived`, after `Restored` of a migration whose `Restore`
//!      named the source's page server ([`LazyRestore`]): answered once every page of the
//!      container's memory is on the destination, or with `Error`
//!      [`ErrorCode::PostCopyFailed`] when the transfer failed, the container then
//!      stopped ([`crate::engine::lazy_pages`]);
//!    - `Resume` -> `Resumed`, on any connection, for a replica whose memory is all here:
//!      the source's processes are gone (CRIU ended them once their last page left). The
//!      destination records that it owns the container, then lets it run. Asked again of
//!      a migration it owns, it answers the same. A replica that is gone (its transfer
//!      failed, or it was fenced) is refused with [`ErrorCode::ReplicaGone`];
//!    - `Finish` -> `Finished` (the source is gone; forget the session);
//!    - `Resolve` -> `Resolved`, on any connection: who owns the container of migration
//!      `migration_id`. Unless the destination owns it, it is fenced first: any copy (a
//!      replica too) is removed and none will be started. Waits for a request of that migration still
//!      being handled (a restore) to end;
//!    - `Settle` -> `Settled`, on any connection: the source has removed its copy of a
//!      migration the destination owns; the destination forgets the migration;
//!    - `QueryContainer` -> `ContainerStatus`: does the container live here or downstream
//!      (a former host asks, to know whether its forwarding is still needed).
//!
//!    Any request may instead be answered by `Error`, with an [`ErrorCode`].
//! 3. A connection that closes (or goes silent: both ends use TCP keepalive and a user
//!    timeout) without `Finish` ends a migration the destination does not own yet: it drops
//!    the archive, any copy and the flows' entries, and lets the packets it held go on
//!    through routing. One it owns stays, and is kept until the
//!    source `Resolve`s and `Settle`s it. There is no abort request: a source that gives up
//!    closes the connection, or asks `Resolve`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::bail;
use serde::{Deserialize, Serialize};

/// Bumped on every incompatible change of the messages below.
pub const PROTOCOL_VERSION: u32 = 11;

/// Default TCP port of `agent-server`.
pub const DEFAULT_PORT: u16 = 7878;

/// Largest frame (kind byte + payload) either side accepts.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Size of the data frames a sender cuts a stream into.
pub const DATA_CHUNK_LEN: usize = 256 * 1024;

/// Most flows in one `PrepareTraffic` request: a batch stays well inside a frame.
pub const MAX_FLOWS_PER_BATCH: usize = 2000;

/// Kind byte of a frame holding a JSON message.
pub const FRAME_MESSAGE: u8 = 0;
/// Kind byte of a frame holding raw stream bytes.
pub const FRAME_DATA: u8 = 1;

/// What the source agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Hello {
        version: u32,
        /// Hex-encoded random nonce.
        client_nonce: String,
    },
    Prove {
        /// Hex HMAC proving the client holds the token.
        client_proof: String,
    },
    OpenTunnel {
        /// The source agent's WireGuard public key (base64).
        public_key: String,
    },
    /// What the destination has and can do for this container (nothing is changed).
    Preflight {
        container: ContainerRef,
    },
    PutImage {
        image_id: String,
    },
    BeginMigration {
        migration_id: String,
        container: ContainerRef,
        /// The source agent's WireGuard public key: names the tunnel whose packets are
        /// not held.
        source_public_key: String,
    },
    PutCheckpoint {
        migration_id: String,
        container: ContainerRef,
    },
    /// Ends the data frames of a `Put*` request.
    EndOfStream {
        bytes: u64,
        /// Hex SHA-256 of all data bytes.
        sha256: String,
    },
    PrepareTraffic {
        /// The source agent's WireGuard public key: names the tunnel the flows come through.
        source_public_key: String,
        container_ip: Ipv4Addr,
        /// The container's flows as the destination will see them (no NAT).
        flows: Vec<Flow>,
    },
    Restore {
        container: ContainerRef,
        /// The memory is not in the archive: it comes from this page server.
        lazy: Option<LazyRestore>,
    },
    AwaitPages {
        migration_id: String,
    },
    Resume {
        migration_id: String,
    },
    TrafficSwitched {
        migration_id: String,
    },
    Finish,
    Resolve {
        migration_id: String,
    },
    Settle {
        migration_id: String,
    },
    QueryContainer {
        id: String,
    },
}

/// What the destination's restore took, in microseconds: podman's call, of which runc's
/// restore, of which CRIU's (the last two as podman reports them, if it does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreTimes {
    pub podman_us: u64,
    pub runtime_us: Option<u64>,
    pub criu_us: Option<u64>,
}

/// What the destination agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Challenge {
        version: u32,
        server_nonce: String,
        /// Hex HMAC proving the server holds the token.
        server_proof: String,
    },
    Welcome,
    TunnelReady {
        /// The destination agent's WireGuard public key (base64).
        public_key: String,
        /// UDP port its end of the tunnel listens on.
        listen_port: u16,
    },
    Preflight(Box<HostReport>),
    ImageLoaded,
    MigrationBegun,
    CheckpointStored {
        bytes: u64,
    },
    TrafficPrepared {
        flows: usize,
    },
    Restored {
        times: RestoreTimes,
    },
    HoldReleased {
        /// What the destination's hold did (`None`: it held nothing).
        held: Option<HoldReport>,
    },
    PagesArrived {
        /// From the restore's answer to the last page (ms).
        after_restore_ms: u64,
        /// Pages (4 KiB) fetched from the source.
        pages: u64,
    },
    /// The stopped copy of a streamed stop-copy migration runs, and the destination owns it.
    Resumed,
    Finished,
    Resolved {
        verdict: Verdict,
    },
    Settled,
    ContainerStatus {
        /// Runs on this host, or on a host this one forwards it to.
        alive: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Why a request was refused. Code may act on it; none matches on the message, which is
/// for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A field failed validation (an ID, a name, an address, a flow).
    #[error("invalid request")]
    Invalid,
    /// The request does not fit the session's state (no archive yet, fenced, ...).
    #[error("request out of order")]
    State,
    /// This container is already migrating to or from this host.
    #[error("busy")]
    Busy,
    /// The host could not do it (podman, CRIU, netlink, the file system).
    #[error("host failure")]
    Host,
    /// The frame or message could not be read.
    #[error("protocol error")]
    Protocol,
    /// The peer does not hold the same token.
    #[error("authentication failed")]
    Unauthenticated,
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch")]
    Version,
    /// The pages of a post-copy migration stopped arriving: the container was stopped.
    #[error("post-copy failed")]
    PostCopyFailed,
    /// No replica of this migration is here to resume: it was fenced, or its memory could
    /// not all arrive and it was stopped.
    #[error("no replica to resume")]
    ReplicaGone,
}

/// A restore whose memory comes from the source's page server. It listens on the
/// source's address of this session (the destination takes the address from the
/// connection; only the port is sent), and the pages travel under TLS with `credentials`
/// ([`crate::engine::lazy_pages`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyRestore {
    pub page_server_port: u16,
    /// Streamed stop-copy: the restored processes stay stopped, and the destination does
    /// not own them, until every page is here and the source says `Resume`. Otherwise
    /// (post-copy) they run at once, and fault their pages in.
    pub until_resumed: bool,
    pub credentials: PageCredentials,
}

/// The certificate (PEM) and its private key (PEM, PKCS#8) that both ends of one
/// migration's page connection present and trust. Made by the source for this migration
/// only; secret, like the session keys that carry it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCredentials {
    pub certificate: String,
    pub key: String,
}

/// Never prints the key.
impl std::fmt::Debug for PageCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCredentials")
            .field(
                "certificate",
                &format_args!("{} bytes", self.certificate.len()),
            )
            .field("key", &format_args!("{} bytes", self.key.len()))
            .finish()
    }
}

/// Identifies the container being migrated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    pub id: String,
    pub name: String,
    pub image_id: String,
    pub image_name: String,
    /// Its IPv4 address on the source, which it keeps on the destination.
    pub address: Option<Ipv4Addr>,
    /// Host ports it publishes on the source, which it publishes on the destination too.
    pub published_ports: Vec<PublishedPort>,
}

/// A host port a container publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Proto,
}

// ------------------------------------------------------------------------------ flows
//
// The conntrack entries of a container's flows, as `PrepareTraffic` carries them to the
// destination; `conntrack` reads and writes them in the kernel.

/// `TCP_CONNTRACK_ESTABLISHED` (include/uapi/linux/netfilter/nf_conntrack_tcp.h).
pub const TCP_STATE_ESTABLISHED: u8 = 3;
/// Names of the TCP conntrack states, indexed by `TCP_CONNTRACK_*`.
const TCP_STATE_NAMES: [&str; 10] = [
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
];

/// Transport protocol of a tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    /// Lower-case name, as nft and conntrack(8) spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Proto {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => bail!("unsupported protocol {other:?} (tcp or udp)"),
        }
    }
}

/// One direction of a flow: the addresses and ports as seen in packets of that direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl Tuple {
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Self {
        Tuple { src, dst }
    }

    /// The same tuple seen from the other end.
    pub fn reversed(self) -> Self {
        Tuple {
            src: self.dst,
            dst: self.src,
        }
    }
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)
    }
}

/// A conntrack entry (only what a migration needs to recreate it elsewhere).
///
/// Addresses are IPv4 in everything [`crate::kernel::conntrack::list`] returns;
/// [`crate::kernel::conntrack::create`] and [`crate::kernel::conntrack::delete`] also accept
/// IPv6 tuples (both ends of both tuples must be of the same family).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flow {
    pub proto: Proto,
    /// Direction of the packet that created the entry.
    pub orig: Tuple,
    /// Direction of the answers; differs from `orig.reversed()` when NAT applies.
    pub reply: Tuple,
    /// ct mark (0 = none).
    pub mark: u32,
    /// `TCP_CONNTRACK_*` state of a TCP entry (3 = ESTABLISHED); `None` for UDP.
    pub tcp_state: Option<u8>,
    /// Seconds left before the entry expires (as dumped); `None` = use the default on create.
    pub timeout: Option<u32>,
}

impl Flow {
    /// A flow without NAT: the reply tuple is the mirror of `orig`.
    pub fn new(proto: Proto, src: SocketAddr, dst: SocketAddr) -> Self {
        let orig = Tuple::new(src, dst);
        Flow {
            proto,
            orig,
            reply: orig.reversed(),
            mark: 0,
            tcp_state: match proto {
                Proto::Tcp => Some(TCP_STATE_ESTABLISHED),
                Proto::Udp => None,
            },
            timeout: None,
        }
    }

    /// An ESTABLISHED TCP flow `src -> dst` without NAT.
    pub fn tcp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self::new(Proto::Tcp, src, dst)
    }

    /// A UDP flow `src -> dst` without NAT.
    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        Self::new(Proto::Udp, src, dst)
    }

    /// The same flow with ct mark `mark`.
    pub fn with_mark(mut self, mark: u32) -> Self {
        self.mark = mark;
        self
    }

    /// Whether source or destination NAT applies (reply is not the mirror of orig).
    pub fn is_nat(&self) -> bool {
        self.reply != self.orig.reversed()
    }

    /// The flow as the endpoint behind the NAT sees it: for a DNATed flow (client ->
    /// host port => container) this is client -> container; for a masqueraded flow
    /// (container -> server, SNAT to the host) it is container -> server. Keeps proto,
    /// mark, TCP state and timeout. This is the entry a destination host needs for a
    /// migrated container, whose packets reach it un-translated.
    pub fn without_nat(&self) -> Self {
        let orig = Tuple::new(self.orig.src, self.reply.src);
        Flow {
            orig,
            reply: orig.reversed(),
            ..self.clone()
        }
    }

    /// The direction of the flow whose packets are addressed to `ip`, if any.
    pub fn towards(&self, ip: IpAddr) -> Option<Tuple> {
        [self.orig, self.reply]
            .into_iter()
            .find(|t| t.dst.ip() == ip)
    }

    /// Whether `ip` is an endpoint of the flow on the original source or the reply
    /// source side (see [`crate::kernel::conntrack::involving`]).
    pub fn involves(&self, ip: IpAddr) -> bool {
        self.orig.src.ip() == ip || self.reply.src.ip() == ip
    }

    /// Name of the TCP state (`ESTABLISHED`...), if any.
    pub fn tcp_state_name(&self) -> Option<&'static str> {
        self.tcp_state
            .and_then(|s| TCP_STATE_NAMES.get(usize::from(s)).copied())
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.proto, self.orig)?;
        if self.is_nat() {
            write!(f, " (reply {})", self.reply)?;
        }
        if let Some(state) = self.tcp_state_name() {
            write!(f, " {state}")?;
        }
        if self.mark != 0 {
            write!(f, " mark={:#x}", self.mark)?;
        }
        Ok(())
    }
}

/// What a host has and can do, for the preflight check of both ends
/// ([`crate::migration::preflight`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    pub hostname: String,
    pub podman_version: String,
    pub criu: CriuVersion,
    /// What `criu check` objected to; `None` when it found the host fit.
    pub criu_check_problem: Option<String>,
    /// Optional CRIU features and whether this kernel has them.
    pub criu_features: Vec<(String, bool)>,
    /// Why this host cannot take part in a post-copy migration; `None`: it can.
    pub post_copy_problem: Option<String>,
    pub oci_runtime: String,
    /// Free bytes where this agent keeps checkpoint archives.
    pub free_state_bytes: u64,
    /// Memory available for new work (`MemAvailable`): `drain` sends each container to
    /// the destination with the most.
    #[serde(default)]
    pub memory_available_bytes: u64,
    /// Whether the image of the container is already present.
    pub has_image: bool,
    /// Name or ID of an existing container that would collide with the incoming one.
    pub conflicting_container: Option<String>,
    /// A container here that already uses the incoming container's address.
    pub address_in_use_by: Option<String>,
    /// Published host ports of the incoming container that a container here already
    /// publishes.
    pub ports_in_use: Vec<PortInUse>,
}

/// CRIU on a host: its version, or why it could not be run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CriuVersion {
    Installed(String),
    Missing(String),
}

impl std::fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CriuVersion::Installed(version) => f.write_str(version),
            CriuVersion::Missing(reason) => write!(f, "missing: {reason}"),
        }
    }
}

/// A host port that a container already publishes here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInUse {
    pub protocol: Proto,
    pub host_port: u16,
    /// The container that publishes it.
    pub container: String,
}

impl std::fmt::Display for PortInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} ({})",
            self.protocol, self.host_port, self.container
        )
    }
}

/// What a hold did, for the migration report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReport {
    /// Packets held and then let through.
    pub held: u64,
    /// Packets the kernel dropped because the queue was full.
    pub dropped: u64,
    /// The queue's bound, packets.
    pub bound: u32,
}

/// The destination's answer about a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// It has durably recorded that it runs the container.
    DestinationOwns,
    /// It holds no copy and will start none for this migration.
    Fenced,
}

/// Every page of a post-copy restore is on the destination: the answer `PagesArrived`,
/// decoded (its time as a `Duration`); not itself on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagesArrived {
    /// How long after the restore the last one came.
    pub after_restore: std::time::Duration,
    /// How many (4 KiB) were fetched from the source.
    pub pages: u64,
}

#[cfg(test)]
mod tests;
