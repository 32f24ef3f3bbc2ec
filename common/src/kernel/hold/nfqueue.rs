//! The nfqueue side of a hold: binding a queue of its own, reading the kernel's packet
//! notifications, batch verdicts, and the queue's counters in procfs.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use netlink_packet_core::{DefaultNla, NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    NetfilterSubsystem,
};
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket};

use crate::kernel::nfnetlink::{self, errno_of, Errno};

const NFNL_SUBSYS_QUEUE: u8 = 3;
const NFQNL_MSG_PACKET: u8 = 0;
const NFQNL_MSG_CONFIG: u8 = 2;
const NFQNL_MSG_VERDICT_BATCH: u8 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
/// Queue GSO packets whole: nothing here looks at them, so there is no need to segment.
const NFQA_CFG_F_GSO: u32 = 4;
const NF_ACCEPT: u32 = 1;
const AF_INET: u16 = 2;
/// Room for the notifications of a full queue (a few hundred bytes each in the kernel).
const RECEIVE_BUFFER: usize = 32 << 20;

fn queue_message(queue: u16, message_type: u8, attributes: Vec<DefaultNla>) -> NetfilterMessage {
    NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, queue),
        NetfilterMessageInner::Other {
            subsys: NetfilterSubsystem::Other(NFNL_SUBSYS_QUEUE),
            message_type,
            attributes,
        },
    )
}

/// Binds a free queue number on a socket of its own, metadata only, at most `bound`
/// packets.
pub(super) async fn bind_queue(bound: u32) -> Result<(TokioSocket, u16)> {
    let mut socket = nfnetlink::open()?;
    nix::sys::socket::setsockopt(
        socket.socket_ref(),
        nix::sys::socket::sockopt::RcvBufForce,
        &RECEIVE_BUFFER,
    )
    .context("sizing the nfqueue socket's receive buffer")?;
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    // struct nfqnl_msg_config_cmd { u8 command; u8 pad; be16 pf; }
    let [pf_high, pf_low] = AF_INET.to_be_bytes();
    let bind = [NFQNL_CFG_CMD_BIND, 0, pf_high, pf_low];
    // struct nfqnl_msg_config_params { be32 copy_range; u8 copy_mode; } (packed)
    let [r0, r1, r2, r3] = 0u32.to_be_bytes();
    let params = [r0, r1, r2, r3, NFQNL_COPY_META];
    for _ in 0..32 {
        let queue = rand::random::<u16>() | 0x8000;
        let bind_message = queue_message(
            queue,
            NFQNL_MSG_CONFIG,
            vec![DefaultNla::new(NFQA_CFG_CMD, bind.to_vec())],
        );
        match nfnetlink::exchange(&mut socket, vec![(bind_message, flags)]).await {
            Ok(_) => {
                let config = queue_message(
                    queue,
                    NFQNL_MSG_CONFIG,
                    vec![
                        DefaultNla::new(NFQA_CFG_PARAMS, params.to_vec()),
                        DefaultNla::new(NFQA_CFG_QUEUE_MAXLEN, bound.to_be_bytes().to_vec()),
                        DefaultNla::new(NFQA_CFG_FLAGS, NFQA_CFG_F_GSO.to_be_bytes().to_vec()),
                        DefaultNla::new(NFQA_CFG_MASK, NFQA_CFG_F_GSO.to_be_bytes().to_vec()),
                    ],
                );
                nfnetlink::exchange(&mut socket, vec![(config, flags)])
                    .await
                    .context("configuring the nfqueue")?;
                return Ok((socket, queue));
            }
            Err(e) if errno_of(&e) == Some(Errno::EBUSY) => continue,
            Err(e) => return Err(e.context("binding an nfqueue")),
        }
    }
    bail!("no free nfqueue number found")
}

/// Packets held so far.
#[derive(Default)]
pub(super) struct Held {
    pub(super) count: u64,
    /// The newest packet's id: a batch verdict lets through every packet up to it.
    pub(super) last_id: Option<u32>,
}

/// Takes note of the packet notifications in one datagram: the newest id, and, if they
/// are `held` rather than passed, their count.
pub(super) fn note_packets(data: &[u8], held: &mut Held, holding: bool) {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload, Nla};
    let mut offset = 0;
    while offset < data.len() {
        let Ok(message) = NetlinkMessage::<NetfilterMessage>::deserialize(&data[offset..]) else {
            return;
        };
        let len = message.header.length as usize;
        if let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner:
                NetfilterMessageInner::Other {
                    message_type: NFQNL_MSG_PACKET,
                    attributes,
                    ..
                },
            ..
        }) = message.payload
        {
            let id = attributes
                .iter()
                .find(|a| a.kind() == NFQA_PACKET_HDR)
                .and_then(|a| {
                    let mut header = vec![0; a.value_len()];
                    a.emit_value(&mut header);
                    Some(u32::from_be_bytes(header.get(..4)?.try_into().ok()?))
                });
            if let Some(id) = id {
                held.count += u64::from(holding);
                held.last_id = Some(held.last_id.map_or(id, |last| last.max(id)));
            }
        }
        if len == 0 {
            return;
        }
        offset += (len + 3) & !3;
    }
}

/// Accepts every held packet up to `last_id`, in the order they came.
pub(super) async fn accept_up_to(socket: &mut TokioSocket, queue: u16, last_id: u32) -> Result<()> {
    let mut verdict = NF_ACCEPT.to_be_bytes().to_vec();
    verdict.extend(last_id.to_be_bytes());
    let message = queue_message(
        queue,
        NFQNL_MSG_VERDICT_BATCH,
        vec![DefaultNla::new(NFQA_VERDICT_HDR, verdict)],
    );
    nfnetlink::exchange(socket, vec![(message, NLM_F_REQUEST)])
        .await
        .map(drop)
}

/// Takes note of every notification already received, without waiting for more.
pub(super) async fn note_pending(socket: &mut TokioSocket, held: &mut Held) {
    while let Ok(Ok((data, _))) =
        tokio::time::timeout(Duration::ZERO, socket.recv_from_full()).await
    {
        note_packets(&data, held, true);
    }
}

/// One queue's line of `/proc/net/netfilter/nfnetlink_queue` (this network namespace).
pub(super) struct QueueState {
    /// Packets waiting for a verdict.
    pub(super) waiting: u64,
    /// Dropped because the queue was full, or because this process could not be told.
    pub(super) dropped: u64,
}

pub(super) fn queue_state(queue: u16) -> Result<QueueState> {
    // The calling thread's network namespace, which may not be the process's.
    const PATH: &str = "/proc/thread-self/net/netfilter/nfnetlink_queue";
    let table = std::fs::read_to_string(PATH).with_context(|| format!("reading {PATH}"))?;
    parse_queue_state(&table, queue).with_context(|| format!("queue {queue} is not in {PATH}"))
}

/// Columns: queue, port id, waiting, copy mode, copy range, dropped (queue full), dropped
/// (notification failed), last id, 1.
fn parse_queue_state(table: &str, queue: u16) -> Option<QueueState> {
    table.lines().find_map(|line| {
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        (fields.len() >= 7 && fields[0] == u64::from(queue)).then(|| QueueState {
            waiting: fields[2],
            dropped: fields[5] + fields[6],
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_state_is_read_from_its_line() {
        let table = "    7  12345     0 1     0     0     0        3  1\n\
                     40000  999    12 1 65531     3     2      812  1\n";
        let state = parse_queue_state(table, 40000).unwrap();
        assert_eq!((state.waiting, state.dropped), (12, 5));
        assert!(parse_queue_state(table, 8).is_none());
    }
}
