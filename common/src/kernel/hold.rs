//! Holding a frozen container's packets on the source instead of dropping them.
//!
//! While a container is checkpointed, moved and restored, its clients keep sending. Dropped
//! packets make TCP back off (200, 400, 800 ms, ...), so a client would pause well beyond
//! the freeze. Instead, from the checkpoint on, a rule queues every packet for the
//! container's address to this process (nfqueue), which keeps the kernel's verdict
//! pending: the packets wait in the kernel, in order. Once the destination runs the
//! container and its address is routed into the tunnel, they are accepted in one batch
//! and go on through routing, as if they had just arrived: to the destination, or to the
//! container here again after a rollback.
//!
//! Both hosts [`arm`] their hold ahead of the freeze: its rule is in place, but the
//! packets go on through routing as they come until [`hold_back`], which needs no
//! nftables commit (a commit takes 10 ms or more, which the freeze would otherwise pay).
//! The source arms it just before the freeze, the destination when the migration begins.
//!
//! The rule lives in a table of its own, `ip live_migrate_hold`, with one base chain
//! (prerouting, priority -50: after the DNAT of published ports, so that their packets
//! carry the container's address). The queue target is xtables' `NFQUEUE` through
//! nftables' compat expression: this kernel has no native nft `queue`, and the `nft`
//! tool cannot write compat expressions, so the rules are written over netlink here. Each
//! rule carries the comment `lm:hold <ip>`, by which it is found and deleted.
//!
//! The queue is bounded ([`DEFAULT_BOUND`] packets unless configured): the kernel drops
//! what overflows and counts it, and [`HoldReport`] says how many. If the holding process
//! dies, the kernel drops the packets it held; the rule, without a listener, drops new
//! ones (as the blackhole route does) until [`release`] in the process that resolves the
//! migration removes it.
//!
//! Deleting a base chain flushes every nfqueue of its network namespace, so the chain is
//! never deleted while a hold may be live; rules come and go, the chain stays.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_ECHO, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    nftables::{
        ChainAttribute, ChainMessage, Cmp, DataAttribute, Expressions, Hook, InetHookNumber, Meta,
        MetaKey, NfTablesMessage, Operator as CmpOperator, Payload, Register, RuleAttribute,
        RuleMessage, TableAttribute, TableMessage,
    },
    none::ControlMessage,
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    NetfilterSubsystem,
};
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket};
use tokio::sync::oneshot;

use crate::kernel::nfnetlink::{self, errno_of, Errno};
use crate::protocol::HoldReport;

/// The hold's table (family `ip`).
pub const TABLE: &str = "live_migrate_hold";
/// Its base chain.
pub const CHAIN: &str = "prerouting";
/// After `dstnat` (-100), before `filter` (0).
const CHAIN_PRIORITY: i32 = -50;
/// Packets held per container unless configured: 2 s at 10,000 packets/s.
pub const DEFAULT_BOUND: u32 = 20_000;

/// Holds of this process, by container address: [`release`] lets their packets through.
static LIVE: Mutex<BTreeMap<Ipv4Addr, Live>> = Mutex::new(BTreeMap::new());

struct Live {
    release: oneshot::Sender<Release>,
    /// Off while an [`arm`]ed hold still lets every packet through as it comes.
    holding: Arc<AtomicBool>,
}

/// Asks a hold's task to let its packets through and report.
type Release = oneshot::Sender<Result<HoldReport>>;

/// Starts holding packets for `ip`, at most `bound` at a time; with `except_from`, not
/// those that arrive through that interface.
pub async fn start(ip: Ipv4Addr, bound: u32, except_from: Option<&str>) -> Result<()> {
    queue_packets(ip, bound, except_from, true).await
}

/// Like [`start`], but the packets go on through routing as they come until [`hold_back`]:
/// the nftables commit of the rule happens now, and holding then costs no kernel change.
pub async fn arm(ip: Ipv4Addr, bound: u32, except_from: Option<&str>) -> Result<()> {
    queue_packets(ip, bound, except_from, false).await
}

