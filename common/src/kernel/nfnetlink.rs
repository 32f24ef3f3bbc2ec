//! Requests to the kernel's netfilter subsystems over `NETLINK_NETFILTER` (nfnetlink),
//! with the `netlink-packet-netfilter` crate: one socket, one exchange of messages and
//! their answers. [`crate::kernel::conntrack`] (ctnetlink) and [`crate::kernel::hold`] (nftables rules and
//! nfqueue) build their messages on it.
//!
//! Everything here acts on the network namespace of the thread that opens the socket.

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_netfilter::NetfilterMessage;
use netlink_sys::{protocols::NETLINK_NETFILTER, AsyncSocket, AsyncSocketExt, TokioSocket};

pub use nix::errno::Errno;

/// A NACK from the kernel, with its errno.
#[derive(Debug, thiserror::Error)]
#[error("netlink error: {source}")]
pub struct NetlinkNack {
    pub errno: Errno,
    source: std::io::Error,
}

/// The errno of a NACK anywhere in `e`'s chain.
pub fn errno_of(e: &anyhow::Error) -> Option<Errno> {
    e.chain()
        .find_map(|c| c.downcast_ref::<NetlinkNack>())
        .map(|n| n.errno)
}

/// An nfnetlink socket bound to a kernel-assigned port and connected to the kernel.
pub fn open() -> Result<TokioSocket> {
    let mut socket = TokioSocket::new(NETLINK_NETFILTER).context("opening a netlink socket")?;
    socket
        .socket_mut()
        .bind_auto()
        .context("binding the netlink socket")?;
    socket
        .socket_mut()
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .context("connecting the netlink socket")?;
    Ok(socket)
}

/// One request, on a socket of its own: see [`exchange`].
pub async fn request(messages: Vec<(NetfilterMessage, u16)>) -> Result<Vec<NetfilterMessage>> {
    exchange(&mut open()?, messages).await
}

/// Sends `messages` (each with its netlink flags) in one datagram, so that a batch
/// (`BatchBegin` ... `BatchEnd`) is one transaction, and collects the netfilter messages
/// of the answer until every message flagged `NLM_F_ACK` is acknowledged, or a dump
/// (`NLM_F_DUMP`) has ended. The first NACK is the error.
pub async fn exchange(
    socket: &mut TokioSocket,
    messages: Vec<(NetfilterMessage, u16)>,
) -> Result<Vec<NetfilterMessage>> {
    let mut acks_due = 0;
    let mut dump = false;
    let mut datagram = Vec::new();
    for (seq, (message, flags)) in messages.into_iter().enumerate() {
        // NLM_F_DUMP is two bits that mean EXCL and REPLACE on a NEW request.
        let dumps = flags & NLM_F_DUMP == NLM_F_DUMP;
        acks_due += usize::from(flags & NLM_F_ACK == NLM_F_ACK && !dumps);
        dump |= dumps;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq as u32 + 1;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let start = datagram.len();
        datagram.resize(start + packet.buffer_len(), 0);
        packet.serialize(&mut datagram[start..]);
    }
    socket
        .send(&datagram)
        .await
        .context("sending a netlink request")?;

    let mut out = Vec::new();
    while acks_due > 0 || dump {
        let (data, _) = socket
            .recv_from_full()
            .await
            .context("receiving a netlink answer")?;
        if data.is_empty() {
            bail!("netlink socket closed before the end of the answer");
        }
        let mut offset = 0;
        while offset < data.len() {
            let reply = NetlinkMessage::<NetfilterMessage>::deserialize(&data[offset..])
                .map_err(|e| anyhow!("malformed netlink message: {e}"))?;
            let len = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => dump = false,
                NetlinkPayload::Error(err) => match err.code {
                    None => acks_due = acks_due.saturating_sub(1),
                    Some(code) => {
                        return Err(NetlinkNack {
                            errno: Errno::from_raw(-code.get()),
                            source: err.to_io(),
                        }
                        .into())
                    }
                },
                NetlinkPayload::InnerMessage(message) => out.push(message),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
        }
    }
    Ok(out)
}
