//! What a peer may send a real agent-server. Authenticated but hostile: crafted protocol
//! messages, each refused with its error code and a message, nothing on the host changed.
//! Large: a container with 20,000 tracked flows.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use common::kernel::conntrack::Flow;
use common::protocol::{
    ClientMessage, ContainerRef, ErrorCode, LazyRestore, PageCredentials, ServerMessage,
    MAX_FLOWS_PER_BATCH,
};
use common::session::auth::{authenticate_to_server, Token};
use common::session::wire::FramedStream;
use lab::{wait_for, Lab};

type Stream = FramedStream<tokio::net::TcpStream>;

const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 88, 2, 250);

fn probe_container() -> ContainerRef {
    ContainerRef {
        id: "a".repeat(64),
        name: "probe".into(),
        image_id: "b".repeat(64),
        image_name: String::new(),
        address: Some(ADDRESS),
        published_ports: Vec::new(),
    }
}

fn flow_to(ip: Ipv4Addr, port: u16) -> Flow {
    Flow::tcp(
        SocketAddr::from((Ipv4Addr::new(10, 77, 0, 100), 40000 + port)),
        SocketAddr::from((ip, port)),
    )
}

pub fn peer_input_is_refused(lab: &Lab) -> Result<()> {
    let token = Token::from_file(&lab.description().token_file)?;
    let agent = SocketAddr::V4(lab.host("h2")?.agent_addr);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let connect = || -> Result<std::net::TcpStream> {
        let tcp = lab.connect_tcp("client", agent, Duration::from_secs(2))?;
        tcp.set_nonblocking(true)?;
        Ok(tcp)
    };
    let (first, second) = (connect()?, connect()?);
    runtime.block_on(async {
        let mut stream = session(first, &token).await?;
        let valid = probe_container();
        let path_like = ContainerRef {
            id: "../../../../etc/passwd".into(),
            ..valid.clone()
        };
        let bad_name = ContainerRef {
            name: "../etc".into(),
            ..valid.clone()
        };
        let cases = [
            (
                "a path-like container ID",
                ClientMessage::Preflight {
                    container: path_like.clone(),
                },
                ErrorCode::Invalid,
            ),
            (
                "a name podman cannot have",
                ClientMessage::Preflight {
                    container: bad_name,
                },
                ErrorCode::Invalid,
            ),
            (
                "a path-like migration ID",
                ClientMessage::BeginMigration {
                    migration_id: "../../tmp/x".into(),
                    container: valid.clone(),
                    source_public_key: "A".repeat(43) + "=",
                },
                ErrorCode::Invalid,
            ),
            (
                "a key that is not a key, to begin with",
                ClientMessage::BeginMigration {
                    migration_id: "c".repeat(32),
                    container: valid.clone(),
                    source_public_key: "../wg".into(),
                },
                ErrorCode::Invalid,
            ),
            (
                "an upload with no migration begun",
                ClientMessage::PutCheckpoint {
                    migration_id: "c".repeat(32),
                    container: valid.clone(),
                },
                ErrorCode::State,
            ),
            (
                "a path-like container to query",
                ClientMessage::QueryContainer {
                    id: "/etc/shadow".into(),
                },
                ErrorCode::Invalid,
            ),
            (
                "a path-like migration to resolve",
                ClientMessage::Resolve {
                    migration_id: "..".into(),
                },
                ErrorCode::Invalid,
            ),
            (
                "a path-like migration switched",
                ClientMessage::TrafficSwitched {
                    migration_id: "../x".into(),
                },
                ErrorCode::Invalid,
            ),
            (
                "an unknown migration switched",
                ClientMessage::TrafficSwitched {
                    migration_id: "0".repeat(32),
                },
                ErrorCode::State,
            ),
            (
                "a key that is not a key",
                ClientMessage::OpenTunnel {
                    public_key: "../wg".into(),
                },
                ErrorCode::Invalid,
            ),
            (
                "a restore with no upload",
                ClientMessage::Restore {
                    container: valid.clone(),
                    lazy: None,
                },
                ErrorCode::State,
            ),
            (
                "flows with no upload",
                ClientMessage::PrepareTraffic {
                    source_public_key: "A".repeat(43) + "=",
                    container_ip: ADDRESS,
                    flows: vec![flow_to(ADDRESS, 80)],
                },
                ErrorCode::State,
            ),
        ];
        for (what, message, code) in cases {
            refused(&mut stream, what, &message, code).await?;
        }

        // A migration of its own, then requests that reach past it.
        let migration_id = "c".repeat(32);
        let key = "A".repeat(43) + "=";
        stream
            .send(&ClientMessage::BeginMigration {
                migration_id: migration_id.clone(),
                container: valid.clone(),
                source_public_key: key.clone(),
            })
            .await?;
        match stream.recv::<ServerMessage>().await? {
            ServerMessage::MigrationBegun => {}
            other => bail!("begin: {other:?}"),
        }
        let rules = lab.exec_stdout("h2", &["nft", "list", "table", "ip", "live_migrate_hold"])?;
        ensure!(
            rules.contains(&format!("lm:hold {ADDRESS}")),
            "the begun migration does not hold its packets: {rules}"
        );
        let other_container = ContainerRef {
            id: "d".repeat(64),
            ..valid.clone()
        };
        refused(
            &mut stream,
            "an upload of another container",
            &ClientMessage::PutCheckpoint {
                migration_id: migration_id.clone(),
                container: other_container.clone(),
            },
            ErrorCode::Invalid,
        )
        .await?;
        stream
            .send(&ClientMessage::PutCheckpoint {
                migration_id: migration_id.clone(),
                container: valid.clone(),
            })
            .await?;
        common::session::transfer::send_stream(&mut stream, &b"not really an archive"[..], |_| {})
            .await?;
        match stream.recv::<ServerMessage>().await? {
            ServerMessage::CheckpointStored { .. } => {}
            other => bail!("upload: {other:?}"),
        }
        let foreign = Ipv4Addr::new(10, 88, 2, 251);
        let too_many = (0..=MAX_FLOWS_PER_BATCH as u16)
            .map(|p| flow_to(ADDRESS, p))
            .collect();
        let cases = [
            (
                "another container's address",
                ClientMessage::PrepareTraffic {
                    source_public_key: key.clone(),
                    container_ip: foreign,
                    flows: Vec::new(),
                },
                ErrorCode::Invalid,
            ),
            (
                "a flow that does not involve the container",
                ClientMessage::PrepareTraffic {
                    source_public_key: key.clone(),
                    container_ip: ADDRESS,
                    flows: vec![flow_to(foreign, 80)],
                },
                ErrorCode::Invalid,
            ),
            (
                "an oversized flow list",
                ClientMessage::PrepareTraffic {
                    source_public_key: key.clone(),
                    container_ip: ADDRESS,
                    flows: too_many,
                },
                ErrorCode::Invalid,
            ),
            (
                "a restore of another container",
                ClientMessage::Restore {
                    container: other_container,
                    lazy: None,
                },
                ErrorCode::Invalid,
            ),
            (
                "a lazy restore whose TLS credentials are not PEM",
                ClientMessage::Restore {
                    container: valid.clone(),
                    lazy: Some(LazyRestore {
                        page_server_port: 1,
                        until_resumed: true,
                        credentials: PageCredentials {
                            certificate: "../../etc/shadow".into(),
                            key: "-----BEGIN PRIVATE KEY-----".into(),
                        },
                    }),
                },
                ErrorCode::Invalid,
            ),
            (
                "a second upload",
                ClientMessage::PutCheckpoint {
                    migration_id: migration_id.clone(),
                    container: valid.clone(),
                },
                ErrorCode::State,
            ),
            (
                "a second migration on one connection",
                ClientMessage::BeginMigration {
                    migration_id: "e".repeat(32),
                    container: valid.clone(),
                    source_public_key: key.clone(),
                },
                ErrorCode::State,
            ),
        ];
        for (what, message, code) in cases {
            refused(&mut stream, what, &message, code).await?;
        }

        // The same container cannot migrate twice at once.
        let mut other = session(second, &token).await?;
        other
            .send(&ClientMessage::BeginMigration {
                migration_id: "f".repeat(32),
                container: valid.clone(),
                source_public_key: key.clone(),
            })
            .await?;
        match other.recv::<ServerMessage>().await? {
            ServerMessage::Error {
                code: ErrorCode::Busy,
                ..
            } => {}
            other => {
                bail!("a second migration of the same container was not refused as busy: {other:?}")
            }
        }
        drop(other);
        // The real one goes on, and a bad archive fails its restore cleanly.
        stream
            .send(&ClientMessage::Restore {
                container: valid.clone(),
                lazy: None,
            })
            .await?;
        match stream.recv::<ServerMessage>().await? {
            ServerMessage::Error {
                code: ErrorCode::Host,
                message,
            } => {
                eprintln!("restore of garbage refused: {message}")
            }
            other => bail!("restore of a garbage archive: {other:?}"),
        }
        anyhow::Ok(())
    })?;
    // Nothing of it on the host once the connections are gone.
    wait_for("h2 to wind the probe down", Duration::from_secs(10), || {
        Ok(lab.agent_state("h2", "sessions")?.is_empty()
            && lab.agent_state("h2", "incoming")?.is_empty())
    })?;
    let routes = lab.exec_stdout("h2", &["ip", "route", "show", "table", "main"])?;
    ensure!(!routes.contains("10.88.2.25"), "a route was left: {routes}");
    // `BeginMigration` held the probe's packets.
    let rules = lab.exec_stdout("h2", &["nft", "list", "ruleset"])?;
    ensure!(
        !rules.contains("10.88.2.25"),
        "a hold rule was left: {rules}"
    );
    let tracked = lab.exec_stdout("h2", &["conntrack", "-L"])?;
    ensure!(
        !tracked.contains("10.88.2.25"),
        "a conntrack entry was left: {tracked}"
    );
    ensure!(lab.agent_running("h2")?, "agent-server on h2 died");
    Ok(())
}