/// Packets for `ip` that meet its [`arm`]ed hold are held from now on. False if this
/// process has no hold on `ip`.
pub fn hold_back(ip: Ipv4Addr) -> bool {
    let live = LIVE.lock().expect("hold registry poisoned");
    live.get(&ip)
        .map(|hold| hold.holding.store(true, Ordering::Release))
        .is_some()
}

async fn queue_packets(
    ip: Ipv4Addr,
    bound: u32,
    except_from: Option<&str>,
    holding: bool,
) -> Result<()> {
    // A rule left by a hold that was never released would come first and, without its
    // listener, drop the packets.
    release(ip).await?;
    let (mut socket, queue) = bind_queue(bound).await?;
    let rule = install_rule(ip, queue, except_from)
        .await
        .with_context(|| format!("installing the hold rule for {ip}"))?;
    let (release, released) = oneshot::channel();
    let holding = Arc::new(AtomicBool::new(holding));
    LIVE.lock().expect("hold registry poisoned").insert(
        ip,
        Live {
            release,
            holding: holding.clone(),
        },
    );
    tokio::spawn(async move {
        let held = hold(&mut socket, queue, &holding, released).await;
        if let Some((held, reply)) = held {
            let queue = Queue {
                queue,
                ip,
                rule,
                bound,
            };
            let _ = reply.send(let_through(&mut socket, &queue, held).await);
        }
    });
    Ok(())
}

/// Ends the hold on `ip`: this process's held packets go on through routing (so route the
/// address where it belongs first), and the rule goes. Without a hold of this process
/// (it died, or none was started) only the rule, if any, is removed. Idempotent.
pub async fn release(ip: Ipv4Addr) -> Result<Option<HoldReport>> {
    let live = LIVE.lock().expect("hold registry poisoned").remove(&ip);
    if let Some(live) = live {
        let (reply, report) = oneshot::channel();
        if live.release.send(reply).is_ok() {
            if let Ok(report) = report.await {
                return report.map(Some);
            }
        }
    }
    remove_rules(ip).await?;
    Ok(None)
}

