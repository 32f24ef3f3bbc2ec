//! Ending a TCP socket that another process holds, through the kernel's socket
//! diagnostics (`SOCK_DESTROY`, netlink): its owner's pending `accept` or `recv` fails
//! (`EINVAL`, `ECONNABORTED`), as if the peer had reset it. Unlike killing the owner, that
//! lets it handle the failure: CRIU's page server then ends its dump as failed, thaws
//! the network it locked and gives the processes it holds back their TCP connections.

use std::net::{IpAddr, SocketAddrV4};

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage, AF_INET, IPPROTO_TCP};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// Destroys the TCP socket from `local` to `remote`, or the one listening on `local` when
/// `remote` is `None`. One that is gone already is fine. Blocking (one netlink exchange).
pub fn destroy_tcp(local: SocketAddrV4, remote: Option<SocketAddrV4>) -> Result<()> {
    let remote = remote.unwrap_or_else(|| SocketAddrV4::new([0, 0, 0, 0].into(), 0));
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("open a sock_diag socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let request = SockDiagMessage::InetRequest(InetRequest {
        family: AF_INET,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: local.port(),
            destination_port: remote.port(),
            source_address: IpAddr::V4(*local.ip()),
            destination_address: IpAddr::V4(*remote.ip()),
            interface_id: 0,
            // Any socket with these addresses (the kernel ignores an all-ones cookie).
            cookie: [0xff; 8],
        },
    });
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(SockDiagDestroy::new(request)),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).context("send SOCK_DESTROY")?;
    let mut answer = Vec::with_capacity(4096);
    socket
        .recv(&mut answer, 0)
        .context("read SOCK_DESTROY's answer")?;
    let reply = NetlinkMessage::<SockDiagDestroy>::deserialize(&answer)
        .context("parse SOCK_DESTROY's answer")?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            // No such socket: gone already.
            Some(code) if code.get() == -(nix::errno::Errno::ENOENT as i32) => Ok(()),
            Some(code) => bail!(
                "destroy the TCP socket {local} -> {remote}: {}",
                std::io::Error::from_raw_os_error(-code.get())
            ),
        },
        other => bail!("unexpected answer to SOCK_DESTROY: {other:?}"),
    }
}