async fn session(tcp: std::net::TcpStream, token: &Token) -> Result<Stream> {
    let mut stream = FramedStream::new(tokio::net::TcpStream::from_std(tcp)?);
    authenticate_to_server(&mut stream, token)
        .await
        .context("handshake")?;
    Ok(stream)
}

async fn refused(
    stream: &mut Stream,
    what: &str,
    message: &ClientMessage,
    code: ErrorCode,
) -> Result<()> {
    stream.send(message).await?;
    match stream.recv::<ServerMessage>().await? {
        ServerMessage::Error { code: got, message } if got == code && !message.is_empty() => {
            eprintln!("{what}: refused ({got:?}): {message}");
            Ok(())
        }
        other => bail!("{what} was not refused with {code:?}: {other:?}"),
    }
}

/// A container with 20,000 tracked flows migrates: they go in bounded batches, and the
/// destination tracks every one of them.
pub fn twenty_thousand_flows_migrate(lab: &Lab) -> Result<()> {
    const FLOWS: u16 = 20_000;
    lab.run_container("h1", "busy", &[], "localhost/tcp-echo", &[])?;
    let ip: Ipv4Addr = lab.container_ip("h1", "busy")?.parse()?;
    let client = Ipv4Addr::new(10, 77, 0, 100);
    // Entries as the kernel would have them for that many clients, made through netlink
    // in h1's network namespace.
    lab.in_netns("h1", || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            for port in 0..FLOWS {
                let flow = Flow::udp(
                    SocketAddr::from((client, 20_000 + port)),
                    SocketAddr::from((ip, 5000)),
                );
                common::kernel::conntrack::create(&flow).await?;
            }
            anyhow::Ok(())
        })
    })??;
    let outcome = super::migrate(lab, "h1", "busy", "h2");
    let tracked = |host| -> Result<usize> {
        let out = lab.exec_unchecked(
            host,
            &[
                "conntrack",
                "-L",
                "-p",
                "udp",
                "--orig-dst",
                &ip.to_string(),
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    };
    let on_h2 = tracked("h2");
    for host in ["h1", "h2"] {
        let _ = lab.podman(host, &["rm", "-f", "-t", "0", "busy"]);
        let _ = lab.exec_unchecked(
            host,
            &[
                "conntrack",
                "-D",
                "-p",
                "udp",
                "--orig-dst",
                &ip.to_string(),
            ],
        );
    }
    outcome?;
    let on_h2 = on_h2?;
    ensure!(
        on_h2 >= usize::from(FLOWS),
        "h2 tracks {on_h2} of the {FLOWS} flows"
    );
    Ok(())
}