// --- the queue -------------------------------------------------------------------------

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
/// How long the release waits for the packets that met the rule before it went.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

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
async fn bind_queue(bound: u32) -> Result<(TokioSocket, u16)> {
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
struct Held {
    count: u64,
    /// The newest packet's id: a batch verdict lets through every packet up to it.
    last_id: Option<u32>,
}

/// Takes note of the queue's packets until asked to let them through (while not
/// `holding`, lets them through as they come); `None` if the asker went away (the process
/// is ending: the kernel drops the packets with the socket).
async fn hold(
    socket: &mut TokioSocket,
    queue: u16,
    holding: &AtomicBool,
    mut released: oneshot::Receiver<Release>,
) -> Option<(Held, Release)> {
    let mut held = Held::default();
    loop {
        tokio::select! {
            reply = &mut released => return reply.ok().map(|reply| (held, reply)),
            received = socket.recv_from_full() => match received {
                Ok((data, _)) if holding.load(Ordering::Acquire) => note_packets(&data, &mut held),
                Ok((data, _)) => {
                    // Passed, not held: only the newest id counts (a packet whose verdict
                    // fails here stays queued until the release's batch).
                    let held_so_far = held.count;
                    note_packets(&data, &mut held);
                    held.count = held_so_far;
                    if let Some(last) = held.last_id {
                        if let Err(e) = accept_up_to(socket, queue, last).await {
                            tracing::debug!("nfqueue verdict: {e:#}");
                        }
                    }
                }
                // ENOBUFS: notifications were lost; the kernel dropped and counted those
                // packets.
                Err(e) => tracing::debug!("nfqueue receive: {e}"),
            },
        }
    }
}

/// Counts the packet notifications in one datagram.
fn note_packets(data: &[u8], held: &mut Held) {
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
                held.count += 1;
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
async fn accept_up_to(socket: &mut TokioSocket, queue: u16, last_id: u32) -> Result<()> {
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

/// One live hold.
#[derive(Clone, Copy)]
struct Queue {
    queue: u16,
    ip: Ipv4Addr,
    /// The handle of its rule.
    rule: u64,
    bound: u32,
}

/// Lets the held packets through, removes the rule (letting through, as they come, the
/// packets that meet it meanwhile), then lets through what was still queued, until the
/// kernel holds nothing for this queue. The rule goes by its handle, in one request, to
/// keep that window short.
async fn let_through(socket: &mut TokioSocket, hold: &Queue, mut held: Held) -> Result<HoldReport> {
    let Queue {
        queue,
        ip,
        rule,
        bound,
    } = *hold;
    // Notifications still unread name packets queued already: they go in the first batch,
    // or they would come after packets that no longer meet the rule.
    note_pending(socket, &mut held).await;
    if let Some(last) = held.last_id {
        accept_up_to(socket, queue, last).await?;
    }
    // Removing the rule is an nftables commit, which can take tens of milliseconds: the
    // packets that still meet it meanwhile are let through as they come, so that none waits
    // in the queue while a newer one, that no longer meets the rule, overtakes it. The
    // kernel commits within the netlink send, which blocks its thread: a task of its own
    // keeps this one answering meanwhile.
    let mut removing = tokio::spawn(remove_rule(ip, rule));
    loop {
        let received = tokio::select! {
            removed = &mut removing => {
                removed??;
                break;
            }
            received = socket.recv_from_full() => received,
        };
        if let Ok((data, _)) = received {
            note_packets(&data, &mut held);
            if let Some(last) = held.last_id {
                accept_up_to(socket, queue, last).await?;
            }
        }
    }
    // Packets that met the rule before it went: their notifications are on the way.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        note_pending(socket, &mut held).await;
        if let Some(last) = held.last_id {
            accept_up_to(socket, queue, last).await?;
        }
        let state = queue_state(queue)?;
        if state.waiting == 0 {
            return Ok(HoldReport {
                held: held.count,
                dropped: state.dropped,
                bound,
            });
        }
        if Instant::now() > deadline {
            bail!(
                "the kernel still holds {} packets of nfqueue {queue} for {ip}",
                state.waiting
            );
        }
        if let Ok(Ok((data, _))) =
            tokio::time::timeout(Duration::from_millis(20), socket.recv_from_full()).await
        {
            note_packets(&data, &mut held);
        }
    }
}

/// Takes note of every notification already received, without waiting for more.
async fn note_pending(socket: &mut TokioSocket, held: &mut Held) {
    while let Ok(Ok((data, _))) =
        tokio::time::timeout(Duration::ZERO, socket.recv_from_full()).await
    {
        note_packets(&data, held);
    }
}

/// One queue's line of `/proc/net/netfilter/nfnetlink_queue` (this network namespace).
struct QueueState {
    /// Packets waiting for a verdict.
    waiting: u64,
    /// Dropped because the queue was full, or because this process could not be told.
    dropped: u64,
}

fn queue_state(queue: u16) -> Result<QueueState> {
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

// --- the rules -------------------------------------------------------------------------

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
/// Offset of the destination address in the IPv4 header.
const IPV4_DADDR_OFFSET: u32 = 16;
const NFTA_TARGET_NAME: u16 = 1;
const NFTA_TARGET_REV: u16 = 2;
const NFTA_TARGET_INFO: u16 = 3;
/// `struct xt_NFQ_info_v3` is revision 3 of the NFQUEUE target.
const NFQUEUE_REVISION: u32 = 3;
/// libnftnl's rule comment (`NFTNL_UDATA_RULE_COMMENT`), so `nft list` shows it.
const UDATA_RULE_COMMENT: u8 = 0;
const NF_ACCEPT_POLICY: u32 = 1;
/// Interface names are compared as the kernel stores them: NUL-padded to 16 bytes.
const IFNAMSIZ: usize = 16;

fn nft_message(message: NfTablesMessage) -> NetfilterMessage {
    NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
        message,
    )
}

fn batch(control: ControlMessage) -> (NetfilterMessage, u16) {
    let header = NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES);
    (NetfilterMessage::new(header, control), NLM_F_REQUEST)
}

fn comment(ip: Ipv4Addr) -> String {
    format!("lm:hold {ip}")
}

/// libnftnl's user-data encoding of a comment: type, length, NUL-terminated text.
fn comment_udata(text: &str) -> Vec<u8> {
    let mut udata = vec![UDATA_RULE_COMMENT, (text.len() + 1) as u8];
    udata.extend(text.as_bytes());
    udata.push(0);
    udata
}

/// `[iifname != <except_from>] ip daddr <ip> queue num <queue>` (the NFQUEUE target: one
/// queue, no bypass, so that without a listener the packets are dropped).
fn hold_rule_expressions(ip: Ipv4Addr, queue: u16, except_from: Option<&str>) -> RuleAttribute {
    let mut info = Vec::new();
    info.extend(queue.to_ne_bytes()); // queuenum
    info.extend(1u16.to_ne_bytes()); // queues_total
    info.extend(0u16.to_ne_bytes()); // flags
    info.extend([0, 0]); // padding to the struct's aligned size
    let mut expressions = Vec::new();
    if let Some(ifname) = except_from {
        let mut name = [0u8; IFNAMSIZ];
        let len = ifname.len().min(IFNAMSIZ - 1);
        name[..len].copy_from_slice(&ifname.as_bytes()[..len]);
        expressions.push(
            Expressions::Meta(vec![
                Meta::DestinationRegister(Register::Reg1),
                Meta::Key(MetaKey::Iifname),
            ])
            .into(),
        );
        expressions.push(
            Expressions::Cmp(vec![
                Cmp::SourceRegister(Register::Reg1),
                Cmp::Op(CmpOperator::NotEqual),
                Cmp::Data(DataAttribute::Value(name.to_vec())),
            ])
            .into(),
        );
    }
    expressions.extend([
        Expressions::Payload(vec![
            Payload::DestinationRegister(Register::Reg1),
            Payload::Base(NFT_PAYLOAD_NETWORK_HEADER),
            Payload::Offset(IPV4_DADDR_OFFSET),
            Payload::Len(4),
        ])
        .into(),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(CmpOperator::Equal),
            Cmp::Data(DataAttribute::Value(ip.octets().to_vec())),
        ])
        .into(),
        Expressions::Other {
            expression_type: "target".into(),
            attributes: vec![
                DefaultNla::new(NFTA_TARGET_NAME, b"NFQUEUE\0".to_vec()),
                DefaultNla::new(NFTA_TARGET_REV, NFQUEUE_REVISION.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_TARGET_INFO, info),
            ],
        }
        .into(),
    ]);
    RuleAttribute::Expressions(expressions)
}

/// The table and its chain (if missing) and the rule, in one transaction; returns the
/// rule's handle.
async fn install_rule(ip: Ipv4Addr, queue: u16, except_from: Option<&str>) -> Result<u64> {
    let create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
    let table = NfTablesMessage::NewTable(TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.into())],
    });
    let chain = NfTablesMessage::NewChain(ChainMessage {
        attributes: vec![
            ChainAttribute::Table(TABLE.into()),
            ChainAttribute::Name(CHAIN.into()),
            ChainAttribute::Hook(vec![
                Hook::Number(InetHookNumber::PreRouting.into()),
                Hook::Priority(CHAIN_PRIORITY as u32),
            ]),
            ChainAttribute::Policy(NF_ACCEPT_POLICY),
            ChainAttribute::Type("filter".into()),
        ],
    });
    let rule = NfTablesMessage::NewRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(TABLE.into()),
            RuleAttribute::Chain(CHAIN.into()),
            hold_rule_expressions(ip, queue, except_from),
            RuleAttribute::UserData(comment_udata(&comment(ip))),
        ],
    });
    let echoed = nfnetlink::request(vec![
        batch(ControlMessage::BatchBegin),
        (nft_message(table), create),
        (nft_message(chain), create),
        (nft_message(rule), create | NLM_F_APPEND | NLM_F_ECHO),
        batch(ControlMessage::BatchEnd),
    ])
    .await?;
    echoed
        .into_iter()
        .find_map(|m| match m.inner {
            NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(rule)) => rule_handle(&rule),
            _ => None,
        })
        .context("the kernel did not echo the new rule's handle")
}

fn rule_handle(rule: &RuleMessage) -> Option<u64> {
    rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Handle(handle) => Some(*handle),
        _ => None,
    })
}

/// Handles of the hold rules for `ip` (none if the table is missing).
async fn rule_handles(ip: Ipv4Addr) -> Result<Vec<u64>> {
    let dump = NfTablesMessage::GetRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(TABLE.into()),
            RuleAttribute::Chain(CHAIN.into()),
        ],
    });
    let rules =
        match nfnetlink::request(vec![(nft_message(dump), NLM_F_REQUEST | NLM_F_DUMP)]).await {
            Ok(rules) => rules,
            Err(e) if errno_of(&e) == Some(Errno::ENOENT) => return Ok(Vec::new()),
            Err(e) => return Err(e.context("listing the hold rules")),
        };
    let ours = comment_udata(&comment(ip));
    Ok(rules
        .into_iter()
        .filter_map(|m| match m.inner {
            NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(rule)) => Some(rule),
            _ => None,
        })
        .filter(|rule| {
            rule.attributes
                .contains(&RuleAttribute::UserData(ours.clone()))
        })
        .filter_map(|rule| rule_handle(&rule))
        .collect())
}

/// Removes the hold rules for `ip` (none is fine).
async fn remove_rules(ip: Ipv4Addr) -> Result<()> {
    for handle in rule_handles(ip).await? {
        remove_rule(ip, handle).await?;
    }
    Ok(())
}

/// Removes one hold rule (gone already is fine).
async fn remove_rule(ip: Ipv4Addr, handle: u64) -> Result<()> {
    let delete = NfTablesMessage::DeleteRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(TABLE.into()),
            RuleAttribute::Chain(CHAIN.into()),
            RuleAttribute::Handle(handle),
        ],
    });
    let deleted = nfnetlink::request(vec![
        batch(ControlMessage::BatchBegin),
        (nft_message(delete), NLM_F_REQUEST | NLM_F_ACK),
        batch(ControlMessage::BatchEnd),
    ])
    .await;
    match deleted {
        Ok(_) => Ok(()),
        Err(e) if errno_of(&e) == Some(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.context(format!("removing the hold rule for {ip}"))),
    }
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

    #[test]
    fn comment_is_libnftnl_user_data() {
        assert_eq!(comment_udata("ab"), vec![0, 3, b'a', b'b', 0]);
    }

    #[test]
    fn hold_rule_serializes_and_parses_back() {
        use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
        let rule = NfTablesMessage::NewRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table(TABLE.into()),
                hold_rule_expressions(Ipv4Addr::new(10, 88, 0, 5), 40000, Some("lmwg-3")),
            ],
        });
        let mut packet = NetlinkMessage::new(
            Default::default(),
            NetlinkPayload::from(nft_message(rule.clone())),
        );
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        let back = NetlinkMessage::<NetfilterMessage>::deserialize(&buf).unwrap();
        let NetlinkPayload::InnerMessage(message) = back.payload else {
            panic!("not a netfilter message");
        };
        assert!(matches!(
            message.inner,
            NetfilterMessageInner::NfTables(NfTablesMessage::NewRule(_))
        ));
    }
}
